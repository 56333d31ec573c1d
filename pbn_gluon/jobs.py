"""Jobs of several devices or processes: starting a job's processes from a script or a test
(the horovodrun and KVStore launcher commands, the environment a worker needs, one runner
that never hangs), and, inside a process, its part of the job (`Job`: the backend's contexts,
statistics communicator and trainer).

    cmd = jobs.launch_command('horovod', 2, [sys.executable, 'train.py', ...])
    result = jobs.run(cmd, env=jobs.worker_env('local', 8, timeout=120), timeout=600)
    result.status, result.returncode, result.output

    job = jobs.Job('horovod')     # in each process: job.contexts, job.comm, job.trainer(...)
"""
import collections
import os
import signal
import subprocess
import sys
import threading
import time

from .comm import HorovodComm, KVStoreComm, LocalComm, broadcast_parameters
from .errors import ConfigError
from .rendezvous import cpu_resource_env

__all__ = ['launch_command', 'horovodrun', 'kvstore_launch', 'worker_env', 'run', 'Result', 'BACKENDS', 'Job',
           'local_contexts']


def horovodrun(num_processes, command):
    """`command` (a list) as `num_processes` Horovod processes on this machine, over Gloo."""
    binary = os.path.join(os.path.dirname(sys.executable), 'horovodrun')
    return [binary, '-np', str(num_processes), '-H', 'localhost:%d' % num_processes,
            '--gloo'] + list(command)


def kvstore_launch(num_workers, command, timeout=None):
    """`command` as `num_workers` KVStore dist_sync workers (python -m pbn_gluon.launch)."""
    limit = ['--timeout', str(timeout)] if timeout else []
    return [sys.executable, '-m', 'pbn_gluon.launch', '-n', str(num_workers)] + limit + \
        ['--'] + list(command)


def launch_command(backend, processes, command, timeout=None):
    """`command` (a list) as a job of `backend`: horovod, `processes` Horovod processes
    (horovodrun over Gloo); kvstore, `processes` KVStore dist_sync workers (python -m
    pbn_gluon.launch, stopped after `timeout` s if given); local, the command itself (one
    process drives every device)."""
    if backend == 'horovod':
        return horovodrun(processes, command)
    if backend == 'kvstore':
        return kvstore_launch(processes, command, timeout)
    if backend == 'local':
        return list(command)
    raise ConfigError('unknown backend %r: local, horovod or kvstore' % (backend,))


def worker_env(backend, contexts, timeout, base=None):
    """The environment of a worker process: exchanges give up after `timeout` seconds (a dead
    peer ends the job), and several CPU contexts of one process get the MXNet resource settings
    SyncBatchNorm needs (pbn_gluon.rendezvous.cpu_resource_env) whatever the norm: they change
    what MXNet's seeded generators draw, so every norm must run with them to start from the same
    weights. Values in `base` (default os.environ) win."""
    env = dict(os.environ if base is None else base)
    env.setdefault('PBN_GLUON_TIMEOUT', str(int(max(10, timeout))))
    env.setdefault('HOROVOD_GLOO_TIMEOUT_SECONDS', str(int(max(10, timeout))))
    env.setdefault('PYTHONUNBUFFERED', '1')
    if backend == 'local' and contexts > 1:
        for name, value in cpu_resource_env(contexts).items():
            env.setdefault(name, value)
    return env


Result = collections.namedtuple('Result', 'status returncode output seconds')
Result.__doc__ = """status: 'ok', 'failed', 'timeout' (ran past `timeout`) or 'stalled' (no output
line for `idle_timeout`); output: stdout and stderr together."""


def run(command, env=None, timeout=None, idle_timeout=None, on_line=None, cwd=None):
    """Run `command` in its own process group and return a Result. Each output line goes to
    on_line(line) as it comes. Past `timeout` seconds in all, or `idle_timeout` seconds without
    a line, the whole group (horovodrun or the launcher and every worker) is stopped."""
    start = time.time()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, cwd=cwd, text=True, errors='replace',
                            start_new_session=True)
    state = {'last': start, 'stopped': None}

    def watchdog():
        while proc.poll() is None:
            now = time.time()
            if timeout is not None and now - start > timeout:
                state['stopped'] = 'timeout'
            elif idle_timeout is not None and now - state['last'] > idle_timeout:
                state['stopped'] = 'stalled'
            if state['stopped']:
                _stop_group(proc)
                return
            time.sleep(0.2)
    threading.Thread(target=watchdog, daemon=True).start()
    lines = []
    for line in proc.stdout:
        state['last'] = time.time()
        lines.append(line)
        if on_line is not None:
            on_line(line)
    proc.wait()
    status = state['stopped'] or ('ok' if proc.returncode == 0 else 'failed')
    return Result(status, proc.returncode, ''.join(lines), time.time() - start)


def _stop_group(proc):
    """SIGTERM, then SIGKILL, to the process group of `proc`."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass


# ---------------------------------------------------------------------------------------------
# inside a process: its part of the job
# ---------------------------------------------------------------------------------------------

BACKENDS = ('local', 'horovod', 'kvstore')


def local_contexts(gpus=0, devices=1):
    """gpu(0..gpus-1), or without GPUs cpu(0..devices-1)."""
    import mxnet as mx
    return [mx.gpu(i) for i in range(gpus)] if gpus else [mx.cpu(i) for i in range(devices)]


class Job:
    """This process's part of a training job, on one of three backends:

    - local: one process drives every device (cpu(0..N-1) or gpu(0..N-1)); gradients are summed
      by a 'device' KVStore, statistics exchanged by LocalComm.
    - horovod: one device per process (horovodrun); hvd.DistributedTrainer averages gradients,
      HorovodComm exchanges statistics.
    - kvstore: MXNet dist_sync workers (python -m pbn_gluon.launch), each with one or more
      devices; the gluon Trainer and KVStoreComm share the kvstore (update_on_kvstore=False).

    contexts: its devices; comm: the statistics communicator over every device of the job;
    size: devices in the job; rank_offset: global rank of contexts[0]; is_root: the process
    that writes checkpoints and logs; in_process: every device is in this process."""

    def __init__(self, backend, gpus=0, devices=1):
        import mxnet as mx
        self._hvd = self._kvstore = None
        if backend == 'local':
            self.contexts = local_contexts(gpus, devices)
            self.comm = LocalComm(self.contexts)
        elif backend == 'horovod':
            if gpus > 1 or (not gpus and devices != 1):
                raise ConfigError('backend horovod runs one device per process: set gpus: 1 or '
                                  'gpus: 0 and devices: 1, and start one process per device')
            import horovod.mxnet as hvd
            hvd.init()
            self._hvd = hvd
            self.contexts = [mx.gpu(hvd.local_rank()) if gpus else mx.cpu()]
            self.comm = HorovodComm(self.contexts[0])
        elif backend == 'kvstore':
            self._kvstore = mx.kv.create('dist_sync')
            self.contexts = local_contexts(gpus, devices)
            self.comm = KVStoreComm(self._kvstore, self.contexts)
        else:
            raise ConfigError('unknown backend %r: local, horovod or kvstore' % backend)
        self.backend = backend
        self.size, self.rank_offset = self.comm.size, self.comm.rank_offset
        self.in_process = backend == 'local'
        self.is_root = self.rank_offset == 0

    def ensure_cpu_resources(self, norm):
        """Start this process again, once, with the MXNet CPU resource copies its contexts
        need (pbn_gluon.rendezvous.cpu_resource_advice; MXNet reads them at import). Every
        norm gets the random-generator copies, because that setting changes what MXNet's seeded
        generators draw: bn, syncbn and pbn start from the same weights. Only syncbn gets the
        temp-space copies (which do not change the draws): the other norms never wait inside
        the graph, and with that many copies memory grows with every step
        (DeepLabV3-ResNet18 on 8 contexts: about 1.2 GB a step)."""
        from .rendezvous import cpu_resource_advice
        if not self.in_process or cpu_resource_advice(self.contexts) is None:
            return
        settings = cpu_resource_env(len(self.contexts))
        if norm != 'syncbn':
            settings = {k: v for k, v in settings.items() if k == 'MXNET_CPU_PARALLEL_RAND_COPY'
                        and int(os.environ.get(k, 1)) < int(v)}
            if not settings:
                return
        print('%s: %d CPU contexts of one process: restarting with %s'
              % (sys.argv[0], len(self.contexts), ' '.join('%s=%s' % kv for kv in
                                                           sorted(settings.items()))), flush=True)
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, **settings))

    def prepare(self, net, example):
        """Before the Trainer: a communicator that declares SyncBatchNorm's exchanges up front
        by channel count (KVStore dist_sync) gets every shape of `net` from its graph and an
        `example` input, without running it (a forward pass before the Trainer's first step
        would break MXNet 1.9's dist_sync Trainer: docs/limitations.md)."""
        from .sync_norm import SyncBatchNorm
        from .stats_sync import find_norm_layers
        if self.comm.needs_prepare and any(isinstance(layer, SyncBatchNorm)
                                           for layer in find_norm_layers(net)):
            net.infer_shape(example)

    def trainer(self, params, optimizer_params, prefix=None, comm=None):
        """An SGD pbn_gluon.Trainer whose step averages the gradients of every device of the
        job and exchanges the statistics of the PBN/SyncBN layers behind `params` over `comm`
        (default ``self.comm``; ``trainer.stats``: None without such layers). prefix:
        Horovod's tensor names, distinct for each net of a process that trains several."""
        from . import trainer
        comm = self.comm if comm is None else comm
        if self._hvd is not None:
            return trainer.DistributedTrainer(params, 'sgd', optimizer_params, prefix=prefix,
                                              comm=comm)
        if self._kvstore is not None:
            return trainer.Trainer(params, 'sgd', optimizer_params, kvstore=self._kvstore,
                                   update_on_kvstore=False, comm=comm)
        return trainer.Trainer(params, 'sgd', optimizer_params, kvstore='device', comm=comm)

    def step_batch(self, images_per_device):
        """The batch size to give trainer.step() so that it averages over the job's images
        (DistributedTrainer already divides by the number of processes)."""
        if self._hvd is not None:
            return images_per_device * len(self.contexts)
        return images_per_device * self.size

    def broadcast(self, params, prefix=None):
        """Make every device start from the root's parameters, before the first step
        (Horovod's broadcast_parameters; KVStore: comm.broadcast_parameters, since the
        dist_sync Trainer copies them only at its first step, after the first backward).
        Parameters with deferred initialization follow when they are initialized. prefix:
        Horovod's tensor names, distinct for each net of a process that trains several."""
        if self._hvd is not None:
            self._hvd.broadcast_parameters(params, root_rank=0, prefix=prefix)
        elif self._kvstore is not None:
            broadcast_parameters(params, self.comm)

    def shutdown(self):
        """End Horovod in this process (nothing to do for the other backends)."""
        if self._hvd is not None:
            self._hvd.shutdown()
