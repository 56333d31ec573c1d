"""Exact synchronous BatchNorm over any pbn_gluon.comm backend (the baseline PBN is compared with).

Per channel, S = sum over every device of the job of the local sums [sum x, sum x^2, n] of the
CURRENT batch:

    mu = S_1 / S_n,  var = S_2 / S_n - mu^2,  y = gamma (x - mu) / sqrt(var + eps) + beta

The sum over devices is a custom operator whose backward is again a sum over devices, so
autograd yields BatchNorm's gradient on the concatenated batch. That costs two blocking
exchanges per layer and step (forward and backward): the price PBN avoids. The operator also
outputs the engine's training mode, which picks these moments or the running statistics.

Unlike mxnet.gluon.contrib.nn.SyncBatchNorm, nothing waits: the custom operator only pushes
engine operations (the devices of one process meet through pbn_gluon.engine's deferred writes),
so it works hybridized on several CPU contexts of one process, and across processes (Horovod,
KVStore dist_sync) on any device.
"""
import mxnet as mx

from .batch_stats import BatchStatsNorm, moments_to_sums, sums_to_moments

__all__ = ['SyncBatchNorm']

# layer uid -> (comm, position of the layer in its StatsSync); filled by StatsSync
_ATTACHED = {}


def attach(layer, comm, index):
    _ATTACHED[layer.uid] = (comm, index)


def exchange_tag(index, direction):
    """Name of the exchange of the `index`-th SyncBatchNorm layer of a StatsSync, 'fwd' or 'bwd'."""
    return 'pbn_gluon.syncbn.%d.%s' % (index, direction)


def _exchange(uid, device, direction, array, out, req, op):
    """op's output `out` (request `req`) := sum over every device of the job of `array`, this
    device's contribution. (On CPU the operator's arrays all say cpu(0): `device` is the truth.)"""
    if req == 'null':
        return
    if uid not in _ATTACHED:
        raise RuntimeError('SyncBatchNorm layer %s has no communicator: create '
                           'pbn_gluon.StatsSync(net, comm) before training' % uid)
    comm, index = _ATTACHED[uid]
    target = out if req in ('write', 'inplace') else mx.nd.empty(out.shape, out.context)
    comm.allreduce_device(array, target, exchange_tag(index, direction), device)
    if target is not out:
        op.assign(out, req, target)


class _DeviceSum(mx.operator.CustomOp):
    def __init__(self, uid, device):
        super().__init__()
        self._uid, self._device = uid, device

    def forward(self, is_train, req, in_data, out_data, aux):
        # the second output tells the graph the engine's mode (no random numbers needed)
        self.assign(out_data[1], req[1], mx.nd.full((1,), float(is_train), out_data[1].context))
        if is_train:
            _exchange(self._uid, self._device, 'fwd', in_data[0], out_data[0], req[0], self)
        else:  # inference uses the running statistics; the sums are not needed
            self.assign(out_data[0], req[0], in_data[0])

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        _exchange(self._uid, self._device, 'bwd', out_grad[0], in_grad[0], req[0], self)


@mx.operator.register('pbn_gluon_device_sum')
class _DeviceSumProp(mx.operator.CustomOpProp):
    def __init__(self, uid):
        super().__init__(need_top_grad=True)
        self._uid = uid

    def list_arguments(self):
        return ['data']

    def list_outputs(self):
        return ['output', 'training']

    def infer_shape(self, in_shape):
        return in_shape, [in_shape[0], (1,)], []

    def declare_backward_dependency(self, out_grad, in_data, out_data):
        return [out_grad[0]]

    def create_operator(self, ctx, shapes, dtypes):
        return _DeviceSum(self._uid, ctx)


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
        sums, training = F.Custom(moments_to_sums(F, mean, var, count), uid=self.uid,
                                  op_type='pbn_gluon_device_sum')
        g_mean, g_var = sums_to_moments(F, sums)
        return g_mean, g_var, sums, F.broadcast_mul(training, F.ones_like(mean))
