"""The emulation of CUDA that test_cuda_kernels.py runs the kernels on (tests/cuda_emulation),
checked with small kernels (tests/cuda_emulation/emulation_checks.cuh) against what CUDA
specifies: warp shuffles, __syncthreads_and, shared memory passed through a barrier, the
indices of a 2-D grid, a deadlock reported as an error, and (slow) ThreadSanitizer reporting a
missing barrier as a data race."""
import os
import subprocess
import sys

import numpy as np
import pytest

import emulated_cuda

CHECKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cuda_emulation',
                      'emulation_checks.cuh')
KERNELS = ['check_shuffle_down', 'check_syncthreads_and', 'check_shared_reverse',
           'check_indices', 'check_divergent']
i32 = np.int32


@pytest.fixture(scope='module')
def checks(tmp_path_factory):
    return emulated_cuda.Module(emulated_cuda.build(
        CHECKS, KERNELS, str(tmp_path_factory.mktemp('emulation_checks'))))


@pytest.mark.parametrize('delta', [1, 5, 16, 31])
def test_shuffle_down_moves_values_within_each_warp(checks, delta):
    x = np.random.default_rng(0).standard_normal(3 * 64).astype(np.float32)
    out = np.zeros_like(x)
    checks.get_function('check_shuffle_down')((3,), (64,), (x, i32(delta), out))
    lane = np.arange(x.size) % 32
    want = np.where(lane + delta < 32, np.roll(x, -delta), x)
    assert (out == want).all()


def test_syncthreads_and_is_the_and_of_its_block(checks):
    flags = np.ones(4 * 96, np.int32)
    flags[96 + 95] = 0       # the last thread of block 1
    flags[2 * 96 + 7] = 0    # one of block 2
    out = np.full_like(flags, -1)
    checks.get_function('check_syncthreads_and')((4,), (96,), (flags, out))
    want = np.repeat(flags.reshape(4, 96).all(axis=1), 96)
    assert (out == want).all()


@pytest.mark.parametrize('block', [32, 100, 1024])
def test_shared_memory_passes_through_a_barrier(checks, block):
    x = np.arange(3 * block, dtype=np.float32)
    out = np.zeros_like(x)
    checks.get_function('check_shared_reverse')((3,), (block,), (x, i32(1), out))
    assert (out == x.reshape(3, block)[:, ::-1].ravel()).all()


def test_indices_of_a_2d_grid(checks):
    grid, block = (3, 2), 40
    out = np.zeros((grid[1], grid[0], block, 4), np.int64)
    checks.get_function('check_indices')(grid, (block,), (out,))
    y, x = np.meshgrid(np.arange(grid[1]), np.arange(grid[0]), indexing='ij')
    assert (out[..., 0] == x[..., None]).all() and (out[..., 1] == y[..., None]).all()
    assert (out[..., 2] == grid[0]).all() and (out[..., 3] == block).all()


def test_a_deadlock_is_an_error_and_the_next_launch_runs(checks):
    with pytest.raises(RuntimeError, match='deadlocks: 128 threads at __syncthreads, 128 at '
                                           'a warp shuffle'):
        checks.get_function('check_divergent')((1,), (256,), (np.zeros(256, np.float32),))
    test_syncthreads_and_is_the_and_of_its_block(checks)


def test_arguments_are_checked_against_the_kernel(checks):
    out = np.zeros(64, np.float32)
    with pytest.raises(TypeError, match='argument 1: a int32'):
        checks.get_function('check_shuffle_down')((1,), (64,), (out, np.int64(1), out))
    with pytest.raises(TypeError, match='argument 0: a contiguous float32 array, not float64'):
        checks.get_function('check_shuffle_down')((1,), (64,), (out.astype(float), i32(1), out))


@pytest.mark.slow
@pytest.mark.parametrize('barrier', [1, 0])
def test_thread_sanitizer_reports_a_missing_barrier(tmp_path, barrier):
    """check_shared_reverse under ThreadSanitizer: silent with its barrier, a data race on the
    shared tile without it."""
    runtime = emulated_cuda.tsan_preload()
    if not os.path.isfile(runtime):
        pytest.skip('the compiler has no ThreadSanitizer runtime (libtsan.so)')
    library = emulated_cuda.build(CHECKS, KERNELS, str(tmp_path), sanitize='thread')
    script = ('import numpy as np, emulated_cuda\n'
              'x = np.arange(512, dtype=np.float32); out = np.zeros_like(x)\n'
              'emulated_cuda.Module(%r).get_function("check_shared_reverse")'
              '((2,), (256,), (x, np.int32(%d), out))\n' % (library, barrier))
    env = dict(os.environ, LD_PRELOAD=runtime, TSAN_OPTIONS='log_path=%s' % (tmp_path / 'tsan'),
               PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, '-c', script], env=env, check=False)
    reports = ''.join(p.read_text() for p in tmp_path.glob('tsan*'))
    if barrier:
        assert not reports, reports[:4000]
    else:
        assert 'data race' in reports and "check_shared_reverse::tile" in reports, reports[:4000]
