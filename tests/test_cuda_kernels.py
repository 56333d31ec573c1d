"""The CUDA kernels (pbn_gluon/csrc/pbn_kernels.cuh) on two backends, against a float64 NumPy
reference of the spec:

- emulation (every run): the same .cuh compiled by g++ against tests/cuda_emulation, CUDA's
  execution model on the CPU (blocks one after another, the threads of a block as fibers that
  meet at __syncthreads and, warp by warp, at shuffles); on an emulated device of
  EMULATED_SMS multiprocessors. $PBN_EMULATION_SANITIZE=thread builds it with
  ThreadSanitizer (test_thread_sanitizer runs this file so).
- cuda (where CuPy finds a device, else skipped): compiled by NVRTC through CuPy.

Both launch the kernels as pbn_cuda.cu does: in its order, on its grids, which come from its
own plan functions (pbn_plan, pbn_running_blocks), read back through the test-only kernel
pbn_launch_plan; constants and kernel names are parsed from the header by tests/cuda_source.py.

Per channel, with n elements, m and v this batch's mean and biased variance, M and V those of
the group sums G = [sum x, sum x^2, count (, sum dy, sum dy xhat)] of an earlier step, w the
local weight (1 while G2 == 0):

    mu = w m + (1 - w) M,   var = w v + (1 - w) V + w (1 - w) (m - M)^2,   r = 1 / sqrt(var + eps)
    y  = gamma r (x - mu) + beta
    dx = gamma r (dy - k1 - xhat k2),  k1 = (w / n) sum dy,  k2 = (w / n) sum dy xhat
         (5-row G: k1 += (1 - w) G3 / G2,  k2 += (1 - w) G4 / G2)
    dG0 = (1 - w) / G2 (dmu - 2 mu dvar),  dG1 = (1 - w) / G2 dvar,
         dmu = -gamma r sum dy,  dvar = -gamma r^2 sum(dy xhat) / 2
Sync mode (local_stats=0) is w = 0; inference normalises with the running statistics.

On a device it also times the forward and backward passes on DeepLab-sized tensors and prints
the bandwidth reached next to the device's peak (written as JSON to $PBN_KERNEL_REPORT when
set); the numbers are reported, never asserted.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import cuda_source
import emulated_cuda

try:
    import cupy
except ImportError:
    cupy = None

f32, f64, i32, i64 = np.float32, np.float64, np.int32, np.int64

#: compiles pbn_kernels.cuh's test-only kernel pbn_launch_plan (the launch plan, read back)
PLAN_MACRO = 'PBN_LAUNCH_PLAN_KERNEL'
#: multiprocessors of the emulated device: few, so that small tensors still split reductions
EMULATED_SMS = 4
SANITIZE = os.environ.get('PBN_EMULATION_SANITIZE')


#: pbn_math.h's argument structs PbnNormForwardArgs and PbnNormBackwardArgs, field by field
#: (PbnLayout, PbnMode, then the tensors' addresses), laid out as C lays them out
_HEAD = [('outer', i64), ('channels', i64), ('inner', i64), ('training', i32),
         ('local_stats', i32), ('fix_gamma', i32), ('eps', f32)]
_addresses = lambda names: [(name, np.uintp) for name in names.split()]
FORWARD_ARGS = np.dtype(_HEAD + _addresses(
    'x gamma beta running_mean running_var local_weight is_inference group_sums batch_sums '
    'y mean invstd'), align=True)
BACKWARD_ARGS = np.dtype(
    _HEAD + _addresses('dy x gamma local_weight is_inference mean invstd group_sums')
    + [('group_rows', i32)] + _addresses('dx dgamma dbeta dgroup grad_rows'), align=True)


def _has_device():
    try:
        return cupy is not None and cupy.cuda.runtime.getDeviceCount() > 0
    except cupy.cuda.runtime.CUDARuntimeError:
        return False


class CudaDevice:
    """The kernels compiled by NVRTC (CuPy) and run on the current device."""
    xp = cupy

    def __init__(self, _build_dir):
        self.sms = cupy.cuda.Device().attributes['MultiProcessorCount']
        self.asnumpy = cupy.asnumpy

    @staticmethod
    def address(a):
        return a.data.ptr

    def load(self, source):
        module = cupy.RawModule(code=source, options=('-I' + cuda_source.CSRC,
                                                      '-D' + PLAN_MACRO))
        return {name: module.get_function(name) for name in cuda_source.kernels(source)}


class Emulation:
    """The kernels compiled by g++ against tests/cuda_emulation and run on the CPU."""
    xp = np
    sms = EMULATED_SMS
    asnumpy = staticmethod(np.asarray)

    def __init__(self, build_dir):
        self.build_dir = build_dir

    @staticmethod
    def address(a):
        return a.ctypes.data

    def load(self, source):
        library = emulated_cuda.build(
            os.path.join(cuda_source.CSRC, 'pbn_kernels.cuh'), cuda_source.kernels(source),
            self.build_dir, include_dirs=[cuda_source.CSRC], defines=[PLAN_MACRO],
            sanitize=SANITIZE)
        return emulated_cuda.Module(library).functions


BACKENDS = {'emulation': Emulation, 'cuda': CudaDevice}


class Kernels:
    """The kernels of pbn_kernels.cuh on one backend, launched in the order of pbn_cuda.cu and
    with its grids (pbn_plan, read back from the backend). Each prepare_* allocates the outputs
    and returns (run, outputs); run() launches."""

    def __init__(self, backend):
        source = cuda_source.read('pbn_kernels.cuh')
        self.threads = cuda_source.define(source, 'PBN_THREADS')
        self.fn = backend.load(source)
        self.xp, self.asnumpy, self.sms = backend.xp, backend.asnumpy, backend.sms
        self.address = backend.address

    def struct(self, dtype, **fields):
        """(a C struct of `dtype` as a numpy structured scalar, the arrays it points to):
        arrays become their addresses, None a null pointer; the caller keeps the arrays
        alive while the struct is used."""
        value = np.zeros((), dtype)
        arrays = [v for v in fields.values() if isinstance(v, self.xp.ndarray)]
        for name, v in fields.items():
            value[name] = (0 if v is None else self.address(v)
                           if isinstance(v, self.xp.ndarray) else v)
        return value[()], arrays

    def array(self, a):
        """A copy on the backend, float32 unless `a` is float64 (the exchanged sums)."""
        return self.xp.array(a, dtype=f64 if a.dtype == f64 else f32, order='C')

    def plan(self, A, C, B, splits=None, affine_blocks=None, channel_blocks=None):
        """pbn_cuda.cu's plan (pbn_plan on this device): lanes, reduction splits, affine and
        finalize blocks; `splits`, `affine_blocks` and `channel_blocks` override it."""
        auto = self.launch_plan(A, C, B)
        lanes = auto[0]
        override = (splits, affine_blocks, channel_blocks)
        return (lanes,) + tuple(a if o is None else o for a, o in zip(auto[1:4], override))

    def launch_plan(self, A=1, C=1, B=1, T=1):
        """pbn_launch_plan: [lanes, splits, affine_blocks, channel_blocks] of pbn_plan(A, C, B,
        sms) and pbn_running_blocks(T)."""
        plan = self.xp.zeros(5, i64)
        self.fn['pbn_launch_plan']((1,), (1,), (i64(A), i64(C), i64(B), i64(self.sms), i64(T),
                                                plan))
        return tuple(int(v) for v in self.asnumpy(plan))

    def _call(self, x, coef_rows, plan, w=None, is_inference=None):
        """What a pbn_batch_norm launch needs: shape (int64), plan, workspace (partials
        [splits][C][2] and `coef_rows` rows of C coefficients) and the one-element inputs."""
        A, C, B = x.shape
        lanes, splits, affine_blocks, channel_blocks = self.plan(A, C, B, **plan)
        xp = self.xp
        scalar = lambda v: None if v is None else xp.full(1, v, f32)
        return dict(A=A, C=C, B=B, shape=(i64(A), i64(C), i64(B)), lanes=i32(lanes),
                    splits=splits, affine_blocks=affine_blocks, channel_blocks=channel_blocks,
                    partials=xp.empty(splits * C * 2, f32), coef=xp.empty(coef_rows * C, f32),
                    w=scalar(w), is_inference=scalar(is_inference), t=(self.threads,))

    def prepare_forward(self, x, gamma, beta, rmean, rvar, group, w, is_inference, local_stats,
                        fix_gamma, eps, **plan):
        k = self._call(x, 2, plan, w, is_inference)
        C, shape, coef, t, xp = k['C'], k['shape'], k['coef'], k['t'], self.xp
        out = dict(y=xp.empty_like(x), mean=xp.empty(C, f32), invstd=xp.empty(C, f32),
                   batch_sums=xp.full((3, C), -7.0, f64))
        args = self.struct(
            FORWARD_ARGS, outer=k['A'], channels=C, inner=k['B'], training=1,
            local_stats=local_stats, fix_gamma=fix_gamma, eps=eps, x=x, gamma=gamma, beta=beta,
            running_mean=rmean, running_var=rvar, local_weight=k['w'],
            is_inference=k['is_inference'], group_sums=group, batch_sums=out['batch_sums'],
            y=out['y'], mean=out['mean'], invstd=out['invstd'])

        def run():
            self.fn['pbn_moments_partial']((C, k['splits']), t, (
                x, *shape, k['lanes'], k['partials']))
            self.fn['pbn_norm_forward_finalize']((k['channel_blocks'],), t, (
                k['partials'], i32(k['splits']), args[0], coef))
            self.fn['pbn_affine']((k['affine_blocks'],), t, (
                x, out['y'], coef, f32(1.0), out['mean'], coef[C:], *shape, k['lanes']))
        return run, out

    def prepare_backward(self, dy, x, gamma, group, w, is_inference, local_stats, fix_gamma,
                         mean, invstd, **plan):
        k = self._call(x, 3, plan, w, is_inference)
        C, shape, coef, t, xp = k['C'], k['shape'], k['coef'], k['t'], self.xp
        out = dict(dx=xp.empty_like(x), dgamma=xp.empty(C, f32), dbeta=xp.empty(C, f32),
                   dgroup=xp.full(group.shape, -7.0, f64),
                   grad_rows=xp.full((2, C), -7.0, f64))
        args = self.struct(
            BACKWARD_ARGS, outer=k['A'], channels=C, inner=k['B'], training=1,
            local_stats=local_stats, fix_gamma=fix_gamma, dy=dy, x=x, gamma=gamma,
            local_weight=k['w'], is_inference=k['is_inference'], mean=mean, invstd=invstd,
            group_sums=group, group_rows=group.shape[0], dx=out['dx'], dgamma=out['dgamma'],
            dbeta=out['dbeta'], dgroup=out['dgroup'], grad_rows=out['grad_rows'])

        def run():
            self.fn['pbn_grad_partial']((C, k['splits']), t, (
                dy, x, mean, *shape, k['lanes'], k['partials']))
            self.fn['pbn_norm_backward_finalize']((k['channel_blocks'],), t, (
                k['partials'], i32(k['splits']), args[0], coef))
            self.fn['pbn_affine_dy']((k['affine_blocks'],), t, (
                x, dy, out['dx'], coef, mean, coef[C:], coef[2 * C:], *shape, k['lanes']))
        return run, out

    def prepare_sums(self, x, dsums, **plan):
        k = self._call(x, 0, plan)
        C, shape, t, xp = k['C'], k['shape'], k['t'], self.xp
        out = dict(sums=xp.empty((3, C), f64), dx=xp.empty_like(x))

        def run():
            self.fn['pbn_moments_partial']((C, k['splits']), t, (
                x, *shape, k['lanes'], k['partials']))
            self.fn['pbn_sums_finalize']((k['channel_blocks'],), t, (
                k['partials'], i32(k['splits']), x, *shape, out['sums']))
            self.fn['pbn_sums_affine']((k['affine_blocks'],), t, (
                x, out['dx'], dsums[1], f32(2.0), dsums[0], *shape, k['lanes']))
        return run, out


# ----------------------------------- float64 reference ---------------------------------------

def _group_moments(G):
    count = G[2]
    has = count > 0
    safe = np.where(has, count, 1.0)
    M = np.where(has, G[0] / safe, 0.0)
    V = np.where(has, np.maximum(G[1] / safe - M * M, 0.0), 0.0)
    return M, V, count, has


def _local_weight(G, w, training, local_stats):
    if not (training and local_stats):
        return np.zeros(G.shape[1])
    return np.where(G[2] > 0, w, 1.0)


def reference_forward(x, gamma, beta, rmean, rvar, G, w, training, local_stats, fix_gamma, eps):
    A, C, B = x.shape
    m, v = x.mean(axis=(0, 2)), x.var(axis=(0, 2))
    M, V, _, _ = _group_moments(G)
    batch_sums = None
    if not training:
        mu, var = rmean, rvar
    elif local_stats:
        we = _local_weight(G, w, training, local_stats)
        mu = we * m + (1 - we) * M
        var = we * v + (1 - we) * V + we * (1 - we) * (m - M) ** 2
        batch_sums = np.stack([x.sum(axis=(0, 2)), (x * x).sum(axis=(0, 2)),
                               np.full(C, A * B, np.float64)])
    else:   # SyncBN keeps the group sums it normalised with (for the running statistics)
        mu, var = M, V
        batch_sums = G[:3]
    r = 1 / np.sqrt(var + eps)
    g = np.ones(C) if fix_gamma else gamma
    y = (g * r)[None, :, None] * (x - mu[None, :, None]) + beta[None, :, None]
    # the kernels compute y = (g r) (x - m) + (beta - g r (mu - m)), m = (float) mu: float32
    # rounding scales with these terms, not with |mu| / std
    y_scale = (np.abs(y - beta[None, :, None]) + np.abs(beta)[None, :, None]).max()
    return dict(y=y, mean=mu, invstd=r, batch_sums=batch_sums, y_scale=y_scale)


def reference_backward(dy, x, gamma, G, w, mean, invstd, training, local_stats, fix_gamma):
    A, C, B = x.shape
    n = A * B
    g = np.ones(C) if fix_gamma else gamma
    mu, r = mean, invstd
    xhat = (x - mu[None, :, None]) * r[None, :, None]
    sum_dy, sum_dy_xhat = dy.sum(axis=(0, 2)), (dy * xhat).sum(axis=(0, 2))
    we = _local_weight(G, w, training, local_stats)
    _, _, count, has = _group_moments(G)
    mixes = bool(training) & has & (we < 1)
    safe = np.where(has, count, 1.0)
    k1, k2 = we * sum_dy / n, we * sum_dy_xhat / n
    if local_stats and G.shape[0] == 5:
        k1 = k1 + np.where(mixes, (1 - we) * G[3] / safe, 0.0)
        k2 = k2 + np.where(mixes, (1 - we) * G[4] / safe, 0.0)
    dx = (g * r)[None, :, None] * (dy - k1[None, :, None] - xhat * k2[None, :, None])
    dmu = -g * r * sum_dy
    dvar = -g * r * r * sum_dy_xhat / 2
    dgroup = np.zeros_like(G)
    dgroup[0] = np.where(mixes, (1 - we) / safe * (dmu - 2 * mu * dvar), 0.0)
    dgroup[1] = np.where(mixes, (1 - we) / safe * dvar, 0.0)
    # the kernels compute dx = a dy + b (x - mu) + k: float32 rounding scales with these terms
    gr, b = g * r, -g * r * r * k2
    dx_terms = (np.abs(gr[None, :, None] * dy) + np.abs(b[None, :, None] * (x - mu[None, :, None]))
                + np.abs(gr * k1)[None, :, None])
    return dict(dx=dx, dgamma=np.zeros(C) if fix_gamma else sum_dy_xhat, dbeta=sum_dy,
                dgroup=dgroup, dx_scale=dx_terms.max())


# --------------------------------------- cases ------------------------------------------------

#: name: (is_inference, local_stats, fix_gamma, group rows, group count / n, local weight);
#: is_inference is 0 while training, 1 in inference (the kernels' threshold is 1/2)
MODES = {
    'pbn': (0.0, 1, 0, 3, 4, 0.7),
    'pbn_progressive': (0.0, 1, 0, 5, 4, 0.3),
    'first_step': (0.0, 1, 0, 3, 0, 0.7),
    'sync': (0.0, 0, 0, 3, 8, 0.5),
    'inference': (1.0, 1, 0, 5, 4, 0.7),
    'fix_gamma': (0.0, 1, 1, 5, 4, 0.6),
}
#: (A, C, B): B = 1 is channels-last; A * B mostly not a multiple of the block; one channel
SMALL = [(15, 7, 1), (3, 5, 7), (2, 3, 300), (4, 6, 33), (257, 3, 2), (1, 1, 1), (5, 3, 700)]
#: more channels than the threads of a block: the finalize kernels stride over channels
WIDE = (2, 300, 3)
DEEPLAB = [(2, 256, 96 * 96), (2, 2048, 96 * 96)]
#: 'odd' forces grids that leave some blocks idle and step units across row boundaries;
#: 'one_block' finalizes every channel in one block (grid-stride over channels)
PLANS = {'auto': {}, 'odd': dict(splits=3, affine_blocks=5), 'one_block': dict(channel_blocks=1)}
EPS = 1e-5


def backend_cases(cases):
    """(backend, *case) for every backend, the big tensors on the device only."""
    out = []
    for backend in BACKENDS:
        for case in cases:
            if backend == 'cuda' or case[0] not in DEEPLAB:
                out.append(pytest.param(backend, *case, id='-'.join(
                    [backend, 'x'.join(map(str, case[0]))] + list(case[1:]))))
    return out


NORM_CASES = backend_cases(
    [(shape, mode, plan) for shape in SMALL for mode in MODES for plan in ('auto', 'odd')]
    + [(WIDE, 'pbn_progressive', plan) for plan in ('auto', 'one_block')]
    + [(DEEPLAB[0], mode, 'auto') for mode in MODES]
    + [(DEEPLAB[1], mode, 'auto') for mode in ('pbn_progressive', 'sync')])
SUMS_CASES = backend_cases([(s, p) for s in SMALL for p in ('auto', 'odd')]
                           + [(WIDE, 'one_block')] + [(s, 'auto') for s in DEEPLAB])


def make_inputs(shape, mode, seed=0, center=50.0, std=2.0, constant_channel=False):
    """float32 inputs (data with a mean far from 0: about `center`, spread `std`; channel 0
    constant if asked) and their float64 copies."""
    is_inference, local_stats, fix_gamma, rows, count_ratio, w = MODES[mode]
    A, C, B = shape
    rng = np.random.default_rng(seed)
    center = center + 3 * rng.random(C)
    x = (center[None, :, None] + std * rng.standard_normal(shape)).astype(f32)
    if constant_channel:
        x[:, 0, :] = center[0]
    dy = (0.1 + rng.standard_normal(shape)).astype(f32)
    count = float(count_ratio * A * B)
    M = center + 0.25 * std * rng.standard_normal(C)
    V = std ** 2 * (1 + rng.random(C) / 4)
    G = np.zeros((rows, C))
    G[0], G[1], G[2] = M * count, (V + M * M) * count, count
    if rows == 5:
        G[3], G[4] = 0.05 * count * rng.standard_normal((2, C))
    params = dict(gamma=1 + 0.2 * rng.standard_normal(C), beta=rng.standard_normal(C),
                  rmean=center + 0.05 * std * rng.standard_normal(C),
                  rvar=std ** 2 * (0.75 + rng.random(C) / 4), G=G)
    params = {k: v.astype(f64 if k == 'G' else f32) for k, v in params.items()}   # sums: double
    return x, dy, params, dict(w=w, is_inference=is_inference, local_stats=local_stats,
                               fix_gamma=fix_gamma)


@pytest.fixture(scope='module')
def backends(tmp_path_factory):
    """Kernels per backend name, compiled on first use (once per test session)."""
    loaded = {}

    def get(name):
        if name == 'cuda' and not _has_device():
            pytest.skip('no CUDA device (or no CuPy)')
        if name not in loaded:
            loaded[name] = Kernels(BACKENDS[name](str(tmp_path_factory.mktemp(name))))
        return loaded[name]
    return get


def check_close(kernels, name, got, want, rtol, scale=None):
    """max |got - want| <= rtol * scale, scale = max |want| unless given."""
    got = kernels.asnumpy(got).astype(np.float64).reshape(np.shape(want))
    scale = np.abs(want).max() if scale is None else scale
    err = np.abs(got - want).max() if got.size else 0.0
    assert err <= rtol * scale, '%s: max error %.3g, %.3g of scale %.3g' % (
        name, err, err / scale if scale else np.inf, scale)


@pytest.mark.parametrize('backend,shape,mode,plan', NORM_CASES)
def test_norm_forward_backward(backends, backend, shape, mode, plan):
    check_norm(backends(backend), *make_inputs(shape, mode), plan)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('mode', MODES)
def test_far_from_zero(backends, backend, mode):
    """|mean| / std = 1e4 and a constant channel: y and dx within a few float32 roundings of
    their own size (check_norm's scales do not grow with |mean| / std, since the kernels
    subtract the mean first), and a constant channel normalised with its own moments
    ('first_step': w = 1, BatchNorm) gives exactly beta."""
    x, dy, p, m = make_inputs((5, 3, 70), mode, center=1e4, std=1.0, constant_channel=True)
    y = check_norm(backends(backend), x, dy, p, m, 'odd')
    if mode == 'first_step':
        np.testing.assert_array_equal(y[:, 0, :], np.full(y[:, 0, :].shape, p['beta'][0]))


def check_norm(kernels, x, dy, p, m, plan):
    """Forward and backward of one case against reference_forward / reference_backward; returns
    the forward's y (on the host)."""
    close = lambda *a, **k: check_close(kernels, *a, **k)
    host = kernels.asnumpy
    training = m['is_inference'] < 0.5
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    p64 = {k: v.astype(np.float64) for k, v in p.items()}
    want = reference_forward(x64, p64['gamma'], p64['beta'], p64['rmean'], p64['rvar'],
                             p64['G'], m['w'], training, m['local_stats'], m['fix_gamma'], EPS)
    x_dev, g = kernels.array(x), {k: kernels.array(v) for k, v in p.items()}
    run, got = kernels.prepare_forward(
        x_dev, g['gamma'], g['beta'], g['rmean'], g['rvar'], g['G'], m['w'], m['is_inference'],
        m['local_stats'], m['fix_gamma'], EPS, **PLANS[plan])
    run()
    close('mean', got['mean'], want['mean'], 1e-6)
    close('invstd', got['invstd'], want['invstd'], 1e-4)
    close('y', got['y'], want['y'], 1e-5, scale=want['y_scale'])
    y = host(got['y'])
    if want['batch_sums'] is not None:
        close('batch_sums', got['batch_sums'], want['batch_sums'], 1e-5)
    else:   # inference leaves them alone
        assert (host(got['batch_sums']) == -7.0).all(), 'batch_sums written'

    # backward from the float32 statistics the forward hands on
    mean, invstd = want['mean'].astype(f32), want['invstd'].astype(f32)
    want = reference_backward(dy64, x64, p64['gamma'], p64['G'], m['w'],
                              mean.astype(np.float64), invstd.astype(np.float64), training,
                              m['local_stats'], m['fix_gamma'])
    run, got = kernels.prepare_backward(
        kernels.array(dy), x_dev, g['gamma'], g['G'], m['w'], m['is_inference'],
        m['local_stats'], m['fix_gamma'], kernels.array(mean), kernels.array(invstd),
        **PLANS[plan])
    run()
    close('dx', got['dx'], want['dx'], 1e-5, scale=want['dx_scale'])
    close('dbeta', got['dbeta'], want['dbeta'], 1e-4, scale=np.abs(dy64).sum(axis=(0, 2)).max())
    if m['fix_gamma']:
        assert (host(got['dgamma']) == 0).all()
    else:
        close('dgamma', got['dgamma'], want['dgamma'], 1e-4)
    if np.abs(want['dgroup']).max() == 0:
        assert (host(got['dgroup']) == 0).all()
    else:
        close('dgroup', got['dgroup'], want['dgroup'], 1e-4)
    # the progressive backward's rows: [sum dy, sum dy xhat] while training, untouched otherwise
    if training:
        per_channel = lambda v: v.astype(np.float64)[None, :, None]
        xhat = (x64 - per_channel(mean)) * per_channel(invstd)
        rows = np.stack([dy64.sum(axis=(0, 2)), (dy64 * xhat).sum(axis=(0, 2))])
        close('grad_rows', got['grad_rows'], rows, 1e-4,
              scale=np.abs(dy64).sum(axis=(0, 2)).max())
    else:
        assert (host(got['grad_rows']) == -7.0).all(), 'grad_rows written'
    return y


@pytest.mark.parametrize('backend,shape,plan', SUMS_CASES)
def test_batch_sums(backends, backend, shape, plan):
    kernels = backends(backend)
    x, _, _, _ = make_inputs(shape, 'sync')
    dsums = np.random.default_rng(1).standard_normal((3, shape[1]))
    x64 = x.astype(np.float64)
    run, got = kernels.prepare_sums(kernels.array(x), kernels.array(dsums), **PLANS[plan])
    run()
    want = np.stack([x64.sum(axis=(0, 2)), (x64 * x64).sum(axis=(0, 2)),
                     np.full(shape[1], shape[0] * shape[2], np.float64)])
    for row in range(3):
        check_close(kernels, 'sums[%d]' % row, got['sums'][row], want[row], 1e-5)
    dsums64 = dsums.astype(np.float64)
    want_dx = dsums64[0][None, :, None] + 2 * x64 * dsums64[1][None, :, None]
    check_close(kernels, 'dx', got['dx'], want_dx, 1e-5)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('channels,blocks', [([3, 5, 2], 'plan'), ([3, 300, 2], 'plan'),
                                             ([3, 300, 2], 1)])
def test_running_update(backends, backend, channels, blocks):
    """StatsSync's fused running-statistics step: layers of 3 and 5 sum rows, one kernel, on
    pbn_running_blocks' grid or on one block (which strides over the channels)."""
    kernels = backends(backend)
    xp = kernels.xp
    rng = np.random.RandomState(4)
    rows = [3, 5, 3]
    stats = rng.uniform(1, 4, sum(r * c for r, c in zip(rows, channels)))
    starts = np.cumsum([0] + [r * c for r, c in zip(rows, channels)][:-1])
    first = np.repeat(starts, channels) + np.concatenate([np.arange(c) for c in channels])
    per = np.repeat(channels, channels)
    gather = np.stack([first, first + per, first + 2 * per])
    stats[gather[2]] = rng.randint(1, 50, gather.shape[1])       # counts
    stats[gather[1]] += stats[gather[0]] ** 2 / stats[gather[2]]  # sum x^2 >= (sum x)^2 / n
    stats[gather[2][4]] = 0                 # a layer that did not run: left as it is
    momentum = np.repeat([0.9, 0.5, 0.99], channels)
    mean0, var0 = rng.normal(0, 1, len(momentum)), rng.uniform(0.5, 2, len(momentum))
    rm, rv = xp.array(mean0, f32), xp.array(var0, f32)
    count = xp.zeros(1, f32)
    t = len(momentum)
    grid = kernels.launch_plan(T=t)[4] if blocks == 'plan' else blocks
    kernels.fn['pbn_running_update']((grid,), (kernels.threads,), (
        xp.array(stats, f64), xp.array(gather, f64), xp.array(momentum, f32),
        i64(t), rm, rv, count))
    n = stats[gather[2]]
    mean = stats[gather[0]] / np.maximum(n, 1)
    var = np.maximum(stats[gather[1]] / np.maximum(n, 1) - mean ** 2, 0)
    moved = np.where(n > 0, momentum, 1.0)
    np.testing.assert_allclose(kernels.asnumpy(rm), moved * mean0 + (1 - moved) * mean,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kernels.asnumpy(rv), moved * var0 + (1 - moved) * var,
                               rtol=1e-5, atol=1e-6)
    assert float(count[0]) == t


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('bad', [None, 'local', 'group', 'both', 'last'])
def test_accept_sums(backends, backend, bad):
    """StatsSync's acceptance of an exchange, one block: the averaged update when every group
    sum is finite, the previous global sums kept when one is not; the health record counts
    non-finite local and group sums and remembers the first call of each. NaN and +-Inf, in
    the first, a middle and the last entry (one that only the last thread reads)."""
    kernels = backends(backend)
    xp = kernels.xp
    rng = np.random.RandomState(5)
    k = 1000                                    # several entries per thread
    local, group = rng.normal(size=k), rng.normal(size=k)
    rate = rng.choice([0.0, 0.8], size=k)
    global0 = rng.normal(size=k)
    if bad in ('local', 'both'):
        local[123] = np.nan
    if bad in ('group', 'both'):
        group[0] = -np.inf
    if bad == 'last':
        group[k - 1] = np.inf
    group_bad, local_bad = bad in ('group', 'both', 'last'), bad in ('local', 'both')
    glob = xp.array(global0, f64)
    fresh = xp.full(k, -7.0, f64)
    health = xp.array([0, -1, 0, -1, 3], f32)     # 3 calls so far
    ok = xp.zeros(1, f32)
    kernels.fn['pbn_accept_sums']((1,), (kernels.threads,), (
        xp.array(local, f64), xp.array(group, f64), xp.array(rate, f64), i64(k),
        glob, fresh, health, ok))
    want = global0 if group_bad else rate * global0 + (1 - rate) * group
    np.testing.assert_allclose(kernels.asnumpy(glob), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(kernels.asnumpy(fresh), 0 * want if group_bad else want,
                               rtol=1e-12, atol=1e-12)
    assert list(kernels.asnumpy(health)) == [float(group_bad), 3.0 if group_bad else -1.0,
                                             float(local_bad), 3.0 if local_bad else -1.0, 4.0]
    assert float(ok[0]) == (0.0 if group_bad else 1.0)


# -------------------------------------- bandwidth ---------------------------------------------

def peak_bandwidth_gbs():
    """memoryClockRate (kHz) * 2 (double data rate) * bus width (bits) / 8, in GB/s."""
    device = cupy.cuda.Device().id
    props = cupy.cuda.runtime.getDeviceProperties(device)
    clock_khz, bus_bits = props.get('memoryClockRate'), props.get('memoryBusWidth')
    if not clock_khz or not bus_bits:  # removed from cudaDeviceProp in CUDA 13
        clock_khz = cupy.cuda.runtime.deviceGetAttribute(36, device)  # MemoryClockRate
        bus_bits = cupy.cuda.runtime.deviceGetAttribute(37, device)  # GlobalMemoryBusWidth
    return clock_khz * 1e3 * 2 * bus_bits / 8 / 1e9


def median_ms(run, repeats=20, warmup=3):
    for _ in range(warmup):
        run()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


def test_bandwidth(backends):
    """On the device: times forward and backward on DeepLab-sized tensors (reported, never
    asserted) and checks that repeated launches reproduce the first one bit for bit."""
    kernels = backends('cuda')
    peak = peak_bandwidth_gbs()
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)['name']
    name = name.decode() if isinstance(name, bytes) else name
    records = []
    for shape in DEEPLAB:
        x, dy, p, m = make_inputs(shape, 'pbn_progressive')
        x_gpu, dy_gpu, g = kernels.array(x), kernels.array(dy), {
            k: kernels.array(v) for k, v in p.items()}
        forward, out = kernels.prepare_forward(
            x_gpu, g['gamma'], g['beta'], g['rmean'], g['rvar'], g['G'], m['w'],
            m['is_inference'], m['local_stats'], m['fix_gamma'], EPS)
        forward()
        first_y = out['y'].copy()
        backward, _ = kernels.prepare_backward(
            dy_gpu, x_gpu, g['gamma'], g['G'], m['w'], m['is_inference'], m['local_stats'],
            m['fix_gamma'], out['mean'], out['invstd'])
        tensor_bytes = x.nbytes
        # forward: reads x twice, writes y; backward: reads dy and x twice, writes dx
        for pass_name, run, passes in (('forward', forward, 3), ('backward', backward, 5)):
            ms = median_ms(run)
            gbs = passes * tensor_bytes / (ms * 1e-3) / 1e9
            records.append({'shape': list(shape), 'pass': pass_name, 'ms': ms,
                            'gb_per_s': gbs, 'peak_gb_per_s': peak,
                            'fraction_of_peak': gbs / peak, 'device': name})
            print('%-20s %-8s %8.3f ms %7.0f GB/s (%3.0f%% of peak %.0f GB/s, %s)' % (
                'x'.join(map(str, shape)), pass_name, ms, gbs, 100 * gbs / peak, peak, name))
            assert ms > 0 and np.isfinite(gbs)
        # the timed re-launches computed exactly what the first launch did (no races)
        assert (cupy.asnumpy(out['y']) == cupy.asnumpy(first_y)).all()
    report = os.environ.get('PBN_KERNEL_REPORT')
    if report:
        with open(report, 'w') as f:
            json.dump(records, f, indent=1)


# ----------------------------------- ThreadSanitizer ------------------------------------------

@pytest.mark.slow
def test_thread_sanitizer(tmp_path):
    """Every emulation case of this file again, built with ThreadSanitizer (in a process that
    preloads its runtime): no data race, so the kernels' barriers order every access to shared
    memory that another thread of the block makes (tests/cuda_emulation says how)."""
    if SANITIZE:
        pytest.skip('this process is the sanitized run')
    runtime = emulated_cuda.tsan_preload()
    if not os.path.isfile(runtime):
        pytest.skip('the compiler has no ThreadSanitizer runtime (libtsan.so)')
    env = dict(os.environ, PBN_EMULATION_SANITIZE='thread', LD_PRELOAD=runtime,
               TSAN_OPTIONS='log_path=%s' % (tmp_path / 'tsan'))
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-k', 'emulation',
         os.path.abspath(__file__)], env=env, capture_output=True, text=True)
    reports = ''.join(p.read_text() for p in sorted(tmp_path.glob('tsan*')))
    assert not reports, 'ThreadSanitizer reports:\n' + reports[:6000]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert ' passed' in result.stdout and 'skipped' not in result.stdout, result.stdout[-2000:]
