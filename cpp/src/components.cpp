// Scale-component kernels (see components.hpp). No allocation per reflection: callers
// preallocate every output.
#include "xtalscale/components.hpp"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "internal/kernel_support.hpp"  // XS_MULTIVERSION, exp_guarded, with_window_width
#include "internal/lean_fused.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include "xtalscale/check.hpp"
#include "xtalscale/smoother.hpp"  // exp_bounded

namespace xtalscale::components {

using detail::exp_guarded;
using detail::with_window_width;
std::size_t dials_weight_matrix_1d(const GaussianSmoother<1>& smoother, std::size_t n,
                                   const double* x, std::int32_t* indptr, std::int32_t* indices,
                                   double* data) {
  require_finite(x, n, "x");
  const SmootherAxis& ax = smoother.axis(0);
  const double sigma = smoother.sigma();
  AxisWindow win;
  std::size_t nnz = 0;
  indptr[0] = 0;
  for (std::size_t i = 0; i < n; ++i) {
    ax.eval(ax.normalise(x[i]), sigma, win);  // DIALS's single-point formula
    double sumw = 0.0;
    for (int k = 0; k < win.count; ++k) sumw += win.w[k];
    // As DIALS's row_multiply(weight, 1/sumweight); a zero sum leaves a zero row.
    const double inv = sumw > 0.0 ? 1.0 / sumw : 0.0;
    for (int k = 0; k < win.count; ++k, ++nnz) {
      indices[nnz] = static_cast<std::int32_t>(win.first + k);
      data[nnz] = win.w[k] * inv;
    }
    indptr[i + 1] = static_cast<std::int32_t>(nnz);
  }
  return nnz;
}

std::size_t split_first_column(std::size_t n_rows, std::int32_t* indptr, std::int32_t* indices,
                               double* data, double* first_col) {
  // Compaction never writes ahead of the read position, so it is safe in place.
  std::int32_t write = 0;
  std::int32_t read_start = indptr[0];
  for (std::size_t i = 0; i < n_rows; ++i) {
    const std::int32_t read_end = indptr[i + 1];
    first_col[i] = 0.0;
    for (std::int32_t k = read_start; k < read_end; ++k) {
      if (indices[k] == 0) {
        first_col[i] = data[k];
        continue;
      }
      indices[write] = indices[k] - 1;
      data[write] = data[k];
      ++write;
    }
    read_start = read_end;
    indptr[i + 1] = write;
  }
  indptr[0] = 0;
  return static_cast<std::size_t>(write);
}

void csr_matvec(std::size_t n_rows, const std::int32_t* indptr, const std::int32_t* indices,
                const double* data, const double* p, const double* first_col, double p0,
                double* out) {
  for (std::size_t i = 0; i < n_rows; ++i) {
    double acc = first_col != nullptr ? first_col[i] * p0 : 0.0;
    for (std::int32_t k = indptr[i]; k < indptr[i + 1]; ++k) acc += data[k] * p[indices[k]];
    out[i] = acc;
  }
}

void exp_scales(std::size_t n, const double* factor, double coef, double* scales,
                double* derivs) {
  for (std::size_t i = 0; i < n; ++i) scales[i] = coef * factor[i];
  exp_guarded(n, scales);
  if (derivs != nullptr)
    for (std::size_t i = 0; i < n; ++i) derivs[i] = scales[i] * factor[i];
}

void smooth_b_scales(std::size_t n_rows, const std::int32_t* indptr, const std::int32_t* indices,
                     const double* data, const double* p, const double* first_col, double p0,
                     const double* factor, double* scales, double* d_data) {
  // Three passes so the exp pass vectorises: B(x)·factor, exp, then the row-scaled weights.
  csr_matvec(n_rows, indptr, indices, data, p, first_col, p0, scales);
  for (std::size_t i = 0; i < n_rows; ++i) scales[i] *= factor[i];
  exp_guarded(n_rows, scales);
  if (d_data == nullptr) return;
  for (std::size_t i = 0; i < n_rows; ++i) {
    const double r = scales[i] * factor[i];
    for (std::int32_t k = indptr[i]; k < indptr[i + 1]; ++k) d_data[k] = data[k] * r;
  }
}

void row_multiply(std::size_t n_rows, const std::int64_t* indptr, const double* data,
                  const double* v, double* out_data) {
  for (std::size_t i = 0; i < n_rows; ++i)
    for (std::int64_t k = indptr[i]; k < indptr[i + 1]; ++k) out_data[k] = data[k] * v[i];
}

void sh_scales(std::size_t n, std::size_t n_params, const double* harmonics, const double* coef,
               double* scales) {
  // Eigen's matrix-vector product is vectorised (packets of 2 or 4 doubles) where the plain
  // per-row dot product is not (no reassociation without -ffast-math).
  using RowMajor = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::Map<const RowMajor> h(harmonics, static_cast<Eigen::Index>(n),
                                     static_cast<Eigen::Index>(n_params));
  const Eigen::Map<const Eigen::VectorXd> c(coef, static_cast<Eigen::Index>(n_params));
  Eigen::Map<Eigen::VectorXd> out(scales, static_cast<Eigen::Index>(n));
  out.noalias() = h * c;
  out.array() += 1.0;
}

namespace {
// The float32 GEMV s_i = 1 + Σ_k h_ik c_k. A row with a multiple of 8 harmonics (lmax 2, 4, 6:
// 8, 24, 48) is summed in eight lanes, lane j taking k ≡ j (mod 8) in ascending k by FMA and
// the lanes reduced as ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)): one order for the
// AVX-512 (one 8-lane register), AVX2 (two 4-lane registers) and plain paths, so they give the
// same bits on any CPU with FMA. Other widths: four scalar accumulators.

/// The eight-lane reduction above.
inline double reduce_lanes(const double* l) {
  return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define XS_SH_SIMD 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12: _mm256_undefined_pd in the intrinsics
__attribute__((target("avx512f"))) void sh_scales_f32_avx512(std::size_t n, std::size_t p, const float* h,
                                                           const double* coef, double* scales) {
  for (std::size_t i = 0; i < n; ++i) {
    const float* r = h + i * p;
    __m512d acc = _mm512_setzero_pd();
    for (std::size_t k = 0; k < p; k += 8)
      acc = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_loadu_ps(r + k)), _mm512_loadu_pd(coef + k), acc);
    const __m256d t = _mm256_add_pd(_mm512_castpd512_pd256(acc), _mm512_extractf64x4_pd(acc, 1));
    const __m128d u = _mm_add_pd(_mm256_castpd256_pd128(t), _mm256_extractf128_pd(t, 1));
    scales[i] = 1.0 + (_mm_cvtsd_f64(u) + _mm_cvtsd_f64(_mm_unpackhi_pd(u, u)));
  }
}
#pragma GCC diagnostic pop

__attribute__((target("avx2,fma"))) void sh_scales_f32_avx2(std::size_t n, std::size_t p, const float* h,
                                                          const double* coef, double* scales) {
  for (std::size_t i = 0; i < n; ++i) {
    const float* r = h + i * p;
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    for (std::size_t k = 0; k < p; k += 8) {
      lo = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(r + k)), _mm256_loadu_pd(coef + k), lo);
      hi = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(r + k + 4)), _mm256_loadu_pd(coef + k + 4), hi);
    }
    const __m256d t = _mm256_add_pd(lo, hi);
    const __m128d u = _mm_add_pd(_mm256_castpd256_pd128(t), _mm256_extractf128_pd(t, 1));
    scales[i] = 1.0 + (_mm_cvtsd_f64(u) + _mm_cvtsd_f64(_mm_unpackhi_pd(u, u)));
  }
}
#endif

/// The plain paths (also compiled for AVX2+FMA, picked at run time).
XS_MULTIVERSION void sh_scales_f32_plain(std::size_t n, std::size_t n_params, const float* harmonics,
                                         const double* coef, double* scales) {
  const std::size_t p = n_params;
  if (p % 8 == 0) {
    for (std::size_t i = 0; i < n; ++i) {
      const float* r = harmonics + i * p;
      double lanes[8] = {};
      for (std::size_t k = 0; k < p; k += 8)
        for (std::size_t j = 0; j < 8; ++j) lanes[j] += static_cast<double>(r[k + j]) * coef[k + j];
      scales[i] = 1.0 + reduce_lanes(lanes);
    }
    return;
  }
  const std::size_t p4 = p - p % 4;
  for (std::size_t i = 0; i < n; ++i) {
    const float* r = harmonics + i * p;
    double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
    std::size_t k = 0;
    for (; k < p4; k += 4) {
      a0 += static_cast<double>(r[k]) * coef[k];
      a1 += static_cast<double>(r[k + 1]) * coef[k + 1];
      a2 += static_cast<double>(r[k + 2]) * coef[k + 2];
      a3 += static_cast<double>(r[k + 3]) * coef[k + 3];
    }
    for (; k < p; ++k) a0 += static_cast<double>(r[k]) * coef[k];
    scales[i] = 1.0 + ((a0 + a1) + (a2 + a3));
  }
}

void sh_scales_f32_impl(std::size_t n, std::size_t n_params, const float* harmonics,
                        const double* coef, double* scales) {
#ifdef XS_SH_SIMD
  if (n_params % 8 == 0 && n_params > 0) {
    const int level = detail::simd_level();
    if (level >= 2) return sh_scales_f32_avx512(n, n_params, harmonics, coef, scales);
    if (level >= 1) return sh_scales_f32_avx2(n, n_params, harmonics, coef, scales);
  }
#endif
  sh_scales_f32_plain(n, n_params, harmonics, coef, scales);
}
}  // namespace

void sh_scales_f32(std::size_t n, std::size_t n_params, const float* harmonics,
                   const double* coef, double* scales) {
  sh_scales_f32_impl(n, n_params, harmonics, coef, scales);
}

namespace {
// The dense transposed product out[k] += Σ_i u_i·H[i,k] (H row-major n × p, float32 or
// float64). Every column is summed in row order, one FMA per row starting from out[k], on
// every path: the AVX-512 (8 columns a register) and AVX2 (4 a register) paths hold up to 32
// columns in registers over all rows, so each row costs its loads and FMAs only, and all paths
// give the same bits (as sh_scales_f32's, on any CPU with FMA).

#ifdef XS_SH_SIMD
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12: _mm256_undefined_pd in the intrinsics
/// Widen 8 float32 or load 8 float64 values into one AVX-512 register.
__attribute__((target("avx512f"), always_inline)) inline __m512d load8(const float* r) {
  return _mm512_cvtps_pd(_mm256_loadu_ps(r));
}
__attribute__((target("avx512f"), always_inline)) inline __m512d load8(const double* r) {
  return _mm512_loadu_pd(r);
}
__attribute__((target("avx2,fma"), always_inline)) inline __m256d load4(const float* r) {
  return _mm256_cvtps_pd(_mm_loadu_ps(r));
}
__attribute__((target("avx2,fma"), always_inline)) inline __m256d load4(const double* r) {
  return _mm256_loadu_pd(r);
}

/// The first NZ·8 columns of @p h (row stride @p p) over every row, in NZ registers.
template <int NZ, typename T>
__attribute__((target("avx512f"))) void transpose_cols_avx512(std::size_t n, std::size_t p,
                                                              const T* h, const double* u,
                                                              double* out) {
  __m512d acc[NZ];
  for (int j = 0; j < NZ; ++j) acc[j] = _mm512_loadu_pd(out + 8 * j);
  for (std::size_t i = 0; i < n; ++i) {
    const __m512d ui = _mm512_set1_pd(u[i]);
    const T* r = h + i * p;
    for (int j = 0; j < NZ; ++j) acc[j] = _mm512_fmadd_pd(ui, load8(r + 8 * j), acc[j]);
  }
  for (int j = 0; j < NZ; ++j) _mm512_storeu_pd(out + 8 * j, acc[j]);
}

/// The first NY·4 columns of @p h (row stride @p p) over every row, in NY registers.
template <int NY, typename T>
__attribute__((target("avx2,fma"))) void transpose_cols_avx2(std::size_t n, std::size_t p,
                                                             const T* h, const double* u,
                                                             double* out) {
  __m256d acc[NY];
  for (int j = 0; j < NY; ++j) acc[j] = _mm256_loadu_pd(out + 4 * j);
  for (std::size_t i = 0; i < n; ++i) {
    const __m256d ui = _mm256_set1_pd(u[i]);
    const T* r = h + i * p;
    for (int j = 0; j < NY; ++j) acc[j] = _mm256_fmadd_pd(ui, load4(r + 4 * j), acc[j]);
  }
  for (int j = 0; j < NY; ++j) _mm256_storeu_pd(out + 4 * j, acc[j]);
}

/// Columns in groups of 32 (the last group 8, 16 or 24): p % 8 == 0.
template <typename T>
void transpose_product_simd(int level, std::size_t n, std::size_t p, const T* h, const double* u,
                            double* out) {
  for (std::size_t c = 0; c < p; c += 32) {
    const std::size_t m = std::min<std::size_t>(32, p - c);
    if (level >= 2) {
      switch (m) {
        case 8: transpose_cols_avx512<1>(n, p, h + c, u, out + c); break;
        case 16: transpose_cols_avx512<2>(n, p, h + c, u, out + c); break;
        case 24: transpose_cols_avx512<3>(n, p, h + c, u, out + c); break;
        default: transpose_cols_avx512<4>(n, p, h + c, u, out + c); break;
      }
    } else {
      switch (m) {
        case 8: transpose_cols_avx2<2>(n, p, h + c, u, out + c); break;
        case 16: transpose_cols_avx2<4>(n, p, h + c, u, out + c); break;
        case 24: transpose_cols_avx2<6>(n, p, h + c, u, out + c); break;
        default: transpose_cols_avx2<8>(n, p, h + c, u, out + c); break;
      }
    }
  }
}
#pragma GCC diagnostic pop
#endif

/// The plain path (compiled for AVX2+FMA too, where the product-sum is one FMA as above).
template <typename T>
XS_ALWAYS_INLINE void transpose_product_rows(std::size_t n, std::size_t p, const T* h,
                                             const double* u, double* out) {
  for (std::size_t i = 0; i < n; ++i) {
    const double ui = u[i];
    const T* r = h + i * p;
    for (std::size_t k = 0; k < p; ++k) out[k] += ui * static_cast<double>(r[k]);
  }
}
XS_MULTIVERSION void transpose_product_plain(std::size_t n, std::size_t p, const float* h,
                                             const double* u, double* out) {
  transpose_product_rows(n, p, h, u, out);
}
XS_MULTIVERSION void transpose_product_plain(std::size_t n, std::size_t p, const double* h,
                                             const double* u, double* out) {
  transpose_product_rows(n, p, h, u, out);
}

template <typename T>
void dense_transpose_product_any(std::size_t n, std::size_t p, const T* h, const double* u,
                                 double* out) {
#ifdef XS_SH_SIMD
  const int level = detail::simd_level();
  if (p % 8 == 0 && p > 0 && level >= 1) return transpose_product_simd(level, n, p, h, u, out);
#endif
  transpose_product_plain(n, p, h, u, out);
}
}  // namespace

void dense_transpose_product(std::size_t n, std::size_t n_cols, const float* h, const double* u,
                             double* out) {
  dense_transpose_product_any(n, n_cols, h, u, out);
}

void dense_transpose_product(std::size_t n, std::size_t n_cols, const double* h, const double* u,
                             double* out) {
  dense_transpose_product_any(n, n_cols, h, u, out);
}

void harmonics_from_lookup_f32(const std::int32_t* i0, const std::int32_t* i1, std::size_t n,
                               const double* table, std::size_t n_rows, std::size_t row_stride,
                               std::size_t n_cols, float* out) {
  for (std::size_t j = 0; j < n; ++j) {
    require_index(static_cast<std::ptrdiff_t>(i0[j]), n_rows, "s0_lookup");
    require_index(static_cast<std::ptrdiff_t>(i1[j]), n_rows, "s1_lookup");
  }
  // The s1 rows are scattered over a table of some 50 MB: fetch the rows of the reflection
  // kAhead places on while this one is averaged, so that their misses overlap.
  constexpr std::size_t kAhead = 8;
  const std::size_t row_bytes = n_cols * sizeof(double);
  for (std::size_t j = 0; j < n; ++j) {
    if (j + kAhead < n) {
      const char* pa = reinterpret_cast<const char*>(table + static_cast<std::size_t>(i0[j + kAhead]) * row_stride);
      const char* pb = reinterpret_cast<const char*>(table + static_cast<std::size_t>(i1[j + kAhead]) * row_stride);
      for (std::size_t off = 0; off < row_bytes; off += 64) {
        __builtin_prefetch(pa + off);
        __builtin_prefetch(pb + off);
      }
    }
    const double* a = table + static_cast<std::size_t>(i0[j]) * row_stride;
    const double* b = table + static_cast<std::size_t>(i1[j]) * row_stride;
    float* o = out + j * n_cols;
    for (std::size_t k = 0; k < n_cols; ++k) o[k] = static_cast<float>((a[k] + b[k]) / 2.0);
  }
}

namespace {

/// The lean 1-D kernel's weights. Positions are unit-spaced, so with d = z − pos[first] and
/// a = 1/σ² the Gaussian weights are w_k = exp(−a(d − k)²) = exp(−a d²) · q^k · c_k,
/// q = exp(2 a d), c_k = exp(−a k²); the normalised weights w_k/Σw do not depend on the common
/// factor exp(−a d²), so a point needs one exponential, held from smooth_1d_prepare.
/// Raw window weights of one point for the lean 1-D kernels: the recurrence w_k = c_k·q^k
/// (c_k = exp(−a k²), q = exp(2a d₀)), or, for a point far outside the smoother's range
/// (@p direct), DIALS's formula exp(−((z − pos_k)/σ)²). Weights past the window are 0.
template <int W>
__attribute__((always_inline)) inline void lean_row_weights(bool direct, double q, int cnt,
                                                            const double* c, double z,
                                                            const double* window_pos,
                                                            double sigma, double* w) {
  if (!direct) {
    double t = 1.0;
    for (int k = 0; k < W; ++k) {
      w[k] = k < cnt ? t * c[k] : 0.0;
      t *= q;
    }
  } else {
    for (int k = 0; k < W; ++k) {
      const double ds = k < cnt ? (z - window_pos[k]) / sigma : 0.0;
      w[k] = k < cnt ? std::exp(-ds * ds) : 0.0;
    }
  }
}

/// Normalise one row of weights, return value = Σ w_k p_k / Σw, and append the row's
/// derivative entries w_k/Σw (columns from @p skip on) to @p data, and their columns to
/// @p indices; either pointer may be null to skip that output. A zero Σw leaves a zero row.
template <int W>
__attribute__((always_inline)) inline double write_normalised_row(
    const double* w, int first, int cnt, const double* p, int skip, std::int32_t* indices,
    double* data, std::size_t& nnz) {
  double sumw = 0.0;
  for (int k = 0; k < W; ++k) sumw += w[k];
  const double inv = sumw > 0.0 ? 1.0 / sumw : 0.0;
  double value = 0.0;
  for (int k = 0; k < W; ++k) {
    if (k >= cnt) break;
    const int col = first + k;
    const double wn = w[k] * inv;
    value += wn * p[col];
    if (data != nullptr && col >= skip) {
      if (indices != nullptr) indices[nnz] = col - skip;
      data[nnz] = wn;
      ++nnz;
    }
  }
  return value;
}

}  // namespace

std::size_t smooth_1d_prepare(const GaussianSmoother<1>& smoother, std::size_t n,
                              const double* x, double x_shift, std::uint16_t* window,
                              double* q) {
  require_finite(x, n, "x");
  const SmootherAxis& ax = smoother.axis(0);
  require(ax.num_values() <= 8191, "smooth_1d_prepare: at most 8191 smoother values");
  const double* pos = ax.positions().data();
  const double a = 1.0 / (smoother.sigma() * smoother.sigma());
  std::size_t n_far = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double z = ax.normalise(x[i] - x_shift);
    int f = 0, c = 0;
    ax.window(z, f, c);
    window[i] = window_record(static_cast<int>(f), static_cast<int>(c));  // first < 8192, count <= 5
    const double d0 = z - pos[f];
    const double arg = 2.0 * a * d0;
    // Far outside the range: q^k could overflow, or every weight underflows (a zero row in
    // DIALS, which the product form would not reproduce).
    const bool far = !(arg >= -150.0 && arg <= 150.0 && a * d0 * d0 <= 600.0);
    n_far += far ? 1 : 0;
    q[i] = far ? std::numeric_limits<double>::quiet_NaN() : arg;
  }
  if (n_far == 0) {
    for (std::size_t i = 0; i < n; ++i) q[i] = exp_bounded(q[i]);  // every argument in range
  } else {
    for (std::size_t i = 0; i < n; ++i)
      if (!std::isnan(q[i])) q[i] = exp_bounded(q[i]);
  }
  return n_far;
}

namespace {

#ifdef XS_SH_SIMD
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12: _mm512_undefined_* in the intrinsics
/// exp_bounded of eight lanes as its AVX2+FMA compilation computes each value (the product
/// and the reduction's two subtractions of k·ln 2 fused, Horner by fused multiply-add): the
/// same bits.
__attribute__((target("avx512f"), always_inline)) inline __m512d exp_bounded_lanes(__m512d x) {
  const __m512d t = _mm512_fmadd_pd(x, _mm512_set1_pd(detail::kLog2e),
                                    _mm512_set1_pd(detail::kRoundShifter));
  const __m512d kd = _mm512_sub_pd(t, _mm512_set1_pd(detail::kRoundShifter));
  const __m512d r = _mm512_fnmadd_pd(kd, _mm512_set1_pd(detail::kLn2Lo),
                                     _mm512_fnmadd_pd(kd, _mm512_set1_pd(detail::kLn2Hi), x));
  __m512d p = _mm512_set1_pd(detail::kExpPoly[0]);
  for (std::size_t c = 1; c < std::size(detail::kExpPoly); ++c)
    p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(detail::kExpPoly[c]));
  const __m512i scale = _mm512_slli_epi64(
      _mm512_add_epi64(_mm512_castpd_si512(t), _mm512_set1_epi64(1023)), 52);
  return _mm512_mul_pd(p, _mm512_castsi512_pd(scale));
}

/// v[i] = exp_bounded(v[i]) for arguments in range (detail::exp_args_in_range), 32 values at a
/// time in four interleaved chains: one exponential is a chain of ~15 dependent operations,
/// and a loop of one chain a step runs at the chain's latency, not the core's throughput.
__attribute__((target("avx512f"))) void exp_bounded_avx512(std::size_t n, double* v) {
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512d x[4];
    for (int z = 0; z < 4; ++z) x[z] = _mm512_loadu_pd(v + i + 8 * z);
    for (int z = 0; z < 4; ++z) x[z] = exp_bounded_lanes(x[z]);  // inlined: interleaved
    for (int z = 0; z < 4; ++z) _mm512_storeu_pd(v + i + 8 * z, x[z]);
  }
  for (; i < n; i += 8) {
    const __mmask8 in = n - i >= 8 ? 0xff : static_cast<__mmask8>((1u << (n - i)) - 1);
    _mm512_mask_storeu_pd(v + i, in, exp_bounded_lanes(_mm512_maskz_loadu_pd(in, v + i)));
  }
}
/// s[j] *= fac[j] over @p m values, and whether every product lies in [−700, 700]
/// (detail::exp_args_in_range's test, NaN outside) in the same pass: ordered comparisons in
/// mask registers (a comparison of doubles does not vectorise under -ftrapping-math).
__attribute__((target("avx512f"))) bool times_in_exp_range_avx512(std::size_t m, double* s,
                                                                  const double* fac) {
  const __m512d lo = _mm512_set1_pd(-detail::kExpArgLimit), hi = _mm512_set1_pd(detail::kExpArgLimit);
  unsigned outside = 0;  // lanes of any block with a product out of range
  for (std::size_t i = 0; i < m; i += 8) {
    const __mmask8 in = m - i >= 8 ? 0xff : static_cast<__mmask8>((1u << (m - i)) - 1);
    const __m512d x = _mm512_mul_pd(_mm512_maskz_loadu_pd(in, s + i), _mm512_maskz_loadu_pd(in, fac + i));
    _mm512_mask_storeu_pd(s + i, in, x);
    const __mmask8 inside = _mm512_cmp_pd_mask(x, lo, _CMP_GE_OQ) & _mm512_cmp_pd_mask(x, hi, _CMP_LE_OQ);
    outside |= in & static_cast<unsigned>(static_cast<__mmask8>(~inside));
  }
  return outside == 0;
}
#pragma GCC diagnostic pop
#endif

/// s[j] = exp(s[j]·fac[j]) over a chunk, vectorised (and compiled for AVX2+FMA too, picked at
/// run time: FMA may change the last bit, within exp_bounded's ~2 ulp; at AVX-512 the same
/// bits as AVX2+FMA). std::exp for a chunk with an argument outside [−700, 700], so
/// overflow/underflow follow IEEE as elsewhere.
XS_MULTIVERSION void exp_times(std::size_t m, double* s, const double* fac) {
#ifdef XS_SH_SIMD
  if (detail::simd_level() >= 2) {
    if (times_in_exp_range_avx512(m, s, fac)) {
      exp_bounded_avx512(m, s);
    } else {
      for (std::size_t j = 0; j < m; ++j) s[j] = std::exp(s[j]);  // exp_guarded's fallback
    }
    return;
  }
#endif
  for (std::size_t j = 0; j < m; ++j) s[j] *= fac[j];
  exp_guarded(m, s);  // inlined, so compiled for each target of this function
}

/// Per-call constants of the lean 1-D kernel for a window bound W: c_k = exp(−a k²) and the
/// axis (for the direct formula).
template <int W>
struct LeanRows {
  const SmootherAxis* ax;
  double sigma, x_shift;
  const double* pos;
  double c[W];
  const double* p;
  int skip;
};

/// One row of the lean kernel: its scale (before any B-factor exponential) and, unless
/// @p data is null, its derivative entries appended at @p nnz.
template <int W>
XS_ALWAYS_INLINE double lean_row(const LeanRows<W>& k, std::uint16_t record, double q,
                                 const double* x, std::int32_t* indices, double* data,
                                 std::size_t& nnz) {
  const int f = window_first(record), cnt = window_count(record);
  double w[W];
  // A NaN q marks a point far outside the range (see smooth_1d_prepare): direct formula.
  const bool direct = std::isnan(q);
  lean_row_weights<W>(direct, q, cnt, k.c, direct ? k.ax->normalise(*x - k.x_shift) : 0.0,
                      k.pos + f, k.sigma, w);
  return write_normalised_row<W>(w, f, cnt, k.p, k.skip, indices, data, nnz);
}

#ifdef XS_SH_SIMD
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12: _mm512_undefined_* in the intrinsics
// Eight (AVX-512) or four (AVX2) rows at once, one row a lane: the same operations as
// lean_row on each lane (the product recurrence, the sum over the W weights, the division, the
// value by FMA over the window's columns), so the scales are lean_row's bit for bit, as
// compiled for AVX2+FMA. Only blocks of rows without a far point (NaN q) come here; the
// derivative entries are written row by row from the lanes' normalised weights.

/// The smoother's values held in registers for lean_lanes_avx512, when they are few enough:
/// eight lanes then read p[first + j] by two permutations and a blend instead of a gather (a
/// gather of eight doubles costs several times as much on the CPUs measured). The same
/// values either way, so the same bits.
struct ValueRegisters {
  static constexpr std::size_t kMaxValues = 32;  ///< four registers
  __m512d r[4];
  bool held = false;
};

/// @p p's @p n values in @p v (zeros past them) when n <= ValueRegisters::kMaxValues.
__attribute__((target("avx512f"), always_inline)) inline void hold_values(const double* p,
                                                                         std::size_t n,
                                                                         ValueRegisters& v) {
  v.held = n <= ValueRegisters::kMaxValues;
  if (!v.held) return;
  alignas(64) double padded[ValueRegisters::kMaxValues] = {};
  std::copy(p, p + n, padded);
  for (int z = 0; z < 4; ++z) v.r[z] = _mm512_load_pd(padded + 8 * z);
}

/// p[col] of the lanes in @p in (other lanes: any value), from @p v when held, else gathered.
__attribute__((target("avx512f"), always_inline)) inline __m512d lane_values(
    const double* p, const ValueRegisters& v, __m512i col, __mmask8 in) {
  if (!v.held) return _mm512_mask_i64gather_pd(_mm512_setzero_pd(), in, col, p, 8);
  const __m512d low = _mm512_permutex2var_pd(v.r[0], col, v.r[1]);   // col mod 16 of 0…15
  const __m512d high = _mm512_permutex2var_pd(v.r[2], col, v.r[3]);  // … of 16…31
  return _mm512_mask_blend_pd(_mm512_test_epi64_mask(col, _mm512_set1_epi64(16)), low, high);
}

/// Weights w_k (0 past a row's window) of B blocks of 8 rows (rows 8b … 8b + 7 from
/// @p window and @p q), normalised in place into wn[b·W + k]; the blocks' scales into
/// @p scales[b]. @p values: the smoother's values (hold_values() of k.p). Each step is taken
/// for every block before the next, so that B > 1 runs B blocks' chains of dependent
/// operations (the weights' recurrence, their sum, the division, the value's fused
/// multiply-adds) side by side; the same operations on each lane for any B.
template <int W, int B = 1>
__attribute__((target("avx512f"), always_inline)) inline void lean_lanes_avx512(
    const LeanRows<W>& k, const ValueRegisters& values, const std::uint16_t* window,
    const double* q, __m512d* wn, __m512d* scales) {
  __m512i first[B], cnt[B];
  __m512d qv[B], t[B], sumw[B], inv[B];
  __mmask8 in[B][W];
  for (int b = 0; b < B; ++b) {
    const __m512i rec = _mm512_cvtepu16_epi64(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(window + 8 * b)));
    first[b] = _mm512_srli_epi64(rec, 3);
    cnt[b] = _mm512_and_si512(rec, _mm512_set1_epi64(7));
    qv[b] = _mm512_loadu_pd(q + 8 * b);
    t[b] = _mm512_set1_pd(1.0);
    sumw[b] = _mm512_setzero_pd();
    scales[b] = _mm512_setzero_pd();
  }
  for (int j = 0; j < W; ++j) {
    for (int b = 0; b < B; ++b) {
      in[b][j] = _mm512_cmpgt_epi64_mask(cnt[b], _mm512_set1_epi64(j));
      wn[b * W + j] = _mm512_maskz_mul_pd(in[b][j], t[b], _mm512_set1_pd(k.c[j]));
      t[b] = _mm512_mul_pd(t[b], qv[b]);
    }
  }
  for (int j = 0; j < W; ++j)
    for (int b = 0; b < B; ++b) sumw[b] = _mm512_add_pd(sumw[b], wn[b * W + j]);
  for (int b = 0; b < B; ++b) {
    const __mmask8 positive = _mm512_cmp_pd_mask(sumw[b], _mm512_setzero_pd(), _CMP_GT_OQ);
    inv[b] = _mm512_maskz_div_pd(positive, _mm512_set1_pd(1.0), sumw[b]);
  }
  for (int j = 0; j < W; ++j) {
    for (int b = 0; b < B; ++b) {
      __m512d& w = wn[b * W + j];
      w = _mm512_mul_pd(w, inv[b]);
      const __m512i col = _mm512_add_epi64(first[b], _mm512_set1_epi64(j));
      scales[b] = _mm512_mask3_fmadd_pd(w, lane_values(k.p, values, col, in[b][j]), scales[b],
                                        in[b][j]);
    }
  }
}

template <int W>
__attribute__((target("avx2,fma"))) inline __m256d lean_lanes_avx2(const LeanRows<W>& k,
                                                                  const std::uint16_t* window,
                                                                  const double* q, __m256d* wn) {
  const __m256i rec = _mm256_cvtepu16_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(window)));
  const __m256i first = _mm256_srli_epi64(rec, 3), cnt = _mm256_and_si256(rec, _mm256_set1_epi64x(7));
  const __m256d qv = _mm256_loadu_pd(q);
  __m256d t = _mm256_set1_pd(1.0), sumw = _mm256_setzero_pd();
  __m256d in[W];
  for (int j = 0; j < W; ++j) {
    in[j] = _mm256_castsi256_pd(_mm256_cmpgt_epi64(cnt, _mm256_set1_epi64x(j)));
    wn[j] = _mm256_and_pd(in[j], _mm256_mul_pd(t, _mm256_set1_pd(k.c[j])));
    t = _mm256_mul_pd(t, qv);
  }
  for (int j = 0; j < W; ++j) sumw = _mm256_add_pd(sumw, wn[j]);
  const __m256d positive = _mm256_cmp_pd(sumw, _mm256_setzero_pd(), _CMP_GT_OQ);
  const __m256d inv = _mm256_and_pd(positive, _mm256_div_pd(_mm256_set1_pd(1.0), sumw));
  __m256d value = _mm256_setzero_pd();
  for (int j = 0; j < W; ++j) {
    wn[j] = _mm256_mul_pd(wn[j], inv);
    const __m256i col = _mm256_add_epi64(first, _mm256_set1_epi64x(j));
    const __m256d pj = _mm256_mask_i64gather_pd(_mm256_setzero_pd(), k.p, col, in[j], 8);
    value = _mm256_blendv_pd(value, _mm256_fmadd_pd(wn[j], pj, value), in[j]);
  }
  return value;
}

/// True when none of the @p m values is NaN (no far point among the rows).
XS_ALWAYS_INLINE bool no_nan(const double* q, int m) {
  bool ok = true;
  for (int j = 0; j < m; ++j) ok &= !std::isnan(q[j]);
  return ok;
}

/// Append rows' derivative entries from their lanes' normalised weights (lane r of wn[k] is
/// row r's weight k), as write_normalised_row writes them; row starts into @p row_start.
/// Without branches: every row writes W values and keeps its own count (the rest is
/// overwritten by the next row). A row starts at most W entries per earlier row in, so the
/// W writes stay within the documented capacity n·W.
template <int W>
XS_ALWAYS_INLINE void lean_lanes_data(const double* wn, int lanes, const std::uint16_t* window,
                                      int skip, double* data, std::size_t& nnz,
                                      std::size_t* row_start) {
  for (int r = 0; r < lanes; ++r) {
    row_start[r] = nnz;
    const int f = window_first(window[r]), cnt = window_count(window[r]);
    const int dropped = f < skip ? 1 : 0;  // column 0 of a fixed first parameter
    for (int j = 0; j < W; ++j) data[nnz + j] = wn[std::min(j + dropped, W - 1) * lanes + r];
    nnz += static_cast<std::size_t>(std::max(cnt - dropped, 0));
  }
}

/// Rows [i0, i0 + m) of the lean kernel at SIMD @p level (1 or 2): blocks of 8 or 4 rows
/// without a far point in lanes, the rest row by row. Scales into @p scales; unless @p data
/// is null, derivative entries from @p nnz and each row's start into @p row_start.
template <int W>
__attribute__((target("avx512f,avx2,fma"))) void lean_rows_avx512(
    const LeanRows<W>& k, std::size_t m, const std::uint16_t* window, const double* q,
    const double* x, double* scales, double* data, std::size_t& nnz, std::size_t* row_start) {
  std::size_t i = 0;
  ValueRegisters values;
  hold_values(k.p, k.ax->num_values(), values);
  alignas(64) double wbuf[W * 8];
  for (; i + 8 <= m; i += 8) {
    if (!no_nan(q + i, 8)) {
      for (std::size_t r = i; r < i + 8; ++r) {
        row_start[r] = nnz;
        scales[r] = lean_row<W>(k, window[r], q[r], x + r, nullptr, data, nnz);
      }
      continue;
    }
    __m512d wn[W], value;
    lean_lanes_avx512<W>(k, values, window + i, q + i, wn, &value);
    _mm512_storeu_pd(scales + i, value);
    if (data == nullptr) continue;
    for (int j = 0; j < W; ++j) _mm512_store_pd(wbuf + 8 * j, wn[j]);
    lean_lanes_data<W>(wbuf, 8, window + i, k.skip, data, nnz, row_start + i);
  }
  for (; i < m; ++i) {
    row_start[i] = nnz;
    scales[i] = lean_row<W>(k, window[i], q[i], x + i, nullptr, data, nnz);
  }
}

template <int W>
__attribute__((target("avx2,fma"))) void lean_rows_avx2(
    const LeanRows<W>& k, std::size_t m, const std::uint16_t* window, const double* q,
    const double* x, double* scales, double* data, std::size_t& nnz, std::size_t* row_start) {
  std::size_t i = 0;
  alignas(32) double wbuf[W * 4];
  for (; i + 4 <= m; i += 4) {
    if (!no_nan(q + i, 4)) {
      for (std::size_t r = i; r < i + 4; ++r) {
        row_start[r] = nnz;
        scales[r] = lean_row<W>(k, window[r], q[r], x + r, nullptr, data, nnz);
      }
      continue;
    }
    __m256d wn[W];
    _mm256_storeu_pd(scales + i, lean_lanes_avx2<W>(k, window + i, q + i, wn));
    if (data == nullptr) continue;
    for (int j = 0; j < W; ++j) _mm256_store_pd(wbuf + 4 * j, wn[j]);
    lean_lanes_data<W>(wbuf, 4, window + i, k.skip, data, nnz, row_start + i);
  }
  for (; i < m; ++i) {
    row_start[i] = nnz;
    scales[i] = lean_row<W>(k, window[i], q[i], x + i, nullptr, data, nnz);
  }
}
#pragma GCC diagnostic pop
#endif

/// Rows of the held-window kernel for a compile-time window bound W (see smooth_1d_apply), in
/// chunks of 256 rows: each chunk's rows (in SIMD lanes at level 1 or 2 when no pattern is
/// written), then, for the smoothed B, the chunk's exponentials and derivative row scaling
/// while the rows are in cache.
template <int W>
__attribute__((always_inline)) inline std::size_t smooth_1d_apply_w(const SmootherAxis& ax, double sigma, std::size_t n,
                              const double* x, double x_shift, const std::uint16_t* window,
                              const double* q, const double* p, bool first_fixed,
                              const double* factor, double* scales, std::int32_t* indptr,
                              std::int32_t* indices, double* data, bool write_pattern, int level) {
  LeanRows<W> k{&ax, sigma, x_shift, ax.positions().data(), {}, p, first_fixed ? 1 : 0};
  const double a = 1.0 / (sigma * sigma);
  for (int j = 0; j < W; ++j) k.c[j] = std::exp(-a * j * j);
  constexpr std::size_t kChunk = 256;
  std::size_t nnz = 0;
  const bool pattern = data != nullptr && write_pattern;
  if (pattern) indptr[0] = 0;
  std::size_t row_start[kChunk + 1];  // nnz at the start of each row of the current chunk
  (void)level;
  for (std::size_t c0 = 0; c0 < n; c0 += kChunk) {
    const std::size_t m = std::min(kChunk, n - c0);
#ifdef XS_SH_SIMD
    if (!pattern && level >= 2) {
      lean_rows_avx512<W>(k, m, window + c0, q + c0, x + c0, scales + c0, data, nnz, row_start);
    } else if (!pattern && level >= 1) {
      lean_rows_avx2<W>(k, m, window + c0, q + c0, x + c0, scales + c0, data, nnz, row_start);
    } else
#endif
    {
      for (std::size_t i = c0; i < c0 + m; ++i) {
        row_start[i - c0] = nnz;
        scales[i] = lean_row<W>(k, window[i], q[i], x + i, pattern ? indices : nullptr, data, nnz);
        if (pattern) indptr[i + 1] = static_cast<std::int32_t>(nnz);
      }
    }
    // Smoothed B, per chunk of rows while they are in cache: s = exp(B·f), f = 1/(2d²), and
    // the derivative rows scaled by s·f (one vectorised exponential per row).
    if (factor == nullptr) continue;
    double* sc = scales + c0;
    const double* fac = factor + c0;
    exp_times(m, sc, fac);
    if (data == nullptr) continue;
    row_start[m] = nnz;  // row bounds from this call's own count, not from indptr
    for (std::size_t j = 0; j < m; ++j) {
      const double r = sc[j] * fac[j];
      for (std::size_t e = row_start[j]; e < row_start[j + 1]; ++e) data[e] *= r;
    }
  }
  return nnz;
}

/// The row loop for every window bound, compiled for AVX2+FMA too (picked at run time). The
/// width switch is written out (not detail::with_window_width): a lambda would be a separate
/// function that the target clones do not cover.
XS_MULTIVERSION std::size_t smooth_1d_apply_any(
    int width, const SmootherAxis& ax, double sigma, std::size_t n, const double* x,
    double x_shift, const std::uint16_t* window, const double* q, const double* p,
    bool first_fixed, const double* factor, double* scales, std::int32_t* indptr,
    std::int32_t* indices, double* data, bool write_pattern, int level) {
  switch (width) {
    case 1: return smooth_1d_apply_w<1>(ax, sigma, n, x, x_shift, window, q, p, first_fixed, factor, scales, indptr, indices, data, write_pattern, level);
    case 2: return smooth_1d_apply_w<2>(ax, sigma, n, x, x_shift, window, q, p, first_fixed, factor, scales, indptr, indices, data, write_pattern, level);
    case 3: return smooth_1d_apply_w<3>(ax, sigma, n, x, x_shift, window, q, p, first_fixed, factor, scales, indptr, indices, data, write_pattern, level);
    case 4: return smooth_1d_apply_w<4>(ax, sigma, n, x, x_shift, window, q, p, first_fixed, factor, scales, indptr, indices, data, write_pattern, level);
    default: return smooth_1d_apply_w<5>(ax, sigma, n, x, x_shift, window, q, p, first_fixed, factor, scales, indptr, indices, data, write_pattern, level);
  }
}

}  // namespace

std::size_t smooth_1d_apply(const GaussianSmoother<1>& smoother, std::size_t n, const double* x,
                            double x_shift, const std::uint16_t* window, const double* q,
                            const double* p, std::size_t n_params, bool first_fixed,
                            const double* factor, double* scales, std::int32_t* indptr,
                            std::int32_t* indices, double* data, bool write_pattern) {
  require_finite(p, n_params, "parameters");
  require(n_params == smoother.num_values(), "parameters must have one value per smoother value");
  if (factor != nullptr)
    require(all_positive_finite(factor, n), "factor must be finite and positive");
  const SmootherAxis& ax = smoother.axis(0);
  const double sigma = smoother.sigma();
  const std::size_t nnz = smooth_1d_apply_any(ax.max_window(), ax, sigma, n, x, x_shift, window,
                                               q, p, first_fixed, factor, scales, indptr,
                                               indices, data, write_pattern, detail::simd_level());
  return nnz;
}

// ------------------------------------------------------------ lean kernels of the one-pass f+g

namespace {

/// One row of lean_fused_rows, row by row (the plain path, rows of a far point, a block's
/// tail): lean_row's operations (so its scale's bits), the normalised weights at a fixed stride.
template <int W, int S>
XS_ALWAYS_INLINE double lean_fused_row(const LeanRows<W>& k, std::uint16_t record, double q,
                                       const double* x, double* wn) {
  const int f = window_first(record), cnt = window_count(record);
  double w[W];
  const bool direct = std::isnan(q);
  lean_row_weights<W>(direct, q, cnt, k.c, direct ? k.ax->normalise(*x - k.x_shift) : 0.0,
                      k.pos + f, k.sigma, w);
  double sumw = 0.0;
  for (int j = 0; j < W; ++j) sumw += w[j];
  const double inv = sumw > 0.0 ? 1.0 / sumw : 0.0;
  double value = 0.0;
  for (int j = 0; j < S; ++j) wn[j] = 0.0;
  for (int j = 0; j < W && j < cnt; ++j) {
    const double v = w[j] * inv;
    wn[j] = v;
    value += v * k.p[f + j];
  }
  return value;
}

#ifdef XS_SH_SIMD
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12: _mm512_undefined_* in the intrinsics
/// One block of 8 rows' normalised weights @p w (lane r of w[j]: row r's weight j) stored as
/// rows of S doubles at @p out: transposed in registers (S = 4) or through a small buffer.
template <int W, int S>
__attribute__((target("avx512f"), always_inline)) inline void store_weight_rows(const __m512d* w,
                                                                               double* out) {
  if constexpr (S == 4) {
    const __m512d zero = _mm512_setzero_pd();
    __m512d l[4];
    for (int j = 0; j < 4; ++j) l[j] = j < W ? w[j] : zero;
    // 8 rows × 4 weights: pairs of rows per 128-bit lane, then rows gathered by lane shuffles
    const __m512d t0 = _mm512_unpacklo_pd(l[0], l[1]);  // even rows, weights 0, 1
    const __m512d t1 = _mm512_unpackhi_pd(l[0], l[1]);  // odd rows, weights 0, 1
    const __m512d t2 = _mm512_unpacklo_pd(l[2], l[3]);  // even rows, weights 2, 3
    const __m512d t3 = _mm512_unpackhi_pd(l[2], l[3]);  // odd rows, weights 2, 3
    const __m512d ea = _mm512_shuffle_f64x2(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    const __m512d oa = _mm512_shuffle_f64x2(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    const __m512d eb = _mm512_shuffle_f64x2(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    const __m512d ob = _mm512_shuffle_f64x2(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    _mm512_storeu_pd(out, _mm512_shuffle_f64x2(ea, oa, _MM_SHUFFLE(2, 0, 2, 0)));       // rows 0, 1
    _mm512_storeu_pd(out + 8, _mm512_shuffle_f64x2(ea, oa, _MM_SHUFFLE(3, 1, 3, 1)));   // rows 2, 3
    _mm512_storeu_pd(out + 16, _mm512_shuffle_f64x2(eb, ob, _MM_SHUFFLE(2, 0, 2, 0)));  // rows 4, 5
    _mm512_storeu_pd(out + 24, _mm512_shuffle_f64x2(eb, ob, _MM_SHUFFLE(3, 1, 3, 1)));  // rows 6, 7
  } else {
    alignas(64) double buf[8 * W];
    for (int j = 0; j < W; ++j) _mm512_store_pd(buf + 8 * j, w[j]);
    for (int r = 0; r < 8; ++r)
      for (int j = 0; j < S; ++j) out[r * S + j] = j < W ? buf[8 * j + r] : 0.0;
  }
}

/// True when none of the 16 values at @p q is NaN (no_nan in two comparisons).
__attribute__((target("avx512f"), always_inline)) inline bool no_nan16(const double* q) {
  const __m512d a = _mm512_loadu_pd(q), b = _mm512_loadu_pd(q + 8);
  return (_mm512_cmp_pd_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_pd_mask(b, b, _CMP_UNORD_Q)) == 0;
}

/// Rows [i, i + 8) of lean_fused_avx512: in lanes, or row by row when one is a far point.
template <int W, int S>
__attribute__((target("avx512f,avx2,fma"), always_inline)) inline void lean_fused_block(
    const LeanRows<W>& k, const ValueRegisters& values, std::size_t i,
    const std::uint16_t* window, const double* q, const double* x, double* scales, double* wn) {
  if (!no_nan(q + i, 8)) {
    for (std::size_t r = i; r < i + 8; ++r)
      scales[r] = lean_fused_row<W, S>(k, window[r], q[r], x + r, wn + r * S);
    return;
  }
  __m512d w[W], value;
  lean_lanes_avx512<W>(k, values, window + i, q + i, w, &value);
  _mm512_storeu_pd(scales + i, value);
  store_weight_rows<W, S>(w, wn + i * S);
}

/// Rows in blocks of 8 lanes (lean_lanes_avx512: the row-by-row bits), two blocks side by side
/// where neither holds a far point, each block's weights stored as rows (store_weight_rows).
template <int W, int S>
__attribute__((target("avx512f,avx2,fma"))) void lean_fused_avx512(
    const LeanRows<W>& k, std::size_t m, const std::uint16_t* window, const double* q,
    const double* x, double* scales, double* wn) {
  std::size_t i = 0;
  ValueRegisters values;
  hold_values(k.p, k.ax->num_values(), values);
  for (; i + 16 <= m; i += 16) {
    if (!no_nan16(q + i)) {
      lean_fused_block<W, S>(k, values, i, window, q, x, scales, wn);
      lean_fused_block<W, S>(k, values, i + 8, window, q, x, scales, wn);
      continue;
    }
    __m512d w[2 * W], value[2];
    lean_lanes_avx512<W, 2>(k, values, window + i, q + i, w, value);
    _mm512_storeu_pd(scales + i, value[0]);
    _mm512_storeu_pd(scales + i + 8, value[1]);
    store_weight_rows<W, S>(w, wn + i * S);
    store_weight_rows<W, S>(w + W, wn + (i + 8) * S);
  }
  for (; i + 8 <= m; i += 8) lean_fused_block<W, S>(k, values, i, window, q, x, scales, wn);
  for (; i < m; ++i) scales[i] = lean_fused_row<W, S>(k, window[i], q[i], x + i, wn + i * S);
}

/// The same in blocks of 4 lanes (lean_lanes_avx2).
template <int W, int S>
__attribute__((target("avx2,fma"))) void lean_fused_avx2(
    const LeanRows<W>& k, std::size_t m, const std::uint16_t* window, const double* q,
    const double* x, double* scales, double* wn) {
  std::size_t i = 0;
  const __m256d zero = _mm256_setzero_pd();
  for (; i + 4 <= m; i += 4) {
    if (!no_nan(q + i, 4)) {
      for (std::size_t r = i; r < i + 4; ++r)
        scales[r] = lean_fused_row<W, S>(k, window[r], q[r], x + r, wn + r * S);
      continue;
    }
    __m256d w[W];
    _mm256_storeu_pd(scales + i, lean_lanes_avx2<W>(k, window + i, q + i, w));
    double* out = wn + i * S;
    if constexpr (S == 4) {
      __m256d l[4];
      for (int j = 0; j < 4; ++j) l[j] = j < W ? w[j] : zero;
      const __m256d t0 = _mm256_unpacklo_pd(l[0], l[1]);  // rows 0, 2: weights 0, 1
      const __m256d t1 = _mm256_unpackhi_pd(l[0], l[1]);  // rows 1, 3
      const __m256d t2 = _mm256_unpacklo_pd(l[2], l[3]);  // rows 0, 2: weights 2, 3
      const __m256d t3 = _mm256_unpackhi_pd(l[2], l[3]);
      _mm256_storeu_pd(out, _mm256_permute2f128_pd(t0, t2, 0x20));
      _mm256_storeu_pd(out + 4, _mm256_permute2f128_pd(t1, t3, 0x20));
      _mm256_storeu_pd(out + 8, _mm256_permute2f128_pd(t0, t2, 0x31));
      _mm256_storeu_pd(out + 12, _mm256_permute2f128_pd(t1, t3, 0x31));
    } else {
      alignas(32) double buf[4 * W];
      for (int j = 0; j < W; ++j) _mm256_store_pd(buf + 4 * j, w[j]);
      for (int r = 0; r < 4; ++r)
        for (int j = 0; j < S; ++j) out[r * S + j] = j < W ? buf[4 * j + r] : 0.0;
    }
  }
  for (; i < m; ++i) scales[i] = lean_fused_row<W, S>(k, window[i], q[i], x + i, wn + i * S);
}
#pragma GCC diagnostic pop
#endif

/// lean_fused_rows for a window bound W, in blocks of 256 rows (the smoothed B's exponentials
/// per block while its scales are in L1).
template <int W>
XS_ALWAYS_INLINE void lean_fused_rows_w(const SmootherAxis& ax, double sigma, std::size_t n,
                                        const double* x, const std::uint16_t* window,
                                        const double* q, const double* p, const double* factor,
                                        double* scales, double* wn, int level) {
  constexpr int S = fused::lean_fused_stride(W);
  LeanRows<W> k{&ax, sigma, 0.0, ax.positions().data(), {}, p, 0};
  const double a = 1.0 / (sigma * sigma);
  for (int j = 0; j < W; ++j) k.c[j] = std::exp(-a * j * j);
  constexpr std::size_t kBlock = 256;
  (void)level;
  for (std::size_t c0 = 0; c0 < n; c0 += kBlock) {
    const std::size_t m = std::min(kBlock, n - c0);
#ifdef XS_SH_SIMD
    if (level >= 2) {
      lean_fused_avx512<W, S>(k, m, window + c0, q + c0, x + c0, scales + c0, wn + c0 * S);
    } else if (level >= 1) {
      lean_fused_avx2<W, S>(k, m, window + c0, q + c0, x + c0, scales + c0, wn + c0 * S);
    } else
#endif
    {
      for (std::size_t i = c0; i < c0 + m; ++i)
        scales[i] = lean_fused_row<W, S>(k, window[i], q[i], x + i, wn + i * S);
    }
    if (factor != nullptr) exp_times(m, scales + c0, factor + c0);
  }
}

/// The width switch, compiled for AVX2+FMA too (as smooth_1d_apply_any).
XS_MULTIVERSION void lean_fused_rows_any(int width, const SmootherAxis& ax, double sigma,
                                         std::size_t n, const double* x,
                                         const std::uint16_t* window, const double* q,
                                         const double* p, const double* factor, double* scales,
                                         double* wn, int level) {
  switch (width) {
    case 1: return lean_fused_rows_w<1>(ax, sigma, n, x, window, q, p, factor, scales, wn, level);
    case 2: return lean_fused_rows_w<2>(ax, sigma, n, x, window, q, p, factor, scales, wn, level);
    case 3: return lean_fused_rows_w<3>(ax, sigma, n, x, window, q, p, factor, scales, wn, level);
    case 4: return lean_fused_rows_w<4>(ax, sigma, n, x, window, q, p, factor, scales, wn, level);
    default: return lean_fused_rows_w<5>(ax, sigma, n, x, window, q, p, factor, scales, wn, level);
  }
}

/// One row's share of lean_fused_transpose: slot[j] += u·w[j], j < S (one FMA each).
template <int S>
XS_ALWAYS_INLINE void add_row_plain(double* slot, double u, const double* w) {
  for (int j = 0; j < S; ++j) slot[j] += u * w[j];
}

#ifdef XS_SH_SIMD
template <int S>
__attribute__((target("avx2,fma"))) void lean_transpose_avx2(
    std::size_t n, const std::uint16_t* window, const double* wn, const double* u,
    const double* scales, const double* factor, std::size_t slots, double* acc) {
  for (std::size_t i = 0; i < n; ++i) {
    double ui = u[i];
    if (factor != nullptr) ui *= scales[i] * factor[i];
    double* slot = acc + ((i & 3) * slots + static_cast<std::size_t>(window_first(window[i]))) * S;
    const __m256d uv = _mm256_set1_pd(ui);
    for (int j = 0; j < S; j += 4)
      _mm256_storeu_pd(slot + j, _mm256_fmadd_pd(uv, _mm256_loadu_pd(wn + i * S + j),
                                                 _mm256_loadu_pd(slot + j)));
  }
}
#endif

#ifdef XS_SH_SIMD
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12: _mm512_undefined_* in the intrinsics
/// lean_transpose_avx2's updates, eight rows at a time: the rows' accumulator offsets and
/// coefficients (u, or u·(scale·factor)) formed in vector registers and read back one row at a
/// time, so that a row costs its accumulator's update alone. The same fused multiply-adds in
/// the same order: the same bits.
template <int S>
__attribute__((target("avx512f,avx2,fma"))) void lean_transpose_avx512(
    std::size_t n, const std::uint16_t* window, const double* wn, const double* u,
    const double* scales, const double* factor, std::size_t slots, double* acc) {
  static_assert(S == 4 || S == 8, "strides 4 and 8");
  const auto sl = static_cast<long long>(slots);
  // row i's accumulator: ((i mod 4)·slots + window first)·S values in
  const __m512i phase = _mm512_setr_epi64(0, sl, 2 * sl, 3 * sl, 0, sl, 2 * sl, 3 * sl);
  alignas(64) std::int64_t offset[8];
  alignas(64) double coef[8];
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m512i record =
        _mm512_cvtepu16_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(window + i)));
    const __m512i slot = _mm512_add_epi64(phase, _mm512_srli_epi64(record, 3));
    _mm512_store_si512(offset, _mm512_slli_epi64(slot, S == 4 ? 2 : 3));
    __m512d ui = _mm512_loadu_pd(u + i);
    if (factor != nullptr)
      ui = _mm512_mul_pd(ui, _mm512_mul_pd(_mm512_loadu_pd(scales + i), _mm512_loadu_pd(factor + i)));
    _mm512_store_pd(coef, ui);
    for (int r = 0; r < 8; ++r) {
      double* a = acc + offset[r];
      const double* w = wn + (i + static_cast<std::size_t>(r)) * S;
      const __m256d uv = _mm256_broadcast_sd(coef + r);
      for (int j = 0; j < S; j += 4)
        _mm256_storeu_pd(a + j, _mm256_fmadd_pd(uv, _mm256_loadu_pd(w + j), _mm256_loadu_pd(a + j)));
    }
  }
  if (i < n)
    lean_transpose_avx2<S>(n - i, window + i, wn + i * S, u + i, scales ? scales + i : nullptr,
                           factor ? factor + i : nullptr, slots, acc);
}
#pragma GCC diagnostic pop
#endif

template <int S>
XS_ALWAYS_INLINE void lean_transpose_s(std::size_t n, const std::uint16_t* window,
                                       const double* wn, const double* u, const double* scales,
                                       const double* factor, std::size_t n_params, int skip,
                                       double* out, std::vector<double>& acc, int level) {
  const std::size_t slots = n_params + 1;  // window firsts 0 … n_params − 1
  acc.assign(4 * slots * S, 0.0);
  double* a = acc.data();
  (void)level;
#ifdef XS_SH_SIMD
  if (level >= 2) {
    lean_transpose_avx512<S>(n, window, wn, u, scales, factor, slots, a);
  } else if (level >= 1) {
    lean_transpose_avx2<S>(n, window, wn, u, scales, factor, slots, a);
  } else
#endif
  {
    for (std::size_t i = 0; i < n; ++i) {
      double ui = u[i];
      if (factor != nullptr) ui *= scales[i] * factor[i];
      add_row_plain<S>(a + ((i & 3) * slots + static_cast<std::size_t>(window_first(window[i]))) * S,
                       ui, wn + i * S);
    }
  }
  // column col of the full parameters: weight j of the rows whose window starts at col − j
  for (std::size_t col = static_cast<std::size_t>(skip); col < n_params; ++col) {
    double total = 0.0;
    for (std::size_t c = 0; c < 4; ++c)
      for (std::size_t j = 0; j < static_cast<std::size_t>(S) && j <= col; ++j)
        total += a[(c * slots + col - j) * S + j];
    out[col - static_cast<std::size_t>(skip)] += total;
  }
}

XS_MULTIVERSION void lean_transpose_any(int stride, std::size_t n, const std::uint16_t* window,
                                        const double* wn, const double* u, const double* scales,
                                        const double* factor, std::size_t n_params, int skip,
                                        double* out, std::vector<double>& acc, int level) {
  if (stride == 4)
    lean_transpose_s<4>(n, window, wn, u, scales, factor, n_params, skip, out, acc, level);
  else
    lean_transpose_s<8>(n, window, wn, u, scales, factor, n_params, skip, out, acc, level);
}

}  // namespace

namespace fused {

void lean_fused_rows(const GaussianSmoother<1>& smoother, std::size_t n, const double* x,
                     const std::uint16_t* window, const double* q, const double* p,
                     const double* factor, double* scales, double* wn) {
  const SmootherAxis& ax = smoother.axis(0);
  lean_fused_rows_any(ax.max_window(), ax, smoother.sigma(), n, x, window, q, p, factor, scales,
                      wn, detail::simd_level());
}

void lean_fused_transpose(int max_window, std::size_t n, const std::uint16_t* window,
                          const double* wn, const double* u, const double* scales,
                          const double* factor, std::size_t n_params, bool first_fixed,
                          double* out, std::vector<double>& acc) {
  lean_transpose_any(lean_fused_stride(max_window), n, window, wn, u, scales, factor, n_params,
                     first_fixed ? 1 : 0, out, acc, detail::simd_level());
}

std::size_t smooth_1d_apply_prechecked(const GaussianSmoother<1>& smoother, std::size_t n,
                                    const double* x, double x_shift, const std::uint16_t* window,
                                    const double* q, const double* p, bool first_fixed,
                                    const double* factor, double* scales, double* data) {
  const SmootherAxis& ax = smoother.axis(0);
  return smooth_1d_apply_any(ax.max_window(), ax, smoother.sigma(), n, x, x_shift, window, q, p,
                             first_fixed, factor, scales, nullptr, nullptr, data, false,
                             detail::simd_level());
}

}  // namespace fused

namespace {

/// validate_csr for either index width; messages are built only on failure.
template <typename I>
void validate_csr_any(std::size_t n_rows, std::size_t n_cols, const I* indptr, const I* indices,
                      std::size_t nnz, const char* what) {
  const auto fail = [what](const char* problem) {
    throw std::invalid_argument(std::string(what) + ": " + problem);
  };
  if (indptr[0] != 0) fail("indptr must start at 0");
  for (std::size_t i = 0; i < n_rows; ++i)
    if (indptr[i + 1] < indptr[i]) fail("indptr must be non-decreasing");
  if (static_cast<std::size_t>(indptr[n_rows]) != nnz)
    fail("indptr must end at the number of stored entries");
  const auto limit = static_cast<std::int64_t>(n_cols);
  for (std::size_t k = 0; k < nnz; ++k)
    if (indices[k] < 0 || static_cast<std::int64_t>(indices[k]) >= limit)
      require_index(static_cast<std::ptrdiff_t>(indices[k]), n_cols, what);
}

}  // namespace

void validate_csr(std::size_t n_rows, std::size_t n_cols, const std::int64_t* indptr,
                  const std::int64_t* indices, std::size_t nnz, const char* what) {
  validate_csr_any(n_rows, n_cols, indptr, indices, nnz, what);
}

void bin_coordinates(std::size_t n, const double* values, std::ptrdiff_t stride, double start,
                     double width, bool inverse_square, double* out) {
  if (inverse_square) {
    for (std::size_t i = 0; i < n; ++i) {
      const double x = values[static_cast<std::ptrdiff_t>(i) * stride];
      out[i] = (1.0 / (x * x) - start) / width;
    }
    return;
  }
  for (std::size_t i = 0; i < n; ++i)
    out[i] = (values[static_cast<std::ptrdiff_t>(i) * stride] - start) / width;
}

WeightMatrix::WeightMatrix(std::size_t n_rows, std::size_t n_cols,
                           std::vector<std::int32_t> indptr, std::vector<std::int32_t> indices,
                           std::vector<double> data, std::vector<double> first_col,
                           bool fixed_first)
    : n_rows_(n_rows),
      n_cols_(n_cols),
      fixed_(fixed_first),
      indptr_(std::move(indptr)),
      indices_(std::move(indices)),
      data_(std::move(data)),
      first_col_(std::move(first_col)) {
  require(indptr_.size() == n_rows_ + 1, "indptr must have n_rows + 1 entries");
  require(indices_.size() == data_.size(), "indices and data must have the same length");
  require(fixed_ ? first_col_.size() == n_rows_ : first_col_.empty(),
          "first_col must have one entry per row with a fixed first parameter, else be empty");
  validate_csr_any(n_rows_, n_cols_, indptr_.data(), indices_.data(), data_.size(),
                   "weight matrix");
}

void WeightMatrix::values(const double* p, double* out) const {
  if (!fixed_)
    csr_matvec(n_rows_, indptr_.data(), indices_.data(), data_.data(), p, nullptr, 0.0, out);
  else
    csr_matvec(n_rows_, indptr_.data(), indices_.data(), data_.data(), p + 1, first_col_.data(),
               p[0], out);
}

void WeightMatrix::b_scales(const double* p, const double* factor, double* scales,
                            double* d_data) const {
  const bool fixed = fixed_;
  smooth_b_scales(n_rows_, indptr_.data(), indices_.data(), data_.data(), fixed ? p + 1 : p,
                  fixed ? first_col_.data() : nullptr, fixed ? p[0] : 0.0, factor, scales, d_data);
}

void WeightMatrix::values_rows(const double* p, std::size_t first, std::size_t count,
                               double* out) const {
  const double* fc = fixed_ ? first_col_.data() + first : nullptr;
  csr_matvec(count, indptr_.data() + first, indices_.data(), data_.data(), fixed_ ? p + 1 : p, fc,
             fixed_ ? p[0] : 0.0, out);
}

void WeightMatrix::b_scales_rows(const double* p, const double* factor, std::size_t first,
                                 std::size_t count, double* scales, double* d_data) const {
  // smooth_b_scales on a row range; d_data relative to the range's first stored entry
  values_rows(p, first, count, scales);
  for (std::size_t i = 0; i < count; ++i) scales[i] *= factor[first + i];
  exp_guarded(count, scales);
  const std::int32_t base = indptr_[first];
  for (std::size_t i = 0; i < count; ++i) {
    const double r = scales[i] * factor[first + i];
    for (std::int32_t k = indptr_[first + i]; k < indptr_[first + i + 1]; ++k)
      d_data[k - base] = data_[static_cast<std::size_t>(k)] * r;
  }
}

}  // namespace xtalscale::components
