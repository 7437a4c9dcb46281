// Internal helpers shared by the kernels in cpp/src (not installed): the multiversion and
// forced-inline attributes, the guarded vectorised exponential and the window-width dispatch.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "xtalscale/check.hpp"     // the bit tests of RowChecks
#include "xtalscale/smoother.hpp"  // exp_bounded

/// Compile a function for AVX2+FMA (x86-64-v3) as well as the baseline, picked at run time
/// (GCC >= 11 on x86-64 Linux; a no-op elsewhere). FMA may change the last bit of a result.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && \
    defined(__linux__)
#define XS_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define XS_MULTIVERSION
#endif

/// Force inlining of a small helper into its (multiversioned) caller, so it is compiled for
/// the caller's target clone rather than called as a baseline function.
#if defined(__GNUC__) || defined(__clang__)
#define XS_ALWAYS_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define XS_ALWAYS_INLINE __forceinline
#else
#define XS_ALWAYS_INLINE inline
#endif

namespace xtalscale::detail {

/// A chunk's checks, row by row inside a kernel's own pass (the caller reads the sign bits
/// once at the end): g not finite and > 0 sets bad_g's, a weight not finite and >= 0 or an
/// intensity not finite sets bad_table's (check.hpp's bit tests, which vectorise).
struct RowChecks {
  std::uint64_t bad_g = 0, bad_table = 0;
  XS_ALWAYS_INLINE void add(double g, double w, double intensity) noexcept {
    std::uint64_t bg, bw, bi;
    std::memcpy(&bg, &g, sizeof bg);
    std::memcpy(&bw, &w, sizeof bw);
    std::memcpy(&bi, &intensity, sizeof bi);
    bad_g |= positive_finite_flag(bg);
    bad_table |= non_negative_finite_flag(bw) | finite_flag(bi);
  }
  /// Clears @p table_ok when a weight or intensity failed; returns whether every g passed.
  bool finish(bool& table_ok) const noexcept {
    if ((bad_table >> 63) != 0) table_ok = false;
    return (bad_g >> 63) == 0;
  }
};

/// The widest hand-vectorised kernels this CPU runs: 2 AVX-512F, 1 AVX2+FMA, 0 neither (or a
/// compiler/platform without them). Each level computes every result with the same FMAs in the
/// same order (the normal matrix's and the variances' tiles, the float32 harmonics' sums), so
/// all levels give the same bits; the level only changes the speed.
inline int cpu_simd_level() noexcept {
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && \
    defined(__linux__)
  static const int level = __builtin_cpu_supports("avx512f")                                   ? 2
                           : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1
                                                                                             : 0;
  return level;
#else
  return 0;
#endif
}

/// The process-wide cap on the level (set_simd_level).
inline std::atomic<int>& simd_level_cap() noexcept {
  static std::atomic<int> cap{2};
  return cap;
}

/// The level the kernels use: the CPU's, unless capped lower.
inline int simd_level() noexcept {
  return std::min(cpu_simd_level(), simd_level_cap().load(std::memory_order_relaxed));
}

/// Use at most @p level from now on (clamped to [0, 2]); returns the level in use. For tests of
/// the narrower kernels on a wide CPU; set it between kernel calls, not during one.
inline int set_simd_level(int level) noexcept {
  simd_level_cap().store(std::max(0, std::min(level, 2)), std::memory_order_relaxed);
  return simd_level();
}

/// The arguments exp_bounded accepts (its result is then a normal number within ~2 ulp).
constexpr double kExpArgLimit = 700.0;

/// True when every v[i] lies in [−700, 700] (NaN counts as outside). Branch-free, vectorises.
inline bool exp_args_in_range(const double* v, std::size_t n) noexcept {
  bool outside = false;
  for (std::size_t i = 0; i < n; ++i) outside |= !(v[i] >= -kExpArgLimit && v[i] <= kExpArgLimit);
  return !outside;
}

/// v[i] = exp(v[i]) in place: exp_bounded (vectorised, no libm call) when every argument is in
/// range, else std::exp for all of them, so overflow, underflow and NaN follow IEEE.
inline void exp_guarded(std::size_t n, double* v) noexcept {
  if (exp_args_in_range(v, n)) {
    for (std::size_t i = 0; i < n; ++i) v[i] = exp_bounded(v[i]);
  } else {
    for (std::size_t i = 0; i < n; ++i) v[i] = std::exp(v[i]);
  }
}

/// Call f(std::integral_constant<int, W>{}) with W = @p width clamped to [Min, 5], so a kernel
/// gets the window width (at most kMaxAxisWindow) as a compile-time constant.
template <int Min, typename F>
inline decltype(auto) with_window_width(int width, F&& f) {
  static_assert(Min >= 1 && Min <= 5, "window widths are 1..5");
  if (width <= Min) return f(std::integral_constant<int, Min>{});
  switch (width) {
    case 2: return f(std::integral_constant<int, (Min > 2 ? Min : 2)>{});
    case 3: return f(std::integral_constant<int, (Min > 3 ? Min : 3)>{});
    case 4: return f(std::integral_constant<int, (Min > 4 ? Min : 4)>{});
    default: return f(std::integral_constant<int, 5>{});
  }
}

}  // namespace xtalscale::detail
