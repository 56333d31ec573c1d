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
 * is_inference: a one-element tensor read by the kernel, 0 while training and 1 in inference
 * (pbn_math.h: pbn_is_training). The extension API does not give operators MXNet's training
 * flag, so the graph hands it over as data. local_weight is read with local_stats=1 only; sync
 * mode is local weight 0 (SyncBN passes a 0).
 *
 * The inputs' order, names and dtypes are pbn_ops.h's X-macro lists, reported to pbn_gluon by
 * pbn_operator_inputs (checked at load against pbn_gluon/op_contract.py).
 *
 * Gradients are written, never added: lib_api.h hands an operator no OpReqType. The layers
 * put a native identity in front of an input whose gradient is accumulated (grad_req 'add').
 */
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "mxnet/lib_api.h"
#include "pbn_math.h"
#include "pbn_ops.h"

using namespace mxnet::ext;

/* --------------------------- contract, registry, unpacking (shared) ----------------------- */

/* "op=input,input,...;" for every operator, from pbn_ops.h's lists (pbn_gluon.ops checks it). */
#define PBN_CSV(id, name, dtype) name ","
extern "C" __attribute__((visibility("default"))) const char* pbn_operator_inputs() {
  return "pbn_batch_norm=" PBN_NORM_INPUTS(PBN_CSV) ";pbn_batch_sums=" PBN_SUMS_INPUTS(PBN_CSV)
         ";pbn_running_update=" PBN_RUNNING_INPUTS(PBN_CSV)
         ";pbn_take_sums=" PBN_TAKE_INPUTS(PBN_CSV)
         ";pbn_accept_sums=" PBN_ACCEPT_INPUTS(PBN_CSV) ";";
}
#undef PBN_CSV

namespace pbn {

CustomOp& op(const char* name) {
  Registry<CustomOp>* registry = Registry<CustomOp>::get();
  for (int i = 0; i < registry->size(); ++i) {
    if (std::strcmp(registry->get(i).name, name) == 0) return registry->get(i);
  }
  return registry->add(name);
}

namespace {

/* Reads `value` into `out`; false if it is not a whole number (or True/False). */
bool read_value(const std::string& value, int* out) {
  if (value == "True" || value == "true" || value == "False" || value == "false") {
    *out = value[0] == 'T' || value[0] == 't';
    return true;
  }
  char* end = nullptr;
  const long v = std::strtol(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || v < INT_MIN || v > INT_MAX) return false;
  *out = static_cast<int>(v);
  return true;
}

bool read_value(const std::string& value, float* out) {
  char* end = nullptr;
  *out = std::strtof(value.c_str(), &end);
  return !value.empty() && *end == '\0';
}

/* An attribute struct's fields: name, and a reader that stores a value (false if malformed). */
using Fields = std::vector<std::pair<const char*, std::function<bool(const std::string&)>>>;

/* Checks every attribute against `fields`; an MX_ERROR_MSG names `op`, the unknown attributes
 * with the ones it takes, and values that are not numbers. */
bool parse_fields(const char* op, const Attrs& attrs, const Fields& fields) {
  std::string unknown, malformed, known;
  for (const auto& f : fields) known += std::string(known.empty() ? "" : ", ") + f.first;
  for (const auto& kv : attrs) {
    if (kv.first.rfind("__", 0) == 0) continue; /* MXNet's hidden attributes */
    auto f = std::find_if(fields.begin(), fields.end(),
                          [&](const auto& field) { return kv.first == field.first; });
    if (f == fields.end()) {
      unknown += std::string(unknown.empty() ? "" : ", ") + "'" + kv.first + "'";
    } else if (!f->second(kv.second)) {
      malformed += std::string(malformed.empty() ? "" : ", ") + kv.first + "='" + kv.second + "'";
    }
  }
  if (op != nullptr && !unknown.empty()) {
    MX_ERROR_MSG << op << ": unknown attribute " << unknown << " (it takes "
                 << (known.empty() ? "no attributes" : known) << ")";
  } else if (op != nullptr && !malformed.empty()) {
    MX_ERROR_MSG << op << ": attribute " << malformed << " is not a number";
  }
  return unknown.empty() && malformed.empty();
}

}  // namespace

#define PBN_READER(type, name, value, description) \
  {#name, [this](const std::string& v) { return read_value(v, &name); }},
#define PBN_PARSE(Name, LIST)                                   \
  bool Name::parse(const char* op, const Attrs& attrs) {        \
    return parse_fields(op, attrs, {LIST(PBN_READER)});         \
  }
PBN_PARSE(NormParams, PBN_NORM_PARAMS)
PBN_PARSE(SumsParams, PBN_SUMS_PARAMS)
PBN_PARSE(NoParams, PBN_NO_PARAMS)
#undef PBN_PARSE
#undef PBN_READER

size_t nbytes(const MXTensor& t) {
  return t.size() * (t.dtype == kFloat64 ? sizeof(double) : sizeof(float));
}

namespace {

template <typename Shape>
PbnLayout layout_of(const Shape& shape, int axis) {
  PbnLayout l{1, static_cast<long>(shape[axis]), 1};
  for (int i = 0; i < axis; ++i) l.outer *= shape[i];
  for (size_t i = axis + 1; i < shape.size(); ++i) l.inner *= shape[i];
  return l;
}

/* The (outer, channels, inner) view of `t` around channel axis `axis`. */
PbnLayout data_layout(int axis, const MXTensor& t) {
  return layout_of(t.shape, channel_axis(axis, static_cast<int>(t.shape.size())));
}

PbnMode mode_of(const NormParams& params) {
  PbnMode mode;
  mode.training = 1;
  mode.local_stats = params.local_stats;
  mode.fix_gamma = params.fix_gamma;
  mode.eps = params.eps;
  return mode;
}

#define PBN_NAME(id, name, dtype) name,
const char* const kNormInputNames[] = {PBN_NORM_INPUTS(PBN_NAME)};
#undef PBN_NAME

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

/* The kernels take group_sums and batch_sums in double: float32 ones ('w') are widened by the
 * CPU callbacks (Widened) and rejected on GPU. */
bool state_is_double(const std::vector<MXTensor>& in) {
  if (in[kGroupSums].dtype == kFloat64 && in[kBatchSums].dtype == kFloat64) return true;
  MX_ERROR_MSG << "pbn_batch_norm: float32 group_sums and batch_sums are widened to double on "
                  "CPU only; on GPU keep them float64 (as ProgressiveBatchNorm stores them)";
  return false;
}

}  // namespace

NormForward::NormForward(const Attrs& attrs, std::vector<MXTensor>* in,
                         std::vector<MXTensor>* out) {
  const NormParams params(attrs);
  l = data_layout(params.axis, in->at(kData));
  mode = mode_of(params);
  ok = norm_sizes_ok(*in, l) && state_is_double(*in);
  x = in->at(kData).data<float>();
  gamma = in->at(kGamma).data<float>();
  beta = in->at(kBeta).data<float>();
  running_mean = in->at(kRunningMean).data<float>();
  running_var = in->at(kRunningVar).data<float>();
  group_sums = in->at(kGroupSums).data<pbn_sum_t>();
  local_weight = in->at(kLocalWeight).data<float>();
  is_inference = in->at(kIsInference).data<float>();
  batch_sums = in->at(kBatchSums).data<pbn_sum_t>();
  y = out->at(kOut).data<float>();
  mean = out->at(kMean).data<float>();
  invstd = out->at(kInvStd).data<float>();
}

NormBackward::NormBackward(const Attrs& attrs, std::vector<MXTensor>* in,
                           std::vector<MXTensor>* out) {
  const NormParams params(attrs);
  MXTensor& data = in->at(kFwdInputs + kData);
  l = data_layout(params.axis, data);
  mode = mode_of(params);
  dy = in->at(kGradOut + kOut).data<float>();
  x = data.data<float>();
  gamma = in->at(kFwdInputs + kGamma).data<float>();
  local_weight = in->at(kFwdInputs + kLocalWeight).data<float>();
  is_inference = in->at(kFwdInputs + kIsInference).data<float>();
  mean = in->at(kFwdOutputs + kMean).data<float>();
  invstd = in->at(kFwdOutputs + kInvStd).data<float>();
  MXTensor& group = in->at(kFwdInputs + kGroupSums);
  group_sums = group.data<pbn_sum_t>();
  group_rows = l.channels > 0 ? static_cast<int>(group.size() / l.channels) : 0;
  MXTensor& batch = in->at(kFwdInputs + kBatchSums);
  grad_rows = mode.local_stats && batch.size() == 5u * l.channels
                  ? batch.data<pbn_sum_t>() + 3 * l.channels : nullptr;
  dx = out->at(kData).data<float>();
  dgamma = out->at(kGamma).data<float>();
  dbeta = out->at(kBeta).data<float>();
  dgroup = out->at(kGroupSums).data<pbn_sum_t>();
  for (int i : {kRunningMean, kRunningVar, kLocalWeight, kIsInference, kBatchSums}) {
    no_grad.push_back(&out->at(i));
  }
}

SumsForward::SumsForward(const Attrs& attrs, std::vector<MXTensor>* in,
                         std::vector<MXTensor>* out)
    : l(data_layout(SumsParams(attrs).axis, in->at(kSumsData))),
      x(in->at(kSumsData).data<float>()), sums(out->at(kSums).data<pbn_sum_t>()) {}

SumsBackward::SumsBackward(const Attrs& attrs, std::vector<MXTensor>* in,
                           std::vector<MXTensor>* out)
    : l(data_layout(SumsParams(attrs).axis, in->at(kFwdSumsData + kSumsData))),
      dsums(in->at(kGradSums + kSums).data<pbn_sum_t>()),
      x(in->at(kFwdSumsData + kSumsData).data<float>()),
      dx(out->at(kSumsData).data<float>()) {}

RunningUpdate::RunningUpdate(std::vector<MXTensor>* in, std::vector<MXTensor>* out)
    : t(static_cast<long>(in->at(kMomentum).size())),
      stats(in->at(kStats).data<pbn_sum_t>()), stats_size(in->at(kStats).size()),
      gather(in->at(kGather).data<double>()), momentum(in->at(kMomentum).data<float>()),
      running_mean(in->at(kRunningMeanAll).data<float>()),
      running_var(in->at(kRunningVarAll).data<float>()),
      channel_count(out->at(kChannelCount).data<float>()) {}

TakeSums::TakeSums(std::vector<MXTensor>* in, std::vector<MXTensor>* out)
    : local(in->at(kTakeLocal).data_ptr), taken(out->at(kTaken).data_ptr),
      bytes(nbytes(in->at(kTakeLocal))) {}

AcceptSums::AcceptSums(std::vector<MXTensor>* in, std::vector<MXTensor>* out)
    : k(static_cast<long>(in->at(kLocal).size())), local(in->at(kLocal).data<pbn_sum_t>()),
      group(in->at(kGroup).data<pbn_sum_t>()), rate(in->at(kRate).data<pbn_sum_t>()),
      global(in->at(kGlobal).data<pbn_sum_t>()), fresh(in->at(kFresh).data<pbn_sum_t>()),
      health(in->at(kHealth).data<float>()), group_ok(out->at(kGroupOk).data<float>()) {}

}  // namespace pbn

using namespace pbn;

namespace {

/* ---------------------------------- attributes and shapes ------------------------------- */

/* mutateInputs: the inputs an operator writes (its auxiliary states). */
template <int... kIndices>
MXReturnValue mutates(const Attrs&, std::vector<int>* indices) {
  *indices = {kIndices...};
  return MX_SUCCESS;
}

/* Fills unknown dtypes and checks the known ones: `in` and `out` hold each input's and
 * output's dtype, 'f' float32, 'd' double (pbn_sum_t), 'w' double (when unknown) or float32. */
MXReturnValue typed(const char* op, const char* in, const char* out, std::vector<int>* in_types,
                    std::vector<int>* out_types) {
  auto code = [](char c) { return c == 'f' ? kFloat32 : kFloat64; };
  // MXNet's dtype codes (mshadow's TypeFlag; 12 is bfloat16, which lib_api.h does not name)
  static const char* names[] = {"float32", "float64", "float16", "uint8",  "int32",
                                "int8",    "int64",   "bool",    "int16",  "uint16",
                                "uint32",  "uint64",  "bfloat16"};
  for (size_t i = 0; i < in_types->size(); ++i) {
    if (in_types->at(i) == -1) in_types->at(i) = code(in[i]);
    if (in[i] == 'w' && in_types->at(i) == kFloat32) continue;
    if (in_types->at(i) != code(in[i])) {
      int got = in_types->at(i);
      std::string name = got >= 0 && got <= 12 ? names[got] : "dtype code " + std::to_string(got);
      MX_ERROR_MSG << op << ": input " << i << " must be "
                   << (in[i] == 'd' ? "float64" : in[i] == 'w' ? "float64 or float32"
                                        : "float32") << ", got " << name
                   << ". ProgressiveBatchNorm and SyncBatchNorm compute in float32 (their "
                      "exchange state in float64): keep models with them in float32 (MXNet's "
                      "AMP cannot: its fp32_ops take only its own operators)";
      return MX_FAIL;
    }
  }
  for (size_t i = 0; i < out_types->size(); ++i) out_types->at(i) = code(out[i]);
  return MX_SUCCESS;
}

/* The shapes inferShape fills and checks, one per input or output. */
using Shapes = std::vector<std::vector<unsigned int>>;

/* The channel axis `given` of `op`'s data of shape `data`, or -1 (with an MX_ERROR_MSG). */
int channel_axis_of(const char* op, int given, const std::vector<unsigned int>& data) {
  int axis = channel_axis(given, static_cast<int>(data.size()));
  if (data.size() < 2 || axis < 0) {
    MX_ERROR_MSG << op << ": axis " << given << " does not fit an input of "
                 << data.size() << " dims";
    return -1;
  }
  return axis;
}

/* The per-channel inputs' shapes from the data's (deferred initialisation), checked. */
MXReturnValue norm_shape(const Attrs& attrs, Shapes* in, Shapes* out) {
  const auto& data = in->at(kData);
  const int axis = channel_axis_of("pbn_batch_norm", NormParams(attrs).axis, data);
  if (axis < 0) return MX_FAIL;
  /* MXNet hands an unknown dimension over as -1 (legacy shapes: 0) */
  auto known = [](const std::vector<unsigned int>& s) {
    if (s.empty()) return false;
    for (unsigned d : s) if (d == 0 || d == static_cast<unsigned>(-1)) return false;
    return true;
  };
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
    const size_t expected = i == kGroupSums || i == kBatchSums ? static_cast<size_t>(rows) * c
                            : i == kLocalWeight || i == kIsInference ? 1 : c;
    if (size != expected || (i == kGroupSums && rows != 3 && rows != 5)) {
      MX_ERROR_MSG << "pbn_batch_norm: " << kNormInputNames[i] << " has " << size
                   << " elements, but the data has " << c << " channels on axis " << axis;
      return MX_FAIL;
    }
  }
  out->assign(kNumNormOutputs, {c});
  out->at(kOut) = data;
  return MX_SUCCESS;
}

MXReturnValue sums_shape(const Attrs& attrs, Shapes* in, Shapes* out) {
  const auto& data = in->at(kSumsData);
  const int axis = channel_axis_of("pbn_batch_sums", SumsParams(attrs).axis, data);
  if (axis < 0) return MX_FAIL;
  out->assign(kNumSumsOutputs, {3u, data[axis]});
  return MX_SUCCESS;
}

/* The shape of an operator whose output is one number, when its inputs are `ok`. */
MXReturnValue one_number(bool ok, const char* problem, Shapes* out) {
  if (!ok) {
    MX_ERROR_MSG << problem;
    return MX_FAIL;
  }
  out->assign(1, {1u});
  return MX_SUCCESS;
}

MXReturnValue running_shape(const Attrs& attrs, Shapes* in, Shapes* out) {
  unsigned t = in->at(kMomentum).empty() ? 0 : in->at(kMomentum)[0];
  return one_number(in->at(kGather) == std::vector<unsigned int>{3u, t} &&
                        in->at(kRunningMeanAll) == std::vector<unsigned int>{t} &&
                        in->at(kRunningVarAll) == std::vector<unsigned int>{t},
                    "pbn_running_update: gather must be (3, T) and momentum, running_mean, "
                    "running_var (T,) for the same T", out);
}

MXReturnValue take_shape(const Attrs& attrs, Shapes* in, Shapes* out) {
  out->assign(kNumTakeOutputs, in->at(kTakeLocal));
  return MX_SUCCESS;
}

MXReturnValue accept_shape(const Attrs& attrs, Shapes* in, Shapes* out) {
  const std::vector<unsigned int>& k = in->at(kLocal);
  return one_number(k.size() == 1 && in->at(kGroup) == k && in->at(kRate) == k &&
                        in->at(kGlobal) == k && in->at(kFresh) == k &&
                        in->at(kHealth) == std::vector<unsigned int>{5u},
                    "pbn_accept_sums: local, group, rate, global and fresh must be (K,), "
                    "health (5,)", out);
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

/* out = x_coef (x - center) + offset (+ dy_coef dy when dy is given) over one channel. */
void channel_affine(float* out, const float* x, const float* dy, const PbnLayout& l, long c,
                    float x_coef, float center, float offset, float dy_coef) {
  for (long a = 0; a < l.outer; ++a) {
    long off = (a * l.channels + c) * l.inner;
    if (dy) {
      for (long b = 0; b < l.inner; ++b) {
        out[off + b] = dy_coef * dy[off + b] + x_coef * (x[off + b] - center) + offset;
      }
    } else {
      for (long b = 0; b < l.inner; ++b) out[off + b] = x_coef * (x[off + b] - center) + offset;
    }
  }
}

PBN_CALLBACK(norm_forward_cpu) {
  NormForward f(attrs, inputs, outputs);
  if (!f.ok) return MX_FAIL;
  f.mode.training = pbn_is_training(f.is_inference[0]);
  const PbnLayout& l = f.l;
  const float w = f.local_weight[0];
  const long n_per_channel = l.outer * l.inner;

#pragma omp parallel for schedule(static)
  for (long c = 0; c < l.channels; ++c) {
    double shift = 0.0, s1 = 0.0, s2 = 0.0, mu, r, sums[3];
    if (f.mode.training && f.mode.local_stats && n_per_channel > 0) {
      shift = f.x[c * l.inner];
      channel_sums(f.x, l, c, shift, &s1, &s2);
    }
    pbn_forward_channel(f.mode, shift, s1, s2, static_cast<double>(n_per_channel),
                        f.group_sums + c, l.channels, w, f.running_mean[c], f.running_var[c],
                        &mu, &r, sums);
    if (f.mode.training) {
      for (int k = 0; k < 3; ++k) f.batch_sums[k * l.channels + c] = sums[k];
    }
    float scale, center, offset;
    pbn_forward_affine(f.mode, f.gamma[c], f.beta[c], mu, r, &scale, &center, &offset);
    f.mean[c] = center;
    f.invstd[c] = static_cast<float>(r);
    channel_affine(f.y, f.x, nullptr, l, c, scale, center, offset, 0.f);
  }
  return MX_SUCCESS;
}

PBN_CALLBACK(norm_backward_cpu) {
  NormBackward b(attrs, inputs, outputs);
  b.mode.training = pbn_is_training(b.is_inference[0]);
  for (MXTensor* t : b.no_grad) std::memset(t->data_ptr, 0, nbytes(*t));
  const PbnLayout& l = b.l;
  const float w = b.local_weight[0];
  pbn_sum_t* grad_rows = b.mode.training ? b.grad_rows : nullptr;
  const double n = static_cast<double>(l.outer * l.inner);

#pragma omp parallel for schedule(static)
  for (long c = 0; c < l.channels; ++c) {
    double sdy, sdyxc, dy_coef, x_coef, offset, dg, db, dg0, dg1;
    channel_grad_sums(b.dy, b.x, l, c, b.mean[c], &sdy, &sdyxc);
    pbn_backward_channel(b.mode, sdy, sdyxc, n, b.group_sums + c, l.channels, b.group_rows, w,
                         b.gamma[c], b.mean[c], b.invstd[c], &dy_coef, &x_coef, &offset, &dg,
                         &db, &dg0, &dg1);
    b.dgamma[c] = static_cast<float>(dg);
    b.dbeta[c] = static_cast<float>(db);
    for (int row = 0; row < b.group_rows; ++row) {
      b.dgroup[row * l.channels + c] = row == 0 ? dg0 : row == 1 ? dg1 : 0.0;
    }
    if (grad_rows) {
      grad_rows[c] = sdy;
      grad_rows[l.channels + c] = sdyxc * b.invstd[c];
    }
    channel_affine(b.dx, b.x, b.dy, l, c, static_cast<float>(x_coef), b.mean[c],
                   static_cast<float>(offset), static_cast<float>(dy_coef));
  }
  return MX_SUCCESS;
}

/* The float32 ones among a call's 'w' tensors, widened to double in temporary space for the
 * kernels (one alloc_cpu: a second could move the first) and, for those the call writes,
 * narrowed back when it ends. Each tensor's data_ptr and dtype are restored. */
class Widened {
 public:
  Widened(std::vector<std::pair<MXTensor*, bool>> tensors, const OpResource& res) {
    size_t total = 0;
    for (auto& t : tensors) total += t.first->dtype == kFloat32 ? t.first->size() : 0;
    if (total == 0) return;
    double* space = static_cast<double*>(res.alloc_cpu(static_cast<int>(total * sizeof(double))));
    for (auto& t : tensors) {
      MXTensor* tensor = t.first;
      if (tensor->dtype != kFloat32) continue;
      const float* narrow = tensor->data<float>();
      for (int64_t i = 0; i < tensor->size(); ++i) space[i] = narrow[i];
      widened_.push_back({tensor, tensor->data_ptr, t.second});
      tensor->data_ptr = space;
      tensor->dtype = kFloat64;
      space += tensor->size();
    }
  }
  ~Widened() {
    for (auto& w : widened_) {
      if (w.written) {
        const double* wide = w.tensor->data<double>();
        float* narrow = static_cast<float*>(w.narrow);
        for (int64_t i = 0; i < w.tensor->size(); ++i) narrow[i] = static_cast<float>(wide[i]);
      }
      w.tensor->data_ptr = w.narrow;
      w.tensor->dtype = kFloat32;
    }
  }

 private:
  struct Entry {
    MXTensor* tensor;
    void* narrow;
    bool written;
  };
  std::vector<Entry> widened_;
};

PBN_CALLBACK(norm_forward_cpu_any) {
  Widened state({{&inputs->at(kGroupSums), false}, {&inputs->at(kBatchSums), true}}, res);
  return norm_forward_cpu(attrs, inputs, outputs, res);
}

PBN_CALLBACK(norm_backward_cpu_any) {
  Widened state({{&inputs->at(kFwdInputs + kGroupSums), false},
                 {&inputs->at(kFwdInputs + kBatchSums), true},
                 {&outputs->at(kGroupSums), true}}, res);
  return norm_backward_cpu(attrs, inputs, outputs, res);
}

PBN_CALLBACK(sums_forward_cpu) {
  SumsForward f(attrs, inputs, outputs);
  const PbnLayout& l = f.l;
  const long n = l.outer * l.inner;
#pragma omp parallel for schedule(static)
  for (long c = 0; c < l.channels; ++c) {
    double shift = n > 0 ? f.x[c * l.inner] : 0.0, s1 = 0.0, s2 = 0.0;
    if (n > 0) channel_sums(f.x, l, c, shift, &s1, &s2);
    f.sums[c] = s1 + n * shift;
    f.sums[l.channels + c] = s2 + 2.0 * shift * s1 + n * shift * shift;
    f.sums[2 * l.channels + c] = static_cast<double>(n);
  }
  return MX_SUCCESS;
}

PBN_CALLBACK(sums_backward_cpu) {
  SumsBackward b(attrs, inputs, outputs);
  const PbnLayout& l = b.l;
#pragma omp parallel for schedule(static)
  for (long c = 0; c < l.channels; ++c) {
    channel_affine(b.dx, b.x, nullptr, l, c, static_cast<float>(2.0 * b.dsums[l.channels + c]),
                   0.f, static_cast<float>(b.dsums[c]), 0.f);
  }
  return MX_SUCCESS;
}

PBN_CALLBACK(running_update_cpu) {
  RunningUpdate u(inputs, outputs);
  const double size = static_cast<double>(u.stats_size);
  for (long i = 0; i < 3 * u.t; ++i) {
    if (!(u.gather[i] >= 0.0 && u.gather[i] < size)) {
      MX_ERROR_MSG << "pbn_running_update: gather index " << u.gather[i] << " outside the "
                   << size << " sums";
      return MX_FAIL;
    }
  }
  for (long i = 0; i < u.t; ++i) {
    pbn_running_channel(u.stats[static_cast<long>(u.gather[i])],
                        u.stats[static_cast<long>(u.gather[u.t + i])],
                        u.stats[static_cast<long>(u.gather[2 * u.t + i])], u.momentum[i],
                        u.running_mean + i, u.running_var + i);
  }
  std::memset(u.stats, 0, u.stats_size * sizeof(pbn_sum_t));
  *u.channel_count = static_cast<float>(u.t);
  return MX_SUCCESS;
}

PBN_CALLBACK(take_sums_cpu) {
  TakeSums s(inputs, outputs);
  std::memcpy(s.taken, s.local, s.bytes);
  std::memset(s.local, 0, s.bytes);
  return MX_SUCCESS;
}

bool all_finite(const pbn_sum_t* p, long n) {
  bool ok = true;
  for (long i = 0; i < n; ++i) ok &= std::isfinite(p[i]);
  return ok;
}

PBN_CALLBACK(accept_sums_cpu) {
  AcceptSums a(inputs, outputs);
  bool group_ok = all_finite(a.group, a.k);
  for (long i = 0; i < a.k; ++i) {
    if (group_ok) a.global[i] = a.rate[i] * a.global[i] + (1.0 - a.rate[i]) * a.group[i];
    a.fresh[i] = group_ok ? a.global[i] : 0.0;
  }
  pbn_record_health(all_finite(a.local, a.k), group_ok, a.health);
  *a.group_ok = group_ok ? 1.f : 0.f;
  return MX_SUCCESS;
}

/* Registers operator `name`'s CPU side (its GPU callbacks are registered in pbn_cuda.cu):
 * parseAttrs, inferType, inferShape, the inputs it writes (or null) and its callbacks
 * (backward or null). */
bool define_cpu(const char* name, parseAttrs_t attrs, inferType_t types, inferShape_t shape,
                mutateInputs_t mutated, fcomp_t forward, fcomp_t backward) {
  CustomOp& op = pbn::op(name);
  op.setParseAttrs(attrs).setInferType(types).setInferShape(shape).setForward(forward, "cpu");
  if (mutated != nullptr) op.setMutateInputs(mutated);
  if (backward != nullptr) op.setBackward(backward, "cpu");
  return true;
}

/* Operator Name: its attributes (PARAMS, a struct of pbn_ops.h), its inputs' and outputs'
 * counts and dtypes (its contract lists), and the rest for define_cpu. */
#define PBN_DTYPE(id, name, dtype) dtype,
#define PBN_CPU_OP(Name, PARAMS, INPUTS, OUTPUTS, shape, mutated, forward, backward)          \
  MXReturnValue Name##_attrs(const Attrs& attrs, int* num_in, int* num_out) {               \
    static const char in[] = {INPUTS(PBN_DTYPE) 0}, out[] = {OUTPUTS(PBN_DTYPE) 0};         \
    *num_in = static_cast<int>(sizeof(in)) - 1;                                              \
    *num_out = static_cast<int>(sizeof(out)) - 1;                                            \
    return PARAMS().parse(#Name, attrs) ? MX_SUCCESS : MX_FAIL;                              \
  }                                                                                          \
  MXReturnValue Name##_types(const Attrs&, std::vector<int>* in_types,                      \
                             std::vector<int>* out_types) {                                  \
    static const char in[] = {INPUTS(PBN_DTYPE) 0}, out[] = {OUTPUTS(PBN_DTYPE) 0};         \
    return typed(#Name, in, out, in_types, out_types);                                       \
  }                                                                                          \
  const bool Name##_defined =                                                                \
      define_cpu(#Name, Name##_attrs, Name##_types, shape, mutated, forward, backward);

PBN_CPU_OP(pbn_batch_norm, NormParams, PBN_NORM_INPUTS, PBN_NORM_OUTPUTS, norm_shape,
           mutates<kBatchSums>, norm_forward_cpu_any, norm_backward_cpu_any)
PBN_CPU_OP(pbn_batch_sums, SumsParams, PBN_SUMS_INPUTS, PBN_SUMS_OUTPUTS, sums_shape, nullptr,
           sums_forward_cpu, sums_backward_cpu)
/* MXNet operators need an output: the channel count T, shape (1,) */
PBN_CPU_OP(pbn_running_update, NoParams, PBN_RUNNING_INPUTS, PBN_RUNNING_OUTPUTS, running_shape,
           (mutates<kStats, kRunningMeanAll, kRunningVarAll>), running_update_cpu, nullptr)
PBN_CPU_OP(pbn_take_sums, NoParams, PBN_TAKE_INPUTS, PBN_TAKE_OUTPUTS, take_shape,
           mutates<kTakeLocal>, take_sums_cpu, nullptr)
PBN_CPU_OP(pbn_accept_sums, NoParams, PBN_ACCEPT_INPUTS, PBN_ACCEPT_OUTPUTS, accept_shape,
           (mutates<kGlobal, kFresh, kHealth>), accept_sums_cpu, nullptr)
#undef PBN_CPU_OP
#undef PBN_DTYPE

}  // namespace

MXReturnValue initialize(int version) {
  if (version < 10700) {
    MX_ERROR_MSG << "pbn_gluon's operators need MXNet >= 1.7, found version " << version;
    return MX_FAIL;
  }
  return MX_SUCCESS;
}
