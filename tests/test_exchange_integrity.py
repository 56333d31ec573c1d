"""No silent wrong answer: the exchange state is out of the Trainer's reach, the exchanged sums
keep their precision when |mean| >> std, a layer that does not run sends nothing, the running
statistics move only on accepted sums, gradients honour grad_req, the training-mode flag draws
no random numbers, and a re-inferred layer never writes out of bounds. Every check compares
with numpy in float64, nn.BatchNorm, or the same run in another legal call order."""
import os
import subprocess
import sys
import textwrap

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon, nd
from mxnet.gluon import nn

import pbn_gluon
import reference

C = 3
EPS = 1e-5


def sums_of(xs):
    """[sum x, sum x^2, n] per channel over a list of (N, C, ...) arrays, in float64."""
    out = np.zeros((3, xs[0].shape[1]))
    for x in xs:
        n, m, q = reference.channel_moments(x)
        out += [n * m, n * q, np.full(x.shape[1], n)]
    return out


def data(sizes, seed, mean=1.5, std=2.0, shape=(C, 4, 4)):
    rng = np.random.RandomState(seed)
    xs = [(mean + std * rng.normal(size=(n,) + shape)).astype(np.float32) for n in sizes]
    dys = [rng.normal(size=x.shape).astype(np.float32) for x in xs]
    return xs, dys


# -- the Trainer never reaches the exchange state -------------------------------------------

def _first_layer_net(ctxs, **pbn_kwargs):
    net = nn.HybridSequential()
    net.add(pbn_gluon.ProgressiveBatchNorm(in_channels=C, **pbn_kwargs),
            nn.Conv2D(4, 3, in_channels=C), nn.Flatten(), nn.Dense(2, in_units=4 * 2 * 2))
    mx.random.seed(3)
    net.initialize(mx.init.Xavier(), ctx=ctxs)
    net.hybridize(static_alloc=True)
    return net


def _train(order, kvstore, ctxs, steps=4, **pbn_kwargs):
    net = _first_layer_net(ctxs, **pbn_kwargs)
    sync = pbn_gluon.StatsSync(net, pbn_gluon.LocalComm(ctxs))
    trainer = gluon.Trainer(net.collect_params(), 'sgd',
                            {'learning_rate': 0.1, 'momentum': 0.9}, kvstore=kvstore)
    first_sums = None
    for t in range(steps):
        xs, _ = data([2, 3], t)
        with autograd.record():
            losses = [(net(nd.array(x, ctx=c)) ** 2).sum() for x, c in zip(xs, ctxs)]
        autograd.backward(losses)
        if order == 'trainer first':
            trainer.step(5)
            sync.step()
        else:
            sync.step()
            trainer.step(5)
        if t == 0:
            layer = net[0]
            first_sums = [layer.global_sums.data(c).asnumpy()[:3] for c in ctxs]
            want = sums_of(xs)
    params = [v.data(ctxs[0]).asnumpy() for v in net.collect_params().values()
              if v.grad_req != 'null']
    return params, first_sums, want


@pytest.mark.parametrize('kvstore', ['device', 'local'])
@pytest.mark.parametrize('pbn_kwargs', [{'local_weight': 0.25, 'variant': 'paper'},
                                        {'local_weight': 0.25, 'global_momentum': 0.8,
                                         'backward': 'progressive'}])
def test_trainer_first_or_sync_first_train_alike(kvstore, pbn_kwargs):
    """2 contexts: the first exchange's group sums are numpy's over both devices' batches in
    either order, and the weights after 4 steps agree (the Trainer's first-step broadcast and
    its gradient reduction reach no exchange state)."""
    ctxs = [mx.cpu(0), mx.cpu(1)]
    runs = {order: _train(order, kvstore, ctxs, **pbn_kwargs)
            for order in ('trainer first', 'sync first')}
    for order, (_, first_sums, want) in runs.items():
        for got in first_sums:
            np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=order)
    a, b = runs['trainer first'][0], runs['sync first'][0]
    assert len(a) == len(b) == 6     # gamma, beta, conv and dense weights and biases
    for i, (p, q) in enumerate(zip(a, b)):
        np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-7, err_msg=str(i))


def test_state_is_never_written_through_list_data():
    """What a Trainer or kvstore broadcast gets (all arrays at once) are copies."""
    ctxs = [mx.cpu(0), mx.cpu(1)]
    layer = pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C)
    layer.initialize(ctx=ctxs)
    for array in layer.batch_sums.list_data():
        array[:] = 7.0
    for c in ctxs:
        assert not layer.batch_sums.data(c).asnumpy().any()


def test_batchnorm_checkpoint_into_pbn_model_then_trainer(tmp_path):
    """A BatchNorm checkpoint (a pretrained backbone) loaded into a PBN GluonCV model, then a
    Trainer, then 2 steps: the loaded weights are the BatchNorm model's, the exchange state is
    created on first use, and training runs."""
    from gluoncv.model_zoo import get_model
    ctxs = [mx.cpu(0), mx.cpu(1)]
    bn_net = get_model('resnet18_v1b', classes=4)
    bn_net.initialize(mx.init.Xavier())
    bn_net(nd.zeros((1, 3, 32, 32)))
    path = str(tmp_path / 'bn.params')
    bn_net.save_parameters(path)
    net = get_model('resnet18_v1b', classes=4, norm_layer=pbn_gluon.ProgressiveBatchNorm)
    net.load_parameters(path, ctx=ctxs)
    for (name, p), (_, q) in zip(sorted(net._collect_params_with_prefix().items()),
                                 sorted(bn_net._collect_params_with_prefix().items())):
        np.testing.assert_array_equal(p.data(ctxs[1]).asnumpy(), q.data().asnumpy(),
                                      err_msg=name)
    trainer = pbn_gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 0.01})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for t in range(2):
        xs, _ = data([2, 2], t, shape=(3, 32, 32))
        ys = [nd.array([1, 2], ctx=c) for c in ctxs]
        with autograd.record():
            losses = [loss_fn(net(nd.array(x, ctx=c)), y) for x, c, y in zip(xs, ctxs, ys)]
        autograd.backward(losses)
        trainer.step(4)
        assert all(np.isfinite(l.asnumpy()).all() for l in losses)
    # the stem's exchanged count: 2 devices x 2 images x the 16 x 16 map of its stride-2 conv
    layer = pbn_gluon.find_norm_layers(net)[0]
    np.testing.assert_array_equal(layer.global_sums.data(ctxs[0]).asnumpy()[2], 2 * 2 * 16 * 16)


# -- precision when |mean| >> std -------------------------------------------------------------

def _precise_moments(x):
    x = np.moveaxis(x.astype(np.float64), 1, 0).reshape(x.shape[1], -1)
    m = x.mean(axis=1)
    return m, ((x - m[:, None]) ** 2).mean(axis=1)


def _precise_pbn(x, prev_xs, w, dy):
    """PBN on one device with the group moments of `prev_xs`, in float64 without cancellation."""
    m, v = _precise_moments(x)
    M, V = _precise_moments(np.concatenate(prev_xs))
    mu = w * m + (1 - w) * M
    var = w * v + (1 - w) * V + w * (1 - w) * (m - M) ** 2
    y, dx, _, _ = reference.normalize(x, mu, var, np.ones(C), np.zeros(C), EPS, dy, w)
    return y, dx


def _rel(got, want):
    return np.abs(got - want).max() / np.abs(want).max()


def _batchnorm_errors(x, dy):
    """nn.BatchNorm's own relative errors (y, dx, running_var after one step) against float64."""
    bn = nn.BatchNorm(in_channels=C)
    bn.initialize()
    a = nd.array(x)
    a.attach_grad()
    with autograd.record():
        y = bn(a)
    y.backward(nd.array(dy))
    m, v = _precise_moments(x)
    want_y, want_dx, _, _ = reference.normalize(x, m, v, np.ones(C), np.zeros(C), EPS, dy, 1.0)
    running_var = 0.9 + 0.1 * v
    return (_rel(y.asnumpy(), want_y), _rel(a.grad.asnumpy(), want_dx),
            _rel(bn.running_var.data().asnumpy(), running_var))


def _run(layer, ctxs, xs, dys, sync):
    inputs = [nd.array(x, ctx=c) for x, c in zip(xs, ctxs)]
    for a in inputs:
        a.attach_grad()
    with autograd.record():
        ys = [layer(a) for a in inputs]
    autograd.backward(ys, head_grads=[nd.array(dy, ctx=y.context) for y, dy in zip(ys, dys)])
    sync.step()
    return [y.asnumpy() for y in ys], [a.grad.asnumpy() for a in inputs]


SIZES = {1: [3], 2: [2, 3], 4: [2, 1, 3, 2]}


@pytest.mark.parametrize('mean,std', [(1e2, 1.0), (1e3, 1.0), (1e4, 1.0), (1e2, 1e-2)])
@pytest.mark.parametrize('devices', [1, 2, 4])
@pytest.mark.parametrize('norm', ['pbn', 'syncbn'])
def test_large_mean_keeps_precision(norm, devices, mean, std):
    """y, dx and running_var of SyncBN (current step) and PBN w=0.3 (step 1, with step 0's
    group moments) within 10x nn.BatchNorm's own error against float64, uneven batches."""
    ctxs = [mx.cpu(i) for i in range(devices)]
    sizes = SIZES[devices]
    x0, dy0 = data(sizes, 0, mean, std)
    x1, dy1 = data(sizes, 1, mean, std)
    if norm == 'pbn':
        layer = pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C, local_weight=0.3)
    else:
        layer = pbn_gluon.SyncBatchNorm(in_channels=C)
    layer.initialize(ctx=ctxs)
    layer.hybridize()
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    _run(layer, ctxs, x0, dy0, sync)
    ys, dxs = _run(layer, ctxs, x1, dy1, sync)
    bn_y, bn_dx, bn_rv = _batchnorm_errors(np.concatenate(x1), np.concatenate(dy1))
    for k in range(devices):
        if norm == 'pbn':
            want_y, want_dx = _precise_pbn(x1[k], x0, 0.3, dy1[k])
        else:
            whole_y, whole_dx, _, _ = reference.normalize(
                np.concatenate(x1), *_precise_moments(np.concatenate(x1)), np.ones(C),
                np.zeros(C), EPS, np.concatenate(dy1), 1.0)
            start = sum(sizes[:k])
            want_y, want_dx = whole_y[start:start + sizes[k]], whole_dx[start:start + sizes[k]]
        assert _rel(ys[k], want_y) <= 10 * bn_y + 1e-6, (k, _rel(ys[k], want_y), bn_y)
        assert _rel(dxs[k], want_dx) <= 10 * bn_dx + 1e-6, (k, _rel(dxs[k], want_dx), bn_dx)
    running_var = np.ones(C)
    for xs in (x0, x1):
        running_var = 0.9 * running_var + 0.1 * _precise_moments(np.concatenate(xs))[1]
    got = layer.running_var.data(ctxs[-1]).asnumpy()
    assert _rel(got, running_var) <= 10 * bn_rv + 1e-6, (_rel(got, running_var), bn_rv)


# -- a layer that does not run, non-finite statistics -----------------------------------------

def test_layer_skipped_on_one_device_sends_nothing():
    """2 contexts, w = 0: device 1 does not run the layer at step 1; the group sums are numpy's
    over device 0's batch alone, and the running statistics follow them."""
    ctxs = [mx.cpu(0), mx.cpu(1)]
    layer = pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C, local_weight=0.0)
    layer.initialize(ctx=ctxs)
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    x0, dy0 = data([2, 3], 0)
    _run(layer, ctxs, x0, dy0, sync)
    x1, dy1 = data([4], 1, mean=20.0)
    _run(layer, ctxs[:1], x1, dy1, sync)
    want = sums_of(x1)
    for c in ctxs:
        np.testing.assert_allclose(layer.global_sums.data(c).asnumpy(), want, rtol=1e-6)
    mean = np.zeros(C)
    for xs in (x0, x1):
        mean = 0.9 * mean + 0.1 * reference.group_moments(xs)[0]
    np.testing.assert_allclose(layer.running_mean.data(ctxs[1]).asnumpy(), mean, rtol=1e-5)


def test_nan_at_first_step_leaves_running_statistics():
    """A NaN in device 1's batch at step 0: the sums are rejected and the running statistics
    stay BatchNorm's initial ones (0 and 1)."""
    ctxs = [mx.cpu(0), mx.cpu(1)]
    layer = pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C)
    layer.initialize(ctx=ctxs)
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    xs, dys = data([2, 3], 0)
    xs[1][0, 0, 0, 0] = np.nan
    with pytest.warns(RuntimeWarning, match='non-finite'):
        _run(layer, ctxs, xs, dys, sync)
        assert sync.nonfinite_steps == 1
    for c in ctxs:
        np.testing.assert_array_equal(layer.running_mean.data(c).asnumpy(), np.zeros(C))
        np.testing.assert_array_equal(layer.running_var.data(c).asnumpy(), np.ones(C))


def test_large_finite_values_are_accepted():
    """Values near 1e20 are finite: their sums (x^2 ~ 1e40) are exchanged, not rejected."""
    ctxs = [mx.cpu(0), mx.cpu(1)]
    layer = pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C)
    layer.initialize(ctx=ctxs)
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    xs, dys = data([2, 3], 0, mean=1e20, std=1e19)
    _run(layer, ctxs, xs, dys, sync)
    assert sync.nonfinite_steps == 0
    np.testing.assert_allclose(layer.global_sums.data(ctxs[0]).asnumpy(), sums_of(xs),
                               rtol=1e-6)
    mean = 0.1 * reference.group_moments(xs)[0]
    np.testing.assert_allclose(layer.running_mean.data(ctxs[0]).asnumpy(), mean, rtol=1e-5)


# -- gradients: grad_req 'add' and 'null' ------------------------------------------------------

def _grads(layer, ctxs, xs, dys, passes):
    inputs = [nd.array(x, ctx=c) for x, c in zip(xs, ctxs)]
    for a in inputs:
        a.attach_grad(grad_req='add')
    layer.collect_params().zero_grad()
    for _ in range(passes):
        with autograd.record():
            ys = [layer(a) for a in inputs]
        autograd.backward(ys, head_grads=[nd.array(dy, ctx=y.context) for y, dy in zip(ys, dys)])
    nd.waitall()
    return ([a.grad.asnumpy() for a in inputs], layer.gamma.grad(ctxs[0]).asnumpy(),
            layer.beta.grad(ctxs[0]).asnumpy())


@pytest.mark.filterwarnings('ignore:.*second training forward')     # two passes, no exchange
@pytest.mark.parametrize('hybridize', [False, True])
@pytest.mark.parametrize('devices', [1, 2])
@pytest.mark.parametrize('norm', [pbn_gluon.ProgressiveBatchNorm, pbn_gluon.SyncBatchNorm])
def test_grad_req_add_accumulates(norm, devices, hybridize):
    """grad_req='add' on data, gamma and beta: two backward passes give twice one pass (as
    nn.BatchNorm does), and one pass equals nn.BatchNorm's on that batch (PBN: w = 1)."""
    ctxs = [mx.cpu(i) for i in range(devices)]
    kwargs = {'local_weight': 1.0} if norm is pbn_gluon.ProgressiveBatchNorm else {}
    layer = norm(in_channels=C, **kwargs)
    layer.initialize(ctx=ctxs)
    layer.collect_params().setattr('grad_req', 'add')
    if hybridize:
        layer.hybridize()
    pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    xs, dys = data([2, 3][:devices], 0)
    once = _grads(layer, ctxs, xs, dys, 1)
    twice = _grads(layer, ctxs, xs, dys, 2)
    for a, b in zip(once[0] + list(once[1:]), twice[0] + list(twice[1:])):
        np.testing.assert_allclose(b, 2 * a, rtol=1e-5, atol=1e-6)
    whole = np.concatenate(xs) if norm is pbn_gluon.SyncBatchNorm else xs[0]
    whole_dy = np.concatenate(dys) if norm is pbn_gluon.SyncBatchNorm else dys[0]
    _, dx, dgamma, dbeta = reference.batchnorm(whole, np.ones(C), np.zeros(C), EPS, whole_dy)
    np.testing.assert_allclose(once[0][0], dx[:len(xs[0])], rtol=1e-3, atol=1e-4)
    if norm is pbn_gluon.SyncBatchNorm:     # gamma's gradient on one device is its own share
        return
    np.testing.assert_allclose(once[1], dgamma, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(once[2], dbeta, rtol=1e-4, atol=1e-4)


def test_collect_params_setattr_add_leaves_state_without_gradient():
    """net.collect_params().setattr('grad_req', 'add') (gradient accumulation) does not give
    the exchange state a gradient the Trainer would update."""
    layer = pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C)
    layer.initialize()
    layer.collect_params().setattr('grad_req', 'add')
    assert layer.batch_sums.grad_req == layer.global_sums.grad_req == 'null'


# -- the training-mode flag draws no random numbers ---------------------------------------------

DROPOUT_SCRIPT = textwrap.dedent('''
    import sys
    import mxnet as mx, numpy as np, pbn_gluon
    from mxnet import autograd, nd
    from mxnet.gluon import nn
    hybridize = sys.argv[1] == '1'
    x = nd.array(np.random.RandomState(0).normal(1.5, 2.0, (2, 3, 6, 6)))
    results = []
    for norm in (nn.BatchNorm(in_channels=4),
                 pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=4, local_weight=1.0)):
        net = nn.HybridSequential()
        net.add(nn.Conv2D(4, 3, in_channels=3), norm, nn.Dropout(0.5))
        mx.random.seed(5)
        net.initialize(mx.init.Xavier())
        if hybridize:
            net.hybridize()
        mx.random.seed(11)
        with autograd.record():
            y = net(x)
            z = nn.Dropout(0.5)(y)      # a second Dropout: the stream after the first
        z.backward()
        results.append([y.asnumpy(), z.asnumpy(), net[0].weight.grad().asnumpy()])
    (y0, z0, g0), (y1, z1, g1) = results
    assert ((y0 == 0) == (y1 == 0)).all() and ((z0 == 0) == (z1 == 0)).all(), 'masks differ'
    assert (y0 == 0).mean() > 0.3, 'no dropout happened'
    np.testing.assert_allclose(z1, z0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-5)
    print('SAME')
''')


@pytest.mark.parametrize('hybridize', [False, True])
def test_dropout_after_pbn_draws_what_it_draws_after_batchnorm(hybridize):
    """conv + norm + Dropout (+ Dropout), same weights and seed: PBN(w=1) draws the same masks
    as BatchNorm, and equals it in outputs and weight gradients (to float32 rounding: the two
    normalise with different kernels). In a subprocess with MXNet's default of one random
    generator copy: with several (MXNET_CPU_PARALLEL_RAND_COPY, which in-process SyncBN needs),
    MXNet hands copies out per operator, round-robin, and every extension-library operator
    takes one, so no two different graphs draw alike there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('MXNET_CPU_')}
    run = subprocess.run([sys.executable, '-c', DROPOUT_SCRIPT, str(int(hybridize))],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith('SAME'), run.stderr[-2000:]


# -- shape re-inference -----------------------------------------------------------------------

@pytest.mark.slow
def test_reinferred_channels_never_write_out_of_bounds():
    """A layer whose gamma/beta/running statistics lost their shape (as GluonCV's
    prune_gluon_block does) and then sees another channel count: BatchNorm's behaviour (it
    re-infers and runs, the exchange state following), never an abort. In a subprocess, under glibc's
    MALLOC_CHECK_=3, so that heap corruption fails this test instead of the suite."""
    script = textwrap.dedent('''
        import mxnet as mx, numpy as np, pbn_gluon
        from mxnet import autograd, nd
        layer = pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal')
        layer.initialize()
        sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm([mx.cpu()]))
        with autograd.record():
            layer(nd.ones((2, 4, 3, 3))).backward()
        sync.step()
        for name in ('beta', 'gamma', 'running_mean', 'running_var'):
            p = layer.params.get(name)
            p._shape = None
            p.initialize(ctx=mx.cpu(), force_reinit=True)
        x = nd.array(np.random.RandomState(0).normal(size=(2, 8, 3, 3)))
        try:
            with autograd.record():
                y = layer(x)
            y.backward()
            sync.step()
            nd.waitall()
            print('RAN', layer.gamma.shape, layer.batch_sums.shape)
        except mx.MXNetError as e:
            print('ERROR', str(e).splitlines()[0])
    ''')
    env = dict(os.environ, MALLOC_CHECK_='3')
    run = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout.strip().splitlines()[-1]
    assert out.startswith('RAN (8,) (24,)'), out     # BatchNorm's behaviour, state included


@pytest.mark.slow
def test_gluoncv_pruned_model_trains_with_pbn():
    """GluonCV's pruned ResNets (prune_gluon_block resets the norm parameters' shapes to None)
    built with norm_layer=ProgressiveBatchNorm: 2 steps on 2 contexts, the state follows the
    pruned channel counts. In a subprocess: a heap corruption fails the test, not the suite."""
    script = textwrap.dedent('''
        import mxnet as mx, pbn_gluon
        from gluoncv.model_zoo import get_model
        from mxnet import autograd
        net = get_model('resnet18_v1b_0.89', norm_layer=pbn_gluon.ProgressiveBatchNorm)
        ctxs = [mx.cpu(0), mx.cpu(1)]
        net.initialize(ctx=ctxs)
        net.hybridize()
        sync = pbn_gluon.StatsSync(net, pbn_gluon.LocalComm(ctxs))
        xs = [mx.nd.random.normal(shape=(2, 3, 32, 32), ctx=c) for c in ctxs]
        for _ in range(2):
            with autograd.record():
                ys = [net(x) for x in xs]
            autograd.backward(ys)
            sync.step()
        layer = pbn_gluon.find_norm_layers(net)[0]
        print('RAN', layer.gamma.shape[0], layer.batch_sums.shape[0], layer.exchange_rows)
    ''')
    run = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                         env=dict(os.environ, MALLOC_CHECK_='3'), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    _, channels, sums, rows = run.stdout.split()[-4:]
    assert int(sums) == int(rows) * int(channels) and int(channels) < 64
