"""convert_norm: swap the BatchNorm layers of a built (and pretrained) model, keeping weights."""
import json

from mxnet.gluon import SymbolBlock, nn
from mxnet.gluon.contrib.nn import SyncBatchNorm as ContribSyncBatchNorm


__all__ = ['convert_norm']

_CONVERTIBLE = (nn.BatchNorm, ContribSyncBatchNorm)


def _settings(layer):
    """The BatchNorm constructor arguments of an existing norm layer."""
    kw = layer._kwargs
    return dict(axis=kw['axis'], momentum=kw['momentum'], epsilon=kw['eps'],
                center=layer.beta.grad_req != 'null', scale=not kw['fix_gamma'],
                use_global_stats=kw['use_global_stats'], in_channels=layer.gamma.shape[0])


def _replace(old, norm_layer, kwargs):
    new = norm_layer(prefix=old.prefix, **_settings(old), **kwargs)
    try:
        ctx = old.gamma.list_ctx()
    except RuntimeError:            # not initialized: the caller initializes the new net
        return new
    new.initialize(ctx=ctx)
    if old.gamma._data is None:     # initialized, shapes deferred: nothing to copy yet
        return new
    for name in ('gamma', 'beta', 'running_mean', 'running_var'):
        source, target = getattr(old, name), getattr(new, name)
        target.grad_req = source.grad_req     # a frozen layer stays frozen
        for src, dst in zip(source.list_data(), target.list_data()):
            src.copyto(dst)                   # each device keeps its own values
    return new


def convert_norm(net, norm_layer, **kwargs):
    """Replace every BatchNorm of `net` (gluon nn.BatchNorm, contrib SyncBatchNorm, or this
    package's norms) by ``norm_layer(**BatchNorm settings of the layer, **kwargs)``, copying
    gamma, beta and the running statistics. Returns `net` (changed in place), like PyTorch's
    ``convert_sync_batchnorm``. Layers already of type `norm_layer` are left as they are.
    A SymbolBlock is a fixed graph, whose BatchNorm operators no layer can replace (GluonCV's
    SSD builds its backbone as one): a ValueError names it, and building the model with
    ``norm_layer=`` is the way.
    ``convert_norm(net, nn.BatchNorm)`` turns PBN / SyncBN layers back into BatchNorm. A layer
    that several blocks hold is replaced by one new layer everywhere.

        net = gluoncv.model_zoo.get_model('resnet18_v1b', pretrained=True)
        convert_norm(net, pbn_gluon.ProgressiveBatchNorm, local_weight='linear')
    """
    if not (isinstance(norm_layer, type) and issubclass(norm_layer, nn.HybridBlock)):
        raise TypeError('norm_layer must be a HybridBlock class, got %r' % (norm_layer,))
    if norm_layer is not nn.BatchNorm:      # before anything is converted
        _check_symbol_blocks(net, norm_layer, set())
    _convert(net, norm_layer, kwargs, {}, set())
    return net


def _convert(block, norm_layer, kwargs, replaced, seen):
    # `replaced` maps id(old layer) -> new layer: a layer registered under several parents (or
    # under several names) becomes ONE new layer everywhere, never two with the same names
    if id(block) in seen:
        return
    seen.add(id(block))
    for name, child in list(block._children.items()):
        if isinstance(child, _CONVERTIBLE) and type(child) is not norm_layer:
            if id(child) not in replaced:
                replaced[id(child)] = (child, _replace(child, norm_layer, kwargs))
            new = replaced[id(child)][1]
            block._children[name] = new
            for attr, value in list(vars(block).items()):
                if value is child:
                    object.__setattr__(block, attr, new)
        else:
            _convert(child, norm_layer, kwargs, replaced, seen)
    if isinstance(block, nn.HybridBlock):
        block._clear_cached_op()


#: the operators of the layers convert_norm replaces
_NORM_OPS = ('BatchNorm', '_contrib_SyncBatchNorm')


def _check_symbol_blocks(block, norm_layer, seen):
    """Raise for a SymbolBlock in `block` with BatchNorm operators and none of this package's
    (one built with ``norm_layer=`` holds those, and keeps the fixed BatchNorm ops beside
    them: GluonCV's FeatureExpander adds its extra layers as plain BatchNorm)."""
    if id(block) in seen:
        return
    seen.add(id(block))
    for child in block._children.values():
        _check_symbol_blocks(child, norm_layer, seen)
    if not isinstance(block, SymbolBlock):
        return
    ops = [node['op'] for node in json.loads(block._cached_graph[1].tojson())['nodes']]
    count = sum(op in _NORM_OPS for op in ops)
    if count and not any(op.startswith('pbn_') for op in ops):
        raise ValueError(
            'convert_norm: %s is a SymbolBlock, a fixed graph whose %d BatchNorm operators no '
            'layer can replace (GluonCV builds the SSD backbones so): build the model with '
            'norm_layer=%s instead (gluoncv.model_zoo.get_model(name, norm_layer=...))'
            % (block.name or type(block).__name__, count, norm_layer.__name__))
