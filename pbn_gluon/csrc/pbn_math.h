/* Per-channel math of the fused PBN operators, shared by the CPU and CUDA kernels.
 *
 * Notation (docs/pbn-spec.md), per channel: n this device's element count, m and v the mean
 * and biased variance of this device's batch, M and V those of the group sums G = [sum x,
 * sum x^2, count (, sum dy, sum dy*xhat)] of an earlier step, w the local weight:
 *
 *   mu  = w m + (1 - w) M
 *   var = w v + (1 - w) V + w (1 - w) (m - M)^2        (= w E[x^2] + (1 - w) Q - mu^2 >= 0)
 *   r   = 1 / sqrt(var + eps),  xhat = (x - mu) r,  y = gamma xhat + beta
 *
 * backward, with dbeta = sum dy, dgamma = sum dy xhat:
 *   dx = gamma r (dy - k1 - xhat k2),  k1 = w dbeta / n,  k2 = w dgamma / n
 *   progressive backward (5-row G): k1 += (1 - w) G3 / G2,  k2 += (1 - w) G4 / G2
 *   d G0 = (1 - w) / G2 (dL/dmu - 2 mu dL/dvar),  d G1 = (1 - w) / G2 dL/dvar,  d G2 = 0
 *   with dL/dmu = -gamma r dbeta, dL/dvar = -gamma r^2 dgamma / 2.
 *
 * The elementwise passes subtract the (float32) mean first, in float32:
 *   y  = s (x - m) + (beta - s (mu - m)),       s = gamma r, m = (float) mu
 *   dx = gamma r dy - gamma r^2 k2 (x - m) - gamma r k1
 * not s x + (beta - mu s): that form is the float32 difference of two terms of size
 * |mu| / std, which loses that many ulps (y = beta + 2e-2 for a channel of constant 1000;
 * nn.BatchNorm gives beta). x - m is exact while x is within a factor 2 of m, and the
 * offset's mu - m (the mean's rounding) is taken in double.
 *
 * "sync" mode (SyncBN): w = 0 and G holds the CURRENT step's group sums, whose gradient the
 * graph carries back through the exchange. Inference: mu, var are the running statistics.
 *
 * Exchanged sums (a device's batch sums, the group sums, their gradient) are double
 * (pbn_sum_t): Q - M^2 cancels about log10((|mean| / std)^2) digits, which float32 cannot
 * spare once |mean| / std passes ~100, and counts stay exact beyond 2^24.
 */
#ifndef PBN_MATH_H_
#define PBN_MATH_H_

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define PBN_HD __host__ __device__ __forceinline__
#else
#define PBN_HD inline
#include <cmath>
#endif

typedef double pbn_sum_t;

/* The operators' training-mode flag (is_inference) is 0 while training and 1 in inference
 * (pbn_gluon/op_contract.py: TRAINING, INFERENCE; made by a one-element BatchNorm of a
 * constant, or SyncBN's exchange operator), so the threshold is 1/2. */
PBN_HD int pbn_is_training(float is_inference) { return is_inference < 0.5f; }

/* What one forward call is asked to do, read from attributes and one-element inputs. */
struct PbnMode {
  int training;      /* 0: normalise with the running statistics */
  int local_stats;   /* 1: PBN (mix this batch's moments); 0: SyncBN (group sums only) */
  int fix_gamma;     /* 1: gamma is taken as 1 and gets no gradient */
  float eps;
};

/* A tensor seen as (outer, channels, inner) around its channel axis. */
struct PbnLayout {
  long outer, channels, inner;
};

/* One pbn_batch_norm forward call's tensors, unpacked (pbn_ops.h: NormForward fills them from
 * MXNet's; the CPU loop and the CUDA finalize kernel take them). mode.training is 1 here:
 * each callback reads is_inference where it runs. batch_sums: 3 rows written while training. */
struct PbnNormForwardArgs {
  PbnLayout l;
  PbnMode mode;
  const float *x, *gamma, *beta, *running_mean, *running_var, *local_weight, *is_inference;
  const pbn_sum_t* group_sums;
  pbn_sum_t* batch_sums;
  float *y, *mean, *invstd;
};

/* One pbn_batch_norm backward call's tensors (mode.training as above). The kernels write dx,
 * dgamma, dbeta, every row of dgroup and, while training, grad_rows: rows 3, 4 of a 5-row
 * batch_sums with local statistics (the progressive backward's [sum dy, sum dy xhat]), else
 * null. */
struct PbnNormBackwardArgs {
  PbnLayout l;
  PbnMode mode;
  const float *dy, *x, *gamma, *local_weight, *is_inference, *mean, *invstd;
  const pbn_sum_t* group_sums;
  int group_rows;
  float *dx, *dgamma, *dbeta;
  pbn_sum_t* dgroup;
  pbn_sum_t* grad_rows;
};

/* The weight of this device's moments that a channel actually uses: 1 while the group sums
 * are empty (the first step), 0 in inference and in sync mode. */
PBN_HD double pbn_effective_weight(const PbnMode& mode, double w, double group_count) {
  if (!mode.training || !mode.local_stats) return 0.0;
  return group_count > 0.0 ? w : 1.0;
}

/* Forward, one channel. s1, s2: sums of (x - shift) and (x - shift)^2 over n elements.
 * g: the group sums (stride gs between rows). Writes mu, r and, while training, the sums the
 * layer keeps in batch_sums: this batch's plain sums (PBN) or the group sums (SyncBN). */
PBN_HD void pbn_forward_channel(const PbnMode& mode, double shift, double s1, double s2, double n,
                                const pbn_sum_t* g, long gs, double w, double running_mean,
                                double running_var, double* mu, double* r, double* sums) {
  double mean, var;
  if (!mode.training) {
    mean = running_mean;
    var = running_var;
  } else {
    double gn = g[2 * gs];
    double gm = gn > 0.0 ? g[0] / gn : 0.0;
    double gv = gn > 0.0 ? g[gs] / gn - gm * gm : 0.0;
    gv = gv > 0.0 ? gv : 0.0;
    if (mode.local_stats) {
      double d = n > 0.0 ? s1 / n : 0.0;
      double m = shift + d;
      double v = n > 0.0 ? s2 / n - d * d : 0.0;
      v = v > 0.0 ? v : 0.0;
      sums[0] = n * m;
      sums[1] = n * (v + m * m);
      sums[2] = n;
      double we = pbn_effective_weight(mode, w, gn);
      mean = we * m + (1.0 - we) * gm;
      var = we * v + (1.0 - we) * gv + we * (1.0 - we) * (m - gm) * (m - gm);
    } else {
      sums[0] = g[0];
      sums[1] = g[gs];
      sums[2] = gn;
      mean = gm;
      var = gv;
    }
  }
  *mu = mean;
  *r = 1.0 / sqrt(var + (double)mode.eps);
}

/* The forward's elementwise pass of one channel, y = scale (x - center) + offset
 * (center: the float32 mean mu, which the layer hands on). */
PBN_HD void pbn_forward_affine(const PbnMode& mode, double gamma, double beta, double mu,
                               double r, float* scale, float* center, float* offset) {
  const double s = mode.fix_gamma ? r : gamma * r;
  *center = (float)mu;
  *scale = (float)s;
  *offset = (float)(beta - s * (mu - (double)*center));
}

/* Backward, one channel. sdy = sum dy, sdyxc = sum dy (x - mu) over this device's n elements,
 * mu the float32 mean of the forward. Gives dx = dy_coef dy + x_coef (x - mu) + offset, and
 * the gradients of gamma, beta and the group sums. */
PBN_HD void pbn_backward_channel(const PbnMode& mode, double sdy, double sdyxc, double n,
                                 const pbn_sum_t* g, long gs, int g_rows, double w, double gamma,
                                 double mu, double r, double* dy_coef, double* x_coef, double* offset,
                                 double* dgamma, double* dbeta, double* dg0, double* dg1) {
  double gam = mode.fix_gamma ? 1.0 : gamma;
  double gn = g[2 * gs];
  double we = pbn_effective_weight(mode, w, gn);
  double dgam = sdyxc * r;                      /* sum dy xhat */
  double k1 = n > 0.0 ? we * sdy / n : 0.0;
  double k2 = n > 0.0 ? we * dgam / n : 0.0;
  int mixes_global = mode.training && gn > 0.0 && we < 1.0;
  if (mixes_global && mode.local_stats && g_rows >= 5) {
    k1 += (1.0 - we) * g[3 * gs] / gn;
    k2 += (1.0 - we) * g[4 * gs] / gn;
  }
  *dy_coef = gam * r;
  *x_coef = -gam * r * r * k2;
  *offset = -gam * r * k1;
  *dgamma = mode.fix_gamma ? 0.0 : dgam;
  *dbeta = sdy;
  if (mixes_global) {
    double dmu = -gam * r * sdy;
    double dvar = -0.5 * gam * r * r * dgam;
    *dg0 = (1.0 - we) / gn * (dmu - 2.0 * mu * dvar);
    *dg1 = (1.0 - we) / gn * dvar;
  } else {
    *dg0 = 0.0;
    *dg1 = 0.0;
  }
}

/* Running statistics of one channel from group sums [s1, s2, n] (BatchNorm's convention, the
 * biased variance): running = m running + (1 - m) batch statistic. Sums of count 0 (a layer
 * that did not run, an exchange that was not accepted) leave them as they are. */
PBN_HD void pbn_running_channel(double s1, double s2, double n, double momentum,
                                float* running_mean, float* running_var) {
  if (!(n > 0.0)) return;
  double mean = s1 / n;
  double var = s2 / n - mean * mean;
  var = var > 0.0 ? var : 0.0;
  *running_mean = (float)(momentum * *running_mean + (1.0 - momentum) * mean);
  *running_var = (float)(momentum * *running_var + (1.0 - momentum) * var);
}

/* pbn_accept_sums' bookkeeping of one call, in health = [steps whose group sums were not
 * finite, the first of them, steps whose local sums were not finite, the first of them, calls]
 * (steps counted in calls, the firsts -1 until set). */
PBN_HD void pbn_record_health(bool local_ok, bool group_ok, float* health) {
  float call = health[4];
  if (!group_ok) {
    if (health[0] == 0.f) health[1] = call;
    health[0] += 1.f;
  }
  if (!local_ok) {
    if (health[2] == 0.f) health[3] = call;
    health[2] += 1.f;
  }
  health[4] = call + 1.f;
}

#endif  /* PBN_MATH_H_ */
