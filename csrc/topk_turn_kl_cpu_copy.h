// The body of one instruction-set copy of the top-k kernels (see cpu_isa.h): included by
// topk_turn_kl_cpu_<copy>.cpp after it has set the copy's macros (cpu_kernel_copy.h) and
// TCOD_FAST_NS, the copy's namespace.
#include "cpu_kernel_copy.h"
#include "topk_turn_kl_cpu_args.h"

namespace TCOD_FAST_NS {
namespace {
#include "topk_turn_kl_cpu_kernels.h"
}  // namespace

void run_topk_turn_kl(const TopkTurnKLArgs& a) { topk_turn_kl_forward(a); }
}  // namespace TCOD_FAST_NS
