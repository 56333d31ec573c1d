"""In-process SyncBatchNorm, in one place: where a SyncBatchNorm layer's exchanges go
(``SyncExchange``), how the devices of one process meet there without waiting (``Meeting``), and
the MXNet CPU resource settings that several CPU contexts of one process need.

A layer's custom operator calls ``SyncExchange.allreduce`` from MXNet's custom-operator thread,
once per local device, in any order. With one device per process the sum is the communicator's
allreduce. With several, the devices meet: the first ones reserve their output
(pbn_gluon.engine.reserve: an engine operation that holds its write lock); the last one pushes
the sum over the process's devices (and the job's, through the communicator) and fulfils every
reservation. A round that does not complete within TIMEOUT seconds releases its reservations
and records an error. ``SyncExchange.settle()``, StatsSync.step()'s one call, raises that error
and, where the devices meet in host memory, waits until this step's group sums are kept.

All CPU contexts of a process share MXNet's resource copies, so SyncBatchNorm on several of
them needs more copies than MXNet's defaults (``cpu_resource_env``, docs/limitations.md).
"""
import collections
import os
import sys
import threading

from . import engine
from .comm import BLOCKING_TAG_PREFIX
from .errors import UserError

__all__ = ['SyncExchange', 'Meeting', 'TIMEOUT', 'exchange_tag', 'cpu_resource_env',
           'cpu_resource_advice', 'cpu_resource_error', 'CPUResourceError']

#: seconds the devices of a process have to meet at a SyncBatchNorm layer before it fails
TIMEOUT = float(os.environ.get('PBN_GLUON_TIMEOUT', '300'))

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


class CPUResourceError(UserError, RuntimeError):
    """SyncBatchNorm on several CPU contexts of one process without MXNet's resource settings."""


def cpu_resource_error(contexts):
    """None, or the error (one line: what to set) for SyncBatchNorm on these contexts of one
    process when MXNet's CPU resource settings are too low: it would stall, not fail."""
    if cpu_resource_advice(contexts) is None:
        return None
    cpu = [c for c in contexts if c.device_type == 'cpu']
    settings = ' '.join('%s=%s' % kv for kv in sorted(cpu_resource_env(len(cpu)).items()))
    return CPUResourceError(
        'SyncBatchNorm on %d CPU contexts of one process stalls with MXNet\'s default CPU '
        'resource copies: set %s in the environment before mxnet is imported (`%s python '
        'your_script.py`, or os.environ.update(pbn_gluon.rendezvous.cpu_resource_env(%d)) before '
        '`import mxnet`), or run one process per device (Horovod, KVStore)'
        % (len(cpu), settings, settings, len(cpu)))


def exchange_tag(index, direction):
    """Name of the exchange of the `index`-th SyncBatchNorm layer of a StatsSync, 'fwd' or 'bwd'."""
    return '%s%d.%s' % (BLOCKING_TAG_PREFIX, index, direction)


class SyncExchange:
    """The blocking exchanges of a net's SyncBatchNorm `layers` through `comm` (a
    pbn_gluon.comm.Comm); attaches every layer to it (``layer.attach(self, index)``).

    Raises CPUResourceError at once when the layers' devices are several CPU contexts of this
    process and MXNet's CPU resource settings are too low: it would stall, not fail."""

    def __init__(self, comm, layers):
        error = cpu_resource_error(comm.contexts)
        if error is not None:
            raise error
        self.comm, self.layers = comm, list(layers)
        #: the devices meet in host memory (several CPU contexts of this process): the group
        #: sums are kept by the exchange, outside the graph, so settle() waits for them
        self.in_host_memory = sum(c.device_type == 'cpu' for c in comm.contexts) > 1
        self._meeting = None
        self._kept = [0] * len(self.layers)      # group sums kept per layer, all devices
        self._kept_changed = threading.Condition()
        self._steps = 0
        for index, layer in enumerate(self.layers):
            layer.attach(self, index)

    def allreduce(self, index, direction, device, array, out, keep=False):
        """Write the job-wide sum of local `device`'s `array` into `out` for exchange
        `direction` ('fwd' or 'bwd') of layer `index`; with `keep`, into the layer's
        ``batch_sums`` on `device` too (the group sums the running statistics are updated from)."""
        tag = exchange_tag(index, direction)
        target = self.layers[index].batch_sums.data(device) if keep else None
        if len(self.comm.contexts) == 1:
            if target is None:
                array.copyto(out)
                self.comm.allreduce_([out], tag)
                return
            total = array.copy()    # not `out`: graph buffers may be reused once it is written
            self.comm.allreduce_([total], tag)
            total.copyto(out)
            total.reshape(target.shape).copyto(target)
            self._count_kept(index)
            return
        if self._meeting is None:
            self._meeting = Meeting(self.comm, TIMEOUT)
        kept = (target, lambda: self._count_kept(index)) if keep else None
        self._meeting.arrive(tag, self.comm.contexts.index(device), array, out, kept)

    def _count_kept(self, index):
        with self._kept_changed:
            self._kept[index] += 1
            self._kept_changed.notify_all()

    def check(self):
        """Raise the error of an exchange that failed since the last check (e.g. a timeout)."""
        if self._meeting is not None and self._meeting.failure is not None:
            failure, self._meeting.failure = self._meeting.failure, None
            raise failure

    def settle(self):
        """Close a step (StatsSync.step, after the backward): raise a failed exchange's error;
        where the devices meet in host memory, wait until every device's training forward of
        this step kept its group sums, so that the update of the running statistics is pushed
        after the writes it reads. Every device runs exactly one training forward per step."""
        self.check()
        self._steps += 1
        if not self.in_host_memory:
            return      # the fused operator writes the group sums inside the graph
        expected = len(self.comm.contexts) * self._steps
        with self._kept_changed:
            if not self._kept_changed.wait_for(lambda: min(self._kept) >= expected, TIMEOUT):
                late = [(layer.name, kept) for layer, kept in zip(self.layers, self._kept)
                        if kept < expected]
                raise TimeoutError(
                    'SyncBatchNorm %s: the devices of this process ran %d training forward '
                    'passes, %d expected by now: every device must run the forward of each '
                    'step before sync.step()' % (late[0][0], late[0][1], expected))


class Meeting:
    """Where the local devices' contributions to a tag meet, round after round."""

    def __init__(self, comm, timeout):
        self.comm, self.timeout = comm, timeout
        self.parties = len(comm.contexts)
        self.failure = None
        self._lock = threading.Lock()
        self._rounds = {}
        self._calls = collections.Counter()

    def arrive(self, tag, index, array, out, keep=None):
        """Device `index`'s contribution `array` to round `tag`; `out` receives the sum, and
        keep[0] a copy of it (the meeting's own array: graph buffers may be reused), after
        which keep[1]() is called."""
        with self._lock:
            round_ = self._calls[tag, index]
            self._calls[tag, index] += 1
            key = (tag, round_)
            entry = self._rounds.setdefault(
                key, {'copies': [None] * self.parties, 'reserved': {}, 'keep': {},
                      'timer': None})
            entry['copies'][index] = array.copy()
            if keep is not None:
                entry['keep'][index] = keep
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
        for j, (target, kept) in entry['keep'].items():
            copies[j].reshape(target.shape).copyto(target)
            kept()

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
