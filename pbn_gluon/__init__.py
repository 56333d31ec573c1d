"""pbn_gluon: Progressive Batch Normalization for MXNet Gluon.

    from pbn_gluon import ProgressiveBatchNorm, StatsSync, LocalComm
    net = get_model('resnet18_v1b', norm_layer=ProgressiveBatchNorm)   # or convert_norm(net, ...)
    sync = StatsSync(net, LocalComm(ctxs))
    ... forward / backward / trainer.step(...) ...; sync.step()
"""
import os

# Several CPU contexts of one process share MXNet's temp-space and random-number resources; an op
# of device 0 that waits (in the engine) for a SyncBatchNorm exchange would make device 1's ops
# on the same resource copy queue behind it. One copy per graph node avoids that for small nets.
# MXNet reads these when it first allocates a resource, so they must be set early.
os.environ.setdefault('MXNET_CPU_TEMP_COPY', '512')
os.environ.setdefault('MXNET_CPU_PARALLEL_RAND_COPY', '512')

from . import schedules  # noqa: E402
from .comm import Comm, LocalComm, KVStoreComm, HorovodComm  # noqa: E402
from .progressive_norm import ProgressiveBatchNorm  # noqa: E402
from .sync_norm import SyncBatchNorm  # noqa: E402
from .stats_sync import StatsSync, find_norm_layers  # noqa: E402
from .convert import convert_norm  # noqa: E402

__version__ = '0.1.0'

__all__ = ['ProgressiveBatchNorm', 'SyncBatchNorm', 'StatsSync', 'convert_norm',
           'find_norm_layers', 'Comm', 'LocalComm', 'KVStoreComm', 'HorovodComm', 'schedules']
