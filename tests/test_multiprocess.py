"""Across processes: SyncBN over Horovod (Gloo) and KVStore dist_sync equals BatchNorm on the
concatenated batch; PBN over them matches PBN over LocalComm on the same data."""
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, nd

import pbn_gluon
import reference
from pbn_gluon import jobs
from common import make_batch, make_net

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 2


def run_job(backend, worker, processes=2):
    """`worker` (a script, in tests/ unless its path is absolute, and its arguments) as a job
    of `processes` processes: horovodrun (Gloo) or KVStore dist_sync workers."""
    worker = [sys.executable, os.path.join(HERE, worker[0])] + list(worker[1:])
    cmd = jobs.launch_command(backend, processes, worker, timeout=150)
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get('PYTHONPATH', ''))
    return subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=240)


def run_workers(backend, norm, out, extra=()):
    return run_job(backend, ['mp_worker.py', '--backend', backend, '--norm', norm, '--out',
                             str(out), '--steps', str(STEPS)] + list(extra))


def load(out):
    return [np.load(os.path.join(out, 'rank%d.npz' % r)) for r in range(2)]


def local_run(norm, devices=2):
    """The same job on `devices` CPU contexts of this process (LocalComm)."""
    ctxs = [mx.cpu(i) for i in range(devices)]
    net = make_net(norm)
    net.initialize(ctx=ctxs)
    sync = pbn_gluon.StatsSync(net, pbn_gluon.LocalComm(ctxs))
    records = [dict() for _ in ctxs]
    for t in range(STEPS):
        x, sizes = make_batch(t, devices)
        parts = np.split(x, np.cumsum(sizes)[:-1])
        xs = [nd.array(p, ctx=c) for p, c in zip(parts, ctxs)]
        for a in xs:
            a.attach_grad()
        with autograd.record():
            ys = [net(a) for a in xs]
            losses = [(y * nd.array(np.linspace(-1, 1, y.size).reshape(y.shape), ctx=y.context))
                      .sum() for y in ys]
        autograd.backward(losses)
        sync.step()
        for r, (c, y, a) in enumerate(zip(ctxs, ys, xs)):
            records[r].update({'y%d' % t: y.asnumpy(), 'dx%d' % t: a.grad.asnumpy(),
                               'dgamma%d' % t: net[1].gamma.grad(c).asnumpy(),
                               'rm%d' % t: net[1].running_mean.data(c).asnumpy()})
    return records


def assert_ranks_match(ranks, local):
    """Every rank's outputs, input and gamma gradients and running means, at every step, equal
    those of the same device in the LocalComm run."""
    for r in range(2):
        for key in ('y', 'dx', 'dgamma', 'rm'):
            for t in range(STEPS):
                np.testing.assert_allclose(ranks[r]['%s%d' % (key, t)], local[r]['%s%d' % (key, t)],
                                           rtol=1e-4, atol=1e-4, err_msg='%s%d rank %d' % (key, t, r))


def concatenated_batchnorm(step_index):
    """Reference: BatchNorm on the whole batch, the conv computed by a 1-device gluon net."""
    x, sizes = make_batch(step_index, 2)
    net = make_net('bn')
    net.initialize()
    conv = net[0](nd.array(x)).asnumpy()
    dy = np.concatenate([np.linspace(-1, 1, n * conv[0].size).reshape((n,) + conv.shape[1:])
                         for n in sizes])
    norm = net[1]
    y, _, dgamma, _ = reference.batchnorm(conv, norm.gamma.data().asnumpy(),
                                          norm.beta.data().asnumpy(), 1e-5, dy)
    return y, dgamma


@pytest.mark.timeout(300)
@pytest.mark.parametrize('backend', ['horovod', 'kvstore'])
def test_syncbn_across_processes_equals_batchnorm(backend, tmp_path):
    result = run_workers(backend, 'syncbn', tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = load(tmp_path)
    # conv weights are fixed and the first step's conv input too: compare step 0 exactly
    y_ref, dgamma_ref = concatenated_batchnorm(0)
    np.testing.assert_allclose(np.concatenate([r['y0'] for r in ranks]), y_ref,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ranks[0]['dgamma0'] + ranks[1]['dgamma0'], dgamma_ref,
                               rtol=1e-3, atol=1e-3)
    # and every step agrees with SyncBN over LocalComm, including input gradients
    assert_ranks_match(ranks, local_run('syncbn'))


@pytest.mark.timeout(300)
@pytest.mark.parametrize('backend', ['horovod', 'kvstore'])
def test_pbn_across_processes_matches_localcomm(backend, tmp_path):
    result = run_workers(backend, 'pbn', tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_ranks_match(load(tmp_path), local_run('pbn'))


@pytest.mark.timeout(300)
@pytest.mark.parametrize('backend,comm', [('horovod', 'HorovodComm'),
                                          ('kvstore', 'KVStoreComm')])
def test_pbn_gluon_trainer_picks_the_backend(backend, comm, tmp_path):
    """pbn_gluon.Trainer with comm=None under horovodrun (hvd.init()) and on a dist_sync
    kvstore: it picks Horovod / the Trainer's kvstore, and trains as StatsSync over LocalComm."""
    result = run_workers(backend, 'pbn', tmp_path, extra=['--trainer'])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = load(tmp_path)
    assert [str(r['comm']) for r in ranks] == [comm, comm]
    assert_ranks_match(ranks, local_run('pbn'))


@pytest.mark.timeout(300)
def test_processes_with_different_nets_fail_clearly(tmp_path):
    """Rank 1 builds a net with other channel counts: both ranks stop with a clear error."""
    script = tmp_path / 'mismatch.py'
    script.write_text(
        'import sys, mxnet as mx, pbn_gluon\n'
        'from mxnet import autograd, nd\n'
        'from common import make_net\n'
        'comm = pbn_gluon.HorovodComm(mx.cpu())\n'
        'net = make_net("pbn", channels=4 + comm.rank_offset)\n'
        'net.initialize()\n'
        'sync = pbn_gluon.StatsSync(net, comm)\n'
        'x = nd.ones((2, 3, 4, 4)); x.attach_grad()\n'
        'with autograd.record():\n'
        '    y = net(x)\n'
        'y.backward()\n'
        'sync.step()\n')
    result = run_job('horovod', [str(script)])
    assert result.returncode != 0
    assert 'processes run different nets' in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize('backend', ['horovod', 'kvstore'])
def test_trainer_and_sync_order_across_processes(backend, tmp_path):
    """2 processes, PBN with both extensions as the first layer: Horovod's DistributedTrainer,
    and a Trainer on the dist_sync kvstore (update_on_kvstore=False), after job.broadcast,
    with StatsSync, or with the exchange mixed in (pbn-trainer: bit-identical to sync-first). Each
    process draws other weights: in the first forward every weight is rank 0's (a deferred one
    too). trainer.step() before or after sync.step(): the first group sums are numpy's over
    the whole batch, and the weights after 4 steps agree."""
    results = {}
    for order in ('trainer-first', 'sync-first', 'pbn-trainer'):
        out = tmp_path / order
        run = run_job(backend, ['mp_order_worker.py', '--backend', backend, '--order', order,
                                '--out', str(out)])
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        results[order] = load(out)
    for order, (root, other) in results.items():
        assert not np.allclose(root['drawn'], other['drawn'])    # the test can fail
        starts = [k for k in root.files if k.startswith('start')]
        assert len(starts) == 6
        for name in starts:
            np.testing.assert_array_equal(other[name], root[name], err_msg=order + ' ' + name)
        np.testing.assert_array_equal(root['start2'], root['drawn'])
    x, _ = make_batch(0, 2)
    n, m, q = reference.channel_moments(x)
    want = [n * m, n * q, np.full(3, n)]
    for order, ranks in results.items():
        for r in ranks:
            np.testing.assert_allclose(r['group_sums'], want, rtol=1e-6, err_msg=order)
    first, second = results['trainer-first'][0], results['sync-first'][0]
    names = [k for k in first.files if k.startswith('param')]
    assert len(names) == 6
    for name in names:     # pbn_gluon's Trainer: the exchange before the update, as sync-first
        np.testing.assert_array_equal(results['pbn-trainer'][0][name], second[name])
        np.testing.assert_allclose(first[name], second[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize('backend', ['horovod', 'kvstore'])
def test_broadcast_gives_deferred_parameters_the_roots_values(backend, tmp_path):
    """4 processes, each drawing other values for six Dense layers of one shape (deferred
    weights, biases): after Job.broadcast and the first forward, every process holds what
    rank 0 drew, parameter by parameter. (On a dist kvstore, back-to-back exchanges of one key
    got each other's values before the broadcast waited for each one.)"""
    run = run_job(backend, ['mp_broadcast_worker.py', '--backend', backend, '--out',
                            str(tmp_path)], processes=4)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [np.load(os.path.join(str(tmp_path), 'rank%d.npz' % r)) for r in range(4)]
    drawn = [k for k in ranks[0].files if k.startswith('drawn.')]
    assert len(drawn) == 12
    for key in drawn:
        assert not np.allclose(ranks[0][key], ranks[1][key]), key    # the test can fail
        for r, rank in enumerate(ranks):
            np.testing.assert_array_equal(rank['held.' + key[6:]], ranks[0][key],
                                          err_msg='rank %d %s' % (r, key[6:]))


def test_broadcast_parameters_gives_every_device_the_roots_values():
    """comm.broadcast_parameters over 3 contexts of this process, each holding other values
    (a NaN on a non-root device among them): every device ends with device 0's numbers, of
    both dtypes; a deferred parameter gets them when it is initialized; the exchange state
    of a norm layer is left alone."""
    ctxs = [mx.cpu(i) for i in range(3)]
    net = mx.gluon.nn.HybridSequential()
    net.add(mx.gluon.nn.Dense(4, in_units=3), pbn_gluon.ProgressiveBatchNorm(in_channels=4),
            mx.gluon.nn.Dense(2))
    net.initialize(ctx=ctxs)
    params = dict(net.collect_params().items())
    params['extra'] = mx.gluon.Parameter('extra', shape=(5,), dtype='float64')
    params['extra'].initialize(ctx=ctxs)
    rng = np.random.RandomState(0)
    for p in list(net[0].collect_params().values()) + [net[1].gamma, net[1].running_var,
                                                        params['extra']]:
        for i, c in enumerate(ctxs):
            value = rng.normal(size=p.shape)
            if i == 2:
                value.flat[0] = np.nan
            p.data(c)[:] = nd.array(value, ctx=c, dtype=p.dtype)
    root = {p.name: p.data(ctxs[0]).asnumpy() for p in params.values()
            if p._data is not None and not getattr(p, 'exchange_state', False)}
    state = net[1].global_sums
    state.data(ctxs[1])[:] = 7
    comm = pbn_gluon.CountingComm(pbn_gluon.LocalComm(ctxs))
    pbn_gluon.comm.broadcast_parameters(params, comm)
    assert comm.counts['non_blocking'] == 2         # float32 and float64: one exchange each
    for p in params.values():
        if p.name in root:
            for c in ctxs:
                np.testing.assert_array_equal(p.data(c).asnumpy(), root[p.name], err_msg=p.name)
    assert (state.data(ctxs[1]).asnumpy() == 7).all()
    assert net[2].weight._deferred_init       # its values across processes: the order test
    net(nd.ones((2, 3), ctx=ctxs[0]))
    assert comm.counts['non_blocking'] == 3
