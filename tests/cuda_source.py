"""Reading the CUDA sources (pbn_gluon/csrc) as text, for tests/test_cuda_kernels.py: the
constants and kernels it launches come from the files it tests, not from copies. No CuPy
needed: tests/test_cuda_source.py exercises it on any machine."""
import os
import re

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'pbn_gluon',
                    'csrc')


def read(name):
    with open(os.path.join(CSRC, name)) as f:
        return f.read()


def define(source, name):
    """The integer value of ``#define NAME value`` in `source` (a trailing comment allowed)."""
    match = re.search(r'^\s*#\s*define\s+%s\s+(\(?-?\w+\)?)\s*(?:/[*/].*)?$' % re.escape(name),
                      source, re.MULTILINE)
    if match is None:
        raise KeyError('no #define %s in the source' % name)
    return int(match.group(1).strip('()'), 0)


def kernels(source):
    """The names of the ``extern "C" __global__`` kernels `source` defines, in order."""
    return re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(', source)


def launched(source):
    """The names of the kernels `source` launches (``name<<<``), each once, in order."""
    return list(dict.fromkeys(re.findall(r'\b(\w+)\s*<<<', source)))


def guarded(source, macro):
    """The kernels of `source` that exist only under ``#ifdef macro`` (test-only)."""
    blocks = re.findall(r'#ifdef\s+%s\b(.*?)#endif' % re.escape(macro), source, re.DOTALL)
    return [name for block in blocks for name in kernels(block)]
