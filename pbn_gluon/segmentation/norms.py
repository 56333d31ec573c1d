"""The normalization layers a segmentation model can be built with: bn, syncbn, pbn, gn.

GluonCV models call ``norm_layer(in_channels=C, **norm_kwargs)`` (sometimes with extra
initializer arguments, and in Xception once without norm_kwargs), so each choice is returned as
one callable with its settings bound.
"""
import functools

from mxnet.gluon import nn
from mxnet.gluon.contrib.nn import SyncBatchNorm as ContribSyncBatchNorm

from .. import schedules
from ..progressive_norm import ProgressiveBatchNorm
from ..sync_norm import SyncBatchNorm

__all__ = ['NORMS', 'GroupNorm', 'get_norm_layer', 'pbn_local_weight']

NORMS = ('bn', 'syncbn', 'pbn', 'gn')


class GroupNorm(nn.HybridBlock):
    """Group Normalization (Wu & He, 2018) with a per-channel affine map, built with BatchNorm's
    constructor as GluonCV calls it. (mxnet.gluon.nn.GroupNorm of MXNet 1.x has one gamma and
    beta per group, and no in_channels.)

        y = gamma_c (x - mean_g) / sqrt(var_g + eps) + beta_c,  moments over (C/G, H, W)
    """

    def __init__(self, in_channels, num_groups=32, epsilon=1e-5, center=True, scale=True,
                 beta_initializer='zeros', gamma_initializer='ones', **kwargs):
        super().__init__(**kwargs)
        if in_channels % num_groups:
            raise ValueError('GroupNorm: %d channels do not split into %d groups'
                             % (in_channels, num_groups))
        self._num_groups, self._epsilon = num_groups, epsilon
        self.gamma = self.params.get('gamma', grad_req='write' if scale else 'null',
                                     shape=(in_channels,), init=gamma_initializer)
        self.beta = self.params.get('beta', grad_req='write' if center else 'null',
                                    shape=(in_channels,), init=beta_initializer)

    def hybrid_forward(self, F, x, gamma, beta):
        ones = F.ones_like(F.slice_axis(gamma, axis=0, begin=0, end=self._num_groups))
        y = F.GroupNorm(x, ones, F.zeros_like(ones), num_groups=self._num_groups,
                        eps=self._epsilon)
        return F.broadcast_add(F.broadcast_mul(y, F.reshape(gamma, (1, -1, 1, 1))),
                               F.reshape(beta, (1, -1, 1, 1)))

    def __repr__(self):
        return '%s(%d channels, num_groups=%d, eps=%g)' % (
            type(self).__name__, self.gamma.shape[0], self._num_groups, self._epsilon)


def pbn_local_weight(schedule='linear', start=0, steps=1000, final=None):
    """The PBN local-weight schedule from config values: 'linear' or 'cosine' ramps from 1 to
    `final` (default 1/G) over `steps` steps after `start`, or a constant float."""
    if isinstance(schedule, str):
        return schedules.local_weight_schedule(schedule, start=start, steps=steps, final=final)
    return schedules.local_weight_schedule(schedule)


def get_norm_layer(norm, ctx, in_process=True, gn_groups=32, pbn_kwargs=None):
    """A ``norm_layer`` callable for GluonCV models.

    norm: 'bn' (per-device BatchNorm), 'syncbn', 'pbn' or 'gn'.
    ctx: the contexts of this process. in_process: True when they are all of the job's devices
    (backend local); False when devices are spread over processes (Horovod, KVStore dist).

    syncbn is mxnet.gluon.contrib.nn.SyncBatchNorm for several GPUs of one process (the standard
    SyncBN), else pbn_gluon.SyncBatchNorm: the contrib layer deadlocks on CPU contexts and does
    not work across processes. pbn_kwargs go to ProgressiveBatchNorm (local_weight, group_size,
    global_momentum, backward).
    """
    ctx = list(ctx)
    if norm == 'bn':
        return nn.BatchNorm
    if norm == 'syncbn':
        if in_process and len(ctx) > 1 and all(c.device_type == 'gpu' for c in ctx):
            return functools.partial(ContribSyncBatchNorm, num_devices=len(ctx))
        return SyncBatchNorm
    if norm == 'pbn':
        return functools.partial(ProgressiveBatchNorm, **(pbn_kwargs or {}))
    if norm == 'gn':
        return functools.partial(GroupNorm, num_groups=gn_groups)
    raise ValueError('unknown norm %r: choose one of %s' % (norm, ', '.join(NORMS)))
