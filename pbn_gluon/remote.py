"""Workers on other hosts for pbn_gluon.launch (standard library only: the launcher never
imports MXNet): the ssh command line, the environment forwarded to a worker, the check that
every host answers before the job starts, and the scheduler address the hosts can reach.

Each remote worker is ``ssh HOST exec python3 -c WRAPPER SPEC`` (pbn_gluon/remote_wrapper.py):
the wrapper runs the command in its own process group and kills that group when the ssh
channel closes, so stopping (or losing) the local ssh client stops the remote worker.
"""
import concurrent.futures
import fcntl
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import struct
import subprocess

from .remote_wrapper import TOKEN

__all__ = ['HostError', 'ssh_command', 'forwarded_env', 'remote_program', 'worker_command',
           'resolve', 'scheduler_address', 'check_hosts', 'DEFAULT_ENV']

#: forwarded to every remote worker when set here (names ending in '*' are prefixes)
DEFAULT_ENV = ('MXNET_*', 'PBN_GLUON_*', 'OMP_*', 'PYTHONPATH', 'PYTHONUNBUFFERED', 'PATH',
               'VIRTUAL_ENV')
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'remote_wrapper.py')) as _f:
    _WRAPPER = _f.read().split('"""', 2)[2].lstrip()     # without its docstring
STATUS_TOKEN = TOKEN.encode() + b' '


class HostError(RuntimeError):
    """A host or address problem found before anything starts; `code` is the exit code."""

    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code


def ssh_command(ssh, port=None, connect_timeout=10):
    """The ssh client command, never prompting (BatchMode: a host-key or password prompt is an
    error) and giving up on a host that does not answer (ConnectTimeout, ServerAlive*)."""
    return shlex.split(ssh) + [
        '-o', 'BatchMode=yes', '-o', 'ConnectTimeout=%d' % max(1, round(connect_timeout)),
        '-o', 'ServerAliveInterval=5', '-o', 'ServerAliveCountMax=3'] + \
        (['-p', str(port)] if port else [])


def forwarded_env(environ, extra=()):
    """The variables of `environ` a remote worker gets: DEFAULT_ENV, plus each of `extra`
    (horovodrun's -x: NAME forwards this machine's value, NAME=VALUE sets one)."""
    env = {}
    for name, value in environ.items():
        if any(name == p or (p.endswith('*') and name.startswith(p[:-1])) for p in DEFAULT_ENV):
            env[name] = value
    for item in extra:
        name, sep, value = item.partition('=')
        if not re.match(r'^[A-Za-z_][A-Za-z0-9_]*$', name):
            raise HostError('-x %s: not a variable name' % item)
        if not sep and name not in environ:
            raise HostError('-x %s: %s is not set here (give -x %s=VALUE)' % (item, name, name))
        env[name] = value if sep else environ[name]
    return env


def remote_program(command):
    """`command` with a bare python interpreter (python, python3, python3.11) replaced by the
    absolute path it has here, so that every host runs the same interpreter (same venv)."""
    program = command[0]
    if os.sep not in program and re.match(r'^python[0-9.]*$', program):
        found = shutil.which(program)
        if found:
            return [os.path.abspath(found)] + list(command[1:])
    return list(command)


def worker_command(ssh, host, cwd, env, command):
    """The local command that runs `command` on `host` through the wrapper."""
    spec = json.dumps({'cwd': cwd, 'env': env, 'command': list(command)}, sort_keys=True)
    return ssh + [host, 'exec python3 -c %s %s' % (shlex.quote(_WRAPPER), shlex.quote(spec))]


def host_name(host):
    """'user@host' -> 'host'."""
    return host.rpartition('@')[2]


def resolve(hosts):
    """{host: its IPv4 address}; HostError (exit 2) for a name that does not resolve."""
    addresses = {}
    for host in hosts:
        try:
            addresses[host] = socket.getaddrinfo(host_name(host), None, socket.AF_INET,
                                                 socket.SOCK_STREAM)[0][4][0]
        except (socket.gaierror, UnicodeError) as err:
            raise HostError('cannot resolve host %r: %s' % (
                host_name(host), getattr(err, 'strerror', None) or err)) from None
    return addresses


def _is_loopback(address):
    return ipaddress.ip_address(address).is_loopback


def interface_address(name):
    """The IPv4 address of network interface `name` (Linux)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915,     # SIOCGIFADDR
                                 struct.pack('256s', name.encode()[:15]))
        except OSError as err:
            raise HostError('no IPv4 address on interface %r: %s' % (name, err.strerror))
    return socket.inet_ntoa(packed[20:24])


def _route_source(address):
    """The address of this machine the kernel routes to `address` from (a UDP connect()
    sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((address, 9))
        return s.getsockname()[0]


def scheduler_address(root_uri, interface, environ, addresses):
    """The scheduler's address: --root-uri, --interface, $DMLC_PS_ROOT_URI, $DMLC_INTERFACE, in
    that order; else 127.0.0.1 when every worker host is a loopback address (or there are
    none), else the source address of the route to the first remote host. HostError when a
    remote host could only be given a loopback address."""
    interface = interface or (None if root_uri else environ.get('DMLC_INTERFACE'))
    root_uri = root_uri or (None if interface else environ.get('DMLC_PS_ROOT_URI'))
    remote = [(h, a) for h, a in addresses.items() if not _is_loopback(a)]
    if root_uri:
        address = resolve([root_uri])[root_uri]
    elif interface:
        address = interface_address(interface)
    elif not remote:
        return '127.0.0.1'
    else:
        host, target = remote[0]
        try:
            address = _route_source(target)
        except OSError as err:
            raise HostError('no route from this machine to %s (%s): %s; give --root-uri ADDRESS'
                            % (host_name(host), target, err.strerror)) from None
    if remote and _is_loopback(address):
        raise HostError('the scheduler address %s is a loopback address, which %s cannot '
                        'reach; give --root-uri ADDRESS or --interface NAME of this machine'
                        % (address, ', '.join(host_name(h) for h, _ in remote)))
    return address


def _check(ssh, host, timeout):
    """None when `host` answers over ssh and has python3, else one line saying why not."""
    try:
        result = subprocess.run(ssh + [host, 'exec python3 -c "print(42)"'],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 'host %s did not answer over ssh within %.0f s' % (host, timeout)
    except OSError as err:
        return 'cannot run %s to reach %s: %s' % (ssh[0], host, err.strerror or err)
    if result.returncode == 0 and result.stdout.strip() == b'42':
        return None
    said = result.stderr.decode(errors='replace').strip().splitlines()
    said = said[-1] if said else 'no message'
    if result.returncode == 255:
        return 'cannot reach %s over ssh: %s' % (host, said)
    return 'host %s cannot run python3 (the launcher runs each worker through it): exit %d: %s' \
        % (host, result.returncode, said)


def check_hosts(ssh, hosts, connect_timeout):
    """One line per host that cannot run a worker (all hosts checked at once)."""
    with concurrent.futures.ThreadPoolExecutor(len(hosts)) as pool:
        lines = list(pool.map(lambda h: _check(ssh, h, connect_timeout + 10), hosts))
    return [line for line in lines if line]
