"""tests/cuda_source.py, which test_cuda_kernels.py reads its constants and kernel list with,
on the real sources: a change to the CUDA files that the kernel test would no longer follow
fails here."""
import pytest

import cuda_source

KERNELS = cuda_source.read('pbn_kernels.cuh')
LAUNCHER = cuda_source.read('pbn_cuda.cu')


def test_define_reads_integer_constants():
    source = '#define A 256\n  #  define B 4 /* why */\n#define C (8) // x\n#define D 0x10\n'
    assert [cuda_source.define(source, n) for n in 'ABCD'] == [256, 4, 8, 16]
    with pytest.raises(KeyError):
        cuda_source.define(source, 'E')
    with pytest.raises(KeyError):
        cuda_source.define('#define AB 3', 'A')


def test_the_launch_plan_constants_are_in_the_kernel_header():
    for name in ('PBN_THREADS', 'PBN_ILP', 'PBN_REDUCTION_BLOCKS_PER_SM',
                 'PBN_AFFINE_BLOCKS_PER_SM', 'PBN_MAX_GRID_Y', 'PBN_MAX_RUNNING_BLOCKS'):
        assert cuda_source.define(KERNELS, name) > 0
    assert cuda_source.define(KERNELS, 'PBN_THREADS') % 32 == 0     # whole warps
    # the launcher plans with the header's functions, which the kernel test reads back
    assert 'pbn_plan(' in LAUNCHER and 'pbn_running_blocks(' in LAUNCHER


def test_kernel_and_launch_parsing():
    source = ('extern "C" __global__ void a(int x) {}\n#ifdef T\nextern "C" __global__ void '
              'b() {}\n#endif\nvoid f() { a<<<1, 2>>>(3); a <<<1, 2>>>(4); c<<<1, 1>>>(); }')
    assert cuda_source.kernels(source) == ['a', 'b']
    assert cuda_source.guarded(source, 'T') == ['b']
    assert cuda_source.launched(source) == ['a', 'c']


def test_every_kernel_is_launched_and_tested():
    """pbn_cuda.cu launches every kernel of pbn_kernels.cuh except the test-only ones, and
    nothing else: test_cuda_kernels.py compiles and checks exactly these."""
    test_only = cuda_source.guarded(KERNELS, 'PBN_LAUNCH_PLAN_KERNEL')
    assert test_only == ['pbn_launch_plan']
    defined = [k for k in cuda_source.kernels(KERNELS) if k not in test_only]
    assert sorted(cuda_source.launched(LAUNCHER)) == sorted(defined)
