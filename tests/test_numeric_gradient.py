"""MXNet's own gradient check on PBN's training forward, as a user ports MXNet 1.9's
test_batchnorm_training (tests/python/unittest/test_operator.py) to the layer: its symbol, the
layer's parameters and state as the harness's inputs, mx.test_utils.check_numeric_gradient.

The harness casts every input to float32 (the layer's float64 group and batch sums too): the
operator widens them to double for the call. Beyond the fresh state (w = 1, where PBN is
BatchNorm), a state with group sums and w = 0.5 is checked against finite differences of the
independent numpy reference (reference.pbn_from_group_sums, float64)."""
import mxnet as mx
import numpy as np
import pytest
from mxnet.test_utils import check_numeric_gradient

import pbn_gluon
import reference

#: mx.sym.BatchNorm's default epsilon, which MXNet's test runs with
EPS = 1e-3
SHAPES = [(2, 3), (2, 3, 2, 2)]     # MXNet's
CASES = [(shape, axis) for shape in SHAPES for axis in range(-len(shape), len(shape))]


def layer_symbol(axis, fix_gamma, channels, variant='plus'):
    layer = pbn_gluon.ProgressiveBatchNorm(axis=axis, scale=not fix_gamma, in_channels=channels,
                                           epsilon=EPS, variant=variant)
    layer.initialize()
    return layer, layer(mx.sym.var('data'))


def inputs(layer, sym, shape, axis, rng, as_numpy):
    """The symbol's arguments and auxiliary states: MXNet's test values for data, gamma, beta
    and the running statistics, the layer's own arrays for its state."""
    c = shape[axis]
    gamma, beta = np.ones(c), np.ones(c)
    gamma[1 % c], beta[0] = 3, 3
    values = {p.name: p.data() for p in layer.collect_params().values()}
    values.update({'data': rng.normal(-0.1, 0.1, size=shape), layer.gamma.name: gamma,
                   layer.beta.name: beta, layer.running_mean.name: rng.uniform(size=c),
                   layer.running_var.name: rng.uniform(size=c)})
    convert = (lambda v: v.asnumpy() if isinstance(v, mx.nd.NDArray) else v) if as_numpy else \
        (lambda v: v if isinstance(v, mx.nd.NDArray) else mx.nd.array(v))
    return ({k: convert(values[k]) for k in sym.list_arguments()},
            {k: convert(values[k]) for k in sym.list_auxiliary_states()})


@pytest.mark.parametrize('shape,axis', CASES)
@pytest.mark.parametrize('fix_gamma', [True, False])
@pytest.mark.parametrize('as_numpy', [False, True])
def test_mxnet_batchnorm_training_port(shape, axis, fix_gamma, as_numpy):
    """MXNet's training cases, with its tolerances, on every input of the symbol. as_numpy:
    numpy inputs, which the harness makes float32 (the float64 state included); else the
    layer's NDArrays, whose float64 arguments it keeps (its auxiliary states it casts)."""
    rng = np.random.RandomState(hash((shape, axis, fix_gamma)) % 2 ** 31)
    mx.random.seed(0)
    np.random.seed(0)
    layer, sym = layer_symbol(axis, fix_gamma, shape[axis])
    location, aux = inputs(layer, sym, shape, axis, rng, as_numpy)
    check_numeric_gradient(sym, location, aux, numeric_eps=1e-2, rtol=0.2, atol=0.01)


def _group_state(layer, location, shape, axis, rng):
    """Group sums [sum x, sum x^2, n] of another batch and w = 0.5 in `location` (float32
    values, as the harness makes them); returns (group, w) for the reference."""
    x = np.moveaxis(rng.normal(0.2, 0.3, size=(5,) + shape), axis % len(shape) + 1, 0)
    x = x.reshape(shape[axis], -1)
    group = np.stack([x.sum(1), (x * x).sum(1), np.full(shape[axis], x.shape[1])])
    group = group.astype(np.float32).astype(np.float64)
    location[layer.global_sums.name] = group.reshape(location[layer.global_sums.name].shape)
    location[layer.local_weight.name] = np.array([0.5])
    return group, 0.5


@pytest.mark.parametrize('shape,axis', [((2, 3, 2, 2), 1), ((3, 4, 5), -1), ((4, 3), 0)])
@pytest.mark.parametrize('fix_gamma', [True, False])
def test_gradients_with_group_sums_match_numpy_finite_differences(shape, axis, fix_gamma):
    """w = 0.5 and group sums of another batch ('paper' variant: the backward is the gradient
    of the forward). check_numeric_gradient passes on data, gamma and beta (the state's
    inputs have no gradient by design: the count and w are constants of the step), and the
    operator's gradients of data, gamma, beta and the group's [sum x, sum x^2] equal central
    differences of the numpy reference's forward in float64."""
    rng = np.random.RandomState(3)
    c = shape[axis]
    layer, sym = layer_symbol(axis, fix_gamma, c, variant='paper')
    location, aux = inputs(layer, sym, shape, axis, rng, as_numpy=True)
    group, w = _group_state(layer, location, shape, axis, rng)
    mx.random.seed(0)
    np.random.seed(0)
    check_numeric_gradient(sym, dict(location), aux, numeric_eps=1e-2, rtol=0.2, atol=0.01,
                           grad_nodes=['data', layer.gamma.name, layer.beta.name])

    # the operator's gradients of sum(proj * y), every input float32 as the harness binds them
    # (the gradient of the group sums too: written in double, narrowed back)
    proj = rng.uniform(0.5, 1.5, size=shape)
    args = {k: mx.nd.array(v) for k, v in location.items()}
    grads = {k: mx.nd.zeros(v.shape) for k, v in args.items()}
    exe = sym.bind(mx.cpu(), args, args_grad=grads,
                   aux_states={k: mx.nd.array(v) for k, v in aux.items()})
    exe.forward(is_train=True)
    exe.backward(mx.nd.array(proj))
    got = {k: g.asnumpy().astype(np.float64) for k, g in grads.items()}

    x = location['data'].astype(np.float32).astype(np.float64)
    gamma = location[layer.gamma.name].astype(np.float32).astype(np.float64)
    beta = location[layer.beta.name].astype(np.float32).astype(np.float64)

    def loss(x=x, gamma=gamma, beta=beta, group=group):
        g = np.ones_like(gamma) if fix_gamma else gamma
        y = reference.pbn_from_group_sums(x, group, w, g, beta, EPS, np.zeros_like(x), axis)[0]
        return (proj * y).sum()

    def central(name, value, h=1e-6):
        fd = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            up, down = value.copy(), value.copy()
            up[i] += h
            down[i] -= h
            fd[i] = (loss(**{name: up}) - loss(**{name: down})) / (2 * h)
        return fd

    np.testing.assert_allclose(exe.outputs[0].asnumpy(), reference.pbn_from_group_sums(
        x, group, w, np.ones_like(gamma) if fix_gamma else gamma, beta, EPS, proj, axis)[0],
        rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got['data'], central('x', x), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got[layer.beta.name], central('beta', beta), rtol=1e-4, atol=1e-4)
    expected_dgamma = np.zeros(c) if fix_gamma else central('gamma', gamma)
    np.testing.assert_allclose(got[layer.gamma.name], expected_dgamma, rtol=1e-4, atol=1e-4)
    dgroup = got[layer.global_sums.name].reshape(group.shape)
    np.testing.assert_allclose(dgroup[:2], central('group', group)[:2], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize('shape,axis', [((2, 3, 2, 2), 1), ((3, 4, 5), -1)])
def test_float32_batch_sums_are_written(shape, axis):
    """A float32 batch_sums (as the harness binds the auxiliary state) receives what the
    operator writes in double: [sum x, sum x^2, n] in the forward and, with the progressive
    backward, [sum dy, sum dy xhat] in the backward (numpy, float64)."""
    rng = np.random.RandomState(5)
    c = shape[axis]
    layer, sym = layer_symbol(axis, False, c, variant='plus')
    location, aux = inputs(layer, sym, shape, axis, rng, as_numpy=True)
    args = {k: mx.nd.array(v) for k, v in location.items()}
    state = {k: mx.nd.array(v) for k, v in aux.items()}
    assert state[layer.batch_sums.name].dtype == np.float32
    exe = sym.bind(mx.cpu(), args, args_grad={k: mx.nd.zeros(v.shape) for k, v in args.items()},
                   aux_states=state)
    dy = rng.uniform(-1, 1, size=shape)
    exe.forward(is_train=True)
    exe.backward(mx.nd.array(dy))
    # the backward writes batch_sums, to MXNet's engine an input it reads: wait for it
    # (StatsSync takes the sums with pbn_take_sums, an operator that waits)
    mx.nd.waitall()
    sums = state[layer.batch_sums.name].asnumpy().astype(np.float64).reshape(5, c)

    x = np.moveaxis(args['data'].asnumpy().astype(np.float64), axis, 0).reshape(c, -1)
    g = np.moveaxis(dy.astype(np.float32).astype(np.float64), axis, 0).reshape(c, -1)
    mean, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
    xhat = (x - mean) / np.sqrt(var + EPS)
    expected = [x.sum(1), (x * x).sum(1), np.full(c, x.shape[1]), g.sum(1), (g * xhat).sum(1)]
    np.testing.assert_allclose(sums, np.stack(expected), rtol=1e-5, atol=1e-5)
