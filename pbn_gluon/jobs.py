"""Starting the processes of a job from a script or a test: the horovodrun and KVStore launcher
commands, the environment a worker needs, and one runner that never hangs.

    cmd = jobs.horovodrun(2, [sys.executable, 'train.py', ...])
    result = jobs.run(cmd, env=jobs.worker_env('local', 8, timeout=120), timeout=600)
    result.status, result.returncode, result.output
"""
import collections
import os
import signal
import subprocess
import sys
import threading
import time

from .rendezvous import cpu_resource_env

__all__ = ['horovodrun', 'kvstore_launch', 'worker_env', 'run', 'Result']


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
