"""Benchmark: training step time of BatchNorm vs ProgressiveBatchNorm vs SyncBatchNorm.

A model (``--model convnet``: Conv2D 3x3 + norm + ReLU blocks and a Dense head; ``--model
deeplab``: GluonCV's DeepLabV3-ResNet50 on small crops) is trained for a few steps with each
norm layer, on 1..8 CPU contexts of one process ("local" backend), on Horovod/Gloo processes
("horovod", one device each, through horovodrun) and on KVStore dist_sync workers ("kvstore",
through python -m pbn_gluon.launch). Every (backend, devices) configuration runs ``--repeats``
times, each in its own subprocess under a time limit, so a stall shows up as "timeout" in the
table. Within a run the norms are INTERLEAVED: one net per norm, from the same weights, and each
timed round steps every norm once, in an order that rotates from round to round, so load that
comes and goes on a shared machine lands on every norm alike.

    python scripts/bench_norm.py --quick                         # ~2 min: devices 1, 2
    python scripts/bench_norm.py --json results/bench_norm.json  # the full grid
    python scripts/bench_norm.py --model deeplab --devices 1,2 --backends local,horovod,kvstore \
        --repeats 3 --json results/bench_deeplab.json --plot results/bench_deeplab.png

Reported per norm and configuration: the median step time (seconds, each step ends with
waitall, over the rounds of all repeats), its ratio to BatchNorm as the median of the per-round
ratios (the same round's BatchNorm step) with a 90% interval (bootstrap over repeats, then
rounds), and the exchanges per step counted by pbn_gluon.CountingComm over the timed steps. A ratio whose interval holds 1 is
flagged: the run cannot tell that norm from BatchNorm.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from pbn_gluon import jobs
from pbn_gluon.errors import ArgumentParser, positive_int, user_errors
from pbn_gluon.files import portable, write_json

NORMS = ('bn', 'pbn', 'syncbn')
BACKENDS = jobs.BACKENDS
HERE = os.path.abspath(__file__)


def parse_args(argv=None):
    parser = ArgumentParser(
        description='Step time of BatchNorm, ProgressiveBatchNorm and SyncBatchNorm.')
    parser.add_argument('--norms', type=str, default=','.join(NORMS),
                        help='comma-separated norms among bn, pbn, syncbn.')
    parser.add_argument('--devices', type=str, default='1,2,4,8',
                        help='comma-separated CPU context counts for the local backend.')
    parser.add_argument('--backends', type=str, default='local,horovod',
                        help='comma-separated backends among local, horovod, kvstore.')
    parser.add_argument('--hvd-np', type=positive_int, default=2,
                        help='number of Horovod processes / KVStore workers (one device each).')
    parser.add_argument('--model', choices=['convnet', 'deeplab'], default='convnet',
                        help='convnet: small conv net; deeplab: GluonCV DeepLabV3-ResNet50.')
    parser.add_argument('--repeats', type=positive_int, default=1,
                        help='runs of each configuration (separate processes).')
    parser.add_argument('--plot', type=str, default=None, help='write a bar chart (PNG) here.')
    parser.add_argument('--steps', type=positive_int, default=20, help='timed steps per configuration.')
    parser.add_argument('--warmup', type=int, default=3, help='untimed steps first.')
    parser.add_argument('--batch-size', type=positive_int, default=2, help='images per device.')
    parser.add_argument('--image-size', type=positive_int, default=32, help='height and width of images.')
    parser.add_argument('--channels', type=positive_int, default=16, help='channels of the conv blocks.')
    parser.add_argument('--blocks', type=positive_int, default=3, help='Conv + norm + ReLU blocks.')
    parser.add_argument('--classes', type=positive_int, default=10, help='outputs of the Dense head.')
    parser.add_argument('--timeout', type=float, default=120.,
                        help='seconds one configuration may take before it counts as timeout.')
    parser.add_argument('--quick', action='store_true',
                        help='reduced grid: devices 1 and 2, fewer steps (about a minute).')
    parser.add_argument('--json', type=str, default=None, help='write the records to this file.')
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar.')
    # internal: one configuration, run by a subprocess of this script
    parser.add_argument('--worker', choices=BACKENDS, default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument('--worker-norms', default='bn', help=argparse.SUPPRESS)
    parser.add_argument('--num-devices', type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument('--result', type=str, default=None, help=argparse.SUPPRESS)
    return _checked(parser, parser.parse_args(argv))


def _checked(parser, args):
    """args with --quick applied and the comma-separated lists split and checked."""
    if args.quick:
        args.devices = '1,2'
        args.steps = min(args.steps, 5)
        args.warmup = min(args.warmup, 2)
        args.timeout = min(args.timeout, 60.)
    args.norms = [n for n in args.norms.split(',') if n]
    try:
        args.devices = [positive_int(d) for d in args.devices.split(',') if d]
    except argparse.ArgumentTypeError as err:
        parser.error('argument --devices: %s (a comma-separated list)' % err)
    if not args.devices or not args.norms or not args.backends:
        parser.error('--devices, --norms and --backends need at least one value each')
    args.backends = [b for b in args.backends.split(',') if b]
    for n in args.norms:
        if n not in NORMS:
            parser.error('unknown norm %r (choose from %s)' % (n, ', '.join(NORMS)))
    for b in args.backends:
        if b not in BACKENDS:
            parser.error('unknown backend %r (choose from %s)' % (b, ', '.join(BACKENDS)))
    if args.model == 'deeplab' and args.image_size % 8:
        parser.error('--image-size must be a multiple of 8 for deeplab (output stride 8)')
    return args


# ----------------------------------------------------------------------------------------------
# worker: one configuration, timed in this process
# ----------------------------------------------------------------------------------------------

def build_net(norm_layer, args):
    """convnet: blocks x (Conv2D 3x3 + norm + ReLU), global average pooling, Dense head.
    deeplab: GluonCV DeepLabV3-ResNet50 (no aux head), random initialisation."""
    from mxnet.gluon import nn

    if args.model == 'deeplab':
        from gluoncv.model_zoo import DeepLabV3
        return DeepLabV3(args.classes, backbone='resnet50', aux=False, pretrained_base=False,
                         crop_size=args.image_size, base_size=args.image_size,
                         norm_layer=norm_layer, norm_kwargs={})
    net = nn.HybridSequential(prefix='bench_')
    with net.name_scope():
        in_channels = 3
        for _ in range(args.blocks):
            net.add(nn.Conv2D(args.channels, 3, padding=1, use_bias=False,
                              in_channels=in_channels))
            net.add(norm_layer(in_channels=args.channels))
            net.add(nn.Activation('relu'))
            in_channels = args.channels
        net.add(nn.GlobalAvgPool2D(), nn.Flatten())
        net.add(nn.Dense(args.classes, in_units=args.channels))
    return net


def _job(args):
    """This worker's part of the job (pbn_gluon.jobs.Job): one CPU device per Horovod process
    or KVStore worker, --num-devices CPU contexts on the local backend."""
    from pbn_gluon.jobs import Job
    return Job(args.worker, devices=args.num_devices if args.worker == 'local' else 1)


def _setup(norm, args, job):
    """One norm's net (the same initial weights for every norm) and pbn_gluon.Trainer (its
    StatsSync, over a CountingComm, is ``sync``)."""
    import mxnet as mx
    import pbn_gluon
    from pbn_gluon.segmentation.norms import get_norm_layer

    mx.random.seed(0)
    ctxs = job.contexts
    net = build_net(get_norm_layer(norm, ctxs, in_process=job.in_process), args)
    net.initialize(mx.init.Xavier(), ctx=ctxs)
    net.collect_params().reset_ctx(ctxs)    # DeepLab initialises its head on cpu(0) itself
    net.hybridize(static_alloc=True)
    # one net per norm in this process: Horovod's tensor names must differ
    job.broadcast(net.collect_params(), prefix=norm + '.')
    if args.model == 'deeplab' and norm == 'syncbn' and job.comm.needs_prepare:
        # SyncBN over dist_sync declares its exchanges by channel count: shapes from the graph
        net.infer_shape(mx.nd.zeros((1, 3, args.image_size, args.image_size), ctx=ctxs[0]))
    counting = pbn_gluon.CountingComm(job.comm)     # exchanges per step: observed, not assumed
    trainer = job.trainer(net.collect_params(), {'learning_rate': 0.01, 'momentum': 0.9},
                          prefix=norm + '.', comm=counting)
    sync = trainer.stats
    return dict(net=net, trainer=trainer, sync=sync, comm=counting, times=[],
                layers=len(pbn_gluon.find_norm_layers(net)) if sync is not None else None)


def _batch(args, ctxs):
    """Random images and labels on every device of this worker, and the loss (deeplab: per
    pixel, on the main output)."""
    import mxnet as mx
    import numpy as np
    from mxnet import gluon

    shape = (args.batch_size, 3, args.image_size, args.image_size)
    data = [mx.nd.array(np.random.normal(size=shape), ctx=c) for c in ctxs]
    if args.model == 'deeplab':     # per-pixel labels, loss on the main output
        cross_entropy = gluon.loss.SoftmaxCrossEntropyLoss(axis=1)
        loss_fn = lambda out, y: cross_entropy(out[0], y)
        label_shape = (args.batch_size, args.image_size, args.image_size)
    else:
        loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        label_shape = (args.batch_size,)
    labels = [mx.nd.array(np.random.randint(0, args.classes, label_shape), ctx=c) for c in ctxs]
    return data, labels, loss_fn


def _timed_step(run, batch, batch_size):
    """One training step of a norm's run, ended by waitall; its wall time in seconds."""
    import mxnet as mx
    from mxnet import autograd

    data, labels, loss_fn = batch
    tic = time.perf_counter()
    with autograd.record():     # every forward before any value is read
        losses = [loss_fn(run['net'](x), y) for x, y in zip(data, labels)]
    autograd.backward(losses)
    run['trainer'].step(batch_size)     # exchanges the statistics, then updates
    mx.nd.waitall()
    if run['sync'] is not None:
        run['sync'].check()     # raises if a device never reached an exchange
    run['loss'] = losses
    return time.perf_counter() - tic


def _time_rounds(runs, norms, args, step):
    """Warm-up steps of each norm (their exchanges not counted), then args.steps rounds that
    step every norm once, in an order that rotates so that no norm always goes first."""
    for norm in norms:
        for _ in range(args.warmup):
            step(runs[norm])
        runs[norm]['comm'].counts.clear()
    for i in range(args.steps):
        for norm in norms[i % len(norms):] + norms[:i % len(norms)]:
            runs[norm]['times'].append(step(runs[norm]))


def _finish(record, run, norm):
    """Fill a norm's record from its timed rounds; a loss that is not finite is an error."""
    import numpy as np

    times = run['times']
    loss = float(sum(l.mean().asscalar() for l in run['loss']) / len(run['loss']))
    if not np.isfinite(loss):
        raise RuntimeError('%s: loss is %r' % (norm, loss))
    record.update(blocking_exchanges_per_step=round(run['comm'].counts['blocking']
                                                    / len(times), 3),
                  nonblocking_exchanges_per_step=run['comm'].counts['non_blocking']
                  / len(times),
                  step_s=float(np.median(times)), step_s_rounds=times, steps=len(times),
                  status='ok', loss=loss)


def run_worker(args):
    """One configuration in this process: every norm's net, interleaved timed rounds, and the
    records written to args.result by the root process."""
    import mxnet as mx
    import numpy as np

    np.random.seed(0)
    job = _job(args)
    norms = args.worker_norms.split(',')
    runs = {norm: _setup(norm, args, job) for norm in norms}
    records = [{'norm': norm, 'backend': args.worker, 'devices': job.size, 'model': args.model,
                'norm_layers': runs[norm]['layers'], 'steps': 0, 'warmup': args.warmup,
                'step_s': None, 'status': 'started'} for norm in norms]
    if job.is_root and args.result:     # known before timing: kept even if the run stalls
        write_json(args.result, records)

    batch = _batch(args, job.contexts)
    batch_size = args.batch_size * len(job.contexts)
    _time_rounds(runs, norms, args, lambda run: _timed_step(run, batch, batch_size))
    for record, norm in zip(records, norms):
        _finish(record, runs[norm], norm)
    if job.is_root and args.result:
        write_json(args.result, records)
    job.shutdown()
    mx.nd.waitall()


# ----------------------------------------------------------------------------------------------
# parent: run every configuration in a subprocess under a time limit
# ----------------------------------------------------------------------------------------------

def worker_command(args, backend, norms, devices, result):
    cmd = [sys.executable, HERE, '--worker', backend, '--worker-norms', ','.join(norms),
           '--num-devices', str(devices), '--result', result,
           '--steps', str(args.steps), '--warmup', str(args.warmup),
           '--batch-size', str(args.batch_size), '--image-size', str(args.image_size),
           '--channels', str(args.channels), '--blocks', str(args.blocks),
           '--classes', str(args.classes), '--model', args.model]
    return jobs.launch_command(backend, devices, cmd)


def run_config(args, backend, norms, devices):
    """Run one configuration, every norm interleaved in one job; returns a record per norm
    (step_s None when the run failed or timed out)."""
    records = [{'norm': norm, 'backend': backend, 'devices': devices, 'step_s': None,
                'blocking_exchanges_per_step': None, 'nonblocking_exchanges_per_step': None,
                'steps': 0, 'status': 'failed'} for norm in norms]
    fd, result = tempfile.mkstemp(prefix='bench_norm_', suffix='.json')
    os.close(fd)
    os.remove(result)
    env = jobs.worker_env(backend, devices, args.timeout)
    try:
        run = jobs.run(worker_command(args, backend, norms, devices, result), env=env,
                       timeout=args.timeout)
    except OSError as e:
        for record in records:
            record['error'] = '%s: %s' % (type(e).__name__, e)
        return records
    status = {'ok': 'ok', 'timeout': 'timeout'}.get(run.status,
                                                    'failed (exit %s)' % run.returncode)
    if os.path.exists(result):
        with open(result) as f:
            for record, got in zip(records, json.load(f)):
                record.update(got)
        os.remove(result)
    if status == 'ok' and all(r['status'] == 'ok' for r in records):
        return records
    tail = run.output.strip().splitlines()[-15:]
    # the results file is shared: no paths of this machine in it
    error = portable('\n'.join(tail))
    for record in records:
        record.update(status=status if status != 'ok' else 'failed (no result)', step_s=None,
                      error=error)
    sys.stderr.write('\nbench_norm: %s x%d (%s) %s; continuing with the other results. Last '
                     'output:\n%s\n' % (backend, devices, ','.join(norms), records[0]['status'],
                                          error))
    return records


def ratio_interval(rounds, base, draws=2000, seed=0):
    """Median of the per-round ratios rounds[j][i] / base[j][i] over the rounds i of every
    repeat j, and its 90% interval by a two-level bootstrap: repeats drawn with replacement,
    then rounds within each. A repeat is a job of its own (processes, memory placement), and
    its ratios move together: drawing rounds alone would give an interval that the next
    `make bench` misses."""
    import numpy as np
    ratios = [np.asarray(r) / np.asarray(b) for r, b in zip(rounds, base)]
    rng = np.random.RandomState(seed)
    medians = []
    for _ in range(draws):
        picked = [ratios[j] for j in rng.randint(len(ratios), size=len(ratios))]
        medians.append(np.median(np.concatenate([rng.choice(r, len(r)) for r in picked])))
    return float(np.median(np.concatenate(ratios))), [float(np.percentile(medians, 5)),
                                                      float(np.percentile(medians, 95))]


def add_ratios(records):
    """Ratio to BatchNorm of the same configuration, round by round (interleaved)."""
    base = {(r['backend'], r['devices']): r.get('step_s_rounds_by_run') for r in records
            if r['norm'] == 'bn' and r['step_s']}
    for r in records:
        b = base.get((r['backend'], r['devices']))
        if r['step_s'] and b:
            r['ratio_to_bn'], r['ratio_90'] = ratio_interval(r['step_s_rounds_by_run'], b)
        else:
            r['ratio_to_bn'], r['ratio_90'] = None, None
    return records


def format_table(records):
    header = ('norm', 'backend', 'devices', 'step_s (median)', 'ratio to bn', '90% interval',
              'blocking exch/step', 'non-blocking exch/step', 'status')
    rows = []
    for r in records:
        fmt = lambda v, spec: '-' if v is None else spec % v
        rows.append((r['norm'], r['backend'], str(r['devices']),
                     'timeout' if r['status'] == 'timeout' else fmt(r['step_s'], '%.4f'),
                     fmt(r.get('ratio_to_bn'), '%.2f'),
                     '-' if not r.get('ratio_90') else '%.2f-%.2f' % tuple(r['ratio_90']),
                     fmt(r['blocking_exchanges_per_step'], '%d'),
                     fmt(r['nonblocking_exchanges_per_step'], '%d'), r['status']))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: '  '.join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(header), line(['-' * w for w in widths])]
    out += [line(row) for row in rows]
    unclear = ['%s %s x%d' % (r['norm'], r['backend'], r['devices']) for r in records
               if r['norm'] != 'bn' and r.get('ratio_90')
               and r['ratio_90'][0] <= 1.0 <= r['ratio_90'][1]]
    if unclear:
        out.append('interval holds 1.00, too wide to tell from bn: ' + ', '.join(unclear))
    if any(r.get('interleaved') is False for r in records):
        out.append('kvstore: one norm per job (a dist kvstore serves one Trainer), rounds '
                   'paired by index, not interleaved')
    return '\n'.join(out)


def merge_repeats(runs):
    """One record of a norm and configuration from its repeats: the rounds of the runs that
    finished (with BatchNorm's of the same runs: a run that failed drops for every norm)."""
    ok = [r for r in runs if r['status'] == 'ok']
    record = dict(ok[0] if ok else runs[-1])
    record['step_s_runs'] = [r['step_s'] for r in ok]
    record['repeats'] = len(runs)
    if ok:
        record['step_s_rounds_by_run'] = [r['step_s_rounds'] for r in ok]
        record['step_s_rounds'] = [t for r in ok for t in r['step_s_rounds']]
        record['step_s'] = statistics.median(record['step_s_rounds'])
        if len(ok) < len(runs):
            record['status'] = 'ok (%d of %d runs)' % (len(ok), len(runs))
    return record


def plot(records, path):
    from pbn_gluon.plots import NORM_COLORS as colors, pyplot, save
    plt = pyplot()
    groups = sorted({(r['backend'], r['devices']) for r in records},
                    key=lambda g: (BACKENDS.index(g[0]), g[1]))
    norms = [n for n in NORMS if any(r['norm'] == n for r in records)]
    width = 0.8 / len(norms)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(groups), 3.8))
    for k, norm in enumerate(norms):
        for g, (backend, devices) in enumerate(groups):
            r = next((r for r in records if (r['norm'], r['backend'], r['devices'])
                      == (norm, backend, devices)), None)
            if r is None:
                continue
            x = g + (k - (len(norms) - 1) / 2) * width
            if r['step_s']:
                ax.bar(x, 1000 * r['step_s'], width, color=colors[norm], label=norm)
            else:
                ax.text(x, 0, 'x', ha='center', va='bottom', color=colors[norm])
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys())
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(['%s\n%d dev' % g for g in groups])
    ax.set_ylabel('median step time [ms]')
    ax.set_title('%s: step time per norm layer (x = timeout/failed)' % records[0].get('model', ''))
    ax.grid(axis='y', alpha=0.3)
    save(fig, path)


def main(args):
    from tqdm import tqdm

    configs = []
    if 'local' in args.backends:
        configs += [('local', d) for d in args.devices]
    for backend in ('horovod', 'kvstore'):
        if backend in args.backends:
            configs += [(backend, args.hvd_np)]

    records = []
    bar = tqdm(total=len(configs) * args.repeats, desc='bench_norm', unit='run',
               disable=args.no_progress)
    for backend, devices in configs:
        bar.set_postfix_str('%s x%d' % (backend, devices))
        # gluon Trainers number their kvstore keys from 0: on one dist kvstore, one net a job
        groups = [[n] for n in args.norms] if backend == 'kvstore' else [args.norms]
        runs = []
        for _ in range(args.repeats):
            runs.append([r for norms in groups for r in run_config(args, backend, norms,
                                                                    devices)])
            bar.update()
        for k in range(len(args.norms)):
            record = merge_repeats([run[k] for run in runs])
            record.update(model=args.model, interleaved=len(groups) == 1)
            records.append(record)
    bar.close()

    add_ratios(records)
    what = ('GluonCV DeepLabV3-ResNet50' if args.model == 'deeplab' else
            'a %d-block, %d-channel conv net' % (args.blocks, args.channels))
    print('\nstep time of %s, %d image(s) of %dx%d per device, %d interleaved rounds after %d '
          'warm-up steps, %d run(s)' % (what, args.batch_size, args.image_size,
                                         args.image_size, args.steps, args.warmup,
                                         args.repeats))
    print(format_table(records))
    for path, write in ((args.json, lambda p: write_json(p, records)),
                        (args.plot, lambda p: plot(records, p))):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            write(path)
            print('wrote %s' % path)
    return records


if __name__ == '__main__':
    args = parse_args()
    if args.worker:
        run_worker(args)
    else:
        with user_errors('bench_norm.py'):
            main(args)
