// What turn_kl_cpu.cpp's dispatcher hands to the instruction-set copies of its kernels
// (turn_kl_cpu_copy.h), and the entry points every copy defines.
#pragma once

#include <cstdint>

// turn_kl_forward's arguments (raw addresses, strides and codes from Python), built once by the
// dispatcher and read by whichever copy of the kernels runs.
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

#define TCOD_FAST_DECLARE_TURN_KL_COPY(ns)                                                                  \
  namespace ns {                                                                                            \
  void run_turn_kl(const TurnKLArgs& a);                                                                    \
  void run_scale_rows(int64_t grad, int grad_dtype, int64_t factor, int64_t rows_b, int64_t rows_t,         \
                      int64_t g_sb, int64_t g_st, int64_t cols, int num_threads);                           \
  }

TCOD_FAST_DECLARE_TURN_KL_COPY(tcod_fast_portable)
TCOD_FAST_DECLARE_TURN_KL_COPY(tcod_fast_avx2x16)
TCOD_FAST_DECLARE_TURN_KL_COPY(tcod_fast_avx2)
TCOD_FAST_DECLARE_TURN_KL_COPY(tcod_fast_avx512)
