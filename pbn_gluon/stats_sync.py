"""StatsSync: the one line a training loop adds, ``sync.step()`` once per iteration.

At step t (after backward), for the layers of a net:

- ProgressiveBatchNorm: every layer's local sums of step t sit, per device, in one flat buffer
  (the layers' ``batch_sums`` are views into it). ONE fused, non-blocking exchange (allreduce,
  or allgather + group sum when G < devices) turns them into the group sums, written where the
  layers' ``global_sums`` views point: step t+1's forward reads them as graph inputs.
- ProgressiveBatchNorm and SyncBatchNorm: running statistics from the step's global moments,
  identical on every device of a group:
      running_mean = m running_mean + (1 - m) M,  running_var = m running_var + (1 - m) V
- the local weights w_{t+1} of every PBN layer, from its schedule.

All of it is pushed to the engine; nothing here waits for a device.
"""
import warnings
import zlib

import numpy as np
from mxnet import ndarray as nd
from mxnet.gluon import HybridBlock

from .batch_stats import BatchStatsNorm
from .comm import cpu_resource_advice
from .progressive_norm import ProgressiveBatchNorm
from .sync_norm import SyncBatchNorm, attach, exchange_tag

__all__ = ['StatsSync', 'find_norm_layers']

EXCHANGE_TAG = 'pbn_gluon.stats'


def find_norm_layers(net):
    """The ProgressiveBatchNorm and SyncBatchNorm layers of `net` that use batch statistics,
    in definition order."""
    found, seen = [], set()

    def visit(block):
        if id(block) in seen:
            return
        seen.add(id(block))
        if isinstance(block, BatchStatsNorm) and not block.use_global_stats:
            found.append(block)
        for child in block._children.values():
            visit(child)
    visit(net)
    return found


def _clear_cached_graphs(block):
    if isinstance(block, HybridBlock):
        block._clear_cached_op()
    for child in block._children.values():
        _clear_cached_graphs(child)


class StatsSync:
    """Exchanges the batch statistics of a net's PBN/SyncBN layers through `comm`.

    Parameters
    ----------
    net : gluon.Block
        A net with ProgressiveBatchNorm and/or SyncBatchNorm layers (see convert_norm).
    comm : pbn_gluon.comm.Comm
        LocalComm, KVStoreComm or HorovodComm; its contexts are the net's contexts.

    Call ``step()`` once per training iteration, after ``backward()``. ``state_dict()`` and
    ``load_state_dict()`` carry the exchange state (step, last global moments) in a
    training checkpoint, so that a resumed run continues exactly.
    """

    def __init__(self, net, comm):
        self.net, self.comm = net, comm
        self.layers = find_norm_layers(net)
        if not self.layers:
            raise ValueError(
                'StatsSync: %s has no ProgressiveBatchNorm or SyncBatchNorm layer in training '
                'mode; convert it first with pbn_gluon.convert_norm(net, ProgressiveBatchNorm)'
                % type(net).__name__)
        self.pbn = [l for l in self.layers if isinstance(l, ProgressiveBatchNorm)]
        self.syncbn = [l for l in self.layers if isinstance(l, SyncBatchNorm)]
        for index, layer in enumerate(self.syncbn):
            attach(layer, comm, index)
        if self.syncbn:     # a SyncBatchNorm's graph depends on its communicator
            _clear_cached_graphs(net)
        advice = cpu_resource_advice(comm.contexts) if self.syncbn else None
        if advice:
            warnings.warn('SyncBatchNorm on %d CPU contexts of one process may stall. %s'
                          % (len(comm.contexts), advice))
        for layer in self.pbn:
            layer.check_devices(comm.size)
        self._prepare_syncbn()
        self.step_count = 0
        self._bound = None
        self._weights = None

    def _prepare_syncbn(self):
        channels = [layer.gamma.shape[0] if layer.gamma.shape else 0 for layer in self.syncbn]
        if 0 in channels:
            if self.comm.needs_prepare:
                raise ValueError(
                    '%s needs the channel counts of every SyncBatchNorm before training: give '
                    'in_channels, or run one forward pass outside autograd.record() (which '
                    'exchanges nothing) before creating StatsSync' % self.comm)
            return
        self.comm.prepare([(exchange_tag(i, d), (3, c)) for i, c in enumerate(channels)
                           for d in ('fwd', 'bwd')])

    @property
    def exchanges_per_step(self):
        """(non-blocking, blocking) exchanges one training step makes."""
        return (1 if self.pbn else 0), 2 * len(self.syncbn)

    # -- binding the layers' state to flat per-device buffers ---------------------------------

    def _stale(self):
        return self._bound is None or any(
            param._data is not lst or param._data[0] is not first
            for param, lst, first in self._bound)

    def _bind(self):
        ctxs = self.comm.contexts
        for layer in self.layers:
            if layer.gamma._data is None:
                raise RuntimeError('StatsSync.step(): %s is not initialized; run a forward and '
                                   'backward pass first' % layer.name)
            if set(layer.gamma.list_ctx()) != set(ctxs):
                raise ValueError('%s lives on %s but the communicator drives %s'
                                 % (layer.name, layer.gamma.list_ctx(), ctxs))
        order = self.pbn + self.syncbn
        channels = [layer.gamma.shape[0] for layer in order]
        pbn_channels = channels[:len(self.pbn)]
        self._check_same_net(channels)

        self.local = [nd.zeros(3 * sum(pbn_channels), ctx=c) for c in ctxs] if self.pbn else []
        self.stats = [nd.zeros(3 * sum(channels), ctx=c) for c in ctxs]
        self.running_mean = [nd.zeros(sum(channels), ctx=c) for c in ctxs]
        self.running_var = [nd.zeros(sum(channels), ctx=c) for c in ctxs]
        self.weights = [nd.ones(len(self.pbn), ctx=c) for c in ctxs] if self.pbn else []
        bound = []

        def bind(param, flats, start, stop):
            for i, ctx in enumerate(ctxs):
                view = flats[i][start:stop].reshape(param.shape)
                view[:] = param.data(ctx)
                param._data[param.list_ctx().index(ctx)] = view
            bound.append((param, param._data, param._data[0]))

        offset = 0
        for index, (layer, c) in enumerate(zip(order, channels)):
            bind(layer.running_mean, self.running_mean, offset, offset + c)
            bind(layer.running_var, self.running_var, offset, offset + c)
            if isinstance(layer, ProgressiveBatchNorm):
                bind(layer.batch_sums, self.local, 3 * offset, 3 * offset + 3 * c)
                bind(layer.global_sums, self.stats, 3 * offset, 3 * offset + 3 * c)
                bind(layer.local_weight, self.weights, index, index + 1)
            else:
                bind(layer.batch_sums, self.stats, 3 * offset, 3 * offset + 3 * c)
            offset += c
        self._bound = bound

        # where [S_1, S_2, S_n] of every channel sit in the stats buffer, and the momenta
        starts = np.repeat(3 * np.cumsum([0] + channels[:-1]), channels)
        within = np.concatenate([np.arange(c) for c in channels])
        rows = np.repeat(channels, channels)
        gather = np.stack([starts + within + k * rows for k in range(3)]).astype(np.float32)
        momentum = np.repeat([l.momentum for l in order], channels)
        self._gather = [nd.array(gather, ctx=c) for c in ctxs]
        self._momentum = [nd.array(momentum, ctx=c) for c in ctxs]
        self._pbn_size = 3 * sum(pbn_channels)
        self._pbn_channels = pbn_channels
        self._group_masks = {}
        self._weights = None

    def _check_same_net(self, channels):
        """Processes whose nets differ would exchange mismatched buffers: fail clearly."""
        if self.comm.size == len(self.comm.contexts):
            return
        crc = zlib.crc32(np.asarray(channels, dtype=np.int64).tobytes()) & 0xFFFFFF
        mine = nd.array([len(channels), sum(channels) % (1 << 24), crc],
                        ctx=self.comm.contexts[0], dtype='float32')
        rows = self.comm.allgather([mine.copyto(c) for c in self.comm.contexts],
                                   'pbn_gluon.signature')[0].asnumpy()
        if not (rows == rows[:1]).all():
            raise ValueError('processes run different nets: per rank [norm layers, channels, '
                             'crc] = %s' % rows.astype(np.int64).tolist())

    # -- the step ---------------------------------------------------------------------------

    def step(self):
        """Exchange this step's statistics; call once per iteration after backward()."""
        self.comm.check()       # raises if a SyncBatchNorm exchange timed out
        if self._stale():
            self._bind()
        t = self.step_count
        if self.pbn:
            self._exchange(t)
        self._update_running()
        self.step_count = t + 1
        self._set_weights(self.step_count)

    def _group_sizes(self, t):
        return [layer.group_size_at(t, self.comm.size) for layer in self.pbn]

    def _exchange(self, t):
        sizes = self._group_sizes(t)
        pbn_stats = [s[:self._pbn_size] for s in self.stats]
        if all(g == self.comm.size for g in sizes):
            self.comm.allreduce_(self.local, EXCHANGE_TAG)
            for src, dst in zip(self.local, pbn_stats):
                dst[:] = src
            return
        gathered = self.comm.allgather(self.local, EXCHANGE_TAG)
        for rank, rows, dst, ctx in zip(self.comm.ranks, gathered, pbn_stats, self.comm.contexts):
            total = None
            for g in sorted(set(sizes)):
                first = rank // g * g
                part = nd.sum(rows[first:first + g], axis=0) * self._group_mask(sizes, g, ctx)
                total = part if total is None else total + part
            dst[:] = total

    def _group_mask(self, sizes, g, ctx):
        key = (tuple(sizes), g, ctx)
        if key not in self._group_masks:
            mask = np.concatenate([np.full(3 * c, float(s == g))
                                   for s, c in zip(sizes, self._pbn_channels)])
            self._group_masks[key] = nd.array(mask, ctx=ctx)
        return self._group_masks[key]

    def _update_running(self):
        for i in range(len(self.comm.contexts)):      # one fused operator per device
            nd.pbn_running_update(self.stats[i], self._gather[i], self._momentum[i],
                                  self.running_mean[i], self.running_var[i])

    def _set_weights(self, t):
        if not self.pbn:
            return
        sizes = self._group_sizes(t)
        weights = [layer.local_weight_at(t, g) for layer, g in zip(self.pbn, sizes)]
        if weights != self._weights:
            host = np.asarray(weights, dtype=np.float32)
            for w in self.weights:
                # through a fresh array: writing numpy into w would wait for this step's reads
                w[:] = nd.array(host, ctx=w.context)
            self._weights = weights

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self):
        """Exchange state for a training checkpoint (numpy arrays; blocks until computed)."""
        if self._stale():
            self._bind()
        return {'step': self.step_count,
                'stats': [s.asnumpy() for s in self.stats]}

    def load_state_dict(self, state):
        """Restore what state_dict() returned; the net's parameters must be loaded already."""
        if self._stale():
            self._bind()
        stats = state['stats']
        if len(stats) != len(self.stats) or any(a.shape != b.shape for a, b in zip(stats, self.stats)):
            raise ValueError('StatsSync state is for %d device(s) with buffers %s; this job has '
                             '%d with %s' % (len(stats), [a.shape for a in stats],
                                             len(self.stats), [b.shape for b in self.stats]))
        for src, dst in zip(stats, self.stats):
            dst[:] = src
        self.step_count = int(state['step'])
        self._weights = None
        if self.step_count:
            self._set_weights(self.step_count)
