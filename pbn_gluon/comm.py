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
import os
import sys
import threading

import mxnet as mx
from mxnet import ndarray as nd

from . import engine

__all__ = ['Comm', 'LocalComm', 'KVStoreComm', 'HorovodComm']

#: seconds the devices of a process have to meet at a SyncBatchNorm layer before it fails
RENDEZVOUS_TIMEOUT = float(os.environ.get('PBN_GLUON_TIMEOUT', '300'))

#: MXNet's CPU resource copies per CPU context that SyncBatchNorm in one process asks for.
#: MXNet's defaults are shared by ALL CPU contexts of a process: 4 temp-space copies (allocated
#: on first use) and 1 parallel-random copy (~5 MB each, allocated up front; Dropout takes one)
TEMP_COPIES_PER_CPU_CONTEXT = 2048
RANDOM_COPIES_PER_CPU_CONTEXT = 8

CPU_RESOURCE_ADVICE = (
    'All CPU contexts of a process share MXNet\'s resource copies (temp space, and the random '
    'generators that Dropout uses), handed out round-robin to graph nodes; two devices\' nodes '
    'on one copy run in push order, and across a SyncBatchNorm exchange that order waits on '
    'itself (e.g. device 0\'s Dropout after the exchange holds the copy that device 1\'s '
    'Dropout before it needs). Set %s before importing mxnet, or use one process per device '
    '(Horovod).')


def cpu_resource_env(num_contexts):
    """The environment (name -> value) that SyncBatchNorm on `num_contexts` CPU contexts of one
    process needs, set before mxnet is imported (scripts and tests pass it to subprocesses)."""
    return {'MXNET_CPU_TEMP_COPY': str(TEMP_COPIES_PER_CPU_CONTEXT * num_contexts),
            'MXNET_CPU_PARALLEL_RAND_COPY': str(RANDOM_COPIES_PER_CPU_CONTEXT * num_contexts)}


def cpu_resource_advice(contexts):
    """None, or why SyncBatchNorm on these contexts of one process may stall (too few shared
    CPU resource copies) and what to set."""
    cpu = [c for c in contexts if c.device_type == 'cpu']
    defaults = {'MXNET_CPU_TEMP_COPY': 4, 'MXNET_CPU_PARALLEL_RAND_COPY': 1}
    wanted = cpu_resource_env(len(cpu))
    short = {name: value for name, value in wanted.items()
             if int(os.environ.get(name, defaults[name])) < int(value)}
    if len(cpu) < 2 or not short:
        return None
    return CPU_RESOURCE_ADVICE % ' '.join('%s=%s' % kv for kv in sorted(short.items()))


class Comm:
    """Interface of a backend. Subclasses set contexts, size, rank_offset and implement
    ``allreduce_`` (in-place sum) and ``allgather``."""

    contexts = ()
    size = 1
    rank_offset = 0

    def __init__(self):
        self._meeting = None

    @property
    def ranks(self):
        """Global ranks of this process's devices, in the order of ``contexts``."""
        return list(range(self.rank_offset, self.rank_offset + len(self.contexts)))

    #: True when every exchange must be declared with prepare() before the first step
    needs_prepare = False

    def prepare(self, tagged_shapes):
        """Declare the (tag, shape) pairs that exchanges will use, in the same order on every
        process. Called by StatsSync from the main thread; a no-op unless needs_prepare."""

    def allreduce_(self, arrays, tag):
        """In place: arrays[i] (on contexts[i]) becomes the sum of that array over the job."""
        raise NotImplementedError

    def allgather(self, arrays, tag):
        """Returns, for each local device, a (size, K) array whose row r is rank r's array."""
        raise NotImplementedError

    def allreduce_device(self, array, out, tag, device):
        """Write the job-wide sum of local `device`'s `array` into `out`.

        Called once per local device, from MXNet's custom-operator thread, in any order. No
        one waits: a device that arrives before the others reserves `out` (engine.reserve),
        the last one pushes the reduction and fills every reserved output (engine.fulfil)."""
        if len(self.contexts) == 1:
            array.copyto(out)
            self.allreduce_([out], tag)
            return
        if self._meeting is None:
            self._meeting = Meeting(self, RENDEZVOUS_TIMEOUT)
        self._meeting.arrive(tag, self.contexts.index(device), array, out)

    def check(self):
        """Raise the error of an exchange that failed since the last check (e.g. a timeout)."""
        if self._meeting is not None and self._meeting.failure is not None:
            failure, self._meeting.failure = self._meeting.failure, None
            raise failure

    def __repr__(self):
        return '%s(size=%d, contexts=%s)' % (type(self).__name__, self.size, list(self.contexts))


class Meeting:
    """Where the local devices' contributions to a tag meet, round after round."""

    def __init__(self, comm, timeout):
        self.comm, self.timeout = comm, timeout
        self.parties = len(comm.contexts)
        self.failure = None
        self._lock = threading.Lock()
        self._rounds = {}
        self._calls = collections.Counter()

    def arrive(self, tag, index, array, out):
        with self._lock:
            round_ = self._calls[tag, index]
            self._calls[tag, index] += 1
            key = (tag, round_)
            entry = self._rounds.setdefault(
                key, {'copies': [None] * self.parties, 'reserved': {}, 'timer': None})
            entry['copies'][index] = array.copy()
            if any(c is None for c in entry['copies']):
                entry['reserved'][index] = engine.reserve(out)
                if entry['timer'] is None:
                    entry['timer'] = threading.Timer(self.timeout, self._expire, (key,))
                    entry['timer'].daemon = True
                    entry['timer'].start()
                return
            del self._rounds[key]
        if entry['timer'] is not None:
            entry['timer'].cancel()
        copies = entry['copies']
        self.comm.allreduce_(copies, tag)
        for j, reservation in entry['reserved'].items():
            engine.fulfil(reservation, copies[j])
        copies[index].copyto(out)

    def _expire(self, key):
        with self._lock:
            entry = self._rounds.pop(key, None)
        if entry is None:
            return
        missing = [i for i, c in enumerate(entry['copies']) if c is None]
        advice = cpu_resource_advice(self.comm.contexts)
        self.failure = TimeoutError(
            'device(s) %s of %s did not reach %s within %.0f s (round %d): every device of the '
            'process must run the forward and backward of each step.%s'
            % (missing, self.comm.contexts, key[0], self.timeout, key[1],
               ' ' + advice if advice else ''))
        sys.stderr.write('pbn_gluon: %s\n' % self.failure)
        for reservation in entry['reserved'].values():
            engine.release(reservation)


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
        for tag, shape in tagged_shapes:
            self._key(tag, tuple(shape))

    def _key(self, tag, shape):
        with self._lock:
            if (tag, shape) not in self._keys:
                if self.needs_prepare and threading.current_thread() is not threading.main_thread():
                    raise RuntimeError('KVStoreComm: exchange %s %s was not prepared; create '
                                       'StatsSync before the first training step' % (tag, shape))
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
