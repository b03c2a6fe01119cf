// Fused teacher-student divergence over the vocabulary, CPU, one row at a time.
//
// Algorithm (per row of V logits x, z = x / temperature):
//   pass 1  streams the row in blocks of BLOCK columns, reading float32 rows in place (16-bit
//           blocks are converted into a small stack buffer that stays in L1). Per block: its
//           max, one rescale of the running online-softmax state (m_s, l_s, m_t, l_t and the
//           divergence/entropy accumulators), then one vectorised loop of two exponentials and
//           the sums. It caches, per thread, what the last pass needs (reverse KL: exp(z_s -
//           shift) and the centred log-ratio u; forward KL and JSD: both exponentials). This is
//           the only pass that reads the logits from DRAM. Every value is taken relative to the
//           running maxima in raw logit units before the temperature scales it ("Units and
//           anchors" at process_row), so the result is exact at any logit scale and temperature.
//   pass 2  (JSD only) sums the JSD terms and KL(p||m), which the JSD gradient needs, and
//           leaves each element's log p - log m in the cache.
//   last    writes grad_scale * d div / d student_logits for the row in the student's dtype,
//           from the cache alone (it re-reads no logits and evaluates no exp or log).
//           grad_scale is the reduction's coefficient of the row, so for the usual scalar loss
//           backward has nothing left to do.
// The per-thread cache is two float32 rows (1.2 MB at V = 151936) and stays in L2/L3, so the
// traffic is close to 2 reads + 1 write of the logits per element.
// Rows run in parallel over OpenMP threads; within a row the loops are written so the compiler
// vectorises them (no calls, selects instead of branches, a polynomial exp2). The statistics
// loop, the hot one, also has an AVX2/FMA version with two independent vector chains per
// iteration and an unmasked divergence sum (15-20% faster on Zen 1); the portable loop
// handles block tails and CPUs without AVX2, and the tests cover both (vocabulary sizes leave
// ragged tails, and tests/ops/turn_kl/test_native_portable_build.py runs the portable copy, see below).
//
// Soft-capped and scaled logits: each side's logit map (LogitTransform, cpu_kernel_common.h) is
// applied to a block as it is read, in pass 1 and pass 2 (into the L1 block buffers), so every
// statistic is of the mapped logits; with a soft-capped student, pass 1 also caches the map's
// derivative per column in a third per-thread row, and the last pass multiplies the gradient by
// it (chain rule, after the argmax fix's sums, which are w.r.t. the mapped logits).
//
// Edge cases: -inf logits at the same entries of student and teacher contribute exactly 0; a
// block that is entirely -inf never evaluates -inf - (-inf); rows that are not kept are skipped
// (outputs 0, gradient row 0); a NaN logit in a kept row makes that row's divergence and
// gradient NaN (what autograd of the float64 reference gives).
//
// Instruction sets: the extension is built for baseline x86-64 (-march=x86-64), and the kernels
// (turn_kl_cpu_kernels.h) are compiled twice into it: a portable copy and, on x86-64, a copy under
// `#pragma GCC target("avx2,fma,f16c")` with the hand-vectorised AVX2/FMA loop. The copy is chosen
// at run time from what the CPU reports (__builtin_cpu_supports), or forced with set_isa(), which
// the Python loader calls for TCOD_FAST_NATIVE_ISA=portable|avx2; isa() says which one runs. One
// build therefore serves every x86-64 machine (the cache can be shared), and the tests run each
// copy the machine can execute against float64.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
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

namespace {
// turn_kl_forward's arguments (raw addresses, strides and codes from Python), built once by the
// dispatcher at the bottom and read by whichever instruction-set copy of the kernels runs.
struct TurnKLArgs {
  int64_t student, teacher, grad, keep, target, grad_scale;
  int student_dtype, teacher_dtype;
  int64_t rows_b, rows_t;
  int64_t s_sb, s_st, t_sb, t_st, g_sb, g_st;
  int64_t vocab, grad_cols;
  int divergence;
  float beta;
  double inv_temp;
  int64_t out_div, out_ent, out_logp, out_logq;
  int num_threads;
  double student_scale, student_cap, teacher_scale, teacher_cap;  // the logit maps (cap 0: none)
};
}  // namespace

namespace tcod_fast_portable {
namespace {
#define TCOD_FAST_AVX2 0
#include "turn_kl_cpu_kernels.h"
#undef TCOD_FAST_AVX2
}  // namespace
}  // namespace tcod_fast_portable

#if defined(__x86_64__) && defined(__GNUC__)
#define TCOD_FAST_HAS_AVX2_COPY 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace tcod_fast_avx2 {
namespace {
#define TCOD_FAST_AVX2 1
#include "turn_kl_cpu_kernels.h"
#undef TCOD_FAST_AVX2
}  // namespace
}  // namespace tcod_fast_avx2
#pragma GCC pop_options
#else
#define TCOD_FAST_HAS_AVX2_COPY 0
#endif

namespace {

enum Isa : int { PORTABLE = 0, AVX2 = 1 };
const char* const ISA_NAMES[] = {"portable", "avx2"};

bool cpu_runs_avx2() {
#if TCOD_FAST_HAS_AVX2_COPY
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

std::atomic<int> current_isa{cpu_runs_avx2() ? AVX2 : PORTABLE};

std::vector<std::string> supported_isas() {
  std::vector<std::string> names{ISA_NAMES[PORTABLE]};
  if (cpu_runs_avx2()) names.emplace_back(ISA_NAMES[AVX2]);
  return names;
}

std::string isa() { return ISA_NAMES[current_isa.load()]; }

void set_isa(const std::string& name) {
  if (name == ISA_NAMES[PORTABLE]) {
    current_isa = PORTABLE;
  } else if (name == ISA_NAMES[AVX2]) {
    if (!cpu_runs_avx2()) {
      throw std::invalid_argument("the avx2 kernels need a CPU with AVX2, FMA and F16C; this one runs only 'portable'");
    }
    current_isa = AVX2;
  } else {
    throw std::invalid_argument("instruction set must be 'portable' or 'avx2', got '" + name + "'");
  }
}

void turn_kl_forward(int64_t student, int student_dtype, int64_t teacher, int teacher_dtype,
                     int64_t grad, int64_t keep, int64_t target, int64_t grad_scale, int64_t rows_b,
                     int64_t rows_t,
                     int64_t s_sb, int64_t s_st, int64_t t_sb, int64_t t_st, int64_t g_sb,
                     int64_t g_st, int64_t vocab, int64_t grad_cols, int divergence, double beta,
                     double inv_temp, int64_t out_div, int64_t out_ent, int64_t out_logp,
                     int64_t out_logq, int num_threads, double student_scale, double student_cap,
                     double teacher_scale, double teacher_cap) {
  const TurnKLArgs a{student, teacher, grad, keep, target, grad_scale, student_dtype, teacher_dtype,
                     rows_b, rows_t, s_sb, s_st, t_sb, t_st, g_sb, g_st, vocab, grad_cols, divergence,
                     static_cast<float>(beta), inv_temp, out_div, out_ent, out_logp, out_logq,
                     std::max(1, num_threads), student_scale, student_cap, teacher_scale, teacher_cap};
  py::gil_scoped_release release;
#if TCOD_FAST_HAS_AVX2_COPY
  if (current_isa.load() == AVX2) return tcod_fast_avx2::turn_kl_forward(a);
#endif
  tcod_fast_portable::turn_kl_forward(a);
}

void scale_rows(int64_t grad, int grad_dtype, int64_t factor, int64_t rows_b, int64_t rows_t, int64_t g_sb,
                int64_t g_st, int64_t cols, int num_threads) {
  py::gil_scoped_release release;
#if TCOD_FAST_HAS_AVX2_COPY
  if (current_isa.load() == AVX2) {
    return tcod_fast_avx2::scale_rows(grad, grad_dtype, factor, rows_b, rows_t, g_sb, g_st, cols, num_threads);
  }
#endif
  tcod_fast_portable::scale_rows(grad, grad_dtype, factor, rows_b, rows_t, g_sb, g_st, cols, num_threads);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tcod-fast native CPU kernels";
  m.def("turn_kl_forward", &turn_kl_forward,
        "Fused divergence/entropy/gradient over rows of student and teacher logits (raw pointers).");
  m.def("scale_rows", &scale_rows, "grad[b, t, :] *= factor[b, t], skipping rows whose factor is 1 (raw pointers).");
  m.def("isa", &isa, "The instruction set the kernels run with: 'avx2' or 'portable'.");
  m.def("supported_isas", &supported_isas, "The instruction sets this CPU can run, best last.");
  m.def("set_isa", &set_isa, "Run the kernels with this instruction set ('portable' or 'avx2').");
}
