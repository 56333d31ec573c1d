"""Faults that a long multi-device job meets: a non-finite batch on one device. (Dead workers,
killed runs and mismatched nets: test_errors.py, test_multiprocess.py and
test_segmentation_train.py; the fault matrix is in the README.)"""
import warnings

import mxnet as mx
import numpy as np
import pytest

import pbn_gluon
import reference
from test_progressive_norm import BETA, C, EPS, GAMMA, batches, build, step


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
    layer = build(pbn_gluon.ProgressiveBatchNorm(in_channels=C, local_weight=w,
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
    layer = build(pbn_gluon.ProgressiveBatchNorm(in_channels=C, local_weight=0.5), ctxs, False)
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    with warnings.catch_warnings():
        warnings.simplefilter('error', RuntimeWarning)
        for t in range(3):
            step(layer, *batches([2, 3], t), ctxs, sync)
        assert sync.nonfinite_steps == 0
