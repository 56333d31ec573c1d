"""pbn_gluon: Progressive Batch Normalization for MXNet Gluon.

    from pbn_gluon import ProgressiveBatchNorm, StatsSync, LocalComm
    net = get_model('resnet18_v1b', norm_layer=ProgressiveBatchNorm)   # or convert_norm(net, ...)
    sync = StatsSync(net, LocalComm(ctxs))
    ... forward / backward / trainer.step(...) ...; sync.step()
"""

from . import ops, schedules
from .comm import Comm, LocalComm, KVStoreComm, HorovodComm, CountingComm
from .progressive_norm import ProgressiveBatchNorm
from .sync_norm import SyncBatchNorm
from .stats_sync import StatsSync, find_norm_layers
from .convert import convert_norm
from .export import export
from .training import train_step

__version__ = '0.1.0'

__all__ = ['ProgressiveBatchNorm', 'SyncBatchNorm', 'StatsSync', 'convert_norm', 'export',
           'find_norm_layers', 'train_step', 'Comm', 'LocalComm', 'KVStoreComm', 'HorovodComm',
           'CountingComm', 'ops', 'schedules']
