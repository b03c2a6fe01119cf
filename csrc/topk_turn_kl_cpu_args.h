// What topk_turn_kl_cpu.cpp's dispatcher hands to the instruction-set copies of its kernels
// (topk_turn_kl_cpu_copy.h), and the entry point every copy defines.
#pragma once

#include <cstdint>

// topk_turn_kl_forward's arguments (raw addresses, strides and codes from Python).
struct TopkTurnKLArgs {
  int64_t student, grad, ids, logq, keep, target, grad_scale;
  int student_dtype;
  int64_t rows_b, rows_t, s_sb, s_st, g_sb, g_st, vocab, k;
  int divergence, tail;
  double beta, tail_eps;
  double inv_temp;
  int64_t out_div, out_ent, out_logp, out_logq;
  bool need_normaliser;
  int num_threads;
  double student_scale, student_cap;  // the student logits' map (cap 0: none)
};

#define TCOD_FAST_DECLARE_TOPK_COPY(ns) \
  namespace ns {                        \
  void run_topk_turn_kl(const TopkTurnKLArgs& a); \
  }

TCOD_FAST_DECLARE_TOPK_COPY(tcod_fast_portable)
TCOD_FAST_DECLARE_TOPK_COPY(tcod_fast_avx2x16)
TCOD_FAST_DECLARE_TOPK_COPY(tcod_fast_avx2)
TCOD_FAST_DECLARE_TOPK_COPY(tcod_fast_avx512)
