"""pbn_gluon: Progressive Batch Normalization for MXNet Gluon.

    import pbn_gluon
    net = get_model('resnet18_v1b', norm_layer=pbn_gluon.ProgressiveBatchNorm)  # or convert_norm
    trainer = pbn_gluon.Trainer(net.collect_params(), 'sgd', {...})   # as gluon.Trainer
    ... forward / backward / trainer.step(...) ...     # step() also exchanges the statistics

    (custom loops: sync = StatsSync(net, LocalComm(ctxs)); sync.step() after each backward)
"""

from . import ops, schedules
from .comm import Comm, LocalComm, KVStoreComm, HorovodComm, CountingComm
from .progressive_norm import ProgressiveBatchNorm
from .sync_norm import SyncBatchNorm
from .stats_sync import StatsSync, find_norm_layers
from .convert import convert_norm
from .export import export
from .trainer import Trainer

__version__ = '0.1.0'

__all__ = ['ProgressiveBatchNorm', 'SyncBatchNorm', 'Trainer', 'StatsSync', 'convert_norm', 'export',
           'find_norm_layers', 'Comm', 'LocalComm', 'KVStoreComm', 'HorovodComm',
           'CountingComm', 'ops', 'schedules']
