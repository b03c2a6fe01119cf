// The body of one instruction-set copy of the turn_kl kernels (see cpu_isa.h): included by
// turn_kl_cpu_<copy>.cpp after it has set the copy's macros (cpu_kernel_copy.h) and TCOD_FAST_NS,
// the copy's namespace.
#include "cpu_kernel_copy.h"
#include "turn_kl_cpu_args.h"

namespace TCOD_FAST_NS {
namespace {
#include "turn_kl_cpu_kernels.h"
}  // namespace

void run_turn_kl(const TurnKLArgs& a) { turn_kl_forward(a); }

void run_scale_rows(int64_t grad, int grad_dtype, int64_t factor, int64_t rows_b, int64_t rows_t, int64_t g_sb,
                    int64_t g_st, int64_t cols, int num_threads) {
  scale_rows(grad, grad_dtype, factor, rows_b, rows_t, g_sb, g_st, cols, num_threads);
}
}  // namespace TCOD_FAST_NS
