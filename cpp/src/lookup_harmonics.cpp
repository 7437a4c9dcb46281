// LookupHarmonicsTerm: the absorption surface's lookup-table harmonics formed on the fly from
// the grid's separable factors (harmonics::LookupFactors), with no per-row harmonic block.
//
// Compiled with -ffp-contract=off (CMakeLists.txt): a harmonic is 0.5·(a0·b0 + a1·b1) with
// each product rounded, which is (T[i0] + T[i1]) / 2 of the table harmonics_from_lookup reads
// (T = a·b; halving is exact either way), so the compiler must not fuse a product into the
// sum. The fused multiply-adds of the scale's sum are written out (intrinsics or std::fma), so
// every SIMD level gives the same bits. By rows the transposed product reads the rows formed
// here (components::dense_transpose_product, the same bits at every level with FMA); by grid
// rows it goes through the θ rows' sums (the second half of this file).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "internal/kernel_support.hpp"  // XS_MULTIVERSION, XS_ALWAYS_INLINE, simd_level
#include "internal/large_buffers.hpp"
#include "xtalscale/check.hpp"
#include "xtalscale/model_block.hpp"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define XS_LOOKUP_SIMD 1
#include <immintrin.h>
#endif

namespace xtalscale {
namespace {

using detail::sized;

/// Grid index → its θ and φ factor rows, for factor rows of @p P doubles (0: a stride known
/// at run time only; the vectorised kernels fix it, so that it costs no multiplication). The
/// division by n_phi is a multiplication by a rounded-up reciprocal and a shift (Granlund &
/// Montgomery): for indices below 2³¹ and s = 31 + ⌈log₂ n_phi⌉, m = ⌊2^s / n_phi⌋ + 1 gives
/// ⌊i·m / 2^s⌋ = ⌊i / n_phi⌋ exactly, and i·m < 2⁶⁴. Row j = i − t·n_phi of the φ factors
/// starts i·stride − t·n_phi·stride values in. Two multiplications an index in all.
template <std::size_t P = 0>
struct GridRows {
  const double* theta;
  const double* phi;
  std::size_t runtime_stride;  // factor columns (the factors' n_params) when P is 0
  std::uint64_t magic, phi_step;  // phi_step = n_phi·stride
  unsigned shift;

  explicit GridRows(const harmonics::LookupFactors& f)
      : theta(f.theta.data()), phi(f.phi.data()), runtime_stride(f.n_params),
        phi_step(f.n_phi * f.n_params) {
    unsigned log2_ceil = 0;
    while ((std::uint64_t{1} << log2_ceil) < f.n_phi) ++log2_ceil;
    shift = 31 + log2_ceil;
    magic = (std::uint64_t{1} << shift) / f.n_phi + 1;
  }

  XS_ALWAYS_INLINE std::size_t stride() const { return P != 0 ? P : runtime_stride; }

  XS_ALWAYS_INLINE void rows(std::int32_t index, const double*& a, const double*& b) const {
    const auto i = static_cast<std::uint64_t>(index);
    const std::uint64_t t = (i * magic) >> shift;
    a = theta + t * stride();
    b = phi + (i * stride() - t * phi_step);
  }
};

/// What one kernel call reads: @p count rows' grid indices and the harmonics used (each
/// factor row holds exactly these: see the term's constructor).
struct LookupRows {
  const harmonics::LookupFactors& factors;
  const std::int32_t* s0;
  const std::int32_t* s1;
  std::size_t count;
  std::size_t n_params;
};

/// The eight-lane reduction of the scale's sum (as the float32 block's, sh_scales_f32).
XS_ALWAYS_INLINE double reduce_lanes(const double* l) {
  return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

// ------------------------------------------------------------------ plain paths (any n_params)

/// Row i's harmonics into @p h: the mean of the two grid points' factor products.
XS_ALWAYS_INLINE void form_row(const GridRows<>& grid, const LookupRows& r, std::size_t i,
                               double* h) {
  const double *a0, *b0, *a1, *b1;
  grid.rows(r.s0[i], a0, b0);
  grid.rows(r.s1[i], a1, b1);
  for (std::size_t k = 0; k < r.n_params; ++k) h[k] = 0.5 * (a0[k] * b0[k] + a1[k] * b1[k]);
}

XS_ALWAYS_INLINE double scale_of_row(const double* h, std::size_t n_params, const double* c) {
  double lanes[8] = {};
  for (std::size_t k = 0; k < n_params; ++k) lanes[k % 8] = std::fma(h[k], c[k], lanes[k % 8]);
  return 1.0 + reduce_lanes(lanes);
}

/// Scales of the rows and, unless @p rows is null, the rows themselves (row-major); @p work
/// holds one row when @p rows is null.
XS_MULTIVERSION void scales_plain(const LookupRows& r, const double* coef, double* scales,
                                  double* rows, double* work) {
  const GridRows<> grid(r.factors);
  for (std::size_t i = 0; i < r.count; ++i) {
    double* h = rows ? rows + i * r.n_params : work;
    form_row(grid, r, i, h);
    scales[i] = scale_of_row(h, r.n_params, coef);
  }
}

#ifdef XS_LOOKUP_SIMD
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12: _mm256_undefined_pd in the intrinsics

// ------------------------------------------------------------------ AVX-512: 8 harmonics a register

/// The harmonics of the row with grid indices @p i0, @p i1 in NZ registers.
template <int NZ>
__attribute__((target("avx512f"), always_inline)) inline void form_row_avx512(
    const GridRows<8 * NZ>& grid, std::int32_t i0, std::int32_t i1, __m512d* h) {
  const double *a0, *b0, *a1, *b1;
  grid.rows(i0, a0, b0);
  grid.rows(i1, a1, b1);
  const __m512d half = _mm512_set1_pd(0.5);
  for (int z = 0; z < NZ; ++z) {
    const __m512d p0 = _mm512_mul_pd(_mm512_loadu_pd(a0 + 8 * z), _mm512_loadu_pd(b0 + 8 * z));
    const __m512d p1 = _mm512_mul_pd(_mm512_loadu_pd(a1 + 8 * z), _mm512_loadu_pd(b1 + 8 * z));
    h[z] = _mm512_mul_pd(half, _mm512_add_pd(p0, p1));
  }
}

// (The kernels copy what they read per row into locals: their stores are through may-alias
// vector types, after which the compiler would otherwise reload every field for every row.)

/// @p base (1: a scale) + the eight-lane reduction of each of eight rows' accumulators @p a
/// (lanes l0…l7 of a row), in row order: the single row's additions, ((l0 + l4) + (l2 + l6)) + ((l1 + l5) +
/// (l3 + l7)) as the 512 → 256 → 128 → 64-bit halvings form them, with the halves of two,
/// four and then eight rows gathered into one register before each addition.
__attribute__((target("avx512f"), always_inline)) inline __m512d reduce_eight(const __m512d* a,
                                                                             double base = 1.0) {
  __m512d t[4];  // rows 2p, 2p + 1: (l_j + l_{j+4}) for j < 4, each row a 256-bit half
  for (int p = 0; p < 4; ++p)
    t[p] = _mm512_add_pd(_mm512_shuffle_f64x2(a[2 * p], a[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f64x2(a[2 * p], a[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  __m512d u[2];  // rows 4p … 4p + 3: (that + the other pair), each row a 128-bit lane
  for (int p = 0; p < 2; ++p)
    u[p] = _mm512_add_pd(_mm512_shuffle_f64x2(t[2 * p], t[2 * p + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f64x2(t[2 * p], t[2 * p + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  // lane q of u[0] is row q, of u[1] row 4 + q: the last addition gives rows 0 4 1 5 2 6 3 7
  const __m512d sum = _mm512_add_pd(_mm512_unpacklo_pd(u[0], u[1]), _mm512_unpackhi_pd(u[0], u[1]));
  const __m512d scale = _mm512_add_pd(_mm512_set1_pd(base), sum);
  return _mm512_permutexvar_pd(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), scale);
}

template <int NZ>
__attribute__((target("avx512f"))) void scales_avx512(const LookupRows& r, const double* coef,
                                                      double* scales, double* rows) {
  const GridRows<8 * NZ> grid(r.factors);
  const std::int32_t *s0 = r.s0, *s1 = r.s1;
  const std::size_t count = r.count;
  __m512d c[NZ];
  for (int z = 0; z < NZ; ++z) c[z] = _mm512_loadu_pd(coef + 8 * z);
  std::size_t i = 0;
  // Eight rows at a time: their eight accumulators reduced together (reduce_eight), which
  // costs about a third of the shuffles of eight single-row reductions, with the same sums.
  for (; i + 8 <= count; i += 8) {
    __m512d acc[8];
    for (int row = 0; row < 8; ++row) {
      __m512d h[NZ];
      form_row_avx512<NZ>(grid, s0[i + row], s1[i + row], h);
      if (rows != nullptr)
        for (int z = 0; z < NZ; ++z) _mm512_storeu_pd(rows + (i + row) * 8 * NZ + 8 * z, h[z]);
      acc[row] = _mm512_setzero_pd();
      for (int z = 0; z < NZ; ++z) acc[row] = _mm512_fmadd_pd(h[z], c[z], acc[row]);
    }
    _mm512_storeu_pd(scales + i, reduce_eight(acc));
  }
  for (; i < count; ++i) {
    __m512d h[NZ];
    form_row_avx512<NZ>(grid, s0[i], s1[i], h);
    if (rows != nullptr)
      for (int z = 0; z < NZ; ++z) _mm512_storeu_pd(rows + i * 8 * NZ + 8 * z, h[z]);
    __m512d acc = _mm512_setzero_pd();
    for (int z = 0; z < NZ; ++z) acc = _mm512_fmadd_pd(h[z], c[z], acc);
    const __m256d t = _mm256_add_pd(_mm512_castpd512_pd256(acc), _mm512_extractf64x4_pd(acc, 1));
    const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(t), _mm256_extractf128_pd(t, 1));
    scales[i] = 1.0 + (_mm_cvtsd_f64(s) + _mm_cvtsd_f64(_mm_unpackhi_pd(s, s)));
  }
}

// ------------------------------------------------------------------ AVX2: 4 harmonics a register

/// Row i's harmonics in 2·NZ registers (register 2z: k = 8z..8z+3, 2z+1: k = 8z+4..8z+7).
template <int NZ>
__attribute__((target("avx2,fma"), always_inline)) inline void form_row_avx2(
    const GridRows<8 * NZ>& grid, std::int32_t i0, std::int32_t i1, __m256d* h) {
  const double *a0, *b0, *a1, *b1;
  grid.rows(i0, a0, b0);
  grid.rows(i1, a1, b1);
  const __m256d half = _mm256_set1_pd(0.5);
  for (int y = 0; y < 2 * NZ; ++y) {
    const __m256d p0 = _mm256_mul_pd(_mm256_loadu_pd(a0 + 4 * y), _mm256_loadu_pd(b0 + 4 * y));
    const __m256d p1 = _mm256_mul_pd(_mm256_loadu_pd(a1 + 4 * y), _mm256_loadu_pd(b1 + 4 * y));
    h[y] = _mm256_mul_pd(half, _mm256_add_pd(p0, p1));
  }
}

template <int NZ>
__attribute__((target("avx2,fma"))) void scales_avx2(const LookupRows& r, const double* coef,
                                                     double* scales, double* rows) {
  const GridRows<8 * NZ> grid(r.factors);
  const std::int32_t *s0 = r.s0, *s1 = r.s1;
  const std::size_t count = r.count;
  __m256d c[2 * NZ];
  for (int y = 0; y < 2 * NZ; ++y) c[y] = _mm256_loadu_pd(coef + 4 * y);
  for (std::size_t i = 0; i < count; ++i) {
    __m256d h[2 * NZ];
    form_row_avx2<NZ>(grid, s0[i], s1[i], h);
    if (rows != nullptr)
      for (int y = 0; y < 2 * NZ; ++y) _mm256_storeu_pd(rows + i * 8 * NZ + 4 * y, h[y]);
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    for (int z = 0; z < NZ; ++z) {
      lo = _mm256_fmadd_pd(h[2 * z], c[2 * z], lo);
      hi = _mm256_fmadd_pd(h[2 * z + 1], c[2 * z + 1], hi);
    }
    const __m256d t = _mm256_add_pd(lo, hi);
    const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(t), _mm256_extractf128_pd(t, 1));
    scales[i] = 1.0 + (_mm_cvtsd_f64(s) + _mm_cvtsd_f64(_mm_unpackhi_pd(s, s)));
  }
}

#pragma GCC diagnostic pop

/// Calls @p run with the register count NZ = n_params / 8 as a compile-time constant when the
/// hand-vectorised kernels take it at @p level (AVX-512: up to 48 harmonics, lmax 6; AVX2:
/// up to 24, lmax 4, whose accumulators and row still fit in its 16 registers); false when
/// the plain path must serve.
template <class Run>
bool with_register_count(int level, std::size_t n_params, Run run) {
  if (level < 1 || n_params == 0 || n_params % 8 != 0) return false;
  const std::size_t nz = n_params / 8;
  if (nz > (level >= 2 ? 6u : 3u)) return false;
  switch (nz) {
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 3: run(std::integral_constant<int, 3>{}); break;
    case 4: run(std::integral_constant<int, 4>{}); break;
    case 5: run(std::integral_constant<int, 5>{}); break;
    default: run(std::integral_constant<int, 6>{}); break;
  }
  return true;
}
#endif

/// Scales (and rows, unless null) of @p r at the widest level this CPU runs.
void lookup_scales(const LookupRows& r, const double* coef, double* scales, double* rows,
                   std::vector<double>& work) {
#ifdef XS_LOOKUP_SIMD
  const int level = detail::simd_level();
  if (with_register_count(level, r.n_params, [&](auto nz) {
        constexpr int NZ = decltype(nz)::value;
        if (level >= 2)
          scales_avx512<NZ>(r, coef, scales, rows);
        else if constexpr (NZ <= 3)
          scales_avx2<NZ>(r, coef, scales, rows);
      }))
    return;
#endif
  scales_plain(r, coef, scales, rows, sized(work, r.n_params));
}


// ------------------------------------------------------------------ by grid (θ) rows

/// What the grid-row kernels read: per θ row the m ≠ 0 sums F (n_theta × lanes) and F_0,
/// per φ column trig_m(φ) of the m ≠ 0 lanes (n_phi × lanes), and the grid's index split.
struct GridTables {
  const double* f;
  const double* f0;
  const double* trig;
  std::size_t lanes;  // a multiple of 8
  std::uint64_t magic, n_phi;
  unsigned shift;

  XS_ALWAYS_INLINE void split(std::int32_t index, std::size_t& t, std::size_t& j) const {
    const auto i = static_cast<std::uint64_t>(index);
    const std::uint64_t q = (i * magic) >> shift;  // GridRows' division by n_phi
    t = q;
    j = i - q * n_phi;
  }
};

/// The first 64-byte boundary at or after @p p: the grid-row tables are held with 8 values of
/// slack and start there, so that each eight-lane row is one cache line (a row split over two
/// lines costs two accesses, and a store to one defeats forwarding to the next load).
template <class T>
T* align64(T* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  return reinterpret_cast<T*>((a + 63) & ~std::uintptr_t{63});
}
constexpr std::size_t kAlignSlack = 8;

/// A row's scale from its two points' F_0 sum and its eight-lane sum (0 + the reduction on
/// every path, so that the vectorised kernels' zero base gives the same bits).
XS_ALWAYS_INLINE double grid_scale(double f0_pair, double lane_sum) {
  return 1.0 + 0.5 * (f0_pair + lane_sum);
}

/// The grid points of @p count rows split into θ rows and φ columns (GridTables::split), by
/// split_points() into four planar arrays of @p count values: the first points' θ rows t0 and
/// φ columns j0, the second points' t1 and j1. The scales' kernels and the transposed product
/// of the same rows read them (fused_rows() keeps them for fused_transpose_rows()).
struct GridPoints {
  const std::uint32_t *t0, *j0, *t1, *j1;
  GridPoints(const std::uint32_t* planar, std::size_t count)
      : t0(planar), j0(planar + count), t1(planar + 2 * count), j1(planar + 3 * count) {}
};

/// split_points() row by row (any level; the tail of the vectorised split).
void split_points_rows(const GridTables& g, const std::int32_t* s0, const std::int32_t* s1,
                       std::size_t from, std::size_t count, std::uint32_t* planar) {
  for (std::size_t i = from; i < count; ++i) {
    std::size_t t0, j0, t1, j1;
    g.split(s0[i], t0, j0);
    g.split(s1[i], t1, j1);
    planar[i] = static_cast<std::uint32_t>(t0);
    planar[count + i] = static_cast<std::uint32_t>(j0);
    planar[2 * count + i] = static_cast<std::uint32_t>(t1);
    planar[3 * count + i] = static_cast<std::uint32_t>(j1);
  }
}

#ifdef XS_LOOKUP_SIMD
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12: _mm512_undefined_* in the intrinsics
/// split_points_rows for eight rows at a time: the magic multiplier is below 2³² and the
/// indices below 2³¹ (see GridRows), so each product is one 32 × 32 → 64-bit multiplication.
__attribute__((target("avx512f"))) void split_points_avx512(const GridTables& g,
                                                            const std::int32_t* s0,
                                                            const std::int32_t* s1,
                                                            std::size_t count,
                                                            std::uint32_t* planar) {
  const __m512i magic = _mm512_set1_epi64(static_cast<long long>(g.magic));
  const __m512i n_phi = _mm512_set1_epi64(static_cast<long long>(g.n_phi));
  const __m128i shift = _mm_cvtsi32_si128(static_cast<int>(g.shift));
  std::size_t i = 0;
  for (; i + 8 <= count; i += 8) {
    for (int point = 0; point < 2; ++point) {
      const std::int32_t* s = point == 0 ? s0 : s1;
      const __m512i index =
          _mm512_cvtepu32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
      const __m512i t = _mm512_srl_epi64(_mm512_mul_epu32(index, magic), shift);
      const __m512i j = _mm512_sub_epi64(index, _mm512_mul_epu32(t, n_phi));
      std::uint32_t* out = planar + 2 * point * count + i;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi64_epi32(t));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + count), _mm512_cvtepi64_epi32(j));
    }
  }
  split_points_rows(g, s0, s1, i, count, planar);
}
#pragma GCC diagnostic pop
#endif

/// Each of @p count rows' grid points split into @p planar (4·count values, see GridPoints).
void split_points(const GridTables& g, const std::int32_t* s0, const std::int32_t* s1,
                  std::size_t count, std::uint32_t* planar) {
#ifdef XS_LOOKUP_SIMD
  if (detail::simd_level() >= 2) return split_points_avx512(g, s0, s1, count, planar);
#endif
  split_points_rows(g, s0, s1, 0, count, planar);
}

/// The scales of @p count rows from their grid points @p pt.
XS_MULTIVERSION void grid_scales_plain(const GridTables& g, GridPoints pt, std::size_t count,
                                       double* scales) {
  const std::size_t L = g.lanes;
  for (std::size_t i = 0; i < count; ++i) {
    const std::size_t t0 = pt.t0[i], j0 = pt.j0[i], t1 = pt.t1[i], j1 = pt.j1[i];
    const double *fa = g.f + t0 * L, *ba = g.trig + j0 * L;
    const double *fb = g.f + t1 * L, *bb = g.trig + j1 * L;
    double lanes[8] = {};
    for (std::size_t q = 0; q < L; ++q) lanes[q % 8] = std::fma(fa[q], ba[q], lanes[q % 8]);
    for (std::size_t q = 0; q < L; ++q) lanes[q % 8] = std::fma(fb[q], bb[q], lanes[q % 8]);
    scales[i] = grid_scale(g.f0[t0] + g.f0[t1], 0.0 + reduce_lanes(lanes));
  }
}

/// M_m(t) += u_i·trig_m(φ_j) and M_0(t) += u_i for each row's two points @p pt (the first
/// point's then the second's), rows in order; the θ rows touched widen [@p t_lo, @p t_hi].
XS_MULTIVERSION void grid_accumulate_plain(const GridTables& g, GridPoints pt, std::size_t count,
                                           const double* u, double* m, double* m0,
                                           std::size_t& t_lo, std::size_t& t_hi) {
  const std::size_t L = g.lanes;
  for (std::size_t i = 0; i < count; ++i) {
    const double ui = u[i];
    for (int point = 0; point < 2; ++point) {
      const std::size_t t = point == 0 ? pt.t0[i] : pt.t1[i];
      const std::size_t j = point == 0 ? pt.j0[i] : pt.j1[i];
      double* mt = m + t * L;
      const double* b = g.trig + j * L;
      for (std::size_t q = 0; q < L; ++q) mt[q] = std::fma(ui, b[q], mt[q]);
      m0[t] += ui;
      t_lo = std::min(t_lo, t);
      t_hi = std::max(t_hi, t);
    }
  }
}

/// out[k] += ½·Σ_t A_k(t)·M_m(k)(t) over θ rows [t_lo, t_hi] (ascending t by fused
/// multiply-add per k: the order does not depend on the level). @p work: 2·n_params values.
XS_MULTIVERSION void grid_transpose_finish(const harmonics::LookupFactors& f,
                                           const int* lane_of, const double* m, const double* m0,
                                           std::size_t lanes, std::size_t t_lo, std::size_t t_hi,
                                           double* out, double* work) {
  const std::size_t np = f.n_params;
  double* acc = work;
  double* e = work + np;
  std::fill(acc, acc + np, 0.0);
  for (std::size_t t = t_lo; t <= t_hi; ++t) {
    const double* a = f.theta.data() + t * np;
    const double* mt = m + t * lanes;
    for (std::size_t k = 0; k < np; ++k) e[k] = lane_of[k] < 0 ? m0[t] : mt[lane_of[k]];
    for (std::size_t k = 0; k < np; ++k) acc[k] = std::fma(a[k], e[k], acc[k]);
  }
  for (std::size_t k = 0; k < np; ++k) out[k] += 0.5 * acc[k];
}

#ifdef XS_LOOKUP_SIMD
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

/// A row's eight lanes (grid_scales_plain's order) and its two points' F_0 sum.
template <int NZ>
__attribute__((target("avx512f"), always_inline)) inline __m512d grid_row_lanes(
    const GridTables& t, std::size_t t0, std::size_t j0, std::size_t t1, std::size_t j1,
    double& f0_pair) {
  constexpr std::size_t L = 8 * NZ;
  const double *fa = t.f + t0 * L, *ba = t.trig + j0 * L;
  const double *fb = t.f + t1 * L, *bb = t.trig + j1 * L;
  __m512d acc = _mm512_setzero_pd();
  for (int z = 0; z < NZ; ++z)
    acc = _mm512_fmadd_pd(_mm512_loadu_pd(fa + 8 * z), _mm512_loadu_pd(ba + 8 * z), acc);
  for (int z = 0; z < NZ; ++z)
    acc = _mm512_fmadd_pd(_mm512_loadu_pd(fb + 8 * z), _mm512_loadu_pd(bb + 8 * z), acc);
  f0_pair = t.f0[t0] + t.f0[t1];
  return acc;
}

/// grid_scales_plain with NZ registers of eight lanes (lanes = 8·NZ), eight rows at a time.
template <int NZ>
__attribute__((target("avx512f"))) void grid_scales_avx512(const GridTables& g, GridPoints pt,
                                                           std::size_t count, double* scales) {
  const GridTables t = g;  // locals: the stores below would make the compiler reload fields
  std::size_t i = 0;
  const __m512d one = _mm512_set1_pd(1.0), half = _mm512_set1_pd(0.5);
  for (; i + 8 <= count; i += 8) {
    __m512d acc[8];
    alignas(64) double f0_pair[8];
    for (int row = 0; row < 8; ++row)
      acc[row] = grid_row_lanes<NZ>(t, pt.t0[i + row], pt.j0[i + row], pt.t1[i + row],
                                    pt.j1[i + row], f0_pair[row]);
    const __m512d sums = reduce_eight(acc, 0.0);  // 0 + each row's reduction
    const __m512d s = _mm512_add_pd(one, _mm512_mul_pd(half, _mm512_add_pd(_mm512_load_pd(f0_pair), sums)));
    _mm512_storeu_pd(scales + i, s);
  }
  for (; i < count; ++i) {
    double f0_pair;
    const __m512d acc = grid_row_lanes<NZ>(t, pt.t0[i], pt.j0[i], pt.t1[i], pt.j1[i], f0_pair);
    const __m256d h = _mm256_add_pd(_mm512_castpd512_pd256(acc), _mm512_extractf64x4_pd(acc, 1));
    const __m128d q = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
    scales[i] = grid_scale(f0_pair, 0.0 + (_mm_cvtsd_f64(q) + _mm_cvtsd_f64(_mm_unpackhi_pd(q, q))));
  }
}

/// One grid point's update of grid_accumulate_plain (θ row @p th, φ column @p j).
template <int NZ>
__attribute__((target("avx512f"), always_inline)) inline void grid_add_point(
    const GridTables& t, std::size_t th, std::size_t j, double ui, double* m, double* m0) {
  constexpr std::size_t L = 8 * NZ;
  double* mt = m + th * L;
  const double* b = t.trig + j * L;
  const __m512d uv = _mm512_set1_pd(ui);
  for (int z = 0; z < NZ; ++z)
    _mm512_storeu_pd(mt + 8 * z,
                     _mm512_fmadd_pd(uv, _mm512_loadu_pd(b + 8 * z), _mm512_loadu_pd(mt + 8 * z)));
  m0[th] += ui;
}

/// grid_accumulate_plain with NZ registers of eight lanes, without the range of θ rows
/// touched (the caller takes them all).
template <int NZ>
__attribute__((target("avx512f"))) void grid_accumulate_avx512(const GridTables& g,
                                                               GridPoints pt, std::size_t count,
                                                               const double* u, double* m,
                                                               double* m0) {
  const GridTables t = g;
  for (std::size_t i = 0; i < count; ++i) {
    grid_add_point<NZ>(t, pt.t0[i], pt.j0[i], u[i], m, m0);
    grid_add_point<NZ>(t, pt.t1[i], pt.j1[i], u[i], m, m0);
  }
}

/// grid_transpose_finish with eight harmonics a register (lanes up to 16: a θ row's M in one
/// or two registers, expanded to the harmonics by a permutation and M_0 by a blend).
__attribute__((target("avx512f"))) void grid_transpose_finish_avx512(
    const harmonics::LookupFactors& f, const int* lane_of, const double* m, const double* m0,
    std::size_t lanes, std::size_t t_lo, std::size_t t_hi, double* out) {
  const std::size_t np = f.n_params;
  const std::size_t n_reg = (np + 7) / 8;  // <= 6: lmax <= 6
  __m512i index[6];
  __mmask8 is_m0[6], valid[6];
  __m512d acc[6];
  for (std::size_t z = 0; z < n_reg; ++z) {
    alignas(64) std::int64_t idx[8] = {};
    unsigned m0_bits = 0, valid_bits = 0;
    for (std::size_t r = 0; r < 8 && 8 * z + r < np; ++r) {
      const int q = lane_of[8 * z + r];
      idx[r] = q < 0 ? 0 : q;
      m0_bits |= (q < 0 ? 1u : 0u) << r;
      valid_bits |= 1u << r;
    }
    index[z] = _mm512_load_si512(idx);
    is_m0[z] = static_cast<__mmask8>(m0_bits);
    valid[z] = static_cast<__mmask8>(valid_bits);
    acc[z] = _mm512_setzero_pd();
  }
  const double* theta = f.theta.data();
  for (std::size_t t = t_lo; t <= t_hi; ++t) {
    const double* mt = m + t * lanes;
    const __m512d lo = _mm512_loadu_pd(mt);
    const __m512d hi = lanes > 8 ? _mm512_loadu_pd(mt + 8) : lo;
    const __m512d zero_m = _mm512_set1_pd(m0[t]);
    const double* a = theta + t * np;
    for (std::size_t z = 0; z < n_reg; ++z) {
      const __m512d e = _mm512_mask_blend_pd(is_m0[z], _mm512_permutex2var_pd(lo, index[z], hi),
                                             zero_m);
      acc[z] = _mm512_fmadd_pd(_mm512_maskz_loadu_pd(valid[z], a + 8 * z), e, acc[z]);
    }
  }
  const __m512d half = _mm512_set1_pd(0.5);
  for (std::size_t z = 0; z < n_reg; ++z) {
    const __m512d o = _mm512_maskz_loadu_pd(valid[z], out + 8 * z);
    _mm512_mask_storeu_pd(out + 8 * z, valid[z], _mm512_add_pd(o, _mm512_mul_pd(half, acc[z])));
  }
}

/// grid_scales_plain with 2·NZ registers of four lanes (register 2z: lanes 0–3 of the z-th
/// eight, 2z + 1: lanes 4–7), a row at a time.
template <int NZ>
__attribute__((target("avx2,fma"))) void grid_scales_avx2(const GridTables& g, GridPoints pt,
                                                          std::size_t count, double* scales) {
  const GridTables t = g;
  constexpr std::size_t L = 8 * NZ;
  for (std::size_t i = 0; i < count; ++i) {
    const std::size_t t0 = pt.t0[i], j0 = pt.j0[i], t1 = pt.t1[i], j1 = pt.j1[i];
    const double *fa = t.f + t0 * L, *ba = t.trig + j0 * L;
    const double *fb = t.f + t1 * L, *bb = t.trig + j1 * L;
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    for (int z = 0; z < NZ; ++z) {
      lo = _mm256_fmadd_pd(_mm256_loadu_pd(fa + 8 * z), _mm256_loadu_pd(ba + 8 * z), lo);
      hi = _mm256_fmadd_pd(_mm256_loadu_pd(fa + 8 * z + 4), _mm256_loadu_pd(ba + 8 * z + 4), hi);
    }
    for (int z = 0; z < NZ; ++z) {
      lo = _mm256_fmadd_pd(_mm256_loadu_pd(fb + 8 * z), _mm256_loadu_pd(bb + 8 * z), lo);
      hi = _mm256_fmadd_pd(_mm256_loadu_pd(fb + 8 * z + 4), _mm256_loadu_pd(bb + 8 * z + 4), hi);
    }
    const __m256d h = _mm256_add_pd(lo, hi);
    const __m128d q = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
    scales[i] = grid_scale(t.f0[t0] + t.f0[t1],
                           0.0 + (_mm_cvtsd_f64(q) + _mm_cvtsd_f64(_mm_unpackhi_pd(q, q))));
  }
}

#pragma GCC diagnostic pop
#endif

/// The grid-row scales of @p count rows from their grid points at the widest level this CPU
/// runs (the same bits at each: one lane order, see grid_scales_plain).
void grid_scales_any(const GridTables& g, GridPoints pt, std::size_t count, double* scales) {
#ifdef XS_LOOKUP_SIMD
  const int level = detail::simd_level();
  if (with_register_count(level, g.lanes, [&](auto nz) {
        constexpr int NZ = decltype(nz)::value;
        if (level >= 2)
          grid_scales_avx512<NZ>(g, pt, count, scales);
        else if constexpr (NZ <= 3)
          grid_scales_avx2<NZ>(g, pt, count, scales);
      }))
    return;
#endif
  grid_scales_plain(g, pt, count, scales);
}

/// grid_accumulate_plain at the widest level (AVX-512, else the plain path: the updates are
/// independent fused multiply-adds, the same bits either way). [@p t_lo, @p t_hi]: the θ rows
/// to finish, those touched or (AVX-512, which tracks none) all @p n_theta. Finishing a θ row
/// that no point touched adds exact zeros to sums that are never −0 (they start at +0): the
/// same bits.
void grid_accumulate_any(const GridTables& g, GridPoints pt, std::size_t count,
                         const double* u, double* m, double* m0, std::size_t n_theta,
                         std::size_t& t_lo, std::size_t& t_hi) {
#ifdef XS_LOOKUP_SIMD
  if (detail::simd_level() >= 2 && with_register_count(2, g.lanes, [&](auto nz) {
        grid_accumulate_avx512<decltype(nz)::value>(g, pt, count, u, m, m0);
      })) {
    if (count == 0) return;  // the range stays empty
    t_lo = 0;
    t_hi = n_theta - 1;
    return;
  }
#endif
  grid_accumulate_plain(g, pt, count, u, m, m0, t_lo, t_hi);
}

/// Throws std::out_of_range naming @p name and the row unless every index lies in the grid.
void check_grid_indices(const HeldArray<std::int32_t>& indices, std::size_t grid_size,
                        const char* name) {
  const std::int32_t* v = indices.data;
  bool outside = false;  // one branch-free pass; the row is searched only on failure
  for (std::size_t i = 0; i < indices.size; ++i)
    outside |= v[i] < 0 || static_cast<std::size_t>(v[i]) >= grid_size;
  if (!outside) return;
  for (std::size_t i = 0; i < indices.size; ++i)
    if (v[i] < 0 || static_cast<std::size_t>(v[i]) >= grid_size)
      throw std::out_of_range(std::string(name) + ": grid index " + std::to_string(v[i]) +
                              " of row " + std::to_string(i) + " is outside the " +
                              std::to_string(grid_size) + "-point lookup grid");
}

/// A copy of @p f with its first @p n_params harmonics (l = 1..lmax' of a larger table), so
/// that a factor row holds exactly the harmonics a term reads: the kernels then index rows at
/// a stride fixed at compile time. (Only for a term of a smaller lmax than its table's.)
std::shared_ptr<const harmonics::LookupFactors> leading_columns(
    const harmonics::LookupFactors& f, std::size_t n_params) {
  auto out = std::make_shared<harmonics::LookupFactors>();
  out->lmax = static_cast<int>(std::lround(std::sqrt(static_cast<double>(n_params) + 1.0))) - 1;
  out->points_per_degree = f.points_per_degree;
  out->n_params = n_params;
  out->n_theta = f.n_theta;
  out->n_phi = f.n_phi;
  const auto take = [&](const std::vector<double>& table, std::size_t rows) {
    std::vector<double> kept(rows * n_params);
    for (std::size_t r = 0; r < rows; ++r)
      std::copy_n(table.data() + r * f.n_params, n_params, kept.data() + r * n_params);
    return kept;
  };
  out->theta = take(f.theta, f.n_theta);
  out->phi = take(f.phi, f.n_phi);
  return out;
}

}  // namespace

/// F of one parameter vector: per θ row the m ≠ 0 lanes' sums and F_0.
struct LookupHarmonicsTerm::ThetaSums {
  std::vector<double> f;   ///< n_theta × lanes
  std::vector<double> f0;  ///< n_theta
};

/// The last parameter vector and its F (see theta_sums()).
struct LookupHarmonicsTerm::SumCache {
  std::mutex mutex;
  std::vector<double> p;
  std::shared_ptr<const ThetaSums> sums;
};

namespace {

/// Harmonic k's lane among the m ≠ 0 values of degrees up to @p lmax (m = −lmax…−1 in lanes
/// 0…lmax − 1, m = 1…lmax after them), or −1 for m = 0; harmonics in the order l = 1, 2, …,
/// m = −l…l.
std::vector<int> lanes_of_harmonics(std::size_t n_params, int lmax) {
  std::vector<int> lane;
  for (int l = 1; lane.size() < n_params; ++l)
    for (int m = -l; m <= l && lane.size() < n_params; ++m)
      lane.push_back(m < 0 ? m + lmax : m == 0 ? -1 : m + lmax - 1);
  return lane;
}

}  // namespace

LookupHarmonicsTerm::LookupHarmonicsTerm(std::shared_ptr<const harmonics::LookupFactors> factors,
                                         HeldArray<std::int32_t> s0_lookup,
                                         HeldArray<std::int32_t> s1_lookup, std::size_t n_params,
                                         Path path)
    : ModelTerm(s0_lookup.size, n_params, n_params, true),
      factors_(std::move(factors)),
      s0_(std::move(s0_lookup)),
      s1_(std::move(s1_lookup)),
      cache_(std::make_unique<SumCache>()) {
  require(factors_ != nullptr, "the lookup factors must not be null");
  require_same_length(s0_.size, s1_.size, "s0_lookup", "s1_lookup");
  require(s0_.size == 0 || (s0_.data != nullptr && s1_.data != nullptr),
          "the grid indices are null");
  require(n_params >= 1 && n_params <= factors_->n_params,
          "n_params must lie in [1, " + std::to_string(factors_->n_params) +
              "] (the lookup factors' harmonics), got " + std::to_string(n_params));
  require(path == Path::automatic || path == Path::rows || path == Path::grid,
          "unknown evaluation path");
  // the factors' own invariants, on which the index arithmetic relies
  require(factors_->theta.size() == factors_->n_theta * factors_->n_params &&
              factors_->phi.size() == factors_->n_phi * factors_->n_params &&
              factors_->n_phi > 0 && factors_->grid_size() < (std::size_t{1} << 31),
          "the lookup factors are inconsistent (build them with sph_harm_lookup_factors)");
  if (n_params < factors_->n_params) factors_ = leading_columns(*factors_, n_params);
  check_grid_indices(s0_, factors_->grid_size(), "s0_lookup");
  check_grid_indices(s1_, factors_->grid_size(), "s1_lookup");
  if (path == Path::rows ||
      (path == Path::automatic && n_rows() < kMinRowsPerThetaRow * factors_->n_theta))
    return;
  // By grid rows: the φ factors as trig_m(φ) per lane, checked to be one value per m (as
  // sph_harm_lookup_factors makes them: 1, cos mφ, sin |m|φ), padded with zeros to a whole
  // number of eight-lane registers (a zero lane adds nothing).
  int lmax = 1;
  while (static_cast<std::size_t>((lmax + 1) * (lmax + 1) - 1) < n_params) ++lmax;
  lane_of_ = lanes_of_harmonics(n_params, lmax);
  lanes_ = (2 * static_cast<std::size_t>(lmax) + 7) / 8 * 8;
  const std::size_t n_phi = factors_->n_phi;
  trig_.assign(n_phi * lanes_ + kAlignSlack, 0.0);
  std::vector<char> seen(lanes_, 0);
  bool separable = true;
  for (std::size_t j = 0; j < n_phi && separable; ++j) {
    std::fill(seen.begin(), seen.end(), 0);
    const double* b = factors_->phi.data() + j * n_params;
    double* row = align64(trig_.data()) + j * lanes_;
    for (std::size_t k = 0; k < n_params; ++k) {
      const int q = lane_of_[k];
      if (q < 0) {
        separable = separable && b[k] == 1.0;
      } else if (!seen[q]) {
        row[q] = b[k];
        seen[q] = 1;
      } else {
        separable = separable && std::memcmp(&row[q], &b[k], sizeof(double)) == 0;
      }
    }
  }
  require(separable || path == Path::automatic,
          "path grid: the lookup factors' phi factors are not one value per order m");
  by_grid_ = separable;
  if (!by_grid_) {
    lane_of_.clear();
    trig_.clear();
    lanes_ = 0;
  }
}

LookupHarmonicsTerm::~LookupHarmonicsTerm() = default;

TermValues LookupHarmonicsTerm::evaluate(const double* p, TermScratch& scratch) const {
  return evaluate_rows(p, 0, n_rows(), scratch);
}

std::size_t LookupHarmonicsTerm::nbytes() const {
  return (s0_.size + s1_.size) * sizeof(std::int32_t) +
         (factors_->theta.size() + factors_->phi.size() + trig_.size() +
          (by_grid_ ? factors_->n_theta * (lanes_ + 1) : 0)) * sizeof(double);
}

std::shared_ptr<const LookupHarmonicsTerm::ThetaSums> LookupHarmonicsTerm::theta_sums(
    const double* p) const {
  const std::size_t np = n_params(), n_theta = factors_->n_theta;
  std::lock_guard<std::mutex> lock(cache_->mutex);
  // the same bits (not ==): the sums are those of exactly these parameters
  if (cache_->sums != nullptr && std::memcmp(cache_->p.data(), p, np * sizeof(double)) == 0)
    return cache_->sums;
  auto sums = std::make_shared<ThetaSums>();
  sums->f.assign(n_theta * lanes_ + kAlignSlack, 0.0);
  sums->f0.assign(n_theta, 0.0);
  for (std::size_t t = 0; t < n_theta; ++t) {  // ascending k by fused multiply-add
    const double* a = factors_->theta.data() + t * np;
    double* f = align64(sums->f.data()) + t * lanes_;
    double& f0 = sums->f0[t];
    for (std::size_t k = 0; k < np; ++k) {
      double& target = lane_of_[k] < 0 ? f0 : f[lane_of_[k]];
      target = std::fma(p[k], a[k], target);
    }
  }
  cache_->p.assign(p, p + np);
  cache_->sums = sums;
  return sums;
}

void LookupHarmonicsTerm::grid_scales(const double* p, std::size_t first, std::size_t count,
                                      double* scales, std::vector<std::uint32_t>& points) const {
  const std::shared_ptr<const ThetaSums> sums = theta_sums(p);
  const GridRows<> rows(*factors_);
  const GridTables g{align64(sums->f.data()), sums->f0.data(), align64(trig_.data()), lanes_,
                     rows.magic,     factors_->n_phi, rows.shift};
  sized(points, 4 * count);  // (grown, never shrunk)
  split_points(g, s0_.data + first, s1_.data + first, count, points.data());
  grid_scales_any(g, GridPoints(points.data(), count), count, scales);
}

TermValues LookupHarmonicsTerm::evaluate_rows(const double* p, std::size_t first,
                                              std::size_t count, TermScratch& scratch) const {
  require_finite(p, n_params(), "parameters");
  double* s = sized(scratch.scales, count);
  double* rows = sized(scratch.values, count * n_params());
  lookup_scales({*factors_, s0_.data + first, s1_.data + first, count, n_params()}, p, s, rows,
                scratch.aux);
  if (by_grid_) grid_scales(p, first, count, s, scratch.indices);  // the scales by grid rows
  return {s, rows, nullptr};
}

const double* LookupHarmonicsTerm::scales_rows(const double* p, std::size_t first,
                                               std::size_t count, TermScratch& scratch) const {
  require_finite(p, n_params(), "parameters");
  double* s = sized(scratch.scales, count);
  if (by_grid_) {
    grid_scales(p, first, count, s, scratch.indices);
    return s;
  }
  lookup_scales({*factors_, s0_.data + first, s1_.data + first, count, n_params()}, p, s,
                nullptr, scratch.aux);  // no row stored
  return s;
}

TermValues LookupHarmonicsTerm::fused_rows(const double* p, std::size_t first, std::size_t count,
                                           TermScratch& scratch) const {
  // By grid rows the transposed product reads no row. By rows the rows are kept for
  // fused_transpose_rows() (a chunk's 4096 rows, 786 KB at lmax 4, stay in L2): storing and
  // reading them back costs less than forming them a second time (measured: the one-pass f+g
  // 3.5 ns/obs faster at lmax 4).
  if (!by_grid_) return evaluate_rows(p, first, count, scratch);
  // the scales alone; their grid points stay in scratch.indices for fused_transpose_rows()
  return {scales_rows(p, first, count, scratch), nullptr, nullptr};
}

void LookupHarmonicsTerm::fused_transpose_rows(const TermValues& v, std::size_t first,
                                               std::size_t count, const double* u, double* out,
                                               TermScratch& scratch) const {
  if (!by_grid_) return add_transpose_product_rows(v, first, count, u, out);
  // M (n_theta × lanes) and M_0 (n_theta) in the scratch's value room (fused_rows() stored no
  // row there), zeroed per call; then this chunk's product, its own sum
  const std::size_t n_theta = factors_->n_theta, np = n_params();
  double* m = align64(sized(scratch.values, n_theta * (lanes_ + 1) + 2 * np + kAlignSlack));
  double* m0 = m + n_theta * lanes_;
  std::fill(m, m + n_theta * (lanes_ + 1), 0.0);
  const GridRows<> rows(*factors_);
  const GridTables g{nullptr, nullptr, align64(trig_.data()), lanes_, rows.magic, factors_->n_phi,
                     rows.shift};
  std::size_t t_lo = n_theta, t_hi = 0;
  grid_accumulate_any(g, GridPoints(scratch.indices.data(), count), count, u, m, m0, n_theta,
                      t_lo, t_hi);
  if (t_lo > t_hi) return;  // no row
#ifdef XS_LOOKUP_SIMD
  if (detail::simd_level() >= 2 && lanes_ <= 16 && np <= 48) {
    grid_transpose_finish_avx512(*factors_, lane_of_.data(), m, m0, lanes_, t_lo, t_hi, out);
    return;
  }
#endif
  grid_transpose_finish(*factors_, lane_of_.data(), m, m0, lanes_, t_lo, t_hi, out,
                        m0 + n_theta);
}

}  // namespace xtalscale
