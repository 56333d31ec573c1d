"""ProgressiveBatchNorm against independent references: gluon BatchNorm (w = 1) and a numpy
implementation of the spec (two steps on 4 CPU contexts, uneven per-device batches)."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon, nd

import pbn_gluon
import reference

C = 4
EPS = 1e-5
GAMMA = np.linspace(0.5, 2.0, C)
BETA = np.linspace(-1.0, 1.0, C)


def build(layer, ctxs, hybridize):
    layer.initialize(ctx=ctxs)
    layer.gamma.set_data(nd.array(GAMMA))
    layer.beta.set_data(nd.array(BETA))
    if hybridize:
        layer.hybridize(static_alloc=True)
    return layer


def batchnorm_result(x, dy):
    """nn.BatchNorm (float32, one context) on batch `x`: y, dx, dgamma, dbeta."""
    bn = build(gluon.nn.BatchNorm(in_channels=C), [mx.cpu()], False)
    a = nd.array(x)
    a.attach_grad()
    with autograd.record():
        y = bn(a)
    y.backward(nd.array(dy))
    return y.asnumpy(), a.grad.asnumpy(), bn.gamma.grad().asnumpy(), bn.beta.grad().asnumpy()


def step(layer, xs, dys, ctxs, sync=None):
    """One training step of `layer` alone; returns outputs and input gradients per device."""
    inputs = [nd.array(x, ctx=c) for x, c in zip(xs, ctxs)]
    for x in inputs:
        x.attach_grad()
    with autograd.record():
        ys = [layer(x) for x in inputs]
        losses = [(y * nd.array(dy, ctx=y.context)).sum() for y, dy in zip(ys, dys)]
    autograd.backward(losses)
    if sync is not None:
        sync.step()
    return [y.asnumpy() for y in ys], [x.grad.asnumpy() for x in inputs]


def batches(sizes, step_index, shape=(C, 5, 3)):
    rng = np.random.RandomState(10 + step_index)
    xs = [rng.normal(1.5, 2.0, (n,) + shape).astype(np.float32) for n in sizes]
    dys = [rng.normal(0, 1, x.shape).astype(np.float32) for x in xs]
    return xs, dys


@pytest.mark.parametrize('hybridize', [False, True])
def test_local_weight_one_is_batchnorm(hybridize):
    """w = 1: outputs, input/gamma/beta gradients, running statistics and inference output
    equal mxnet.gluon.nn.BatchNorm's over three steps."""
    ctx = [mx.cpu(0)]
    bn = build(gluon.nn.BatchNorm(in_channels=C), ctx, hybridize)
    pbn = build(pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C, local_weight=1.0), ctx, hybridize)
    sync = pbn_gluon.StatsSync(pbn, pbn_gluon.LocalComm(ctx))
    for t in range(3):
        xs, dys = batches([3], t)
        y_bn, dx_bn = step(bn, xs, dys, ctx)
        y_pbn, dx_pbn = step(pbn, xs, dys, ctx, sync)
        np.testing.assert_allclose(y_pbn[0], y_bn[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx_pbn[0], dx_bn[0], rtol=1e-4, atol=1e-5)
        for name in ('gamma', 'beta'):
            np.testing.assert_allclose(getattr(pbn, name).grad().asnumpy(),
                                       getattr(bn, name).grad().asnumpy(), rtol=1e-4, atol=1e-5)
        for name in ('running_mean', 'running_var'):
            np.testing.assert_allclose(getattr(pbn, name).data().asnumpy(),
                                       getattr(bn, name).data().asnumpy(), rtol=1e-5, atol=1e-6)
    x = nd.array(batches([2], 9)[0][0])
    np.testing.assert_allclose(pbn(x).asnumpy(), bn(x).asnumpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('hybridize', [False, True])
@pytest.mark.parametrize('group_size', [None, 2])
def test_second_step_matches_numpy_spec(hybridize, group_size):
    """4 CPU contexts, per-device batches of 2, 1, 3 and 2 images, w = 0.5: step 1 uses the
    count-weighted moments of step 0 over the device's group (all 4, or pairs)."""
    ctxs = [mx.cpu(i) for i in range(4)]
    w = 0.5
    layer = build(pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C, local_weight=w,
                                                 group_size=group_size), ctxs, hybridize)
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    sizes = [2, 1, 3, 2]
    g = group_size or 4
    groups = [list(range(k // g * g, k // g * g + g)) for k in range(4)]
    running_mean, running_var = np.zeros(C), np.ones(C)

    x0, dy0 = batches(sizes, 0)
    step(layer, x0, dy0, ctxs, sync)
    x1, dy1 = batches(sizes, 1)
    ys, dxs = step(layer, x1, dy1, ctxs, sync)

    for t, xs in enumerate((x0, x1)):
        mean, square = reference.group_moments(xs)      # group == all devices here
        running_mean = 0.9 * running_mean + 0.1 * mean
        running_var = 0.9 * running_var + 0.1 * (square - mean ** 2)
    if group_size is None:  # running statistics: global moments, identical on every device
        for ctx in ctxs:
            np.testing.assert_allclose(layer.running_mean.data(ctx).asnumpy(), running_mean,
                                       rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(layer.running_var.data(ctx).asnumpy(), running_var,
                                       rtol=1e-5, atol=1e-6)
    for k, ctx in enumerate(ctxs):
        g_mean, g_square = reference.group_moments([x0[j] for j in groups[k]])
        y, dx, dgamma, dbeta = reference.pbn_device(x1[k], g_mean, g_square, w, GAMMA, BETA,
                                                    EPS, dy1[k])
        np.testing.assert_allclose(ys[k], y, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dxs[k], dx, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(layer.gamma.grad(ctx).asnumpy(), dgamma, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(layer.beta.grad(ctx).asnumpy(), dbeta, rtol=1e-4, atol=1e-4)


def test_numpy_reference_gradient_matches_finite_differences():
    """The reference's analytic gradient is itself checked against central differences."""
    rng = np.random.RandomState(0)
    x = rng.normal(0.5, 1.5, (3, C, 2, 2))
    dy = rng.normal(0, 1, x.shape)
    g_mean, g_square = rng.normal(0, 1, C), rng.uniform(2, 3, C)
    f = lambda x_: (reference.pbn_device(x_, g_mean, g_square, 0.3, GAMMA, BETA, EPS, dy)[0]
                    * dy).sum()
    dx = reference.pbn_device(x, g_mean, g_square, 0.3, GAMMA, BETA, EPS, dy)[1]
    for idx in [(0, 0, 0, 0), (1, 2, 1, 0), (2, 3, 1, 1)]:
        e = np.zeros_like(x)
        e[idx] = 1e-6
        assert abs((f(x + e) - f(x - e)) / 2e-6 - dx[idx]) < 1e-5


def test_eval_mode_uses_running_statistics():
    """Inference (and use_global_stats=True) normalise with the running statistics only."""
    layer = build(pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C), [mx.cpu()], True)
    rm, rv = np.linspace(-1, 1, C), np.linspace(0.5, 3, C)
    layer.running_mean.set_data(nd.array(rm))
    layer.running_var.set_data(nd.array(rv))
    x = batches([2], 3)[0][0]
    expected = (GAMMA.reshape(1, -1, 1, 1) * (x - rm.reshape(1, -1, 1, 1))
                / np.sqrt(rv.reshape(1, -1, 1, 1) + EPS) + BETA.reshape(1, -1, 1, 1))
    np.testing.assert_allclose(layer(nd.array(x)).asnumpy(), expected, rtol=1e-5, atol=1e-5)
    frozen = build(pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C, use_global_stats=True),
                   [mx.cpu()], False)
    frozen.running_mean.set_data(nd.array(rm))
    frozen.running_var.set_data(nd.array(rv))
    with autograd.record():
        y = frozen(nd.array(x))
    np.testing.assert_allclose(y.asnumpy(), expected, rtol=1e-5, atol=1e-5)


def test_schedules():
    linear = pbn_gluon.schedules.Linear(start=10, steps=100)
    assert linear(0, 4) == 1.0 and linear(10, 4) == 1.0
    assert linear(60, 4) == pytest.approx(1 + (0.25 - 1) * 0.5)
    assert linear(500, 4) == pytest.approx(0.25)
    cosine = pbn_gluon.schedules.Cosine(start=0, steps=10, final=0.5)
    assert cosine(5) == pytest.approx(0.75) and cosine(10) == 0.5
    groups = pbn_gluon.schedules.group_size_schedule({0: 1, 100: 2, 200: 4})
    assert [groups(t) for t in (0, 99, 100, 250)] == [1, 1, 2, 4]


def test_group_schedule_and_local_weight_reach_the_graph():
    """A growing group and a changing w are graph inputs: the hybridized layer's outputs follow
    them, step by step, as the numpy spec says. Groups of 1 device until step 2, then 2; w goes
    linearly to 1/G over 2 steps. Step t mixes in the group sums of step t-1, exchanged with
    the group size of step t-1."""
    ctxs = [mx.cpu(i) for i in range(2)]
    layer = build(pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', 
        in_channels=C, local_weight=pbn_gluon.schedules.Linear(start=0, steps=2),
        group_size={0: 1, 2: 2}), ctxs, True)
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    sizes = [2, 3]
    history = []
    for t in range(4):
        xs, dys = batches(sizes, t)
        ys, _ = step(layer, xs, dys, ctxs, sync)
        for k in range(2):
            if t < 2:     # the first step, then w = 1 (groups of one device: 1/G = 1)
                want = reference.batchnorm(xs[k], GAMMA, BETA, EPS, dys[k])[0]
            else:         # w = 1/2 with the previous step's group: own device, then both
                group = [history[-1][k]] if t == 2 else history[-1]
                mean, square = reference.group_moments(group)
                want = reference.pbn_device(xs[k], mean, square, 0.5, GAMMA, BETA, EPS,
                                            dys[k])[0]
            np.testing.assert_allclose(ys[k], want, rtol=1e-4, atol=1e-4, err_msg='step %d' % t)
        history.append(xs)


@pytest.mark.parametrize('axis', [-1, 2])
def test_channel_axis_other_than_one_is_batchnorm(axis):
    """w = 1 with channels on the last / a middle axis: outputs and gradients equal BatchNorm's."""
    rng = np.random.RandomState(3)
    shape = [2, 3, 5, 6]
    shape[axis] = C
    x = rng.normal(0.5, 2.0, shape).astype(np.float32)
    dy = rng.normal(0, 1, shape).astype(np.float32)
    results = []
    for layer in (gluon.nn.BatchNorm(axis=axis, in_channels=C),
                  pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', axis=axis, in_channels=C, local_weight=1.0)):
        build(layer, [mx.cpu(0)], hybridize=True)
        a = nd.array(x)
        a.attach_grad()
        with autograd.record():
            y = layer(a)
        y.backward(nd.array(dy))
        results.append((y.asnumpy(), a.grad.asnumpy(), layer.gamma.grad().asnumpy()))
    for got, want in zip(results[1], results[0]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_default_is_pbn_plus_and_the_paper_one_argument_away():
    """Defaults follow the studies (docs/results.md): averaged moments + progressive backward;
    the paper's algorithm in its best-supported reading is variant='paper' (averaged moments,
    local backward: docs/pbn-spec.md), its literal reading 'paper-minimal'; explicit arguments
    win over any."""
    plus = pbn_gluon.ProgressiveBatchNorm()
    assert (plus.global_momentum, plus.backward_mode, plus.exchange_rows) == (0.8, 'progressive', 5)
    paper = pbn_gluon.ProgressiveBatchNorm(variant='paper')
    assert (paper.global_momentum, paper.backward_mode, paper.exchange_rows) == (0.8, 'local', 3)
    minimal = pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal')
    assert (minimal.global_momentum, minimal.backward_mode) == (0.0, 'local')
    mixed = pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', backward='progressive')
    assert (mixed.global_momentum, mixed.backward_mode) == (0.0, 'progressive')
    with pytest.raises(ValueError, match="variant must be one of 'plus', 'paper', "
                                         "'paper-minimal', got 'spec'"):
        pbn_gluon.ProgressiveBatchNorm(variant='spec')


@pytest.mark.parametrize('devices', [1, 2])
def test_local_weight_one_default_variant_statistics(devices):
    """w = 1 with the default variant ('plus'), 4 steps of drifting data: outputs, input and
    gamma/beta gradients are nn.BatchNorm's on each device's batch; the running statistics
    are the documented ones (numpy): the exponential average (momentum 0.9) of the moments of
    the group sums averaged over exchanges, G <- 0.8 G + 0.2 G_t, which differ from
    BatchNorm's on drifting data (BatchNorm's own: variant='paper-minimal', test above)."""
    ctxs = [mx.cpu(i) for i in range(devices)]
    pbn = build(pbn_gluon.ProgressiveBatchNorm(in_channels=C, local_weight=1.0), ctxs, True)
    trainer = pbn_gluon.Trainer(pbn.collect_params(), 'sgd', {'learning_rate': 0.0})
    bn = build(gluon.nn.BatchNorm(in_channels=C), [mx.cpu(0)], True)
    mean, var, group = np.zeros(C), np.ones(C), None
    for t in range(4):
        xs, dys = batches([3, 2][:devices], t)
        xs = [x + 2.0 * t for x in xs]      # the mean drifts by 2 std a step
        ys, dxs = step(pbn, xs, dys, ctxs)
        trainer.step(1)
        for k, c in enumerate(ctxs):
            y_bn, dx_bn = step(bn, xs[k:k + 1], dys[k:k + 1], [mx.cpu(0)])
            np.testing.assert_allclose(ys[k], y_bn[0], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(dxs[k], dx_bn[0], rtol=1e-4, atol=1e-5)
            for name in ('gamma', 'beta'):
                np.testing.assert_allclose(getattr(pbn, name).grad(c).asnumpy(),
                                           getattr(bn, name).grad().asnumpy(), rtol=1e-4,
                                           atol=1e-5)
        n, m, q = reference.channel_moments(np.concatenate(xs))
        sums = np.stack([n * m, n * q, np.full(C, float(n))])
        group = sums if group is None else 0.8 * group + 0.2 * sums
        g_mean = group[0] / group[2]
        mean = 0.9 * mean + 0.1 * g_mean
        var = 0.9 * var + 0.1 * (group[1] / group[2] - g_mean ** 2)
    for c in ctxs:
        np.testing.assert_allclose(pbn.running_mean.data(c).asnumpy(), mean, rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(pbn.running_var.data(c).asnumpy(), var, rtol=1e-5,
                                   atol=1e-5)
    if devices == 1:    # BatchNorm's own (bn saw the same batches) are measurably other
        assert np.abs(mean - bn.running_mean.data().asnumpy()).max() > 0.3
