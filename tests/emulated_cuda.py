"""CUDA kernels run on the CPU: a .cuh file compiled by g++ against the emulation of CUDA's
execution model in tests/cuda_emulation/cuda_emulation.h, and launched through ctypes like
CuPy's RawModule functions, ``module.get_function(name)(grid, block, args)``, with numpy
arrays as device memory, numpy scalars of the kernel's parameter types, and numpy structured
scalars (np.void of an aligned structured dtype) for structs passed by value.

``Module(..., sanitize='thread')`` builds with ThreadSanitizer; loading that library needs a
process started with libtsan preloaded (``tsan_preload()``)."""
import ctypes
import os
import subprocess

import numpy as np

HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cuda_emulation',
                      'cuda_emulation.h')
CXXFLAGS = ['-std=c++20', '-O1', '-fPIC', '-shared', '-pthread', '-Wno-unknown-pragmas']

#: emulation.h's type codes -> numpy dtypes
TYPES = {'f': np.float32, 'd': np.float64, 'i': np.int32, 'l': np.int64}


def tsan_preload():
    """The ThreadSanitizer runtime of the compiler, for LD_PRELOAD."""
    out = subprocess.run([os.environ.get('CXX', 'g++'), '-print-file-name=libtsan.so'],
                         capture_output=True, text=True, check=True).stdout.strip()
    return os.path.realpath(out)


def build(source, kernels, build_dir, include_dirs=(), defines=(), sanitize=None):
    """Compiles `source` (a path) and a table of its `kernels` into build_dir/emulated.so."""
    driver = os.path.join(build_dir, 'emulated_kernels.cc')
    with open(driver, 'w') as f:
        f.write('#include "%s"\nstatic const emu::Entry kKernels[] = {\n%s};\n'
                'EMU_EXPORT(kKernels)\n' % (os.path.abspath(source), ''.join(
                    '  EMU_KERNEL(%s),\n' % k for k in kernels)))
    library = os.path.join(build_dir, 'emulated.so')
    flags = CXXFLAGS + (['-fsanitize=%s' % sanitize, '-g'] if sanitize else [])
    command = ([os.environ.get('CXX', 'g++')] + flags + ['-include', HEADER]
               + ['-I' + d for d in include_dirs] + ['-D' + d for d in defines]
               + [driver, '-o', library])
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError('the CUDA emulation needs a C++20 compiler: %r not found (install '
                           'g++ or set $CXX)' % command[0]) from None
    if result.returncode != 0:
        raise RuntimeError('compiling the emulated kernels failed:\n%s' % result.stderr[-4000:])
    return library


class Kernel:
    """One kernel of a Module: kernel(grid, block, args)."""

    def __init__(self, module, index, name, signature):
        self.module, self.index, self.name = module, index, name
        self.signature = signature.split(',') if signature else []

    def _argument(self, code, value, position):
        where = '%s argument %d' % (self.name, position)
        if code.startswith('P'):
            if not isinstance(value, np.ndarray):
                raise TypeError('%s: a device pointer is a numpy array, not %s' % (
                    where, type(value).__name__))
            if value.dtype != TYPES[code[1:]] or not value.flags.c_contiguous:
                raise TypeError('%s: a contiguous %s array, not %s' % (
                    where, np.dtype(TYPES[code[1:]]), value.dtype))
            return ctypes.c_void_p(value.ctypes.data)
        if code.startswith('S'):
            if not isinstance(value, np.void) or value.dtype.itemsize != int(code[1:]):
                raise TypeError('%s: a struct of %s bytes (a numpy structured scalar), not %r'
                                % (where, code[1:], value))
            return ctypes.create_string_buffer(value.tobytes(), value.dtype.itemsize)
        if np.asarray(value).dtype != TYPES[code]:
            raise TypeError('%s: a %s, not %r' % (where, np.dtype(TYPES[code]), value))
        return np.ctypeslib.as_ctypes_type(TYPES[code])(value)

    def __call__(self, grid, block, args):
        if len(args) != len(self.signature):
            raise TypeError('%s takes %d arguments, got %d' % (
                self.name, len(self.signature), len(args)))
        values = [self._argument(c, a, i) for i, (c, a) in enumerate(zip(self.signature, args))]
        params = (ctypes.c_void_p * max(1, len(values)))(
            *[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        dims = lambda d: (ctypes.c_uint * 3)(*(tuple(d) + (1, 1))[:3])
        error = ctypes.create_string_buffer(512)
        if self.module.lib.emu_launch(self.index, dims(grid), dims(block), params, error,
                                      len(error)):
            raise RuntimeError('%s: %s' % (self.name, error.value.decode()))


class Module:
    """The kernels of a library made by build()."""

    def __init__(self, library):
        self.lib = ctypes.CDLL(library)
        self.lib.emu_kernel_name.restype = ctypes.c_char_p
        self.lib.emu_kernel_signature.restype = ctypes.c_char_p
        self.functions = {}
        for k in range(self.lib.emu_kernel_count()):
            name = self.lib.emu_kernel_name(k).decode()
            self.functions[name] = Kernel(self, k, name,
                                          self.lib.emu_kernel_signature(k).decode())

    def get_function(self, name):
        return self.functions[name]
