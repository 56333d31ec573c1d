"""Experiment configuration: a YAML file of the keys below (anything else is an error), with
``key=value`` overrides from the command line (values parsed as YAML)."""
import os
import types

import yaml

from .. import schedules
from ..errors import ArgumentParser, ConfigError, one_line, user_errors
from .models import MODELS

__all__ = ['KEYS', 'load_config', 'describe', 'check_values', 'ConfigError', 'config_parser',
           'run_with_config']

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
    'pbn_global_momentum': (0.8, 'PBN: exponential average of the exchanged moments over '
                                 'steps (0: the paper, the previous step alone)'),
    'pbn_backward': ('progressive', 'PBN backward: progressive (mixes the exchanged dy '
                                    'statistics in) | local (the paper)'),
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

CHOICES = {'model': tuple(MODELS), 'norm': ('bn', 'syncbn', 'pbn', 'gn'),
           'pbn_backward': ('local', 'progressive'),
           'backend': ('local', 'horovod', 'kvstore')}

#: backbones of each model, from the one table pbn_gluon.segmentation.models keeps
BACKBONES = {model: backbones for model, (_, backbones) in MODELS.items()}


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value):
    """value as a float, or None when it is not a number (YAML 1.1 reads 1e-4 as a string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _int(lowest):
    def check(value):
        return value if _is_int(value) and value >= lowest else _BAD
    check.allowed = 'an integer >= %d' % lowest
    return check


def _float(lowest=None, highest=None, low_open=False, high_open=False, optional=False):
    def check(value):
        if value is None and optional:
            return None
        number = _number(value)
        if number is None or number != number:
            return _BAD
        if lowest is not None and (number < lowest or (low_open and number == lowest)):
            return _BAD
        if highest is not None and (number > highest or (high_open and number == highest)):
            return _BAD
        return number
    if highest is None:
        bounds = '%s %s' % ('>' if low_open else '>=', lowest)
    else:
        bounds = 'in %s%s, %s%s' % ('(' if low_open else '[', lowest, highest,
                                    ')' if high_open else ']')
    check.allowed = 'a number %s%s' % (bounds, ' or null' if optional else '')
    return check


def _string(optional=False):
    def check(value):
        if value is None and optional:
            return None
        return value if isinstance(value, str) and value.strip() else _BAD
    check.allowed = 'a non-empty string%s' % (' or null' if optional else '')
    return check


def _bool(value):
    return value if isinstance(value, bool) else _BAD


_bool.allowed = 'true or false'


def _local_weight(value):
    if value in schedules.RAMPS:
        return value
    number = _number(value) if not isinstance(value, str) else None
    return number if number is not None and 0 < number <= 1 else _BAD


_local_weight.allowed = '%s or a number in (0, 1]' % ', '.join(schedules.RAMPS)


def _group_size(value):
    if value is None or (_is_int(value) and value >= 1):
        return value
    if isinstance(value, dict) and value and all(
            _is_int(k) and k >= 0 and _is_int(v) and v >= 1 for k, v in value.items()):
        return value
    return _BAD


_group_size.allowed = 'null, an integer >= 1 or a mapping {iteration: size} of integers'


def _scales(value):
    if isinstance(value, (list, tuple)) and value:
        numbers = [_number(v) if not isinstance(v, str) else None for v in value]
        if all(n is not None and n > 0 for n in numbers):
            return numbers
    return _BAD


_scales.allowed = 'a non-empty list of positive numbers'

def _rates(value):
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(
            _is_int(v) and v >= 1 for v in value):
        return [int(v) for v in value]
    return _BAD


_rates.allowed = 'a list of three integers >= 1'

_BAD = object()

#: key -> check(value): the value to use, or _BAD; check.allowed says what is
CHECKS = {
    'data_root': _string(), 'train_split': _string(), 'val_split': _string(),
    'base_size': _int(1), 'crop_size': _int(1), 'workers': _int(0),
    'backbone': _string(), 'pretrained_base': _string(optional=True), 'aux': _bool,
    'aux_weight': _float(0), 'gn_groups': _int(1), 'pbn_local_weight': _local_weight,
    'pbn_start': _int(0), 'pbn_steps': _int(1),
    'pbn_final': _float(0, 1, low_open=True, optional=True), 'pbn_group_size': _group_size,
    'pbn_global_momentum': _float(0, 1, high_open=True), 'gpus': _int(0), 'devices': _int(1),
    'batch_size': _int(1), 'hybridize': _bool, 'epochs': _int(1),
    'lr': _float(0, low_open=True), 'lr_power': _float(0), 'momentum': _float(0, 1, high_open=True),
    'weight_decay': _float(0), 'seed': _int(0), 'run_dir': _string(optional=True),
    'log_interval': _int(1), 'overfit_batches': _int(0), 'eval_scales': _scales,
    'aspp_rates': _rates, 'keep_checkpoints': _bool,
}


def describe():
    """The valid keys with their defaults and meaning, one per line."""
    return '\n'.join('  %-17s %s (%s)' % (k, doc, 'required' if d is REQUIRED else
                                           'default: %r' % (d,)) for k, (d, doc) in KEYS.items())


def _check_keys(keys, where):
    unknown = sorted(set(map(str, keys)) - set(KEYS))
    if unknown:
        raise ConfigError('unknown config key%s %s in %s; valid keys: %s' % (
            's' if len(unknown) > 1 else '', ', '.join(map(repr, unknown)), where,
            ', '.join(KEYS)))


def _bad_value(where, key, value, allowed):
    return ConfigError('%s: %s=%s is not allowed: %s must be %s'
                       % (where, key, _show(value), key, allowed))


def _show(value):
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + '...'


def check_values(values, sources):
    """Check and convert every value of `values` (key -> value, modified in place); `sources`
    says where each key was set. Raises ConfigError naming the key, the value and what is
    allowed."""
    for key, value in values.items():
        where = sources.get(key, 'config')
        if key in CHOICES:
            if value not in CHOICES[key]:
                raise _bad_value(where, key, value, 'one of %s' % ', '.join(CHOICES[key]))
            continue
        checked = CHECKS[key](value)
        if checked is _BAD:
            raise _bad_value(where, key, value, CHECKS[key].allowed)
        values[key] = checked
    model = values.get('model', KEYS['model'][0])
    backbone = values.get('backbone', KEYS['backbone'][0])
    if backbone not in BACKBONES[model]:
        raise ConfigError('%s: backbone=%s is not allowed with model=%s: %s takes backbone %s'
                          % (sources.get('backbone', sources.get('model', 'config')),
                             _show(backbone), model, model, ' or '.join(BACKBONES[model])))


def load_config(path, overrides=()):
    """A namespace of every key: the defaults, then the YAML file `path`, then the ``key=value``
    strings of `overrides`. ``name`` is the file's name without extension. Every value is
    checked (type and range): a ConfigError (a ValueError) names the key, the value and what is
    allowed; a config file that is missing or not YAML is a ConfigError naming it."""
    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError('cannot read config file %s: %s' % (path, err.strerror or err)) from err
    except yaml.YAMLError as err:
        mark = getattr(err, 'problem_mark', None)
        raise ConfigError('config file %s is not valid YAML%s: %s' % (
            path, ' (line %d, column %d)' % (mark.line + 1, mark.column + 1) if mark else '',
            getattr(err, 'problem', None) or one_line(err))) from err
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError('%s must be a mapping of config keys (key: value lines), got %s'
                          % (path, type(values).__name__))
    _check_keys(values, path)
    sources = {key: path for key in values}
    for item in overrides:
        key, sep, text = item.partition('=')
        if not sep:
            raise ConfigError('--set takes key=value, got %r' % item)
        key = key.strip()
        _check_keys([key], '--set')
        try:
            values[key] = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError('--set %s: %r is not a YAML value' % (key, text)) from err
        sources[key] = '--set'
    missing = [k for k, (d, _) in KEYS.items() if d is REQUIRED and values.get(k) is None]
    if missing:
        raise ConfigError('%s: required config key(s) %s not set' % (path, ', '.join(missing)))
    check_values(values, sources)
    cfg = types.SimpleNamespace(**{k: d for k, (d, _) in KEYS.items()})
    cfg.__dict__.update(values)
    cfg.name = os.path.splitext(os.path.basename(path))[0]
    if cfg.run_dir is None:
        cfg.run_dir = os.path.join('runs', cfg.name)
    return cfg


def config_parser(description):
    """The command line of a config-driven script (train.py, eval.py): --config and --set, and
    the one-line user errors of pbn_gluon.errors.ArgumentParser (add the script's own options)."""
    parser = ArgumentParser(description=description + ' (a user error is one line on stderr, '
                                                      'exit code 2; PBN_GLUON_DEBUG=1 or --debug: '
                                                      'its traceback)')
    parser.add_argument('--config', required=True, help='YAML experiment config')
    parser.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE',
                        help='override config keys (values in YAML syntax)')
    return parser


def run_with_config(prog, args, body):
    """body(args, cfg) with the config of `args` (--config, --set): a user error, the config's
    included, is one line ``PROG: error: ...`` on stderr and exit code 2."""
    with user_errors(prog):
        body(args, load_config(args.config, args.set))
