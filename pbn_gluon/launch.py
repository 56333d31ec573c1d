"""Launch a KVStore dist_sync job: one scheduler, S servers and N workers.

    python -m pbn_gluon.launch -n 2 -- python scripts/train.py --config configs/x.yaml
    python -m pbn_gluon.launch -n 4 -H host1,host2 -- python train.py ...   # workers over ssh

Every process gets DMLC_ROLE, DMLC_PS_ROOT_URI, DMLC_PS_ROOT_PORT, DMLC_NUM_SERVER and
DMLC_NUM_WORKER. The launcher waits for the workers; when one fails (non-zero exit, killed)
it stops all the others and exits with that worker's code, so a dead worker never leaves the
rest hanging. A process that cannot be started (no such program, not executable) stops
everything already started, with one error line and exit code 127 (126: not executable); a
launcher stopped by SIGTERM or Ctrl-C stops its processes too, and on Linux its processes
receive SIGTERM if the launcher itself is killed. Scheduler and servers run on this machine.
"""
import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

__all__ = ['launch', 'main', 'LaunchError']


class LaunchError(RuntimeError):
    """A process of the job could not be started; `code` is the exit code to report."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def _die_with_parent():
    """In the child, before exec: SIGTERM when the launcher dies (Linux), so that even a killed
    launcher leaves no scheduler or server behind."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG
    except Exception:     # not Linux: the launcher's own handlers still stop the job
        pass


def _start(name, command, env=None):
    try:
        return subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)
    except OSError as err:
        raise LaunchError('cannot start %s: %s: %s' % (
            name, ' '.join(shlex.quote(c) for c in command), err.strerror or err),
            127 if isinstance(err, FileNotFoundError) else 126) from err


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _role_env(role, root_uri, port, num_servers, num_workers):
    env = dict(os.environ, DMLC_ROLE=role, DMLC_PS_ROOT_URI=root_uri,
               DMLC_PS_ROOT_PORT=str(port), DMLC_NUM_SERVER=str(num_servers),
               DMLC_NUM_WORKER=str(num_workers))
    return env


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()


def launch(command, num_workers, num_servers=1, hosts=None, ssh='ssh', root_uri=None,
           port=None, timeout=None):
    """Run `command` (a list) as `num_workers` dist_sync workers; returns the job's exit code.

    hosts: worker hosts (round robin, through `ssh`), None for this machine. timeout: seconds
    after which the whole job is stopped (exit code 124)."""
    root_uri = root_uri or ('127.0.0.1' if not hosts else socket.gethostbyname(socket.gethostname()))
    port = port or free_port()
    server_cmd = [sys.executable, '-c', 'import mxnet']   # importing mxnet runs a ps-lite role
    procs, workers = [], []
    code = 0
    try:
        procs.append(_start('the scheduler', server_cmd, _role_env(
            'scheduler', root_uri, port, num_servers, num_workers)))
        for index in range(num_servers):
            procs.append(_start('server %d' % index, server_cmd, _role_env(
                'server', root_uri, port, num_servers, num_workers)))
        for rank in range(num_workers):
            env = _role_env('worker', root_uri, port, num_servers, num_workers)
            if hosts:
                host = hosts[rank % len(hosts)]
                exports = ' '.join('%s=%s' % (k, shlex.quote(env[k])) for k in env
                                   if k.startswith('DMLC_'))
                remote = 'cd %s && env %s %s' % (shlex.quote(os.getcwd()), exports,
                                                 ' '.join(shlex.quote(c) for c in command))
                workers.append(_start('worker %d' % rank, shlex.split(ssh) + [host, remote]))
            else:
                workers.append(_start('worker %d' % rank, command, env))
        start = time.time()
        while any(w.poll() is None for w in workers):
            failed = [w for w in workers if w.poll() not in (None, 0)]
            if failed:
                code = failed[0].returncode
                sys.stderr.write('pbn_gluon.launch: worker %d exited with %d; stopping the job\n'
                                 % (workers.index(failed[0]), code))
                break
            dead = [p for p in procs if p.poll() not in (None, 0)]
            if dead:    # a crashed scheduler or server leaves the workers waiting forever
                code = dead[0].returncode
                sys.stderr.write('pbn_gluon.launch: %s exited with %d; stopping the job\n'
                                 % ('scheduler' if dead[0] is procs[0] else 'server %d'
                                    % (procs.index(dead[0]) - 1), dead[0].returncode))
                break
            if timeout and time.time() - start > timeout:
                sys.stderr.write('pbn_gluon.launch: job exceeded %ss; stopping it\n' % timeout)
                code = 124
                break
            time.sleep(0.2)
        else:
            code = next((w.returncode for w in workers if w.returncode), 0)
    except LaunchError as err:
        sys.stderr.write('pbn_gluon.launch: %s; stopping the job\n' % err)
        code = err.code
    finally:
        _stop(workers + procs)
    return code if code >= 0 else 128 - code


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m pbn_gluon.launch',
        description='Launch an MXNet KVStore dist_sync job (scheduler, servers, workers).')
    parser.add_argument('-n', '--num-workers', type=int, required=True)
    parser.add_argument('-s', '--num-servers', type=int, default=1)
    parser.add_argument('-H', '--hosts', default=None,
                        help='comma-separated worker hosts (ssh); default: this machine')
    parser.add_argument('--ssh', default='ssh', help='command used to reach a host')
    parser.add_argument('--port', type=int, default=None, help='scheduler port (default: free)')
    parser.add_argument('--timeout', type=float, default=None, help='stop the job after SECONDS')
    parser.add_argument('command', nargs=argparse.REMAINDER, help='-- then the worker command')
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ['--'] else args.command
    if not command:
        parser.error('give the worker command after --')
    if args.num_workers < 1 or args.num_servers < 1:
        parser.error('need at least one worker and one server')
    hosts = args.hosts.split(',') if args.hosts else None

    def stop(signum, frame):    # SIGTERM: leave through launch()'s finally, which stops the job
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    return launch(command, args.num_workers, args.num_servers, hosts, args.ssh,
                  port=args.port, timeout=args.timeout)


if __name__ == '__main__':
    sys.exit(main())
