"""pbn_gluon.Trainer: the GluonCV loop with no line of its own trains PBN and SyncBN exactly as
the explicit StatsSync loop does, and as the independent references (the numpy spec for PBN,
nn.BatchNorm on the concatenated batch for SyncBN); comm=None picks LocalComm in one process
(Horovod and KVStore across processes: test_multiprocess)."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon, nd

import pbn_gluon
import reference
from test_progressive_norm import BETA, C, EPS, GAMMA, batches, build, step


def train_step(layer, xs, dys, ctxs, trainer, sync=None):
    """test_progressive_norm.step (forward and backward of `layer` alone, the exchange), then
    the update; returns outputs, input gradients and gamma/beta gradients summed over devices
    (read before the update)."""
    ys, dxs = step(layer, xs, dys, ctxs, sync)
    grads = [sum(getattr(layer, n).grad(c).asnumpy() for c in ctxs) for n in ('gamma', 'beta')]
    trainer.step(1)
    return ys, dxs, grads


def pbn_layer(ctxs, w=0.5):
    return build(pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C, local_weight=w),
                 ctxs, hybridize=True)


@pytest.mark.parametrize('devices,cast', [(2, False), (4, False), (2, True)])
def test_pbn_trainer_equals_explicit_loop_and_numpy_spec(devices, cast):
    """Two steps (lr 0: the spec's step 1 reads step 0's group moments with gamma, beta fixed):
    the Trainer's outputs, gradients and running statistics are the explicit loop's, bit for
    bit, and the numpy reference's. cast: model.cast('float32') as GluonCV's scripts do, which
    leaves the float64 exchange state as it is."""
    ctxs = [mx.cpu(i) for i in range(devices)]
    sizes = [2, 1, 3, 2][:devices]
    runs = []
    for explicit in (False, True):
        layer = pbn_layer(ctxs)
        if cast:
            layer.cast('float32')
        if explicit:
            sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
            trainer = gluon.Trainer(layer.collect_params(), 'sgd', {'learning_rate': 0.0})
        else:
            sync = None
            trainer = pbn_gluon.Trainer(layer.collect_params(), 'sgd', {'learning_rate': 0.0})
            assert isinstance(trainer.stats.comm, pbn_gluon.LocalComm)
            assert trainer.stats.comm.contexts == ctxs and trainer.stats.layers == [layer]
        steps = [train_step(layer, *batches(sizes, t), ctxs, trainer, sync) for t in range(2)]
        stats = [layer.running_mean.data(c).asnumpy() for c in ctxs] + \
            [layer.running_var.data(c).asnumpy() for c in ctxs]
        runs.append((steps, stats))
    (steps_t, stats_t), (steps_e, stats_e) = runs
    for (ys_t, dxs_t, grads_t), (ys_e, dxs_e, grads_e) in zip(steps_t, steps_e):
        for a, b in zip(ys_t + dxs_t + grads_t + stats_t, ys_e + dxs_e + grads_e + stats_e):
            np.testing.assert_array_equal(a, b)

    (x0, _), (x1, dy1) = batches(sizes, 0), batches(sizes, 1)
    g_mean, g_square = reference.group_moments(x0)
    ys, dxs, _ = steps_t[1]
    for k in range(devices):
        y, dx, _, _ = reference.pbn_device(x1[k], g_mean, g_square, 0.5, GAMMA, BETA, EPS, dy1[k])
        np.testing.assert_allclose(ys[k], y, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dxs[k], dx, rtol=1e-3, atol=1e-4)
    running_mean, running_var = np.zeros(C), np.ones(C)
    for xs in (x0, x1):
        mean, square = reference.group_moments(xs)
        running_mean = 0.9 * running_mean + 0.1 * mean
        running_var = 0.9 * running_var + 0.1 * (square - mean ** 2)
    for k in range(devices):
        np.testing.assert_allclose(stats_t[k], running_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats_t[devices + k], running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(180)
@pytest.mark.parametrize('devices,cast', [(2, False), (4, False), (2, True)])
def test_syncbn_trainer_equals_batchnorm_on_concatenated_batch(devices, cast):
    """Three SGD steps: SyncBN with pbn_gluon.Trainer on `devices` contexts and nn.BatchNorm
    with gluon.Trainer on the whole batch give the same outputs, input gradients, updated
    gamma and beta, and running statistics. cast: model.cast('float32') before the layer is
    initialized (GluonCV's order)."""
    ctxs = [mx.cpu(i) for i in range(devices)]
    sizes = [2, 1, 3, 2][:devices]
    sync_layer = pbn_gluon.SyncBatchNorm(in_channels=C)
    if cast:
        sync_layer.cast('float32')
    sync_layer = build(sync_layer, ctxs, hybridize=True)
    sync_trainer = pbn_gluon.Trainer(sync_layer.collect_params(), 'sgd', {'learning_rate': 0.1})
    bn = build(gluon.nn.BatchNorm(in_channels=C), [mx.cpu()], hybridize=True)
    bn_trainer = gluon.Trainer(bn.collect_params(), 'sgd', {'learning_rate': 0.1})
    for t in range(3):
        xs, dys = batches(sizes, t)
        ys, dxs, grads = train_step(sync_layer, xs, dys, ctxs, sync_trainer)
        y_bn, dx_bn, grads_bn = train_step(bn, [np.concatenate(xs)], [np.concatenate(dys)],
                                           [mx.cpu()], bn_trainer)
        np.testing.assert_allclose(np.concatenate(ys), y_bn[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.concatenate(dxs), dx_bn[0], rtol=1e-3, atol=1e-4)
        for g, g_bn in zip(grads, grads_bn):
            np.testing.assert_allclose(g, g_bn, rtol=1e-4, atol=1e-4)
        for name in ('gamma', 'beta', 'running_mean', 'running_var'):
            for c in ctxs:
                np.testing.assert_allclose(getattr(sync_layer, name).data(c).asnumpy(),
                                           getattr(bn, name).data().asnumpy(), rtol=1e-4,
                                           atol=1e-5, err_msg='%s step %d' % (name, t))


def test_trainer_without_norm_layers_is_a_gluon_trainer():
    net = gluon.nn.Dense(2, in_units=3)
    net.initialize()
    trainer = pbn_gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 0.1})
    assert trainer.stats is None
    with autograd.record():
        loss = net(nd.ones((1, 3))).sum()
    loss.backward()
    before = net.weight.data().asnumpy()
    trainer.step(1)
    np.testing.assert_allclose(net.weight.data().asnumpy(), before - 0.1)


def test_trainer_finds_layers_behind_trainable_parameters_only():
    """A Trainer given only the parameters with gradients (no running statistics, no state)
    still finds every norm layer, in the net's order."""
    ctxs = [mx.cpu(0), mx.cpu(1)]
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(C, 1, in_channels=3), pbn_gluon.ProgressiveBatchNorm(in_channels=C),
            gluon.nn.Conv2D(C, 1, in_channels=C), pbn_gluon.SyncBatchNorm(in_channels=C),
            gluon.nn.BatchNorm(in_channels=C))
    net.initialize(ctx=ctxs)
    params = [p for p in net.collect_params().values() if p.grad_req != 'null']
    trainer = pbn_gluon.Trainer(params, 'sgd', {'learning_rate': 0.1})
    assert trainer.stats.layers == [net[1], net[3]]


def test_update_path_exchanges_once():
    """allreduce_grads() + update() exchange once, like step()."""
    ctxs = [mx.cpu(0), mx.cpu(1)]
    layer = pbn_layer(ctxs)
    trainer = pbn_gluon.Trainer(layer.collect_params(), 'sgd', {'learning_rate': 0.0},
                                update_on_kvstore=False)
    for t in range(2):
        xs, dys = batches([2, 2], t)
        inputs = [nd.array(x, ctx=c) for x, c in zip(xs, ctxs)]
        with autograd.record():
            losses = [(layer(x) * nd.array(dy, ctx=x.context)).sum() for x, dy in zip(inputs, dys)]
        autograd.backward(losses)
        trainer.allreduce_grads()
        trainer.update(1)
    assert trainer.stats.step_count == 2
    mean, _ = reference.group_moments(batches([2, 2], 0)[0])
    running = 0.9 * (0.1 * mean) + 0.1 * reference.group_moments(batches([2, 2], 1)[0])[0]
    np.testing.assert_allclose(layer.running_mean.data(ctxs[1]).asnumpy(), running, rtol=1e-5,
                               atol=1e-6)


def _small_net():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(C, 3, padding=1, in_channels=3),
            pbn_gluon.ProgressiveBatchNorm(in_channels=C), gluon.nn.Activation('relu'),
            gluon.nn.GlobalAvgPool2D(), gluon.nn.Flatten(), gluon.nn.Dense(3, in_units=C))
    return net


@pytest.mark.timeout(180)
def test_gluoncv_train_py_loop_equals_plain_loop():
    """What GluonCV's scripts/segmentation/train.py does to a model, with pbn_gluon.Trainer in
    place of gluon.Trainer: model.cast('float32'), DataParallelModel (a thread per device) and
    DataParallelCriterion, the Trainer built from net.module.collect_params() on a kvstore
    object, backward inside record(). Three steps leave the weights and running statistics of
    the plain loop."""
    from gluoncv.utils.parallel import DataParallelCriterion, DataParallelModel
    ctxs = [mx.cpu(0), mx.cpu(1)]
    rng = np.random.RandomState(0)
    batches_ = [(nd.array(rng.normal(1, 2, (4, 3, 6, 6))), nd.array(rng.randint(0, 3, 4)))
                for _ in range(3)]
    options = {'learning_rate': 0.1, 'momentum': 0.9, 'wd': 1e-4}
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    results = []
    for gluoncv_loop in (True, False):
        mx.random.seed(0)
        model = _small_net()
        model.initialize(mx.init.Xavier(), ctx=ctxs)
        if gluoncv_loop:
            model.cast('float32')
            net = DataParallelModel(model, ctxs, False)
            criterion = DataParallelCriterion(loss_fn, ctxs, False)
            trainer = pbn_gluon.Trainer(net.module.collect_params(), 'sgd', options,
                                        kvstore=mx.kv.create('device'))
            for data, target in batches_:
                with autograd.record(True):
                    losses = criterion(net(data), target)
                    mx.nd.waitall()
                    autograd.backward(losses)
                trainer.step(4)
        else:
            trainer = pbn_gluon.Trainer(model.collect_params(), 'sgd', options)
            for data, target in batches_:
                xs = gluon.utils.split_and_load(data, ctxs)
                ys = gluon.utils.split_and_load(target, ctxs)
                with autograd.record():
                    losses = [loss_fn(model(x), y) for x, y in zip(xs, ys)]
                autograd.backward(losses)
                trainer.step(4)
        assert trainer.stats.step_count == 3
        results.append({k: p.data(ctxs[1]).asnumpy()
                        for k, p in model._collect_params_with_prefix().items()})
    assert sorted(results[0]) == sorted(results[1])
    for key in results[0]:
        np.testing.assert_allclose(results[0][key], results[1][key], rtol=1e-5, atol=1e-6,
                                   err_msg=key)
