// The avx2x16 copy of the topk_turn_kl kernels (see cpu_isa.h): 16 lanes per vector.
#define TCOD_FAST_NS tcod_fast_avx2x16
#define TCOD_FAST_LANES 16
#if defined(__x86_64__) && defined(__GNUC__)
#define TCOD_FAST_F16C 1
#define TCOD_FAST_AVX512 0
#define TCOD_FAST_TARGET "avx2,fma,f16c"
#include "topk_turn_kl_cpu_copy.h"
#endif
