"""The parts of scripts/demo.py: data (digit scenes), model (a small segmentation net built with
a norm_layer), run (one training run in a worker process, and the driver that starts and
watches them) and report (table and plot)."""
