"""Communication backends: sums and gathers of small arrays over every device of a job.

A job has ``size`` devices, ranked 0..size-1; a process drives ``contexts``, the devices of
ranks ``rank_offset .. rank_offset + len(contexts) - 1``. Every method only pushes engine
operations and returns at once: nothing waits for another device on the Python thread or
inside an engine operator.

- LocalComm(contexts): several devices in one process (mx.cpu(i) or mx.gpu(i)).
- KVStoreComm(kvstore, contexts): mx.kv 'local', 'device' or 'dist_sync' (ps-lite).
- HorovodComm(context): one device per process, Gloo (CPU) or NCCL (GPU) allreduce.
"""
import collections
import os
import threading

import mxnet as mx
from mxnet import ndarray as nd

__all__ = ['Comm', 'LocalComm', 'KVStoreComm', 'HorovodComm']

#: seconds a device waits for the other devices of its process at a SyncBatchNorm layer
RENDEZVOUS_TIMEOUT = float(os.environ.get('PBN_GLUON_TIMEOUT', '300'))


class Comm:
    """Interface of a backend. Subclasses set contexts, size, rank_offset and implement
    ``allreduce_`` (in-place sum) and ``allgather``."""

    contexts = ()
    size = 1
    rank_offset = 0

    def __init__(self):
        self._rendezvous = None

    @property
    def ranks(self):
        """Global ranks of this process's devices, in the order of ``contexts``."""
        return list(range(self.rank_offset, self.rank_offset + len(self.contexts)))

    def allreduce_(self, arrays, tag):
        """In place: arrays[i] (on contexts[i]) becomes the sum of that array over the job."""
        raise NotImplementedError

    def allgather(self, arrays, tag):
        """Returns, for each local device, a (size, K) array whose row r is rank r's array."""
        raise NotImplementedError

    def allreduce_device(self, array, tag):
        """The job-wide sum of one device's `array`, on that device.

        Called once per local device (from MXNet's custom-operator threads, one per device):
        the local contributions meet in a Python-level rendezvous, the last one to arrive
        pushes the reduction, and each caller gets its device's result. Only Python threads
        wait here, and only for the other devices to *push* their contribution."""
        if len(self.contexts) == 1:
            out = array.copy()
            self.allreduce_([out], tag)
            return out
        if self._rendezvous is None:
            self._rendezvous = Rendezvous(len(self.contexts), RENDEZVOUS_TIMEOUT)
        index = self.contexts.index(array.context)

        def reduce(arrays):
            outs = [a.copy() for a in arrays]
            self.allreduce_(outs, tag)
            return outs
        return self._rendezvous.meet(tag, index, array, reduce)

    def __repr__(self):
        return '%s(size=%d, contexts=%s)' % (type(self).__name__, self.size, list(self.contexts))


class Rendezvous:
    """Collects one array per local device for a tag; hands each caller its reduced array."""

    def __init__(self, parties, timeout):
        self.parties, self.timeout = parties, timeout
        self._cond = threading.Condition()
        self._rounds = {}
        self._calls = collections.Counter()

    def meet(self, tag, index, array, reduce):
        with self._cond:
            round_ = self._calls[tag, index]
            self._calls[tag, index] += 1
            entry = self._rounds.setdefault(
                (tag, round_), {'arrays': [None] * self.parties, 'result': None, 'left': self.parties})
            entry['arrays'][index] = array
            if all(a is not None for a in entry['arrays']):
                try:
                    entry['result'] = reduce(entry['arrays'])
                except Exception as err:  # hand the error to every waiting device
                    entry['result'] = err
                self._cond.notify_all()
            elif not self._cond.wait_for(lambda: entry['result'] is not None, self.timeout):
                missing = [i for i, a in enumerate(entry['arrays']) if a is None]
                raise TimeoutError(
                    'device(s) %s did not reach %s within %.0f s (round %d). Every device of '
                    'the process must run the forward and backward of each step; do not read '
                    'values (asnumpy, print) between the devices\' forward calls.'
                    % (missing, tag, self.timeout, round_))
            result = entry['result']
            entry['left'] -= 1
            if entry['left'] == 0:
                del self._rounds[tag, round_]
        if isinstance(result, Exception):
            raise result
        return result[index]


class LocalComm(Comm):
    """Devices of one process. Sums on contexts[0], then copies the sum to every device."""

    def __init__(self, contexts):
        super().__init__()
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
        super().__init__()
        if isinstance(kvstore, str):
            kvstore = mx.kv.create(kvstore)
        if contexts is None:
            contexts = [mx.cpu()]
        self.kvstore = kvstore
        self.contexts = list(contexts) if isinstance(contexts, (list, tuple)) else [contexts]
        self.size = kvstore.num_workers * len(self.contexts)
        self.rank_offset = kvstore.rank * len(self.contexts)
        self._keys = {}
        self._lock = threading.Lock()

    def _key(self, tag, shape):
        with self._lock:
            if (tag, shape) not in self._keys:
                key = self.KEY_BASE + len(self._keys)
                self.kvstore.init(key, nd.zeros(shape, ctx=self.contexts[0]))
                self._keys[tag, shape] = key
            return self._keys[tag, shape]

    def allreduce_(self, arrays, tag):
        key = self._key(tag, arrays[0].shape)
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
        super().__init__()
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
