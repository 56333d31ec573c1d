"""python -m pbn_gluon.launch -H over real ssh: an sshd started here on two loopback addresses
(127.0.0.1 and 127.0.0.2: two "hosts" that share this machine), key-based login with its own
host key, client key and known_hosts in a temporary directory, 2 hosts x 2 workers.

Every fault (a remote worker killed, its ssh session dropped, the launcher stopped by SIGTERM
or Ctrl-C, --timeout, an unreachable host, a missing interpreter on one host) must end the job
with one clear line and leave no process on either host: nothing whose command line holds the
run's unique marker, no process of the job's scheduler port, no ssh session of this sshd. A
clean run over two hosts computes the same allreduce as a one-host run and as numpy.
Skipped, with the reason, only where openssh-server is missing or sshd cannot start.
"""
import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from pbn_gluon import remote

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, 'tests', 'kv_allreduce_worker.py')
HOST1, HOST2 = '127.0.0.1', '127.0.0.2'

#: host 2 runs every session through this: with the file `hide` naming a directory, that
#: directory is an empty tmpfs in the session's own mount namespace (missing on "host 2" only)
HOST2_SHELL = '''#!/bin/sh
if [ -s "{dir}/hide" ]; then
  exec unshare -m sh -c 'mount -t tmpfs none "$1" && exec sh -c "$SSH_ORIGINAL_COMMAND"' \\
    sh "$(cat "{dir}/hide")"
fi
exec sh -c "$SSH_ORIGINAL_COMMAND"
'''


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Sshd:
    """sshd -D on HOST1 and HOST2 (one port), the client's `ssh -F config` command."""

    def __init__(self, directory):
        sshd, keygen = shutil.which('sshd', path='/usr/sbin:/usr/local/sbin:' +
                                    os.environ.get('PATH', '')), shutil.which('ssh-keygen')
        if not sshd or not keygen or not shutil.which('ssh'):
            pytest.skip('openssh-server / openssh-client are not installed (make venv installs '
                        'them where apt-get works)')
        self.dir = str(directory)
        self.port = free_port()
        for key in ('host_key', 'client_key'):
            subprocess.run([keygen, '-q', '-t', 'ed25519', '-N', '', '-f', self.path(key)],
                           check=True)
        shutil.copy(self.path('client_key.pub'), self.path('authorized_keys'))
        with open(self.path('host2.sh'), 'w') as f:
            f.write(HOST2_SHELL.format(dir=self.dir))
        os.chmod(self.path('host2.sh'), 0o755)
        with open(self.path('sshd_config'), 'w') as f:
            f.write('Port %d\nListenAddress %s\nListenAddress %s\nHostKey %s\n'
                    'AuthorizedKeysFile %s\nPidFile %s\nPermitRootLogin prohibit-password\n'
                    'PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n'
                    'StrictModes no\nMaxStartups 100\nMatch LocalAddress %s\n'
                    '    ForceCommand %s\n' % (
                        self.port, HOST1, HOST2, self.path('host_key'),
                        self.path('authorized_keys'), self.path('sshd.pid'), HOST2,
                        self.path('host2.sh')))
        with open(self.path('host_key.pub')) as f:
            host_key = ' '.join(f.read().split()[:2])
        with open(self.path('known_hosts'), 'w') as f:
            f.write('[%s]:%d,[%s]:%d %s\n' % (HOST1, self.port, HOST2, self.port, host_key))
        with open(self.path('ssh_config'), 'w') as f:
            f.write('Host *\n  User %s\n  Port %d\n  IdentityFile %s\n  IdentitiesOnly yes\n'
                    '  UserKnownHostsFile %s\n  StrictHostKeyChecking yes\n  LogLevel ERROR\n'
                    % (getpass.getuser(), self.port, self.path('client_key'),
                       self.path('known_hosts')))
        self.ssh = 'ssh -F %s' % self.path('ssh_config')
        if os.geteuid() == 0:
            os.makedirs('/run/sshd', exist_ok=True)     # privilege separation directory
        self.proc = subprocess.Popen([sshd, '-D', '-f', self.path('sshd_config'),
                                      '-E', self.path('sshd.log')])
        deadline = time.time() + 15
        while not self.answers():
            if self.proc.poll() is not None or time.time() > deadline:
                self.close()
                with open(self.path('sshd.log')) as f:
                    pytest.skip('sshd does not start here: %s' % f.read().strip()[-300:])
            time.sleep(0.1)

    def path(self, name):
        return os.path.join(self.dir, name)

    def answers(self):
        result = subprocess.run(self.ssh.split() + ['-o', 'BatchMode=yes', HOST2, 'true'],
                                capture_output=True)
        return result.returncode == 0

    def sessions(self):
        """pids of this sshd's connection processes (and theirs)."""
        return descendants(self.proc.pid)

    def hide(self, directory):
        with open(self.path('hide'), 'w') as f:
            f.write(directory or '')

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def descendants(pid):
    children = {}
    for p in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open('/proc/%s/stat' % p) as f:
                children.setdefault(int(f.read().rsplit(')', 1)[1].split()[1]), []).append(int(p))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return sorted(found)


def _read(pid, name):
    try:
        with open('/proc/%d/%s' % (pid, name), 'rb') as f:
            return f.read()
    except OSError:
        return b''


def processes(marker, port):
    """Processes of a job: the marker in their command line, or its scheduler port."""
    found = []
    for pid in map(int, filter(str.isdigit, os.listdir('/proc'))):
        if pid == os.getpid():
            continue
        if marker.encode() in _read(pid, 'cmdline') or \
                ('DMLC_PS_ROOT_PORT=%d' % port).encode() in _read(pid, 'environ').split(b'\0'):
            found.append(pid)
    return found


def remote_workers(marker, host):
    """pids of the worker processes (not wrapper, ssh client or launcher) running on `host`."""
    return [pid for pid in processes(marker, -1)
            if ('DMLC_NODE_HOST=%s' % host).encode() in _read(pid, 'environ').split(b'\0')]


@pytest.fixture(scope='module')
def sshd(tmp_path_factory):
    server = Sshd(tmp_path_factory.mktemp('sshd'))
    yield server
    server.close()
    assert server.proc.returncode is not None


class Job:
    """The launcher, its stdout and stderr collected line by line."""

    def __init__(self, sshd, hosts, worker_args, *options, env=None, workers=4):
        self.marker = 'mark-%s' % uuid.uuid4().hex
        self.port = free_port()
        command = [sys.executable, '-m', 'pbn_gluon.launch', '-n', str(workers), '--port',
                   str(self.port)]
        if hosts:
            command += ['-H', ','.join(hosts), '--ssh', sshd.ssh]
        command += list(options) + ['--', sys.executable, WORKER] + list(worker_args) + \
            [self.marker]
        environ = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
        self.start = time.time()
        self.proc = subprocess.Popen(command, cwd=REPO, env=environ, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip('\n'))

    def output(self):
        return '\n'.join(self.lines)

    def wait_for(self, pattern, count=1, timeout=90):
        deadline = time.time() + timeout
        while len([l for l in self.lines if re.search(pattern, l)]) < count:
            assert self.proc.poll() is None and time.time() < deadline, self.output()
            time.sleep(0.05)

    def finish(self, timeout=60):
        """(exit code, seconds from now to the launcher's exit)."""
        since = time.time()
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.reader.join(5)
        return self.proc.returncode, time.time() - since

    def left(self, sshd):
        """What is left of the job on both hosts, given 3 s to go."""
        since = time.time()
        while True:
            left = processes(self.marker, self.port) + (sshd.sessions() if sshd else [])
            self.cleared = time.time() - since
            if not left or self.cleared > 3:
                return [(pid, _read(pid, 'cmdline')[:120]) for pid in left]
            time.sleep(0.1)


def reason(job):
    """The launcher's last line."""
    lines = [l for l in job.lines if l.startswith('pbn_gluon.launch: ')]
    return lines[-1] if lines else ''


def check_fault(job, sshd, fault, code, pattern, seconds=None):
    """The fault ended the job with exit `code` and a last line matching `pattern`, leaving
    nothing behind."""
    assert job.proc.returncode == code, job.output()
    assert re.search(pattern, reason(job)), job.output()
    assert job.left(sshd) == []
    if seconds is not None:
        print('\n%s: %s (exit %d, %.1f s; nothing left %.1f s after the exit)'
              % (fault, reason(job), code, seconds, job.cleared))


@pytest.mark.timeout(120)
def test_two_hosts_compute_what_one_host_computes(sshd):
    """4 dist_sync workers over 2 hosts: every rank pulls the sum of the 4 seeded draws, equal
    to numpy's sum of the draws and to the same job on one host; remote workers got the
    forwarded environment (defaults and -x), the launcher's interpreter and directory."""
    env = {'PBN_GLUON_TEST_VALUE': 'a b', 'OMP_NUM_THREADS': '1', 'MXNET_ENGINE_TYPE':
           'ThreadedEnginePerDevice', 'LAUNCH_TEST_NOT_FORWARDED': 'y'}
    two = Job(sshd, [HOST1, HOST2], ['--kvstore'], '-x', 'PBN_GLUON_TEST_SET=1', env=env)
    one = Job(None, None, ['--kvstore'])
    results = {}
    for name, job in (('two', two), ('one', one)):
        code, _ = job.finish(110)
        assert code == 0, job.output()
        assert re.search(r'all 4 workers exited with 0', reason(job)), job.output()
        records = [json.loads(l.split(' ', 1)[1]) for l in job.lines if l.startswith('ready ')]
        results[name] = {r['rank']: r for r in records}
        assert sorted(results[name]) == [0, 1, 2, 3], job.output()
        assert job.left(sshd if name == 'two' else None) == []
    reference = np.sum([results['two'][r]['draw'] for r in range(4)], axis=0)
    for r in range(4):
        np.testing.assert_allclose(results['two'][r]['sum'], reference, rtol=1e-6)
        assert results['two'][r]['draw'] == results['one'][r]['draw']      # bit for bit
        # the server adds the pushes in arrival order: float32 rounding differs from run to run
        np.testing.assert_allclose(results['two'][r]['sum'], results['one'][r]['sum'], rtol=1e-6)
    # the rank map line names the host of each rank, as the workers themselves saw it
    ranks = re.findall(r'rank (\d) = worker \d on ([0-9.]+)', two.output())
    assert {int(r): host for r, host in ranks} == {r: results['two'][r]['host'] for r in range(4)}
    assert {results['two'][r]['host'] for r in range(4)} == {HOST1, HOST2}
    for record in results['two'].values():
        assert record['executable'] == sys.executable and record['cwd'] == REPO
        assert record['env']['PBN_GLUON_TEST_VALUE'] == 'a b'
        assert record['env']['PBN_GLUON_TEST_SET'] == '1'
        assert record['env']['OMP_NUM_THREADS'] == '1'
        assert record['env']['MXNET_ENGINE_TYPE'] == 'ThreadedEnginePerDevice'
        assert record['env']['PYTHONPATH'] == REPO and record['env']['PATH'] == os.environ['PATH']
        assert 'LAUNCH_TEST_NOT_FORWARDED' not in record['env']


@pytest.mark.timeout(120)
def test_a_killed_remote_worker_ends_the_job(sshd):
    job = Job(sshd, [HOST1, HOST2], ['--kvstore', '--sleep', '300'])
    job.wait_for(r'^ready ', count=4)
    job.wait_for(r'ranks: ')
    victim = remote_workers(job.marker, HOST2)[0]
    os.kill(victim, signal.SIGKILL)
    code, seconds = job.finish()
    check_fault(job, sshd, 'remote worker killed', 137,
                r'worker [13] \(rank \d\) on 127\.0\.0\.2 killed by SIGKILL; stopping the job',
                seconds)


@pytest.mark.timeout(60)
def test_a_dropped_ssh_session_ends_the_job(sshd):
    """The sshd process serving one remote worker dies: the wrapper sees its channel close and
    kills the worker; the launcher sees the ssh client fail and stops the rest."""
    job = Job(sshd, [HOST1, HOST2], ['--sleep', '300'])
    job.wait_for(r'^ready ', count=4)
    wrapper = int(_read(remote_workers(job.marker, HOST2)[0], 'stat').rsplit(b')', 1)[1]
                  .split()[1])
    session = int(_read(wrapper, 'stat').rsplit(b')', 1)[1].split()[1])
    assert b'sshd' in _read(session, 'cmdline')
    os.kill(session, signal.SIGKILL)
    code, seconds = job.finish()
    check_fault(job, sshd, 'ssh session dropped', 255,
                r'worker [13] \(no rank yet\) on 127\.0\.0\.2 lost its ssh session', seconds)


@pytest.mark.timeout(60)
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=['SIGTERM', 'SIGINT', 'SIGKILL'])
def test_a_stopped_launcher_stops_both_hosts(sshd, signum):
    """SIGTERM, Ctrl-C: the launcher stops the job and says so. SIGKILL: no line, but its
    children (ssh clients included) get SIGTERM from the kernel (PR_SET_PDEATHSIG), and each
    remote wrapper sees its channel close."""
    job = Job(sshd, [HOST1, HOST2], ['--sleep', '300'])
    job.wait_for(r'^ready ', count=4)
    job.proc.send_signal(signum)
    code, seconds = job.finish()
    name = signal.Signals(signum).name
    if signum == signal.SIGKILL:
        assert code == -signum and job.left(sshd) == []
        print('\nlauncher got SIGKILL: nothing left %.1f s after' % job.cleared)
        return
    check_fault(job, sshd, 'launcher got %s' % name, 128 + signum,
                r'stopped by %s; stopping the job' % name, seconds)


@pytest.mark.timeout(60)
def test_timeout_stops_both_hosts(sshd):
    job = Job(sshd, [HOST1, HOST2], ['--sleep', '300'], '--timeout', '10')
    job.wait_for(r'^ready ', count=4)
    code, seconds = job.finish()
    check_fault(job, sshd, '--timeout 10', 124, r'job exceeded 10.0s; stopping it',
                time.time() - job.start - 10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize('kind', ['refuses', 'never answers'])
def test_an_unreachable_host_stops_nothing_and_starts_nothing(sshd, kind):
    """127.0.0.3 has no sshd (connection refused), or accepts TCP on the ssh port and never
    says a word (ConnectTimeout, 2 s here): one line for it, nothing started."""
    with socket.socket() as silent:
        if kind == 'never answers':
            silent.bind(('127.0.0.3', sshd.port))
            silent.listen(8)        # the kernel accepts connections; nobody answers
        job = Job(sshd, [HOST1, HOST2, '127.0.0.3'], ['--sleep', '300'], '--connect-timeout',
                  '2')
        code, seconds = job.finish()
    lines = [l for l in job.lines if l.startswith('pbn_gluon.launch: ')]
    assert len(lines) == 2 and 'cannot reach 127.0.0.3 over ssh: ' in lines[0], job.output()
    assert ('refused' if kind == 'refuses' else 'timed out') in lines[0], job.output()
    check_fault(job, sshd, 'host %s' % kind, 255, r'1 of 3 hosts cannot run workers; '
                r'nothing was started', time.time() - job.start)
    assert not any(l.startswith('ready') for l in job.lines)


@pytest.mark.timeout(60)
def test_a_host_without_the_interpreter_stops_the_other_host(sshd):
    """The venv's interpreter is missing on host 2 (its directory hidden there): the workers of
    host 1 have started; the launcher names the worker and the path, and stops them."""
    if subprocess.run(['unshare', '-m', 'true'], capture_output=True).returncode != 0:
        pytest.skip('cannot make a mount namespace here (unshare -m) to hide a directory')
    sshd.hide(os.path.dirname(sys.executable))
    try:
        job = Job(sshd, [HOST1, HOST2], ['--sleep', '300'])
        code, seconds = job.finish()
    finally:
        sshd.hide(None)
    check_fault(job, sshd, 'interpreter missing on one host', 127,
                r'worker [13] \(no rank yet\) on 127\.0\.0\.2 could not start: %s: No such file'
                % re.escape(sys.executable), time.time() - job.start)


def test_an_unresolvable_host_is_one_line():
    result = subprocess.run([sys.executable, '-m', 'pbn_gluon.launch', '-n', '2', '-H',
                             'localhost,no-such-host.invalid', '--', 'true'], cwd=REPO,
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "pbn_gluon.launch: cannot resolve host 'no-such-host.invalid': "), result.stderr


def test_the_launcher_never_imports_mxnet(tmp_path):
    """python -X importtime lists what the launcher process imports (its children are
    separate interpreters without the flag)."""
    result = subprocess.run([sys.executable, '-X', 'importtime', '-m', 'pbn_gluon.launch',
                             '-n', '1', '--', sys.executable, '-c', 'pass'], cwd=REPO,
                            capture_output=True, text=True, timeout=90,
                            env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 0, result.stderr
    imported = [l.rsplit('|', 1)[1].strip() for l in result.stderr.splitlines()
                if l.startswith('import time:') and '|' in l]
    assert 'pbn_gluon.remote' in imported       # launch itself runs as __main__
    assert not [m for m in imported if m.split('.')[0] in ('mxnet', 'numpy', 'gluoncv')]


def test_scheduler_address(monkeypatch):
    """--root-uri, --interface, then the environment, then the route to the first remote host;
    loopback only when every host is loopback."""
    loop = {'a': '127.0.0.1', 'b': '127.0.0.2'}
    far = {'a': '127.0.0.1', 'c': '198.51.100.7'}
    assert remote.scheduler_address(None, None, {}, loop) == '127.0.0.1'
    assert remote.scheduler_address(None, None, {}, {}) == '127.0.0.1'
    assert remote.scheduler_address('127.0.0.5', None, {'DMLC_PS_ROOT_URI': '10.0.0.1'},
                                    loop) == '127.0.0.5'
    assert remote.scheduler_address(None, None, {'DMLC_PS_ROOT_URI': '127.0.0.6'}, loop) == \
        '127.0.0.6'
    assert remote.scheduler_address(None, 'lo', {'DMLC_PS_ROOT_URI': '10.0.0.1'}, loop) == \
        '127.0.0.1'
    assert remote.scheduler_address(None, None, {'DMLC_INTERFACE': 'lo'}, loop) == '127.0.0.1'
    monkeypatch.setattr(remote, '_route_source', lambda address: {'198.51.100.7': '192.0.2.9'}
                        [address])
    assert remote.scheduler_address(None, None, {}, far) == '192.0.2.9'
    with pytest.raises(remote.HostError, match=r'127\.0\.0\.1 is a loopback address, which '
                       r'c cannot reach; give --root-uri'):
        remote.scheduler_address(None, None, {'DMLC_PS_ROOT_URI': '127.0.0.1'}, far)

    def unreachable(address):
        raise OSError(101, 'Network is unreachable')
    monkeypatch.setattr(remote, '_route_source', unreachable)
    with pytest.raises(remote.HostError, match=r'no route from this machine to c '
                       r'\(198\.51\.100\.7\): Network is unreachable; give --root-uri'):
        remote.scheduler_address(None, None, {}, far)
    with pytest.raises(remote.HostError, match="no IPv4 address on interface 'nope0'"):
        remote.scheduler_address(None, 'nope0', {}, far)


def test_forwarded_environment():
    environ = {'MXNET_X': '1', 'PBN_GLUON_Y': '2', 'OMP_NUM_THREADS': '3', 'PATH': '/p',
               'HOME': '/h', 'SECRET': 's', 'MXNETX': 'no', 'PYTHONPATH': '/q'}
    assert remote.forwarded_env(environ, ['HOME', 'A=b=c']) == {
        'MXNET_X': '1', 'PBN_GLUON_Y': '2', 'OMP_NUM_THREADS': '3', 'PATH': '/p',
        'PYTHONPATH': '/q', 'HOME': '/h', 'A': 'b=c'}
    with pytest.raises(remote.HostError, match='-x NOPE: NOPE is not set here'):
        remote.forwarded_env(environ, ['NOPE'])
    python = remote.remote_program(['python3', 'x.py'])
    assert os.path.isabs(python[0]) and python[1:] == ['x.py']
    assert remote.remote_program(['./python', 'x']) == ['./python', 'x']
    assert remote.remote_program(['pythonista']) == ['pythonista']
