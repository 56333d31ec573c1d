"""Exact synchronous BatchNorm over any pbn_gluon.comm backend (the baseline PBN is compared with).

Per channel, S = sum over every device of the job of the local sums [sum x, sum x^2, n] of the
CURRENT batch:

    mu = S_1 / S_n,  var = S_2 / S_n - mu^2,  y = gamma (x - mu) / sqrt(var + eps) + beta

A layer is three operators on the same kernels as ProgressiveBatchNorm's: ``pbn_batch_sums``
(one pass over x), the sum over devices (a custom operator, whose backward is again a sum over
devices), and ``pbn_batch_norm`` normalising with the group sums (one pass; backward: a
reduction pass for [sum dy, sum dy xhat] and an elementwise pass). Autograd through the three
yields BatchNorm's gradient on the concatenated batch. That costs two blocking exchanges per
layer and step (forward and backward): the price PBN avoids. The custom operator also tells
the graph the engine's mode, which picks these moments or the running statistics.

Unlike mxnet.gluon.contrib.nn.SyncBatchNorm, nothing waits: the custom operator only pushes
engine operations (the devices of one process meet through pbn_gluon.engine's deferred writes),
so it works hybridized on several CPU contexts of one process, and across processes (Horovod,
KVStore dist_sync) on any device.
"""
import weakref

import mxnet as mx
import numpy as np

from .batch_stats import BatchStatsNorm
from .op_contract import mode_value

__all__ = ['SyncBatchNorm']

# uid -> layer, for the custom operator, which MXNet builds from strings; entries leave with
# their layers
_LAYERS = weakref.WeakValueDictionary()


def _exchange(uid, device, direction, array, out, req, op, keep=False):
    """op's output `out` (request `req`) := sum over every device of the job of `array`, this
    device's contribution; with `keep`, the sum also goes to the layer's batch_sums.
    (On CPU the operator's arrays all say cpu(0): `device` is the truth.)"""
    if req == 'null':
        return
    layer = _LAYERS.get(uid)
    if layer is None or layer.exchange is None:
        raise RuntimeError('SyncBatchNorm layer %s has no exchange: create '
                           'pbn_gluon.StatsSync(net, comm) before training' % uid)
    target = out if req in ('write', 'inplace') else mx.nd.empty(out.shape, out.context)
    layer.exchange.allreduce(layer.exchange_index, direction, device, array, target, keep)
    if target is not out:
        op.assign(out, req, target)


class _DeviceSum(mx.operator.CustomOp):
    def __init__(self, uid, device, keep):
        super().__init__()
        self._uid, self._device, self._keep = uid, device, keep

    def forward(self, is_train, req, in_data, out_data, aux):
        # the second output tells pbn_batch_norm the engine's mode (1: inference)
        self.assign(out_data[1], req[1], mx.nd.full((1,), mode_value(is_train),
                                                    out_data[1].context))
        if is_train:
            _exchange(self._uid, self._device, 'fwd', in_data[0], out_data[0], req[0], self,
                      keep=self._keep)
        else:  # inference uses the running statistics; the sums are not needed
            self.assign(out_data[0], req[0], in_data[0])

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        _exchange(self._uid, self._device, 'bwd', out_grad[0], in_grad[0], req[0], self)


@mx.operator.register('pbn_gluon_device_sum')
class _DeviceSumProp(mx.operator.CustomOpProp):
    """The exchange. No auxiliary state: MXNet 1.9 infers the storage types of a custom
    operator's backward from uninitialised memory when it has one (about 1 step in 30 failed
    with "Storage type inconsistent" on 2 CPU contexts, and the other device then waited)."""

    def __init__(self, uid, keep='0'):
        super().__init__(need_top_grad=True)
        self._uid, self._keep = uid, keep == '1'

    def list_arguments(self):
        # keep: the layer's batch_sums, which the exchange writes (as a graph input, it is one)
        return ['data', 'batch_sums'] if self._keep else ['data']

    def list_outputs(self):
        return ['output', 'is_inference']

    def infer_shape(self, in_shape):
        if self._keep:      # batch_sums: the (3, C) sums, flat (deferred init learns C here)
            in_shape = [in_shape[0], (int(np.prod(in_shape[0])),)]
        return in_shape, [in_shape[0], (1,)], []

    def infer_type(self, in_type):
        # the sums are double (exact exchange), the mode flag float32 like the data
        return in_type, [in_type[0], np.float32], []

    def declare_backward_dependency(self, out_grad, in_data, out_data):
        return [out_grad[0]]

    def create_operator(self, ctx, shapes, dtypes):
        return _DeviceSum(self._uid, ctx, self._keep)


class SyncBatchNorm(BatchStatsNorm):
    """Synchronous BatchNorm across every device of a pbn_gluon.comm backend.

    Takes every argument of mxnet.gluon.nn.BatchNorm and saves exactly its parameters.
    ``pbn_gluon.StatsSync(net, comm)`` attaches it to an exchange over `comm`
    (pbn_gluon.rendezvous.SyncExchange) before its first forward pass; ``sync.step()`` then
    updates the running statistics (from the global moments, identical on every device) once
    per iteration. All devices of a process must run forward
    and backward of every step.
    """

    local_stats = False
    _uids = 0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        SyncBatchNorm._uids += 1
        self.uid = '%s#%d' % (self.name, SyncBatchNorm._uids)
        self.exchange, self.exchange_index = None, None
        _LAYERS[self.uid] = self

    def attach(self, exchange, index):
        """Exchange through `exchange` (a pbn_gluon.rendezvous.SyncExchange, made by StatsSync)
        as its `index`-th layer. The graph depends on it: cached graphs are dropped."""
        self.exchange, self.exchange_index = exchange, index
        self._clear_cached_op()

    def _meets_in_host_memory(self):
        """True when the layer's devices are several CPU contexts of this process."""
        return self.exchange is not None and self.exchange.in_host_memory

    def hybrid_forward(self, F, x, gamma, beta, running_mean, running_var, batch_sums):
        if not self._use_global_stats and self._meets_in_host_memory():
            if F is mx.symbol:
                self._note_tracers()
            return self._native_forward(F, x, gamma, beta, running_mean, running_var,
                                        batch_sums)
        return super().hybrid_forward(F, x, gamma, beta, running_mean, running_var, batch_sums)

    def _group_inputs(self, F, x, batch_sums):
        sums = F.pbn_batch_sums(x, axis=self._axis)
        # pbn_batch_norm keeps the group sums in batch_sums
        group_sums, is_inference = F.Custom(sums, uid=self.uid, op_type='pbn_gluon_device_sum')
        # sync mode is local weight 0 (pbn_math.h): a real 0, one one-element operator; the
        # kernels do not read it with local_stats=0, so no state or exchange is needed for it
        return group_sums, F.zeros_like(is_inference), is_inference

    def _native_forward(self, F, x, gamma, beta, running_mean, running_var, batch_sums):
        """The same layer in MXNet's own operators, for several CPU contexts of one process.

        Every extension-library operator takes one of MXNet's process-wide parallel-random
        copies (MXNET_CPU_PARALLEL_RAND_COPY, ~5 MB each); nodes of two devices on one copy run
        in push order, and across this layer's meeting that order can wait on itself unless
        every node has its own copy (docs/limitations.md). MXNet's reductions and
        broadcast operators need at most temp space, whose copies are cheap.

        The sums are double: Q - M^2 would cancel in float32 once |mean| / std passes ~100.
        y = (x - mean) scale + beta with (mean, var) this step's group moments while training
        (beta less scale times the float32 mean's rounding)
        and the running statistics in inference, scale = gamma / sqrt(var + eps): the mean is
        subtracted first, so that nothing cancels in float32 (three elementwise passes where
        BatchNorm's fused inference operator is one, but that operator would need
        y = (x - running_mean) scale' + beta', whose two terms are |mean - running_mean| / std
        times y, and whose dgamma and dx are their float32 differences)."""
        eps, axis = self._epsilon, self._axis
        x64 = F.cast(x, 'float64')
        shape = F.cast(F.shape_array(x), 'float64')
        count = F.BlockGrad(F.prod(shape) / F.slice_axis(
            shape, axis=0, begin=axis, end=axis + 1 if axis != -1 else None))
        total = lambda v: F.sum(v, axis=axis, exclude=True)
        # (1, C, 1, ...) for any axis: a per-channel vector reshaped like it broadcasts over x
        channel_shaped = F.sum(x64, axis=axis, exclude=True, keepdims=True)
        per_channel = lambda v: F.reshape_like(v, channel_shaped)
        sum_x = F.reshape(channel_shaped, (-1,))
        sums = F.stack(sum_x, total(F.square(x64)), F.broadcast_mul(F.ones_like(sum_x), count),
                       axis=0)
        group, is_inference = F.Custom(sums, batch_sums, uid=self.uid, keep='1',
                                       op_type='pbn_gluon_device_sum')
        count = F.slice_axis(group, axis=0, begin=2, end=3)
        mean = F.reshape(F.slice_axis(group, axis=0, begin=0, end=1) / count, (-1,))
        var = F.relu(F.reshape(F.slice_axis(group, axis=0, begin=1, end=2) / count, (-1,))
                     - F.square(mean))
        mean32, var = F.cast(mean, 'float32'), F.cast(var, 'float32')
        # the float32 mean is off by up to |mean| 2^-24; beta takes the difference
        rounding = F.cast(mean - F.cast(mean32, 'float64'), 'float32')
        training = F.broadcast_mul(1 - is_inference, F.ones_like(mean32))
        mean = F.where(training, mean32, running_mean)
        var = F.where(training, var, running_var)
        if not self._scale:
            gamma = F.ones_like(gamma)
        scale = gamma * F.rsqrt(var + eps)
        beta = beta - scale * rounding * training
        centred = F.broadcast_sub(x, per_channel(mean))
        return F.broadcast_add(F.broadcast_mul(centred, per_channel(scale)), per_channel(beta))
