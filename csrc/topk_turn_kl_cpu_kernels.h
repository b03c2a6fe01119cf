// The CPU kernels of topk_turn_kl_cpu.cpp, compiled once per instruction-set copy (see cpu_isa.h
// and turn_kl_cpu_kernels.h, built the same way). Deliberately without include guard or includes:
// each copy includes it inside a namespace of its own, after TopkTurnKLArgs is defined.
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

// Pass 1 over one block: 2^((x - A) c) into the cache, with its sum and (ENTROPY) the sum of
// 2^t t. The vector loop runs two vectors per iteration (two independent exponential chains);
// the scalar loop after it handles the tail.
template <bool ENTROPY>
inline BlockSums block_sums(const float* xs, int64_t n, float c, float anchor, float* first) {
  const vf floor = splat(EXP2_FLOOR);
  vf s0 = {}, s1 = {}, e0 = {}, e1 = {};
  int64_t i = 0;
  for (; i + 2 * LANES <= n; i += 2 * LANES) {
    __builtin_prefetch(xs + i + 256);  // 1 KiB ahead
    // x - A <= 0 in raw units first, then the scale (see process_row: never one FMA x c - A c)
    const vf t0 = vmax_keep_nan(floor, (vload(xs + i) - anchor) * c);
    const vf t1 = vmax_keep_nan(floor, (vload(xs + i + LANES) - anchor) * c);
    const vf x0 = vexp2(t0), x1 = vexp2(t1);
    vstore(first + i, x0);
    vstore(first + i + LANES, x1);
    s0 += x0;
    s1 += x1;
    if (ENTROPY) {  // t is finite (clamped), so the product is 0 where the exponential is
      e0 += x0 * t0;
      e1 += x1 * t1;
    }
  }
  float sum = hsum(s0 + s1), ent = hsum(e0 + e1);
  for (; i < n; ++i) {
    const float t = clamp_exp2_arg((xs[i] - anchor) * c);
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
  double inv_temp;  // 1 / temperature: in double, since z = x / temperature may be ~1e11
  float grad_scale;
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

// Units and anchors (as in turn_kl_cpu_kernels.h): with c = log2(e) / temperature, the cached
// exponentials are 2^((x - A) c) = exp(z - A / temperature), A the running max of the raw logits
// of the complement. The difference x - A is taken in raw units before scaling: it is <= 0, exact
// near the max (Sterbenz), and never rounds away the gap between two large logits, so the result
// is exact at any logit scale and temperature. (One FMA x c - fl(A c) is off by up to half an ulp
// of A c: with logits ~1e4 at temperature 1e-6, A c ~ 1.4e10, whose ulp is 2048, i.e. the exponent
// is wrong by up to 1024.) The block anchors and the final A are raw logits; A / temperature is
// formed in double only where the row's normaliser needs it.
template <int SD, int DIV>
void process_row(const typename Storage<SD>::type* s, typename Storage<SD>::type* grad, const int32_t* ids,
                 const float* logq, const RowParams& prm, Scratch& scratch, RowOut& out) {
  const int64_t vocab = prm.vocab;
  const double inv_temp = prm.inv_temp;
  const float c = static_cast<float>(inv_temp * 1.44269504088896340736);
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
  float m_s = NEG_INF, anchor = 0.f, l = 0.f, acc_ent = 0.f;  // anchor: 0 while the max is -inf
  float* cache = scratch.cache.data();
  float* block_shift = scratch.shift.data();  // the anchor of the block, NaN while the row was all -inf
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
        if (m_s != NEG_INF) {
          const float gap = (anchor - new_m) * c;  // < 0
          const float scale = std::exp2(gap);
          if (scale > 0.f) {
            acc_ent = scale * (acc_ent + gap * l);
            l *= scale;
          } else {  // everything so far is below float32's range next to the new max
            acc_ent = 0.f;
            l = 0.f;
          }
        }
        m_s = new_m;
        anchor = new_m;
      }
      block_shift[v0 / BLOCK] = m_s == NEG_INF ? NAN : anchor;
      const BlockSums sums = prm.want_entropy ? block_sums<true>(xs, n, c, anchor, cache + v0)
                                              : block_sums<false>(xs, n, c, anchor, cache + v0);
      l += sums.sum;
      acc_ent += sums.ent;
    }
  }
  const double shift_z = static_cast<double>(anchor) * inv_temp;  // the final anchor in z units
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
    // complement column v: p_v per_p - (p_v / P_tail) per_ratio, with p_v = cache_v 2^((A_b - A) c)
    // exp(shift_z - L) and p_v / P_tail = cache_v 2^((A_b - A) c) / l (bounded when P_tail underflows)
    double row_factor = 0.0;
    if (l > 0.f) {
      row_factor = (std::exp(shift_z - L) * terms.per_p - terms.per_ratio / static_cast<double>(l)) * to_x;
    }
    alignas(64) float g_buf[BLOCK];
    // float32 gradients are written with streaming stores (the logit map's chain rule reads them back)
    const bool stream_grad = SD == F32 && !map.active && can_stream(grad);
    for (int64_t v0 = 0; v0 < vocab; v0 += BLOCK) {
      const int64_t n = std::min(BLOCK, vocab - v0);
      const float block_shift_b = block_shift[v0 / BLOCK];
      const float factor =
          std::isnan(block_shift_b) ? 0.f : static_cast<float>(row_factor * std::exp2((block_shift_b - anchor) * c));
      const float* first = cache + v0;
      float* g = block_for_float<SD>(grad + v0, g_buf);
      // a select, not a plain product: an infinite divergence makes the factor infinite, and
      // 0 * inf must stay 0 (the top-k columns, and -inf logits, have a cached 0)
      int64_t i = 0;
      for (; i + LANES <= n; i += LANES) {
        const vf e = vload(first + i);
        vput(g + i, e > 0.f ? e * factor : vf{}, stream_grad);
      }
      for (; i < n; ++i) g[i] = first[i] > 0.f ? first[i] * factor : 0.f;
      if (map.active) map.times_derivative(g, derivative ? derivative + v0 : nullptr, n);  // chain rule
      store_block_from_float<SD>(g, grad + v0, n);
    }
    if (stream_grad) stream_fence();
  } else {
    zero_fill<SD>(grad, vocab);
  }
  for (int64_t j = 0; j < k_valid; ++j) {
    float g = static_cast<float>(coef[j] * to_x);
    if (map.active) g *= derivative_k ? derivative_k[j] : map.scale;
    store_one<SD>(grad, ids[j], g);
  }
}

template <int SD, int DIV>
void run_rows(const TopkTurnKLArgs& a) {
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

void topk_turn_kl_forward(const TopkTurnKLArgs& a) {
  with_dtype(a.student_dtype, "student", [&](auto sd) {
    with_divergence(a.divergence, [&](auto div) { run_rows<decltype(sd)::value, decltype(div)::value>(a); });
  });
}
