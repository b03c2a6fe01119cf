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
// Units: every exponential is taken relative to the running max of the raw logits, the
// difference formed before the temperature scales it, so the result is exact at any logit scale
// and temperature ("Units and anchors" in topk_turn_kl_cpu_kernels.h).
//
// The kernels live in topk_turn_kl_cpu_kernels.h and are compiled once per instruction-set copy
// (topk_turn_kl_cpu_<copy>.cpp: portable, avx2x16, avx2, avx512; see cpu_isa.h), exactly like
// turn_kl_cpu.cpp's: the vector loops are written once on a width-generic vector type
// (cpu_kernel_common.h, shared with turn_kl), this file holds the Python bindings and the run-time
// choice of the copy (isa(), set_isa(), TCOD_FAST_NATIVE_ISA through the Python loader).

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu_isa.h"
#include "topk_turn_kl_cpu_args.h"

namespace py = pybind11;

namespace {

using TopkRun = void (*)(const TopkTurnKLArgs&);
#if TCOD_FAST_X86_COPIES
const TopkRun TOPK[] = {tcod_fast_portable::run_topk_turn_kl, tcod_fast_avx2x16::run_topk_turn_kl,
                        tcod_fast_avx2::run_topk_turn_kl, tcod_fast_avx512::run_topk_turn_kl};
#else
const TopkRun TOPK[] = {tcod_fast_portable::run_topk_turn_kl};
#endif

std::atomic<int> current_isa{tcod_fast_isa::best_for(tcod_fast_isa::cpu_flags())};

std::string isa() { return tcod_fast_isa::NAMES[current_isa.load()]; }
void set_isa(const std::string& name) { current_isa = tcod_fast_isa::parse(name); }

void topk_turn_kl_forward(int64_t student, int student_dtype, int64_t grad, int64_t ids, int64_t logq, int64_t keep,
                          int64_t target, int64_t grad_scale, int64_t rows_b, int64_t rows_t, int64_t s_sb,
                          int64_t s_st, int64_t g_sb, int64_t g_st, int64_t vocab, int64_t k, int divergence,
                          double beta, int tail, double tail_eps, double inv_temp, int64_t out_div, int64_t out_ent,
                          int64_t out_logp, int64_t out_logq, bool need_normaliser, int num_threads,
                          double student_scale, double student_cap) {
  if (tail != 0 && tail != 1) throw std::invalid_argument("tail code must be 0 (bucket) or 1 (renormalize)");
  const TopkTurnKLArgs a{student, grad, ids, logq, keep, target, grad_scale, student_dtype, rows_b, rows_t, s_sb,
                         s_st, g_sb, g_st, vocab, k, divergence, tail, beta, tail_eps, inv_temp, out_div, out_ent,
                         out_logp, out_logq, need_normaliser, std::max(1, num_threads), student_scale, student_cap};
  py::gil_scoped_release release;
  TOPK[current_isa.load()](a);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tcod-fast native CPU kernel: divergence to a sparse (top-k) teacher";
  m.def("topk_turn_kl_forward", &topk_turn_kl_forward,
        "Divergence/entropy/gradient of rows of student logits against top-k teacher log-probs (raw pointers).");
  m.def("isa", &isa, "The copy of the kernels that runs: 'avx512', 'avx2', 'avx2x16' or 'portable'.");
  m.def("supported_isas", &tcod_fast_isa::supported_isas, "The copies this CPU can run, best last.");
  m.def("set_isa", &set_isa, "Run the kernels with this copy ('portable', 'avx2', 'avx512' or 'avx2x16').");
  m.def("cpu_flags", &tcod_fast_isa::cpu_flags, "The CPU flags the choice of copy looks at.");
  m.def("isa_for_flags", &tcod_fast_isa::isa_for_flags, "The copy chosen by default on a CPU with these flags.");
}
