"""StatsSync: the one line a training loop adds, ``sync.step()`` once per iteration, and the
contract between it and the norm layers.

Each layer's graph reads and writes state parameters that are views of StatsSync's flat
per-device buffers (pbn_gluon.stats_buffers: which state aliases which buffer); StatsSync owns
the buffers and the communicator, a layer owns its schedules and its graph:

- ProgressiveBatchNorm. Forward at step t writes [sum x, sum x^2, n] into ``batch_sums`` and
  reads ``global_sums`` and ``local_weight``; with ``backward='progressive'`` its backward
  writes [sum dy, sum dy*xhat] into the next two rows of ``batch_sums``. All of these are
  views, and the layer never communicates. ``sync.step()`` after the backward of step t takes
  every PBN layer's local rows (``pbn_take_sums``, which leaves count 0 behind, so a layer
  that does not run in a step sends nothing), makes ONE fused, non-blocking exchange of them in
  double (allreduce, or allgather + group sum when G < devices), hands the group sums to
  ``pbn_accept_sums`` (which averages them in with ``global_momentum``, or keeps the previous
  ones if any is NaN/Inf) and so fills ``global_sums`` for step t+1, then sets
  ``local_weight`` to w_{t+1} from the layer's schedules. The graph reads them as inputs:
  nothing waits.
- SyncBatchNorm. ``StatsSync`` attaches it to an exchange over the communicator
  (pbn_gluon.rendezvous.SyncExchange, which owns everything in-process SyncBN needs); its
  graph exchanges inside the layer, twice per step (forward and backward, blocking) and
  writes the group sums into ``batch_sums``, a view of ``fresh``.
- Both: ``sync.step()`` updates ``running_mean`` and ``running_var`` (views) from this step's
  accepted group sums (``fresh``), one fused operator per device (``pbn_running_update``,
  which consumes them: a channel of count 0 does not move):
      running_mean = m running_mean + (1 - m) M,  running_var = m running_var + (1 - m) V
  For PBN, (M, V) are the moments of the sums the next forward mixes in: with
  global_momentum a > 0 ('plus'), of the average G <- a G + (1 - a) G_t, not of G_t alone
  (so at w = 1 forward and backward are BatchNorm's, the running statistics are not; with
  a = 0 they are too). Measured on the demo: no better inference mIoU from G_t alone.

``step()`` checks the loop's order first, each a one-line RuntimeError that leaves the state as
it was (the next iteration works): no training forward since the last exchange (a second
``sync.step()``, or one after an evaluation forward: SyncBN's would wait for forwards that never
come), an exchange inside ``autograd.record()``, and, with ``check_gradients`` (the Trainer),
an exchange before the backward of a PBN layer's forward (its backward reads the weight and
group sums that the exchange rewrites).

The state is reached only through these views: a gluon Trainer or kvstore broadcast of the
state parameters writes copies (pbn_gluon.batch_stats.StateParameter), so ``sync.step()`` may
come before or after ``trainer.step()``. Everything is pushed to MXNet's engine; nothing here
waits for a device.
"""
import warnings
import zlib

import numpy as np
from mxnet import autograd
from mxnet import ndarray as nd
from mxnet.gluon import Block, HybridBlock, SymbolBlock

from .batch_stats import BatchStatsNorm, owner_layer
from . import op_contract, rendezvous
from .progressive_norm import ProgressiveBatchNorm
from .stats_buffers import StatsBuffers
from .sync_norm import SyncBatchNorm

__all__ = ['StatsSync', 'find_norm_layers']

EXCHANGE_TAG = 'pbn_gluon.stats'
#: steps between two reads of the exchanges' finiteness record (one small read per device)
HEALTH_READ_INTERVAL = 16


def find_norm_layers(net):
    """The ProgressiveBatchNorm and SyncBatchNorm layers of `net` that use batch statistics,
    in definition order; a SymbolBlock's are those behind its parameters (its graph was traced
    from them: GluonCV's SSD FeatureExpander)."""
    found, seen = [], set()

    def visit(block):
        if id(block) in seen:
            return
        seen.add(id(block))
        if isinstance(block, BatchStatsNorm) and not block.use_global_stats:
            found.append(block)
        if isinstance(block, SymbolBlock):
            for param in block.params.values():
                layer = owner_layer(param)
                if layer is not None:
                    visit(layer)
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
    net : gluon.Block, or a list of layers
        A net with ProgressiveBatchNorm and/or SyncBatchNorm layers (see convert_norm), or
        those layers themselves (as pbn_gluon.Trainer finds them behind its parameters).
    comm : pbn_gluon.comm.Comm
        LocalComm, KVStoreComm or HorovodComm; its contexts are the net's contexts.

    Call ``step()`` once per training iteration, after ``backward()``. ``state_dict()`` and
    ``load_state_dict()`` carry the exchange state (step, last global moments) in a
    training checkpoint, so that a resumed run continues exactly.
    """

    def __init__(self, net, comm):
        self.comm = comm
        if isinstance(net, Block):
            self.net, self.layers = net, find_norm_layers(net)
        else:
            self.net, self.layers = None, [l for l in net if not l.use_global_stats]
        if not self.layers:
            raise ValueError(
                'StatsSync: %s has no ProgressiveBatchNorm or SyncBatchNorm layer in training '
                'mode: build it with norm_layer=pbn_gluon.ProgressiveBatchNorm (GluonCV\'s '
                'get_model), or convert a built one with pbn_gluon.convert_norm(net, '
                'pbn_gluon.ProgressiveBatchNorm)' % type(net).__name__)
        self.pbn = [l for l in self.layers if isinstance(l, ProgressiveBatchNorm)]
        self.syncbn = [l for l in self.layers if isinstance(l, SyncBatchNorm)]
        # raises at once where in-process SyncBN would stall (MXNet's CPU resource settings)
        self.syncbn_exchange = (rendezvous.SyncExchange(comm, self.syncbn)
                                if self.syncbn else None)
        if self.syncbn:     # a SyncBatchNorm's graph depends on its exchange
            self._clear_graphs()
        for layer in self.pbn:
            layer.check_devices(comm.size)
        self._prepare_syncbn()
        self.step_count = 0
        self.buffers = None
        self._weights = None
        self._health = []
        self._nonfinite_steps = self._nonfinite_offset = 0
        self._health_read = 0
        self._warned = False

    def _clear_graphs(self):
        if self.net is not None:
            _clear_cached_graphs(self.net)
        for layer in self.layers:
            layer.clear_graphs()

    def _prepare_syncbn(self):
        channels = [layer.gamma.shape[0] if layer.gamma.shape else 0 for layer in self.syncbn]
        if 0 in channels:
            if self.comm.needs_prepare:
                raise ValueError(
                    '%s needs the channel counts of every SyncBatchNorm before training: give '
                    'in_channels, or let a HybridBlock infer them without running the net, '
                    'net.infer_shape(example_input), before creating StatsSync' % self.comm)
            return
        self.comm.prepare([(rendezvous.exchange_tag(i, d), (3, c), 'float64')
                           for i, c in enumerate(channels) for d in ('fwd', 'bwd')])

    # -- the buffers and what the step needs of them -----------------------------------------

    def _bind(self):
        ctxs = self.comm.contexts
        for layer in self.layers:
            if layer.gamma._data is None:
                raise RuntimeError('StatsSync.step(): %s is not initialized; run a forward and '
                                   'backward pass first' % layer.name)
            if set(layer.gamma.list_ctx()) != set(ctxs):
                raise ValueError('%s lives on %s but the communicator drives %s'
                                 % (layer.name, layer.gamma.list_ctx(), ctxs))
        self._check_same_net([layer.gamma.shape[0] for layer in self.pbn + self.syncbn])
        b = self.buffers = StatsBuffers(self.pbn, self.syncbn, ctxs)
        self._gather = [nd.array(b.gather_index(), ctx=c, dtype='float64') for c in ctxs]
        self._momentum = [nd.array(b.per_channel([l.momentum for l in b.order]), ctx=c)
                          for c in ctxs]
        if self.pbn:
            sums = lambda: [nd.zeros(b.pbn_size, ctx=c, dtype='float64') for c in ctxs]
            self._taken, self._scratch = sums(), sums()
            self._fresh = [f[:b.pbn_size] for f in b.fresh]
            # per-entry momentum of the exponential average of group sums (0: not averaged),
            # and all zeros for the first exchange, which starts the average
            rate = b.per_pbn_entry([l.global_momentum for l in self.pbn])
            self._rate = [nd.array(rate, ctx=c, dtype='float64') for c in ctxs]
            self._no_rate = sums()
        self._reset_health()
        self._group_masks = {}
        self._weights = None

    def _ensure_bound(self):
        if self.buffers is None or self.buffers.stale():
            self._bind()
            # a cached graph (static_alloc) keeps the engine dependencies of the arrays it was
            # built with: rebuilt, it orders its reads and writes of the state with StatsSync's
            self._clear_graphs()

    def _reset_health(self):
        """pbn_accept_sums' record per device: [steps with non-finite group sums, the first,
        steps with non-finite local sums, the first, exchanges since step _health_base]."""
        self._read_health()
        self._nonfinite_offset = self._nonfinite_steps
        self._health = [nd.array([0, -1, 0, -1, 0], ctx=c)
                        for c in self.comm.contexts] if self.pbn else []
        self._health_base = self.step_count

    def _check_same_net(self, channels):
        """Processes whose nets differ would exchange mismatched buffers: fail clearly."""
        if self.comm.size == len(self.comm.contexts):
            return
        # double holds every integer below 2^53 exactly: the 32-bit CRC and any channel total
        crc = zlib.crc32(np.asarray(channels, dtype=np.int64).tobytes())
        mine = nd.array([len(channels), sum(channels), crc],
                        ctx=self.comm.contexts[0], dtype='float64')
        rows = self.comm.allgather([mine.copyto(c) for c in self.comm.contexts],
                                   'pbn_gluon.signature')[0].asnumpy()
        if not (rows == rows[:1]).all():
            raise ValueError('processes run different nets: per rank [norm layers, channels, '
                             'crc] = %s' % rows.astype(np.int64).tolist())

    # -- the step ---------------------------------------------------------------------------

    def step(self, check_gradients=False):
        """Exchange this step's statistics; call once per iteration after backward().
        check_gradients: also fail when a PBN layer's gradient is not fresh (the backward of
        its forward has not run; before a Trainer's update, which marks them used)."""
        self._check_order(check_gradients)
        if self.syncbn_exchange is not None:    # its errors; its group sums written first
            self.syncbn_exchange.settle()
        self._ensure_bound()
        t = self.step_count
        if self.pbn and t - self._health_read >= HEALTH_READ_INTERVAL:
            self._read_health()     # before this step's exchange: reads what is computed
        if self.pbn:
            self._exchange(t)
        self._update_running()
        self.step_count = t + 1
        self._set_weights(self.step_count)
        for layer in self.layers:
            layer.exchanged()

    def _check_order(self, check_gradients):
        """Raise (one line, state unchanged) when this exchange comes at the wrong point of the
        training loop: see the module docstring."""
        where = 'statistics exchange (pbn_gluon.Trainer.step or StatsSync.step)'
        if autograd.is_recording():
            raise RuntimeError('%s inside autograd.record(): call it after backward()' % where)
        ran = [layer for layer in self.layers if layer.forwards_since_exchange]
        if not ran:
            raise RuntimeError(
                '%s with no training forward pass of %s since the last one: exchange once per '
                'iteration, after the forward and backward passes (an evaluation forward does '
                'not count)' % (where, self.layers[0].name))
        if not check_gradients:
            return
        for layer in ran:
            param = next((p for p in (layer.gamma, layer.beta) if p.grad_req != 'null'), None)
            if not isinstance(layer, ProgressiveBatchNorm) or param is None or \
                    param._data is None:
                continue
            for ctx in layer.forwards_since_exchange:
                if not param.data(ctx)._fresh_grad:
                    raise RuntimeError(
                        '%s before the backward pass of %s on %s: the backward reads the local '
                        'weight and group sums that the exchange rewrites; call it after '
                        'backward()' % (where, layer.name, ctx))

    def check(self):
        """Raise the error of a SyncBatchNorm exchange that failed since the last check (a
        device that never reached it); step() checks too."""
        if self.syncbn_exchange is not None:
            self.syncbn_exchange.check()

    def _group_sizes(self, t):
        return [layer.group_size_at(t, self.comm.size) for layer in self.pbn]

    def _exchange(self, t):
        sizes = self._group_sizes(t)
        taken = self._taken
        for local, dst in zip(self.buffers.local, taken):
            nd.pbn_take_sums(local, out=dst)    # after the backward that writes local
        if all(g == self.comm.size for g in sizes):
            sums = self._scratch
            for src, dst in zip(taken, sums):
                src.copyto(dst)
            self.comm.allreduce_(sums, EXCHANGE_TAG)
        else:
            gathered = self.comm.allgather(taken, EXCHANGE_TAG)
            sums = [self._group_sum(rank, rows, sizes, ctx) for rank, rows, ctx
                    in zip(self.comm.ranks, gathered, self.comm.contexts)]
        for i, new in enumerate(sums):
            # G <- a G + (1 - a) G_t, or the previous G when a sum of G_t is not finite (a NaN
            # batch on a device of the group: NaN and Inf survive the sum, so every device of
            # the group decides alike without another exchange); health counts such steps
            rate = self._rate[i] if t > 0 else self._no_rate[i]
            nd.pbn_accept_sums(*op_contract.inputs(
                'pbn_accept_sums', local=taken[i], group=new, rate=rate,
                global_sums=self.buffers.stats[i], fresh=self._fresh[i], health=self._health[i]))

    def _read_health(self):
        """Count the steps with non-finite statistics and warn at the first: reads the 5-number
        record that pbn_accept_sums keeps per device (waits for the exchanges written so far)."""
        self._health_read = self.step_count
        if not self._health:
            return
        records = [h.asnumpy() for h in self._health]
        count = self._nonfinite_offset + int(max(r[0] for r in records))
        if count == self._nonfinite_steps:
            return
        self._nonfinite_steps = count
        if self._warned:
            return
        self._warned = True
        first = min(r[1] for r in records if r[0] > 0) + self._health_base
        devices = ['%s (rank %d)' % (c, r) for c, r, rec in
                   zip(self.comm.contexts, self.comm.ranks, records) if rec[2] > 0]
        warnings.warn(
            'StatsSync: step %d: non-finite batch statistics (NaN or Inf) on %s; the global '
            'moments of such steps are left out and the previous ones kept. Later ones are '
            'counted in StatsSync.nonfinite_steps without a warning.'
            % (first, ', '.join(devices) if devices else 'a device of another process'),
            RuntimeWarning, stacklevel=3)

    @property
    def nonfinite_steps(self):
        """Steps whose global moments were left out because statistics in the device's group
        were not finite (NaN or Inf). Reading it waits for the latest exchange."""
        self._read_health()
        return self._nonfinite_steps

    def _group_sum(self, rank, rows, sizes, ctx):
        """Each layer's sum over the group of `rank`, from the all-gathered rows."""
        total = None
        for g in sorted(set(sizes)):
            first = rank // g * g
            part = nd.sum(rows[first:first + g], axis=0) * self._group_mask(sizes, g, ctx)
            total = part if total is None else total + part
        return total

    def _group_mask(self, sizes, g, ctx):
        key = (tuple(sizes), g, ctx)
        if key not in self._group_masks:
            mask = self.buffers.per_pbn_entry([float(s == g) for s in sizes])
            self._group_masks[key] = nd.array(mask, ctx=ctx, dtype='float64')
        return self._group_masks[key]

    def _update_running(self):
        b = self.buffers
        for i in range(len(self.comm.contexts)):      # one fused operator per device
            nd.pbn_running_update(*op_contract.inputs(
                'pbn_running_update', gather=self._gather[i], momentum=self._momentum[i],
                stats=b.fresh[i], running_mean=b.running_mean[i], running_var=b.running_var[i]))

    def _set_weights(self, t):
        if not self.pbn:
            return
        sizes = self._group_sizes(t)
        weights = [layer.local_weight_at(t, g) for layer, g in zip(self.pbn, sizes)]
        if weights != self._weights:
            host = np.asarray(weights, dtype=np.float32)
            for w in self.buffers.weights:
                # through a fresh array: writing numpy into w would wait for this step's reads
                w[:] = nd.array(host, ctx=w.context)
            self._weights = weights

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self):
        """Exchange state for a training checkpoint (numpy arrays; blocks until computed)."""
        self._ensure_bound()
        stats = [s.asnumpy() for s in self.buffers.stats] or [
            np.zeros(0) for _ in self.comm.contexts]     # no PBN layer: nothing carried over
        return {'step': self.step_count, 'stats': stats}

    def load_state_dict(self, state):
        """Restore what state_dict() returned; the net's parameters must be loaded already."""
        self._ensure_bound()
        stats = state['stats']
        mine = self.buffers.stats or [np.zeros(0) for _ in self.comm.contexts]
        if len(stats) != len(mine) or any(a.shape != b.shape for a, b in zip(stats, mine)):
            raise ValueError('StatsSync state is for %d device(s) with buffers %s; this job has '
                             '%d with %s' % (len(stats), [a.shape for a in stats],
                                             len(mine), [b.shape for b in mine]))
        for src, dst in zip(stats, mine):
            dst[:] = src
        self.step_count = int(state['step'])
        self._reset_health()
        self._weights = None
        if self.step_count:
            self._set_weights(self.step_count)
