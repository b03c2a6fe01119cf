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
// Rows run in parallel over OpenMP threads; within a row the vector loops (statistics, gradient,
// exp2, the 16-bit conversions) are written once on a width-generic vector type, and scalar loops
// handle the block tails (vocabulary sizes leave ragged tails, which the tests cover).
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
// Instruction sets: the extension is built for the architecture's baseline (-march=x86-64 on
// x86-64), and the kernels (turn_kl_cpu_kernels.h) are compiled once per copy, each in a
// translation unit of its own (turn_kl_cpu_<copy>.cpp: portable, avx2x16, avx2, avx512; see
// cpu_isa.h). This file holds the Python bindings and the run-time choice of the copy: the best
// the CPU runs (__builtin_cpu_supports), or the one set_isa() forces, which the Python loader calls
// for TCOD_FAST_NATIVE_ISA; isa() says which one runs. One build therefore serves every x86-64
// machine (the cache can be shared), and the tests run each copy the machine can execute against
// float64.

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
#include "cpu_isa.h"
#include "turn_kl_cpu_args.h"

namespace py = pybind11;

namespace {

using TurnKLRun = void (*)(const TurnKLArgs&);
using ScaleRowsRun = void (*)(int64_t, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int);
#if TCOD_FAST_X86_COPIES
const TurnKLRun TURN_KL[] = {tcod_fast_portable::run_turn_kl, tcod_fast_avx2x16::run_turn_kl,
                             tcod_fast_avx2::run_turn_kl, tcod_fast_avx512::run_turn_kl};
const ScaleRowsRun SCALE_ROWS[] = {tcod_fast_portable::run_scale_rows, tcod_fast_avx2x16::run_scale_rows,
                                   tcod_fast_avx2::run_scale_rows, tcod_fast_avx512::run_scale_rows};
#else
const TurnKLRun TURN_KL[] = {tcod_fast_portable::run_turn_kl};
const ScaleRowsRun SCALE_ROWS[] = {tcod_fast_portable::run_scale_rows};
#endif

std::atomic<int> current_isa{tcod_fast_isa::best_for(tcod_fast_isa::cpu_flags())};

std::string isa() { return tcod_fast_isa::NAMES[current_isa.load()]; }
void set_isa(const std::string& name) { current_isa = tcod_fast_isa::parse(name); }

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
  TURN_KL[current_isa.load()](a);
}

void scale_rows(int64_t grad, int grad_dtype, int64_t factor, int64_t rows_b, int64_t rows_t, int64_t g_sb,
                int64_t g_st, int64_t cols, int num_threads) {
  py::gil_scoped_release release;
  SCALE_ROWS[current_isa.load()](grad, grad_dtype, factor, rows_b, rows_t, g_sb, g_st, cols, num_threads);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tcod-fast native CPU kernels";
  m.def("turn_kl_forward", &turn_kl_forward,
        "Fused divergence/entropy/gradient over rows of student and teacher logits (raw pointers).");
  m.def("scale_rows", &scale_rows, "grad[b, t, :] *= factor[b, t], skipping rows whose factor is 1 (raw pointers).");
  m.def("isa", &isa, "The copy of the kernels that runs: 'avx512', 'avx2', 'avx2x16' or 'portable'.");
  m.def("supported_isas", &tcod_fast_isa::supported_isas, "The copies this CPU can run, best last.");
  m.def("set_isa", &set_isa, "Run the kernels with this copy ('portable', 'avx2', 'avx512' or 'avx2x16').");
  m.def("cpu_flags", &tcod_fast_isa::cpu_flags, "The CPU flags the choice of copy looks at.");
  m.def("isa_for_flags", &tcod_fast_isa::isa_for_flags, "The copy chosen by default on a CPU with these flags.");
}
