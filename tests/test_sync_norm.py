"""SyncBatchNorm on several CPU contexts of one process equals BatchNorm on the concatenated
batch (numpy reference and gluon BatchNorm): outputs, input gradients, gamma/beta gradients."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon, nd

import pbn_gluon
import reference
from test_progressive_norm import BETA, C, EPS, GAMMA, batches, batchnorm_result, build, step


@pytest.mark.timeout(180)
@pytest.mark.parametrize('devices,hybridize', [(2, False), (8, True)])
def test_syncbn_equals_batchnorm_on_concatenated_batch(devices, hybridize):
    ctxs = [mx.cpu(i) for i in range(devices)]
    layer = build(pbn_gluon.SyncBatchNorm(in_channels=C), ctxs, hybridize)
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    sizes = [2, 1, 3, 2, 1, 2, 3, 1][:devices]
    bn = build(gluon.nn.BatchNorm(in_channels=C), [mx.cpu()], hybridize)
    for t in range(2):
        xs, dys = batches(sizes, t)
        ys, dxs = step(layer, xs, dys, ctxs, sync)
        y_ref, dx_ref, dgamma, dbeta = reference.batchnorm(
            np.concatenate(xs), GAMMA, BETA, EPS, np.concatenate(dys))
        np.testing.assert_allclose(np.concatenate(ys), y_ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.concatenate(dxs), dx_ref, rtol=1e-3, atol=1e-4)
        # each device holds its part of the parameter gradient; the Trainer sums them
        np.testing.assert_allclose(sum(layer.gamma.grad(c).asnumpy() for c in ctxs), dgamma,
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(sum(layer.beta.grad(c).asnumpy() for c in ctxs), dbeta,
                                   rtol=1e-4, atol=1e-4)
        step(bn, [np.concatenate(xs)], [np.concatenate(dys)], [mx.cpu()])
        for c in ctxs:  # running statistics: those of BatchNorm on the whole batch
            np.testing.assert_allclose(layer.running_mean.data(c).asnumpy(),
                                       bn.running_mean.data().asnumpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(layer.running_var.data(c).asnumpy(),
                                       bn.running_var.data().asnumpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(180)
@pytest.mark.parametrize('devices,hybridize', [(2, False), (4, True)])
def test_syncbn_with_deferred_channels_equals_batchnorm(devices, hybridize):
    """No in_channels: the channels are learnt at the first forward (the exchange's state
    included), then the layer is BatchNorm on the concatenated batch."""
    ctxs = [mx.cpu(i) for i in range(devices)]
    layer = pbn_gluon.SyncBatchNorm()
    layer.initialize(ctx=ctxs)
    if hybridize:
        layer.hybridize(static_alloc=True)
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    xs, dys = batches([2, 1, 3, 2][:devices], 0)
    ys, dxs = step(layer, xs, dys, ctxs, sync)
    ones, zeros = np.ones(C, dtype=np.float32), np.zeros(C, dtype=np.float32)
    y_ref, dx_ref, _, _ = reference.batchnorm(np.concatenate(xs), ones, zeros, EPS,
                                              np.concatenate(dys))
    np.testing.assert_allclose(np.concatenate(ys), y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.concatenate(dxs), dx_ref, rtol=1e-3, atol=1e-4)
    assert layer.gamma.shape == (C,)


def test_syncbn_without_statssync_fails_clearly(capfd):
    """The layer's forward fails (MXNet reports a failed custom operator and prints the Python
    error, which names what to do)."""
    layer = build(pbn_gluon.SyncBatchNorm(in_channels=C), [mx.cpu()], False)
    x = nd.array(batches([2], 0)[0][0])
    with pytest.raises(mx.base.MXNetError, match='kCustomOpForward'):
        with autograd.record():
            y = layer(x)
        y.wait_to_read()
    assert 'has no exchange: create pbn_gluon.StatsSync' in capfd.readouterr().out


@pytest.mark.timeout(180)
@pytest.mark.parametrize('mean,std', [(1e4, 1.0), (1e3, 0.1)])
@pytest.mark.parametrize('devices', [1, 2, 4])
def test_syncbn_far_from_zero_within_batchnorm_error(devices, mean, std):
    """|mean| / std = 1e4: y, dx, dgamma and dbeta against float64 numpy; then inference is
    nn.BatchNorm's. Several CPU contexts run MXNet's own operators, which subtract the mean
    first and take its float32 rounding into beta: each error is a few float32 roundings of
    the result's size (< 1e-5, measured ~1e-7), whatever |mean| / std. Written for BatchNorm's
    inference operator, (x - running_mean) scale' + beta', dgamma and dx were float32
    differences of terms |mean - running_mean| / std times larger (2-8x nn.BatchNorm's own
    error in three of the four cases, 1e-2 of max |dgamma|). One context runs the fused
    operators and the custom exchange operator, the path of KVStore and Horovod jobs, whose
    backward works from the float32 mean (test_fused_ops): within nn.BatchNorm's own error on
    the concatenated batch (measured 0.02x), plus 2 float32 ulps for dbeta, a plain sum."""
    ctxs = [mx.cpu(i) for i in range(devices)]
    layer = build(pbn_gluon.SyncBatchNorm(in_channels=C), ctxs, True)
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    rng = np.random.RandomState(7)
    xs = [(mean + std * rng.normal(size=(n, C, 16, 16))).astype(np.float32)
          for n in [2, 1, 3, 2][:devices]]
    dys = [rng.normal(size=x.shape).astype(np.float32) for x in xs]
    ys, dxs = step(layer, xs, dys, ctxs, sync)
    x, dy = np.concatenate(xs), np.concatenate(dys)
    want = reference.batchnorm(x, GAMMA, BETA, EPS, dy)
    got = (np.concatenate(ys), np.concatenate(dxs),
           sum(layer.gamma.grad(c).asnumpy().astype(np.float64) for c in ctxs),
           sum(layer.beta.grad(c).asnumpy().astype(np.float64) for c in ctxs))
    bn = batchnorm_result(x, dy)
    for name, g, b, w in zip(('y', 'dx', 'dgamma', 'dbeta'), got, bn, want):
        err, bn_err, size = np.abs(g - w).max(), np.abs(b - w).max(), np.abs(w).max()
        bound = 1e-5 * size if devices > 1 else bn_err + 2 ** -22 * size
        assert err <= bound, '%s: error %.3g of max %.3g, nn.BatchNorm %.3g' % (
            name, err / size, size, bn_err / size)
    # inference: the running statistics, as nn.BatchNorm's after the same step
    x_eval = xs[0][:1]
    bn = build(gluon.nn.BatchNorm(in_channels=C), [mx.cpu()], False)
    step(bn, [x], [dy], [mx.cpu()])
    np.testing.assert_allclose(layer(nd.array(x_eval, ctx=ctxs[0])).asnumpy(),
                               bn(nd.array(x_eval)).asnumpy(), rtol=1e-4, atol=1e-3)
