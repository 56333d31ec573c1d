"""One training run of the demo (in a worker process), and the driver that starts the workers
and watches them for progress."""
import json
import os
import re
import sys
import time

import numpy as np

from .data import NUM_CLASSES, load_data
from .model import PBN_PLUS, build_net, norm_factory

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'demo.py')
HOROVOD_PREFIX = re.compile(r'^\[(\d+)\]<stdout>:')


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


def _job(cfg):
    """This process's part of the run (pbn_gluon.jobs.Job): every context of the local backend,
    or one device of a Horovod job of cfg['contexts'] processes."""
    from pbn_gluon.jobs import Job
    job = Job(cfg['backend'], devices=1 if cfg['backend'] == 'horovod' else cfg['contexts'])
    if job.size != cfg['contexts']:
        raise RuntimeError('run with %d Horovod processes, got %d' % (cfg['contexts'], job.size))
    return job


def _pbn_settings(cfg):
    """The PBN settings of this row: pbn+ gets the project's extensions (PBN_PLUS)."""
    return dict(cfg, **PBN_PLUS) if cfg['norm'] == 'pbn+' else cfg


def _build(cfg, job, pbn):
    """The net (from the seed's weights, the same on every process), its trainer, and
    statistics exchanged over a CountingComm (exchanges per step: observed), and the
    trainer's StatsSync (None for bn and gn)."""
    import mxnet as mx
    import pbn_gluon

    ctxs = job.contexts
    net = build_net(norm_factory(cfg['norm'], cfg['steps'], ctxs, pbn['pbn_final'],
                                 pbn.get('pbn_global_momentum', 0.0),
                                 pbn.get('pbn_backward', 'local'),
                                 pbn.get('pbn_group_sizes')), width=cfg['width'])
    net.initialize(mx.init.Xavier(magnitude=2.0), ctx=ctxs)
    net.hybridize(static_alloc=True)
    job.broadcast(net.collect_params())
    comm = pbn_gluon.CountingComm(job.comm)
    trainer = job.trainer(net.collect_params(),
                          {'learning_rate': cfg['lr'], 'momentum': 0.9, 'wd': 1e-4}, comm=comm)
    return net, trainer, comm, trainer.stats


def _batches(cfg, train):
    """The global batch (ipd x contexts images) of every step: a permutation of the training
    set per pass, the same order for every norm of a seed."""
    batch = cfg['images_per_device'] * cfg['contexts']
    rng = np.random.RandomState(1000 + cfg['seed'])
    order, pos = rng.permutation(len(train[0])), 0
    for _ in range(cfg['steps']):
        if pos + batch > len(order):
            order, pos = rng.permutation(len(train[0])), 0
        yield order[pos:pos + batch]
        pos += batch


def _train(cfg, job, model, train, val, rank):
    """The training loop; its step times, loss points and val curve (rank 0 evaluates)."""
    import mxnet as mx
    from mxnet import autograd, gluon

    net, trainer, comm, sync = model
    ipd, steps, ctxs = cfg['images_per_device'], cfg['steps'], job.contexts
    devices = range(rank, rank + len(ctxs))
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss(axis=1)
    report = print if rank == 0 else (lambda *a, **k: None)
    xs, ys = train
    checkpoints = sorted(set(int(round(steps * f)) for f in cfg['checkpoints']) | {steps})
    curve, step_times, train_time, losses = [], [], 0.0, []
    for t, idx in enumerate(_batches(cfg, train)):
        trainer.set_learning_rate(cfg['lr'] * (1.0 - t / steps) ** 0.9)
        tic = time.time()
        data = [mx.nd.array(xs[idx[k * ipd:(k + 1) * ipd]], ctx=c) for k, c in zip(devices, ctxs)]
        label = [mx.nd.array(ys[idx[k * ipd:(k + 1) * ipd]], ctx=c) for k, c in zip(devices, ctxs)]
        if t == 1:      # count from the second step: the first also checks the processes' nets
            comm.counts.clear()
        with autograd.record():
            outs = [loss_fn(net(x), y) for x, y in zip(data, label)]
        autograd.backward(outs)
        trainer.step(ipd * len(ctxs))   # Horovod's trainer also divides by the process count
        mx.nd.waitall()
        dt = time.time() - tic
        train_time += dt
        step_times.append(dt)
        if sync is not None:
            sync.check()
        if t % 10 == 0 or t == steps - 1:
            losses.append((t, float(np.mean([o.mean().asscalar() for o in outs]))))
        if t + 1 in checkpoints and rank == 0:
            pix_acc, miou = evaluate(net, val, ctxs[0])
            curve.append({'step': t + 1, 'train_s': train_time, 'miou': miou,
                          'pix_acc': pix_acc})
        if (t + 1) % max(1, steps // 20) == 0 or t == steps - 1:
            report('progress %d' % (t + 1), flush=True)
    return step_times, train_time, losses, curve


def _record(cfg, pbn, comm, trained):
    """The result record of a finished run."""
    norm, steps = cfg['norm'], cfg['steps']
    step_times, train_time, losses, curve = trained
    warm = step_times[min(len(step_times) - 1, max(3, steps // 20)):]
    is_pbn = norm.startswith('pbn')
    return {'norm': norm, 'images_per_device': cfg['images_per_device'], 'seed': cfg['seed'],
            'contexts': cfg['contexts'], 'backend': cfg['backend'],
            'steps': steps, 'miou': curve[-1]['miou'], 'pix_acc': curve[-1]['pix_acc'],
            'step_s': float(np.median(warm)), 'train_s': train_time,
            'blocking_exchanges_per_step': round(comm.counts['blocking'] / (steps - 1), 3),
            'non_blocking_exchanges_per_step': comm.counts['non_blocking'] / (steps - 1),
            'final_loss': losses[-1][1], 'curve': curve, 'status': 'ok',
            'pbn_final_weight': (pbn['pbn_final'] or 1.0 / cfg['contexts']) if is_pbn else None,
            'pbn_global_momentum': pbn.get('pbn_global_momentum', 0.0) if is_pbn else None,
            'pbn_backward': pbn.get('pbn_backward', 'local') if is_pbn else None,
            'pbn_group_sizes': pbn.get('pbn_group_sizes') if is_pbn else None}


def run_one(cfg):
    """Train one (norm, images_per_device, seed); returns a result record (None on the
    processes of a Horovod job other than rank 0)."""
    import mxnet as mx

    job = _job(cfg)
    rank = job.rank_offset
    train, val = load_data(cfg['n_train'], cfg['n_val'], cfg['data_seed'])
    mx.random.seed(cfg['seed'])
    np.random.seed(cfg['seed'])
    pbn = _pbn_settings(cfg)
    model = _build(cfg, job, pbn)
    trained = _train(cfg, job, model, train, val, rank)
    return _record(cfg, pbn, model[2], trained) if rank == 0 else None


def worker_main(cfgs_json):
    """Run a list of configs in this process; one 'result <json>' line per finished run."""
    for cfg in json.loads(cfgs_json):
        print('start %d' % cfg['index'], flush=True)
        result = run_one(cfg)
        if result is not None:      # rank 0 of a Horovod job, or the one local process
            print('result ' + json.dumps(result), flush=True)


def launch(cfgs, timeout, bar, on_result):
    """Run `cfgs` (one norm) in ONE subprocess (imports and data generation cost a few seconds
    per process). When no step completes for `timeout` s the job is stopped: the stalled run
    is reported as failed and a new subprocess takes the remaining runs."""
    from pbn_gluon import jobs
    pending = list(cfgs)
    while pending:
        first = pending[0]
        env = jobs.worker_env(first['backend'], first['contexts'], timeout)
        cmd = jobs.launch_command(first['backend'], first['contexts'],
                                  [sys.executable, DEMO, '--worker', json.dumps(pending)])
        state = {'current': None, 'done': 0}

        def on_line(line):
            tagged = HOROVOD_PREFIX.match(line)     # horovodrun: "[rank]<stdout>:line"
            if tagged:
                if tagged.group(1) != '0':
                    return
                line = line[tagged.end():]
            current = state['current']
            if line.startswith('start '):
                index = int(line.split()[1])
                state['current'] = next(c for c in pending if c['index'] == index)
                state['done'] = 0
                bar.set_description('%s ipd=%d seed=%d' % (
                    state['current']['norm'], state['current']['images_per_device'],
                    state['current']['seed']))
            elif line.startswith('progress ') and current is not None:
                n = int(line.split()[1])
                bar.update(n - state['done'])
                state['done'] = n
            elif line.startswith('result '):
                on_result(current, json.loads(line[len('result '):]), '')
                pending.remove(current)
                state['current'] = None
        result = jobs.run(cmd, env=env, idle_timeout=timeout, on_line=on_line)
        if not pending:
            return
        current, done = state['current'], state['done']
        failed = current if current is not None else pending[0]
        bar.update(failed['steps'] - done if current is not None else failed['steps'])
        on_result(failed, None, _failure(result, timeout, done, failed['steps']))
        pending.remove(failed)


def _failure(result, timeout, done, steps):
    """Why a worker ended before its runs did: a stall, or its exit code and last lines (no
    paths of this machine in them)."""
    if result.status == 'stalled':
        return 'stalled: no progress for %.0f s (at step %d of %d); killed' % (
            timeout, done, steps)
    tail = [l for l in result.output.strip().splitlines()
            if not l.startswith(('start ', 'progress ', 'result '))][-5:]
    from pbn_gluon.files import portable
    return 'exit code %s: %s' % (result.returncode, portable(' | '.join(tail)))
