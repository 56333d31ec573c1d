"""Communication backends: sums and gathers of small arrays over every device of a job.

A job has ``size`` devices, ranked 0..size-1; a process drives ``contexts``, the devices of
ranks ``rank_offset .. rank_offset + len(contexts) - 1``. Every method only pushes engine
operations and returns at once: nothing waits for another device on the Python thread or
inside an engine operator.

- LocalComm(contexts): several devices in one process (mx.cpu(i) or mx.gpu(i)).
- KVStoreComm(kvstore, contexts): mx.kv 'local', 'device' or 'dist_sync' (ps-lite).
- HorovodComm(context): one device per process, Gloo (CPU) or NCCL (GPU) allreduce.
"""
import atexit
import collections
import threading
import types

import mxnet as mx
import numpy as np
from mxnet import ndarray as nd

__all__ = ['Comm', 'LocalComm', 'KVStoreComm', 'HorovodComm', 'CountingComm',
           'BLOCKING_TAG_PREFIX', 'broadcast_parameters']

#: the tags of SyncBatchNorm's exchanges, the blocking ones (pbn_gluon.rendezvous.exchange_tag)
BLOCKING_TAG_PREFIX = 'pbn_gluon.syncbn.'


class Comm:
    """Interface of a backend. Subclasses set contexts, size, rank_offset and implement
    ``allreduce_`` (in-place sum) and ``allgather``."""

    contexts = ()
    size = 1
    rank_offset = 0

    @property
    def ranks(self):
        """Global ranks of this process's devices, in the order of ``contexts``."""
        return list(range(self.rank_offset, self.rank_offset + len(self.contexts)))

    #: True when every exchange must be declared with prepare() before the first step
    needs_prepare = False

    def prepare(self, tagged_shapes):
        """Declare the (tag, shape, dtype) triples that exchanges will use, in the same order
        on every process. Called by StatsSync from the main thread; a no-op unless
        needs_prepare."""

    def allreduce_(self, arrays, tag):
        """In place: arrays[i] (on contexts[i]) becomes the sum of that array over the job."""
        raise NotImplementedError

    def allgather(self, arrays, tag):
        """Returns, for each local device, a (size, K) array whose row r is rank r's array."""
        raise NotImplementedError

    def __repr__(self):
        return '%s(size=%d, contexts=%s)' % (type(self).__name__, self.size, list(self.contexts))


class LocalComm(Comm):
    """Devices of one process. Sums on contexts[0], then copies the sum to every device."""

    def __init__(self, contexts):
        contexts = list(contexts) if isinstance(contexts, (list, tuple)) else [contexts]
        if not contexts or len(set(contexts)) != len(contexts):
            raise ValueError('LocalComm needs distinct contexts, got %r' % (contexts,))
        self.contexts, self.size, self.rank_offset = contexts, len(contexts), 0

    def allreduce_(self, arrays, tag):
        if len(arrays) == 1:
            return
        root = arrays[0].context
        total = nd.add_n(*[a.as_in_context(root) for a in arrays])
        for a in arrays:
            total.copyto(a)

    def allgather(self, arrays, tag):
        root = arrays[0].context
        stacked = nd.stack(*[a.reshape((-1,)).as_in_context(root) for a in arrays])
        return [stacked.as_in_context(a.context) for a in arrays]


class KVStoreComm(Comm):
    """An MXNet KVStore: 'local' or 'device' (devices of one process) or 'dist_sync' (processes
    and machines over ps-lite; launch them with ``python -m pbn_gluon.launch``).

    With dist_sync, share the kvstore with a gluon Trainer only if ``update_on_kvstore=False``:
    a server-side optimizer would also update the statistics' keys."""

    KEY_BASE = 1 << 28  # clear of the integer keys a gluon Trainer uses

    def __init__(self, kvstore, contexts=None):
        if isinstance(kvstore, str):
            kvstore = mx.kv.create(kvstore)
        if contexts is None:
            contexts = [mx.cpu()]
        self.kvstore = kvstore
        self.contexts = list(contexts) if isinstance(contexts, (list, tuple)) else [contexts]
        self.size = kvstore.num_workers * len(self.contexts)
        self.rank_offset = kvstore.rank * len(self.contexts)
        # dist_sync's init is a barrier of all workers: keys must be created in one order on
        # every process, so never from MXNet's custom-operator thread (SyncBatchNorm)
        self.needs_prepare = kvstore.type.startswith('dist')
        self._keys = {}
        self._lock = threading.Lock()
        if self.needs_prepare:
            atexit.register(self.close)

    def close(self):
        """Wait for pending exchanges and shut the dist kvstore down (done at exit: MXNet 1.9
        aborts at exit when a dist kvstore outlives a custom operator's thread)."""
        if self.kvstore.handle is not None:
            nd.waitall()
            mx.base.check_call(mx.base._LIB.MXKVStoreFree(self.kvstore.handle))
            self.kvstore.handle = None

    def prepare(self, tagged_shapes):
        for tag, shape, dtype in tagged_shapes:
            self._key(tag, tuple(shape), np.dtype(dtype))

    def _key(self, tag, shape, dtype):
        with self._lock:
            if (tag, shape, dtype) not in self._keys:
                if self.needs_prepare and threading.current_thread() is not threading.main_thread():
                    raise RuntimeError('KVStoreComm: exchange %s %s %s was not prepared; create '
                                       'StatsSync before the first training step'
                                       % (tag, shape, dtype))
                key = self.KEY_BASE + len(self._keys)
                self.kvstore.init(key, nd.zeros(shape, ctx=self.contexts[0], dtype=dtype))
                self._keys[tag, shape, dtype] = key
            return self._keys[tag, shape, dtype]

    def allreduce_(self, arrays, tag):
        key = self._key(tag, arrays[0].shape, np.dtype(arrays[0].dtype))
        self.kvstore.pushpull(key, arrays if len(arrays) > 1 else arrays[0],
                              out=arrays if len(arrays) > 1 else arrays[0])

    def allgather(self, arrays, tag):
        padded = []
        for rank, a in zip(self.ranks, arrays):
            rows = nd.zeros((self.size, a.size), ctx=a.context, dtype=a.dtype)
            rows[rank] = a.reshape((-1,))
            padded.append(rows)
        self.allreduce_(padded, tag + '.gather')
        return padded


class HorovodComm(Comm):
    """Horovod, one device per process (launch with horovodrun; Gloo on CPU, NCCL on GPU)."""

    def __init__(self, context=None):
        import horovod.mxnet as hvd
        hvd.init()
        self._hvd = hvd
        if context is None:
            context = mx.gpu(hvd.local_rank()) if mx.context.num_gpus() else mx.cpu()
        self.contexts, self.size, self.rank_offset = [context], hvd.size(), hvd.rank()

    def allreduce_(self, arrays, tag):
        (array,) = arrays
        self._hvd.allreduce_(array, op=self._hvd.Sum, name=tag)

    def allgather(self, arrays, tag):
        (array,) = arrays
        return [self._hvd.allgather(array.reshape((1, -1)), name=tag)]


class CountingComm:
    """A communicator that counts what passes through it, for benchmarks and tests: wraps any
    Comm and forwards everything. ``counts['blocking']``: SyncBatchNorm's exchanges (tags that
    start with BLOCKING_TAG_PREFIX), each counted once however many local devices take part;
    ``counts['non_blocking']``: every other allreduce_/allgather call (StatsSync's exchange)."""

    def __init__(self, comm):
        self.inner = comm
        self.counts = collections.Counter()
        self._lock = threading.Lock()   # SyncBatchNorm exchanges come from MXNet's thread

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _count(self, tag):
        with self._lock:
            self.counts['blocking' if tag.startswith(BLOCKING_TAG_PREFIX) else 'non_blocking'] += 1

    def allreduce_(self, arrays, tag):
        self._count(tag)
        return self.inner.allreduce_(arrays, tag)

    def allgather(self, arrays, tag):
        self._count(tag)
        return self.inner.allgather(arrays, tag)

    def __repr__(self):
        return 'CountingComm(%r)' % (self.inner,)


def broadcast_parameters(params, comm, tag='pbn_gluon.broadcast'):
    """Give every device of `comm`'s job the values of rank 0's parameters (those on the first
    context of rank 0), before the first step computes a gradient from them.

    A gluon Trainer on a dist kvstore copies the root's weights only at its first step, after
    the first backward: processes that drew different initial weights (MXNet's seeded
    generators depend on its resource settings) would mix gradients of different nets in that
    step. Here: one allreduce per dtype of the parameters laid end to end, zeros except on
    rank 0 (x + 0 = x exactly). A parameter whose initialization is deferred is broadcast
    when it is initialized, in the first forward pass (the same on every process). The norm
    layers' exchange state (``exchange_state`` parameters) is StatsSync's and is left alone.

    params: a ParameterDict or dict of Parameters (``net.collect_params()``)."""
    ready = []
    for name, param in sorted(params.items()):
        if getattr(param, 'exchange_state', False):
            continue
        if param._deferred_init:
            _broadcast_when_initialized(param, comm, tag)
        elif param._data is not None:
            ready.append(param)
    _broadcast_now(ready, comm, tag)


def _broadcast_now(params, comm, tag):
    by_dtype = collections.defaultdict(list)
    for param in params:
        by_dtype[np.dtype(param.dtype).name].append(param)
    for dtype, group in sorted(by_dtype.items()):
        flats = []
        for ctx, rank in zip(comm.contexts, comm.ranks):
            if rank == 0:
                flats.append(nd.concat(*[p.data(ctx).reshape((-1,)) for p in group], dim=0))
            else:   # zeros, not x * 0: NaN * 0 is NaN
                flats.append(nd.zeros(sum(p.data(ctx).size for p in group), ctx=ctx,
                                      dtype=dtype))
        comm.allreduce_(flats, '%s.%s' % (tag, dtype))
        for flat in flats:
            # before the next broadcast reuses the key: a dist kvstore does not order a push
            # after the pull before it, so back-to-back exchanges of one key (deferred
            # parameters of one shape) could get each other's values
            flat.wait_to_read()
        for ctx, flat in zip(comm.contexts, flats):
            start = 0
            for param in group:
                array = param.data(ctx)
                array[:] = flat[start:start + array.size].reshape(array.shape)
                start += array.size


def _broadcast_when_initialized(param, comm, tag):
    init_impl = param._init_impl

    def init_and_broadcast(self, *args, **kwargs):
        init_impl(*args, **kwargs)
        _broadcast_now([self], comm, tag)
    param._init_impl = types.MethodType(init_and_broadcast, param)
