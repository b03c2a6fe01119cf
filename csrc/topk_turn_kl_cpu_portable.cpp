// The portable copy of the topk_turn_kl kernels (see cpu_isa.h): 4 lanes per vector (one SSE2 register).
#define TCOD_FAST_NS tcod_fast_portable
#define TCOD_FAST_LANES 4
#define TCOD_FAST_F16C 0
#define TCOD_FAST_AVX512 0
#include "topk_turn_kl_cpu_copy.h"
