"""Benchmark: training step time of BatchNorm vs ProgressiveBatchNorm vs SyncBatchNorm.

A model (``--model convnet``: Conv2D 3x3 + norm + ReLU blocks and a Dense head; ``--model
deeplab``: GluonCV's DeepLabV3-ResNet50 on small crops) is trained for a few steps with each
norm layer, on 1..8 CPU contexts of one process ("local" backend), on Horovod/Gloo processes
("horovod", one device each, through horovodrun) and on KVStore dist_sync workers ("kvstore",
through python -m pbn_gluon.launch). Every configuration runs ``--repeats`` times, each in its
own subprocess under a time limit, so a stall shows up as "timeout" in the table.

    python scripts/bench_norm.py --quick                         # ~2 min: devices 1, 2
    python scripts/bench_norm.py --json results/bench_norm.json  # the full grid
    python scripts/bench_norm.py --model deeplab --devices 1,2 --backends local,horovod,kvstore \
        --repeats 3 --json results/bench_deeplab.json --plot results/bench_deeplab.png

Reported per configuration: the median step time (seconds, each step ends with waitall; the
median over repeats of each run's median), its ratio to BatchNorm on the same backend and
devices, and the exchanges per step counted by pbn_gluon.CountingComm over the timed steps.
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

NORMS = ('bn', 'pbn', 'syncbn')
BACKENDS = ('local', 'horovod', 'kvstore')
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
    parser.add_argument('--norm', choices=NORMS, default='bn', help=argparse.SUPPRESS)
    parser.add_argument('--num-devices', type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument('--result', type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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


def write_json(path, obj):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def run_worker(args):
    import mxnet as mx
    import numpy as np
    from mxnet import gluon
    import pbn_gluon

    mx.random.seed(0)
    np.random.seed(0)
    kvstore = 'device'
    if args.worker == 'horovod':
        import horovod.mxnet as hvd
        hvd.init()
        rank, size = hvd.rank(), hvd.size()
        ctxs = [mx.cpu()]
        comm = pbn_gluon.HorovodComm(ctxs[0])
    elif args.worker == 'kvstore':
        kvstore = mx.kv.create('dist_sync')
        rank, size = kvstore.rank, kvstore.num_workers
        ctxs = [mx.cpu()]
        comm = pbn_gluon.KVStoreComm(kvstore, ctxs)
    else:
        rank, size = 0, args.num_devices
        ctxs = [mx.cpu(i) for i in range(args.num_devices)]
        comm = pbn_gluon.LocalComm(ctxs)

    from pbn_gluon.segmentation.norms import get_norm_layer
    net = build_net(get_norm_layer(args.norm, ctxs, in_process=args.worker == 'local'), args)
    net.initialize(mx.init.Xavier(), ctx=ctxs)
    net.collect_params().reset_ctx(ctxs)    # DeepLab initialises its head on cpu(0) itself
    net.hybridize(static_alloc=True)
    optimizer_params = {'learning_rate': 0.01, 'momentum': 0.9}
    if args.worker == 'horovod':
        hvd.broadcast_parameters(net.collect_params(), root_rank=0)
        trainer = hvd.DistributedTrainer(net.collect_params(), 'sgd', optimizer_params)
    else:   # KVStoreComm's keys sit beside the Trainer's: no server-side optimizer
        trainer = gluon.Trainer(net.collect_params(), 'sgd', optimizer_params, kvstore=kvstore,
                                update_on_kvstore=False if args.worker == 'kvstore' else None)
    if args.model == 'deeplab' and args.norm == 'syncbn' and comm.needs_prepare:
        # SyncBN over dist_sync declares its exchanges by channel count: shapes from the graph
        net.infer_shape(mx.nd.zeros((1, 3, args.image_size, args.image_size), ctx=ctxs[0]))
    comm = pbn_gluon.CountingComm(comm)     # the exchanges per step are observed, not assumed
    sync = pbn_gluon.StatsSync(net, comm) if args.norm != 'bn' else None

    layers = len(pbn_gluon.find_norm_layers(net)) if sync is not None else None
    record = {'norm': args.norm, 'backend': args.worker, 'devices': size, 'model': args.model,
              'blocking_exchanges_per_step': None, 'nonblocking_exchanges_per_step': None,
              'norm_layers': layers, 'steps': 0, 'warmup': args.warmup,
              'step_s': None, 'status': 'started'}
    if rank == 0 and args.result:   # known before timing: kept even if the run stalls
        write_json(args.result, record)

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

    times = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            comm.counts.clear()
        tic = time.perf_counter()
        losses = pbn_gluon.train_step(net, loss_fn, data, labels, trainer,
                                      args.batch_size * len(ctxs), sync)
        mx.nd.waitall()
        if sync is not None:
            comm.check()    # raises if a device never reached an exchange
        times.append(time.perf_counter() - tic)
    first_step_s, times = times[0], times[args.warmup:]
    loss = float(sum(l.mean().asscalar() for l in losses) / len(losses))
    if not np.isfinite(loss):
        raise RuntimeError('loss is %r' % loss)

    record.update(blocking_exchanges_per_step=round(comm.counts['blocking'] / len(times), 3),
                  nonblocking_exchanges_per_step=comm.counts['non_blocking'] / len(times),
                  step_s=float(np.median(times)), step_s_mean=float(np.mean(times)),
                  step_s_min=float(np.min(times)), step_s_max=float(np.max(times)),
                  first_step_s=first_step_s, steps=len(times), status='ok', loss=loss)
    if rank == 0 and args.result:
        write_json(args.result, record)
    if args.worker == 'horovod':
        hvd.shutdown()
    mx.nd.waitall()


# ----------------------------------------------------------------------------------------------
# parent: run every configuration in a subprocess under a time limit
# ----------------------------------------------------------------------------------------------

def worker_command(args, backend, norm, devices, result):
    cmd = [sys.executable, HERE, '--worker', backend, '--norm', norm,
           '--num-devices', str(devices), '--result', result,
           '--steps', str(args.steps), '--warmup', str(args.warmup),
           '--batch-size', str(args.batch_size), '--image-size', str(args.image_size),
           '--channels', str(args.channels), '--blocks', str(args.blocks),
           '--classes', str(args.classes), '--model', args.model]
    if backend == 'horovod':
        return jobs.horovodrun(devices, cmd)
    if backend == 'kvstore':
        return jobs.kvstore_launch(devices, cmd)
    return cmd


def run_config(args, backend, norm, devices):
    """Run one configuration; returns its record (step_s None when it failed or timed out)."""
    record = {'norm': norm, 'backend': backend, 'devices': devices, 'step_s': None,
              'blocking_exchanges_per_step': None, 'nonblocking_exchanges_per_step': None,
              'steps': 0, 'status': 'failed'}
    fd, result = tempfile.mkstemp(prefix='bench_norm_', suffix='.json')
    os.close(fd)
    os.remove(result)
    env = jobs.worker_env(backend, devices, args.timeout)
    try:
        run = jobs.run(worker_command(args, backend, norm, devices, result), env=env,
                       timeout=args.timeout)
    except OSError as e:
        record['error'] = '%s: %s' % (type(e).__name__, e)
        return record
    status = {'ok': 'ok', 'timeout': 'timeout'}.get(run.status,
                                                    'failed (exit %s)' % run.returncode)
    record['wall_s'] = round(run.seconds, 2)
    if os.path.exists(result):
        with open(result) as f:
            record.update(json.load(f))
        os.remove(result)
    if status != 'ok' or record['status'] != 'ok':
        record['status'] = status if status != 'ok' else 'failed (no result)'
        record['step_s'] = None
        tail = run.output.strip().splitlines()[-15:]
        # the results file is shared: no paths of this machine in it
        record['error'] = '\n'.join(tail).replace(sys.prefix, '<venv>').replace(
            os.getcwd(), '.')
        if backend == 'horovod':
            sys.stderr.write('\nbench_norm: horovodrun (%s) %s; continuing with the other '
                             'results. Last output:\n%s\n' % (norm, record['status'],
                                                              record['error']))
        else:
            sys.stderr.write('\nbench_norm: %s %s x%d %s. Last output:\n%s\n'
                             % (norm, backend, devices, record['status'], record['error']))
    return record


def add_ratios(records):
    base = {(r['backend'], r['devices']): r['step_s'] for r in records if r['norm'] == 'bn'}
    for r in records:
        b = base.get((r['backend'], r['devices']))
        r['ratio_to_bn'] = r['step_s'] / b if r['step_s'] and b else None
    return records


def format_table(records):
    header = ('norm', 'backend', 'devices', 'step_s (median)', 'ratio to bn',
              'blocking exch/step', 'non-blocking exch/step', 'status')
    rows = []
    for r in records:
        fmt = lambda v, spec: '-' if v is None else spec % v
        rows.append((r['norm'], r['backend'], str(r['devices']),
                     'timeout' if r['status'] == 'timeout' else fmt(r['step_s'], '%.4f'),
                     fmt(r.get('ratio_to_bn'), '%.2f'),
                     fmt(r['blocking_exchanges_per_step'], '%d'),
                     fmt(r['nonblocking_exchanges_per_step'], '%d'), r['status']))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: '  '.join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(header), line(['-' * w for w in widths])]
    out += [line(row) for row in rows]
    return '\n'.join(out)


def merge_repeats(runs):
    """One record per configuration: step_s is the median of the runs' medians."""
    ok = [r for r in runs if r['status'] == 'ok']
    record = dict(ok[0] if ok else runs[-1])
    record['step_s_runs'] = [r['step_s'] for r in ok]
    record['repeats'] = len(runs)
    if ok:
        record['step_s'] = statistics.median(record['step_s_runs'])
        if len(ok) < len(runs):
            record['status'] = 'ok (%d of %d runs)' % (len(ok), len(runs))
    return record


def plot(records, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    groups = sorted({(r['backend'], r['devices']) for r in records},
                    key=lambda g: (BACKENDS.index(g[0]), g[1]))
    norms = [n for n in NORMS if any(r['norm'] == n for r in records)]
    colors = {'bn': 'tab:red', 'pbn': 'tab:green', 'syncbn': 'tab:blue'}
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args):
    from tqdm import tqdm

    configs = []
    if 'local' in args.backends:
        configs += [('local', norm, d) for d in args.devices for norm in args.norms]
    for backend in ('horovod', 'kvstore'):
        if backend in args.backends:
            configs += [(backend, norm, args.hvd_np) for norm in args.norms]

    records = []
    bar = tqdm(total=len(configs) * args.repeats, desc='bench_norm', unit='run',
               disable=args.no_progress)
    for backend, norm, devices in configs:
        bar.set_postfix_str('%s %s x%d' % (norm, backend, devices))
        runs = []
        for _ in range(args.repeats):
            runs.append(run_config(args, backend, norm, devices))
            bar.update()
        record = merge_repeats(runs)
        record['model'] = args.model
        records.append(record)
    bar.close()

    add_ratios(records)
    what = ('GluonCV DeepLabV3-ResNet50' if args.model == 'deeplab' else
            'a %d-block, %d-channel conv net' % (args.blocks, args.channels))
    print('\nstep time of %s, %d image(s) of %dx%d per device, %d timed steps after %d '
          'warm-up, median of %d run(s)' % (what, args.batch_size, args.image_size,
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
