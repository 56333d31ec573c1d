/* CUDA launchers of the fused PBN operators (declared in pbn_ops.h; kernels in pbn_kernels.cuh).
 *
 * Each operator is a reduction (grid C x splits), a per-channel finalize and an elementwise
 * pass, all on the operator's stream; the partial sums and per-channel coefficients live in
 * MXNet's temporary GPU space. Passes over the big tensors: forward reads x twice and writes y,
 * backward reads (dy, x) twice and writes dx.
 */
#include <algorithm>
#include <atomic>
#include <climits>

#include "mxnet/lib_api.h"
#include "pbn_ops.h"
#include "pbn_kernels.cuh"

namespace {

const int kReductionBlocksPerSm = 4;
const int kAffineBlocksPerSm = 8; /* 8 x 256 threads: a full H100/A100 SM */
const int kMaxDevices = 64;
const long kMaxGridY = 65535;

/* Streaming multiprocessors of the current device, looked up once per device. */
int sm_count() {
  static std::atomic<int> cached[kMaxDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  if (device < 0 || device >= kMaxDevices) device = 0;
  int count = cached[device].load();
  if (count == 0) {
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        count < 1) {
      count = 1;
    }
    cached[device].store(count);
  }
  return count;
}

/* How the passes over one (A, C, B) tensor are cut up (see pbn_kernels.cuh). */
struct Plan {
  int lanes;           /* threads on one run of a row: the power of two >= B, <= PBN_THREADS */
  int splits;          /* reduction blocks per channel */
  unsigned affine_blocks;
  unsigned channel_blocks; /* finalize */
};

Plan plan_for(const PbnLayout& l) {
  Plan p;
  p.lanes = 1;
  while (p.lanes < PBN_THREADS && p.lanes < l.inner) p.lanes *= 2;
  const long groups = PBN_THREADS / p.lanes; /* units a block takes at once */
  const long chunks = (l.inner + p.lanes - 1) / p.lanes;
  const long units = l.outer * chunks; /* per channel */
  const long sms = sm_count();
  /* C * splits ~ kReductionBlocksPerSm blocks per SM, each block with work */
  long splits = std::max(1L, kReductionBlocksPerSm * sms / std::max(1L, l.channels));
  splits = std::min({splits, std::max(1L, (units + groups - 1) / groups), kMaxGridY});
  p.splits = static_cast<int>(splits);
  const long affine_units = l.channels * units;
  const long per_block = groups * PBN_ILP;
  p.affine_blocks = static_cast<unsigned>(
      std::max(1L, std::min((affine_units + per_block - 1) / per_block,
                            kAffineBlocksPerSm * sms)));
  p.channel_blocks = static_cast<unsigned>(
      std::min((l.channels + PBN_THREADS - 1) / PBN_THREADS, static_cast<long>(INT_MAX)));
  return p;
}

/* partials [splits][C][2] followed by `coef_rows` rows of C coefficients. */
bool alloc_workspace(const PbnLayout& l, const Plan& p, int coef_rows,
                     const mxnet::ext::OpResource& res, float** partials, float** coef) {
  const size_t floats = (static_cast<size_t>(p.splits) * 2 + coef_rows) * l.channels;
  if (floats * sizeof(float) > static_cast<size_t>(INT_MAX)) {
    MX_ERROR_MSG << "pbn_gluon: " << l.channels << " channels need more GPU workspace than "
                 << "MXNet can allocate at once";
    return false;
  }
  *partials = static_cast<float*>(res.alloc_gpu(static_cast<int>(floats * sizeof(float))));
  if (*partials == nullptr) {
    MX_ERROR_MSG << "pbn_gluon: could not allocate " << floats * sizeof(float)
                 << " bytes of GPU workspace";
    return false;
  }
  *coef = *partials + static_cast<size_t>(p.splits) * 2 * l.channels;
  return true;
}

bool launched(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return true;
  MX_ERROR_MSG << "pbn_gluon: the CUDA kernels of " << what << " failed: "
               << cudaGetErrorString(err);
  return false;
}

}  // namespace

bool pbn_norm_forward_cuda(const PbnLayout& l, const PbnMode& mode, const float* x,
                           const float* gamma, const float* beta, const float* running_mean,
                           const float* running_var, const pbn_sum_t* group_sums,
                           const float* local_weight, const float* is_inference,
                           pbn_sum_t* batch_sums, float* y, float* mean, float* invstd,
                           const mxnet::ext::OpResource& res) {
  if (l.channels == 0) return true;
  const Plan p = plan_for(l);
  float *partials, *coef;
  if (!alloc_workspace(l, p, 2, res, &partials, &coef)) return false;
  cudaStream_t stream = res.get_cuda_stream();
  pbn_moments_partial<<<dim3(l.channels, p.splits), PBN_THREADS, 0, stream>>>(
      x, l.outer, l.channels, l.inner, p.lanes, partials);
  pbn_norm_forward_finalize<<<p.channel_blocks, PBN_THREADS, 0, stream>>>(
      partials, p.splits, x, l.outer, l.channels, l.inner, gamma, beta, running_mean,
      running_var, group_sums, local_weight, is_inference, mode.local_stats, mode.fix_gamma,
      mode.eps, batch_sums, mean, invstd, coef);
  pbn_affine<<<p.affine_blocks, PBN_THREADS, 0, stream>>>(
      x, y, coef, 1.f, coef + l.channels, l.outer, l.channels, l.inner, p.lanes);
  return launched("pbn_batch_norm (forward)");
}

bool pbn_norm_backward_cuda(const PbnLayout& l, const PbnMode& mode, const float* dy,
                            const float* x, const float* gamma, const pbn_sum_t* group_sums,
                            int group_rows, const float* local_weight,
                            const float* is_inference, const float* mean, const float* invstd,
                            float* dx, float* dgamma, float* dbeta, pbn_sum_t* dgroup,
                            pbn_sum_t* grad_rows, const mxnet::ext::OpResource& res) {
  if (l.channels == 0) return true;
  const Plan p = plan_for(l);
  float *partials, *coef;
  if (!alloc_workspace(l, p, 3, res, &partials, &coef)) return false;
  cudaStream_t stream = res.get_cuda_stream();
  pbn_grad_partial<<<dim3(l.channels, p.splits), PBN_THREADS, 0, stream>>>(
      dy, x, mean, l.outer, l.channels, l.inner, p.lanes, partials);
  pbn_norm_backward_finalize<<<p.channel_blocks, PBN_THREADS, 0, stream>>>(
      partials, p.splits, l.outer * l.inner, l.channels, gamma, group_sums, group_rows,
      local_weight, is_inference, mode.local_stats, mode.fix_gamma, mean, invstd, dgamma, dbeta,
      dgroup, grad_rows, coef);
  pbn_affine_dy<<<p.affine_blocks, PBN_THREADS, 0, stream>>>(
      x, dy, dx, coef, coef + l.channels, coef + 2 * l.channels, l.outer, l.channels, l.inner,
      p.lanes);
  return launched("pbn_batch_norm (backward)");
}

bool pbn_sums_forward_cuda(const PbnLayout& l, const float* x, pbn_sum_t* sums,
                           const mxnet::ext::OpResource& res) {
  if (l.channels == 0) return true;
  const Plan p = plan_for(l);
  float *partials, *coef;
  if (!alloc_workspace(l, p, 0, res, &partials, &coef)) return false;
  cudaStream_t stream = res.get_cuda_stream();
  pbn_moments_partial<<<dim3(l.channels, p.splits), PBN_THREADS, 0, stream>>>(
      x, l.outer, l.channels, l.inner, p.lanes, partials);
  pbn_sums_finalize<<<p.channel_blocks, PBN_THREADS, 0, stream>>>(
      partials, p.splits, x, l.outer, l.channels, l.inner, sums);
  return launched("pbn_batch_sums (forward)");
}

/* dx = dsums[0, c] + 2 x dsums[1, c] */
bool pbn_sums_backward_cuda(const PbnLayout& l, const pbn_sum_t* dsums, const float* x,
                            float* dx, const mxnet::ext::OpResource& res) {
  if (l.channels == 0) return true;
  const Plan p = plan_for(l);
  pbn_sums_affine<<<p.affine_blocks, PBN_THREADS, 0, res.get_cuda_stream()>>>(
      x, dx, dsums + l.channels, 2.0, dsums, l.outer, l.channels, l.inner, p.lanes);
  return launched("pbn_batch_sums (backward)");
}

bool pbn_zero_cuda(void* p, size_t bytes, const mxnet::ext::OpResource& res) {
  if (bytes == 0) return true;
  cudaError_t err = cudaMemsetAsync(p, 0, bytes, res.get_cuda_stream());
  if (err == cudaSuccess) return true;
  MX_ERROR_MSG << "pbn_gluon: zeroing a gradient failed: " << cudaGetErrorString(err);
  return false;
}

bool pbn_copy_cuda(void* dst, const void* src, size_t bytes, const mxnet::ext::OpResource& res) {
  if (bytes == 0) return true;
  cudaError_t err = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice,
                                    res.get_cuda_stream());
  if (err == cudaSuccess) return true;
  MX_ERROR_MSG << "pbn_gluon: copying batch sums failed: " << cudaGetErrorString(err);
  return false;
}

bool pbn_running_update_cuda(const pbn_sum_t* stats, const double* gather,
                             const float* momentum, long channels, float* running_mean,
                             float* running_var, float* channel_count,
                             const mxnet::ext::OpResource& res) {
  long blocks = (channels + PBN_THREADS - 1) / PBN_THREADS;
  blocks = blocks < 1 ? 1 : (blocks > 4096 ? 4096 : blocks);
  pbn_running_update<<<static_cast<unsigned>(blocks), PBN_THREADS, 0, res.get_cuda_stream()>>>(
      stats, gather, momentum, channels, running_mean, running_var, channel_count);
  return launched("pbn_running_update");
}

bool pbn_accept_sums_cuda(const pbn_sum_t* local, const pbn_sum_t* group, const pbn_sum_t* rate,
                          long k, pbn_sum_t* global, pbn_sum_t* fresh, float* health,
                          float* group_ok, const mxnet::ext::OpResource& res) {
  pbn_accept_sums<<<1, PBN_THREADS, 0, res.get_cuda_stream()>>>(local, group, rate, k, global,
                                                                fresh, health, group_ok);
  return launched("pbn_accept_sums");
}
