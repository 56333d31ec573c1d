/* CUDA kernels of the fused PBN operators. Self-contained apart from pbn_math.h, so that NVRTC
 * can compile this file alone (tests/test_cuda_kernels.py); pbn_cuda.cu launches them.
 *
 * Data is (A, C, B) float32, contiguous, the channel axis in the middle. Every pass walks
 * "units": a unit is (row, chunk), a run of `lanes` consecutive elements of one row, lanes the
 * smallest power of two >= B, at most PBN_THREADS. A block of PBN_THREADS threads works on
 * PBN_THREADS / lanes units at once (one element per thread, consecutive threads on consecutive
 * addresses), so B = 1 (channels-last) and B = 96 * 96 both keep every thread busy.
 *
 *   pbn_moments_partial        grid (C, splits): per channel, per split, sums of (x - shift)
 *                              and (x - shift)^2, shift = x[0, c, 0] -> partials[split][c][2]
 *   pbn_grad_partial           grid (C, splits): sums of dy and dy (x - mean[c]) -> partials
 *   pbn_norm_forward_finalize  per channel: mean, invstd, batch_sums, and coef for
 *                              y = coef0 (x - mean) + coef1
 *   pbn_norm_backward_finalize per channel: dgamma, dbeta, dgroup, and coef for
 *                              dx = coef0 (x - mean) + coef1 + coef2 dy
 *                              (both take the call's tensors as pbn_math.h's argument structs)
 *   pbn_sums_finalize          per channel: [sum x, sum x^2, count]
 *   pbn_affine, pbn_affine_dy  elementwise over all A * C rows, grid-stride:
 *                              out = s x_coef[c] (x - center[c]) + offset[c] (+ dy_coef[c] dy)
 *                              (the mean subtracted first: pbn_math.h says why)
 *   pbn_running_update         per channel of a whole net: running statistics from group sums
 *   pbn_accept_sums            one block: StatsSync's finiteness check and (averaged) update
 *
 * Launch every kernel with PBN_THREADS threads, on the grids of pbn_plan. Per-thread sums are
 * float (each thread adds a few hundred shifted values at most), partials across splits are
 * combined in double.
 */
#ifndef PBN_KERNELS_CUH_
#define PBN_KERNELS_CUH_

#include "pbn_math.h"

#define PBN_THREADS 256
#define PBN_ILP 4 /* units a thread loads before it adds them up */

/* The launch plan (pbn_plan, pbn_running_blocks), which pbn_cuda.cu launches with and
 * tests/test_cuda_kernels.py reads back through pbn_launch_plan. */
#define PBN_REDUCTION_BLOCKS_PER_SM 4 /* C * splits ~ this many reduction blocks per SM */
#define PBN_AFFINE_BLOCKS_PER_SM 8    /* 8 x 256 threads: a full H100/A100 SM */
#define PBN_MAX_GRID_Y 65535
#define PBN_MAX_RUNNING_BLOCKS 4096   /* pbn_running_update strides over more channels */

/* How the passes over one (A, C, B) tensor are cut up on a device of `sms` multiprocessors. */
struct PbnPlan {
  int lanes;               /* threads on one run of a row: the power of two >= B, <= PBN_THREADS */
  int splits;              /* reduction blocks per channel: grid (C, splits) */
  unsigned affine_blocks;  /* elementwise passes */
  unsigned channel_blocks; /* finalize */
};

PBN_HD long pbn_min(long a, long b) { return a < b ? a : b; }
PBN_HD long pbn_max(long a, long b) { return a > b ? a : b; }

PBN_HD PbnPlan pbn_plan(long A, long C, long B, long sms) {
  PbnPlan p;
  p.lanes = 1;
  while (p.lanes < PBN_THREADS && p.lanes < B) p.lanes *= 2;
  const long groups = PBN_THREADS / p.lanes; /* units a block takes at once */
  const long units = A * ((B + p.lanes - 1) / p.lanes); /* per channel */
  const long splits = pbn_max(1, PBN_REDUCTION_BLOCKS_PER_SM * sms / pbn_max(1, C));
  p.splits = (int)pbn_min(pbn_min(splits, pbn_max(1, (units + groups - 1) / groups)),
                          PBN_MAX_GRID_Y);
  const long per_block = groups * PBN_ILP;
  p.affine_blocks = (unsigned)pbn_max(
      1, pbn_min((C * units + per_block - 1) / per_block, PBN_AFFINE_BLOCKS_PER_SM * sms));
  p.channel_blocks = (unsigned)pbn_min((C + PBN_THREADS - 1) / PBN_THREADS, 0x7fffffffL);
  return p;
}

/* Blocks of pbn_running_update for the T channels of a net. */
PBN_HD unsigned pbn_running_blocks(long T) {
  return (unsigned)pbn_max(1, pbn_min((T + PBN_THREADS - 1) / PBN_THREADS,
                                      PBN_MAX_RUNNING_BLOCKS));
}

#ifdef PBN_LAUNCH_PLAN_KERNEL
/* For tests/test_cuda_kernels.py only (compiled with -DPBN_LAUNCH_PLAN_KERNEL): plan =
 * [lanes, splits, affine_blocks, channel_blocks] of pbn_plan(A, C, B, sms), and
 * pbn_running_blocks(T). */
extern "C" __global__ void pbn_launch_plan(long A, long C, long B, long sms, long T,
                                           long* plan) {
  const PbnPlan p = pbn_plan(A, C, B, sms);
  plan[0] = p.lanes;
  plan[1] = p.splits;
  plan[2] = p.affine_blocks;
  plan[3] = p.channel_blocks;
  plan[4] = pbn_running_blocks(T);
}
#endif

/* Walks units u, u + step, u + 2 step, ... of a (rows x chunks) grid of units without a
 * division per step. */
struct PbnUnitCursor {
  long row, chunk, chunks, step_rows, step_chunks;

  __device__ PbnUnitCursor(long unit, long step, long n_chunks)
      : row(unit / n_chunks), chunk(unit % n_chunks), chunks(n_chunks),
        step_rows(step / n_chunks), step_chunks(step % n_chunks) {}

  /* Moves one step on; returns the rows passed (step_rows or step_rows + 1). */
  __device__ long advance() {
    long rows = step_rows;
    chunk += step_chunks;
    if (chunk >= chunks) {
      chunk -= chunks;
      ++rows;
    }
    row += rows;
    return rows;
  }
};

/* Sums a and b over the block; the totals land in thread 0. */
__device__ __forceinline__ void pbn_block_sum2(float& a, float& b) {
  __shared__ float warp_a[PBN_THREADS / 32], warp_b[PBN_THREADS / 32];
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, offset);
    b += __shfl_down_sync(0xffffffffu, b, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_a[warp] = a;
    warp_b[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < PBN_THREADS / 32 ? warp_a[lane] : 0.f;
    b = lane < PBN_THREADS / 32 ? warp_b[lane] : 0.f;
    for (int offset = 16; offset > 0; offset >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, offset);
      b += __shfl_down_sync(0xffffffffu, b, offset);
    }
  }
}

/* Channel blockIdx.x, split blockIdx.y: kGrad ? (sum dy, sum dy (x - mean[c]))
 *                                            : (sum (x - shift), sum (x - shift)^2). */
template <bool kGrad>
__device__ __forceinline__ void pbn_channel_partials(const float* __restrict__ dy,
                                                     const float* __restrict__ x,
                                                     const float* __restrict__ mean, long A,
                                                     long C, long B, int lanes,
                                                     float* __restrict__ partials) {
  const long c = blockIdx.x;
  float p1 = 0.f, p2 = 0.f;
  if (A > 0 && B > 0) {
    const int lane = threadIdx.x % lanes, group = threadIdx.x / lanes;
    const long groups = PBN_THREADS / lanes;
    const float center = kGrad ? mean[c] : x[c * B];
    PbnUnitCursor unit(blockIdx.y * groups + group, gridDim.y * groups, (B + lanes - 1) / lanes);
    while (unit.row < A) {
      float xv[PBN_ILP], gv[PBN_ILP];
#pragma unroll
      for (int k = 0; k < PBN_ILP; ++k) {
        const long b = unit.chunk * lanes + lane;
        const bool inside = unit.row < A && b < B;
        const long i = (unit.row * C + c) * B + b;
        xv[k] = inside ? x[i] : center;
        gv[k] = (kGrad && inside) ? dy[i] : 0.f;
        unit.advance();
      }
#pragma unroll
      for (int k = 0; k < PBN_ILP; ++k) {
        const float d = xv[k] - center;
        p1 += kGrad ? gv[k] : d;
        p2 += kGrad ? gv[k] * d : d * d;
      }
    }
  }
  pbn_block_sum2(p1, p2);
  if (threadIdx.x == 0) {
    float* out = partials + 2 * (blockIdx.y * C + c);
    out[0] = p1;
    out[1] = p2;
  }
}

extern "C" __global__ void pbn_moments_partial(const float* __restrict__ x, long A, long C,
                                               long B, int lanes, float* __restrict__ partials) {
  pbn_channel_partials<false>(nullptr, x, nullptr, A, C, B, lanes, partials);
}

extern "C" __global__ void pbn_grad_partial(const float* __restrict__ dy,
                                            const float* __restrict__ x,
                                            const float* __restrict__ mean, long A, long C,
                                            long B, int lanes, float* __restrict__ partials) {
  pbn_channel_partials<true>(dy, x, mean, A, C, B, lanes, partials);
}

/* The two sums of channel c over all splits, in double. */
__device__ __forceinline__ void pbn_combine(const float* partials, int splits, long C, long c,
                                            double* s1, double* s2) {
  double a = 0.0, b = 0.0;
  for (int s = 0; s < splits; ++s) {
    a += partials[2 * (s * C + c)];
    b += partials[2 * (s * C + c) + 1];
  }
  *s1 = a;
  *s2 = b;
}

/* The call's mode with training read on the device (is_inference). */
__device__ __forceinline__ PbnMode pbn_device_mode(PbnMode mode, const float* is_inference) {
  mode.training = pbn_is_training(is_inference[0]);
  return mode;
}

/* mu, r per channel (pbn_forward_channel) from the partials of x's moments; mean = (float) mu
 * and coef (2 rows of C) so that y = coef0 (x - mean) + coef1 (pbn_forward_affine). batch_sums
 * is written while training: this batch's sums (PBN) or the group sums (SyncBN). */
extern "C" __global__ void pbn_norm_forward_finalize(const float* __restrict__ partials,
                                                     int splits, PbnNormForwardArgs f,
                                                     float* __restrict__ coef) {
  const PbnMode mode = pbn_device_mode(f.mode, f.is_inference);
  const double w = f.local_weight[0];
  const long C = f.l.channels, B = f.l.inner, n = f.l.outer * B;
  for (long c = blockIdx.x * (long)blockDim.x + threadIdx.x; c < C;
       c += (long)gridDim.x * blockDim.x) {
    double shift = 0.0, s1 = 0.0, s2 = 0.0, mu, r, sums[3];
    if (mode.training && mode.local_stats && n > 0) {
      shift = f.x[c * B];
      pbn_combine(partials, splits, C, c, &s1, &s2);
    }
    pbn_forward_channel(mode, shift, s1, s2, (double)n, f.group_sums + c, C, w,
                        f.running_mean[c], f.running_var[c], &mu, &r, sums);
    if (mode.training) {
      for (int k = 0; k < 3; ++k) f.batch_sums[k * C + c] = sums[k];
    }
    pbn_forward_affine(mode, f.gamma[c], f.beta[c], mu, r, coef + c, f.mean + c, coef + C + c);
    f.invstd[c] = (float)r;
  }
}

/* pbn_backward_channel per channel from the partials of (dy, dy (x - mean)): dgamma, dbeta,
 * dgroup rows 0 and 1 (the other rows 0), grad_rows while training, and coef = [x_coef ;
 * offset ; dy_coef] (3 rows of C): dx = dy_coef dy + x_coef (x - mean) + offset. */
extern "C" __global__ void pbn_norm_backward_finalize(const float* __restrict__ partials,
                                                      int splits, PbnNormBackwardArgs b,
                                                      float* __restrict__ coef) {
  const PbnMode mode = pbn_device_mode(b.mode, b.is_inference);
  const double w = b.local_weight[0];
  const long C = b.l.channels, n = b.l.outer * b.l.inner;
  for (long c = blockIdx.x * (long)blockDim.x + threadIdx.x; c < C;
       c += (long)gridDim.x * blockDim.x) {
    double sdy, sdyxc, dy_coef, x_coef, offset, dg, db, dg0, dg1;
    pbn_combine(partials, splits, C, c, &sdy, &sdyxc);
    pbn_backward_channel(mode, sdy, sdyxc, (double)n, b.group_sums + c, C, b.group_rows, w,
                         b.gamma[c], b.mean[c], b.invstd[c], &dy_coef, &x_coef, &offset, &dg,
                         &db, &dg0, &dg1);
    b.dgamma[c] = (float)dg;
    b.dbeta[c] = (float)db;
    for (int row = 0; row < b.group_rows; ++row) {
      b.dgroup[row * C + c] = row == 0 ? dg0 : row == 1 ? dg1 : 0.0;
    }
    if (b.grad_rows != nullptr && mode.training) {
      b.grad_rows[c] = sdy;
      b.grad_rows[C + c] = sdyxc * b.invstd[c];
    }
    coef[c] = (float)x_coef;
    coef[C + c] = (float)offset;
    coef[2 * C + c] = (float)dy_coef;
  }
}

/* sums (3 rows of C) = [s1 + n shift, s2 + 2 shift s1 + n shift^2, n]. */
extern "C" __global__ void pbn_sums_finalize(const float* __restrict__ partials, int splits,
                                             const float* __restrict__ x, long A, long C, long B,
                                             pbn_sum_t* __restrict__ sums) {
  const long n = A * B;
  for (long c = blockIdx.x * (long)blockDim.x + threadIdx.x; c < C;
       c += (long)gridDim.x * blockDim.x) {
    double s1, s2;
    pbn_combine(partials, splits, C, c, &s1, &s2);
    const double shift = n > 0 ? x[c * B] : 0.0;
    sums[c] = s1 + n * shift;
    sums[C + c] = s2 + 2.0 * shift * s1 + n * shift * shift;
    sums[2 * C + c] = (double)n;
  }
}

/* out = (x_scale x_coef[c]) (x - center[c]) + offset[c] (+ dy_coef[c] dy) over the A * C
 * rows of B elements (center null: 0), grid-stride over units; the channel of a unit is
 * tracked without a division. */
template <bool kWithDy, typename Coef>
__device__ __forceinline__ void pbn_affine_rows(
    const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ out,
    const Coef* __restrict__ x_coef, float x_scale, const float* __restrict__ center,
    const Coef* __restrict__ offset, const float* __restrict__ dy_coef, long A, long C, long B,
    int lanes) {
  const long rows = A * C;
  if (rows == 0 || B == 0) return;
  const int lane = threadIdx.x % lanes, group = threadIdx.x / lanes;
  const long groups = PBN_THREADS / lanes;
  PbnUnitCursor unit(blockIdx.x * groups + group, gridDim.x * groups, (B + lanes - 1) / lanes);
  const long step_channels = unit.step_rows % C;
  long c = unit.row % C;
  while (unit.row < rows) {
    float xv[PBN_ILP], gv[PBN_ILP];
    long index[PBN_ILP], channel[PBN_ILP];
    bool inside[PBN_ILP];
#pragma unroll
    for (int k = 0; k < PBN_ILP; ++k) {
      const long b = unit.chunk * lanes + lane;
      inside[k] = unit.row < rows && b < B;
      index[k] = unit.row * B + b;
      channel[k] = c;
      xv[k] = inside[k] ? x[index[k]] : 0.f;
      gv[k] = (kWithDy && inside[k]) ? dy[index[k]] : 0.f;
      c += unit.advance() == unit.step_rows ? step_channels : step_channels + 1;
      if (c >= C) c -= C;
    }
#pragma unroll
    for (int k = 0; k < PBN_ILP; ++k) {
      if (!inside[k]) continue;
      const long ch = channel[k];
      const float scale = x_scale * (float)x_coef[ch];
      const float xc = center != nullptr ? xv[k] - center[ch] : xv[k];
      out[index[k]] = kWithDy ? dy_coef[ch] * gv[k] + scale * xc + (float)offset[ch]
                              : scale * xc + (float)offset[ch];
    }
  }
}

extern "C" __global__ void pbn_affine(const float* __restrict__ x, float* __restrict__ out,
                                      const float* __restrict__ x_coef, float x_scale,
                                      const float* __restrict__ center,
                                      const float* __restrict__ offset, long A, long C, long B,
                                      int lanes) {
  pbn_affine_rows<false, float>(x, nullptr, out, x_coef, x_scale, center, offset, nullptr, A,
                                C, B, lanes);
}

/* pbn_affine with double coefficients: pbn_batch_sums' backward, dx = dS0 + 2 x dS1 */
extern "C" __global__ void pbn_sums_affine(const float* __restrict__ x, float* __restrict__ out,
                                           const pbn_sum_t* __restrict__ x_coef, float x_scale,
                                           const pbn_sum_t* __restrict__ offset, long A, long C,
                                           long B, int lanes) {
  pbn_affine_rows<false, pbn_sum_t>(x, nullptr, out, x_coef, x_scale, nullptr, offset, nullptr,
                                    A, C, B, lanes);
}

extern "C" __global__ void pbn_affine_dy(const float* __restrict__ x,
                                         const float* __restrict__ dy, float* __restrict__ out,
                                         const float* __restrict__ x_coef,
                                         const float* __restrict__ center,
                                         const float* __restrict__ offset,
                                         const float* __restrict__ dy_coef, long A, long C,
                                         long B, int lanes) {
  pbn_affine_rows<true, float>(x, dy, out, x_coef, 1.f, center, offset, dy_coef, A, C, B,
                               lanes);
}

/* StatsSync's running-statistics step for every channel of a net: group sums of channel i
 * at stats[gather[i]], stats[gather[T + i]], stats[gather[2T + i]]; also writes T. */
extern "C" __global__ void pbn_running_update(const pbn_sum_t* __restrict__ stats,
                                              const double* __restrict__ gather,
                                              const float* __restrict__ momentum, long T,
                                              float* __restrict__ running_mean,
                                              float* __restrict__ running_var,
                                              float* __restrict__ channel_count) {
  if (blockIdx.x == 0 && threadIdx.x == 0) *channel_count = (float)T;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < T;
       i += (long)gridDim.x * blockDim.x) {
    pbn_running_channel(stats[(long)gather[i]], stats[(long)gather[T + i]],
                        stats[(long)gather[2 * T + i]], momentum[i], running_mean + i,
                        running_var + i);
  }
}

/* Launch with ONE block of PBN_THREADS threads (K is a net's exchange buffer, small): the
 * block agrees whether every local and group sum is finite, then updates global (if so),
 * fresh (global, or 0 when not accepted) and the health record (pbn_math.h). */
extern "C" __global__ void pbn_accept_sums(const pbn_sum_t* __restrict__ local,
                                           const pbn_sum_t* __restrict__ group,
                                           const pbn_sum_t* __restrict__ rate, long K,
                                           pbn_sum_t* __restrict__ global,
                                           pbn_sum_t* __restrict__ fresh,
                                           float* __restrict__ health,
                                           float* __restrict__ group_ok) {
  int local_ok = 1, ok = 1;
  for (long i = threadIdx.x; i < K; i += blockDim.x) {
    local_ok &= isfinite(local[i]) ? 1 : 0;
    ok &= isfinite(group[i]) ? 1 : 0;
  }
  local_ok = __syncthreads_and(local_ok);
  ok = __syncthreads_and(ok);
  for (long i = threadIdx.x; i < K; i += blockDim.x) {
    if (ok) global[i] = rate[i] * global[i] + (1.0 - rate[i]) * group[i];
    fresh[i] = ok ? global[i] : 0.0;
  }
  if (threadIdx.x == 0) {
    pbn_record_health(local_ok != 0, ok != 0, health);
    *group_ok = ok ? 1.f : 0.f;
  }
}

#endif /* PBN_KERNELS_CUH_ */
