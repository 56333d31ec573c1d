"""convert_norm: swap the BatchNorm layers of a built (and pretrained) model, keeping weights."""
from mxnet.gluon import nn
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
    if old.gamma._data is not None:
        new.initialize(ctx=old.gamma.list_ctx())
        for name in ('gamma', 'beta', 'running_mean', 'running_var'):
            getattr(new, name).set_data(getattr(old, name).data())
    return new


def convert_norm(net, norm_layer, **kwargs):
    """Replace every BatchNorm of `net` (gluon nn.BatchNorm, contrib SyncBatchNorm, or this
    package's norms) by ``norm_layer(**BatchNorm settings of the layer, **kwargs)``, copying
    gamma, beta and the running statistics. Returns `net` (changed in place), like PyTorch's
    ``convert_sync_batchnorm``. Layers already of type `norm_layer` are left as they are.

        net = gluoncv.model_zoo.get_model('resnet18_v1b', pretrained=True)
        convert_norm(net, pbn_gluon.ProgressiveBatchNorm, local_weight='linear')
    """
    if not (isinstance(norm_layer, type) and issubclass(norm_layer, nn.HybridBlock)):
        raise TypeError('norm_layer must be a HybridBlock class, got %r' % (norm_layer,))
    for name, child in list(net._children.items()):
        if isinstance(child, _CONVERTIBLE) and type(child) is not norm_layer:
            new = _replace(child, norm_layer, kwargs)
            net._children[name] = new
            if getattr(net, name, None) is child:
                object.__setattr__(net, name, new)
        else:
            convert_norm(child, norm_layer, **kwargs)
    if isinstance(net, nn.HybridBlock):
        net._clear_cached_op()
    return net
