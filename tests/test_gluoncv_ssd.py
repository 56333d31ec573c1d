"""GluonCV's SSD with PBN: its backbone is a SymbolBlock (gluoncv.nn.feature.FeatureExpander)
traced from the backbone's layers, which types every parameter float32 and keeps the
parameters, not the layers. Built with ``norm_layer=``, as train_ssd.py would build it, the
smallest zoo SSD trains on 2 CPU contexts with pbn_gluon.Trainer, its exchange state stays
float64, and the first PBN layer's running statistics are those of the exchanged moments of
its input, computed here from the images and the stem convolution's weights."""
import warnings

import gluoncv
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

import pbn_gluon
import reference

NAME = 'ssd_300_mobilenet0.25_voc'      # the smallest SSD of the zoo
SIZE = 128                              # input side: the anchors are cut to the feature maps
BATCH = 2                               # images per device
MOMENTUM = 0.9                          # the layers' running-statistics momentum


def get_ssd(**kwargs):
    with warnings.catch_warnings():     # SymbolBlock: "Cannot decide type ... data: None"
        warnings.simplefilter('ignore', UserWarning)
        return gluoncv.model_zoo.get_model(NAME, pretrained=False, pretrained_base=False,
                                           **kwargs)


def stem_output(x, weight):
    """The first norm layer's input: mobilenet's stem, a 3x3 convolution of stride 2, padding
    1, no bias (gluoncv.model_zoo.mobilenet)."""
    return mx.nd.Convolution(x, weight, kernel=(3, 3), stride=(2, 2), pad=(1, 1),
                             num_filter=weight.shape[0], no_bias=True).asnumpy()


def batch(step, ctx):
    """Images for `ctx` at `step`, and the random state its targets are drawn from."""
    rng = np.random.RandomState(10 * step + ctx.device_id)
    return mx.nd.array(rng.uniform(-1, 1, (BATCH, 3, SIZE, SIZE)), ctx=ctx), rng


@pytest.mark.timeout(300)
def test_ssd_trains_with_pbn_on_two_contexts():
    ctxs = [mx.cpu(0), mx.cpu(1)]
    # global_momentum 0: the running statistics follow each step's exchanged sums alone
    net = get_ssd(norm_layer=pbn_gluon.ProgressiveBatchNorm,
                  norm_kwargs={'global_momentum': 0.0})
    net.initialize(ctx=ctxs)
    net.collect_params().reset_ctx(ctxs)
    net.hybridize(static_alloc=True, static_shape=True)       # as train_ssd.py
    trainer = pbn_gluon.Trainer(net.collect_params(), 'sgd',
                                {'learning_rate': 0.01, 'wd': 5e-4, 'momentum': 0.9})
    layers = trainer.stats.layers
    assert len(layers) == 27 and all(isinstance(l, pbn_gluon.ProgressiveBatchNorm)
                                     for l in layers)
    assert pbn_gluon.find_norm_layers(net) == layers      # the explicit API finds them too
    stem = next(p for name, p in net.collect_params().items() if name.endswith('conv0_weight'))
    mbox_loss = gluoncv.loss.SSDMultiBoxLoss()

    expected_mean, expected_var = np.zeros(8), np.ones(8)
    for step in range(2):
        xs, targets = zip(*[batch(step, ctx) for ctx in ctxs])
        with autograd.record():
            cls_preds, box_preds, anchors = zip(*[net(x) for x in xs])
            cls_t = [mx.nd.array(rng.randint(0, len(net.classes) + 1, cp.shape[:2]), ctx=cp.context)
                     for rng, cp in zip(targets, cls_preds)]
            box_t = [mx.nd.array(rng.normal(0, 1, bp.shape), ctx=bp.context)
                     for rng, bp in zip(targets, box_preds)]
            losses, _, _ = mbox_loss(cls_preds, box_preds, cls_t, box_t)
        autograd.backward(losses)
        # the weights this step read (initialized at its forward, updated by trainer.step)
        mean, square = reference.group_moments([stem_output(x, stem.data(x.context))
                                                for x in xs])
        trainer.step(BATCH * len(ctxs))
        if step == 0:   # the state now lives in StatsSync's buffers: the graph is rebuilt
            assert net._cached_op is None
        assert all(np.isfinite(l.asnumpy()).all() for l in losses)
        expected_mean = MOMENTUM * expected_mean + (1 - MOMENTUM) * mean
        expected_var = MOMENTUM * expected_var + (1 - MOMENTUM) * (square - mean ** 2)

    first = layers[0]
    assert first.gamma.shape == (8,)
    for ctx in ctxs:
        np.testing.assert_allclose(first.running_mean.data(ctx).asnumpy(), expected_mean,
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(first.running_var.data(ctx).asnumpy(), expected_var,
                                   rtol=1e-4, atol=1e-6)
    for layer in layers:
        means = [layer.running_mean.data(c).asnumpy() for c in ctxs]
        variances = [layer.running_var.data(c).asnumpy() for c in ctxs]
        assert np.isfinite(means + variances).all()
        assert np.abs(means[0]).max() > 0 and np.abs(variances[0] - 1).max() > 0, layer.name
        # the exchanged moments: the same on both devices (per-device BatchNorm's differ)
        np.testing.assert_array_equal(means[0], means[1])
        np.testing.assert_array_equal(variances[0], variances[1])
        assert layer.global_sums.data(ctxs[0]).dtype == np.float64


def test_convert_norm_on_an_ssd_names_norm_layer():
    """convert_norm cannot reach the BatchNorm operators inside the SSD's SymbolBlock: it says
    to build the model with norm_layer= (before: it converted nothing, and StatsSync advised
    the convert_norm just called)."""
    net = get_ssd()
    with pytest.raises(ValueError, match='SymbolBlock.*norm_layer=ProgressiveBatchNorm'):
        pbn_gluon.convert_norm(net, pbn_gluon.ProgressiveBatchNorm)
    with pytest.raises(ValueError, match='build it with norm_layer='):
        pbn_gluon.StatsSync(net, pbn_gluon.LocalComm([mx.cpu()]))
