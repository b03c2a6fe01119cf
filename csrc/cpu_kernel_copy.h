// One instruction-set copy of a native kernel: the includes every copy needs, then the copy's
// target (TCOD_FAST_TARGET, a `#pragma GCC target` string; none for the portable copy). A copy's
// translation unit (e.g. turn_kl_cpu_avx512.cpp) defines TCOD_FAST_LANES, TCOD_FAST_F16C,
// TCOD_FAST_AVX512 and, on x86-64, TCOD_FAST_TARGET, includes this, then opens its namespace and
// includes the kernel (see cpu_isa.h for the copies). The includes come before the target, so the
// standard library is compiled as usual; the kernels after it get the copy's instructions.
#include <algorithm>
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

#if defined(TCOD_FAST_TARGET)
#define TCOD_FAST_PRAGMA(x) _Pragma(#x)
#define TCOD_FAST_TARGET_PRAGMA(t) TCOD_FAST_PRAGMA(GCC target(t))
TCOD_FAST_TARGET_PRAGMA(TCOD_FAST_TARGET)
#endif
