// Divergence between student logits and a sparse teacher (the teacher's top-k ids and their
// log-probs, as an inference server returns them), CPU, one row at a time.
//
// Per row of V student logits x (z = x / temperature), with S the row's valid top-k ids, sorted
// (the caller sorts them; padding holds an id >= V and comes last):
//   gather  the |S| student logits at S (before anything is written: the gradient may alias the
//           logits).
//   pass 1  (tail="bucket", or when statistics need the full normaliser) streams the row in
//           blocks of BLOCK columns and computes the online softmax statistics of the complement
//           of S only: running max, sum of exponentials and the entropy sum. Blocks holding an id
//           of S are copied to an L1 buffer with those columns set to -inf, so the complement is
//           summed directly (never as 1 - sum over S, which cancels when the top-k hold almost
//           all of the mass). One exponential per element (fused_turn_kl needs two), cached per
//           thread for the last pass. The only pass that reads the logits from DRAM.
//   row     in double: L = logaddexp(lse(complement), lse(z over S)), the K+1 outcome
//           probabilities (or K, renormalised, for tail="renormalize"), the divergence, and the
//           coefficients of its gradient.
//   last    writes grad_scale * d div / d x in the student's dtype: every complement column
//           shares one factor times its cached exponential (a multiply per element; it re-reads
//           no logits and evaluates no exp), then the |S| columns get their own values.
//           renormalize writes zeros and the |S| values.
// Traffic: about one read and one write of the logits per element, plus the per-thread cache
// (one float32 row, 0.6 MB at V = 151936, which stays in L2/L3).
//
// Soft-capped and scaled logits: the student's logit map (LogitTransform, cpu_kernel_common.h) is
// applied as the logits are read (the gather, the target, pass 1's blocks, before the S columns
// are masked); with a soft cap, pass 1 caches its derivative per column in a second per-thread row
// (and the gather at S), and the last pass multiplies the gradient by it (chain rule). In
// renormalize mode without statistics pass 1 does not run: only S needs the derivative then.
//
// Edge cases: -inf student logits contribute exactly 0 (a block that is all -inf never
// evaluates -inf - (-inf)); an empty complement (S = the whole vocabulary) has no tail outcome;
// rows that are not kept are skipped (outputs 0, gradient row 0).
//
// The dtype and divergence codes, the exp2 polynomial, the 16-bit conversions and the block max
// are shared with turn_kl_cpu.cpp through cpu_kernel_common.h.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace py = pybind11;

// Built with -march=native: the AVX2/FMA/F16C paths of the shared helpers are compiled in when
// this CPU has them.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TCOD_FAST_AVX2 1
#else
#define TCOD_FAST_AVX2 0
#endif

namespace {

#include "cpu_kernel_common.h"

constexpr double NEG_INF_D = -std::numeric_limits<double>::infinity();

enum Tail : int { BUCKET = 0, RENORMALIZE = 1 };

template <int D>
inline void store_one(typename Storage<D>::type* dst, int64_t i, float value) {
  store_block<D>(&value, dst + i, 1);
}

struct BlockSums {
  float sum = 0.f, ent = 0.f;
};

#if TCOD_FAST_AVX2
// Pass 1's loop, two vectors per iteration (two independent exponential chains); returns how
// many leading elements it handled (a multiple of 16).
template <bool ENTROPY>
inline int64_t block_sums_avx2(const float* xs, int64_t n, float c, float m2, float* first, BlockSums& sums) {
  const __m256 vc = _mm256_set1_ps(c), vm2 = _mm256_set1_ps(m2);
  const __m256 floor = _mm256_set1_ps(EXP2_FLOOR), zero = _mm256_setzero_ps();
  __m256 s0 = zero, s1 = zero, e0 = zero, e1 = zero;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(xs + i + 256), _MM_HINT_T0);  // 1 KiB ahead
    const __m256 t0 = _mm256_max_ps(floor, _mm256_fmsub_ps(_mm256_loadu_ps(xs + i), vc, vm2));
    const __m256 t1 = _mm256_max_ps(floor, _mm256_fmsub_ps(_mm256_loadu_ps(xs + i + 8), vc, vm2));
    const __m256 x0 = exp2_clamped_avx2(t0), x1 = exp2_clamped_avx2(t1);
    _mm256_storeu_ps(first + i, x0);
    _mm256_storeu_ps(first + i + 8, x1);
    s0 = _mm256_add_ps(s0, x0);
    s1 = _mm256_add_ps(s1, x1);
    if (ENTROPY) {  // t is finite (clamped), so the product is 0 where the exponential is
      e0 = _mm256_fmadd_ps(x0, t0, e0);
      e1 = _mm256_fmadd_ps(x1, t1, e1);
    }
  }
  sums.sum = horizontal_sum(_mm256_add_ps(s0, s1));
  sums.ent = horizontal_sum(_mm256_add_ps(e0, e1));
  return i;
}
#endif

// exp2(x c - m2) of a block into the cache, with its sum and (ENTROPY) sum of exp2(t) t.
template <bool ENTROPY>
inline BlockSums block_sums(const float* xs, int64_t n, float c, float m2, float* first) {
  BlockSums sums;
  int64_t start = 0;
#if TCOD_FAST_AVX2
  start = block_sums_avx2<ENTROPY>(xs, n, c, m2, first, sums);
#endif
  float sum = sums.sum, ent = sums.ent;
#pragma omp simd reduction(+ : sum, ent)
  for (int64_t i = start; i < n; ++i) {
    const float t = clamp_exp2_arg(xs[i] * c - m2);
    const float e = exp2_clamped(t);
    first[i] = e;
    sum += e;
    if (ENTROPY) ent += e * t;
  }
  return BlockSums{sum, ent};
}

inline double logaddexp(double a, double b) {
  const double hi = std::max(a, b), lo = std::min(a, b);
  if (hi == NEG_INF_D) return NEG_INF_D;
  return hi + std::log1p(std::exp(lo - hi));
}

// The divergence over a row's outcomes and its derivatives (see torch_backend.sparse_terms):
// log_pi, log_q hold `outcomes` entries, the last being the tail (-inf on both sides when there
// is none). coef[o] = dD/dz at a column that is outcome o; a tail column v gets
// p_v per_p - (p_v / pi_tail) per_ratio.
struct Terms {
  double div, per_p, per_ratio;
};

template <int DIV>
Terms sparse_terms(const double* log_pi, const double* log_q, int64_t outcomes, double beta, double* coef) {
  Terms r{0.0, 0.0, 0.0};
  const int64_t tail = outcomes - 1;
  if (DIV == REVERSE_KL) {
    double div = 0.0;
    for (int64_t o = 0; o < outcomes; ++o) {
      const double pi = std::exp(log_pi[o]);
      if (pi > 0.0) div += pi * (log_pi[o] - log_q[o]);
    }
    for (int64_t o = 0; o < outcomes; ++o) {
      const double pi = std::exp(log_pi[o]);
      coef[o] = pi > 0.0 ? pi * (log_pi[o] - log_q[o] - div) : 0.0;
    }
    r.div = div;
    r.per_p = std::exp(log_pi[tail]) > 0.0 ? log_pi[tail] - log_q[tail] - div : 0.0;
  } else if (DIV == FORWARD_KL) {
    double div = 0.0, q_total = 0.0;
    for (int64_t o = 0; o < outcomes; ++o) {
      const double q = std::exp(log_q[o]);
      q_total += q;
      if (q > 0.0) div += q * (log_q[o] - log_pi[o]);
    }
    for (int64_t o = 0; o < outcomes; ++o) coef[o] = std::exp(log_pi[o]) * q_total - std::exp(log_q[o]);
    r.div = div;
    r.per_p = q_total;
    r.per_ratio = std::exp(log_q[tail]);
  } else {
    const double log_1m_beta = std::log1p(-beta), log_beta = std::log(beta);
    double kl_pm = 0.0, kl_qm = 0.0;
    for (int64_t o = 0; o < outcomes; ++o) {
      const double pi = std::exp(log_pi[o]), q = std::exp(log_q[o]);
      const double log_m = logaddexp(log_pi[o] + log_1m_beta, log_q[o] + log_beta);
      coef[o] = pi > 0.0 ? log_pi[o] - log_m : 0.0;  // rho, turned into the coefficient below
      if (pi > 0.0) kl_pm += pi * coef[o];
      if (q > 0.0) kl_qm += q * (log_q[o] - log_m);
    }
    const double rho_tail = coef[tail];
    for (int64_t o = 0; o < outcomes; ++o) {
      const double pi = std::exp(log_pi[o]);
      coef[o] = pi > 0.0 ? (1.0 - beta) * pi * (coef[o] - kl_pm) : 0.0;
    }
    r.div = beta * kl_qm + (1.0 - beta) * kl_pm;
    r.per_p = std::exp(log_pi[tail]) > 0.0 ? (1.0 - beta) * (rho_tail - kl_pm) : 0.0;
  }
  return r;
}

struct RowParams {
  int64_t vocab, k, target;
  double beta, tail_eps;
  float inv_temp, grad_scale;
  int tail;
  bool want_entropy, need_normaliser;
  LogitTransform map;  // the student logits' map (soft cap, scale)
};

// Per-thread scratch: the cached exponentials (one float row), each block's shift, and the
// row-level double arrays (z over S, outcome log-probabilities, coefficients); with a soft-capped
// student (`with_derivative`), the map's derivative per column (a float row) and at S.
struct Scratch {
  std::vector<float> cache;
  std::vector<float> shift;
  std::vector<double> z_k, log_pi, log_q, coef;
  std::vector<float> derivative, derivative_k;
  Scratch(int64_t vocab, int64_t k, bool with_derivative)
      : cache(static_cast<size_t>(vocab)),
        shift(static_cast<size_t>((vocab + BLOCK - 1) / BLOCK)),
        z_k(static_cast<size_t>(k)),
        log_pi(static_cast<size_t>(k + 1)),
        log_q(static_cast<size_t>(k + 1)),
        coef(static_cast<size_t>(k + 1)),
        derivative(with_derivative ? static_cast<size_t>(vocab) : 0),
        derivative_k(with_derivative ? static_cast<size_t>(k) : 0) {}
};

// Work is done in base-2 units of the raw logits x: with c = log2(e) / temperature,
// exp(z - max z) = 2^(x c - m2) where m2 = fl(max x * c) is the running shift (a float, so every
// later use of it is exact); one FMA per element gives the exponent.
template <int SD, int DIV>
void process_row(const typename Storage<SD>::type* s, typename Storage<SD>::type* grad, const int32_t* ids,
                 const float* logq, const RowParams& prm, Scratch& scratch, RowOut& out) {
  const int64_t vocab = prm.vocab;
  const float inv_temp = prm.inv_temp;
  const float c = inv_temp * LOG2E;
  const LogitTransform& map = prm.map;
  // the map's derivative per column and at S (soft cap and a gradient only; a scale alone is a constant)
  float* derivative = grad != nullptr && map.cap != 0.f ? scratch.derivative.data() : nullptr;
  float* derivative_k = derivative ? scratch.derivative_k.data() : nullptr;
  int64_t k_valid = 0;
  while (k_valid < prm.k && ids[k_valid] < vocab) ++k_valid;  // sorted, padding last

  // ---- the top-k columns, read before any gradient is written (it may alias the logits) ----
  double* z_k = scratch.z_k.data();
  double lse_k = NEG_INF_D;
  {
    double max_k = NEG_INF_D;
    bool has_nan = false;
    for (int64_t j = 0; j < k_valid; ++j) {
      float x = load_one<SD>(s, ids[j]);
      if (derivative_k) derivative_k[j] = map.derivative(x);
      if (map.active) x = map.apply(x);
      z_k[j] = static_cast<double>(x) * inv_temp;
      if (std::isnan(z_k[j])) has_nan = true;  // reported as a NaN divergence, never hidden
      else max_k = std::max(max_k, z_k[j]);
    }
    if (has_nan) {
      lse_k = NAN;
    } else if (max_k != NEG_INF_D) {
      double sum = 0.0;
      for (int64_t j = 0; j < k_valid; ++j) sum += std::exp(z_k[j] - max_k);
      lse_k = max_k + std::log(sum);
    }
  }
  float target_logit = 0.f;
  if (prm.target >= 0) target_logit = load_one<SD>(s, prm.target);
  if (prm.target >= 0 && map.active) target_logit = map.apply(target_logit);

  // ---- pass 1: softmax statistics of the complement of S ----
  const bool stream = prm.tail == BUCKET || prm.need_normaliser;
  float m_s = NEG_INF, m2 = 0.f, l = 0.f, acc_ent = 0.f;
  float* cache = scratch.cache.data();
  float* block_shift = scratch.shift.data();  // m2 of the block, NaN while the row was all -inf
  if (stream) {
    alignas(64) float buf[BLOCK];
    int64_t next = 0;  // first top-k id not yet passed
    for (int64_t v0 = 0; v0 < vocab; v0 += BLOCK) {
      const int64_t n = std::min(BLOCK, vocab - v0);
      const float* xs = block_as_float<SD>(s + v0, buf, n);
      if (map.active) {  // the logit map, applied to the block as it is read (S columns included)
        map.apply_block(xs, buf, derivative ? derivative + v0 : nullptr, n);
        xs = buf;
      }
      if (next < k_valid && ids[next] < v0 + n) {
        if (xs != buf) {
          std::memcpy(buf, xs, n * sizeof(float));
          xs = buf;
        }
        for (; next < k_valid && ids[next] < v0 + n; ++next) buf[ids[next] - v0] = NEG_INF;
      }
      const float new_m = std::max(m_s, block_max(xs, n));
      if (new_m != m_s && new_m != NEG_INF) {
        const float new_m2 = new_m * c;
        if (m_s != NEG_INF) {
          const float gap = m2 - new_m2;  // <= 0
          const float scale = std::exp2(gap);
          acc_ent = scale * (acc_ent + gap * l);
          l *= scale;
        }
        m_s = new_m;
        m2 = new_m2;
      }
      block_shift[v0 / BLOCK] = m_s == NEG_INF ? NAN : m2;
      const BlockSums sums =
          prm.want_entropy ? block_sums<true>(xs, n, c, m2, cache + v0) : block_sums<false>(xs, n, c, m2, cache + v0);
      l += sums.sum;
      acc_ent += sums.ent;
    }
  }
  const double shift_z = static_cast<double>(m2) * LN2;  // the final shift in z units
  const double lse_c = l > 0.f ? shift_z + std::log(static_cast<double>(l)) : (std::isnan(l) ? NAN : NEG_INF_D);
  const double L = stream ? (std::isnan(lse_c) || std::isnan(lse_k) ? NAN : logaddexp(lse_c, lse_k)) : 0.0;

  // ---- the outcomes: S (and the tail), as log-probabilities on both sides ----
  double* log_pi = scratch.log_pi.data();
  double* log_q = scratch.log_q.data();
  double* coef = scratch.coef.data();
  const int64_t outcomes = k_valid + 1;
  if (prm.tail == BUCKET) {
    double q_sum = 0.0;
    for (int64_t j = 0; j < k_valid; ++j) {
      log_pi[j] = z_k[j] - L;
      log_q[j] = logq[j];
      q_sum += std::exp(static_cast<double>(logq[j]));
    }
    const bool has_tail = k_valid < vocab;
    log_pi[k_valid] = lse_c - L;
    log_q[k_valid] = has_tail ? std::log(std::max(1.0 - q_sum, prm.tail_eps)) : NEG_INF_D;
  } else {
    double max_q = NEG_INF_D;
    for (int64_t j = 0; j < k_valid; ++j) max_q = std::max(max_q, static_cast<double>(logq[j]));
    double sum_q = 0.0;
    for (int64_t j = 0; j < k_valid; ++j) sum_q += std::exp(logq[j] - max_q);
    const double lse_q = max_q == NEG_INF_D ? 0.0 : max_q + std::log(sum_q);
    const double lse_pi = lse_k == NEG_INF_D ? 0.0 : lse_k;
    for (int64_t j = 0; j < k_valid; ++j) {
      log_pi[j] = z_k[j] - lse_pi;
      log_q[j] = logq[j] - lse_q;
    }
    log_pi[k_valid] = NEG_INF_D;
    log_q[k_valid] = NEG_INF_D;
  }
  const Terms terms = sparse_terms<DIV>(log_pi, log_q, outcomes, prm.beta, coef);
  // a NaN logit the divergence depends on is reported, never hidden by the pi > 0 tests
  const bool nan_row = std::isnan(lse_k) || (prm.tail == BUCKET && std::isnan(L));
  out.div = nan_row ? NAN : static_cast<float>(terms.div);

  // ---- statistics: entropy of the full student distribution, sampled-token log-probs ----
  if (prm.want_entropy) {
    double ent = 0.0;
    for (int64_t j = 0; j < k_valid; ++j) {
      const double log_p = z_k[j] - L;
      const double p = std::exp(log_p);
      if (p > 0.0) ent -= p * log_p;
    }
    if (l > 0.f) ent -= std::exp(shift_z - L) * (LN2 * acc_ent + (shift_z - L) * static_cast<double>(l));
    out.entropy = static_cast<float>(ent);
  }
  if (prm.target >= 0) {
    const int32_t* hit = std::lower_bound(ids, ids + k_valid, static_cast<int32_t>(prm.target));
    const bool found = hit != ids + k_valid && *hit == prm.target;
    out.logp_target = static_cast<float>(static_cast<double>(target_logit) * inv_temp - L);
    out.logq_target = found ? logq[hit - ids] : NAN;
  }

  if (grad == nullptr) return;
  // ---- last pass: grad_scale * d div / d x, in the student's dtype ----
  const double to_x = static_cast<double>(inv_temp) * prm.grad_scale;  // d/dx = (1/temperature) d/dz
  if (prm.tail == BUCKET) {
    // complement column v: p_v per_p - (p_v / P_tail) per_ratio, with p_v = cache_v 2^(shift_b - m2)
    // exp(shift_z - L) and p_v / P_tail = cache_v 2^(shift_b - m2) / l (bounded when P_tail underflows)
    double row_factor = 0.0;
    if (l > 0.f) {
      row_factor = (std::exp(shift_z - L) * terms.per_p - terms.per_ratio / static_cast<double>(l)) * to_x;
    }
    alignas(64) float g_buf[BLOCK];
    for (int64_t v0 = 0; v0 < vocab; v0 += BLOCK) {
      const int64_t n = std::min(BLOCK, vocab - v0);
      const float block_shift_b = block_shift[v0 / BLOCK];
      const float factor =
          std::isnan(block_shift_b) ? 0.f : static_cast<float>(row_factor * std::exp2(block_shift_b - m2));
      const float* first = cache + v0;
      float* g = block_for_float<SD>(grad + v0, g_buf);
#pragma omp simd
      // a select, not a plain product: an infinite divergence makes the factor infinite, and
      // 0 * inf must stay 0 (the top-k columns, and -inf logits, have a cached 0)
      for (int64_t i = 0; i < n; ++i) g[i] = first[i] > 0.f ? first[i] * factor : 0.f;
      if (map.active) map.times_derivative(g, derivative ? derivative + v0 : nullptr, n);  // chain rule
      store_block_from_float<SD>(g, grad + v0, n);
    }
  } else {
    zero_fill<SD>(grad, vocab);
  }
  for (int64_t j = 0; j < k_valid; ++j) {
    float g = static_cast<float>(coef[j] * to_x);
    if (map.active) g *= derivative_k ? derivative_k[j] : map.scale;
    store_one<SD>(grad, ids[j], g);
  }
}

struct Args {
  int64_t student, grad, ids, logq, keep, target, grad_scale;
  int64_t rows_b, rows_t, s_sb, s_st, g_sb, g_st, vocab, k;
  int divergence, tail;
  double beta, tail_eps;
  float inv_temp;
  int64_t out_div, out_ent, out_logp, out_logq;
  bool need_normaliser;
  int num_threads;
  double student_scale, student_cap;  // the student logits' map (cap 0: none)
};

template <int SD, int DIV>
void run_rows(const Args& a) {
  using S = typename Storage<SD>::type;
  const S* student = reinterpret_cast<const S*>(a.student);
  S* grad = reinterpret_cast<S*>(a.grad);
  const int32_t* ids = reinterpret_cast<const int32_t*>(a.ids);
  const float* logq = reinterpret_cast<const float*>(a.logq);
  const RowsPlan rows(a);
  const LogitTransform map(a.student_scale, a.student_cap);

#pragma omp parallel num_threads(a.num_threads)
  {
    Scratch scratch(a.vocab, a.k, grad != nullptr && map.cap != 0.f);
#pragma omp for schedule(dynamic, rows.chunk) nowait
    for (int64_t k = 0; k < rows.n_kept; ++k) {
      const int64_t row = rows.order[k];
      const int64_t b = row / a.rows_t, t = row % a.rows_t;
      RowParams prm{a.vocab, a.k, rows.target ? rows.target[row] : -1, a.beta, a.tail_eps, a.inv_temp,
                    rows.grad_scale ? rows.grad_scale[row] : 1.f, a.tail, rows.out_ent != nullptr, a.need_normaliser,
                    map};
      RowOut out;
      process_row<SD, DIV>(student + b * a.s_sb + t * a.s_st, grad ? grad + b * a.g_sb + t * a.g_st : nullptr,
                           ids + row * a.k, logq + row * a.k, prm, scratch, out);
      rows.store(row, out);
    }
    rows.run_dropped<SD>(grad, a.vocab);
  }
}

void topk_turn_kl_forward(int64_t student, int student_dtype, int64_t grad, int64_t ids, int64_t logq, int64_t keep,
                          int64_t target, int64_t grad_scale, int64_t rows_b, int64_t rows_t, int64_t s_sb,
                          int64_t s_st, int64_t g_sb, int64_t g_st, int64_t vocab, int64_t k, int divergence,
                          double beta, int tail, double tail_eps, double inv_temp, int64_t out_div, int64_t out_ent,
                          int64_t out_logp, int64_t out_logq, bool need_normaliser, int num_threads,
                          double student_scale, double student_cap) {
  if (tail != BUCKET && tail != RENORMALIZE) throw std::invalid_argument("tail code must be 0 (bucket) or 1 (renormalize)");
  Args a{student, grad, ids, logq, keep, target, grad_scale, rows_b, rows_t, s_sb, s_st, g_sb, g_st, vocab, k,
         divergence, tail, beta, tail_eps, static_cast<float>(inv_temp), out_div, out_ent, out_logp, out_logq,
         need_normaliser, std::max(1, num_threads), student_scale, student_cap};
  py::gil_scoped_release release;
  with_dtype(student_dtype, "student", [&](auto sd) {
    with_divergence(divergence, [&](auto div) { run_rows<decltype(sd)::value, decltype(div)::value>(a); });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tcod-fast native CPU kernel: divergence to a sparse (top-k) teacher";
  m.def("topk_turn_kl_forward", &topk_turn_kl_forward,
        "Divergence/entropy/gradient of rows of student logits against top-k teacher log-probs (raw pointers).");
}
