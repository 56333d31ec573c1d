"""The fused operators (csrc/): built against the installed MXNet on first import, then loaded.

``pbn_batch_norm`` and ``pbn_batch_sums`` are C++ (CPU, OpenMP) and CUDA (GPU) kernels
registered through MXNet's extension-library API (``mxnet/lib_api.h``, MXNet >= 1.7); once
loaded they are ``F.pbn_batch_norm`` / ``F.pbn_batch_sums`` in any (hybridized) block, with
autograd, on every context. The library is compiled once per source, MXNet and compiler
version into ``$PBN_GLUON_CACHE`` (default ``~/.cache/pbn_gluon``), under a file lock so that
the processes of a Horovod or KVStore job can import pbn_gluon at the same time.

The cache is checked, never trusted: beside the library, ``libpbn_ops.so.sha256`` (written at
build time) holds its size and SHA-256, and a library that does not match them (a full disk, a
killed copy: loading a truncated library dies with SIGBUS) is rebuilt before it is loaded. A
build compiles in a temporary directory beside the library (``.build-*``) and renames the
result; the directory goes when the build ends. A killed build leaves it, and its compiler,
now an orphan, may still write into it: the next build removes it under the lock (the orphan
then has nowhere to write), as does any later load that finds the lock free. When the cache cannot be written (a read-only file system,
``$PBN_GLUON_CACHE`` under a regular file), the library is built in a per-user temporary
directory instead, with a warning that names ``PBN_GLUON_CACHE``; when that fails too, a
BuildError names both.

CUDA kernels are compiled when MXNet is a CUDA build and ``nvcc`` is found (``$CUDA_HOME/bin``
or ``PATH``); otherwise the library is CPU-only and ``cuda_enabled()`` says so.

Once loaded, the library's input contract (each operator's input names, in order, as the C++
enums take them: ``pbn_operator_inputs``) is checked against pbn_gluon.op_contract, which the
Python callers build their inputs from; a ContractError names every difference.
"""
import ctypes
import fcntl
import hashlib
import os
import shutil
import glob
import json
import subprocess
import sys
import tempfile
import warnings

import mxnet as mx

from . import op_contract

__all__ = ['load', 'cuda_enabled', 'library_path', 'library_ok', 'check_contract', 'BuildError',
           'ContractError']

SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc')
SOURCES = ('pbn_ops.cc', 'pbn_ops.h', 'pbn_math.h', 'pbn_cuda.cu', 'pbn_kernels.cuh')

#: GPU architectures of MXNet's own 1.9 CUDA builds; override with $PBN_GLUON_CUDA_ARCH="80;90"
DEFAULT_CUDA_ARCH = '50;60;70;80;86'

_loaded = {}


class BuildError(RuntimeError):
    """The operator library could not be built; the message says what is missing."""


class ContractError(RuntimeError):
    """The loaded operators take other inputs than pbn_gluon.op_contract says."""


def _mxnet_dirs():
    root = os.path.dirname(os.path.abspath(mx.__file__))
    include, lib_api_cc = os.path.join(root, 'include'), os.path.join(root, 'src', 'lib_api.cc')
    if not (os.path.isfile(os.path.join(include, 'mxnet', 'lib_api.h'))
            and os.path.isfile(lib_api_cc)):
        raise BuildError(
            'mxnet %s at %s ships no include/mxnet/lib_api.h and src/lib_api.cc: pbn_gluon '
            'builds its operators with the extension-library API of MXNet >= 1.7 (pip install '
            'mxnet==1.9.1)' % (mx.__version__, root))
    return root, include, lib_api_cc


def _cxx():
    cxx = os.environ.get('CXX', 'g++')
    path = shutil.which(cxx)
    if path is None:
        raise BuildError(
            'pbn_gluon compiles its operators on first import and needs a C++ compiler: %r was '
            'not found (install g++, e.g. `apt-get install g++`, or set $CXX)' % cxx)
    return path


def _nvcc():
    """nvcc when MXNet is a CUDA build and nvcc is installed, else None."""
    if not mx.runtime.Features().is_enabled('CUDA'):
        return None
    for candidate in (os.path.join(os.environ.get('CUDA_HOME', '/usr/local/cuda'), 'bin', 'nvcc'),
                      shutil.which('nvcc')):
        if candidate and os.path.isfile(candidate):
            return candidate
    sys.stderr.write('pbn_gluon: MXNet is a CUDA build but nvcc was not found (set CUDA_HOME): '
                     'the operators are built for CPU only\n')
    return None


def _cuda_arch_flags():
    flags = []
    archs = os.environ.get('PBN_GLUON_CUDA_ARCH', DEFAULT_CUDA_ARCH).replace(',', ';').split(';')
    for arch in filter(None, (a.strip().replace('.', '') for a in archs)):
        flags.append('-gencode=arch=compute_%s,code=sm_%s' % (arch, arch))
    return flags


def _build_command(out, nvcc):
    """The compiler command line. -Bsymbolic binds the library's own copy of lib_api.cc to
    itself: without it a process that also loaded Horovod's MXNet library resolves some of
    them elsewhere and crashes (free(): invalid pointer)."""
    _, include, lib_api_cc = _mxnet_dirs()
    src = lambda name: os.path.join(SOURCE_DIR, name)
    includes = ['-I', include, '-I', SOURCE_DIR]
    if nvcc is None:
        return [_cxx(), '-shared', '-fPIC', '-std=c++14', '-O3', '-fopenmp', '-Wl,-Bsymbolic',
                *includes, src('pbn_ops.cc'), lib_api_cc, '-o', out]
    return [nvcc, '-shared', '-std=c++14', '-O3', '-Xcompiler', '-fPIC,-fopenmp',
            '-Xlinker', '-Bsymbolic',
            *_cuda_arch_flags(), *includes, src('pbn_ops.cc'),
            src('pbn_cuda.cu'), lib_api_cc, '-o', out]


def _cache_dir():
    default = os.path.join(os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')),
                           'pbn_gluon')
    return os.environ.get('PBN_GLUON_CACHE', default)


def _fallback_cache_dir():
    """A per-user cache under the temporary directory, for an unwritable $PBN_GLUON_CACHE."""
    return os.path.join(tempfile.gettempdir(), 'pbn_gluon-%d' % os.getuid())


def _key(command):
    digest = hashlib.sha1()
    for name in SOURCES:
        with open(os.path.join(SOURCE_DIR, name), 'rb') as f:
            digest.update(f.read())
    digest.update(' '.join(command[:-1]).encode())
    digest.update(mx.__version__.encode())
    return digest.hexdigest()[:16]


def library_path(nvcc=None, cache_dir=None):
    """Where the library for these sources, this MXNet and this compiler lives."""
    command = _build_command('lib.so', nvcc)
    return os.path.join(cache_dir or _cache_dir(), _key(command), 'libpbn_ops.so')


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(path):
    return path + '.sha256'


def library_ok(path):
    """True when `path` is a complete library: its size and SHA-256 are those written beside
    it when it was built."""
    try:
        with open(checksum_path(path)) as f:
            expected = json.load(f)
        return (os.path.getsize(path) == expected['size']
                and _sha256(path) == expected['sha256'])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _writable_dir(directory):
    """None when `directory` can be created and written, else why not."""
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix='.probe')
        os.close(fd)
        os.unlink(probe)
        return None
    except OSError as err:
        return '%s: %s' % (err.filename or directory, err.strerror or err)


#: the temporary build directories, beside the library
BUILD_PREFIX = '.build-'


def _leftovers(directory):
    """What killed builds left in `directory`: build directories, and the temporaries that
    earlier versions compiled beside the library."""
    return (glob.glob(os.path.join(directory, BUILD_PREFIX + '*'))
            + glob.glob(os.path.join(directory, 'tmp*.so'))
            + glob.glob(os.path.join(directory, '*.sha256.tmp')))


def _remove_stale_temporaries(directory):
    """Removes _leftovers (call with the lock held: no build is running there)."""
    for stale in _leftovers(directory):
        if os.path.isdir(stale):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            try:
                os.unlink(stale)
            except OSError:
                pass


def _remove_leftovers_if_idle(directory):
    """Removes _leftovers when no process builds in `directory` (its lock is free)."""
    if not _leftovers(directory):
        return
    try:
        with open(os.path.join(directory, '.lock'), 'a') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _remove_stale_temporaries(directory)
    except OSError:     # a build holds the lock (it cleans), or the cache is read-only
        pass


def _build(path, nvcc):
    """Compile into `path` (atomically, with its checksum file) unless another process already
    did; what killed builds left is removed first."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, '.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _remove_stale_temporaries(directory)
        if library_ok(path):
            return
        build_dir = tempfile.mkdtemp(prefix=BUILD_PREFIX, dir=directory)
        tmp = os.path.join(build_dir, os.path.basename(path))
        sums = checksum_path(tmp)
        try:
            command = _build_command(tmp, nvcc)
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                raise BuildError('building pbn_gluon operators failed:\n$ %s\n%s'
                                 % (' '.join(command), result.stderr[-4000:]))
            with open(sums, 'w') as f:
                json.dump({'size': os.path.getsize(tmp), 'sha256': _sha256(tmp)}, f)
                f.flush()
                os.fsync(f.fileno())
            with open(tmp, 'rb') as f:
                os.fsync(f.fileno())
            # the checksum first: a kill in between leaves a library that fails it (rebuilt)
            os.replace(sums, checksum_path(path))
            os.replace(tmp, path)
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)


def _library(nvcc):
    """The path of a checked library, built (again) if needed; an unwritable cache falls back
    to a per-user temporary directory with a warning."""
    path = library_path(nvcc)
    if library_ok(path):
        _remove_leftovers_if_idle(os.path.dirname(path))
        return path
    cache = _cache_dir()
    problem = _writable_dir(os.path.dirname(path))
    if problem is None:
        _build(path, nvcc)
        return path
    fallback = _fallback_cache_dir()
    where = ('PBN_GLUON_CACHE=%s' % cache if 'PBN_GLUON_CACHE' in os.environ
             else 'the default cache %s (set PBN_GLUON_CACHE to move it)' % cache)
    path = library_path(nvcc, fallback)
    if not library_ok(path):
        fallback_problem = _writable_dir(os.path.dirname(path))
        if fallback_problem is not None:
            raise BuildError('pbn_gluon cannot write its operator cache: %s is not writable (%s), '
                             'nor is the fallback %s (%s): set PBN_GLUON_CACHE to a writable '
                             'directory' % (where, problem, fallback, fallback_problem))
        _build(path, nvcc)
    warnings.warn('pbn_gluon: %s is not writable (%s): the operators are built in %s instead; '
                  'set PBN_GLUON_CACHE to a writable directory to keep them'
                  % (where, problem, fallback), RuntimeWarning, stacklevel=3)
    return path


def reported_contract(path):
    """{operator: input names} as the library at `path` reports them (pbn_operator_inputs)."""
    library = ctypes.CDLL(path)     # the handle MXNet opened: loading it again only counts
    report = getattr(library, 'pbn_operator_inputs', None)
    if report is None:
        raise ContractError('pbn_gluon: %s does not report its operators\' inputs '
                            '(pbn_operator_inputs): it was not built from these sources' % path)
    report.restype = ctypes.c_char_p
    return op_contract.parse_reported(report().decode())


def check_contract(reported, path='the operator library'):
    """Raise ContractError unless `reported` ({op: names}) equals op_contract.INPUTS."""
    problems = op_contract.mismatches(reported)
    if problems:
        raise ContractError(
            'pbn_gluon: %s and pbn_gluon/op_contract.py disagree on the operators\' inputs '
            '(csrc/pbn_ops.h lists them as X-macros; change both together):\n  %s'
            % (path, '\n  '.join(problems)))


def load():
    """Build if needed and load the operator library once per process, check its input
    contract (ContractError); returns its path."""
    if 'path' not in _loaded:
        nvcc = _nvcc()
        path = _library(nvcc)
        mx.library.load(path, verbose=False)
        check_contract(reported_contract(path), path)
        _loaded.update(path=path, cuda=nvcc is not None)
    return _loaded['path']


def cuda_enabled():
    """True when the loaded library has the CUDA kernels (GPU contexts work)."""
    load()
    return _loaded['cuda']
