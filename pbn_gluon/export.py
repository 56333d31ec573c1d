"""export: a PBN / SyncBN model as a graph of plain MXNet ``BatchNorm`` nodes.

In inference a ProgressiveBatchNorm or SyncBatchNorm layer *is* BatchNorm with its running
statistics. ``export`` writes the model as MXNet's ``HybridBlock.export`` does
(``path-symbol.json``, ``path-%04d.params``), but every norm layer is a plain ``BatchNorm``
node whose running statistics are its auxiliary states: the files load with
``mx.gluon.SymbolBlock.imports`` (and convert with ``mx.onnx.export_model``) in a process that
never imported pbn_gluon. Nothing of a layer's training graph (fused operators, mode flag,
exchange state) is read: the graph is built from each layer's BatchNorm settings and its four
saved parameters (gamma, beta, running_mean, running_var).

The user's net is not changed: while the graph is traced, each norm layer is temporarily
replaced in its parents by a parameter-less stand-in that emits ``BatchNorm`` on the layer's own
Parameters, and put back afterwards (also on error). Nothing is hybridized, cached or run on
the net except one inference forward on the example input, for the output check (and for
deferred shapes when the net has not run yet).
"""
import contextlib
import warnings

import numpy as np
import mxnet as mx
from mxnet import autograd, gluon, nd
from mxnet.gluon import nn

__all__ = ['export', 'plain_batchnorm']

_OP_KEYS = ('axis', 'eps', 'momentum', 'fix_gamma', 'use_global_stats', 'cudnn_off')


def _needs_plain(block):
    """A BatchNorm-like layer that is not MXNet's own BatchNorm node: this package's norms, a
    contrib SyncBatchNorm, any other nn.BatchNorm subclass."""
    return isinstance(block, nn.BatchNorm) and type(block) is not nn.BatchNorm


class _PlainBatchNorm(nn.HybridBlock):
    """Traces one BatchNorm node on another layer's Parameters (it owns none)."""

    def __init__(self, layer):
        super().__init__(prefix=layer.prefix)
        self._source = (layer.gamma, layer.beta, layer.running_mean, layer.running_var)
        self._op_kwargs = {k: v for k, v in layer._kwargs.items() if k in _OP_KEYS}
        self._fuse_relu = bool(getattr(layer, 'fuse_relu', False))

    def hybrid_forward(self, F, x):
        if F is not mx.sym:
            raise RuntimeError('the plain BatchNorm stand-in only traces graphs')
        gamma, beta, mean, var = (p.var() for p in self._source)
        op = F.contrib.BatchNormWithReLU if self._fuse_relu else F.BatchNorm
        return op(x, gamma, beta, mean, var, name='fwd', **self._op_kwargs)


def _walk(block, seen):
    if id(block) in seen:
        return
    seen.add(id(block))
    yield block
    for child in list(block._children.values()):
        yield from _walk(child, seen)


@contextlib.contextmanager
def plain_batchnorm(net):
    """Within the block, every norm layer of `net` (other than nn.BatchNorm) is replaced by a
    stand-in that traces a plain BatchNorm node on the layer's Parameters; restored on exit."""
    if _needs_plain(net):
        raise TypeError('export a model that contains the norm layer, not the layer itself')
    twins, undo = {}, []
    for parent in list(_walk(net, set())):
        for key, child in list(parent._children.items()):
            if not _needs_plain(child):
                continue
            twin = twins.setdefault(id(child), _PlainBatchNorm(child))
            parent._children[key] = twin
            undo.append((parent._children, key, child))
            for attr, value in list(vars(parent).items()):
                if value is child:
                    object.__setattr__(parent, attr, twin)
                    undo.append((parent, attr, child))
    try:
        yield len(twins)
    finally:
        for owner, key, child in reversed(undo):
            if isinstance(owner, dict):
                owner[key] = child
            else:
                object.__setattr__(owner, key, child)


def _as_input(example, ctx):
    if isinstance(example, nd.NDArray):
        return example.as_in_context(ctx)
    if isinstance(example, np.ndarray):
        return nd.array(example, ctx=ctx)
    shape = tuple(int(s) for s in example)
    data = np.random.RandomState(0).normal(size=shape).astype(np.float32)
    return nd.array(data, ctx=ctx)


def flatten_outputs(out):
    """The arrays (or symbols) of a block's output, nested lists and tuples flattened."""
    if isinstance(out, (list, tuple)):
        for o in out:
            yield from flatten_outputs(o)
    else:
        yield out


def _average(param):
    """One copy of a Parameter's value: the mean over its contexts (as HybridBlock.export)."""
    arrays = [a.copyto(mx.cpu()) for a in param.list_data()]
    return arrays[0] if len(arrays) == 1 else nd.add_n(*arrays) / len(arrays)


def output_mismatch(got, want, rtol, atol):
    """None when ``max |got - want| <= atol + rtol * max |want|`` (relative to the output's
    scale, as float32 rounding is: an entry near 0 of an output of scale 1e12 carries the
    rounding of its 1e12-sized terms), else what differs."""
    if got.shape != want.shape:
        return 'shape %s, expected %s' % (got.shape, want.shape)
    if not got.size:
        return None
    diff, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    if diff <= atol + rtol * scale:
        return None
    return 'max |diff| %g, max |output| %g' % (diff, scale)


def export(net, path, example, epoch=0, check=True, rtol=1e-5, atol=1e-5):
    """Write `net` (with ProgressiveBatchNorm / SyncBatchNorm layers, or any BatchNorm) as a
    plain MXNet graph: ``path-symbol.json`` and ``path-%04d.params`` (epoch), loadable without
    pbn_gluon::

        pbn_gluon.export(net, 'model', (1, 3, 224, 224))
        # anywhere, MXNet alone:
        net = mx.gluon.SymbolBlock.imports('model-symbol.json', ['data'], 'model-0000.params')

    Parameters
    ----------
    net : gluon.HybridBlock
        The trained model; it is not changed.
    path : str
        Prefix of the two files written.
    example : shape tuple, NDArray or numpy array
        One input of the model (a shape gets a fixed random normal input). It fixes deferred
        shapes and is what the written graph is checked on.
    check : bool
        Run the written graph and the model (inference) on `example` and warn when an
        output differs by more than ``atol + rtol * max |reference|`` (output_mismatch).

    Returns the (symbol file, params file) paths.
    """
    if not isinstance(net, gluon.HybridBlock):
        raise TypeError('export needs a HybridBlock (a hybridizable model), got %s'
                        % type(net).__name__)
    params = net.collect_params()
    ctxs = [p.list_ctx() for p in params.values() if p._data is not None or p._deferred_init]
    if not ctxs:
        raise ValueError('%s is not initialized: initialize or load its parameters first'
                         % type(net).__name__)
    ctx = ctxs[0][0]
    x = _as_input(example, ctx)
    reference = None
    with autograd.pause(train_mode=False):
        if check or any(p._data is None for p in params.values() if p._deferred_init):
            reference = [o.asnumpy() for o in flatten_outputs(net(x))]

    with plain_batchnorm(net):
        out = net(mx.sym.var('data'))
    sym = out if isinstance(out, mx.sym.Symbol) else mx.sym.Group(list(flatten_outputs(out)))
    leftover = [n for n in sym.get_internals().list_outputs()
                if n.startswith('pbn_') or '_pbn_' in n]
    if leftover:
        raise RuntimeError('export: the graph still has pbn_gluon nodes: %s' % leftover[:5])

    by_name = {p.name: p for p in params.values()}
    saved = {}
    for kind, names in (('arg', sym.list_arguments()), ('aux', sym.list_auxiliary_states())):
        for name in names:
            if name == 'data':
                continue
            if name not in by_name:
                raise RuntimeError('export: the graph reads %r, which is no Parameter of %s'
                                   % (name, type(net).__name__))
            saved['%s:%s' % (kind, name)] = _average(by_name[name])
    sym_file, params_file = '%s-symbol.json' % path, '%s-%04d.params' % (path, epoch)
    sym.save(sym_file)
    nd.save(params_file, saved)

    if check and reference is not None:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')         # "Cannot decide type for ... data"
            loaded = gluon.SymbolBlock(sym, mx.sym.var('data'))
        loaded.load_parameters(params_file, ctx=mx.cpu(), allow_missing=False,
                               ignore_extra=False)
        got = [o.asnumpy() for o in flatten_outputs(loaded(x.as_in_context(mx.cpu())))]
        for i, (a, b) in enumerate(zip(got, reference)):
            problem = output_mismatch(a, b, rtol, atol)
            if problem:
                warnings.warn('export: output %d of the written graph differs from the model\'s '
                              'inference output (%s)' % (i, problem))
    return sym_file, params_file
