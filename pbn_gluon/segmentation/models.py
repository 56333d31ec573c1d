"""DeepLab models for Cityscapes with a chosen normalization (bn, syncbn, pbn, gn), built
from GluonCV's model zoo without downloading anything."""
import os
import warnings

import mxnet as mx
from gluoncv.model_zoo.deeplabv3 import DeepLabV3, _ASPP, _DeepLabHead
from gluoncv.model_zoo.deeplabv3_plus import DeepLabV3Plus
from gluoncv.model_zoo.fcn import _FCNHead
from gluoncv.model_zoo.segbase import SegBaseModel
from mxnet.gluon import nn

from ..errors import ConfigError, DataNotFoundError
from .data import CityscapesSegmentation
from .norms import get_norm_layer, pbn_local_weight

__all__ = ['MODELS', 'DeepLabV3Small', 'get_segmentation_model', 'load_backbone',
           'model_from_config']


class _WideDeepLabHead(_DeepLabHead):
    """GluonCV's _DeepLabHead (its _ASPP, then conv 3x3 + norm + ReLU + Dropout + 1x1
    classifier) with the ASPP's input width and atrous rates given, instead of 2048 and
    (12, 24, 36)."""

    def __init__(self, nclass, in_channels, atrous_rates, norm_layer=nn.BatchNorm,
                 norm_kwargs=None, height=60, width=60):
        nn.HybridBlock.__init__(self)      # _DeepLabHead.__init__ hard-codes 2048 channels
        norm_kwargs = {} if norm_kwargs is None else norm_kwargs
        with self.name_scope():
            self.aspp = _ASPP(in_channels, list(atrous_rates), norm_layer=norm_layer,
                              norm_kwargs=norm_kwargs, height=height, width=width)
            self.block = nn.HybridSequential()
            self.block.add(nn.Conv2D(in_channels=256, channels=256, kernel_size=3, padding=1,
                                     use_bias=False))
            self.block.add(norm_layer(in_channels=256, **norm_kwargs))
            self.block.add(nn.Activation('relu'))
            self.block.add(nn.Dropout(0.1))
            self.block.add(nn.Conv2D(in_channels=256, channels=nclass, kernel_size=1))


class DeepLabV3Small(DeepLabV3):
    """GluonCV's DeepLabV3 on a small dilated ResNet (GluonCV's resnet18_v1b / resnet34_v1b,
    output stride 8): the same blocks (_ASPP, _DeepLabHead, _FCNHead; norm_layer in every block
    of backbone and heads), with the ASPP's input width set to the backbone's (512) and the
    auxiliary head's to its third stage's (256). DeepLabV3 itself assumes ResNet-50's 2048/1024.
    """
    WIDTHS = {'resnet18': (256, 512), 'resnet34': (256, 512)}

    def __init__(self, nclass, backbone='resnet18', aux=True, ctx=mx.cpu(),
                 pretrained_base=False, base_size=520, crop_size=480,
                 atrous_rates=(12, 24, 36), **kwargs):
        SegBaseModel.__init__(self, nclass, aux, backbone, ctx=ctx, base_size=base_size,
                              crop_size=crop_size, pretrained_base=pretrained_base, **kwargs)
        c3, c4 = self.WIDTHS[backbone]
        with self.name_scope():
            self.head = _WideDeepLabHead(nclass, c4, atrous_rates, height=crop_size // 8,
                                         width=crop_size // 8, **kwargs)
            self.head.initialize(ctx=ctx)
            self.head.collect_params().setattr('lr_mult', 10)
            if self.aux:
                self.auxlayer = _FCNHead(c3, nclass, **kwargs)
                self.auxlayer.initialize(ctx=ctx)
                self.auxlayer.collect_params().setattr('lr_mult', 10)
        self._up_kwargs = {'height': crop_size, 'width': crop_size}

#: model name -> (GluonCV class, backbones it accepts). GluonCV 0.10's DeepLabV3Plus only
#: exists with an Xception-65 backbone.
MODELS = {'deeplab': (DeepLabV3, ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152')),
          'deeplabplus': (DeepLabV3Plus, ('xception',))}

HEADS = ('head', 'auxlayer')


def get_segmentation_model(model='deeplab', backbone='resnet101', norm='bn', ctx=(mx.cpu(),),
                           in_process=True, aux=True, crop_size=768, base_size=2048,
                           pretrained_base=None, gn_groups=32, pbn_kwargs=None, initialize=True,
                           aspp_rates=(12, 24, 36)):
    """A DeepLab for the 19 Cityscapes classes, initialized on `ctx` (a list of contexts).

    norm, in_process, gn_groups, pbn_kwargs: see norms.get_norm_layer. The network is trained
    at crop_size x crop_size (the heads' resize targets); base_size is kept for evaluation.
    pretrained_base: None (backbone initialized from scratch) or a local .params file of the
    ImageNet backbone (see load_backbone). initialize=False only builds the network.
    resnet18 / resnet34 (deeplab only): DeepLabV3Small, whose ASPP uses aspp_rates (GluonCV's
    (12, 24, 36) suits a 65x65 feature map; a small crop wants smaller rates).
    """
    if model not in MODELS:
        raise ConfigError('unknown model %r: choose one of %s' % (model, ', '.join(MODELS)))
    cls, backbones = MODELS[model]
    if backbone not in backbones:
        raise ConfigError('%s takes backbone %s, got %r'
                         % (model, ' or '.join(backbones), backbone))
    ctx = list(ctx)
    norm_layer = get_norm_layer(norm, ctx, in_process, gn_groups, pbn_kwargs)
    extra = {}
    if backbone in DeepLabV3Small.WIDTHS:
        cls, extra = DeepLabV3Small, {'atrous_rates': tuple(aspp_rates)}
    # GluonCV initializes the heads itself, on the context given here: always the CPU
    net = cls(CityscapesSegmentation.NUM_CLASS, backbone=backbone, aux=aux, ctx=mx.cpu(),
              pretrained_base=False, crop_size=crop_size, base_size=base_size,
              norm_layer=norm_layer, norm_kwargs={}, **extra)
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
                                  cfg.gn_groups, pbn_kwargs, initialize, cfg.aspp_rates)
