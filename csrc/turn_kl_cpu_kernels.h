// The CPU kernels of turn_kl_cpu.cpp, compiled once per instruction-set copy (cpu_kernel_copy.h:
// portable, AVX2 + FMA + F16C, the 16-lane logic on AVX2, AVX-512). Deliberately without include
// guard or includes: each copy includes it inside a namespace of its own, under its own
// `#pragma GCC target` and TCOD_FAST_LANES (see cpu_kernel_common.h), after TurnKLArgs (the
// arguments from Python, one struct that every copy reads) is defined.
//
// The vector loops are written once on the width-generic vector type vf; the scalar loops after
// them handle the block tails. The helpers it shares with topk_turn_kl_cpu.cpp (dtype and
// divergence codes, vector primitives, 16-bit conversions, the exp2 polynomial, the block max,
// the row plan) come from cpu_kernel_common.h.
#include "cpu_kernel_common.h"

constexpr float POS_INF = std::numeric_limits<float>::infinity();

// 2^x for x <= 0 (or NaN, which stays NaN).
inline float exp2_nonpositive(float x) { return exp2_clamped(clamp_exp2_arg(x)); }

// log(x) for x in [1, 2] (used as log1p of a value in [0, 1]); Cephes logf polynomial.
inline float log_1_to_2(float x) {
  // write x = 2^e * m with m in [sqrt(1/2), sqrt(2))
  const bool big = x > 1.41421356237f;
  const float m = big ? x * 0.5f : x;
  const float e = big ? 1.0f : 0.0f;
  const float f = m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return f + y + 0.693359375f * e;
}

template <int D>
inline void nan_fill(typename Storage<D>::type* dst, int64_t n) {
  if constexpr (D == F32) {
    std::fill(dst, dst + n, std::numeric_limits<float>::quiet_NaN());
  } else {
    std::fill(dst, dst + n, static_cast<uint16_t>(D == BF16 ? 0x7fc0u : 0x7e00u));  // quiet NaN bits
  }
}

// Per-element JSD pieces: log m = logaddexp(log p + log(1-b), log q + log b).
inline float log_mixture(float log_p, float log_q, float log_1m_beta, float log_beta) {
  const float a = log_p + log_1m_beta;
  const float b = log_q + log_beta;
  const float hi = std::max(a, b);
  const float lo = std::min(a, b);
  return hi + log_1_to_2(1.0f + exp2_nonpositive((lo - hi) * LOG2E));
}

// Scratch a thread needs for one row: two float32 rows of V cached by pass 1 and, per block,
// the anchors its cached values are relative to (see process_row), so the last pass never
// evaluates exp and (reverse and forward KL) never re-reads the logits:
//   reverse KL  first = 2^((x_s - A) c),  second = u = (x_s - A) - (x_t - B)
//   forward KL  first = 2^((x_s - A) c),  second = 2^((x_t - A_t) c)
//   JSD         as forward KL; pass 2 then overwrites second with log p - log m
// and, with a soft-capped student (`with_derivative`), a third row: the derivative of the
// student's logit map at each raw logit, for the last pass's chain rule.
inline int64_t scratch_floats(int64_t vocab, bool with_derivative) {
  const int64_t blocks = (vocab + BLOCK - 1) / BLOCK;
  return (with_derivative ? 3 : 2) * vocab + 3 * blocks;
}

// index of the first x[i] == value in x[0..n) (value is the block's max, so it is there)
inline int64_t first_index_of(const float* x, int64_t n, float value) {
  for (int64_t i = 0; i < n; ++i) {
    if (x[i] == value) return i;
  }
  return 0;
}

struct BlockSums {
  float s = 0.f, t = 0.f, div = 0.f, ent = 0.f;
};

// The anchors of pass 1 (raw logit units): every cached value and accumulator is relative to
// them. `s` is the student's running max, `t` the teacher's, `div` the teacher's logit at the
// student's running argmax (reverse KL centres its log-ratio there, see process_row).
struct BlockAnchors {
  float s, t, div;
};

// Pass 1's vector loop over one block, two vectors per iteration, i.e. two independent
// exponential chains (one chain leaves the polynomial's latency exposed on some cores). Same
// arithmetic as the scalar loop in block_sums and the same cache layout; returns how many leading
// elements it handled (a multiple of 2 * LANES).
template <int DIV, bool ENTROPY, bool SHARED_ANCHOR>
inline int64_t block_sums_vec(const float* xs, const float* xt, int64_t n, float c, BlockAnchors anchor,
                              float* first, float* second, BlockSums& sums) {
  const vf floor = splat(EXP2_FLOOR);
  // one accumulator per sum (two chains of exponentials feed each): with two per sum the 16
  // ymm registers of AVX2 overflow and the accumulators round-trip through the stack
  vf sum_s = {}, sum_t = {}, sum_div = {}, e0 = {}, e1 = {};
  int64_t i = 0;
  for (; i + 2 * LANES <= n; i += 2 * LANES) {
    // 1 KiB ahead: the hardware prefetcher alone leaves this compute-heavy stream waiting on
    // DRAM (measured with 8 lanes: pass 1 at N=512, V=151936, 2 threads, 0.085 s -> 0.073 s)
    __builtin_prefetch(xs + i + 256);
    __builtin_prefetch(xt + i + 256);
    const vf xs0 = vload(xs + i), xs1 = vload(xs + i + LANES);
    const vf xt0 = vload(xt + i), xt1 = vload(xt + i + LANES);
    // x - anchor <= 0 in raw units first, then the scale: see process_row for why not one FMA
    const vf as0 = xs0 - anchor.s, as1 = xs1 - anchor.s;
    const vf at0 = xt0 - anchor.t, at1 = xt1 - anchor.t;
    const vf ts0 = vmax_keep_nan(floor, as0 * c), ts1 = vmax_keep_nan(floor, as1 * c);
    const vf tt0 = vmax_keep_nan(floor, at0 * c), tt1 = vmax_keep_nan(floor, at1 * c);
    const vf es0 = vexp2(ts0), es1 = vexp2(ts1);
    const vf et0 = vexp2(tt0), et1 = vexp2(tt1);
    vstore(first + i, es0);
    vstore(first + i + LANES, es1);
    sum_s += es0 + es1;
    sum_t += et0 + et1;
    if (ENTROPY) {
      e0 += es0 * ts0;
      e1 += es1 * ts1;
    }
    // The divergence term is a plain product: where the weight is 0 the term should be 0, but
    // the logit difference may be inf or nan there (-inf logits), which makes the block's sum
    // non-finite; that is checked once below instead of masking every element (a compare and
    // an and per vector, ~7% of this loop on Zen 1).
    if (DIV == REVERSE_KL) {
      // SHARED_ANCHOR: the teacher's exponentials are anchored at B too, so x_t - B is at
      const vf u0 = as0 - (SHARED_ANCHOR ? at0 : xt0 - anchor.div);
      const vf u1 = as1 - (SHARED_ANCHOR ? at1 : xt1 - anchor.div);
      vstore(second + i, u0);
      vstore(second + i + LANES, u1);
      sum_div += es0 * u0 + es1 * u1;
    } else {
      vstore(second + i, et0);
      vstore(second + i + LANES, et1);
      if (DIV == FORWARD_KL) sum_div += et0 * (at0 - as0) + et1 * (at1 - as1);
    }
  }
  sums.s = hsum(sum_s);
  sums.t = hsum(sum_t);
  sums.div = hsum(sum_div);
  sums.ent = hsum(e0 + e1);
  if (!std::isfinite(sums.div)) {
    // non-finite logits in this block: redo the sum with the weight > 0 mask, which gives
    // exactly the scalar loop's answer (+inf where the other model has -inf under the
    // weight's mass, nan for nan logits, finite for -inf entries on both sides)
    float masked = 0.f;
    for (int64_t k = 0; k < i; ++k) {
      if (DIV == REVERSE_KL) masked += first[k] > 0.f ? first[k] * second[k] : 0.f;
      if (DIV == FORWARD_KL) {
        masked += second[k] > 0.f ? second[k] * ((xt[k] - anchor.t) - (xs[k] - anchor.s)) : 0.f;
      }
    }
    sums.div = masked;
  }
  return i;
}

// Pass 1 over one block: both exponentials, their sums, the divergence and (ENTROPY) entropy
// sums, and the cache the last pass reads (see scratch_floats); the vector loop, then the tail.
template <int DIV, bool ENTROPY, bool SHARED_ANCHOR>
inline BlockSums block_sums(const float* xs, const float* xt, int64_t n, float c, BlockAnchors anchor, float* first,
                            float* second) {
  BlockSums head;
  const int64_t start = block_sums_vec<DIV, ENTROPY, SHARED_ANCHOR>(xs, xt, n, c, anchor, first, second, head);
  float sum_s = head.s, sum_t = head.t, sum_div = head.div, sum_ent = head.ent;
  for (int64_t i = start; i < n; ++i) {
    const float as = xs[i] - anchor.s;  // <= 0 (or -inf, or nan)
    const float at = xt[i] - anchor.t;
    const float ts = clamp_exp2_arg(as * c);
    const float tt = clamp_exp2_arg(at * c);
    const float es = exp2_clamped(ts);
    const float et = exp2_clamped(tt);
    first[i] = es;
    sum_s += es;
    sum_t += et;
    if (ENTROPY) sum_ent += es * ts;  // ts is finite (clamped), so 0 where es == 0
    // selects, not branches: where the weight is 0 the difference may be nan or inf
    if (DIV == REVERSE_KL) {
      const float u = as - (SHARED_ANCHOR ? at : xt[i] - anchor.div);
      second[i] = u;
      sum_div += es > 0.f ? es * u : 0.f;
    } else {
      second[i] = et;
      if (DIV == FORWARD_KL) sum_div += et > 0.f ? et * (at - as) : 0.f;
    }
  }
  return BlockSums{sum_s, sum_t, sum_div, sum_ent};
}

// Units and anchors. With z = x / temperature and c = log2(e) / temperature, the exponentials
// are 2^((x - A) c) = exp(z - A / temperature), where the anchor A is the running max of the
// raw logits x. The difference x - A is taken in raw units *before* scaling: it is <= 0, exact
// near the max (Sterbenz), and never rounds away the gap between two large logits, so the
// exponent argument is always in the polynomial's range (<= 0) whatever the logits' scale or
// the temperature. (One FMA x * c - fl(A * c), the obvious alternative, is off by up to half an
// ulp of A * c: at |A / temperature| ~ 1e7 that is several units in the exponent, and beyond
// ~1e9 it overflows it.) All sums are kept relative to the anchors and rescaled when they move:
//   l   = sum 2^t                 t = (x - A) c clamped at -127 (t of -inf is -127, 2^t = 0)
//   ent = sum 2^t_s t_s            (entropy = log l_s - ln2 ent / l_s)
//   div = sum 2^t_s u              u = (x_s - A_s) - (x_t - B)                   (reverse)
//       = sum 2^t_t ((x_t - A_t) - (x_s - A_s))                                   (forward)
// Reverse KL centres on B, the teacher's logit at the student's argmax a: then u_a = 0 exactly,
//   KL = (mean_p(u) + A_t - B) / temperature + log l_t - log l_s
// and the gradient p_v (u_v - mean_p(u)) / temperature is exact at a too, where p_a ~ 1 and the
// two terms would otherwise cancel. In the one-hot limit (logits 1e14 apart after scaling) this
// is the exact answer: mean_p(u) = 0, KL = (A_t - x_t[a]) / temperature + ~0, gradient 0.
// Forward KL and JSD gradients, p - q and p (log p - log m - KL(p||m)), cancel at a in the same
// limit; there the last pass sets g_a = -sum_{v != a} g_v (every gradient here sums to 0 over
// the vocabulary) when p_a > 1/2, i.e. when that is the more accurate of the two.
// g[i] = vec(i) LANES floats at a time (two vectors per step), scalar(i) for the tail, each
// value also added to `sum_g` (vector lanes summed once, then the tail in order).
template <class Vec, class Scalar>
inline void store_and_sum(float* g, int64_t n, bool stream, float& sum_g, Vec vec, Scalar scalar) {
  vf acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 2 * LANES <= n; i += 2 * LANES) {
    const vf g0 = vec(i);
    const vf g1 = vec(i + LANES);
    vput(g + i, g0, stream);
    vput(g + i + LANES, g1, stream);
    acc0 += g0;
    acc1 += g1;
  }
  sum_g += hsum(acc0 + acc1);
  for (; i < n; ++i) {
    const float gi = scalar(i);
    g[i] = gi;
    sum_g += gi;
  }
}

template <int SD, int TD, int DIV>
void process_row(const typename Storage<SD>::type* s, const typename Storage<TD>::type* t,
                 typename Storage<SD>::type* grad, int64_t vocab, int64_t grad_cols, int64_t target,
                 float beta, double inv_temp_d, float grad_scale, bool want_entropy, const LogitTransform& map_s,
                 const LogitTransform& map_t, float* scratch, RowOut& out) {
  alignas(64) float buf_s[BLOCK];
  alignas(64) float buf_t[BLOCK];
  const int64_t blocks = (vocab + BLOCK - 1) / BLOCK;
  float* first_row = scratch;
  float* second_row = scratch + vocab;
  float* block_anchor_s = scratch + 2 * vocab;  // A of the block, NaN while the row was all -inf
  float* block_anchor_t = block_anchor_s + blocks;
  float* block_anchor_div = block_anchor_t + blocks;
  // the student map's derivative per column (soft cap and a gradient only; a scale alone is a constant)
  float* derivative_row = grad != nullptr && map_s.cap != 0.f ? block_anchor_div + blocks : nullptr;
  const float inv_temp = static_cast<float>(inv_temp_d);
  const float c = static_cast<float>(inv_temp_d * 1.44269504088896340736);

  // running maxima; anchors (0 while the max is -inf, so -inf - anchor is -inf, never nan)
  float max_s = NEG_INF, max_t = NEG_INF;
  BlockAnchors anchor{0.f, 0.f, 0.f};
  int64_t argmax_s = -1;
  float l_s = 0.f, l_t = 0.f, acc_div = 0.f, acc_ent = 0.f;

  // ---- pass 1: online softmax statistics, one block at a time ----
  for (int64_t v0 = 0; v0 < vocab; v0 += BLOCK) {
    const int64_t n = std::min(BLOCK, vocab - v0);
    const float* xs = block_as_float<SD>(s + v0, buf_s, n);
    const float* xt = block_as_float<TD>(t + v0, buf_t, n);
    if (map_s.active) {  // the logit maps, applied to the block as it is read (into the L1 buffers)
      map_s.apply_block(xs, buf_s, derivative_row ? derivative_row + v0 : nullptr, n);
      xs = buf_s;
    }
    if (map_t.active) {
      map_t.apply_block(xt, buf_t, nullptr, n);
      xt = buf_t;
    }
    const float block_max_s = block_max(xs, n);
    const float block_max_t = block_max(xt, n);
    if (block_max_s > max_s) {  // a new argmax (the first one wins ties)
      const int64_t i = first_index_of(xs, n, block_max_s);
      const float new_div = std::isfinite(xt[i]) ? xt[i] : 0.f;  // teacher -inf at a: KL is +inf anyway
      if (max_s != NEG_INF) {
        const float moved = anchor.s - block_max_s;  // < 0
        const float gap = moved * c;
        const float scale = std::exp2(gap);
        if (scale > 0.f) {
          acc_ent = scale * (acc_ent + gap * l_s);
          if (DIV == REVERSE_KL) acc_div = scale * (acc_div + l_s * (moved - (anchor.div - new_div)));
          l_s *= scale;
        } else {  // everything so far is below float32's range next to the new max
          acc_ent = 0.f;
          if (DIV == REVERSE_KL) acc_div = 0.f;
          l_s = 0.f;
        }
        if (DIV == FORWARD_KL) acc_div -= l_t * moved;
      }
      max_s = block_max_s;
      anchor.s = block_max_s;
      anchor.div = new_div;
      argmax_s = v0 + i;
    }
    if (block_max_t > max_t) {
      if (max_t != NEG_INF) {
        const float moved = anchor.t - block_max_t;
        const float scale = std::exp2(moved * c);
        if (scale > 0.f) {
          if (DIV == FORWARD_KL) acc_div = scale * (acc_div + l_t * moved);
          l_t *= scale;
        } else {
          if (DIV == FORWARD_KL) acc_div = 0.f;
          l_t = 0.f;
        }
      }
      max_t = block_max_t;
      anchor.t = block_max_t;
    }
    if (DIV == REVERSE_KL && max_t != NEG_INF) {
      // The teacher's exponentials only feed l_t, so any anchor at most ~64 binary orders below
      // the teacher's max keeps them exact and in range (2^64 per term at most). Anchoring them
      // at B when it is that close makes x_t - B, which u needs anyway, their argument too:
      // one subtraction per element less in the common case of a teacher near the student.
      const float wanted = (max_t - anchor.div) * c <= 64.f ? anchor.div : max_t;
      if (wanted != anchor.t) {
        l_t *= std::exp2((anchor.t - wanted) * c);  // <= 2^64 by the rule above
        anchor.t = wanted;
      }
    }
    block_anchor_s[v0 / BLOCK] = max_s == NEG_INF ? NAN : anchor.s;
    block_anchor_t[v0 / BLOCK] = max_t == NEG_INF ? NAN : anchor.t;
    block_anchor_div[v0 / BLOCK] = anchor.div;
    float* first = first_row + v0;
    float* second = second_row + v0;

    BlockSums sums;
    const bool shared = DIV == REVERSE_KL && anchor.t == anchor.div;
    if (want_entropy) {
      sums = shared ? block_sums<DIV, true, true>(xs, xt, n, c, anchor, first, second)
                    : block_sums<DIV, true, false>(xs, xt, n, c, anchor, first, second);
    } else {
      sums = shared ? block_sums<DIV, false, true>(xs, xt, n, c, anchor, first, second)
                    : block_sums<DIV, false, false>(xs, xt, n, c, anchor, first, second);
    }
    l_s += sums.s;
    l_t += sums.t;
    acc_div += sums.div;
    acc_ent += sums.ent;
  }

  // log-normalisers relative to the anchors: lse = A / temperature + log l
  const double log_l_s = std::log(static_cast<double>(l_s));
  const double log_l_t = std::log(static_cast<double>(l_t));
  out.entropy = static_cast<float>(log_l_s - LN2 * acc_ent / l_s);
  if (target >= 0) {
    float x_a = load_one<SD>(s, target), xt_a = load_one<TD>(t, target);
    if (map_s.active) x_a = map_s.apply(x_a);
    if (map_t.active) xt_a = map_t.apply(xt_a);
    out.logp_target = static_cast<float>((static_cast<double>(x_a) - anchor.s) * inv_temp_d - log_l_s);
    out.logq_target = static_cast<float>((static_cast<double>(xt_a) - anchor.t) * inv_temp_d - log_l_t);
  }

  float div = 0.f, kl_p_m = 0.f;
  const float mean_u = acc_div / l_s;  // reverse KL: mean of u under p
  const float log_1m_beta = std::log1p(-beta);
  const float log_beta = std::log(beta);
  if (DIV == REVERSE_KL) {
    const double centre_gap = static_cast<double>(anchor.t) - anchor.div;  // teacher anchor - B, >= 0
    div = static_cast<float>(inv_temp_d * (static_cast<double>(mean_u) + centre_gap) + (log_l_t - log_l_s));
  }
  if (DIV == FORWARD_KL) {
    div = static_cast<float>(inv_temp_d * (static_cast<double>(acc_div) / l_t) + (log_l_s - log_l_t));
  }
  if (DIV == JSD) {
    // ---- pass 2 (JSD only): the divergence and KL(p||m) need the final log-normalisers ----
    const float log_l_s_f = static_cast<float>(log_l_s), log_l_t_f = static_cast<float>(log_l_t);
    float sum_q = 0.f, sum_p = 0.f;
    for (int64_t v0 = 0; v0 < vocab; v0 += BLOCK) {
      const int64_t n = std::min(BLOCK, vocab - v0);
      const float* xs = block_as_float<SD>(s + v0, buf_s, n);
      const float* xt = block_as_float<TD>(t + v0, buf_t, n);
      if (map_s.active) {
        map_s.apply_block(xs, buf_s, nullptr, n);
        xs = buf_s;
      }
      if (map_t.active) {
        map_t.apply_block(xt, buf_t, nullptr, n);
        xt = buf_t;
      }
      const float shift_s = block_anchor_s[v0 / BLOCK];
      const float shift_t = block_anchor_t[v0 / BLOCK];
      const float to_p = std::isnan(shift_s) ? 0.f : std::exp2((shift_s - anchor.s) * c) / l_s;
      const float to_q = std::isnan(shift_t) ? 0.f : std::exp2((shift_t - anchor.t) * c) / l_t;
      const float* es = first_row + v0;
      float* et_then_ratio = second_row + v0;  // read as exp(z_t - shift), left as log p - log m
#pragma omp simd reduction(+ : sum_q, sum_p)
      for (int64_t i = 0; i < n; ++i) {
        const float log_p = (xs[i] - anchor.s) * inv_temp - log_l_s_f;
        const float log_q = (xt[i] - anchor.t) * inv_temp - log_l_t_f;
        const float p = es[i] * to_p;
        const float q = et_then_ratio[i] * to_q;
        const float log_m = log_mixture(log_p, log_q, log_1m_beta, log_beta);
        const float log_ratio = log_p - log_m;
        et_then_ratio[i] = log_ratio;  // the gradient's per-element term, so the last pass needs no log
        sum_p += p != 0.f ? p * log_ratio : 0.f;  // != 0: a NaN row stays NaN
        sum_q += q != 0.f ? q * (log_q - log_m) : 0.f;
      }
    }
    kl_p_m = sum_p;
    div = beta * sum_q + (1.f - beta) * sum_p;
  }
  out.div = div;

  if (grad == nullptr) return;
  if (std::isnan(div)) {  // a NaN logit in the row (or an all -inf student row): autograd's answer
    nan_fill<SD>(grad, vocab);
    zero_fill<SD>(grad + vocab, grad_cols - vocab);
    return;
  }
  // ---- last pass: grad_scale * d div / d student_logits, in the student's dtype ----
  // p (and q) come from the cached pass-1 exponentials times 2^((block anchor - final anchor) c) / l.
  alignas(64) float g_buf[BLOCK];
  float sum_g = 0.f, g_at_argmax = 0.f;  // forward KL and JSD: see "Units and anchors"
  // float32 gradients are written with streaming stores (the logit map's chain rule reads them back)
  const bool stream = SD == F32 && !map_s.active && can_stream(grad);
  for (int64_t v0 = 0; v0 < vocab; v0 += BLOCK) {
    const int64_t n = std::min(BLOCK, vocab - v0);
    const float shift_s = block_anchor_s[v0 / BLOCK];
    const float shift_t = block_anchor_t[v0 / BLOCK];
    // d/dx = (1/temperature) d/dz, folded into the per-block factor with the caller's scale
    const float to_p = std::isnan(shift_s) ? 0.f : std::exp2((shift_s - anchor.s) * c) / l_s * inv_temp * grad_scale;
    const float to_q = std::isnan(shift_t) ? 0.f : std::exp2((shift_t - anchor.t) * c) / l_t * inv_temp * grad_scale;
    const float* first = first_row + v0;
    const float* second = second_row + v0;
    float* g = block_for_float<SD>(grad + v0, g_buf);
    if (DIV == REVERSE_KL) {
      // log p - log q - KL = (u_final - mean_u) / temperature, where u relative to the final
      // anchors is u + (A_b - A) - (B_b - B): one FMA per element
      const float offset =
          (((shift_s - anchor.s) - (block_anchor_div[v0 / BLOCK] - anchor.div)) - mean_u) * inv_temp;
      // both operands of the select computed unconditionally: a conditional read of second[i]
      // becomes a masked load, which is slow on some x86 cores. `!= 0`, not `> 0`: grad_scale
      // carries the token's turn weight, which may be negative.
      int64_t i = 0;
      for (; i + LANES <= n; i += LANES) {
        const vf p_scaled = vload(first + i) * to_p;
        const vf centred = vload(second + i) * inv_temp + offset;
        vput(g + i, p_scaled != 0.f ? p_scaled * centred : vf{}, stream);
      }
      for (; i < n; ++i) {
        const float p_scaled = first[i] * to_p;
        const float centred = second[i] * inv_temp + offset;
        g[i] = p_scaled != 0.f ? p_scaled * centred : 0.f;
      }
    } else if (DIV == FORWARD_KL) {
      // g = p - q (scaled) and its sum; explicit vectors: GCC's `omp simd reduction` version of
      // this loop was measured 20% slower per row than the loop without the sum
      store_and_sum(
          g, n, stream, sum_g, [&](int64_t i) { return vload(first + i) * to_p - vload(second + i) * to_q; },
          [&](int64_t i) { return first[i] * to_p - second[i] * to_q; });
    } else {
      // second = log p - log m, left there by pass 2
      const float jsd_scale = 1.f - beta;
      const float jsd_to_p = jsd_scale * to_p;
      store_and_sum(
          g, n, stream, sum_g,
          [&](int64_t i) {
            const vf p = vload(first + i) * jsd_to_p;
            return p != 0.f ? p * (vload(second + i) - kl_p_m) : vf{};
          },
          [&](int64_t i) {
            const float p_scaled = first[i] * jsd_to_p;
            return p_scaled != 0.f ? p_scaled * (second[i] - kl_p_m) : 0.f;
          });
    }
    if (argmax_s >= v0 && argmax_s < v0 + n) g_at_argmax = g[argmax_s - v0];
    // chain rule: d div / d y (above) times the map's dy/dx
    if (map_s.active) map_s.times_derivative(g, derivative_row ? derivative_row + v0 : nullptr, n);
    store_block_from_float<SD>(g, grad + v0, n);
  }
  if (stream) stream_fence();
  if (DIV != REVERSE_KL && argmax_s >= 0 && 2.f * first_row[argmax_s] > l_s && std::isfinite(sum_g)) {
    float g_new = g_at_argmax - sum_g;  // -(sum of the others), w.r.t. the mapped logit
    if (map_s.active) g_new *= derivative_row ? derivative_row[argmax_s] : map_s.scale;
    store_block<SD>(&g_new, grad + argmax_s, 1);
  }
  zero_fill<SD>(grad + vocab, grad_cols - vocab);
}

template <int SD, int TD, int DIV>
void run_rows(const TurnKLArgs& a) {
  using S = typename Storage<SD>::type;
  using Tt = typename Storage<TD>::type;
  const S* student = reinterpret_cast<const S*>(a.student);
  const Tt* teacher = reinterpret_cast<const Tt*>(a.teacher);
  S* grad = reinterpret_cast<S*>(a.grad);
  const RowsPlan rows(a);
  const LogitTransform map_s(a.student_scale, a.student_cap), map_t(a.teacher_scale, a.teacher_cap);
  const bool with_derivative = grad != nullptr && map_s.cap != 0.f;
#pragma omp parallel num_threads(a.num_threads)
  {
    std::vector<float> scratch(static_cast<size_t>(scratch_floats(a.vocab, with_derivative)));
#pragma omp for schedule(dynamic, rows.chunk) nowait
    for (int64_t k = 0; k < rows.n_kept; ++k) {
      const int64_t row = rows.order[k];
      const int64_t b = row / a.rows_t, t = row % a.rows_t;
      S* grad_row = grad ? grad + b * a.g_sb + t * a.g_st : nullptr;
      RowOut out;
      const int64_t tgt = rows.target ? rows.target[row] : -1;
      const float scale = rows.grad_scale ? rows.grad_scale[row] : 1.f;
      process_row<SD, TD, DIV>(student + b * a.s_sb + t * a.s_st, teacher + b * a.t_sb + t * a.t_st, grad_row,
                               a.vocab, a.grad_cols, tgt, a.beta, a.inv_temp, scale, rows.out_ent != nullptr, map_s,
                               map_t, scratch.data(), out);
      rows.store(row, out);
    }
    rows.run_dropped<SD>(grad, a.grad_cols);
  }
}

void turn_kl_forward(const TurnKLArgs& a) {
  with_dtype(a.student_dtype, "student", [&](auto sd) {
    with_dtype(a.teacher_dtype, "teacher", [&](auto td) {
      with_divergence(a.divergence, [&](auto div) {
        run_rows<decltype(sd)::value, decltype(td)::value, decltype(div)::value>(a);
      });
    });
  });
}

// grad[b, t, :] *= factor[b, t] for rows whose factor is not exactly 1 (backward's rescale when
// the upstream gradient differs from the scale the forward pass already applied).
template <int D>
void scale_rows_impl(int64_t grad_ptr, int64_t factor_ptr, int64_t rows_b, int64_t rows_t, int64_t g_sb,
                     int64_t g_st, int64_t cols, int num_threads) {
  using S = typename Storage<D>::type;
  S* grad = reinterpret_cast<S*>(grad_ptr);
  const float* factor = reinterpret_cast<const float*>(factor_ptr);
  const int64_t n_rows = rows_b * rows_t;
#pragma omp parallel num_threads(num_threads)
  {
    alignas(64) float buf[BLOCK];
#pragma omp for schedule(dynamic, 1)
    for (int64_t row = 0; row < n_rows; ++row) {
      const float f = factor[row];
      if (f == 1.f) continue;
      S* g = grad + (row / rows_t) * g_sb + (row % rows_t) * g_st;
      for (int64_t v0 = 0; v0 < cols; v0 += BLOCK) {
        const int64_t n = std::min(BLOCK, cols - v0);
        load_block<D>(g + v0, buf, n, f);
        store_block<D>(buf, g + v0, n);
      }
    }
  }
}

void scale_rows(int64_t grad, int grad_dtype, int64_t factor, int64_t rows_b, int64_t rows_t, int64_t g_sb,
                int64_t g_st, int64_t cols, int num_threads) {
  num_threads = std::max(1, num_threads);
  with_dtype(grad_dtype, "grad", [&](auto d) {
    scale_rows_impl<decltype(d)::value>(grad, factor, rows_b, rows_t, g_sb, g_st, cols, num_threads);
  });
}
