// The instruction-set copies of the native kernels and the run-time choice between them, shared by
// turn_kl_cpu.cpp and topk_turn_kl_cpu.cpp (each extension holds its own copies and its own choice).
//
// Each kernel's vector loops are written once, on a width-generic vector type
// (cpu_kernel_common.h), and compiled into one translation unit per copy (cpu_kernel_copy.h):
//   portable  8 lanes, baseline target (SSE2 on x86-64; any other architecture);
//   avx2x16   16 lanes under AVX2 + FMA + F16C: the AVX-512 copy's logic, the compiler splitting
//             each vector in two, so that logic is tested against float64 on any AVX2 machine;
//   avx2      8 lanes under AVX2 + FMA + F16C;
//   avx512    16 lanes under AVX-512 F/BW/VL/DQ (+ AVX2, FMA, F16C).
// The default is the best copy the CPU runs (avx512, else avx2, else portable); set_isa forces one
// (the Python loader calls it for TCOD_FAST_NATIVE_ISA). The choice is a pure function of the CPU
// flags (isa_for_flags), so it can be tested with flags a CPU does not have.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define TCOD_FAST_X86_COPIES 1
#else
#define TCOD_FAST_X86_COPIES 0
#endif

namespace tcod_fast_isa {

enum Isa : int { PORTABLE = 0, AVX2X16 = 1, AVX2 = 2, AVX512 = 3, COUNT = 4 };
inline const char* const NAMES[COUNT] = {"portable", "avx2x16", "avx2", "avx512"};
// the CPU flags (as Linux's /proc/cpuinfo names them) each copy needs
inline const std::vector<std::string> AVX2_FLAGS = {"avx2", "fma", "f16c"};
inline const std::vector<std::string> AVX512_FLAGS = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                                                      "avx512dq"};

// The flags of this CPU that the copies care about.
inline std::vector<std::string> cpu_flags() {
  std::vector<std::string> flags;
#if TCOD_FAST_X86_COPIES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) flags.emplace_back("avx2");
  if (__builtin_cpu_supports("fma")) flags.emplace_back("fma");
  if (__builtin_cpu_supports("f16c")) flags.emplace_back("f16c");
  if (__builtin_cpu_supports("avx512f")) flags.emplace_back("avx512f");
  if (__builtin_cpu_supports("avx512bw")) flags.emplace_back("avx512bw");
  if (__builtin_cpu_supports("avx512vl")) flags.emplace_back("avx512vl");
  if (__builtin_cpu_supports("avx512dq")) flags.emplace_back("avx512dq");
#endif
  return flags;
}

inline bool has_all(const std::vector<std::string>& flags, const std::vector<std::string>& needed) {
  for (const auto& want : needed) {
    bool found = false;
    for (const auto& flag : flags) found = found || flag == want;
    if (!found) return false;
  }
  return true;
}

// Whether a CPU with `flags` runs copy `isa` (every copy but portable exists only on x86-64).
inline bool runs(int isa, const std::vector<std::string>& flags) {
  if (isa == PORTABLE) return true;
  if (!TCOD_FAST_X86_COPIES) return false;
  return has_all(flags, isa == AVX512 ? AVX512_FLAGS : AVX2_FLAGS);
}

// The copy chosen by default on a CPU with `flags`.
inline int best_for(const std::vector<std::string>& flags) {
  if (runs(AVX512, flags)) return AVX512;
  if (runs(AVX2, flags)) return AVX2;
  return PORTABLE;
}

inline std::string isa_for_flags(const std::vector<std::string>& flags) { return NAMES[best_for(flags)]; }

// The copies this CPU runs, best last (avx2x16, a test copy, is never the default).
inline std::vector<std::string> supported_isas() {
  const auto flags = cpu_flags();
  std::vector<std::string> names;
  for (int isa = 0; isa < COUNT; ++isa) {
    if (runs(isa, flags)) names.emplace_back(NAMES[isa]);
  }
  return names;
}

// The copy `name` names, if this CPU runs it; else one line saying what was expected.
inline int parse(const std::string& name) {
  for (int isa = 0; isa < COUNT; ++isa) {
    if (name != NAMES[isa]) continue;
    if (!runs(isa, cpu_flags())) {
      std::string have;
      for (const auto& n : supported_isas()) have += (have.empty() ? "'" : ", '") + n + "'";
      throw std::invalid_argument("the " + name + " kernels need a CPU with " +
                                  (isa == AVX512 ? "AVX-512 F/BW/VL/DQ, AVX2, FMA and F16C" : "AVX2, FMA and F16C") +
                                  "; this one runs only " + have);
    }
    return isa;
  }
  throw std::invalid_argument("instruction set must be 'portable', 'avx2', 'avx512' or 'avx2x16', got '" + name + "'");
}

}  // namespace tcod_fast_isa
