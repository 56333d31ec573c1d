"""A training loop that exchanges the statistics at the wrong point says so in one line, with
pbn_gluon.Trainer and with the explicit StatsSync API: training forwards with no exchange in
between warn once (naming the layer and the fix), inference with running statistics never
updated warns, an exchange with no training forward since the last one raises at once (SyncBN
used to wait PBN_GLUON_TIMEOUT) and the next iteration trains exactly, and an exchange before
the backward raises."""
import warnings

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon, nd

import pbn_gluon
import reference
from pbn_gluon import batch_stats
from test_progressive_norm import BETA, C, EPS, GAMMA, batches, build

CTXS = [mx.cpu(0), mx.cpu(1)]
SIZES = [2, 3]


@pytest.fixture(autouse=True)
def fresh_warnings():
    batch_stats.WARNED.clear()
    yield
    batch_stats.WARNED.clear()


def make(norm, api):
    """A hybridized layer on CTXS, and (trainer, sync): sync is None with the Trainer."""
    layer = build(pbn_gluon.ProgressiveBatchNorm(in_channels=C) if norm == 'pbn'
                  else pbn_gluon.SyncBatchNorm(in_channels=C), CTXS, hybridize=True)
    if api == 'trainer':
        return layer, pbn_gluon.Trainer(layer.collect_params(), 'sgd', {'learning_rate': 0.0}), None
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(CTXS)) if api == 'explicit' else None
    return layer, gluon.Trainer(layer.collect_params(), 'sgd', {'learning_rate': 0.0}), sync


def forward_backward(layer, t):
    xs, dys = batches(SIZES, t)
    with autograd.record():
        ys = [layer(nd.array(x, ctx=c)) for x, c in zip(xs, CTXS)]
        losses = [(y * nd.array(dy, ctx=y.context)).sum() for y, dy in zip(ys, dys)]
    autograd.backward(losses)
    return xs


def exchange(trainer, sync):
    if sync is not None:
        sync.step()
    trainer.step(1)


def exchange_only(trainer, sync):
    if sync is not None:
        sync.step()
    else:
        trainer.step(1)


def misuse_warnings(record):
    return [str(w.message) for w in record if 'pbn_gluon.Trainer' in str(w.message)]


@pytest.mark.parametrize('api', ['trainer', 'explicit', 'gluon'])
def test_training_forwards_without_exchange_warn_once(api):
    """Iteration 0 skips the exchange (Trainer: no trainer.step; explicit: no sync.step;
    gluon: a plain gluon.Trainer and no StatsSync at all): one warning naming the layer."""
    layer, trainer, sync = make('pbn', api)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        forward_backward(layer, 0)
        if api == 'explicit':
            trainer.step(1)
        for t in (1, 2):
            forward_backward(layer, t)
            exchange(trainer, sync)
    found = misuse_warnings(record)
    assert len(found) == 1, found
    assert layer.name in found[0] and 'second training forward' in found[0]


@pytest.mark.parametrize('api', ['explicit', 'gluon'])
def test_inference_with_never_updated_running_statistics_warns(api):
    layer, trainer, sync = make('pbn', api)
    forward_backward(layer, 0)
    trainer.step(1)     # sync.step() forgotten, or no StatsSync at all
    with pytest.warns(UserWarning, match='%s: inference with running statistics that were '
                      'never updated' % layer.name) as caught:
        layer(nd.ones((1, C, 2, 2), ctx=CTXS[0]))
    assert sum('never updated' in str(w.message) for w in caught) == 1


def test_inference_after_trainer_steps_does_not_warn():
    layer, trainer, _ = make('pbn', 'trainer')
    forward_backward(layer, 0)
    trainer.step(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        layer(nd.ones((1, C, 2, 2), ctx=CTXS[0])).wait_to_read()
    assert [str(w.message) for w in caught] == []


@pytest.mark.timeout(60)    # no stall: PBN_GLUON_TIMEOUT is 300 s
@pytest.mark.parametrize('api', ['trainer', 'explicit'])
@pytest.mark.parametrize('extra', ['second exchange', 'after an evaluation forward'])
def test_syncbn_exchange_without_training_forward_raises_and_next_iteration_is_exact(api, extra):
    """SyncBN: the extra exchange raises at once; three more iterations then give BatchNorm's
    running statistics on the concatenated batches (each step counted once)."""
    layer, trainer, sync = make('syncbn', api)
    forward_backward(layer, 0)
    exchange(trainer, sync)
    if extra == 'after an evaluation forward':
        layer(nd.ones((1, C, 2, 2), ctx=CTXS[0])).wait_to_read()
    with pytest.raises(RuntimeError, match='no training forward pass of %s since the last'
                       % layer.name):
        exchange_only(trainer, sync)
    for t in (1, 2, 3):
        forward_backward(layer, t)
        exchange(trainer, sync)
    mean, var = np.zeros(C), np.ones(C)
    for t in range(4):
        _, m, q = reference.channel_moments(np.concatenate(batches(SIZES, t)[0]))
        mean, var = 0.9 * mean + 0.1 * m, 0.9 * var + 0.1 * (q - m * m)
    for c in CTXS:
        np.testing.assert_allclose(layer.running_mean.data(c).asnumpy(), mean, rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(layer.running_var.data(c).asnumpy(), var, rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize('api', ['trainer', 'explicit'])
def test_pbn_second_exchange_raises_and_never_updates_twice(api):
    """PBN (default variant): a second exchange raises; the running statistics and the next
    step's output are those of a run without it."""
    results = []
    for misuse in (False, True):
        layer, trainer, sync = make('pbn', api)
        for t in range(3):
            forward_backward(layer, t)
            exchange(trainer, sync)
            if misuse:
                with pytest.raises(RuntimeError, match='no training forward pass'):
                    exchange_only(trainer, sync)
        results.append([layer.running_mean.data(c).asnumpy() for c in CTXS] +
                       [layer.running_var.data(c).asnumpy() for c in CTXS] +
                       [layer(nd.array(batches(SIZES, 5)[0][0], ctx=CTXS[0])).asnumpy()])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('api', ['trainer', 'explicit'])
def test_exchange_inside_record_raises(api):
    layer, trainer, sync = make('pbn', api)
    x = nd.array(batches(SIZES, 0)[0][0], ctx=CTXS[0])
    with autograd.record():
        layer(x)
        with pytest.raises(RuntimeError, match='inside autograd.record'):
            exchange_only(trainer, sync)


def test_trainer_step_before_backward_raises_then_trains():
    """trainer.step() between the forward and the backward of a PBN layer: error naming the
    layer; the backward and step that follow train as if it had not happened."""
    layer, trainer, _ = make('pbn', 'trainer')
    xs, dys = batches(SIZES, 0)
    with autograd.record():
        ys = [layer(nd.array(x, ctx=c)) for x, c in zip(xs, CTXS)]
        losses = [(y * nd.array(dy, ctx=y.context)).sum() for y, dy in zip(ys, dys)]
    with pytest.raises(RuntimeError, match='before the backward pass of %s' % layer.name):
        trainer.step(1)
    autograd.backward(losses)
    trainer.step(1)
    mean, square = reference.group_moments(xs)
    np.testing.assert_allclose(layer.running_mean.data(CTXS[1]).asnumpy(), 0.1 * mean,
                               rtol=1e-5, atol=1e-6)
    assert trainer.stats.step_count == 1
