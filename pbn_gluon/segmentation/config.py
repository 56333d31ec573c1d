"""Experiment configuration: a YAML file of the keys below (anything else is an error), with
``key=value`` overrides from the command line (values parsed as YAML)."""
import os
import types

import yaml

__all__ = ['KEYS', 'load_config', 'describe']

#: key -> (default, meaning). A default of REQUIRED must be given.
REQUIRED = object()
KEYS = {
    # data
    'data_root': (REQUIRED, 'Cityscapes root: ROOT/leftImg8bit/<split>/ and ROOT/gtFine/<split>/'),
    'train_split': ('train', 'split to train on'),
    'val_split': ('val', 'split eval.py evaluates'),
    'base_size': (2048, 'training: long side drawn in [base_size/2, 2 base_size] before the '
                        'crop; evaluation: long side the image is resized to (scale 1)'),
    'crop_size': (768, 'square training crop, and the window of sliding-window evaluation'),
    'workers': (0, 'data loading processes (0: in the training process)'),
    # model
    'model': ('deeplab', 'deeplab (DeepLabV3, ResNet) or deeplabplus (DeepLabV3+, Xception-65)'),
    'backbone': ('resnet101', 'resnet50 | resnet101 | resnet152 (deeplab); xception '
                              '(deeplabplus); resnet18 | resnet34 (deeplab, GluonCV v1b)'),
    'aspp_rates': ([12, 24, 36], 'atrous rates of the ASPP (resnet18 / resnet34 backbones)'),
    'norm': ('bn', 'bn (per device) | syncbn (global, synchronous) | pbn (progressive) | gn'),
    'pretrained_base': (None, 'local .params file of the ImageNet backbone; null: from scratch'),
    'aux': (True, 'auxiliary FCN head on the third stage'),
    'aux_weight': (0.5, 'weight of the auxiliary loss'),
    'gn_groups': (32, 'groups of GroupNorm (norm: gn)'),
    'pbn_local_weight': ('linear', 'PBN weight of the local moments: a linear or cosine ramp '
                                   'from 1 to pbn_final, or a constant float'),
    'pbn_start': (0, 'PBN: iteration at which the ramp starts'),
    'pbn_steps': (1000, 'PBN: iterations the ramp lasts'),
    'pbn_final': (None, 'PBN: final local weight (null: 1/G)'),
    'pbn_group_size': (None, 'PBN: devices pooled, null (all), an int, or {iteration: size}'),
    'pbn_global_momentum': (0.0, 'PBN: exponential average of the exchanged moments over '
                                 'steps (0: the previous step alone)'),
    'pbn_backward': ('local', 'PBN backward: local (the paper) | progressive (mixes the '
                              'exchanged dy statistics in)'),
    # devices
    'backend': ('local', 'local (one process) | horovod (horovodrun) | kvstore (dist_sync, '
                         'python -m pbn_gluon.launch)'),
    'gpus': (0, 'GPUs per process (horovod: 0 or 1); 0 runs on CPU'),
    'devices': (1, 'CPU contexts per process when gpus is 0 (horovod: 1)'),
    'batch_size': (1, 'images per device and iteration'),
    'hybridize': (True, 'hybridize the network'),
    # optimization (GluonCV's recipe: SGD, poly learning rate)
    'epochs': (240, 'training epochs'),
    'lr': (0.01, 'base learning rate (x10 on the heads), decayed as (1 - iter/total)^lr_power'),
    'lr_power': (0.9, 'power of the poly decay'),
    'momentum': (0.9, 'SGD momentum'),
    'weight_decay': (1e-4, 'weight decay'),
    # run
    'seed': (0, 'seed of initialization, data order, augmentation and dropout'),
    'run_dir': (None, 'checkpoints and metrics.jsonl (null: runs/<config file name>)'),
    'keep_checkpoints': (False, 'keep every epoch checkpoint (false: only the last)'),
    'log_interval': (1, 'iterations between two lines of metrics.jsonl'),
    'overfit_batches': (0, 'debug: when > 0, every epoch repeats the same first N batches '
                           '(same augmentation), so the loss must go down'),
    # evaluation
    'eval_scales': ([0.5, 0.75, 1.0, 1.25, 1.5, 1.75], 'scales of eval.py --multi-scale (+ flip)'),
}

CHOICES = {'model': ('deeplab', 'deeplabplus'), 'norm': ('bn', 'syncbn', 'pbn', 'gn'),
           'pbn_backward': ('local', 'progressive'),
           'backend': ('local', 'horovod', 'kvstore')}


def describe():
    """The valid keys with their defaults and meaning, one per line."""
    return '\n'.join('  %-17s %s (%s)' % (k, doc, 'required' if d is REQUIRED else
                                           'default: %r' % (d,)) for k, (d, doc) in KEYS.items())


def _check_keys(keys, where):
    unknown = sorted(set(keys) - set(KEYS))
    if unknown:
        raise ValueError('unknown config key%s %s in %s; valid keys:\n%s' % (
            's' if len(unknown) > 1 else '', ', '.join(map(repr, unknown)), where, describe()))


def load_config(path, overrides=()):
    """A namespace of every key: the defaults, then the YAML file `path`, then the ``key=value``
    strings of `overrides`. ``name`` is the file's name without extension."""
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError('%s must be a mapping of config keys' % path)
    _check_keys(values, path)
    for item in overrides:
        key, sep, text = item.partition('=')
        if not sep:
            raise ValueError('--set takes key=value, got %r' % item)
        _check_keys([key.strip()], '--set')
        values[key.strip()] = yaml.safe_load(text)
    missing = [k for k, (d, _) in KEYS.items() if d is REQUIRED and values.get(k) is None]
    if missing:
        raise ValueError('%s: required config key(s) %s not set' % (path, ', '.join(missing)))
    for key, allowed in CHOICES.items():
        if key in values and values[key] not in allowed:
            raise ValueError('%s: %s must be one of %s, got %r'
                             % (path, key, ', '.join(allowed), values[key]))
    cfg = types.SimpleNamespace(**{k: d for k, (d, _) in KEYS.items()})
    cfg.__dict__.update(values)
    cfg.name = os.path.splitext(os.path.basename(path))[0]
    if cfg.run_dir is None:
        cfg.run_dir = os.path.join('runs', cfg.name)
    return cfg
