"""The fused operators (pbn_gluon/csrc) against independent numpy references, and the layer
graphs built on them: operator counts, inputs without gradient, running statistics."""
import json

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon, nd

import pbn_gluon
import reference
from pbn_gluon import op_contract, ops
from test_progressive_norm import BETA, C, EPS, GAMMA, batches, batchnorm_result, build, step


def run_op(x, group, w, dy, training=True, local_stats=True, axis=1, running=None):
    """One forward + backward of pbn_batch_norm; returns y, dx, dgamma, dbeta, dgroup, and the
    batch sums it wrote (as many rows as `group`: a 5-row buffer also gets [sum dy, sum dy
    xhat] from the backward). Group and batch sums are float64."""
    c = x.shape[axis]
    rows = len(group)
    running = running or (np.zeros(c), np.ones(c))
    data, gamma, beta = nd.array(x), nd.array(GAMMA[:c]), nd.array(BETA[:c])
    group_sums = nd.array(group, dtype='float64')
    batch_sums = nd.zeros(rows * c, dtype='float64')
    for a in (data, gamma, beta, group_sums):
        a.attach_grad()
    inputs = op_contract.inputs(
        'pbn_batch_norm', data=data, gamma=gamma, beta=beta, running_mean=nd.array(running[0]),
        running_var=nd.array(running[1]), group_sums=group_sums, local_weight=nd.array([w]),
        is_inference=nd.array([op_contract.mode_value(training)]), batch_sums=batch_sums)
    with autograd.record():
        y = nd.pbn_batch_norm(*inputs, axis=axis, eps=EPS, local_stats=local_stats)[0]
    y.backward(nd.array(dy))
    return (y.asnumpy(), data.grad.asnumpy(), gamma.grad.asnumpy(), beta.grad.asnumpy(),
            group_sums.grad.asnumpy(), batch_sums.asnumpy().reshape(rows, c))


def test_library_reports_the_python_contract():
    """The loaded library's operators take their inputs in op_contract's order (checked at
    load too; pbn_ops.h's X-macro lists are the C++ side)."""
    assert ops.reported_contract(ops.load()) == op_contract.INPUTS


def test_a_contract_mismatch_names_every_difference():
    swapped = dict(op_contract.INPUTS)
    names = list(swapped['pbn_batch_norm'])
    names[6], names[7] = names[7], names[6]
    swapped['pbn_batch_norm'] = tuple(names)
    del swapped['pbn_take_sums']
    swapped['pbn_extra'] = ('data',)
    with pytest.raises(ops.ContractError) as info:
        ops.check_contract(swapped, 'libtest.so')
    message = str(info.value)
    assert 'libtest.so' in message and 'op_contract' in message
    assert ('pbn_batch_norm: the library takes (%s), pbn_gluon.op_contract says (%s)'
            % (', '.join(names), ', '.join(op_contract.INPUTS['pbn_batch_norm']))) in message
    assert 'pbn_take_sums: not in the library' in message
    assert 'pbn_extra: in the library but not in pbn_gluon.op_contract' in message
    ops.check_contract(dict(op_contract.INPUTS))     # agreement: no error


def test_a_library_without_the_report_is_a_contract_error():
    with pytest.raises(ops.ContractError, match='not built from these sources'):
        ops.reported_contract(mx.base._LIB._name)    # libmxnet itself: no pbn_operator_inputs


def test_contract_report_parsing():
    """The library's report is 'op=a,b,;op2=c,;' (the C++ lists leave trailing commas)."""
    assert op_contract.parse_reported('a=x,y,;b=z,;') == {'a': ('x', 'y'), 'b': ('z',)}
    assert op_contract.parse_reported('') == {}
    with pytest.raises(ValueError):
        op_contract.parse_reported('a=x;b')


def test_inputs_are_built_by_name():
    assert op_contract.inputs('pbn_take_sums', local=1) == [1]
    assert op_contract.inputs('pbn_running_update', running_var=5, stats=3, gather=1,
                              momentum=2, running_mean=4) == [1, 2, 3, 4, 5]
    with pytest.raises(TypeError, match='missing local; unknown lokal'):
        op_contract.inputs('pbn_take_sums', lokal=1)
    assert op_contract.mode_value(True) == op_contract.TRAINING == 0.0
    assert op_contract.mode_value(False) == op_contract.INFERENCE == 1.0


def group_sums_of(xs, dys=None, rows=3):
    """[sum x, sum x^2, n (, sum dy, sum dy xhat)] over devices, xhat with each device's BN."""
    sums = np.zeros((rows, C))
    for k, x in enumerate(xs):
        n, m, q = reference.channel_moments(x)
        sums[:3] += [n * m, n * q, np.full(C, n)]
        if rows == 5:
            _, _, dgamma, dbeta = reference.batchnorm(x, GAMMA, BETA, EPS, dys[k])
            sums[3:] += [dbeta, dgamma]
    return sums


@pytest.mark.parametrize('rows', [3, 5])
@pytest.mark.parametrize('w', [0.0, 0.3, 1.0])
def test_operator_matches_numpy_spec(rows, w):
    """Forward, dx, dgamma, dbeta and the written local sums for 3-row (the spec) and 5-row
    (progressive backward) group sums, against reference.pbn_from_group_sums; with 5 rows the
    backward also writes this device's [sum dy, sum dy xhat] (= dbeta, dgamma)."""
    xs, dys = batches([2, 3, 1], 0)
    group = group_sums_of(xs, dys, rows)
    x, dy = batches([3], 1)[0][0], batches([3], 1)[1][0]
    y, dx, dgamma, dbeta, _, sums = run_op(x, group, w, dy)
    want = reference.pbn_from_group_sums(x, group, w, GAMMA, BETA, EPS, dy)
    for got, ref in zip((y, dx, dgamma, dbeta), want):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    n, m, q = reference.channel_moments(x)
    np.testing.assert_allclose(sums[:3], [n * m, n * q, np.full(C, n)], rtol=1e-5)
    if rows == 5:
        np.testing.assert_allclose(sums[3:], [want[3], want[2]], rtol=1e-4, atol=1e-4)


def test_operator_without_group_data_is_batchnorm():
    """Empty group sums (the first step): the local weight is taken as 1, whatever it says."""
    x, dy = batches([2], 4)[0][0], batches([2], 4)[1][0]
    got = run_op(x, np.zeros((3, C)), 0.25, dy)[:4]
    for g, ref in zip(got, reference.batchnorm(x, GAMMA, BETA, EPS, dy)):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-4)


def test_operator_inference_uses_running_statistics_and_writes_nothing():
    x, dy = batches([2], 5)[0][0], batches([2], 5)[1][0]
    rm, rv = np.linspace(-1, 1, C), np.linspace(0.5, 3, C)
    y, dx, _, _, dgroup, sums = run_op(x, np.ones((3, C)), 0.5, dy, training=False,
                                       running=(rm, rv))
    shape = (1, -1, 1, 1)
    r = 1 / np.sqrt(rv + EPS)
    np.testing.assert_allclose(y, GAMMA.reshape(shape) * (x - rm.reshape(shape))
                               * r.reshape(shape) + BETA.reshape(shape), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, (GAMMA * r).reshape(shape) * dy, rtol=1e-5, atol=1e-6)
    assert not sums.any() and not dgroup.any()


def test_group_sum_gradient_matches_finite_differences():
    """Sync mode (SyncBN's normalise step): d loss / d group sums rows 0 and 1, numerically."""
    rng = np.random.RandomState(1)
    x = rng.normal(1.0, 2.0, (2, C, 3, 2)).astype(np.float32)
    dy = rng.normal(0, 1, x.shape)
    n, m, q = reference.channel_moments(x)
    group = np.stack([3 * n * m + 2.0, 3 * n * q + 40.0, np.full(C, 3.0 * n)])
    dgroup = run_op(x, group, 0.0, dy, local_stats=False)[4]

    def loss(g):
        mean, square = g[0] / g[2], g[1] / g[2]
        y = reference.normalize(x, mean, square - mean ** 2, GAMMA, BETA, EPS, dy, 0.0)[0]
        return (y * dy).sum()
    for row in (0, 1):
        for c in range(C):
            e = np.zeros_like(group)
            e[row, c] = 1e-3 * abs(group[row, c])
            numeric = (loss(group + e) - loss(group - e)) / (2 * e[row, c])
            assert dgroup[row, c] == pytest.approx(numeric, rel=2e-3, abs=1e-6)
    assert not dgroup[2].any()


def test_sums_are_exact_far_from_zero():
    """Large |mean| / std: the per-channel shift keeps the variance (float32 E[x^2] - m^2
    would lose it), in the operator and in pbn_batch_sums."""
    rng = np.random.RandomState(2)
    x = (1e4 + rng.normal(0, 1, (4, C, 16, 16))).astype(np.float32)
    dy = rng.normal(0, 1, x.shape).astype(np.float32)
    y = run_op(x, np.zeros((3, C)), 1.0, dy)[0]
    want = reference.batchnorm(x, GAMMA, BETA, EPS, dy)[0]
    np.testing.assert_allclose(y, want, rtol=1e-3, atol=2e-3)
    sums = nd.pbn_batch_sums(nd.array(x)).asnumpy()
    n, m, q = reference.channel_moments(x)
    np.testing.assert_allclose(sums, [n * m, n * q, np.full(C, n)], rtol=1e-6)


def _batchnorm_errors(x, dy, want):
    """nn.BatchNorm's own max errors (y, dx, dgamma, dbeta) against `want`, on the same data."""
    return [np.abs(g - w).max() for g, w in zip(batchnorm_result(x, dy), want)]


def test_constant_channel_is_beta():
    """A constant channel has x - mu = 0: y is exactly beta, as nn.BatchNorm's (the float32
    form (gamma r) x + (beta - mu gamma r) gave beta + 2e-2 at x = 1000), and dx is
    gamma r (dy - mean dy)."""
    x = np.empty((2, C, 4, 4), np.float32)
    x[:] = np.array([1000.0, -3e4, 7.25, 1e6])[None, :C, None, None]
    dy = np.random.RandomState(5).normal(0, 1, x.shape).astype(np.float32)
    y, dx, dgamma, dbeta, _, _ = run_op(x, np.zeros((3, C)), 1.0, dy)
    np.testing.assert_array_equal(y, np.broadcast_to(BETA.astype(np.float32)[None, :, None, None],
                                                     x.shape))
    want = reference.batchnorm(x, GAMMA, BETA, EPS, dy)
    np.testing.assert_allclose(dx, want[1], rtol=1e-5, atol=1e-5 * np.abs(want[1]).max())
    np.testing.assert_allclose(dbeta, want[3], rtol=1e-5)
    assert not dgamma.any()


@pytest.mark.parametrize('mean,std', [(1e4, 1.0), (1e3, 1e-1), (-1e5, 10.0)])
def test_far_from_zero_has_no_cancellation(mean, std):
    """|mean| / std = 1e4, w = 1, against float64 numpy. y is a few float32 roundings of its own
    size (error < 1e-5 max |y|) whatever |mean| / std, because the mean is subtracted first
    (x - m is exact near m); the form (gamma r) x + (beta - mu gamma r) lost |mean| / std ulps
    (4e-4 of max |y| at 1e4). The backward works from the float32 mean m the forward hands on
    (|m - mean| up to |mean| 2^-24, 5e-4 std here, as nn.BatchNorm's own mean): its dx, dgamma
    and dbeta errors stay within nn.BatchNorm's on the same data (measured 8-10x below)."""
    rng = np.random.RandomState(3)
    x = (mean + std * rng.normal(size=(4, C, 8, 8))).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    want = reference.batchnorm(x, GAMMA, BETA, EPS, dy)
    got = run_op(x, np.zeros((3, C)), 1.0, dy)[:4]
    err = [np.abs(g - w).max() for g, w in zip(got, want)]
    bn = _batchnorm_errors(x, dy, want)
    scale = np.abs(want[0]).max()
    assert err[0] <= 1e-5 * scale, 'y: error %.3g of max |y| (nn.BatchNorm %.3g)' % (
        err[0] / scale, bn[0] / scale)
    for k, name in ((1, 'dx'), (2, 'dgamma'), (3, 'dbeta')):
        assert err[k] <= bn[k], '%s: error %.3g, nn.BatchNorm %.3g' % (name, err[k], bn[k])


def test_batch_sums_gradient():
    """pbn_batch_sums backward: dx = dS0 + 2 x dS1 (the count row has no gradient)."""
    x = batches([2], 6)[0][0]
    dsums = np.random.RandomState(3).normal(0, 1, (3, C))
    a = nd.array(x)
    a.attach_grad()
    with autograd.record():
        s = nd.pbn_batch_sums(a)
    s.backward(nd.array(dsums, dtype='float64'))
    shape = (1, -1, 1, 1)
    np.testing.assert_allclose(a.grad.asnumpy(), dsums[0].reshape(shape)
                               + 2 * x * dsums[1].reshape(shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('op,attrs,error', [
    ('pbn_batch_norm', dict(axis=1, local_stat=0),
     "pbn_batch_norm: unknown attribute 'local_stat' (it takes axis, local_stats, fix_gamma, eps)"),
    ('pbn_batch_sums', dict(eps=1e-3), "pbn_batch_sums: unknown attribute 'eps' (it takes axis)"),
    ('pbn_take_sums', dict(axis=1), "pbn_take_sums: unknown attribute 'axis' (it takes no "
                                    "attributes)"),
    ('pbn_batch_norm', dict(eps='small'), "pbn_batch_norm: attribute eps='small' is not a number"),
    ('pbn_batch_sums', dict(axis=1.5), "pbn_batch_sums: attribute axis='1.5' is not a number")])
def test_an_unknown_or_malformed_attribute_is_an_error_naming_it(op, attrs, error):
    """Each operator family takes its own attributes (pbn_ops.h); a typo is not ignored."""
    x = nd.ones((2, 3, 4))
    data = {'pbn_batch_sums': [x], 'pbn_take_sums': [nd.zeros(9, dtype='float64')],
            'pbn_batch_norm': op_contract.inputs(
                'pbn_batch_norm', data=x, gamma=nd.ones(3), beta=nd.zeros(3),
                running_mean=nd.zeros(3), running_var=nd.ones(3),
                group_sums=nd.zeros((3, 3), dtype='float64'), local_weight=nd.ones(1),
                is_inference=nd.array([op_contract.mode_value(True)]),
                batch_sums=nd.zeros(9, dtype='float64'))}[op]
    with pytest.raises(mx.base.MXNetError) as info:
        getattr(nd, op)(*data, **attrs)[0].wait_to_read()
    assert error in str(info.value)
    getattr(nd, op)(*data)[0].wait_to_read()      # the defaults are accepted


@pytest.mark.parametrize('norm,expected', [
    (pbn_gluon.ProgressiveBatchNorm, ['_copy', '_copy', 'ones_like', 'BatchNorm', 'BlockGrad',
                                      'pbn_batch_norm']),
    (pbn_gluon.SyncBatchNorm, ['_copy', '_copy', 'pbn_batch_sums', 'Custom', 'zeros_like',
                               'pbn_batch_norm'])])
def test_layer_forward_graph_is_a_few_operators(norm, expected):
    """Counted from the symbol JSON of a layer inside a graph (nn.BatchNorm is 1): identities
    (_copy) in front of gamma and beta, whose gradients they accumulate under grad_req 'add';
    PBN's one-element mode flag (BatchNorm of a constant); SyncBN's local weight 0 (zeros_like
    of its one-element mode flag); one fused operator. A layer whose
    input is a graph input also copies x (a gradient of its own to accumulate)."""
    x = mx.sym.relu(mx.sym.var('data'))
    out = norm(in_channels=4)(x)
    ops = [node['op'] for node in json.loads(out.tojson())['nodes'] if node['op'] != 'null']
    assert sorted(ops[1:]) == sorted(expected), ops
    leaf = norm(in_channels=4)(mx.sym.var('data'))
    ops = [node['op'] for node in json.loads(leaf.tojson())['nodes'] if node['op'] != 'null']
    assert sorted(ops) == sorted(expected + ['_copy']), ops


@pytest.mark.parametrize('hybridize', [False, True])
def test_inputs_without_gradient_still_exchange_their_moments(hybridize):
    """A PBN layer whose input needs no gradient (first layer on raw data, frozen layers
    before it) still hands its moments to StatsSync: step 1 normalises with step 0's group
    moments and the running statistics follow them (against numpy)."""
    ctxs = [mx.cpu(0), mx.cpu(1)]
    w = 0.25
    layer = build(pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C, local_weight=w), ctxs, hybridize)
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    sizes = [2, 3]
    running_mean, running_var = np.zeros(C), np.ones(C)
    outputs = []
    for t in range(3):
        xs, _ = batches(sizes, t)
        with autograd.record():
            ys = [layer(nd.array(x, ctx=c)) for x, c in zip(xs, ctxs)]
        outputs.append([y.asnumpy() for y in ys])
        sync.step()
        mean, square = reference.group_moments(xs)
        running_mean = 0.9 * running_mean + 0.1 * mean
        running_var = 0.9 * running_var + 0.1 * (square - mean ** 2)
        if t:
            group = group_sums_of(batches(sizes, t - 1)[0])
            for k, x in enumerate(xs):
                want = reference.pbn_from_group_sums(x, group, w, GAMMA, BETA, EPS, x)[0]
                np.testing.assert_allclose(outputs[t][k], want, rtol=1e-4, atol=1e-4)
    for c in ctxs:
        np.testing.assert_allclose(layer.running_mean.data(c).asnumpy(), running_mean,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.running_var.data(c).asnumpy(), running_var,
                                   rtol=1e-5, atol=1e-6)


def test_first_step_with_low_weight_is_local_batchnorm():
    """Before any exchange a PBN layer has no group moments: it is BatchNorm on its device."""
    ctxs = [mx.cpu(0), mx.cpu(1)]
    layer = build(pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C, local_weight=0.1), ctxs, True)
    pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    xs, dys = batches([2, 1], 7)
    ys, dxs = step(layer, xs, dys, ctxs)
    for k in range(2):
        y, dx, _, _ = reference.batchnorm(xs[k], GAMMA, BETA, EPS, dys[k])
        np.testing.assert_allclose(ys[k], y, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dxs[k], dx, rtol=1e-3, atol=1e-4)


def test_averaged_global_moments_match_numpy():
    """global_momentum = 0.8: step t mixes in G = 0.8 G + 0.2 G_{t-1} (the first exchange
    starts the average), 3 steps on 2 contexts with uneven batches; the running statistics
    follow the same averaged sums."""
    ctxs = [mx.cpu(0), mx.cpu(1)]
    w, rate = 0.5, 0.8
    layer = build(pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C, local_weight=w,
                                                 global_momentum=rate), ctxs, True)
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    sizes = [2, 3]
    average, running_mean, running_var = None, np.zeros(C), np.ones(C)
    for t in range(3):
        xs, dys = batches(sizes, t)
        ys, dxs = step(layer, xs, dys, ctxs, sync)
        if average is not None:
            for k in range(2):
                want = reference.pbn_from_group_sums(xs[k], average, w, GAMMA, BETA, EPS, dys[k])
                np.testing.assert_allclose(ys[k], want[0], rtol=1e-4, atol=1e-4)
                np.testing.assert_allclose(dxs[k], want[1], rtol=1e-3, atol=1e-4)
        current = group_sums_of(xs)
        average = current if average is None else rate * average + (1 - rate) * current
        mean = average[0] / average[2]
        running_mean = 0.9 * running_mean + 0.1 * mean
        running_var = 0.9 * running_var + 0.1 * (average[1] / average[2] - mean ** 2)
    for c in ctxs:
        np.testing.assert_allclose(layer.running_mean.data(c).asnumpy(), running_mean,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.running_var.data(c).asnumpy(), running_var,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"global_momentum": 0.8}, {"group_size": 2},
                                     {"backward": "progressive", "group_size": 2}])
def test_one_exchange_per_step_for_all_layers(options):
    """Three PBN layers on 4 contexts: StatsSync calls the communicator once per step."""
    ctxs = [mx.cpu(i) for i in range(4)]
    net = gluon.nn.HybridSequential()
    for _ in range(3):
        net.add(gluon.nn.Conv2D(C, 3, padding=1), pbn_gluon.ProgressiveBatchNorm(**options))
    net.initialize(ctx=ctxs)
    net.hybridize(static_alloc=True)
    comm = pbn_gluon.CountingComm(pbn_gluon.LocalComm(ctxs))
    sync = pbn_gluon.StatsSync(net, comm)
    trainer = gluon.Trainer(net.collect_params(), 'sgd', {'learning_rate': 0.1})
    counts = []
    for t in range(3):
        xs, _ = batches([1, 2, 1, 2], t, shape=(3, 5, 4))
        with autograd.record():
            ys = [net(nd.array(x, ctx=c)) for x, c in zip(xs, ctxs)]
        autograd.backward(ys)
        before = comm.counts['non_blocking']
        sync.step()
        counts.append(comm.counts['non_blocking'] - before)
        trainer.step(6)     # the gradients StatsSync reads are the Trainer's, fresh
    assert counts == [1, 1, 1]


@pytest.mark.parametrize('hybridize', [False, True])
def test_progressive_backward_matches_numpy(hybridize):
    """backward='progressive', 4 contexts, uneven batches: step 1's dx mixes the group means
    of dy and dy*xhat of step 0 (whose forward, with no group sums yet, was local BatchNorm)."""
    ctxs = [mx.cpu(i) for i in range(4)]
    w = 0.3
    layer = build(pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C, local_weight=w,
                                                 backward='progressive'), ctxs, hybridize)
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    sizes = [2, 1, 3, 2]
    x0, dy0 = batches(sizes, 0)
    step(layer, x0, dy0, ctxs, sync)
    x1, dy1 = batches(sizes, 1)
    ys, dxs = step(layer, x1, dy1, ctxs, sync)
    group = group_sums_of(x0, dy0, rows=5)
    for k, ctx in enumerate(ctxs):
        y, dx, dgamma, dbeta = reference.pbn_from_group_sums(x1[k], group, w, GAMMA, BETA, EPS,
                                                             dy1[k])
        np.testing.assert_allclose(ys[k], y, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dxs[k], dx, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(layer.gamma.grad(ctx).asnumpy(), dgamma, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(layer.beta.grad(ctx).asnumpy(), dbeta, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('backward', ['local', 'progressive'])
def test_local_weight_one_is_batchnorm_in_both_backwards(backward):
    """w = 1: whatever the backward option, outputs and gradients are BatchNorm's (step 2)."""
    ctxs = [mx.cpu(0), mx.cpu(1)]
    layer = build(pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C, local_weight=1.0,
                                                 backward=backward), ctxs, True)
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    for t in range(2):
        xs, dys = batches([2, 3], t)
        ys, dxs = step(layer, xs, dys, ctxs, sync)
    for k in range(2):
        y, dx, _, _ = reference.batchnorm(xs[k], GAMMA, BETA, EPS, dys[k])
        np.testing.assert_allclose(ys[k], y, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dxs[k], dx, rtol=1e-3, atol=1e-4)


def test_progressive_backward_needs_no_gamma_or_beta_gradient():
    """backward='progressive' with neither scale nor center (no gamma/beta gradient at all):
    the operator's backward writes [sum dy, sum dy xhat] itself; step 1's dx on 2 devices
    matches the numpy reference with gamma 1 and beta 0."""
    ctxs = [mx.cpu(0), mx.cpu(1)]
    w = 0.4
    layer = pbn_gluon.ProgressiveBatchNorm(variant='paper-minimal', in_channels=C, local_weight=w, scale=False,
                                           center=False, backward='progressive')
    layer.initialize(ctx=ctxs)
    assert layer.gamma.grad_req == 'null' and layer.beta.grad_req == 'null'
    sync = pbn_gluon.StatsSync(layer, pbn_gluon.LocalComm(ctxs))
    ones, zeros = np.ones(C), np.zeros(C)
    x0, dy0 = batches([2, 3], 0)
    step(layer, x0, dy0, ctxs, sync)
    x1, dy1 = batches([2, 3], 1)
    ys, dxs = step(layer, x1, dy1, ctxs, sync)
    group = np.zeros((5, C))
    for x, dy in zip(x0, dy0):
        n, m, q = reference.channel_moments(x)
        _, _, dgamma, dbeta = reference.batchnorm(x, ones, zeros, EPS, dy)
        group += [n * m, n * q, np.full(C, n), dbeta, dgamma]
    for k in range(2):
        y, dx, _, _ = reference.pbn_from_group_sums(x1[k], group, w, ones, zeros, EPS, dy1[k])
        np.testing.assert_allclose(ys[k], y, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dxs[k], dx, rtol=1e-3, atol=1e-4)
