/* The GPU callbacks of the fused PBN operators (kernels in pbn_kernels.cuh), registered here
 * beside the CPU ones of pbn_ops.cc, from the same unpacked calls (pbn_ops.h).
 *
 * Each operator is a reduction (grid C x splits), a per-channel finalize and an elementwise
 * pass, all on the operator's stream, cut up by pbn_plan; the partial sums and per-channel
 * coefficients live in MXNet's temporary GPU space. Passes over the big tensors: forward reads
 * x twice and writes y, backward reads (dy, x) twice and writes dx.
 */
#include <atomic>
#include <climits>

#include "mxnet/lib_api.h"
#include "pbn_ops.h"
#include "pbn_kernels.cuh"

using namespace mxnet::ext;
using namespace pbn;

namespace {

const int kMaxDevices = 64;

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

MXReturnValue cuda_ok(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return MX_SUCCESS;
  MX_ERROR_MSG << "pbn_gluon: " << what << " failed: " << cudaGetErrorString(err);
  return MX_FAIL;
}

MXReturnValue launched(const char* what) {
  return cuda_ok(cudaGetLastError(), what);
}

MXReturnValue zero(void* p, size_t bytes, const OpResource& res) {
  if (bytes == 0) return MX_SUCCESS;
  return cuda_ok(cudaMemsetAsync(p, 0, bytes, res.get_cuda_stream()), "zeroing a tensor");
}

/* One call's passes over an (A, C, B) tensor of at least one channel: its launch plan, its
 * stream and its workspace (partials [splits][C][2], then coefficient rows of C). */
struct Passes {
  const PbnLayout& l;
  const PbnPlan p;
  const cudaStream_t stream;
  float* partials = nullptr;
  float* coef = nullptr;

  Passes(const PbnLayout& layout, const OpResource& res)
      : l(layout), p(pbn_plan(l.outer, l.channels, l.inner, sm_count())),
        stream(res.get_cuda_stream()) {}

  dim3 reduction_grid() const { return dim3(l.channels, p.splits); }

  /* Allocates the workspace with `coef_rows` rows of coefficients. */
  bool workspace(int coef_rows, const OpResource& res) {
    const size_t floats = (static_cast<size_t>(p.splits) * 2 + coef_rows) * l.channels;
    if (floats * sizeof(float) > static_cast<size_t>(INT_MAX)) {
      MX_ERROR_MSG << "pbn_gluon: " << l.channels << " channels need more GPU workspace than "
                   << "MXNet can allocate at once";
      return false;
    }
    partials = static_cast<float*>(res.alloc_gpu(static_cast<int>(floats * sizeof(float))));
    if (partials == nullptr) {
      MX_ERROR_MSG << "pbn_gluon: could not allocate " << floats * sizeof(float)
                   << " bytes of GPU workspace";
      return false;
    }
    coef = partials + static_cast<size_t>(p.splits) * 2 * l.channels;
    return true;
  }

  /* The workspace, and the reduction pass of the forward: partials of x's moments. */
  bool moments(const float* x, int coef_rows, const OpResource& res) {
    if (!workspace(coef_rows, res)) return false;
    pbn_moments_partial<<<reduction_grid(), PBN_THREADS, 0, stream>>>(
        x, l.outer, l.channels, l.inner, p.lanes, partials);
    return true;
  }
};

PBN_CALLBACK(norm_forward_gpu) {
  NormForward f(attrs, inputs, outputs);
  if (!f.ok) return MX_FAIL;
  if (f.l.channels == 0) return MX_SUCCESS;
  const PbnLayout& l = f.l;
  Passes s(l, res);
  if (!s.moments(f.x, 2, res)) return MX_FAIL;
  pbn_norm_forward_finalize<<<s.p.channel_blocks, PBN_THREADS, 0, s.stream>>>(
      s.partials, s.p.splits, static_cast<const PbnNormForwardArgs&>(f), s.coef);
  pbn_affine<<<s.p.affine_blocks, PBN_THREADS, 0, s.stream>>>(
      f.x, f.y, s.coef, 1.f, f.mean, s.coef + l.channels, l.outer, l.channels, l.inner,
      s.p.lanes);
  return launched("the CUDA kernels of pbn_batch_norm (forward)");
}

PBN_CALLBACK(norm_backward_gpu) {
  NormBackward b(attrs, inputs, outputs);
  for (MXTensor* t : b.no_grad) {
    if (zero(t->data_ptr, nbytes(*t), res) != MX_SUCCESS) return MX_FAIL;
  }
  if (b.l.channels == 0) return MX_SUCCESS;
  const PbnLayout& l = b.l;
  Passes s(l, res);
  if (!s.workspace(3, res)) return MX_FAIL;
  pbn_grad_partial<<<s.reduction_grid(), PBN_THREADS, 0, s.stream>>>(
      b.dy, b.x, b.mean, l.outer, l.channels, l.inner, s.p.lanes, s.partials);
  /* the kernel writes grad_rows only while training (it reads is_inference) */
  pbn_norm_backward_finalize<<<s.p.channel_blocks, PBN_THREADS, 0, s.stream>>>(
      s.partials, s.p.splits, static_cast<const PbnNormBackwardArgs&>(b), s.coef);
  pbn_affine_dy<<<s.p.affine_blocks, PBN_THREADS, 0, s.stream>>>(
      b.x, b.dy, b.dx, s.coef, b.mean, s.coef + l.channels, s.coef + 2 * l.channels, l.outer,
      l.channels, l.inner, s.p.lanes);
  return launched("the CUDA kernels of pbn_batch_norm (backward)");
}

PBN_CALLBACK(sums_forward_gpu) {
  SumsForward f(attrs, inputs, outputs);
  if (f.l.channels == 0) return MX_SUCCESS;
  Passes s(f.l, res);
  if (!s.moments(f.x, 0, res)) return MX_FAIL;
  pbn_sums_finalize<<<s.p.channel_blocks, PBN_THREADS, 0, s.stream>>>(
      s.partials, s.p.splits, f.x, f.l.outer, f.l.channels, f.l.inner, f.sums);
  return launched("the CUDA kernels of pbn_batch_sums (forward)");
}

/* dx = dsums[0, c] + 2 x dsums[1, c] */
PBN_CALLBACK(sums_backward_gpu) {
  SumsBackward b(attrs, inputs, outputs);
  if (b.l.channels == 0) return MX_SUCCESS;
  const PbnLayout& l = b.l;
  Passes s(l, res);
  pbn_sums_affine<<<s.p.affine_blocks, PBN_THREADS, 0, s.stream>>>(
      b.x, b.dx, b.dsums + l.channels, 2.f, b.dsums, l.outer, l.channels, l.inner, s.p.lanes);
  return launched("the CUDA kernels of pbn_batch_sums (backward)");
}

PBN_CALLBACK(running_update_gpu) {
  RunningUpdate u(inputs, outputs);
  pbn_running_update<<<pbn_running_blocks(u.t), PBN_THREADS, 0, res.get_cuda_stream()>>>(
      u.stats, u.gather, u.momentum, u.t, u.running_mean, u.running_var, u.channel_count);
  if (launched("the CUDA kernel of pbn_running_update") != MX_SUCCESS) return MX_FAIL;
  return zero(u.stats, u.stats_size * sizeof(pbn_sum_t), res);
}

PBN_CALLBACK(take_sums_gpu) {
  TakeSums s(inputs, outputs);
  if (s.bytes == 0) return MX_SUCCESS;
  if (cuda_ok(cudaMemcpyAsync(s.taken, s.local, s.bytes, cudaMemcpyDeviceToDevice,
                              res.get_cuda_stream()), "copying batch sums") != MX_SUCCESS) {
    return MX_FAIL;
  }
  return zero(s.local, s.bytes, res);
}

/* one block (pbn_kernels.cuh) */
PBN_CALLBACK(accept_sums_gpu) {
  AcceptSums a(inputs, outputs);
  pbn_accept_sums<<<1, PBN_THREADS, 0, res.get_cuda_stream()>>>(
      a.local, a.group, a.rate, a.k, a.global, a.fresh, a.health, a.group_ok);
  return launched("the CUDA kernel of pbn_accept_sums");
}

}  // namespace

/* Attributes, shapes, types and the CPU callbacks are registered in pbn_ops.cc. */
PBN_OP(pbn_batch_norm).setForward(norm_forward_gpu, "gpu").setBackward(norm_backward_gpu, "gpu");
PBN_OP(pbn_batch_sums).setForward(sums_forward_gpu, "gpu").setBackward(sums_backward_gpu, "gpu");
PBN_OP(pbn_running_update).setForward(running_update_gpu, "gpu");
PBN_OP(pbn_take_sums).setForward(take_sums_gpu, "gpu");
PBN_OP(pbn_accept_sums).setForward(accept_sums_gpu, "gpu");
