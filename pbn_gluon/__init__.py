"""pbn_gluon: Progressive Batch Normalization for MXNet Gluon.

    import pbn_gluon
    net = get_model('resnet18_v1b', norm_layer=pbn_gluon.ProgressiveBatchNorm)  # or convert_norm
    trainer = pbn_gluon.Trainer(net.collect_params(), 'sgd', {...})   # as gluon.Trainer
    ... forward / backward / trainer.step(...) ...     # step() also exchanges the statistics

    (custom loops: sync = StatsSync(net, LocalComm(ctxs)); sync.step() after each backward)

The names below are imported on first use (PEP 562), so that ``python -m pbn_gluon.launch``
starts a job without importing MXNet.
"""
import importlib
import sys
import types

__version__ = '0.1.0'

_FROM = {'ProgressiveBatchNorm': 'progressive_norm', 'SyncBatchNorm': 'sync_norm',
         'StatsSync': 'stats_sync', 'find_norm_layers': 'stats_sync', 'convert_norm': 'convert',
         'export': 'export', 'Trainer': 'trainer', 'Comm': 'comm', 'LocalComm': 'comm',
         'KVStoreComm': 'comm', 'HorovodComm': 'comm', 'CountingComm': 'comm',
         'ops': None, 'schedules': None}

__all__ = sorted(_FROM)


def __getattr__(name):
    if name not in _FROM:
        raise AttributeError('module %r has no attribute %r' % (__name__, name))
    module = importlib.import_module('.' + (_FROM[name] or name), __name__)
    value = module if _FROM[name] is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_FROM))


class _Package(types.ModuleType):
    """Keeps pbn_gluon.export the function: importing the submodule pbn_gluon.export (which
    sets the package's attribute of that name) must not replace it."""

    def __setattr__(self, name, value):
        if name == 'export' and isinstance(value, types.ModuleType):
            value = value.export
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
