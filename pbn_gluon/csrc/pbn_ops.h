/* What pbn_ops.cc (operator registration, CPU kernels) and pbn_cuda.cu (CUDA launchers) share. */
#ifndef PBN_OPS_H_
#define PBN_OPS_H_

#include "pbn_math.h"

/* A tensor seen as (outer, channels, inner) around its channel axis. */
struct PbnLayout {
  long outer, channels, inner;
};

#ifdef PBN_WITH_CUDA
/* Launch on res's CUDA stream; false (with an MX_ERROR_MSG) when a launch fails. The training
 * flag and the local weight are read on the device (mode.training is ignored). */
bool pbn_norm_forward_cuda(const PbnLayout& l, const PbnMode& mode, const float* x,
                           const float* gamma, const float* beta, const float* running_mean,
                           const float* running_var, const float* group_sums,
                           const float* local_weight, const float* is_inference,
                           float* batch_sums, float* y, float* mean, float* invstd,
                           const mxnet::ext::OpResource& res);
bool pbn_norm_backward_cuda(const PbnLayout& l, const PbnMode& mode, const float* dy,
                            const float* x, const float* gamma, const float* group_sums,
                            int group_rows, const float* local_weight,
                            const float* is_inference, const float* mean, const float* invstd,
                            float* dx, float* dgamma, float* dbeta, float* dgroup,
                            const mxnet::ext::OpResource& res);
bool pbn_sums_forward_cuda(const PbnLayout& l, const float* x, float* sums,
                           const mxnet::ext::OpResource& res);
bool pbn_sums_backward_cuda(const PbnLayout& l, const float* dsums, const float* x, float* dx,
                            const mxnet::ext::OpResource& res);
bool pbn_zero_cuda(float* p, long n, const mxnet::ext::OpResource& res);
bool pbn_running_update_cuda(const float* stats, const float* gather, const float* momentum,
                             long channels, float* running_mean, float* running_var,
                             float* channel_count, const mxnet::ext::OpResource& res);
bool pbn_accept_sums_cuda(const float* local, const float* group, const float* rate, long k,
                          float* global, float* health, float* group_ok,
                          const mxnet::ext::OpResource& res);
#endif

#endif  /* PBN_OPS_H_ */
