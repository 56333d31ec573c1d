"""DeepLab models for Cityscapes with a chosen normalization (bn, syncbn, pbn, gn), built
from GluonCV's model zoo without downloading anything."""
import os
import warnings

import mxnet as mx
from gluoncv.model_zoo.deeplabv3 import DeepLabV3
from gluoncv.model_zoo.deeplabv3_plus import DeepLabV3Plus

from ..errors import ConfigError, DataNotFoundError
from .data import CityscapesSegmentation
from .norms import get_norm_layer, pbn_local_weight

__all__ = ['MODELS', 'get_segmentation_model', 'load_backbone', 'model_from_config']

#: model name -> (GluonCV class, backbones it accepts). GluonCV 0.10's DeepLabV3Plus only
#: exists with an Xception-65 backbone.
MODELS = {'deeplab': (DeepLabV3, ('resnet50', 'resnet101', 'resnet152')),
          'deeplabplus': (DeepLabV3Plus, ('xception',))}

HEADS = ('head', 'auxlayer')


def get_segmentation_model(model='deeplab', backbone='resnet101', norm='bn', ctx=(mx.cpu(),),
                           in_process=True, aux=True, crop_size=768, base_size=2048,
                           pretrained_base=None, gn_groups=32, pbn_kwargs=None, initialize=True):
    """A DeepLab for the 19 Cityscapes classes, initialized on `ctx` (a list of contexts).

    norm, in_process, gn_groups, pbn_kwargs: see norms.get_norm_layer. The network is trained
    at crop_size x crop_size (the heads' resize targets); base_size is kept for evaluation.
    pretrained_base: None (backbone initialized from scratch) or a local .params file of the
    ImageNet backbone (see load_backbone). initialize=False only builds the network.
    """
    if model not in MODELS:
        raise ConfigError('unknown model %r: choose one of %s' % (model, ', '.join(MODELS)))
    cls, backbones = MODELS[model]
    if backbone not in backbones:
        raise ConfigError('%s takes backbone %s, got %r'
                         % (model, ' or '.join(backbones), backbone))
    ctx = list(ctx)
    norm_layer = get_norm_layer(norm, ctx, in_process, gn_groups, pbn_kwargs)
    # GluonCV initializes the heads itself, on the context given here: always the CPU
    net = cls(CityscapesSegmentation.NUM_CLASS, backbone=backbone, aux=aux, ctx=mx.cpu(),
              pretrained_base=False, crop_size=crop_size, base_size=base_size,
              norm_layer=norm_layer, norm_kwargs={})
    if initialize:
        with warnings.catch_warnings():     # "already initialized": the heads
            warnings.simplefilter('ignore')
            net.initialize(mx.init.Xavier(rnd_type='gaussian', factor_type='in', magnitude=2),
                           ctx=ctx)
        net.collect_params().reset_ctx(ctx)
        if pretrained_base:
            load_backbone(net, pretrained_base, ctx)
    return net


def load_backbone(net, path, ctx):
    """Load the backbone of `net` from a local .params file saved by save_parameters from the
    GluonCV ImageNet model (e.g. resnet101_v1s: its layers have the same names in DeepLab).
    Every backbone parameter must be in the file; extra entries (the classifier) are ignored."""
    if not os.path.isfile(path):
        raise DataNotFoundError('pretrained_base: no such file %s (nothing is downloaded: give '
                                'a local .params file of the ImageNet backbone)' % path)
    saved = mx.nd.load(path)
    names = [n for n in net._collect_params_with_prefix() if n.split('.')[0] not in HEADS]
    missing = [n for n in names if n not in saved]
    if missing:
        raise ConfigError('%s does not hold this backbone: %d of its %d parameters are missing '
                         '(e.g. %s)' % (path, len(missing), len(names), ', '.join(missing[:3])))
    net.load_parameters(path, ctx=ctx, allow_missing=True, ignore_extra=True)


def model_from_config(cfg, ctx, in_process=True, initialize=True):
    """get_segmentation_model with the settings of a config (see config.KEYS)."""
    pbn_kwargs = {'local_weight': pbn_local_weight(cfg.pbn_local_weight, cfg.pbn_start,
                                                   cfg.pbn_steps, cfg.pbn_final),
                  'group_size': cfg.pbn_group_size,
                  'global_momentum': cfg.pbn_global_momentum, 'backward': cfg.pbn_backward}
    return get_segmentation_model(cfg.model, cfg.backbone, cfg.norm, ctx, in_process, cfg.aux,
                                  cfg.crop_size, cfg.base_size, cfg.pretrained_base,
                                  cfg.gn_groups, pbn_kwargs, initialize)
