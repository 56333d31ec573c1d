"""Bad input gets a clear error, never a hang or a wrong answer."""
import mxnet as mx
import pytest
from mxnet import autograd, gluon, nd

import pbn_gluon


def test_channel_count_mismatch():
    layer = pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=4)
    layer.initialize()
    with pytest.raises(ValueError, match='4 channels'):
        layer(nd.ones((2, 3, 5, 5)))


def test_group_size_must_divide_devices():
    net = gluon.nn.HybridSequential()
    net.add(pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', group_size=3))
    with pytest.raises(ValueError, match='does not divide the 4 devices'):
        pbn_gluon.StatsSync(net, pbn_gluon.LocalComm([mx.cpu(i) for i in range(4)]))


@pytest.mark.parametrize('spec', ['exponential', 1.5, [0.5]])
def test_unknown_local_weight_schedule(spec):
    with pytest.raises(ValueError, match='local_weight'):
        pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', local_weight=spec)


def test_statssync_needs_norm_layers():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(3), gluon.nn.BatchNorm())
    with pytest.raises(ValueError, match='convert_norm'):
        pbn_gluon.StatsSync(net, pbn_gluon.LocalComm([mx.cpu()]))


def test_statssync_on_other_contexts():
    net = pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal')
    net.initialize(ctx=[mx.cpu(0)])
    x = nd.ones((2, 3, 2, 2))
    x.attach_grad()
    with autograd.record():
        y = net(x)
    y.backward()
    sync = pbn_gluon.StatsSync(net, pbn_gluon.LocalComm([mx.cpu(0), mx.cpu(1)]))
    with pytest.raises(ValueError, match='communicator drives'):
        sync.step()


def test_launcher_stops_the_job_when_a_worker_dies():
    """A dist_sync worker that dies makes the launcher stop the others and report it: the
    launcher exits (rank 0 alone would wait forever) with the dead worker's code."""
    import re
    import subprocess
    import sys
    code = (
        'import os, sys, time, mxnet as mx\n'
        'kv = mx.kv.create("dist_sync")\n'
        'if kv.rank == 1:\n'
        '    os._exit(3)\n'
        'kv.init(7, mx.nd.ones(2))\n'      # rank 0 would wait for rank 1 forever
        'time.sleep(600)\n')
    result = subprocess.run([sys.executable, '-m', 'pbn_gluon.launch', '-n', '2', '--',
                             sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 3
    # the launcher numbers its processes; ps-lite assigns ranks in its own order, which the
    # launcher learns from the scheduler: the line names the rank that exited
    assert re.search(r'worker \d \(rank 1\) exited with 3; stopping the job', result.stderr), \
        result.stderr


def test_syncbn_on_cpu_contexts_fails_fast_when_resource_copies_are_too_few(monkeypatch):
    """Too few MXNet CPU resource copies let devices of one process wait on each other: StatsSync
    refuses to start, with one line that says what to set (not a warning and a stall)."""
    ctxs = [mx.cpu(i) for i in range(8)]
    monkeypatch.delenv('MXNET_CPU_TEMP_COPY', raising=False)
    monkeypatch.setenv('MXNET_CPU_PARALLEL_RAND_COPY', '64')
    advice = pbn_gluon.rendezvous.cpu_resource_advice(ctxs)
    assert 'MXNET_CPU_TEMP_COPY=16384' in advice and 'RAND_COPY' not in advice
    assert pbn_gluon.rendezvous.cpu_resource_advice(ctxs[:1]) is None    # one device: no exchange
    monkeypatch.setenv('MXNET_CPU_PARALLEL_RAND_COPY', '1')
    layer = pbn_gluon.SyncBatchNorm(in_channels=3)
    layer.initialize(ctx=ctxs[:2])
    with pytest.raises(pbn_gluon.rendezvous.CPUResourceError,
                       match='set MXNET_CPU_PARALLEL_RAND_COPY=16 MXNET_CPU_TEMP_COPY=4096 in the '
                             'environment before mxnet is imported') as raised:
        pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs[:2]))
    assert '\n' not in str(raised.value)
    monkeypatch.setenv('MXNET_CPU_TEMP_COPY', '16384')
    monkeypatch.setenv('MXNET_CPU_PARALLEL_RAND_COPY', '64')
    assert pbn_gluon.rendezvous.cpu_resource_advice(ctxs) is None


def test_missing_compiler_is_named(monkeypatch, tmp_path):
    """Building the operators without a C++ compiler says which one is missing."""
    monkeypatch.setenv('CXX', 'no-such-compiler')
    with pytest.raises(pbn_gluon.ops.BuildError, match="C\\+\\+ compiler: 'no-such-compiler'"):
        pbn_gluon.ops._build(str(tmp_path / 'libpbn_ops.so'), None)
    assert not list(tmp_path.glob('*.so'))
