// LookupHarmonicsTerm: the absorption surface's lookup-table harmonics formed on the fly from
// the grid's separable factors (harmonics::LookupFactors), with no per-row harmonic block.
//
// Compiled with -ffp-contract=off (CMakeLists.txt): a harmonic is 0.5·(a0·b0 + a1·b1) with
// each product rounded, which is (T[i0] + T[i1]) / 2 of the table harmonics_from_lookup reads
// (T = a·b; halving is exact either way), so the compiler must not fuse a product into the
// sum. The fused multiply-adds of the scale's sum are written out (intrinsics or std::fma), so
// every SIMD level gives the same bits. The transposed product reads the rows formed here
// (components::dense_transpose_product, the same bits at every level with FMA).
#include <algorithm>
#include <cmath>
#include <cstdint>
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

/// Room for @p n values in @p v, grown when needed and never shrunk (as model_block.cpp's).
double* sized(std::vector<double>& v, std::size_t n) {
  if (v.size() < n) detail::resize_large(v, n);
  return v.data();
}

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

/// 1 + the eight-lane reduction of each of eight rows' accumulators @p a (lanes l0…l7 of a
/// row), in row order: the single row's additions, ((l0 + l4) + (l2 + l6)) + ((l1 + l5) +
/// (l3 + l7)) as the 512 → 256 → 128 → 64-bit halvings form them, with the halves of two,
/// four and then eight rows gathered into one register before each addition.
__attribute__((target("avx512f"), always_inline)) inline __m512d reduce_eight(const __m512d* a) {
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
  const __m512d scale = _mm512_add_pd(_mm512_set1_pd(1.0), sum);
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

LookupHarmonicsTerm::LookupHarmonicsTerm(std::shared_ptr<const harmonics::LookupFactors> factors,
                                         HeldArray<std::int32_t> s0_lookup,
                                         HeldArray<std::int32_t> s1_lookup, std::size_t n_params)
    : ModelTerm(s0_lookup.size, n_params, n_params, true),
      factors_(std::move(factors)),
      s0_(std::move(s0_lookup)),
      s1_(std::move(s1_lookup)) {
  require(factors_ != nullptr, "the lookup factors must not be null");
  require_same_length(s0_.size, s1_.size, "s0_lookup", "s1_lookup");
  require(s0_.size == 0 || (s0_.data != nullptr && s1_.data != nullptr),
          "the grid indices are null");
  require(n_params >= 1 && n_params <= factors_->n_params,
          "n_params must lie in [1, " + std::to_string(factors_->n_params) +
              "] (the lookup factors' harmonics), got " + std::to_string(n_params));
  // the factors' own invariants, on which the index arithmetic relies
  require(factors_->theta.size() == factors_->n_theta * factors_->n_params &&
              factors_->phi.size() == factors_->n_phi * factors_->n_params &&
              factors_->n_phi > 0 && factors_->grid_size() < (std::size_t{1} << 31),
          "the lookup factors are inconsistent (build them with sph_harm_lookup_factors)");
  if (n_params < factors_->n_params) factors_ = leading_columns(*factors_, n_params);
  check_grid_indices(s0_, factors_->grid_size(), "s0_lookup");
  check_grid_indices(s1_, factors_->grid_size(), "s1_lookup");
}

TermValues LookupHarmonicsTerm::evaluate(const double* p, TermScratch& scratch) const {
  return evaluate_rows(p, 0, n_rows(), scratch);
}

std::size_t LookupHarmonicsTerm::nbytes() const {
  return (s0_.size + s1_.size) * sizeof(std::int32_t) +
         (factors_->theta.size() + factors_->phi.size()) * sizeof(double);
}

TermValues LookupHarmonicsTerm::evaluate_rows(const double* p, std::size_t first,
                                              std::size_t count, TermScratch& scratch) const {
  require_finite(p, n_params(), "parameters");
  double* s = sized(scratch.scales, count);
  double* rows = sized(scratch.values, count * n_params());
  lookup_scales({*factors_, s0_.data + first, s1_.data + first, count, n_params()}, p, s, rows,
                scratch.aux);
  return {s, rows, nullptr};
}

const double* LookupHarmonicsTerm::scales_rows(const double* p, std::size_t first,
                                               std::size_t count, TermScratch& scratch) const {
  require_finite(p, n_params(), "parameters");
  double* s = sized(scratch.scales, count);
  lookup_scales({*factors_, s0_.data + first, s1_.data + first, count, n_params()}, p, s,
                nullptr, scratch.aux);  // no row stored
  return s;
}

TermValues LookupHarmonicsTerm::fused_rows(const double* p, std::size_t first, std::size_t count,
                                           TermScratch& scratch) const {
  // The rows are kept for fused_transpose_rows() (a chunk's 4096 rows, 786 KB at lmax 4, stay
  // in L2): storing and reading them back costs less than forming them a second time
  // (measured: the one-pass f+g 3.5 ns/obs faster at lmax 4).
  return evaluate_rows(p, first, count, scratch);
}

void LookupHarmonicsTerm::fused_transpose_rows(const TermValues& v, std::size_t first,
                                               std::size_t count, const double* u, double* out,
                                               TermScratch&) const {
  add_transpose_product_rows(v, first, count, u, out);
}

}  // namespace xtalscale
