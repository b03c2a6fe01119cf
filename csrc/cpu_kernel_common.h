// What the CPU kernels of turn_kl_cpu.cpp and topk_turn_kl_cpu.cpp share: the option and dtype
// codes (the Python side's tcod_fast/ops/common.py) and their dispatch to template instances,
// the width-generic vector type and its primitives (loads, stores, the branch-free exp2
// polynomial, the 16-bit float conversions, horizontal sums), the vectorised block max, and how
// the rows of a batch are shared among threads (RowsPlan).
//
// Deliberately without include guard or includes, like turn_kl_cpu_kernels.h: it is included
// inside the namespace of each compiled copy of the kernels (cpu_kernel_copy.h), so every copy gets
// these helpers compiled for its own instruction set. The includer provides <algorithm>, <cmath>,
// <cstdint>, <cstring>, <limits>, <stdexcept>, <string>, <type_traits>, <vector> and, on x86-64,
// <immintrin.h>, and defines
//   TCOD_FAST_LANES  the float32 lanes of one vector (vf): 8, or 16 for the AVX-512 logic; the
//                    compiler splits a vector wider than the target's registers (the 16-lane copy
//                    built for AVX2 runs the AVX-512 copy's logic on any AVX2 machine);
//   TCOD_FAST_F16C   1 where the target has the F16C half-float conversions;
//   TCOD_FAST_AVX512 1 where it has AVX-512 F/BW/VL/DQ (16-lane F16C conversions in one instruction).
// Every vector loop below is written once, on vf; the intrinsics are confined to the two
// half-float conversions.

constexpr int64_t BLOCK = 512;  // columns per block: two float32 blocks stay in L1
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

enum Divergence : int { REVERSE_KL = 0, FORWARD_KL = 1, JSD = 2 };
enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// The codes from Python as compile-time constants: `f(std::integral_constant<int, code>{})`, so
// that `decltype(arg)::value` picks a kernel's template instance; any other code is an error
// naming what was expected (`what` names the tensor whose dtype it is).
template <class F>
void with_dtype(int code, const char* what, F&& f) {
  switch (code) {
    case F32: return f(std::integral_constant<int, F32>{});
    case BF16: return f(std::integral_constant<int, BF16>{});
    case F16: return f(std::integral_constant<int, F16>{});
    default: throw std::invalid_argument(std::string(what) + " dtype code must be 0 (f32), 1 (bf16) or 2 (f16)");
  }
}

template <class F>
void with_divergence(int code, F&& f) {
  switch (code) {
    case REVERSE_KL: return f(std::integral_constant<int, REVERSE_KL>{});
    case FORWARD_KL: return f(std::integral_constant<int, FORWARD_KL>{});
    case JSD: return f(std::integral_constant<int, JSD>{});
    default: throw std::invalid_argument("divergence code must be 0 (reverse_kl), 1 (forward_kl) or 2 (jsd)");
  }
}

// Storage types. Both 16-bit formats are plain uint16_t in memory; the dtype code (a template
// parameter) picks the conversion. Every compute loop works on float32 block buffers, so it
// vectorises the same way whatever the input dtype.
template <int D> struct Storage { using type = uint16_t; };
template <> struct Storage<F32> { using type = float; };

inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  // round to nearest even; NaN stays NaN (quiet bit set)
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

// 2^x for x in [-127, 64] (callers clamp below; every argument is (logit - its anchor) times
// log2(e) / temperature: <= 0 when the anchor is the running max, up to +64 for turn_kl's reverse
// KL teacher, see its process_row). Round-to-nearest range reduction through a "magic" add of
// 1.5 * 2^23 + 127, after which the low mantissa bits of the sum hold n + 127; a degree-5
// minimax polynomial for 2^f on [-1/2, 1/2] (relative error 2.3e-7, fitted for these kernels);
// and n + 127 shifted straight into the exponent field. At x = -127 that field is 0, i.e. the
// result is exactly +0.0, so exp(-inf) == 0 and deep underflow flushes to 0 without a compare.
// Branch-free, so loops calling it vectorise.
constexpr float EXP2_ROUND = 12583039.0f;  // 1.5 * 2^23 + 127
// 2^f ~ sum_k EXP2_POLY[k] f^k on [-1/2, 1/2], highest degree first (Horner order)
constexpr float EXP2_POLY[6] = {1.327647129073739e-3f, 9.675541892647743e-3f, 5.550713092088699e-2f,
                                2.4022120237350464e-1f, 6.931469440460205e-1f, 1.0000001192092896f};

inline float exp2_clamped(float x) {
  const float shifted = x + EXP2_ROUND;
  const float f = x - (shifted - EXP2_ROUND);  // x - n, in [-0.5, 0.5]
  float poly = EXP2_POLY[0];
#pragma GCC unroll 5
  for (int k = 1; k < 6; ++k) poly = poly * f + EXP2_POLY[k];
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits <<= 23;  // (n + 127) mod 512 into the exponent field; the sign bit ends up 0
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return poly * scale;
}

constexpr float EXP2_FLOOR = -127.0f;

// max(x, -127) that keeps NaN, written so that it is one vmaxps (whose second operand is
// returned when either is NaN); std::max compiles to a compare and a blend.
inline float clamp_exp2_arg(float x) { return EXP2_FLOOR > x ? EXP2_FLOOR : x; }

constexpr float LOG2E = 1.44269504088896341f;
constexpr double LN2 = 0.693147180559945309417;

// ---- the vector type: TCOD_FAST_LANES float32 lanes (GCC/Clang vector extensions) ----
constexpr int LANES = TCOD_FAST_LANES;
typedef float vf __attribute__((vector_size(4 * TCOD_FAST_LANES)));
typedef int32_t vi __attribute__((vector_size(4 * TCOD_FAST_LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * TCOD_FAST_LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * TCOD_FAST_LANES)));

inline vf vload(const float* x) {
  vf v;
  std::memcpy(&v, x, sizeof(v));
  return v;
}
inline void vstore(float* x, vf v) { std::memcpy(x, &v, sizeof(v)); }
inline vf splat(float x) { return x - vf{}; }  // x - 0 == x for every x, -0 included
inline float hsum(vf v) {
  float s = 0.f;
  for (int k = 0; k < LANES; ++k) s += v[k];
  return s;
}
// max(floor, x) that keeps NaN: one max instruction (whose second operand is returned when
// either is NaN); std::max would be a compare and a blend
inline vf vmax_keep_nan(vf floor, vf x) { return floor > x ? floor : x; }

// exp2_clamped on every lane (same arithmetic, see exp2_clamped)
inline vf vexp2(vf x) {
  const vf shifted = x + EXP2_ROUND;
  const vf f = x - (shifted - EXP2_ROUND);
  vf poly = splat(EXP2_POLY[0]);
#pragma GCC unroll 5
  for (int k = 1; k < 6; ++k) poly = poly * f + EXP2_POLY[k];
  return poly * (vf)((vu)shifted << 23);
}

// A vector store that bypasses the caches (non-temporal) where `stream` is set: for the gradient,
// which is written once and not read again by the kernel, so its lines are not first read from
// memory (write-allocate) nor left to evict the cached rows. `x` must then be aligned to the
// vector's size (callers check the row's alignment; blocks start at multiples of BLOCK floats).
inline void vput(float* x, vf v, bool stream) {
#if defined(__x86_64__) && TCOD_FAST_AVX512
  if (stream) return _mm512_stream_ps(x, (__m512)v);
#elif defined(__x86_64__) && TCOD_FAST_F16C
  if (stream) {
    for (int k = 0; k < LANES; k += 8) {
      __m256 part;
      std::memcpy(&part, reinterpret_cast<const float*>(&v) + k, sizeof(part));
      _mm256_stream_ps(x + k, part);
    }
    return;
  }
#elif defined(__x86_64__)
  if (stream) {
    for (int k = 0; k < LANES; k += 4) {
      __m128 part;
      std::memcpy(&part, reinterpret_cast<const float*>(&v) + k, sizeof(part));
      _mm_stream_ps(x + k, part);
    }
    return;
  }
#endif
  vstore(x, v);
}

// Whether rows starting at `x` can take vput's streaming stores, and the fence that orders them
// before the row's later stores and the threads' barrier.
inline bool can_stream(const void* x) { return reinterpret_cast<uintptr_t>(x) % (4 * LANES) == 0; }
inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// the 16-bit formats, LANES values at a time
inline vf bf16_to_vf(const uint16_t* src) {
  vh h;
  std::memcpy(&h, src, sizeof(h));
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
inline void vf_to_bf16(vf x, uint16_t* dst) {
  const vu u = (vu)x;
  const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  const vu nan = (u >> 16) | 0x40u;                             // NaN stays NaN (quiet bit set)
  const vh h = __builtin_convertvector((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded, vh);
  std::memcpy(dst, &h, sizeof(h));
}
inline vf f16_to_vf(const uint16_t* src) {
  vf out;
#if TCOD_FAST_AVX512
  out = (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
#elif TCOD_FAST_F16C
  for (int k = 0; k < LANES; k += 8) {
    const __m256 part = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k)));
    std::memcpy(reinterpret_cast<float*>(&out) + k, &part, sizeof(part));
  }
#else
  for (int k = 0; k < LANES; ++k) out[k] = static_cast<float>(reinterpret_cast<const _Float16*>(src)[k]);
#endif
  return out;
}
inline void vf_to_f16(vf x, uint16_t* dst) {
#if TCOD_FAST_AVX512
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtps_ph((__m512)x, _MM_FROUND_TO_NEAREST_INT));
#elif TCOD_FAST_F16C
  for (int k = 0; k < LANES; k += 8) {
    __m256 part;
    std::memcpy(&part, reinterpret_cast<const float*>(&x) + k, sizeof(part));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), _mm256_cvtps_ph(part, _MM_FROUND_TO_NEAREST_INT));
  }
#else
  for (int k = 0; k < LANES; ++k) reinterpret_cast<_Float16*>(dst)[k] = static_cast<_Float16>(x[k]);
#endif
}

// max of x[0..n): two vector accumulators, because compilers leave a float max reduction scalar
// unless math is relaxed. NaN entries are ignored (a NaN row is reported through its sums instead).
inline float block_max(const float* x, int64_t n) {
  vf acc0 = splat(NEG_INF), acc1 = acc0;
  int64_t i = 0;
  for (; i + 2 * LANES <= n; i += 2 * LANES) {
    const vf a = vload(x + i), b = vload(x + i + LANES);
    acc0 = a > acc0 ? a : acc0;
    acc1 = b > acc1 ? b : acc1;
  }
  acc0 = acc1 > acc0 ? acc1 : acc0;
  float m = NEG_INF;
  for (int k = 0; k < LANES; ++k) m = std::max(m, acc0[k]);
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// dst[i] = float(src[i]) * scale for one block
template <int D>
inline void load_block(const typename Storage<D>::type* src, float* dst, int64_t n, float scale = 1.0f) {
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    if constexpr (D == F32) vstore(dst + i, vload(src + i) * scale);
    if constexpr (D == BF16) vstore(dst + i, bf16_to_vf(src + i) * scale);
    if constexpr (D == F16) vstore(dst + i, f16_to_vf(src + i) * scale);
  }
  for (; i < n; ++i) {
    if constexpr (D == F32) dst[i] = src[i] * scale;
    if constexpr (D == BF16) dst[i] = bf16_bits_to_float(src[i]) * scale;
    if constexpr (D == F16) dst[i] = static_cast<float>(reinterpret_cast<const _Float16*>(src)[i]) * scale;
  }
}

template <int D>
inline void store_block(const float* src, typename Storage<D>::type* dst, int64_t n) {
  if constexpr (D == F32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
      if constexpr (D == BF16) vf_to_bf16(vload(src + i), dst + i);
      if constexpr (D == F16) vf_to_f16(vload(src + i), dst + i);
    }
    for (; i < n; ++i) {
      if constexpr (D == BF16) dst[i] = float_to_bf16_bits(src[i]);
      if constexpr (D == F16) reinterpret_cast<_Float16*>(dst)[i] = static_cast<_Float16>(src[i]);
    }
  }
}

// A block of logits as float32: the row itself for float32 storage, else converted into `buf`.
template <int D>
inline const float* block_as_float(const typename Storage<D>::type* src, float* buf, int64_t n) {
  if constexpr (D == F32) {
    return src;
  } else {
    load_block<D>(src, buf, n, 1.0f);
    return buf;
  }
}

// Where a block of output is computed in float32: the row itself for float32 storage, else
// `buf`, which store_block_from_float then converts into the row.
template <int D>
inline float* block_for_float(typename Storage<D>::type* dst, float* buf) {
  if constexpr (D == F32) {
    return dst;
  } else {
    return buf;
  }
}

template <int D>
inline void store_block_from_float(const float* block, typename Storage<D>::type* dst, int64_t n) {
  if constexpr (D != F32) store_block<D>(block, dst, n);
}

template <int D>
inline float load_one(const typename Storage<D>::type* src, int64_t i) {
  float x;
  load_block<D>(src + i, &x, 1, 1.0f);
  return x;
}

template <int D>
inline void zero_fill(typename Storage<D>::type* dst, int64_t n) {
  if (n > 0) std::memset(dst, 0, n * sizeof(typename Storage<D>::type));  // 0 bits == +0.0
}


// A side's logit map (tcod_fast/ops/logit_transform.py, docs/maths.md#soft-capped-and-scaled-logits):
// y = cap tanh(scale x / cap), or y = scale x without a cap (cap == 0), and its derivative
// dy/dx = scale (1 - tanh^2). Both come from one e = exp(-2 |u|), u = scale x / cap, taken with the
// kernels' exp2 polynomial (branch-free, so the block loops vectorise): tanh |u| = (1 - e) / (1 + e)
// (absolute error a few float32 ulps of 1, like a rounded y) and 1 - tanh^2 = 4e / (1 + e)^2, which
// keeps its relative precision where tanh saturates (1 - tanh^2 of a rounded tanh would not). e is
// flushed to 0 for |u| > 44 (the derivative is then below 1e-38 anyway); a -inf logit becomes -cap,
// as in the model. The identity (scale 1, no cap) is never applied: the kernels test `active` and
// run their usual code without it.
struct LogitTransform {
  float scale = 1.f, cap = 0.f;
  bool active = false;
  float ratio = 1.f;  // scale / cap

  LogitTransform() = default;
  LogitTransform(double scale_, double cap_)
      : scale(static_cast<float>(scale_)),
        cap(static_cast<float>(cap_)),
        active(scale_ != 1.0 || cap_ != 0.0),
        ratio(cap_ != 0.0 ? static_cast<float>(scale_ / cap_) : 1.f) {}

  // e = exp(-2 |scale x / cap|) (NaN stays NaN)
  float exp_minus_2u(float x) const { return exp2_clamped(clamp_exp2_arg(-2.f * LOG2E * std::fabs(x * ratio))); }

  float apply(float x) const {
    if (cap == 0.f) return scale * x;
    const float e = exp_minus_2u(x);
    return std::copysign(cap * ((1.f - e) / (1.f + e)), x * ratio);
  }
  float derivative(float x) const {
    if (cap == 0.f) return scale;
    const float e = exp_minus_2u(x);
    return scale * 4.f * e / ((1.f + e) * (1.f + e));
  }
  // dst[i] = apply(src[i]) (dst may be src) and, when `deriv` is given (a soft cap only),
  // deriv[i] = derivative(src[i]), from one exponential
  void apply_block(const float* src, float* dst, float* deriv, int64_t n) const {
    if (cap == 0.f) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = scale * src[i];
    } else if (deriv != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float x = src[i];
        const float e = exp_minus_2u(x);
        const float inv_1pe = 1.f / (1.f + e);
        deriv[i] = scale * 4.f * e * inv_1pe * inv_1pe;
        dst[i] = std::copysign(cap * ((1.f - e) * inv_1pe), x * ratio);
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float x = src[i];
        const float e = exp_minus_2u(x);
        dst[i] = std::copysign(cap * ((1.f - e) / (1.f + e)), x * ratio);
      }
    }
  }
  // g[i] *= dy/dx at column i (the chain rule): derivative[i], cached by apply_block for a soft cap,
  // or the scale alone (derivative null)
  void times_derivative(float* g, const float* derivative, int64_t n) const {
    if (derivative != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) g[i] *= derivative[i];
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) g[i] *= scale;
    }
  }
};

// The rows of a batch in memory order, kept ones first, then dropped ones (which only get zeros);
// `n_kept` receives the number of kept rows. Threads then take kept rows in chunks of
// `kept_chunk` (about 1/8 of their share): the real work is balanced whatever the mask, a thread
// stalled by page faults (a fresh gradient is mostly first-touch faults) is helped by the
// others, and each thread's gradient rows stay mostly contiguous.
inline std::vector<int64_t> kept_rows_first(const bool* keep, int64_t n_rows, int64_t& n_kept) {
  std::vector<int64_t> order(static_cast<size_t>(n_rows));
  n_kept = 0;
  for (int64_t row = 0; row < n_rows; ++row) n_kept += keep[row] ? 1 : 0;
  for (int64_t row = 0, k = 0, d = n_kept; row < n_rows; ++row) order[keep[row] ? k++ : d++] = row;
  return order;
}

inline int64_t kept_chunk(int64_t n_kept, int num_threads) {
  return std::max<int64_t>(1, n_kept / (8 * static_cast<int64_t>(num_threads)));
}

// What one kept row produces (a dropped row gets zeros).
struct RowOut {
  float div = 0.f, entropy = 0.f, logp_target = 0.f, logq_target = 0.f;
};

// What a row kernel's `run_rows` shares: its `Args`' per-row inputs and outputs (raw addresses
// from Python) typed, the gradient's row strides, and the order its threads take the rows in
// (`kept_rows_first`).
struct RowsPlan {
  const bool* keep;
  const int64_t* target;
  const float* grad_scale;
  float* out_div;
  float* out_ent;  // null when the caller does not want the entropy
  float* out_logp;
  float* out_logq;
  int64_t rows_t, g_sb, g_st;
  int64_t n_rows;
  int64_t n_kept = 0;
  std::vector<int64_t> order;
  int64_t chunk;

  template <class Args>
  explicit RowsPlan(const Args& a)
      : keep(reinterpret_cast<const bool*>(a.keep)),
        target(reinterpret_cast<const int64_t*>(a.target)),
        grad_scale(reinterpret_cast<const float*>(a.grad_scale)),
        out_div(reinterpret_cast<float*>(a.out_div)),
        out_ent(reinterpret_cast<float*>(a.out_ent)),
        out_logp(reinterpret_cast<float*>(a.out_logp)),
        out_logq(reinterpret_cast<float*>(a.out_logq)),
        rows_t(a.rows_t),
        g_sb(a.g_sb),
        g_st(a.g_st),
        n_rows(a.rows_b * a.rows_t),
        order(kept_rows_first(keep, n_rows, n_kept)),
        chunk(kept_chunk(n_kept, a.num_threads)) {}

  void store(int64_t row, const RowOut& out) const {
    out_div[row] = out.div;
    if (out_ent) out_ent[row] = out.entropy;
    out_logp[row] = out.logp_target;
    out_logq[row] = out.logq_target;
  }

  // Called by every thread of a `#pragma omp parallel` region once it has taken its share of
  // the kept rows (`order[0, n_kept)`, in chunks of `chunk`): the dropped rows, whose outputs are
  // zeros, as are the `grad_cols` columns of their gradient row when there is a gradient.
  template <int D>
  void run_dropped(typename Storage<D>::type* grad, int64_t grad_cols) const {
#pragma omp for schedule(static)
    for (int64_t k = n_kept; k < n_rows; ++k) {
      const int64_t row = order[k];
      if (grad) zero_fill<D>(grad + (row / rows_t) * g_sb + (row % rows_t) * g_st, grad_cols);
      store(row, RowOut{});
    }
  }
};
