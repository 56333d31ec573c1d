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
                           const float* running_var, const pbn_sum_t* group_sums,
                           const float* local_weight, const float* is_inference,
                           pbn_sum_t* batch_sums, float* y, float* mean, float* invstd,
                           const mxnet::ext::OpResource& res);
bool pbn_norm_backward_cuda(const PbnLayout& l, const PbnMode& mode, const float* dy,
                            const float* x, const float* gamma, const pbn_sum_t* group_sums,
                            int group_rows, const float* local_weight,
                            const float* is_inference, const float* mean, const float* invstd,
                            float* dx, float* dgamma, float* dbeta, pbn_sum_t* dgroup,
                            pbn_sum_t* grad_rows, const mxnet::ext::OpResource& res);
bool pbn_sums_forward_cuda(const PbnLayout& l, const float* x, pbn_sum_t* sums,
                           const mxnet::ext::OpResource& res);
bool pbn_sums_backward_cuda(const PbnLayout& l, const pbn_sum_t* dsums, const float* x,
                            float* dx, const mxnet::ext::OpResource& res);
bool pbn_zero_cuda(void* p, size_t bytes, const mxnet::ext::OpResource& res);
bool pbn_copy_cuda(void* dst, const void* src, size_t bytes, const mxnet::ext::OpResource& res);
bool pbn_running_update_cuda(const pbn_sum_t* stats, const double* gather,
                             const float* momentum, long channels, float* running_mean,
                             float* running_var, float* channel_count,
                             const mxnet::ext::OpResource& res);
bool pbn_accept_sums_cuda(const pbn_sum_t* local, const pbn_sum_t* group, const pbn_sum_t* rate,
                          long k, pbn_sum_t* global, pbn_sum_t* fresh, float* health,
                          float* group_ok, const mxnet::ext::OpResource& res);
#endif

#endif  /* PBN_OPS_H_ */
