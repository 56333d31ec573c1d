"""Exact synchronous BatchNorm over any pbn_gluon.comm backend (the baseline PBN is compared with).

Per channel, S = sum over every device of the job of the local sums [sum x, sum x^2, n] of the
CURRENT batch:

    mu = S_1 / S_n,  var = S_2 / S_n - mu^2,  y = gamma (x - mu) / sqrt(var + eps) + beta

The sum over devices is a custom operator whose backward is again a sum over devices, so
autograd yields BatchNorm's gradient on the concatenated batch. That costs two blocking
exchanges per layer and step (forward and backward): the price PBN avoids.

Unlike mxnet.gluon.contrib.nn.SyncBatchNorm, no engine worker waits: the exchange runs in
MXNet's custom-operator threads and pushes ordinary engine operations, so it works on several
CPU contexts of one process as well as across processes (Horovod, KVStore dist_sync).
"""
import os

# Several devices each park one custom-op thread at every layer they have reached; the default
# pool (16) could be exhausted by 8 devices with parallel branches. Read once, at first use.
os.environ.setdefault('MXNET_CUSTOM_OP_NUM_THREADS', '256')

import mxnet as mx  # noqa: E402  (after the environment variable above)

from .batch_stats import BatchStatsNorm, moments_to_sums, sums_to_moments  # noqa: E402

__all__ = ['SyncBatchNorm']

# layer uid -> (comm, position of the layer in its StatsSync); filled by StatsSync
_ATTACHED = {}


def attach(layer, comm, index):
    _ATTACHED[layer.uid] = (comm, index)


def _exchange(uid, direction, array):
    if uid not in _ATTACHED:
        raise RuntimeError('SyncBatchNorm layer %s has no communicator: create '
                           'pbn_gluon.StatsSync(net, comm) before training' % uid)
    comm, index = _ATTACHED[uid]
    return comm.allreduce_device(array, 'pbn_gluon.syncbn.%d.%s' % (index, direction))


class _DeviceSum(mx.operator.CustomOp):
    def __init__(self, uid):
        super().__init__()
        self._uid = uid

    def forward(self, is_train, req, in_data, out_data, aux):
        value = _exchange(self._uid, 'fwd', in_data[0]) if is_train else in_data[0]
        self.assign(out_data[0], req[0], value)

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        self.assign(in_grad[0], req[0], _exchange(self._uid, 'bwd', out_grad[0]))


@mx.operator.register('pbn_gluon_device_sum')
class _DeviceSumProp(mx.operator.CustomOpProp):
    def __init__(self, uid):
        super().__init__(need_top_grad=True)
        self._uid = uid

    def list_arguments(self):
        return ['data']

    def list_outputs(self):
        return ['output']

    def infer_shape(self, in_shape):
        return in_shape, [in_shape[0]], []

    def declare_backward_dependency(self, out_grad, in_data, out_data):
        return [out_grad[0]]

    def create_operator(self, ctx, shapes, dtypes):
        return _DeviceSum(self._uid)


class SyncBatchNorm(BatchStatsNorm):
    """Synchronous BatchNorm across every device of a pbn_gluon.comm backend.

    Takes every argument of mxnet.gluon.nn.BatchNorm and saves exactly its parameters. Attach
    it with ``pbn_gluon.StatsSync(net, comm)``; ``sync.step()`` then updates the running
    statistics (from the global moments, identical on every device) once per iteration.
    All devices of a process must run forward and backward of every step.
    """

    _uids = 0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        SyncBatchNorm._uids += 1
        self.uid = '%s#%d' % (self.name, SyncBatchNorm._uids)

    def _train_moments(self, F, mean, var, count):
        sums = F.Custom(moments_to_sums(F, mean, var, count), uid=self.uid,
                        op_type='pbn_gluon_device_sum')
        g_mean, g_var = sums_to_moments(F, sums)
        return g_mean, g_var, sums
