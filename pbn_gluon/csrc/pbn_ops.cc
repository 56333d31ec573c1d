/* The fused PBN operators, registered with MXNet through its extension-library API
 * (mxnet/lib_api.h), with CPU kernels here and CUDA kernels in pbn_cuda.cu.
 *
 *   pbn_batch_norm(data, gamma, beta, running_mean, running_var, group_sums, local_weight,
 *                  is_inference; batch_sums [aux, written]) -> (out, mean, invstd)
 *       One PBN (or SyncBN) layer: a pass over data for this batch's sums, a pass writing out.
 *       PBN (local_stats=1, training) writes this batch's [sum x, sum x^2, count] into
 *       batch_sums; SyncBN (local_stats=0) normalises with group_sums alone and keeps them
 *       in batch_sums (for the running statistics).
 *       Its backward is a reduction pass over (dy, data) and an elementwise pass writing dx.
 *   pbn_batch_sums(data) -> (3, C) [sum x, sum x^2, count]
 *       The local sums SyncBN exchanges before normalising; backward dx = dS0 + 2 x dS1.
 *   pbn_running_update(stats, gather, momentum; running_mean, running_var [aux, written]) -> T
 *       StatsSync's step for all T channels of a net at once: channel i's group sums are
 *       stats[gather[0, i]], stats[gather[1, i]], stats[gather[2, i]] (BatchNorm's update).
 *   pbn_accept_sums(local, group, rate; global, health [aux, written]) -> (1,) group finite
 *       StatsSync's acceptance of an exchange, one pass over its K sums: when every group sum is
 *       finite, global = rate global + (1 - rate) group; otherwise global is kept. health
 *       (pbn_math.h: pbn_record_health) counts the calls whose local or group sums were not.
 *
 * Data is seen as (A, C, B) around the channel axis `axis`. float32 data; sums are
 * accumulated in double around a per-channel shift (the channel's first element), so the
 * variance keeps its precision when |mean| >> std and for large N*H*W.
 *
 * is_inference: a one-element tensor read by the kernel; exactly 1 means inference
 * (Dropout(ones, p=0.5) is 0 or 2 while training and 1 otherwise). The extension API does not
 * give operators MXNet's training flag, so the graph hands it over as data.
 */
#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "mxnet/lib_api.h"
#include "pbn_math.h"
#include "pbn_ops.h"

using namespace mxnet::ext;

namespace {

enum NormInput { kData, kGamma, kBeta, kRunningMean, kRunningVar, kGroupSums, kLocalWeight,
                 kIsInference, kBatchSums, kNumNormInputs };
enum NormOutput { kOut, kMean, kInvStd, kNumNormOutputs };

int attr_int(const std::unordered_map<std::string, std::string>& attrs, const char* key,
             int fallback) {
  auto it = attrs.find(key);
  if (it == attrs.end()) return fallback;
  const std::string& v = it->second;
  if (v == "True" || v == "true") return 1;
  if (v == "False" || v == "false") return 0;
  return std::stoi(v);
}

float attr_float(const std::unordered_map<std::string, std::string>& attrs, const char* key,
                 float fallback) {
  auto it = attrs.find(key);
  return it == attrs.end() ? fallback : std::stof(it->second);
}

/* The channel axis of a tensor of `ndim` dims, or -1 when out of range. */
int channel_axis(const std::unordered_map<std::string, std::string>& attrs, int ndim) {
  int axis = attr_int(attrs, "axis", 1);
  if (axis < 0) axis += ndim;
  return (axis >= 0 && axis < ndim) ? axis : -1;
}

template <typename Shape>
PbnLayout layout_of(const Shape& shape, int axis) {
  PbnLayout l{1, static_cast<long>(shape[axis]), 1};
  for (int i = 0; i < axis; ++i) l.outer *= shape[i];
  for (size_t i = axis + 1; i < shape.size(); ++i) l.inner *= shape[i];
  return l;
}

/* The (outer, channels, inner) view of `t` around the operator's channel axis. */
PbnLayout data_layout(const std::unordered_map<std::string, std::string>& attrs,
                      const MXTensor& t) {
  return layout_of(t.shape, channel_axis(attrs, static_cast<int>(t.shape.size())));
}

PbnMode mode_of(const std::unordered_map<std::string, std::string>& attrs, bool training) {
  PbnMode mode;
  mode.training = training;
  mode.local_stats = attr_int(attrs, "local_stats", 1);
  mode.fix_gamma = attr_int(attrs, "fix_gamma", 0);
  mode.eps = attr_float(attrs, "eps", 1e-5f);
  return mode;
}

/* ---------------------------------- attributes and shapes ------------------------------- */

MXReturnValue norm_parse(const std::unordered_map<std::string, std::string>& attrs,
                         int* num_in, int* num_out) {
  *num_in = kNumNormInputs;
  *num_out = kNumNormOutputs;
  return MX_SUCCESS;
}

MXReturnValue sums_parse(const std::unordered_map<std::string, std::string>& attrs,
                         int* num_in, int* num_out) {
  *num_in = 1;
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue all_float32(const std::unordered_map<std::string, std::string>& attrs,
                          std::vector<int>* in_types, std::vector<int>* out_types) {
  for (size_t i = 0; i < in_types->size(); ++i) {
    if (in_types->at(i) == -1) in_types->at(i) = kFloat32;
    if (in_types->at(i) != kFloat32) {
      MX_ERROR_MSG << "pbn_gluon operators take float32 tensors only; input " << i
                   << " has dtype code " << in_types->at(i);
      return MX_FAIL;
    }
  }
  for (auto& t : *out_types) t = kFloat32;
  return MX_SUCCESS;
}

/* MXNet hands an unknown dimension over as -1 (legacy shapes: 0). */
bool known(const std::vector<unsigned int>& s) {
  if (s.empty()) return false;
  for (unsigned d : s) if (d == 0 || d == static_cast<unsigned>(-1)) return false;
  return true;
}

/* Fills the per-channel inputs' shapes from data (deferred initialisation) and checks them. */
MXReturnValue norm_shape(const std::unordered_map<std::string, std::string>& attrs,
                         std::vector<std::vector<unsigned int>>* in,
                         std::vector<std::vector<unsigned int>>* out) {
  const auto& data = in->at(kData);
  int axis = channel_axis(attrs, static_cast<int>(data.size()));
  if (data.size() < 2 || axis < 0) {
    MX_ERROR_MSG << "pbn_batch_norm: axis " << attr_int(attrs, "axis", 1)
                 << " does not fit an input of " << data.size() << " dims";
    return MX_FAIL;
  }
  unsigned c = data[axis];
  const char* names[] = {"data", "gamma", "beta", "running_mean", "running_var", "group_sums",
                         "local_weight", "is_inference", "batch_sums"};
  for (int i = kGamma; i <= kRunningVar; ++i) {
    if (!known(in->at(i))) in->at(i) = {c};
  }
  auto& group = in->at(kGroupSums);
  if (!known(group)) group = {group.size() == 2 && known({group[0]}) ? group[0] : 3u, c};
  if (!known(in->at(kBatchSums))) in->at(kBatchSums) = {3 * c};
  for (int i = kGamma; i <= kBatchSums; ++i) {
    size_t size = 1;
    for (unsigned d : in->at(i)) size *= d;
    size_t want = i == kGroupSums ? 0 : (i == kBatchSums ? 3 * c : (i >= kLocalWeight ? 1 : c));
    bool ok = i == kGroupSums ? (size == 3 * c || size == 5 * c) : size == want;
    if (!ok) {
      MX_ERROR_MSG << "pbn_batch_norm: " << names[i] << " has " << size << " elements, but "
                   << "the data has " << c << " channels on axis " << axis;
      return MX_FAIL;
    }
  }
  out->assign(kNumNormOutputs, {c});
  out->at(kOut) = data;
  return MX_SUCCESS;
}

MXReturnValue sums_shape(const std::unordered_map<std::string, std::string>& attrs,
                         std::vector<std::vector<unsigned int>>* in,
                         std::vector<std::vector<unsigned int>>* out) {
  const auto& data = in->at(0);
  int axis = channel_axis(attrs, static_cast<int>(data.size()));
  if (data.size() < 2 || axis < 0) {
    MX_ERROR_MSG << "pbn_batch_sums: axis " << attr_int(attrs, "axis", 1)
                 << " does not fit an input of " << data.size() << " dims";
    return MX_FAIL;
  }
  out->assign(1, {3u, data[axis]});
  return MX_SUCCESS;
}

MXReturnValue norm_mutates(const std::unordered_map<std::string, std::string>& attrs,
                           std::vector<int>* indices) {
  indices->push_back(kBatchSums);
  return MX_SUCCESS;
}

/* ---------------------------------------- CPU ------------------------------------------- */

/* Sums of (x - shift) and (x - shift)^2 over one channel: float within short runs (vectorised),
 * double across them. */
void channel_sums(const float* x, const PbnLayout& l, long c, double shift, double* s1,
                  double* s2) {
  const long kRun = 1024;
  const float k = static_cast<float>(shift);
  double a1 = 0.0, a2 = 0.0;
  for (long a = 0; a < l.outer; ++a) {
    const float* row = x + (a * l.channels + c) * l.inner;
    for (long b0 = 0; b0 < l.inner; b0 += kRun) {
      long b1 = std::min(l.inner, b0 + kRun);
      float f1 = 0.f, f2 = 0.f;
      for (long b = b0; b < b1; ++b) {
        float d = row[b] - k;
        f1 += d;
        f2 += d * d;
      }
      a1 += f1;
      a2 += f2;
    }
  }
  *s1 = a1;
  *s2 = a2;
}

/* sum dy and sum dy (x - mu) over one channel. */
void channel_grad_sums(const float* dy, const float* x, const PbnLayout& l, long c, float mu,
                       double* sdy, double* sdyxc) {
  const long kRun = 1024;
  double a1 = 0.0, a2 = 0.0;
  for (long a = 0; a < l.outer; ++a) {
    long off = (a * l.channels + c) * l.inner;
    for (long b0 = 0; b0 < l.inner; b0 += kRun) {
      long b1 = std::min(l.inner, b0 + kRun);
      float f1 = 0.f, f2 = 0.f;
      for (long b = b0; b < b1; ++b) {
        float g = dy[off + b];
        f1 += g;
        f2 += g * (x[off + b] - mu);
      }
      a1 += f1;
      a2 += f2;
    }
  }
  *sdy = a1;
  *sdyxc = a2;
}

/* out = scale * x + shift (+ coef * dy when dy is given) over one channel. */
void channel_affine(float* out, const float* x, const float* dy, const PbnLayout& l, long c,
                    float scale, float shift, float coef) {
  for (long a = 0; a < l.outer; ++a) {
    long off = (a * l.channels + c) * l.inner;
    if (dy) {
      for (long b = 0; b < l.inner; ++b) out[off + b] = coef * dy[off + b] + scale * x[off + b] + shift;
    } else {
      for (long b = 0; b < l.inner; ++b) out[off + b] = scale * x[off + b] + shift;
    }
  }
}

MXReturnValue norm_forward_cpu(const std::unordered_map<std::string, std::string>& attrs,
                               std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                               const OpResource& res) {
  MXTensor& data = inputs->at(kData);
  PbnLayout l = data_layout(attrs, data);
  const float* x = data.data<float>();
  const float* gamma = inputs->at(kGamma).data<float>();
  const float* beta = inputs->at(kBeta).data<float>();
  const float* rmean = inputs->at(kRunningMean).data<float>();
  const float* rvar = inputs->at(kRunningVar).data<float>();
  const float* group = inputs->at(kGroupSums).data<float>();
  float w = inputs->at(kLocalWeight).data<float>()[0];
  PbnMode mode = mode_of(attrs, inputs->at(kIsInference).data<float>()[0] != 1.0f);
  float* batch_sums = inputs->at(kBatchSums).data<float>();
  float* y = outputs->at(kOut).data<float>();
  float* mean = outputs->at(kMean).data<float>();
  float* invstd = outputs->at(kInvStd).data<float>();
  const long n_per_channel = l.outer * l.inner;

#pragma omp parallel for schedule(static)
  for (long c = 0; c < l.channels; ++c) {
    double shift = 0.0, s1 = 0.0, s2 = 0.0, mu, r, sums[3];
    if (mode.training && mode.local_stats && n_per_channel > 0) {
      shift = x[c * l.inner];
      channel_sums(x, l, c, shift, &s1, &s2);
    }
    pbn_forward_channel(mode, shift, s1, s2, static_cast<double>(n_per_channel), group + c,
                        l.channels, w, rmean[c], rvar[c], &mu, &r, sums);
    if (mode.training) {
      for (int k = 0; k < 3; ++k) batch_sums[k * l.channels + c] = static_cast<float>(sums[k]);
    }
    mean[c] = static_cast<float>(mu);
    invstd[c] = static_cast<float>(r);
    double g = mode.fix_gamma ? 1.0 : gamma[c];
    channel_affine(y, x, nullptr, l, c, static_cast<float>(g * r),
                   static_cast<float>(beta[c] - mu * g * r), 0.f);
  }
  return MX_SUCCESS;
}

/* Backward inputs: the output gradients (out, mean, invstd), the forward inputs, the forward
 * outputs. Backward outputs: one gradient per forward input. */
enum BackwardInput { kGradOut = 0, kFwdInputs = kNumNormOutputs,
                     kFwdOutputs = kNumNormOutputs + kNumNormInputs };

MXReturnValue norm_backward_cpu(const std::unordered_map<std::string, std::string>& attrs,
                                std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                const OpResource& res) {
  MXTensor& data = inputs->at(kFwdInputs + kData);
  PbnLayout l = data_layout(attrs, data);
  const float* dy = inputs->at(kGradOut).data<float>();
  const float* x = data.data<float>();
  const float* gamma = inputs->at(kFwdInputs + kGamma).data<float>();
  MXTensor& group_t = inputs->at(kFwdInputs + kGroupSums);
  const float* group = group_t.data<float>();
  int group_rows = static_cast<int>(group_t.size() / l.channels);
  float w = inputs->at(kFwdInputs + kLocalWeight).data<float>()[0];
  PbnMode mode = mode_of(attrs, inputs->at(kFwdInputs + kIsInference).data<float>()[0] != 1.0f);
  const float* mean = inputs->at(kFwdOutputs + kMean).data<float>();
  const float* invstd = inputs->at(kFwdOutputs + kInvStd).data<float>();
  float* dx = outputs->at(kData).data<float>();
  float* dgamma = outputs->at(kGamma).data<float>();
  float* dbeta = outputs->at(kBeta).data<float>();
  float* dgroup = outputs->at(kGroupSums).data<float>();
  for (size_t i = kRunningMean; i < outputs->size(); ++i) {   /* rows 0, 1 of dgroup below */
    MXTensor& t = outputs->at(i);
    std::memset(t.data_ptr, 0, t.size() * sizeof(float));
  }
  const double n = static_cast<double>(l.outer * l.inner);

#pragma omp parallel for schedule(static)
  for (long c = 0; c < l.channels; ++c) {
    double sdy, sdyxc, a, b, k, dg, db, dg0, dg1;
    channel_grad_sums(dy, x, l, c, mean[c], &sdy, &sdyxc);
    pbn_backward_channel(mode, sdy, sdyxc, n, group + c, l.channels, group_rows, w, gamma[c],
                         mean[c], invstd[c], &a, &b, &k, &dg, &db, &dg0, &dg1);
    dgamma[c] = static_cast<float>(dg);
    dbeta[c] = static_cast<float>(db);
    dgroup[c] = static_cast<float>(dg0);
    dgroup[l.channels + c] = static_cast<float>(dg1);
    channel_affine(dx, x, dy, l, c, static_cast<float>(b), static_cast<float>(k),
                   static_cast<float>(a));
  }
  return MX_SUCCESS;
}

MXReturnValue sums_forward_cpu(const std::unordered_map<std::string, std::string>& attrs,
                               std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                               const OpResource& res) {
  MXTensor& data = inputs->at(0);
  PbnLayout l = data_layout(attrs, data);
  const float* x = data.data<float>();
  float* sums = outputs->at(0).data<float>();
  const long n = l.outer * l.inner;
#pragma omp parallel for schedule(static)
  for (long c = 0; c < l.channels; ++c) {
    double shift = n > 0 ? x[c * l.inner] : 0.0, s1 = 0.0, s2 = 0.0;
    if (n > 0) channel_sums(x, l, c, shift, &s1, &s2);
    sums[c] = static_cast<float>(s1 + n * shift);
    sums[l.channels + c] = static_cast<float>(s2 + 2.0 * shift * s1 + n * shift * shift);
    sums[2 * l.channels + c] = static_cast<float>(n);
  }
  return MX_SUCCESS;
}

MXReturnValue sums_backward_cpu(const std::unordered_map<std::string, std::string>& attrs,
                                std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                const OpResource& res) {
  const float* dsums = inputs->at(0).data<float>();
  MXTensor& data = inputs->at(1);
  PbnLayout l = data_layout(attrs, data);
  float* dx = outputs->at(0).data<float>();
#pragma omp parallel for schedule(static)
  for (long c = 0; c < l.channels; ++c) {
    channel_affine(dx, data.data<float>(), nullptr, l, c, 2.f * dsums[l.channels + c],
                   dsums[c], 0.f);
  }
  return MX_SUCCESS;
}

enum RunningInput { kStats, kGather, kMomentum, kRunningMeanAll, kRunningVarAll,
                    kNumRunningInputs };

MXReturnValue running_parse(const std::unordered_map<std::string, std::string>& attrs,
                            int* num_in, int* num_out) {
  *num_in = kNumRunningInputs;
  *num_out = 1;   /* MXNet operators need an output: the channel count T, shape (1,) */
  return MX_SUCCESS;
}

MXReturnValue running_shape(const std::unordered_map<std::string, std::string>& attrs,
                            std::vector<std::vector<unsigned int>>* in,
                            std::vector<std::vector<unsigned int>>* out) {
  unsigned t = in->at(kMomentum).empty() ? 0 : in->at(kMomentum)[0];
  bool ok = in->at(kGather) == std::vector<unsigned int>{3u, t} &&
            in->at(kRunningMeanAll) == std::vector<unsigned int>{t} &&
            in->at(kRunningVarAll) == std::vector<unsigned int>{t};
  if (!ok) {
    MX_ERROR_MSG << "pbn_running_update: gather must be (3, T) and momentum, running_mean, "
                 << "running_var (T,) for the same T";
    return MX_FAIL;
  }
  out->assign(1, {1u});
  return MX_SUCCESS;
}

MXReturnValue running_mutates(const std::unordered_map<std::string, std::string>& attrs,
                              std::vector<int>* indices) {
  indices->push_back(kRunningMeanAll);
  indices->push_back(kRunningVarAll);
  return MX_SUCCESS;
}

MXReturnValue running_update_cpu(const std::unordered_map<std::string, std::string>& attrs,
                                 std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                 const OpResource& res) {
  const float* stats = inputs->at(kStats).data<float>();
  const float* gather = inputs->at(kGather).data<float>();
  const float* momentum = inputs->at(kMomentum).data<float>();
  float* running_mean = inputs->at(kRunningMeanAll).data<float>();
  float* running_var = inputs->at(kRunningVarAll).data<float>();
  const long t = static_cast<long>(inputs->at(kMomentum).size());
  for (long i = 0; i < t; ++i) {
    pbn_running_channel(stats[static_cast<long>(gather[i])],
                        stats[static_cast<long>(gather[t + i])],
                        stats[static_cast<long>(gather[2 * t + i])], momentum[i],
                        running_mean + i, running_var + i);
  }
  outputs->at(0).data<float>()[0] = static_cast<float>(t);
  return MX_SUCCESS;
}

enum AcceptInput { kLocal, kGroup, kRate, kGlobal, kHealth, kNumAcceptInputs };

MXReturnValue accept_parse(const std::unordered_map<std::string, std::string>& attrs,
                           int* num_in, int* num_out) {
  *num_in = kNumAcceptInputs;
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue accept_shape(const std::unordered_map<std::string, std::string>& attrs,
                           std::vector<std::vector<unsigned int>>* in,
                           std::vector<std::vector<unsigned int>>* out) {
  const std::vector<unsigned int>& k = in->at(kLocal);
  bool ok = k.size() == 1 && in->at(kGroup) == k && in->at(kRate) == k &&
            in->at(kGlobal) == k && in->at(kHealth) == std::vector<unsigned int>{5u};
  if (!ok) {
    MX_ERROR_MSG << "pbn_accept_sums: local, group, rate and global must be (K,), health (5,)";
    return MX_FAIL;
  }
  out->assign(1, {1u});
  return MX_SUCCESS;
}

MXReturnValue accept_mutates(const std::unordered_map<std::string, std::string>& attrs,
                             std::vector<int>* indices) {
  indices->push_back(kGlobal);
  indices->push_back(kHealth);
  return MX_SUCCESS;
}

bool all_finite(const float* p, long n) {
  bool ok = true;
  for (long i = 0; i < n; ++i) ok &= std::isfinite(p[i]);
  return ok;
}

MXReturnValue accept_sums_cpu(const std::unordered_map<std::string, std::string>& attrs,
                              std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                              const OpResource& res) {
  const long k = static_cast<long>(inputs->at(kLocal).size());
  const float* group = inputs->at(kGroup).data<float>();
  const float* rate = inputs->at(kRate).data<float>();
  float* global = inputs->at(kGlobal).data<float>();
  bool group_ok = all_finite(group, k);
  if (group_ok) {
    for (long i = 0; i < k; ++i) global[i] = rate[i] * global[i] + (1.f - rate[i]) * group[i];
  }
  pbn_record_health(all_finite(inputs->at(kLocal).data<float>(), k), group_ok,
                    inputs->at(kHealth).data<float>());
  outputs->at(0).data<float>()[0] = group_ok ? 1.f : 0.f;
  return MX_SUCCESS;
}

/* ------------------------------------- dispatch ----------------------------------------- */

#ifdef PBN_WITH_CUDA
MXReturnValue norm_forward_gpu(const std::unordered_map<std::string, std::string>& attrs,
                               std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                               const OpResource& res) {
  MXTensor& data = inputs->at(kData);
  PbnLayout l = data_layout(attrs, data);
  PbnMode mode = mode_of(attrs, true);  /* the kernel reads is_inference on the device */
  return pbn_norm_forward_cuda(
      l, mode, data.data<float>(), inputs->at(kGamma).data<float>(),
      inputs->at(kBeta).data<float>(), inputs->at(kRunningMean).data<float>(),
      inputs->at(kRunningVar).data<float>(), inputs->at(kGroupSums).data<float>(),
      inputs->at(kLocalWeight).data<float>(), inputs->at(kIsInference).data<float>(),
      inputs->at(kBatchSums).data<float>(), outputs->at(kOut).data<float>(),
      outputs->at(kMean).data<float>(), outputs->at(kInvStd).data<float>(), res)
      ? MX_SUCCESS : MX_FAIL;
}

MXReturnValue norm_backward_gpu(const std::unordered_map<std::string, std::string>& attrs,
                                std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                const OpResource& res) {
  MXTensor& data = inputs->at(kFwdInputs + kData);
  PbnLayout l = data_layout(attrs, data);
  PbnMode mode = mode_of(attrs, true);
  MXTensor& group = inputs->at(kFwdInputs + kGroupSums);
  for (int i = kRunningMean; i < static_cast<int>(outputs->size()); ++i) {
    if (i != kGroupSums && !pbn_zero_cuda(outputs->at(i).data<float>(),
                                          static_cast<long>(outputs->at(i).size()), res)) {
      return MX_FAIL;
    }
  }
  return pbn_norm_backward_cuda(
      l, mode, inputs->at(kGradOut).data<float>(), data.data<float>(),
      inputs->at(kFwdInputs + kGamma).data<float>(), group.data<float>(),
      static_cast<int>(group.size() / l.channels),
      inputs->at(kFwdInputs + kLocalWeight).data<float>(),
      inputs->at(kFwdInputs + kIsInference).data<float>(),
      inputs->at(kFwdOutputs + kMean).data<float>(),
      inputs->at(kFwdOutputs + kInvStd).data<float>(), outputs->at(kData).data<float>(),
      outputs->at(kGamma).data<float>(), outputs->at(kBeta).data<float>(),
      outputs->at(kGroupSums).data<float>(), res) ? MX_SUCCESS : MX_FAIL;
}

MXReturnValue sums_forward_gpu(const std::unordered_map<std::string, std::string>& attrs,
                               std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                               const OpResource& res) {
  MXTensor& data = inputs->at(0);
  PbnLayout l = data_layout(attrs, data);
  return pbn_sums_forward_cuda(l, data.data<float>(), outputs->at(0).data<float>(), res)
      ? MX_SUCCESS : MX_FAIL;
}

MXReturnValue sums_backward_gpu(const std::unordered_map<std::string, std::string>& attrs,
                                std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                const OpResource& res) {
  MXTensor& data = inputs->at(1);
  PbnLayout l = data_layout(attrs, data);
  return pbn_sums_backward_cuda(l, inputs->at(0).data<float>(), data.data<float>(),
                                outputs->at(0).data<float>(), res) ? MX_SUCCESS : MX_FAIL;
}

MXReturnValue running_update_gpu(const std::unordered_map<std::string, std::string>& attrs,
                                 std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                 const OpResource& res) {
  return pbn_running_update_cuda(
      inputs->at(kStats).data<float>(), inputs->at(kGather).data<float>(),
      inputs->at(kMomentum).data<float>(), static_cast<long>(inputs->at(kMomentum).size()),
      inputs->at(kRunningMeanAll).data<float>(), inputs->at(kRunningVarAll).data<float>(),
      outputs->at(0).data<float>(), res)
      ? MX_SUCCESS : MX_FAIL;
}

MXReturnValue accept_sums_gpu(const std::unordered_map<std::string, std::string>& attrs,
                              std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                              const OpResource& res) {
  return pbn_accept_sums_cuda(
      inputs->at(kLocal).data<float>(), inputs->at(kGroup).data<float>(),
      inputs->at(kRate).data<float>(), static_cast<long>(inputs->at(kLocal).size()),
      inputs->at(kGlobal).data<float>(), inputs->at(kHealth).data<float>(),
      outputs->at(0).data<float>(), res)
      ? MX_SUCCESS : MX_FAIL;
}
#endif

}  // namespace

REGISTER_OP(pbn_batch_norm)
    .setParseAttrs(norm_parse)
    .setInferType(all_float32)
    .setInferShape(norm_shape)
    .setMutateInputs(norm_mutates)
    .setForward(norm_forward_cpu, "cpu")
    .setBackward(norm_backward_cpu, "cpu")
#ifdef PBN_WITH_CUDA
    .setForward(norm_forward_gpu, "gpu")
    .setBackward(norm_backward_gpu, "gpu")
#endif
    ;

REGISTER_OP(pbn_batch_sums)
    .setParseAttrs(sums_parse)
    .setInferType(all_float32)
    .setInferShape(sums_shape)
    .setForward(sums_forward_cpu, "cpu")
    .setBackward(sums_backward_cpu, "cpu")
#ifdef PBN_WITH_CUDA
    .setForward(sums_forward_gpu, "gpu")
    .setBackward(sums_backward_gpu, "gpu")
#endif
    ;

REGISTER_OP(pbn_running_update)
    .setParseAttrs(running_parse)
    .setInferType(all_float32)
    .setInferShape(running_shape)
    .setMutateInputs(running_mutates)
    .setForward(running_update_cpu, "cpu")
#ifdef PBN_WITH_CUDA
    .setForward(running_update_gpu, "gpu")
#endif
    ;

REGISTER_OP(pbn_accept_sums)
    .setParseAttrs(accept_parse)
    .setInferType(all_float32)
    .setInferShape(accept_shape)
    .setMutateInputs(accept_mutates)
    .setForward(accept_sums_cpu, "cpu")
#ifdef PBN_WITH_CUDA
    .setForward(accept_sums_gpu, "gpu")
#endif
    ;

MXReturnValue initialize(int version) {
  if (version < 10700) {
    MX_ERROR_MSG << "pbn_gluon's operators need MXNet >= 1.7, found version " << version;
    return MX_FAIL;
  }
  return MX_SUCCESS;
}
