#!/usr/bin/env python
"""CPU-scale accuracy demo of Progressive Batch Normalization (PBN).

Claim under test (the PBN paper): with 1-2 images per device, per-device BatchNorm (bn) loses
accuracy; exact synchronous BatchNorm (syncbn) recovers it but pays two BLOCKING exchanges per
norm layer and step; PBN recovers most of it with ONE non-blocking exchange per step, i.e. at
BatchNorm's speed. GroupNorm (gn) is a batch-independent reference.

Data (no download): scikit-learn's ``load_digits()`` 8x8 digits 0 and 1 composited into 32x32
scenes: 2-3 digits at random positions and scales (1x, 1.5x, 2x), non-overlapping, on a noisy
background; every image gets its own brightness offset and contrast gain, so that per-image
(batch of 1) statistics differ a lot from the dataset's. Per-pixel labels: 0 = background,
1 = a "0", 2 = a "1" (pixels of a digit whose ink is > 25 %). Deterministic from --data-seed.
(With all ten digits the net needs far more than the demo's 300 steps to leave "all background".)

Net: a small fully-convolutional segmentation net (5 conv + norm + ReLU blocks, 16-32 channels,
one stride-2 downsample and a nearest upsample, 1x1 classifier to 3 classes) built with a
``norm_layer`` argument.

Training: 8 devices, images_per_device 1 and 2, SGD with momentum 0.9, poly LR (power 0.9), the
same steps, data order and initialisation (per seed) for each norm. Every norm runs on 8 CPU
contexts of ONE process (mx.cpu(0..7)); ``--syncbn-backend horovod`` runs syncbn on 8 Horovod
processes instead (horovodrun --gloo, one device each; slow on a 2-core machine). Each set of
runs is a subprocess watched for progress, so a stall is reported, not a hang.

PBN local-weight schedule (documented choice): ``pbn_gluon.schedules.Linear(start=0,
steps=PBN_RAMP * steps, final=--pbn-final)`` with PBN_RAMP = 0.25 and final weight 0.5: w goes
linearly from 1 (plain per-device BN) to 0.5 over the first quarter of training, then stays
there (group = all devices). The library's default final weight is 1/G (= 1/8 here); on this
task it trains worse than BN at 2 images per device (README, ablation), hence the choice.

Evaluation: val mIoU (gluoncv SegmentationMetric, 3 classes) in inference mode (running
statistics of device 0) at a few checkpoints; the x-axis of the plot is the training wall time
(evaluation time excluded). Step time is the median wall time of a training step (each step
ends with mx.nd.waitall()), measured after a warm-up.

Usage:
    python scripts/demo.py                     # full run: 8 contexts, 3 seeds
    python scripts/demo.py --quick --out /tmp/d  # smoke test (2 contexts, 1 seed, few steps)
"""
import argparse
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np

NORMS = ('bn', 'syncbn', 'pbn', 'gn')
DIGITS = (0, 1)         # two distinct shapes: a 5-layer net learns them in 300 CPU steps
NUM_CLASSES = len(DIGITS) + 1
PBN_RAMP = 0.25        # fraction of the run over which PBN's local weight goes from 1 to 1/G
CANVAS = 32
HOROVOD_PREFIX = re.compile(r'^\[(\d+)\]<stdout>:')


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------

def _zoom(img, scale):
    """Nearest-neighbour-free bilinear zoom of an 8x8 digit (scipy.ndimage.zoom, order 1)."""
    from scipy.ndimage import zoom
    return np.clip(zoom(img, scale, order=1), 0.0, 1.0)


def make_scenes(n, seed, digits_pool, canvas=CANVAS):
    """n scenes (n, 1, canvas, canvas) float32 and labels (n, canvas, canvas) float32."""
    images, targets = digits_pool
    rng = np.random.RandomState(seed)
    xs = np.zeros((n, 1, canvas, canvas), np.float32)
    ys = np.zeros((n, canvas, canvas), np.float32)
    for i in range(n):
        ink = np.zeros((canvas, canvas), np.float32)
        label = np.zeros((canvas, canvas), np.float32)
        occupied = np.zeros((canvas, canvas), bool)
        for _ in range(rng.randint(2, 4)):
            k = rng.randint(len(images))
            digit = _zoom(images[k] / 16.0, rng.choice([1.0, 1.5, 2.0]))
            h, w = digit.shape
            for _attempt in range(20):
                r, c = rng.randint(0, canvas - h + 1), rng.randint(0, canvas - w + 1)
                if not occupied[r:r + h, c:c + w].any():
                    break
            else:
                continue
            occupied[r:r + h, c:c + w] = True
            ink[r:r + h, c:c + w] = digit
            label[r:r + h, c:c + w] = np.where(digit > 0.25, targets[k] + 1, 0)
        # per-image contrast and brightness, plus background and pixel noise
        gain = np.exp(rng.uniform(np.log(0.4), np.log(2.5)))
        offset = rng.uniform(-2.0, 2.0)
        noise_level = rng.uniform(0.05, 0.3)
        background = rng.normal(0, 0.15, (canvas // 4, canvas // 4)).repeat(4, 0).repeat(4, 1)
        xs[i, 0] = gain * (ink + background + rng.normal(0, noise_level, ink.shape)) + offset
        ys[i] = label
    return xs, ys


@functools.lru_cache(maxsize=2)
def load_data(n_train, n_val, seed):
    from sklearn.datasets import load_digits
    digits = load_digits()
    keep = np.isin(digits.target, DIGITS)
    images, targets = digits.images[keep], np.searchsorted(DIGITS, digits.target[keep])
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(images))
    cut = int(0.7 * len(order))        # train scenes and val scenes use disjoint digit images
    pool = lambda idx: (images[idx].astype(np.float32), targets[idx])
    train = make_scenes(n_train, seed + 1, pool(order[:cut]))
    val = make_scenes(n_val, seed + 2, pool(order[cut:]))
    return train, val


# ------------------------------------------------------------------------------------------
# net
# ------------------------------------------------------------------------------------------

def norm_factory(norm, steps, pbn_final=None, pbn_global_momentum=0.0, pbn_backward='local'):
    from mxnet.gluon import nn
    import pbn_gluon
    if norm == 'bn':
        return lambda c: nn.BatchNorm(in_channels=c)
    if norm == 'syncbn':
        return lambda c: pbn_gluon.SyncBatchNorm(in_channels=c)
    if norm == 'pbn':
        schedule = pbn_gluon.schedules.Linear(start=0, steps=max(1, int(PBN_RAMP * steps)),
                                              final=pbn_final)
        return lambda c: pbn_gluon.ProgressiveBatchNorm(
            in_channels=c, local_weight=schedule, global_momentum=pbn_global_momentum,
            backward=pbn_backward)
    if norm == 'gn':
        return lambda c: nn.GroupNorm(num_groups=4)
    raise ValueError(norm)


def build_net(norm_layer, width=16):
    """conv(1->w) | conv s2 (w->2w) | conv 2w | conv 2w (dilation 2) | up x2 | conv (3w->w)
    with a skip from the first block | 1x1 classifier; every conv but the last: norm + ReLU."""
    from mxnet.gluon import nn

    class SegNet(nn.HybridBlock):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            with self.name_scope():
                def block(cin, cout, stride=1, dilation=1):
                    seq = nn.HybridSequential()
                    seq.add(nn.Conv2D(cout, 3, strides=stride, padding=dilation,
                                      dilation=dilation, use_bias=False, in_channels=cin),
                            norm_layer(cout), nn.Activation('relu'))
                    return seq
                self.stem = block(1, width)
                self.down = block(width, 2 * width, stride=2)
                self.mid1 = block(2 * width, 2 * width)
                self.mid2 = block(2 * width, 2 * width, dilation=2)
                self.fuse = block(3 * width, width)
                self.head = nn.Conv2D(NUM_CLASSES, 1, in_channels=width)

        def hybrid_forward(self, F, x):
            s = self.stem(x)
            h = self.mid2(self.mid1(self.down(s)))
            h = F.UpSampling(h, scale=2, sample_type='nearest')
            return self.head(self.fuse(F.concat(h, s, dim=1)))

    return SegNet()


# ------------------------------------------------------------------------------------------
# one run (in a subprocess)
# ------------------------------------------------------------------------------------------

def evaluate(net, val, ctx, batch=100):
    import mxnet as mx
    from gluoncv.utils.metrics import SegmentationMetric
    metric = SegmentationMetric(NUM_CLASSES)
    xs, ys = val
    for i in range(0, len(xs), batch):
        out = net(mx.nd.array(xs[i:i + batch], ctx=ctx))     # inference mode: running stats
        metric.update(mx.nd.array(ys[i:i + batch], ctx=ctx), out)
    pix_acc, miou = metric.get()
    return float(pix_acc), float(miou)


def run_one(cfg):
    """Train one (norm, images_per_device, seed); returns a result record."""
    import pbn_gluon
    import mxnet as mx
    from mxnet import autograd, gluon

    norm, ipd, seed, steps = cfg['norm'], cfg['images_per_device'], cfg['seed'], cfg['steps']
    if cfg['backend'] == 'horovod':     # one device per process, this process's slice
        import horovod.mxnet as hvd
        hvd.init()
        if hvd.size() != cfg['contexts']:
            raise RuntimeError('run with %d Horovod processes, got %d'
                               % (cfg['contexts'], hvd.size()))
        rank, ctxs = hvd.rank(), [mx.cpu()]
    else:
        rank, ctxs = 0, [mx.cpu(i) for i in range(cfg['contexts'])]
    devices = range(rank, rank + len(ctxs))
    train, val = load_data(cfg['n_train'], cfg['n_val'], cfg['data_seed'])
    mx.random.seed(seed)
    np.random.seed(seed)
    net = build_net(norm_factory(norm, steps, cfg['pbn_final'],
                                 cfg.get('pbn_global_momentum', 0.0),
                                 cfg.get('pbn_backward', 'local')), width=cfg['width'])
    net.initialize(mx.init.Xavier(magnitude=2.0), ctx=ctxs)
    net.hybridize(static_alloc=True)
    sync = None
    optimizer = {'learning_rate': cfg['lr'], 'momentum': 0.9, 'wd': 1e-4}
    if cfg['backend'] == 'horovod':
        hvd.broadcast_parameters(net.collect_params(), root_rank=0)
        trainer = hvd.DistributedTrainer(net.collect_params(), 'sgd', optimizer)
        comm = pbn_gluon.HorovodComm(ctxs[0])
    else:
        trainer = gluon.Trainer(net.collect_params(), 'sgd', optimizer, kvstore='device')
        comm = pbn_gluon.LocalComm(ctxs)
    if norm in ('syncbn', 'pbn'):
        sync = pbn_gluon.StatsSync(net, comm)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss(axis=1)
    report = print if rank == 0 else (lambda *a, **k: None)

    batch = ipd * cfg['contexts']     # the global batch: every device's slice of it
    rng = np.random.RandomState(1000 + seed)     # same data order for every norm of a seed
    xs, ys = train
    order, pos = rng.permutation(len(xs)), 0
    checkpoints = sorted(set(int(round(steps * f)) for f in cfg['checkpoints']) | {steps})
    curve, step_times, train_time, losses = [], [], 0.0, []
    for t in range(steps):
        if pos + batch > len(order):
            order, pos = rng.permutation(len(xs)), 0
        idx = order[pos:pos + batch]
        pos += batch
        trainer.set_learning_rate(cfg['lr'] * (1.0 - t / steps) ** 0.9)
        tic = time.time()
        data = [mx.nd.array(xs[idx[k * ipd:(k + 1) * ipd]], ctx=c) for k, c in zip(devices, ctxs)]
        label = [mx.nd.array(ys[idx[k * ipd:(k + 1) * ipd]], ctx=c) for k, c in zip(devices, ctxs)]
        with autograd.record():
            # all devices' forwards, no value is read in between (SyncBN meets in the engine)
            outs = [loss_fn(net(x), y) for x, y in zip(data, label)]
        autograd.backward(outs)
        if sync is not None:
            sync.step()     # before trainer.step: its exchange overlaps the gradients'
        trainer.step(ipd * len(ctxs))   # Horovod's trainer also divides by the process count
        mx.nd.waitall()
        dt = time.time() - tic
        train_time += dt
        step_times.append(dt)
        if sync is not None:
            sync.comm.check()
        if t % 10 == 0 or t == steps - 1:
            losses.append((t, float(np.mean([o.mean().asscalar() for o in outs]))))
        if t + 1 in checkpoints and rank == 0:
            pix_acc, miou = evaluate(net, val, ctxs[0])
            curve.append({'step': t + 1, 'train_s': train_time, 'miou': miou,
                          'pix_acc': pix_acc})
        if (t + 1) % max(1, steps // 20) == 0 or t == steps - 1:
            report('progress %d' % (t + 1), flush=True)
    warm = step_times[min(len(step_times) - 1, max(3, steps // 20)):]
    non_blocking, blocking = sync.exchanges_per_step if sync is not None else (0, 0)
    if rank != 0:
        return None
    return {'norm': norm, 'images_per_device': ipd, 'seed': seed, 'contexts': cfg['contexts'],
            'backend': cfg['backend'],
            'steps': steps, 'miou': curve[-1]['miou'], 'pix_acc': curve[-1]['pix_acc'],
            'step_s': float(np.median(warm)), 'train_s': train_time,
            'blocking_exchanges_per_step': blocking,
            'non_blocking_exchanges_per_step': non_blocking,
            'final_loss': losses[-1][1], 'curve': curve, 'status': 'ok',
            'pbn_final_weight': (cfg['pbn_final'] or 1.0 / cfg['contexts']) if norm == 'pbn'
            else None,
            'pbn_global_momentum': cfg.get('pbn_global_momentum', 0.0) if norm == 'pbn' else None,
            'pbn_backward': cfg.get('pbn_backward', 'local') if norm == 'pbn' else None}


def worker_main(cfgs_json):
    """Run a list of configs in this process; one 'result <json>' line per finished run."""
    for cfg in json.loads(cfgs_json):
        print('start %d' % cfg['index'], flush=True)
        result = run_one(cfg)
        if result is not None:      # rank 0 of a Horovod job, or the one local process
            print('result ' + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------

def launch(cfgs, timeout, bar, on_result):
    """Run `cfgs` (one norm) in ONE subprocess (imports and data generation cost a few seconds
    per process). A watchdog kills it when no step completes for `timeout` s: the stalled run
    is reported as failed and a new subprocess takes the remaining runs."""
    from pbn_gluon.rendezvous import cpu_resource_env
    pending = list(cfgs)
    while pending:
        env = dict(os.environ)
        env.setdefault('PBN_GLUON_TIMEOUT', str(int(max(10, timeout))))
        env.setdefault('HOROVOD_GLOO_TIMEOUT_SECONDS', str(int(max(10, timeout))))
        if pending[0]['norm'] == 'syncbn' and pending[0]['backend'] == 'local':
            # see pbn_gluon.rendezvous.cpu_resource_advice
            for name, value in cpu_resource_env(pending[0]['contexts']).items():
                env.setdefault(name, value)
        cmd = [sys.executable, os.path.abspath(__file__), '--worker', json.dumps(pending)]
        if pending[0]['backend'] == 'horovod':
            n = pending[0]['contexts']
            cmd = [os.path.join(os.path.dirname(sys.executable), 'horovodrun'), '-np', str(n),
                   '-H', 'localhost:%d' % n, '--gloo'] + cmd
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                universal_newlines=True, start_new_session=True)
        state = {'killed': False, 'last': time.time()}

        def watchdog():
            while proc.poll() is None:
                if time.time() - state['last'] > timeout:
                    state['killed'] = True
                    os.killpg(proc.pid, signal.SIGKILL)     # horovodrun and its workers too
                    return
                time.sleep(0.5)
        threading.Thread(target=watchdog, daemon=True).start()
        stderr = []
        reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
        reader.start()
        current, done = None, 0
        for line in proc.stdout:
            state['last'] = time.time()
            tagged = HOROVOD_PREFIX.match(line)     # horovodrun: "[rank]<stdout>:line"
            if tagged:
                if tagged.group(1) != '0':
                    continue
                line = line[tagged.end():]
            if line.startswith('start '):
                index = int(line.split()[1])
                current, done = next(c for c in pending if c['index'] == index), 0
                bar.set_description('%s ipd=%d seed=%d' % (
                    current['norm'], current['images_per_device'], current['seed']))
            elif line.startswith('progress ') and current is not None:
                n = int(line.split()[1])
                bar.update(n - done)
                done = n
            elif line.startswith('result '):
                on_result(current, json.loads(line[len('result '):]), '')
                pending.remove(current)
                current = None
        proc.wait()
        reader.join(5)
        if not pending:
            return
        failed = current if current is not None else pending[0]
        if state['killed']:
            message = 'stalled: no progress for %.0f s (at step %d of %d); killed' % (
                timeout, done, failed['steps'])
        else:
            tail = ''.join(stderr).strip().splitlines()[-5:]
            message = 'exit code %s: %s' % (proc.returncode, ' | '.join(tail).replace(
                sys.prefix, '<venv>').replace(os.getcwd(), '.'))    # no paths of this machine
        bar.update(failed['steps'] - done if current is not None else failed['steps'])
        on_result(failed, None, message)
        pending.remove(failed)


def summarize(records, norms, ipds):
    rows = []
    for ipd in ipds:
        ok = [r for r in records if r['images_per_device'] == ipd and r['status'] == 'ok']
        bn_step = np.median([r['step_s'] for r in ok if r['norm'] == 'bn']) if any(
            r['norm'] == 'bn' for r in ok) else float('nan')
        for norm in norms:
            rs = [r for r in ok if r['norm'] == norm]
            failed = sum(1 for r in records if r['images_per_device'] == ipd
                         and r['norm'] == norm and r['status'] != 'ok')
            if not rs:
                rows.append((norm, '-', ipd, float('nan'), float('nan'), float('nan'),
                             float('nan'), '-', 0, failed))
                continue
            miou = np.array([r['miou'] for r in rs])
            step = float(np.median([r['step_s'] for r in rs]))
            rows.append((norm, rs[0]['backend'], ipd, miou.mean(), miou.std(), step,
                         step / bn_step, rs[0]['blocking_exchanges_per_step'], len(rs), failed))
    return rows


def print_table(rows):
    head = '%-7s %4s %8s %8s  %-17s %10s %8s %9s %6s' % (
        'norm', 'ipd', 'batch', 'backend', 'val mIoU', 'step [ms]', 'vs bn', 'blocking', 'runs')
    print(head)
    print('-' * len(head))
    for norm, backend, ipd, mean, std, step, ratio, blocking, n, failed in rows:
        runs = '%d' % n + (' (+%d failed)' % failed if failed else '')
        print('%-7s %4d %8s %8s  %-17s %10s %8s %9s %6s' % (
            norm, ipd, '%d/dev' % ipd, backend, '%.4f +- %.4f' % (mean, std) if n else 'n/a',
            '%.1f' % (1000 * step) if n else 'n/a',
            '%.2fx' % ratio if n and np.isfinite(ratio) else 'n/a',
            blocking, runs))


def plot(records, norms, ipds, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    colors = {'bn': 'tab:red', 'syncbn': 'tab:blue', 'pbn': 'tab:green', 'gn': 'tab:gray'}
    fig, axes = plt.subplots(1, len(ipds), figsize=(5.5 * len(ipds), 4.2), squeeze=False)
    for ax, ipd in zip(axes[0], ipds):
        for norm in norms:
            rs = [r for r in records if r['norm'] == norm and r['images_per_device'] == ipd
                  and r['status'] == 'ok']
            if not rs:
                continue
            n = min(len(r['curve']) for r in rs)
            t = np.mean([[p['train_s'] for p in r['curve'][:n]] for r in rs], axis=0)
            m = np.array([[p['miou'] for p in r['curve'][:n]] for r in rs])
            ax.errorbar(t, m.mean(0), yerr=m.std(0), marker='o', capsize=3,
                        color=colors.get(norm), label=norm)
        ax.set_title('%d image(s) per device x %d devices' % (ipd, rs[0]['contexts'] if rs
                                                             else 0))
        ax.set_xlabel('training wall time [s] (eval excluded)')
        ax.set_ylabel('val mIoU (inference, running stats)')
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--quick', action='store_true',
                   help='smoke test: 2 contexts, 1 seed, few steps, tiny data')
    p.add_argument('--out', default='results')
    p.add_argument('--contexts', type=int, default=None, help='CPU contexts (default 8)')
    p.add_argument('--seeds', type=int, default=None, help='number of seeds (default 3)')
    p.add_argument('--steps', type=int, default=None, help='training steps (default 300)')
    p.add_argument('--ipd', type=int, nargs='+', default=[1, 2], help='images per device')
    p.add_argument('--norms', nargs='+', default=list(NORMS), choices=NORMS)
    p.add_argument('--lr', type=float, default=0.1)
    p.add_argument('--width', type=int, default=16)
    p.add_argument('--data-seed', type=int, default=0)
    p.add_argument('--syncbn-backend', choices=['local', 'horovod'], default='local',
                   help='local: CPU contexts of one process (default); horovod: one process '
                        'per device')
    p.add_argument('--pbn-final', type=float, default=0.5,
                   help="PBN's final local weight w (default 0.5; 0 < w <= 1); "
                        "--pbn-final 0 means the library's default 1/G")
    p.add_argument('--pbn-global-momentum', type=float, default=0.0,
                   help='PBN averages the exchanged group sums over steps with this momentum '
                        '(default 0: the previous step alone, as the paper)')
    p.add_argument('--pbn-backward', choices=['local', 'progressive'], default='local',
                   help="PBN's backward: local (the paper: group moments are constants) or "
                        "progressive (mixes the exchanged dy statistics in)")
    p.add_argument('--timeout', type=float, default=None,
                   help='seconds without a finished step before a run is killed as stalled')
    args = p.parse_args(argv)

    quick = args.quick
    contexts = args.contexts or (2 if quick else 8)
    seeds = args.seeds or (1 if quick else 3)
    steps = args.steps or (12 if quick else 300)
    if not 0.0 <= args.pbn_final <= 1.0:
        p.error('--pbn-final must lie in [0, 1], got %r' % args.pbn_final)
    if not 0.0 <= args.pbn_global_momentum < 1.0:
        p.error('--pbn-global-momentum must lie in [0, 1), got %r' % args.pbn_global_momentum)
    cfg_base = {'contexts': contexts, 'steps': steps, 'lr': args.lr, 'width': args.width,
                'pbn_final': args.pbn_final or None,
                'pbn_global_momentum': args.pbn_global_momentum,
                'pbn_backward': args.pbn_backward,
                'data_seed': args.data_seed,
                'n_train': 64 if quick else 1600, 'n_val': 32 if quick else 400,
                'checkpoints': [0.5] if quick else [0.1, 0.25, 0.5, 0.75]}
    timeout = args.timeout or (60 if quick else 120)
    os.makedirs(args.out, exist_ok=True)

    from tqdm import tqdm
    runs = [dict(cfg_base, norm=n, images_per_device=i, seed=s,
                 backend=args.syncbn_backend if n == 'syncbn' else 'local')
            for i in args.ipd for s in range(seeds) for n in args.norms]
    for k, run in enumerate(runs):
        run['index'] = k
    print('PBN demo: %d runs (%s x ipd %s x %d seeds), %d CPU contexts, %d steps each; '
          'PBN local weight Linear(start=0, steps=%d) -> %s'
          % (len(runs), '/'.join(args.norms), args.ipd, seeds, contexts, steps,
             max(1, int(PBN_RAMP * steps)),
             args.pbn_final or '1/%d' % contexts), flush=True)
    records, start = [], time.time()

    def on_result(cfg, record, message):
        if record is None:
            tqdm.write('run %s ipd=%d seed=%d FAILED: %s' % (
                cfg['norm'], cfg['images_per_device'], cfg['seed'], message), file=sys.stdout)
            record = {'norm': cfg['norm'], 'images_per_device': cfg['images_per_device'],
                      'seed': cfg['seed'], 'contexts': contexts, 'steps': steps,
                      'miou': None, 'step_s': None, 'blocking_exchanges_per_step': None,
                      'curve': [], 'status': 'failed: ' + message}
        records.append(record)

    with tqdm(total=len(runs) * steps, unit='step', file=sys.stdout, dynamic_ncols=True,
              mininterval=1.0) as bar:
        for norm in args.norms:
            launch([r for r in runs if r['norm'] == norm], timeout, bar, on_result)
    records.sort(key=lambda r: (r['images_per_device'], r['seed'], NORMS.index(r['norm'])))

    rows = summarize(records, args.norms, args.ipd)
    print()
    print('val mIoU (mean +- std over %d seed(s)), median step time, %d CPU contexts, '
          '%d steps, batch = ipd x %d' % (seeds, contexts, steps, contexts))
    print_table(rows)
    with open(os.path.join(args.out, 'demo.json'), 'w') as f:
        json.dump(records, f, indent=1)
    plot(records, args.norms, args.ipd, os.path.join(args.out, 'demo.png'))
    print('\nwrote %s and %s; total wall time %.1f s' % (
        os.path.join(args.out, 'demo.json'), os.path.join(args.out, 'demo.png'),
        time.time() - start))
    return 0 if all(r['status'] == 'ok' for r in records) else 1


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == '--worker':
        worker_main(sys.argv[2])
    else:
        sys.exit(main())
