/* What pbn_ops.cc (registration, attributes, shapes, CPU kernels) and pbn_cuda.cu (GPU kernels)
 * share: the operators' input contracts, their attributes, and one call's tensors unpacked into
 * the arguments of its kernels, so that a CPU and a GPU callback differ only in what they run.
 * Each file registers its callbacks with lib_api.h's signature (PBN_OP, like MXNet's own
 * NNVM_REGISTER_OP in an operator's .cc and .cu). */
#ifndef PBN_OPS_H_
#define PBN_OPS_H_

#include <cstddef>
#include <string>
#include <unordered_map>
#include <vector>

#include "mxnet/lib_api.h"
#include "pbn_math.h"

namespace pbn {

using mxnet::ext::MXReturnValue;
using mxnet::ext::MXTensor;
using mxnet::ext::OpResource;

/* The attribute map MXNet hands every callback. */
using Attrs = std::unordered_map<std::string, std::string>;

/* The signature of a forward or backward callback (lib_api.h: fcomp_t). */
#define PBN_CALLBACK(name)                                                             \
  MXReturnValue name(const pbn::Attrs& attrs, std::vector<pbn::MXTensor>* inputs,     \
                     std::vector<pbn::MXTensor>* outputs, const pbn::OpResource& res)

/* The operator `name`, registered in whichever file comes first and found by the other. */
mxnet::ext::CustomOp& op(const char* name);
#define PBN_OP_CONCAT_(a, b) a##b
#define PBN_OP_CONCAT(a, b) PBN_OP_CONCAT_(a, b)
#define PBN_OP(Name) \
  static mxnet::ext::CustomOp& PBN_OP_CONCAT(pbn_op_, __COUNTER__) = pbn::op(#Name)

/* ------------------------------- input contracts ---------------------------------------
 * Each operator's inputs in order, X(enum id, name, dtype: 'f' float32, 'd' double = pbn_sum_t,
 * 'w' double, or float32 that the CPU callbacks widen to double for the call: harnesses such as
 * mx.test_utils.check_numeric_gradient cast every input to one dtype).
 * The enums, the dtypes, the names in messages and the contract the library reports to
 * pbn_gluon (pbn_operator_inputs, checked against pbn_gluon/op_contract.py at load) all come
 * from these lists. Mutated (auxiliary) inputs are inputs too. */
#define PBN_NORM_INPUTS(X)                                                                    \
  X(kData, "data", 'f') X(kGamma, "gamma", 'f') X(kBeta, "beta", 'f')                        \
  X(kRunningMean, "running_mean", 'f') X(kRunningVar, "running_var", 'f')                    \
  X(kGroupSums, "group_sums", 'w') X(kLocalWeight, "local_weight", 'f')                      \
  X(kIsInference, "is_inference", 'f') X(kBatchSums, "batch_sums", 'w')
#define PBN_NORM_OUTPUTS(X) X(kOut, "out", 'f') X(kMean, "mean", 'f') X(kInvStd, "invstd", 'f')
#define PBN_SUMS_INPUTS(X) X(kSumsData, "data", 'f')
#define PBN_SUMS_OUTPUTS(X) X(kSums, "sums", 'd')
#define PBN_RUNNING_INPUTS(X)                                                                 \
  X(kGather, "gather", 'd') X(kMomentum, "momentum", 'f') X(kStats, "stats", 'd')            \
  X(kRunningMeanAll, "running_mean", 'f') X(kRunningVarAll, "running_var", 'f')
#define PBN_RUNNING_OUTPUTS(X) X(kChannelCount, "channel_count", 'f')
#define PBN_TAKE_INPUTS(X) X(kTakeLocal, "local", 'd')
#define PBN_TAKE_OUTPUTS(X) X(kTaken, "taken", 'd')
#define PBN_ACCEPT_INPUTS(X)                                                                  \
  X(kLocal, "local", 'd') X(kGroup, "group", 'd') X(kRate, "rate", 'd')                      \
  X(kGlobal, "global_sums", 'd') X(kFresh, "fresh", 'd') X(kHealth, "health", 'f')
#define PBN_ACCEPT_OUTPUTS(X) X(kGroupOk, "group_ok", 'f')

#define PBN_ENUM(id, name, dtype) id,
enum NormInput { PBN_NORM_INPUTS(PBN_ENUM) kNumNormInputs };
enum NormOutput { PBN_NORM_OUTPUTS(PBN_ENUM) kNumNormOutputs };
enum SumsInput { PBN_SUMS_INPUTS(PBN_ENUM) kNumSumsInputs };
enum SumsOutput { PBN_SUMS_OUTPUTS(PBN_ENUM) kNumSumsOutputs };
enum RunningInput { PBN_RUNNING_INPUTS(PBN_ENUM) kNumRunningInputs };
enum RunningOutput { PBN_RUNNING_OUTPUTS(PBN_ENUM) kNumRunningOutputs };
enum TakeInput { PBN_TAKE_INPUTS(PBN_ENUM) kNumTakeInputs };
enum TakeOutput { PBN_TAKE_OUTPUTS(PBN_ENUM) kNumTakeOutputs };
enum AcceptInput { PBN_ACCEPT_INPUTS(PBN_ENUM) kNumAcceptInputs };
enum AcceptOutput { PBN_ACCEPT_OUTPUTS(PBN_ENUM) kNumAcceptOutputs };
#undef PBN_ENUM

/* A backward callback's inputs (lib_api.h): the output gradients, the forward inputs, the
 * forward outputs; its outputs: one gradient per forward input. */
enum NormBackwardInput { kGradOut = 0, kFwdInputs = kNumNormOutputs,
                         kFwdOutputs = kNumNormOutputs + kNumNormInputs };
enum SumsBackwardInput { kGradSums = 0, kFwdSumsData = kNumSumsOutputs };

/* ------------------------------------ attributes ----------------------------------------
 * Each operator family's attributes, X(type, name, default, description) with type int (also
 * "True"/"False") or float, like MXNet's DMLC parameter structs: Params::parse rejects an
 * attribute the family does not take, naming it (MXNet's own hidden "__name__" attributes
 * aside), and a value that is not a number. */
#define PBN_NORM_PARAMS(X)                                                                   \
  X(int, axis, 1, "the channel axis; negative counts from the end")                         \
  X(int, local_stats, 1, "1: mix this batch's moments into the group's (PBN); 0: SyncBN")   \
  X(int, fix_gamma, 0, "1: gamma is taken as 1 and gets no gradient")                       \
  X(float, eps, 1e-5f, "added to the variance before its inverse square root")
#define PBN_SUMS_PARAMS(X) X(int, axis, 1, "the channel axis; negative counts from the end")
#define PBN_NO_PARAMS(X)

#define PBN_FIELD(type, name, value, description) type name = value;
#define PBN_PARAMS_STRUCT(Name, LIST)                                                        \
  struct Name {                                                                              \
    LIST(PBN_FIELD)                                                                          \
    Name() = default;                                                                        \
    /* attributes already checked by parse (MXNet calls parseAttrs first) */                \
    explicit Name(const Attrs& attrs) { parse(nullptr, attrs); }                            \
    /* false, with an MX_ERROR_MSG naming `op` and the offending attributes, on a problem */ \
    bool parse(const char* op, const Attrs& attrs);                                          \
  };
PBN_PARAMS_STRUCT(NormParams, PBN_NORM_PARAMS)
PBN_PARAMS_STRUCT(SumsParams, PBN_SUMS_PARAMS)
PBN_PARAMS_STRUCT(NoParams, PBN_NO_PARAMS)
#undef PBN_PARAMS_STRUCT
#undef PBN_FIELD

/* The channel axis `axis` of a tensor of `ndim` dims, or -1 when out of range. */
inline int channel_axis(int axis, int ndim) {
  int a = axis < 0 ? axis + ndim : axis;
  return (a >= 0 && a < ndim) ? a : -1;
}

/* --------------------------- one call, unpacked for its kernels ---------------------------- */

/* pbn_batch_norm forward (pbn_math.h: PbnNormForwardArgs). `ok` is false (with an
 * MX_ERROR_MSG) when a per-channel input does not match the data's channels. */
struct NormForward : PbnNormForwardArgs {
  NormForward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out);
  bool ok;
};

/* pbn_batch_norm backward (pbn_math.h: PbnNormBackwardArgs); the callback zeroes the
 * gradients of the inputs that have none (no_grad). */
struct NormBackward : PbnNormBackwardArgs {
  NormBackward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out);
  std::vector<MXTensor*> no_grad;
};

/* pbn_batch_sums forward: sums (3 rows of C) of x. */
struct SumsForward {
  SumsForward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out);
  PbnLayout l;
  const float* x;
  pbn_sum_t* sums;
};

/* pbn_batch_sums backward: dx = dsums[0, c] + 2 x dsums[1, c]. */
struct SumsBackward {
  SumsBackward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out);
  PbnLayout l;
  const pbn_sum_t* dsums;
  const float* x;
  float* dx;
};

/* pbn_running_update: T channels; stats is zeroed once read. */
struct RunningUpdate {
  RunningUpdate(std::vector<MXTensor>* in, std::vector<MXTensor>* out);
  long t;
  pbn_sum_t* stats;
  size_t stats_size;
  const double* gather;
  const float* momentum;
  float *running_mean, *running_var, *channel_count;
};

/* pbn_take_sums: taken = local, then local = 0. */
struct TakeSums {
  TakeSums(std::vector<MXTensor>* in, std::vector<MXTensor>* out);
  void* local;
  void* taken;
  size_t bytes;
};

/* pbn_accept_sums over K sums. */
struct AcceptSums {
  AcceptSums(std::vector<MXTensor>* in, std::vector<MXTensor>* out);
  long k;
  const pbn_sum_t *local, *group, *rate;
  pbn_sum_t *global, *fresh;
  float *health, *group_ok;
};

/* Bytes of a tensor's data. */
size_t nbytes(const MXTensor& t);

}  // namespace pbn

#endif  /* PBN_OPS_H_ */
