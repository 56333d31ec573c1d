"""No deadlock: hybridized GluonCV and small nets train on several CPU contexts of one process,
and the replicas stay identical (same weights, same running statistics on every context)."""
import mxnet as mx
import numpy as np
import pytest
from gluoncv.model_zoo import get_model
from mxnet import autograd, gluon, nd

import pbn_gluon


def train(net, ctxs, steps, shape):
    net.hybridize(static_alloc=True)
    trainer = pbn_gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 0.01,
                                                              'momentum': 0.9})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    rng = np.random.RandomState(0)
    xs = [nd.array(rng.normal(size=shape), ctx=c) for c in ctxs]    # a repeated batch
    ys = [nd.array(rng.randint(0, 10, shape[0]), ctx=c) for c in ctxs]
    history = []
    for _ in range(steps):
        with autograd.record():
            losses = [loss_fn(net(x), y) for x, y in zip(xs, ys)]
        autograd.backward(losses)
        trainer.step(shape[0] * len(ctxs))
        history.append(float(sum(l.sum().asscalar() for l in losses)))
    return history


def assert_replicas_identical(net, ctxs):
    for name, param in net.collect_params('.*gamma|.*weight|.*running_mean|.*running_var').items():
        first = param.data(ctxs[0]).asnumpy()
        for c in ctxs[1:]:
            np.testing.assert_allclose(param.data(c).asnumpy(), first, rtol=1e-5, atol=1e-6,
                                       err_msg=name)


@pytest.mark.timeout(300)
def test_resnet18_v1b_pbn_trains_on_four_contexts():
    mx.random.seed(0)
    ctxs = [mx.cpu(i) for i in range(4)]
    net = get_model('resnet18_v1b', classes=10, norm_layer=pbn_gluon.ProgressiveBatchNorm,
                    norm_kwargs={'local_weight': pbn_gluon.schedules.Linear(steps=2)})
    net.initialize(mx.init.Xavier(), ctx=ctxs)
    history = train(net, ctxs, 3, (2, 3, 32, 32))
    assert all(np.isfinite(history))
    assert_replicas_identical(net, ctxs)
    # running statistics come from the exchanged moments: they left their initial values
    assert not np.allclose(net.bn1.running_mean.data(ctxs[0]).asnumpy(), 0)


@pytest.mark.timeout(300)
def test_resnet18_v1b_syncbn_trains_on_eight_contexts():
    mx.random.seed(0)
    ctxs = [mx.cpu(i) for i in range(8)]
    net = get_model('resnet18_v1b', classes=10, norm_layer=pbn_gluon.SyncBatchNorm)
    net.initialize(mx.init.Xavier(), ctx=ctxs)
    history = train(net, ctxs, 3, (1, 3, 32, 32))
    assert all(np.isfinite(history))
    assert_replicas_identical(net, ctxs)
    assert history[-1] < history[0]     # exact SyncBN learns the repeated batch
