"""Launch a KVStore dist_sync job: one scheduler, S servers and N workers.

    python -m pbn_gluon.launch -n 2 -- python scripts/train.py --config configs/x.yaml
    python -m pbn_gluon.launch -n 4 -H host1,host2 -- python train.py ...   # workers over ssh

Every process gets DMLC_ROLE, DMLC_PS_ROOT_URI, DMLC_PS_ROOT_PORT, DMLC_NUM_SERVER and
DMLC_NUM_WORKER; worker i also gets PORT (its ps-lite port), from which the launcher learns its
rank (the scheduler's log names the port of each rank it assigns). The launcher waits for the
workers; when one fails (non-zero exit, killed) it stops all the others and exits with that
worker's code, with one line that names the worker, its rank, its host and the signal. A
process that cannot be started stops everything already started (exit 127: no such program,
126: not executable); SIGTERM or Ctrl-C stop the job too, and on Linux every child receives
SIGTERM if the launcher itself is killed. Scheduler and servers run on this machine.

With -H the workers run on the hosts round robin, each through ssh and a wrapper that kills it
when its ssh session closes (pbn_gluon.remote): every way the job ends stops the remote
workers too. Before anything starts, every host is checked (one line per host that cannot run
a worker). The launcher imports no MXNet: it starts its processes at once.
"""
import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from . import remote

__all__ = ['launch', 'main', 'LaunchError']

PREFIX = 'pbn_gluon.launch: '
_ASSIGN = re.compile(rb'assign rank=(\d+) to node role=worker, ip=([^,]+), port=(\d+)')
_QUIET = re.compile(rb'(van\.cc|zmq_van\.h):\d+: (Bind to|assign rank=|the scheduler is connected|'
                    rb'Barrier count|H\[\d+\] is stop)')


class LaunchError(RuntimeError):
    """A process of the job could not be started; `code` is the exit code to report."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class Stopped(Exception):
    """The launcher received `signum` (SIGTERM, SIGINT)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def say(line):
    sys.stderr.write(PREFIX + line + '\n')
    sys.stderr.flush()


def _die_with_parent():
    """In the child, before exec: SIGTERM when the launcher dies (Linux), so that even a killed
    launcher leaves no scheduler, server, worker or ssh client behind."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG
    except Exception:     # not Linux: the launcher's own handlers still stop the job
        pass


def _start(name, command, env=None, **kwargs):
    try:
        return subprocess.Popen(command, env=env, preexec_fn=_die_with_parent, **kwargs)
    except OSError as err:
        raise LaunchError('cannot start %s: %s: %s' % (
            name, ' '.join(shlex.quote(c) for c in command), err.strerror or err),
            127 if isinstance(err, FileNotFoundError) else 126) from err


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _role_env(role, root_uri, port, num_servers, num_workers):
    return {'DMLC_ROLE': role, 'DMLC_PS_ROOT_URI': root_uri, 'DMLC_PS_ROOT_PORT': str(port),
            'DMLC_NUM_SERVER': str(num_servers), 'DMLC_NUM_WORKER': str(num_workers)}


def describe(code):
    """'exited with 3' / 'killed by SIGKILL' for a Popen return code."""
    if code < 0:
        try:
            return 'killed by %s' % signal.Signals(-code).name
        except ValueError:
            return 'killed by signal %d' % -code
    return 'exited with %d' % code


class Worker:
    """One worker: a local process, or an ssh client whose stderr carries the remote status."""

    def __init__(self, index, host, port):
        self.index, self.host, self.port = index, host, port
        self.rank = None
        self.proc = None
        self.status = None          # ('exit', code) or ('start-failed', code, message)
        self._reader = None

    def label(self):
        rank = 'rank %d' % self.rank if self.rank is not None else 'no rank yet'
        return 'worker %d (%s)%s' % (self.index, rank, ' on %s' % self.host if self.host else '')

    def start(self, command, env):
        if self.host is None:
            self.proc = _start('worker %d' % self.index, command, env)
            return
        self.proc = _start('the ssh client of worker %d' % self.index, command,
                           stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self):
        """Forward the remote stderr, keeping the wrapper's status line."""
        for line in iter(self.proc.stderr.readline, b''):
            before, token, status = line.partition(remote.STATUS_TOKEN)
            if token:
                kind, code, *message = status.decode(errors='replace').split(None, 2)
                self.status = (kind, int(code)) + tuple(message)
                line = before + b'\n' if before.strip() else b''
            if line:
                sys.stderr.buffer.write(line)
                sys.stderr.flush()

    def finished(self):
        if self.proc.poll() is None:
            return False
        if self._reader is not None:
            self._reader.join(2)
        return True

    def outcome(self):
        """(exit code, what happened) once finished."""
        code = self.proc.returncode
        if self.host is None:
            return code, describe(code)
        if self.status and self.status[0] == 'start-failed':
            return self.status[1], 'could not start: %s' % self.status[2].strip()
        if self.status:
            return self.status[1], describe(self.status[1])
        if code == 255:
            return code, 'lost its ssh session (ssh exited with 255, no status from the host)'
        if code < 0:
            return code, 'lost its ssh client (%s)' % describe(code)
        return code, 'ended without a status from the host (ssh exited with %d)' % code

    def stop(self):
        """Ask it to stop: SIGTERM here, or close the ssh channel (the wrapper kills the
        remote group)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.host is None:
            self.proc.send_signal(signal.SIGTERM)
        else:
            try:
                self.proc.stdin.close()
            except OSError:
                pass


class Scheduler:
    """The scheduler process; its log (PS_VERBOSE=1) says which port got which worker rank."""

    def __init__(self, command, env, workers):
        self.workers = {w.port: w for w in workers}
        self.verbose = int(os.environ.get('PS_VERBOSE', '0') or 0) > 0
        env = dict(env, PS_VERBOSE=str(max(1, int(env.get('PS_VERBOSE', '0') or 0))))
        self.proc = _start('the scheduler', command, env, stderr=subprocess.PIPE)
        self.ranked = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in iter(self.proc.stderr.readline, b''):
            match = _ASSIGN.search(line)
            if match and int(match.group(3)) in self.workers:
                self.workers[int(match.group(3))].rank = (int(match.group(1)) - 9) // 2
                if all(w.rank is not None for w in self.workers.values()):
                    self.ranked.set()
            if self.verbose or not _QUIET.search(line):
                sys.stderr.buffer.write(line)
                sys.stderr.flush()


def _stop(workers, procs):
    for w in workers:
        w.stop()
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + 10
    for p in [w.proc for w in workers if w.proc] + procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(command, num_workers, num_servers=1, hosts=None, ssh='ssh', root_uri=None,
           port=None, timeout=None, interface=None, env_vars=(), ssh_port=None,
           connect_timeout=10):
    """Run `command` (a list) as `num_workers` dist_sync workers; returns the job's exit code.

    hosts: worker hosts (round robin, through `ssh`), None for this machine; env_vars: -x
    items for remote workers. timeout: seconds after which the whole job is stopped (exit
    code 124). Prints one reason line whatever the outcome."""
    start = time.time()
    workers, procs = [], []
    try:
        addresses = remote.resolve(hosts) if hosts else {}
        root_uri = remote.scheduler_address(root_uri, interface, os.environ, addresses)
        ssh_cmd = remote.ssh_command(ssh, ssh_port, connect_timeout)
        forwarded = remote.forwarded_env(os.environ, env_vars) if hosts else {}
        if hosts:
            problems = remote.check_hosts(ssh_cmd, list(dict.fromkeys(hosts)), connect_timeout)
            for line in problems:
                say(line)
            if problems:
                say('%d of %d hosts cannot run workers; nothing was started'
                    % (len(problems), len(set(hosts))))
                return 255
    except remote.HostError as err:
        say(str(err))
        return err.code
    port = port or free_port()
    ports = {port}
    while len(ports) <= num_workers:
        ports.add(free_port())
    ports = sorted(ports - {port})     # ascending: on one host, ranks follow the worker index
    workers = [Worker(i, hosts[i % len(hosts)] if hosts else None, ports[i])
               for i in range(num_workers)]
    if hosts:
        say('scheduler at %s:%d; %s' % (root_uri, port, ', '.join(
            'worker %d on %s' % (w.index, w.host) for w in workers)))
    server_cmd = [sys.executable, '-c', 'import mxnet']   # importing mxnet runs a ps-lite role
    code, reason = 0, None
    try:
        scheduler = Scheduler(server_cmd, dict(os.environ, **_role_env(
            'scheduler', root_uri, port, num_servers, num_workers)), workers)
        procs.append(scheduler.proc)
        for index in range(num_servers):
            env = _role_env('server', root_uri, port, num_servers, num_workers)
            if hosts:
                env['DMLC_NODE_HOST'] = root_uri
            procs.append(_start('server %d' % index, server_cmd, dict(os.environ, **env)))
        for w in workers:
            env = dict(_role_env('worker', root_uri, port, num_servers, num_workers),
                       PORT=str(w.port))
            if w.host is None:
                w.start(command, dict(os.environ, **env))
            else:
                env.update(forwarded, DMLC_NODE_HOST=addresses[w.host])
                w.start(remote.worker_command(ssh_cmd, w.host, os.getcwd(), env,
                                              remote.remote_program(command)), None)
        while reason is None:
            if hosts and scheduler.ranked.is_set():
                scheduler.ranked.clear()
                say('ranks: %s' % ', '.join('rank %d = worker %d on %s' % (w.rank, w.index, w.host)
                                            for w in sorted(workers, key=lambda w: w.rank)))
            done = [w for w in workers if w.finished()]
            failed = [(w, w.outcome()) for w in done if w.outcome()[0] != 0]
            dead = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                w, (code, what) = failed[0]
                reason = '%s %s; stopping the job' % (w.label(), what)
            elif len(done) == len(workers):
                reason = 'all %d workers exited with 0 (%.1f s)' % (len(workers),
                                                                    time.time() - start)
            elif dead:    # a dead scheduler or server leaves the workers waiting forever
                code = dead[0].returncode or 1
                reason = '%s %s; stopping the job' % (
                    'the scheduler' if dead[0] is procs[0] else 'server %d'
                    % (procs.index(dead[0]) - 1), describe(dead[0].returncode))
            elif timeout and time.time() - start > timeout:
                code, reason = 124, 'job exceeded %ss; stopping it' % timeout
            else:
                time.sleep(0.1)
    except LaunchError as err:
        code, reason = err.code, '%s; stopping the job' % err
    except Stopped as stop:
        code = 128 + stop.signum
        reason = 'stopped by %s; stopping the job' % signal.Signals(stop.signum).name
    finally:
        _stop(workers, procs)
    say(reason)
    return code if code >= 0 else 128 - code


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m pbn_gluon.launch',
        description='Launch an MXNet KVStore dist_sync job (scheduler, servers, workers).')
    parser.add_argument('-n', '--num-workers', type=int, required=True)
    parser.add_argument('-s', '--num-servers', type=int, default=1)
    parser.add_argument('-H', '--hosts', default=None,
                        help='comma-separated worker hosts (ssh); default: this machine')
    parser.add_argument('--root-uri', default=None,
                        help='scheduler address the workers connect to (default: '
                             '$DMLC_PS_ROOT_URI, else with -H the address of this machine on '
                             'the route to the first remote host, else 127.0.0.1)')
    parser.add_argument('--interface', default=None,
                        help='take the scheduler address from this network interface '
                             '(default: $DMLC_INTERFACE)')
    parser.add_argument('-x', dest='env', action='append', default=[], metavar='VAR[=VALUE]',
                        help='also forward VAR to remote workers (repeatable); forwarded '
                             'anyway: %s' % ' '.join(remote.DEFAULT_ENV))
    parser.add_argument('--ssh', default=os.environ.get('PBN_GLUON_SSH', 'ssh'),
                        help='command used to reach a host, e.g. "ssh -F config" '
                             '(default: $PBN_GLUON_SSH, else ssh)')
    parser.add_argument('-p', '--ssh-port', type=int, default=None, help='ssh port of the hosts')
    parser.add_argument('--connect-timeout', type=float, default=10,
                        help='seconds to wait for a host to answer over ssh (default 10)')
    parser.add_argument('--port', type=int, default=None, help='scheduler port (default: free)')
    parser.add_argument('--timeout', type=float, default=None, help='stop the job after SECONDS')
    parser.add_argument('command', nargs=argparse.REMAINDER, help='-- then the worker command')
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ['--'] else args.command
    if not command:
        parser.error('give the worker command after --')
    if args.num_workers < 1 or args.num_servers < 1:
        parser.error('need at least one worker and one server')
    hosts = [h for h in args.hosts.split(',') if h] if args.hosts else None
    if hosts and not shlex.split(args.ssh):
        parser.error('--ssh is empty')

    def stop(signum, frame):    # leave through launch()'s finally, which stops the job
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)    # once: let the job stop in peace
        raise Stopped(signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return launch(command, args.num_workers, args.num_servers, hosts, args.ssh,
                      root_uri=args.root_uri, port=args.port, timeout=args.timeout,
                      interface=args.interface, env_vars=args.env, ssh_port=args.ssh_port,
                      connect_timeout=args.connect_timeout)
    except Stopped as stop:     # while checking the hosts: nothing was started
        say('stopped by %s before the job started' % signal.Signals(stop.signum).name)
        return 128 + stop.signum


if __name__ == '__main__':
    sys.exit(main())
