"""Faults that a long multi-device job meets, each ending clearly within a bounded time: a
non-finite batch on one device, a device that never reaches a SyncBN exchange, a process
killed in the middle of training on Horovod and KVStore dist_sync (worker or server). A run
killed and resumed: test_segmentation_train.py; nets that differ between processes:
test_multiprocess.py. The matrix with measured times is docs/faults.md."""
import os
import signal
import subprocess
import time
import warnings

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

import pbn_gluon
import reference
from pbn_gluon.segmentation import checkpoint
from test_progressive_norm import BETA, C, EPS, GAMMA, batches, build, step
from pbn_gluon import jobs
from common import make_fake_cityscapes
from test_segmentation_train import REPO, horovod_worker, train_command


def group_sums(xs):
    """[sum x, sum x^2, n] per channel over the arrays `xs`, in float64."""
    sums = np.zeros((3, C))
    for x in xs:
        n, m, q = reference.channel_moments(x)
        sums += [n * m, n * q, np.full(C, n)]
    return sums


@pytest.mark.parametrize('global_momentum', [0.0, 0.8])
@pytest.mark.parametrize('group_size', [None, 2])
def test_nan_batch_on_one_device_leaves_the_others_finite(group_size, global_momentum):
    """4 CPU contexts, w = 0.5. Step 1 feeds device 2 a batch with one NaN. Its group keeps the
    global moments it had (those of step 0) and says so once; a group without it takes step 1's.
    At step 2 every device, device 2 included, is finite and equals the numpy spec with those
    moments, and so are the running statistics."""
    ctxs = [mx.cpu(i) for i in range(4)]
    w, a = 0.5, global_momentum
    layer = build(pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C, local_weight=w,
                                                 group_size=group_size,
                                                 global_momentum=a), ctxs, True)
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    sizes = [2, 1, 3, 2]
    g = group_size or 4
    x0, dy0 = batches(sizes, 0)
    x1, dy1 = batches(sizes, 1)
    x1[2][1, 3, 2, 0] = np.nan
    x2, dy2 = batches(sizes, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        step(layer, x0, dy0, ctxs, sync)
        ys1, _ = step(layer, x1, dy1, ctxs, sync)
        ys2, dxs2 = step(layer, x2, dy2, ctxs, sync)
        assert sync.nonfinite_steps == 1
    messages = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
    assert len(messages) == 1 and 'step 1' in messages[0] and 'cpu(2)' in messages[0], messages
    assert np.isnan(ys1[2]).any() and all(np.isfinite(ys1[k]).all() for k in (0, 1, 3))

    for k, ctx in enumerate(ctxs):
        members = range(k // g * g, k // g * g + g)
        kept = group_sums([x0[j] for j in members])
        if 2 not in members:    # this group saw no NaN: step 1's sums (averaged) come in
            kept = a * kept + (1 - a) * group_sums([x1[j] for j in members])
        mean, square = kept[0] / kept[2], kept[1] / kept[2]
        y, dx, _, _ = reference.pbn_device(x2[k], mean, square, w, GAMMA, BETA, EPS, dy2[k])
        np.testing.assert_allclose(ys2[k], y, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dxs2[k], dx, rtol=1e-3, atol=1e-4)
        for stat in (layer.running_mean, layer.running_var):
            assert np.isfinite(stat.data(ctx).asnumpy()).all()


def test_finite_steps_are_not_counted():
    ctxs = [mx.cpu(0), mx.cpu(1)]
    layer = build(pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C, local_weight=0.5), ctxs, False)
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    with warnings.catch_warnings():
        warnings.simplefilter('error', RuntimeWarning)
        for t in range(3):
            step(layer, *batches([2, 3], t), ctxs, sync)
        assert sync.nonfinite_steps == 0


def test_device_that_never_reaches_a_syncbn_exchange_fails_the_step(monkeypatch):
    """2 CPU contexts of one process, only device 0 runs the forward: its exchange gives up
    after the rendezvous timeout (nothing hangs: the forward's output becomes readable), and
    the next sync.step() raises naming device 1."""
    monkeypatch.setattr(pbn_gluon.rendezvous, 'TIMEOUT', 2.0)
    ctxs = [mx.cpu(0), mx.cpu(1)]
    layer = pbn_gluon.SyncBatchNorm(in_channels=C)
    layer.initialize(ctx=ctxs)
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    with autograd.record():
        y = layer(mx.nd.ones((2, C, 3, 3), ctx=ctxs[0]))
    y.wait_to_read()        # returns once the meeting has given up on device 1
    with pytest.raises(TimeoutError, match=r'device\(s\) \[1\] .* did not reach'):
        sync.step()


@pytest.fixture(scope='module')
def fake_root(tmp_path_factory):
    return make_fake_cityscapes(tmp_path_factory.mktemp('fake_cityscapes'), '64x128')


def launched_process(launcher_pid, role):
    """pid of a child of the KVStore launcher with DMLC_ROLE `role`, or None."""
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open('/proc/%s/stat' % pid) as f:
                parent = int(f.read().rsplit(')', 1)[1].split()[1])
            with open('/proc/%s/environ' % pid, 'rb') as f:
                environ = f.read().decode(errors='replace').split('\0')
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher_pid and 'DMLC_ROLE=%s' % role in environ:
            return int(pid)
    return None


@pytest.mark.timeout(300)
@pytest.mark.parametrize('victim', ['horovod worker', 'kvstore worker', 'kvstore server'])
def test_killed_process_ends_the_job_and_keeps_the_checkpoint(victim, fake_root, tmp_path):
    """DeepLab PBN training on 2 processes, a checkpoint every iteration. Once it trains, one
    process gets SIGKILL: the whole job ends within 90 s with an error naming it, and the last
    checkpoint is complete."""
    run_dir = tmp_path / 'run'
    backend = victim.split()[0]
    train = train_command('cpu_fake_pbn.yaml', fake_root, run_dir, 'backend=%s' % backend,
                          'devices=1', 'overfit_batches=1', 'epochs=1000')
    launcher = jobs.horovodrun if backend == 'horovod' else jobs.kvstore_launch
    job = subprocess.Popen(launcher(2, train), cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (run_dir / 'checkpoint.json').exists():
            assert job.poll() is None, job.stdout.read()[-3000:]
            time.sleep(0.2)
        if backend == 'horovod':
            target = horovod_worker(1, str(run_dir))
        else:
            target = launched_process(job.pid, victim.split()[1])
        assert target is not None
        os.kill(target, signal.SIGKILL)
        killed_at = time.time()
        output, _ = job.communicate(timeout=90)
        seconds = time.time() - killed_at
    finally:
        if job.poll() is None:
            job.kill()
    print('\n%s killed: job ended after %.1f s with exit code %d' % (victim, seconds,
                                                                    job.returncode))
    assert job.returncode != 0
    if backend == 'horovod':
        assert 'exited with non-zero status' in output and 'Exit code: 137' in output, \
            output[-3000:]
    else:
        assert job.returncode == 137
        assert '%s' % victim.split()[1] in output and 'killed by SIGKILL; stopping the job' in \
            output, output[-3000:]
    last = checkpoint.latest(str(run_dir))
    assert last is not None
    assert mx.nd.load(checkpoint.model_params(last))


def test_syncbn_in_one_process_resumes_without_waiting(monkeypatch):
    """A resumed run (a new layer and StatsSync, the checkpoint's state at step 2) steps on at
    once: it waits only for the group sums of its own steps (a wait for any other would give
    up after the rendezvous timeout, and sync.step() would raise TimeoutError). Running
    statistics stay equal on both devices."""
    monkeypatch.setattr(pbn_gluon.rendezvous, 'TIMEOUT', 5.0)
    ctxs = [mx.cpu(0), mx.cpu(1)]
    layer = build(pbn_gluon.SyncBatchNorm(in_channels=C), ctxs, True)
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    for t in range(2):
        step(layer, *batches([2, 1], t), ctxs, sync)
    layer = build(pbn_gluon.SyncBatchNorm(in_channels=C), ctxs, True)
    resumed = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    resumed.load_state_dict(sync.state_dict())
    step(layer, *batches([2, 1], 2), ctxs, resumed)       # sync.step(): no TimeoutError
    assert resumed.step_count == 3
    means = [layer.running_mean.data(c).asnumpy() for c in ctxs]
    np.testing.assert_array_equal(means[0], means[1])
    # the new layer's running mean moved once, from 0, to step 2's mean over both devices
    mean, _ = reference.group_moments(batches([2, 1], 2)[0])
    np.testing.assert_allclose(means[0], 0.1 * mean, rtol=1e-5, atol=1e-6)
