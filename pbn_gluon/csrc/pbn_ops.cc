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
 *       With a 5-row batch_sums (PBN's progressive backward) the backward also writes this
 *       device's [sum dy, sum dy xhat] into its rows 3 and 4, as BatchNorm's backward writes
 *       its moving statistics: the consumer (StatsSync) takes them with an operator that
 *       mutates the buffer, so the engine orders it after this backward.
 *       group_sums and batch_sums are double (pbn_math.h: pbn_sum_t); the rest float32.
 *   pbn_batch_sums(data) -> (3, C) [sum x, sum x^2, count], double
 *       The local sums SyncBN exchanges before normalising; backward dx = dS0 + 2 x dS1.
 *   pbn_running_update(gather, momentum; stats, running_mean, running_var [aux, written]) -> T
 *       StatsSync's step for all T channels of a net at once: channel i's group sums are
 *       stats[gather[0, i]], stats[gather[1, i]], stats[gather[2, i]] (BatchNorm's update;
 *       stats and gather double, a channel of count 0 is left as it is). stats is zeroed
 *       once read: every sum moves the running statistics once.
 *   pbn_take_sums(; local [aux, written]) -> copy of local
 *       StatsSync takes a device's batch sums for the exchange and leaves 0 (count 0) behind:
 *       a layer that does not run in the next step sends nothing. As an operator that
 *       mutates local, it runs after every backward that writes the progressive rows.
 *   pbn_accept_sums(local, group, rate; global, fresh, health [aux, written]) -> (1,) ok
 *       StatsSync's acceptance of an exchange, one pass over its K sums (double): when every
 *       group sum is finite, global = rate global + (1 - rate) group and fresh = global;
 *       otherwise global is kept and fresh is 0 (the running statistics do not move). health
 *       (float32, pbn_math.h: pbn_record_health) counts the calls whose local or group sums
 *       were not finite.
 *
 * Data is seen as (A, C, B) around the channel axis `axis`. float32 data; sums are
 * accumulated in double around a per-channel shift (the channel's first element), so the
 * variance keeps its precision when |mean| >> std and for large N*H*W.
 *
 * is_inference: a one-element tensor read by the kernel, 0 while training and ~1 in inference
 * (pbn_math.h: pbn_is_training). The extension API does not give operators MXNet's training
 * flag, so the graph hands it over as data.
 *
 * Gradients are written, never added: lib_api.h hands an operator no OpReqType. The layers
 * put a native identity in front of an input whose gradient is accumulated (grad_req 'add').
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

/* The attribute map MXNet hands every callback. */
using Attrs = std::unordered_map<std::string, std::string>;

/* pbn_batch_norm's inputs, in order: the enum and the names in messages from one list */
#define PBN_NORM_INPUTS(X)                                                                  \
  X(kData, "data") X(kGamma, "gamma") X(kBeta, "beta") X(kRunningMean, "running_mean")    \
  X(kRunningVar, "running_var") X(kGroupSums, "group_sums") X(kLocalWeight, "local_weight") \
  X(kIsInference, "is_inference") X(kBatchSums, "batch_sums")
#define PBN_ENUM(id, name) id,
#define PBN_NAME(id, name) name,
enum NormInput { PBN_NORM_INPUTS(PBN_ENUM) kNumNormInputs };
const char* const kNormInputNames[] = {PBN_NORM_INPUTS(PBN_NAME)};
#undef PBN_ENUM
#undef PBN_NAME
enum NormOutput { kOut, kMean, kInvStd, kNumNormOutputs };

/* The operators' attributes, parsed in one place with their defaults (an operator ignores the
 * ones it does not take). */
struct OpParams {
  int axis = 1;         /* channel axis; negative counts from the end */
  int local_stats = 1;  /* pbn_batch_norm: 1 mixes this batch's moments in (PBN), 0 SyncBN */
  int fix_gamma = 0;
  float eps = 1e-5f;

  explicit OpParams(const Attrs& attrs) {
    auto flag = [&](const char* key, int* out) {
      auto it = attrs.find(key);
      if (it == attrs.end()) return;
      const std::string& v = it->second;
      *out = v == "True" || v == "true" ? 1 : v == "False" || v == "false" ? 0 : std::stoi(v);
    };
    flag("axis", &axis);
    flag("local_stats", &local_stats);
    flag("fix_gamma", &fix_gamma);
    auto it = attrs.find("eps");
    if (it != attrs.end()) eps = std::stof(it->second);
  }

  /* The channel axis of a tensor of `ndim` dims, or -1 when out of range. */
  int channel_axis(int ndim) const {
    int a = axis < 0 ? axis + ndim : axis;
    return (a >= 0 && a < ndim) ? a : -1;
  }
};

template <typename Shape>
PbnLayout layout_of(const Shape& shape, int axis) {
  PbnLayout l{1, static_cast<long>(shape[axis]), 1};
  for (int i = 0; i < axis; ++i) l.outer *= shape[i];
  for (size_t i = axis + 1; i < shape.size(); ++i) l.inner *= shape[i];
  return l;
}

/* The (outer, channels, inner) view of `t` around the operator's channel axis. */
PbnLayout data_layout(const Attrs& attrs,
                      const MXTensor& t) {
  return layout_of(t.shape, OpParams(attrs).channel_axis(static_cast<int>(t.shape.size())));
}

PbnMode mode_of(const Attrs& attrs, bool training) {
  const OpParams params(attrs);
  PbnMode mode;
  mode.training = training;
  mode.local_stats = params.local_stats;
  mode.fix_gamma = params.fix_gamma;
  mode.eps = params.eps;
  return mode;
}

/* ---------------------------------- attributes and shapes ------------------------------- */

MXReturnValue norm_parse(const Attrs& attrs,
                         int* num_in, int* num_out) {
  *num_in = kNumNormInputs;
  *num_out = kNumNormOutputs;
  return MX_SUCCESS;
}

MXReturnValue sums_parse(const Attrs& attrs,
                         int* num_in, int* num_out) {
  *num_in = 1;
  *num_out = 1;
  return MX_SUCCESS;
}

/* Fills and checks dtypes: `in` and `out` name each input's and output's type, 'f' float32
 * and 'd' double (pbn_sum_t). */
MXReturnValue typed(const char* op, const char* in, const char* out,
                    std::vector<int>* in_types, std::vector<int>* out_types) {
  for (size_t i = 0; i < in_types->size(); ++i) {
    int want = in[i] == 'd' ? kFloat64 : kFloat32;
    if (in_types->at(i) == -1) in_types->at(i) = want;
    if (in_types->at(i) != want) {
      MX_ERROR_MSG << op << ": input " << i << " must be " << (in[i] == 'd' ? "float64" : "float32")
                   << ", got dtype code " << in_types->at(i);
      return MX_FAIL;
    }
  }
  for (size_t i = 0; i < out_types->size(); ++i) out_types->at(i) = out[i] == 'd' ? kFloat64 : kFloat32;
  return MX_SUCCESS;
}

MXReturnValue norm_types(const Attrs& attrs,
                         std::vector<int>* in_types, std::vector<int>* out_types) {
  return typed("pbn_batch_norm", "fffffdffd", "fff", in_types, out_types);
}

MXReturnValue sums_types(const Attrs& attrs,
                         std::vector<int>* in_types, std::vector<int>* out_types) {
  return typed("pbn_batch_sums", "f", "d", in_types, out_types);
}

MXReturnValue running_types(const Attrs& attrs,
                            std::vector<int>* in_types, std::vector<int>* out_types) {
  return typed("pbn_running_update", "dfdff", "f", in_types, out_types);
}

MXReturnValue accept_types(const Attrs& attrs,
                           std::vector<int>* in_types, std::vector<int>* out_types) {
  return typed("pbn_accept_sums", "dddddf", "f", in_types, out_types);
}

/* Bytes of a tensor's data. */
size_t nbytes(const MXTensor& t) {
  return t.size() * (t.dtype == kFloat64 ? sizeof(double) : sizeof(float));
}

/* MXNet hands an unknown dimension over as -1 (legacy shapes: 0). */
bool known(const std::vector<unsigned int>& s) {
  if (s.empty()) return false;
  for (unsigned d : s) if (d == 0 || d == static_cast<unsigned>(-1)) return false;
  return true;
}

/* Fills the per-channel inputs' shapes from data (deferred initialisation) and checks them. */
MXReturnValue norm_shape(const Attrs& attrs,
                         std::vector<std::vector<unsigned int>>* in,
                         std::vector<std::vector<unsigned int>>* out) {
  const auto& data = in->at(kData);
  const OpParams params(attrs);
  int axis = params.channel_axis(static_cast<int>(data.size()));
  if (data.size() < 2 || axis < 0) {
    MX_ERROR_MSG << "pbn_batch_norm: axis " << params.axis
                 << " does not fit an input of " << data.size() << " dims";
    return MX_FAIL;
  }
  unsigned c = data[axis];
  for (int i = kGamma; i <= kRunningVar; ++i) {
    if (!known(in->at(i))) in->at(i) = {c};
  }
  auto& group = in->at(kGroupSums);
  if (!known(group)) group = {group.size() == 2 && known({group[0]}) ? group[0] : 3u, c};
  const unsigned rows = group.size() == 2 ? group[0] : 3u;
  if (!known(in->at(kBatchSums))) in->at(kBatchSums) = {rows * c};
  for (int i = kGamma; i <= kBatchSums; ++i) {
    size_t size = 1;
    for (unsigned d : in->at(i)) size *= d;
    size_t want = i >= kGroupSums && i != kLocalWeight && i != kIsInference
                      ? static_cast<size_t>(rows) * c : (i >= kLocalWeight ? 1 : c);
    bool ok = size == want && (i != kGroupSums || rows == 3 || rows == 5);
    if (!ok) {
      MX_ERROR_MSG << "pbn_batch_norm: " << kNormInputNames[i] << " has " << size << " elements, but "
                   << "the data has " << c << " channels on axis " << axis;
      return MX_FAIL;
    }
  }
  out->assign(kNumNormOutputs, {c});
  out->at(kOut) = data;
  return MX_SUCCESS;
}

MXReturnValue sums_shape(const Attrs& attrs,
                         std::vector<std::vector<unsigned int>>* in,
                         std::vector<std::vector<unsigned int>>* out) {
  const auto& data = in->at(0);
  const OpParams params(attrs);
  int axis = params.channel_axis(static_cast<int>(data.size()));
  if (data.size() < 2 || axis < 0) {
    MX_ERROR_MSG << "pbn_batch_sums: axis " << params.axis
                 << " does not fit an input of " << data.size() << " dims";
    return MX_FAIL;
  }
  out->assign(1, {3u, data[axis]});
  return MX_SUCCESS;
}

MXReturnValue norm_mutates(const Attrs& attrs,
                           std::vector<int>* indices) {
  indices->push_back(kBatchSums);
  return MX_SUCCESS;
}

/* ---------------------------------------- CPU ------------------------------------------- */

/* Sums of (x - shift) and (x - shift)^2 over one channel: float within short runs (vectorised),
 * double across them; a run whose float sums overflow (|x - shift| beyond ~1e17, finite data)
 * is summed again in double, so only NaN and Inf in the data give non-finite sums. */
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
      if (std::isfinite(f1) && std::isfinite(f2)) {
        a1 += f1;
        a2 += f2;
        continue;
      }
      for (long b = b0; b < b1; ++b) {
        double d = static_cast<double>(row[b]) - shift;
        a1 += d;
        a2 += d * d;
      }
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
      if (std::isfinite(f1) && std::isfinite(f2)) {
        a1 += f1;
        a2 += f2;
        continue;
      }
      for (long b = b0; b < b1; ++b) {    /* overflowed in float: again in double */
        double g = dy[off + b];
        a1 += g;
        a2 += g * (static_cast<double>(x[off + b]) - mu);
      }
    }
  }
  *sdy = a1;
  *sdyxc = a2;
}

/* out = x_coef x + offset (+ dy_coef dy when dy is given) over one channel. */
void channel_affine(float* out, const float* x, const float* dy, const PbnLayout& l, long c,
                    float x_coef, float offset, float dy_coef) {
  for (long a = 0; a < l.outer; ++a) {
    long off = (a * l.channels + c) * l.inner;
    if (dy) {
      for (long b = 0; b < l.inner; ++b) {
        out[off + b] = dy_coef * dy[off + b] + x_coef * x[off + b] + offset;
      }
    } else {
      for (long b = 0; b < l.inner; ++b) out[off + b] = x_coef * x[off + b] + offset;
    }
  }
}

/* Shapes are inferred before a call, but an array bound to a parameter may still disagree
 * with them (a parameter whose shape was reset and re-inferred, a hand-built graph): check
 * every per-channel input against the data's channels, so that no kernel reads or writes out
 * of bounds. */
bool norm_sizes_ok(const std::vector<MXTensor>& in, const PbnLayout& l) {
  const size_t c = static_cast<size_t>(l.channels);
  const size_t rows = in[kGroupSums].size() / std::max<size_t>(c, 1);
  bool ok = (rows == 3 || rows == 5) && in[kGroupSums].size() == rows * c &&
            in[kBatchSums].size() == rows * c && in[kLocalWeight].size() == 1 &&
            in[kIsInference].size() == 1;
  for (int i = kGamma; i <= kRunningVar; ++i) ok = ok && in[i].size() == c;
  if (!ok) {
    MX_ERROR_MSG << "pbn_batch_norm: the data has " << c << " channels but gamma, beta, "
                 << "running_mean, running_var have " << in[kGamma].size() << ", "
                 << in[kBeta].size() << ", " << in[kRunningMean].size() << ", "
                 << in[kRunningVar].size() << " elements and group_sums, batch_sums "
                 << in[kGroupSums].size() << ", " << in[kBatchSums].size()
                 << ": a layer's parameters must match its input's channels";
  }
  return ok;
}

MXReturnValue norm_forward_cpu(const Attrs& attrs,
                               std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                               const OpResource& res) {
  MXTensor& data = inputs->at(kData);
  PbnLayout l = data_layout(attrs, data);
  if (!norm_sizes_ok(*inputs, l)) return MX_FAIL;
  const float* x = data.data<float>();
  const float* gamma = inputs->at(kGamma).data<float>();
  const float* beta = inputs->at(kBeta).data<float>();
  const float* rmean = inputs->at(kRunningMean).data<float>();
  const float* rvar = inputs->at(kRunningVar).data<float>();
  const pbn_sum_t* group = inputs->at(kGroupSums).data<pbn_sum_t>();
  float w = inputs->at(kLocalWeight).data<float>()[0];
  PbnMode mode = mode_of(attrs, pbn_is_training(inputs->at(kIsInference).data<float>()[0]));
  pbn_sum_t* batch_sums = inputs->at(kBatchSums).data<pbn_sum_t>();
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
      for (int k = 0; k < 3; ++k) batch_sums[k * l.channels + c] = sums[k];
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

MXReturnValue norm_backward_cpu(const Attrs& attrs,
                                std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                const OpResource& res) {
  MXTensor& data = inputs->at(kFwdInputs + kData);
  PbnLayout l = data_layout(attrs, data);
  const float* dy = inputs->at(kGradOut).data<float>();
  const float* x = data.data<float>();
  const float* gamma = inputs->at(kFwdInputs + kGamma).data<float>();
  MXTensor& group_t = inputs->at(kFwdInputs + kGroupSums);
  const pbn_sum_t* group = group_t.data<pbn_sum_t>();
  int group_rows = static_cast<int>(group_t.size() / l.channels);
  float w = inputs->at(kFwdInputs + kLocalWeight).data<float>()[0];
  PbnMode mode = mode_of(attrs,
                         pbn_is_training(inputs->at(kFwdInputs + kIsInference).data<float>()[0]));
  const float* mean = inputs->at(kFwdOutputs + kMean).data<float>();
  const float* invstd = inputs->at(kFwdOutputs + kInvStd).data<float>();
  /* the progressive backward's rows 3, 4 of batch_sums: [sum dy, sum dy xhat] */
  MXTensor& batch_t = inputs->at(kFwdInputs + kBatchSums);
  pbn_sum_t* grad_rows = mode.training && mode.local_stats && batch_t.size() == 5u * l.channels
                             ? batch_t.data<pbn_sum_t>() + 3 * l.channels : nullptr;
  float* dx = outputs->at(kData).data<float>();
  float* dgamma = outputs->at(kGamma).data<float>();
  float* dbeta = outputs->at(kBeta).data<float>();
  pbn_sum_t* dgroup = outputs->at(kGroupSums).data<pbn_sum_t>();
  for (size_t i = kRunningMean; i < outputs->size(); ++i) {   /* rows 0, 1 of dgroup below */
    MXTensor& t = outputs->at(i);
    std::memset(t.data_ptr, 0, nbytes(t));
  }
  const double n = static_cast<double>(l.outer * l.inner);

#pragma omp parallel for schedule(static)
  for (long c = 0; c < l.channels; ++c) {
    double sdy, sdyxc, dy_coef, x_coef, offset, dg, db, dg0, dg1;
    channel_grad_sums(dy, x, l, c, mean[c], &sdy, &sdyxc);
    pbn_backward_channel(mode, sdy, sdyxc, n, group + c, l.channels, group_rows, w, gamma[c],
                         mean[c], invstd[c], &dy_coef, &x_coef, &offset, &dg, &db, &dg0, &dg1);
    dgamma[c] = static_cast<float>(dg);
    dbeta[c] = static_cast<float>(db);
    dgroup[c] = dg0;
    dgroup[l.channels + c] = dg1;
    if (grad_rows) {
      grad_rows[c] = sdy;
      grad_rows[l.channels + c] = sdyxc * invstd[c];
    }
    channel_affine(dx, x, dy, l, c, static_cast<float>(x_coef), static_cast<float>(offset),
                   static_cast<float>(dy_coef));
  }
  return MX_SUCCESS;
}

MXReturnValue sums_forward_cpu(const Attrs& attrs,
                               std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                               const OpResource& res) {
  MXTensor& data = inputs->at(0);
  PbnLayout l = data_layout(attrs, data);
  const float* x = data.data<float>();
  pbn_sum_t* sums = outputs->at(0).data<pbn_sum_t>();
  const long n = l.outer * l.inner;
#pragma omp parallel for schedule(static)
  for (long c = 0; c < l.channels; ++c) {
    double shift = n > 0 ? x[c * l.inner] : 0.0, s1 = 0.0, s2 = 0.0;
    if (n > 0) channel_sums(x, l, c, shift, &s1, &s2);
    sums[c] = s1 + n * shift;
    sums[l.channels + c] = s2 + 2.0 * shift * s1 + n * shift * shift;
    sums[2 * l.channels + c] = static_cast<double>(n);
  }
  return MX_SUCCESS;
}

MXReturnValue sums_backward_cpu(const Attrs& attrs,
                                std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                const OpResource& res) {
  const pbn_sum_t* dsums = inputs->at(0).data<pbn_sum_t>();
  MXTensor& data = inputs->at(1);
  PbnLayout l = data_layout(attrs, data);
  float* dx = outputs->at(0).data<float>();
#pragma omp parallel for schedule(static)
  for (long c = 0; c < l.channels; ++c) {
    channel_affine(dx, data.data<float>(), nullptr, l, c,
                   static_cast<float>(2.0 * dsums[l.channels + c]),
                   static_cast<float>(dsums[c]), 0.f);
  }
  return MX_SUCCESS;
}

enum RunningInput { kGather, kMomentum, kStats, kRunningMeanAll, kRunningVarAll,
                    kNumRunningInputs };

MXReturnValue running_parse(const Attrs& attrs,
                            int* num_in, int* num_out) {
  *num_in = kNumRunningInputs;
  *num_out = 1;   /* MXNet operators need an output: the channel count T, shape (1,) */
  return MX_SUCCESS;
}

MXReturnValue running_shape(const Attrs& attrs,
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

MXReturnValue running_mutates(const Attrs& attrs,
                              std::vector<int>* indices) {
  indices->push_back(kStats);
  indices->push_back(kRunningMeanAll);
  indices->push_back(kRunningVarAll);
  return MX_SUCCESS;
}

MXReturnValue running_update_cpu(const Attrs& attrs,
                                 std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                 const OpResource& res) {
  pbn_sum_t* stats = inputs->at(kStats).data<pbn_sum_t>();
  const double* gather = inputs->at(kGather).data<double>();
  const float* momentum = inputs->at(kMomentum).data<float>();
  float* running_mean = inputs->at(kRunningMeanAll).data<float>();
  float* running_var = inputs->at(kRunningVarAll).data<float>();
  const long t = static_cast<long>(inputs->at(kMomentum).size());
  const double size = static_cast<double>(inputs->at(kStats).size());
  for (long i = 0; i < 3 * t; ++i) {
    if (!(gather[i] >= 0.0 && gather[i] < size)) {
      MX_ERROR_MSG << "pbn_running_update: gather index " << gather[i] << " outside the "
                   << size << " sums";
      return MX_FAIL;
    }
  }
  for (long i = 0; i < t; ++i) {
    pbn_running_channel(stats[static_cast<long>(gather[i])],
                        stats[static_cast<long>(gather[t + i])],
                        stats[static_cast<long>(gather[2 * t + i])], momentum[i],
                        running_mean + i, running_var + i);
  }
  std::memset(stats, 0, nbytes(inputs->at(kStats)));
  outputs->at(0).data<float>()[0] = static_cast<float>(t);
  return MX_SUCCESS;
}

MXReturnValue take_parse(const Attrs& attrs,
                         int* num_in, int* num_out) {
  *num_in = 1;
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue take_types(const Attrs& attrs,
                         std::vector<int>* in_types, std::vector<int>* out_types) {
  return typed("pbn_take_sums", "d", "d", in_types, out_types);
}

MXReturnValue take_shape(const Attrs& attrs,
                         std::vector<std::vector<unsigned int>>* in,
                         std::vector<std::vector<unsigned int>>* out) {
  out->assign(1, in->at(0));
  return MX_SUCCESS;
}

MXReturnValue take_mutates(const Attrs& attrs,
                           std::vector<int>* indices) {
  indices->push_back(0);
  return MX_SUCCESS;
}

MXReturnValue take_sums_cpu(const Attrs& attrs,
                            std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                            const OpResource& res) {
  MXTensor& local = inputs->at(0);
  std::memcpy(outputs->at(0).data_ptr, local.data_ptr, nbytes(local));
  std::memset(local.data_ptr, 0, nbytes(local));
  return MX_SUCCESS;
}

enum AcceptInput { kLocal, kGroup, kRate, kGlobal, kFresh, kHealth, kNumAcceptInputs };

MXReturnValue accept_parse(const Attrs& attrs,
                           int* num_in, int* num_out) {
  *num_in = kNumAcceptInputs;
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue accept_shape(const Attrs& attrs,
                           std::vector<std::vector<unsigned int>>* in,
                           std::vector<std::vector<unsigned int>>* out) {
  const std::vector<unsigned int>& k = in->at(kLocal);
  bool ok = k.size() == 1 && in->at(kGroup) == k && in->at(kRate) == k &&
            in->at(kGlobal) == k && in->at(kFresh) == k &&
            in->at(kHealth) == std::vector<unsigned int>{5u};
  if (!ok) {
    MX_ERROR_MSG << "pbn_accept_sums: local, group, rate, global and fresh must be (K,), "
                 << "health (5,)";
    return MX_FAIL;
  }
  out->assign(1, {1u});
  return MX_SUCCESS;
}

MXReturnValue accept_mutates(const Attrs& attrs,
                             std::vector<int>* indices) {
  indices->push_back(kGlobal);
  indices->push_back(kFresh);
  indices->push_back(kHealth);
  return MX_SUCCESS;
}

bool all_finite(const pbn_sum_t* p, long n) {
  bool ok = true;
  for (long i = 0; i < n; ++i) ok &= std::isfinite(p[i]);
  return ok;
}

MXReturnValue accept_sums_cpu(const Attrs& attrs,
                              std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                              const OpResource& res) {
  const long k = static_cast<long>(inputs->at(kLocal).size());
  const pbn_sum_t* group = inputs->at(kGroup).data<pbn_sum_t>();
  const pbn_sum_t* rate = inputs->at(kRate).data<pbn_sum_t>();
  pbn_sum_t* global = inputs->at(kGlobal).data<pbn_sum_t>();
  pbn_sum_t* fresh = inputs->at(kFresh).data<pbn_sum_t>();
  bool group_ok = all_finite(group, k);
  for (long i = 0; i < k; ++i) {
    if (group_ok) global[i] = rate[i] * global[i] + (1.0 - rate[i]) * group[i];
    fresh[i] = group_ok ? global[i] : 0.0;
  }
  pbn_record_health(all_finite(inputs->at(kLocal).data<pbn_sum_t>(), k), group_ok,
                    inputs->at(kHealth).data<float>());
  outputs->at(0).data<float>()[0] = group_ok ? 1.f : 0.f;
  return MX_SUCCESS;
}

/* ------------------------------------- dispatch ----------------------------------------- */

#ifdef PBN_WITH_CUDA
MXReturnValue norm_forward_gpu(const Attrs& attrs,
                               std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                               const OpResource& res) {
  MXTensor& data = inputs->at(kData);
  PbnLayout l = data_layout(attrs, data);
  if (!norm_sizes_ok(*inputs, l)) return MX_FAIL;
  PbnMode mode = mode_of(attrs, true);  /* the kernel reads is_inference on the device */
  return pbn_norm_forward_cuda(
      l, mode, data.data<float>(), inputs->at(kGamma).data<float>(),
      inputs->at(kBeta).data<float>(), inputs->at(kRunningMean).data<float>(),
      inputs->at(kRunningVar).data<float>(), inputs->at(kGroupSums).data<pbn_sum_t>(),
      inputs->at(kLocalWeight).data<float>(), inputs->at(kIsInference).data<float>(),
      inputs->at(kBatchSums).data<pbn_sum_t>(), outputs->at(kOut).data<float>(),
      outputs->at(kMean).data<float>(), outputs->at(kInvStd).data<float>(), res)
      ? MX_SUCCESS : MX_FAIL;
}

MXReturnValue norm_backward_gpu(const Attrs& attrs,
                                std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                const OpResource& res) {
  MXTensor& data = inputs->at(kFwdInputs + kData);
  PbnLayout l = data_layout(attrs, data);
  PbnMode mode = mode_of(attrs, true);
  MXTensor& group = inputs->at(kFwdInputs + kGroupSums);
  MXTensor& batch = inputs->at(kFwdInputs + kBatchSums);
  for (int i = kRunningMean; i < static_cast<int>(outputs->size()); ++i) {
    if (i != kGroupSums && !pbn_zero_cuda(outputs->at(i).data_ptr, nbytes(outputs->at(i)), res)) {
      return MX_FAIL;
    }
  }
  /* rows 3, 4 of a 5-row batch_sums (progressive backward; the kernel writes them only while
   * training with local statistics) */
  pbn_sum_t* grad_rows = mode.local_stats && batch.size() == 5u * l.channels
                             ? batch.data<pbn_sum_t>() + 3 * l.channels : nullptr;
  return pbn_norm_backward_cuda(
      l, mode, inputs->at(kGradOut).data<float>(), data.data<float>(),
      inputs->at(kFwdInputs + kGamma).data<float>(), group.data<pbn_sum_t>(),
      static_cast<int>(group.size() / l.channels),
      inputs->at(kFwdInputs + kLocalWeight).data<float>(),
      inputs->at(kFwdInputs + kIsInference).data<float>(),
      inputs->at(kFwdOutputs + kMean).data<float>(),
      inputs->at(kFwdOutputs + kInvStd).data<float>(), outputs->at(kData).data<float>(),
      outputs->at(kGamma).data<float>(), outputs->at(kBeta).data<float>(),
      outputs->at(kGroupSums).data<pbn_sum_t>(), grad_rows, res) ? MX_SUCCESS : MX_FAIL;
}

MXReturnValue sums_forward_gpu(const Attrs& attrs,
                               std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                               const OpResource& res) {
  MXTensor& data = inputs->at(0);
  PbnLayout l = data_layout(attrs, data);
  return pbn_sums_forward_cuda(l, data.data<float>(), outputs->at(0).data<pbn_sum_t>(), res)
      ? MX_SUCCESS : MX_FAIL;
}

MXReturnValue sums_backward_gpu(const Attrs& attrs,
                                std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                const OpResource& res) {
  MXTensor& data = inputs->at(1);
  PbnLayout l = data_layout(attrs, data);
  return pbn_sums_backward_cuda(l, inputs->at(0).data<pbn_sum_t>(), data.data<float>(),
                                outputs->at(0).data<float>(), res) ? MX_SUCCESS : MX_FAIL;
}

MXReturnValue running_update_gpu(const Attrs& attrs,
                                 std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                 const OpResource& res) {
  return pbn_running_update_cuda(
      inputs->at(kStats).data<pbn_sum_t>(), inputs->at(kGather).data<double>(),
      inputs->at(kMomentum).data<float>(), static_cast<long>(inputs->at(kMomentum).size()),
      inputs->at(kRunningMeanAll).data<float>(), inputs->at(kRunningVarAll).data<float>(),
      outputs->at(0).data<float>(), res) &&
      pbn_zero_cuda(inputs->at(kStats).data_ptr, nbytes(inputs->at(kStats)), res)
      ? MX_SUCCESS : MX_FAIL;
}

MXReturnValue take_sums_gpu(const Attrs& attrs,
                            std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                            const OpResource& res) {
  MXTensor& local = inputs->at(0);
  return pbn_copy_cuda(outputs->at(0).data_ptr, local.data_ptr, nbytes(local), res) &&
      pbn_zero_cuda(local.data_ptr, nbytes(local), res) ? MX_SUCCESS : MX_FAIL;
}

MXReturnValue accept_sums_gpu(const Attrs& attrs,
                              std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                              const OpResource& res) {
  return pbn_accept_sums_cuda(
      inputs->at(kLocal).data<pbn_sum_t>(), inputs->at(kGroup).data<pbn_sum_t>(),
      inputs->at(kRate).data<pbn_sum_t>(), static_cast<long>(inputs->at(kLocal).size()),
      inputs->at(kGlobal).data<pbn_sum_t>(), inputs->at(kFresh).data<pbn_sum_t>(),
      inputs->at(kHealth).data<float>(),
      outputs->at(0).data<float>(), res)
      ? MX_SUCCESS : MX_FAIL;
}
#endif

}  // namespace

REGISTER_OP(pbn_batch_norm)
    .setParseAttrs(norm_parse)
    .setInferType(norm_types)
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
    .setInferType(sums_types)
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
    .setInferType(running_types)
    .setInferShape(running_shape)
    .setMutateInputs(running_mutates)
    .setForward(running_update_cpu, "cpu")
#ifdef PBN_WITH_CUDA
    .setForward(running_update_gpu, "gpu")
#endif
    ;

REGISTER_OP(pbn_take_sums)
    .setParseAttrs(take_parse)
    .setInferType(take_types)
    .setInferShape(take_shape)
    .setMutateInputs(take_mutates)
    .setForward(take_sums_cpu, "cpu")
#ifdef PBN_WITH_CUDA
    .setForward(take_sums_gpu, "gpu")
#endif
    ;

REGISTER_OP(pbn_accept_sums)
    .setParseAttrs(accept_parse)
    .setInferType(accept_types)
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
