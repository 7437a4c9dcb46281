// Normal equations with Ĩ eliminated, assembled per group without a Jacobian (see
// normal_equations.hpp). The groups are cut into fixed contiguous parts (a function of the data
// only); each part is read once, in table order, into a thread-private matrix (per observation
// the k x k rank-1 term, per group the rank-1/2 Schur correction over the union of its columns),
// and the parts are added to the result in part order, so the summation order of every matrix
// element is the same for any thread count.
//
// Most of the work is done as packed rank-k updates (add_upper_product: 4 x 8 register tiles,
// compiled for AVX2+FMA too):
//   - a model block's "dense run" (the columns nearly every row holds, such as the absorption
//     harmonics of the physical model) gives each observation a dense part √c·a_D; these parts
//     are queued per block (RunPanel) and added as one rank-k update per RunPanel::kRows
//     observations. The rest
//     of a row (smoother columns) is added per observation: its products with the run as
//     contiguous loops, its products with itself as scalars;
//   - the groups' scaled vectors b/√S (and e/√S for dials) are queued (GroupQueue) and added as
//     one rank-k update over the union of their columns per GroupQueue::kGroups groups.
// A cross term of a column after the run lands in the lower triangle; the lower triangle is
// added into the upper one at the end, so terms may sit in either triangle.
#include "xtalscale/normal_equations.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#endif

#include "fit_parallel.hpp"
#include "internal/kernel_support.hpp"  // XS_MULTIVERSION, XS_ALWAYS_INLINE

namespace xtalscale::fit {

namespace {

// ------------------------------------------------------------------ per-row coefficients

/// A group's least-squares Ĩ, 1/S when it is eliminated (0 otherwise: S = 0 or a single
/// observation, whose terms cancel exactly) and whether its rows add terms at all.
struct GroupElimination {
  double ls_ih = 0.0;
  double inv_s = 0.0;
  bool has_terms = false;  ///< fixed Ĩ, or the group is eliminated
};

XS_ALWAYS_INLINE GroupElimination group_elimination(const GroupedObservations& t,
                                                    const double* g, std::size_t h, bool fixed) {
  const detail::GroupSums sums = detail::group_sums(t, g, h);
  const double s = sums.wgg;
  GroupElimination ge;
  ge.ls_ih = s > 0.0 ? sums.wgi / s : 0.0;
  const bool eliminate = !fixed && s > 0.0 && t.group_offsets[h + 1] - t.group_offsets[h] > 1;
  if (eliminate) ge.inv_s = 1.0 / s;
  ge.has_terms = fixed || eliminate;
  return ge;
}

/// One table row's coefficients: the observation term's weight w Ĩ², the rhs coefficient
/// w r Ĩ, the b coefficient w g Ĩ, the e coefficient w r (all 0 when the group adds no terms)
/// and its w r².
struct RowCoefficients {
  double obs = 0.0, rhs = 0.0, b = 0.0, e = 0.0, r_sq = 0.0;
};

XS_ALWAYS_INLINE RowCoefficients row_coefficients(const GroupedObservations& t, const double* g,
                                                  std::size_t l, const GroupElimination& ge,
                                                  const double* fixed_Ih) {
  const double ih = fixed_Ih ? fixed_Ih[l] : ge.ls_ih;
  const double r = t.intensities[l] - g[l] * ih;
  const double w = t.weights[l];
  RowCoefficients rc;
  rc.r_sq = w * r * r;
  if (!ge.has_terms) return rc;
  rc.obs = w * ih * ih;
  rc.rhs = w * r * ih;
  rc.b = w * g[l] * ih;
  rc.e = w * r;
  return rc;
}

/// Per table row the observation-term and b coefficients of row_coefficients, per group 1/S:
/// what normal_matrix_diagonal reads.
struct RowTerms {
  std::vector<double> obs, b, inv_s;
};

RowTerms row_terms(const GroupedObservations& t, const double* g, const double* fixed_Ih) {
  RowTerms rt;
  rt.obs.assign(t.n_obs, 0.0);
  rt.b.assign(t.n_obs, 0.0);
  rt.inv_s.assign(t.n_groups, 0.0);
  for (std::size_t h = 0; h < t.n_groups; ++h) {
    const GroupElimination ge = group_elimination(t, g, h, fixed_Ih != nullptr);
    rt.inv_s[h] = ge.inv_s;
    for (auto l = t.group_offsets[h]; l < t.group_offsets[h + 1]; ++l) {
      const RowCoefficients rc = row_coefficients(t, g, static_cast<std::size_t>(l), ge, fixed_Ih);
      rt.obs[l] = rc.obs;
      rt.b[l] = rc.b;
    }
  }
  return rt;
}

/// Where each table row from @p first on comes from: its block and the row within the block's
/// view (entry i: table row first + i). The whole table (first = 0) or, in the fused build, the
/// table rows of one chunk of groups, whose views are that chunk's evaluated rows.
struct RowSources {
  std::size_t first = 0;
  std::vector<std::int32_t> block;
  std::vector<std::int64_t> row;
};

RowSources row_sources(const GroupedObservations& t, const std::vector<FitBlock>& blocks,
                       int n_threads = 1) {
  RowSources src;
  src.block.assign(t.n_obs, 0);
  src.row.assign(t.n_obs, 0);
  // each table row is one block row's (checked): chunks of block rows write disjoint entries
  const auto chunks = detail::block_chunks(blocks);
  detail::parallel_for(chunks.size(), n_threads, [&](std::size_t c) {
    const auto& ch = chunks[c];
    for (std::size_t r = ch.first; r < ch.last; ++r) {
      const std::size_t row = detail::table_row(blocks[ch.block], r);
      src.block[row] = static_cast<std::int32_t>(ch.block);
      src.row[row] = static_cast<std::int64_t>(r);
    }
  });
  return src;
}

/// Call body(l, c, d) for every derivative entry of the observations of group @p h: the
/// observation's table row l, the global parameter column c and the derivative d.
template <class Body>
inline void for_each_group_derivative(const GroupedObservations& t,
                                      const std::vector<FitBlock>& blocks, const RowSources& src,
                                      std::size_t h, Body body) {
  for (auto l = t.group_offsets[h]; l < t.group_offsets[h + 1]; ++l) {
    const DerivativesView& v = blocks[static_cast<std::size_t>(src.block[l])].view;
    const auto r = static_cast<std::size_t>(src.row[l]);
    if (v.n_cols == 0) continue;
    for (auto k = v.indptr[r]; k < v.indptr[r + 1]; ++k)
      body(l, v.column_offset + static_cast<std::size_t>(v.indices[k]), v.values[k]);
  }
}

/// Index of the lowest set bit of a non-zero word.
inline std::size_t lowest_bit(std::uint64_t x) {
#if defined(_MSC_VER) && !defined(__clang__)
  unsigned long index = 0;
  _BitScanForward64(&index, x);
  return static_cast<std::size_t>(index);
#else
  return static_cast<std::size_t>(__builtin_ctzll(x));
#endif
}

/// Number of set bits of a word.
inline std::size_t bit_count(std::uint64_t x) {
#if defined(_MSC_VER) && !defined(__clang__)
  return static_cast<std::size_t>(__popcnt64(x));
#else
  return static_cast<std::size_t>(__builtin_popcountll(x));
#endif
}

// ------------------------------------------------------------------ dense runs

/// A range [first, last) of consecutive block columns.
struct DenseRun {
  std::size_t first = 0, last = 0;
  std::int64_t usual_entry = 0;  ///< where the run starts in a row's entries, in the sampled rows
  std::size_t size() const { return last - first; }
};

/// The block's dense run: the longest range of consecutive columns held by at least 7/8 of a
/// fixed sample of its rows, if it has at least kMinRunColumns columns (else empty). It only
/// picks the candidate: each row is checked when it is used (run_position), so a row without
/// the run is still handled exactly. The sample depends on the data alone.
/// Rows find_dense_run samples: row s · n_rows / samples for s < samples = min(n_rows, this).
constexpr std::size_t kRunSampleRows = 256;

DenseRun find_dense_run(const DerivativesView& v) {
  constexpr std::size_t kMinRunColumns = 8;
  DenseRun best;
  if (v.n_rows == 0 || v.n_cols < kMinRunColumns || !v.indptr) return best;
  const std::size_t samples = std::min(v.n_rows, kRunSampleRows);
  std::vector<std::size_t> held(v.n_cols, 0);
  for (std::size_t s = 0; s < samples; ++s) {
    const std::size_t r = s * v.n_rows / samples;
    for (auto q = v.indptr[r]; q < v.indptr[r + 1]; ++q)
      ++held[static_cast<std::size_t>(v.indices[q])];
  }
  const std::size_t needed = samples - samples / 8;
  std::size_t start = 0;
  for (std::size_t c = 0; c <= v.n_cols; ++c) {
    if (c < v.n_cols && held[c] >= needed) continue;
    if (c - start > best.size()) best = {start, c};
    start = c + 1;
  }
  if (best.size() < kMinRunColumns) return DenseRun{};
  for (std::size_t s = 0; s < samples; ++s) {  // the first sampled row holding it gives the entry
    const std::size_t r = s * v.n_rows / samples;
    const std::int32_t* row_first = v.indices + v.indptr[r];
    const std::int32_t* row_last = v.indices + v.indptr[r + 1];
    const std::int32_t* at = std::find(row_first, row_last, static_cast<std::int32_t>(best.first));
    if (at != row_last) {
      best.usual_entry = at - row_first;
      break;
    }
  }
  return best;
}

/// Position of @p run within the CSR entries [first, last) of a row: the entry where its
/// columns follow one another in full, or last when the row lacks part of it. The columns of a
/// row strictly ascend (checked with the blocks' structure, or promised by a caller that skips
/// the check), so len entries from the run's first column to its last are the whole run: the
/// two ends are all that needs comparing (comparing every entry was a tenth of the matrix's time).
XS_ALWAYS_INLINE std::int64_t run_position(const std::int32_t* indices, std::int64_t first,
                                           std::int64_t last, const DenseRun& run) {
  const auto len = static_cast<std::int64_t>(run.size());
  if (len == 0 || last - first < len) return last;
  const auto lo = static_cast<std::int32_t>(run.first);
  // The run usually starts at the same entry of every row (its offset in the row's columns).
  const std::int64_t guess = first + std::min<std::int64_t>(run.usual_entry, last - first - 1);
  const std::int64_t p = indices[guess] == lo
                             ? guess
                             : std::lower_bound(indices + first, indices + last, lo) - indices;
  if (p + len > last) return last;
  const bool whole = indices[p] == lo && indices[p + len - 1] == lo + static_cast<std::int32_t>(len - 1);
  return whole ? p : last;
}

// ------------------------------------------------------------------ packed rank-k updates

constexpr std::size_t kStrip = 8;     ///< panel columns per strip: the micro-tile width
constexpr std::size_t kTileRows = 4;  ///< micro-tile height

inline std::size_t padded_columns(std::size_t m) { return (m + kStrip - 1) / kStrip * kStrip; }

/// Offset of (row r, column c) in a packed panel of @p ld rows: column strips of kStrip, each
/// strip row-major, so the product kernel streams both operands contiguously.
inline std::size_t packed_index(std::size_t r, std::size_t c, std::size_t ld) {
  return (c / kStrip * ld + r) * kStrip + c % kStrip;
}

/// The matrix columns of a panel's columns (strictly ascending) and, per full strip, whether
/// its kStrip columns are consecutive matrix columns (a tile row then adds as one loop).
struct PanelColumns {
  std::vector<std::size_t> global;
  std::vector<unsigned char> consecutive;

  void set_consecutive() {
    const std::size_t m = global.size();
    consecutive.assign(padded_columns(m) / kStrip, 0);
    for (std::size_t s = 0; (s + 1) * kStrip <= m; ++s)
      consecutive[s] = global[(s + 1) * kStrip - 1] == global[s * kStrip] + kStrip - 1;
  }
};

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
#define XS_TILE_FMA 1
/// acc[i][j] += Σ_{r<k} left[r·ls + i] · right[r·rs + j] for a 4 x 8 tile, with AVX2+FMA
/// intrinsics: per r two loads of the right values, four broadcast loads of the left values,
/// eight FMAs. (Compiled from plain loops, the tile loaded the left values as one vector and
/// shuffled it four ways, and the shuffle port bounded the loop.) The same FMA per element
/// and r, in the same order, as the plain loops compiled for x86-64-v3: the bits do not change.
/// kNegateOddRows: the right operand's odd rows are used negated (exactly: a sign flip).
template <bool kNegateOddRows = false>
__attribute__((target("avx2,fma"))) void tile_sum_fma(std::size_t k, const double* left, std::size_t ls,
                                                      const double* right, std::size_t rs, double acc[4][8]) {
  __m256d c00 = _mm256_loadu_pd(acc[0]), c01 = _mm256_loadu_pd(acc[0] + 4);
  __m256d c10 = _mm256_loadu_pd(acc[1]), c11 = _mm256_loadu_pd(acc[1] + 4);
  __m256d c20 = _mm256_loadu_pd(acc[2]), c21 = _mm256_loadu_pd(acc[2] + 4);
  __m256d c30 = _mm256_loadu_pd(acc[3]), c31 = _mm256_loadu_pd(acc[3] + 4);
  for (std::size_t r = 0; r < k; ++r) {
    const double* lr = left + r * ls;
    const double* rr = right + r * rs;
    __m256d r0 = _mm256_loadu_pd(rr), r1 = _mm256_loadu_pd(rr + 4);
    if constexpr (kNegateOddRows) {
      const __m256d flip = _mm256_set1_pd((r & 1) ? -0.0 : 0.0);
      r0 = _mm256_xor_pd(r0, flip);
      r1 = _mm256_xor_pd(r1, flip);
    }
    __m256d b = _mm256_broadcast_sd(lr);
    c00 = _mm256_fmadd_pd(b, r0, c00);
    c01 = _mm256_fmadd_pd(b, r1, c01);
    b = _mm256_broadcast_sd(lr + 1);
    c10 = _mm256_fmadd_pd(b, r0, c10);
    c11 = _mm256_fmadd_pd(b, r1, c11);
    b = _mm256_broadcast_sd(lr + 2);
    c20 = _mm256_fmadd_pd(b, r0, c20);
    c21 = _mm256_fmadd_pd(b, r1, c21);
    b = _mm256_broadcast_sd(lr + 3);
    c30 = _mm256_fmadd_pd(b, r0, c30);
    c31 = _mm256_fmadd_pd(b, r1, c31);
  }
  _mm256_storeu_pd(acc[0], c00);
  _mm256_storeu_pd(acc[0] + 4, c01);
  _mm256_storeu_pd(acc[1], c10);
  _mm256_storeu_pd(acc[1] + 4, c11);
  _mm256_storeu_pd(acc[2], c20);
  _mm256_storeu_pd(acc[2] + 4, c21);
  _mm256_storeu_pd(acc[3], c30);
  _mm256_storeu_pd(acc[3] + 4, c31);
}

/// acc[i][j] += Σ_{r<k} left[r·ls + i] · right[r·rs + j] for an 8 x 8 tile with AVX-512: per r
/// one load of the eight right values, eight broadcasts of the left values and eight FMAs on
/// 512-bit registers, twice the work per instruction of tile_sum_fma. Still one FMA per element
/// and r, in r order, from zero: the same bits as the 4 x 8 tiles. kNegateOddRows: as tile_sum_fma.
template <bool kNegateOddRows = false>
__attribute__((target("avx512f"))) void tile_sum_avx512(std::size_t k, const double* left, std::size_t ls,
                                                        const double* right, std::size_t rs, double acc[8][8]) {
  __m512d c0 = _mm512_loadu_pd(acc[0]), c1 = _mm512_loadu_pd(acc[1]);
  __m512d c2 = _mm512_loadu_pd(acc[2]), c3 = _mm512_loadu_pd(acc[3]);
  __m512d c4 = _mm512_loadu_pd(acc[4]), c5 = _mm512_loadu_pd(acc[5]);
  __m512d c6 = _mm512_loadu_pd(acc[6]), c7 = _mm512_loadu_pd(acc[7]);
  for (std::size_t r = 0; r < k; ++r) {
    const double* lr = left + r * ls;
    __m512d rv = _mm512_loadu_pd(right + r * rs);
    if constexpr (kNegateOddRows) {
      const __m512i flip = _mm512_set1_epi64((r & 1) ? std::int64_t{1} << 63 : 0);
      rv = _mm512_castsi512_pd(_mm512_xor_si512(_mm512_castpd_si512(rv), flip));
    }
    c0 = _mm512_fmadd_pd(_mm512_set1_pd(lr[0]), rv, c0);
    c1 = _mm512_fmadd_pd(_mm512_set1_pd(lr[1]), rv, c1);
    c2 = _mm512_fmadd_pd(_mm512_set1_pd(lr[2]), rv, c2);
    c3 = _mm512_fmadd_pd(_mm512_set1_pd(lr[3]), rv, c3);
    c4 = _mm512_fmadd_pd(_mm512_set1_pd(lr[4]), rv, c4);
    c5 = _mm512_fmadd_pd(_mm512_set1_pd(lr[5]), rv, c5);
    c6 = _mm512_fmadd_pd(_mm512_set1_pd(lr[6]), rv, c6);
    c7 = _mm512_fmadd_pd(_mm512_set1_pd(lr[7]), rv, c7);
  }
  _mm512_storeu_pd(acc[0], c0);
  _mm512_storeu_pd(acc[1], c1);
  _mm512_storeu_pd(acc[2], c2);
  _mm512_storeu_pd(acc[3], c3);
  _mm512_storeu_pd(acc[4], c4);
  _mm512_storeu_pd(acc[5], c5);
  _mm512_storeu_pd(acc[6], c6);
  _mm512_storeu_pd(acc[7], c7);
}

/// Whether the tile kernels may use AVX2+FMA / AVX-512 (detail::simd_level: the CPU's widest,
/// unless capped for a test).
bool cpu_has_avx2_fma() { return xtalscale::detail::simd_level() >= 1; }
bool cpu_has_avx512() { return xtalscale::detail::simd_level() >= 2; }
#endif

/// Adds one tile of the product (panel rows i0 .. i0 + kRows, columns j0 .. j0 + kStrip) into
/// the matrix, its upper triangle only (j >= i): each tile row as a contiguous loop where the
/// strip's columns are consecutive matrix columns, else element by element.
template <std::size_t kRows>
XS_ALWAYS_INLINE void add_tile(const double (&acc)[kRows][kStrip], std::size_t i0, std::size_t j0,
                               const PanelColumns& cols, double sign, double* __restrict matrix,
                               std::size_t n) {
  const std::size_t m = cols.global.size();
  const std::size_t* gc = cols.global.data();
  const std::size_t rows = std::min(kRows, m - i0);
  const std::size_t width = std::min(kStrip, m - j0);
  const bool contiguous = width == kStrip && cols.consecutive[j0 / kStrip];
  for (std::size_t ii = 0; ii < rows; ++ii) {
    const std::size_t from = i0 + ii > j0 ? i0 + ii - j0 : 0;  // the upper triangle: j >= i
    if (from >= width) break;
    double* __restrict row = matrix + gc[i0 + ii] * n;
    if (contiguous) {
      double* __restrict out = row + gc[j0];
      for (std::size_t jj = from; jj < width; ++jj) out[jj] += sign * acc[ii][jj];
    } else {
      for (std::size_t jj = from; jj < width; ++jj) row[gc[j0 + jj]] += sign * acc[ii][jj];
    }
  }
}

/// matrix[col_i][col_j] += sign · Σ_{r<k} L(r, i) R(r, j) for panel columns i <= j (the upper
/// triangle, as the columns ascend). L and R are packed panels of @p ld rows, zero in their
/// padding columns; R may be L, and with kNegateOddRows R is L with its odd rows negated (the
/// dials group correction's (e, −b) rows, never stored). Each 4 x 8 tile (8 x 8 with AVX-512: a
/// whole strip row) of the product is summed in registers over r.
template <bool kNegateOddRows>
XS_MULTIVERSION
void add_upper_product(std::size_t k, std::size_t ld, const double* __restrict left,
                       const double* __restrict right, const PanelColumns& cols, double sign,
                       double* __restrict matrix, std::size_t n) {
  const std::size_t m = cols.global.size();
  const std::size_t m_pad = padded_columns(m);
#ifdef XS_TILE_FMA
  if (cpu_has_avx512()) {
    for (std::size_t i0 = 0; i0 < m; i0 += kStrip) {
      const double* lstrip = left + (i0 / kStrip) * ld * kStrip;
      for (std::size_t j0 = i0; j0 < m_pad; j0 += kStrip) {
        double acc[kStrip][kStrip] = {};
        tile_sum_avx512<kNegateOddRows>(k, lstrip, kStrip, right + (j0 / kStrip) * ld * kStrip, kStrip, acc);
        add_tile<kStrip>(acc, i0, j0, cols, sign, matrix, n);
      }
    }
    return;
  }
#endif
  for (std::size_t i0 = 0; i0 < m; i0 += kTileRows) {
    const double* lstrip = left + (i0 / kStrip) * ld * kStrip + i0 % kStrip;
    for (std::size_t j0 = i0 / kStrip * kStrip; j0 < m_pad; j0 += kStrip) {
      const double* rstrip = right + (j0 / kStrip) * ld * kStrip;
      double acc[kTileRows][kStrip] = {};
#ifdef XS_TILE_FMA
      static_assert(kTileRows == 4 && kStrip == 8, "tile_sum_fma is a 4 x 8 tile");
      if (cpu_has_avx2_fma()) {
        tile_sum_fma<kNegateOddRows>(k, lstrip, kStrip, rstrip, kStrip, acc);
      } else
#endif
      {
        for (std::size_t r = 0; r < k; ++r) {
          const double* lr = lstrip + r * kStrip;
          const double* rr = rstrip + r * kStrip;
          const bool negate = kNegateOddRows && (r & 1);
          for (std::size_t ii = 0; ii < kTileRows; ++ii)
            for (std::size_t jj = 0; jj < kStrip; ++jj) acc[ii][jj] += lr[ii] * (negate ? -rr[jj] : rr[jj]);
        }
      }
      add_tile<kTileRows>(acc, i0, j0, cols, sign, matrix, n);
    }
  }
}

/// The dense-run parts √c·a_D of up to kRows observations of one block, waiting for one
/// rank-k update (left = right = this panel).
struct RunPanel {
  static constexpr std::size_t kRows = 64;
  DenseRun run;             ///< block columns of the run (empty: the block has none)
  PanelColumns cols;        ///< its global columns
  std::vector<double> data;  ///< packed, kRows rows; padding columns stay zero
  std::size_t used = 0;

  void reset(const DenseRun& r, std::size_t column_offset) {
    run = r;
    cols.global.resize(r.size());
    for (std::size_t j = 0; j < r.size(); ++j) cols.global[j] = column_offset + r.first + j;
    cols.set_consecutive();
    data.assign(kRows * padded_columns(r.size()), 0.0);
    used = 0;
  }
};

/// The scaled vectors of up to kGroups eliminated groups (b/√S, and e/√S for dials) at their
/// touched columns, waiting for one rank-k update over the union of their columns.
struct GroupQueue {
  static constexpr std::size_t kGroups = 32;
  std::vector<std::size_t> cols;    ///< touched columns, group after group
  std::vector<double> b, e;         ///< b/√S, e/√S at those columns
  std::vector<std::size_t> starts;  ///< first entry of each queued group, then the end
  std::vector<std::uint64_t> bits;  ///< union of the queued columns
  std::size_t union_size = 0, widest = 0;
  std::vector<std::size_t> panel_column;  ///< matrix column -> its packed offset at row 0, during a flush
  PanelColumns panel_cols;
  std::vector<double> left;

  explicit GroupQueue(std::size_t n) : starts{0}, bits((n + 63) / 64, 0), panel_column(n, 0) {}
  std::size_t size() const { return starts.size() - 1; }
};

/// Private per-thread state: a part's matrix (either triangle, see the file comment), rhs and
/// w r²; the dense scatter arrays of the group sums b and e (size n, zero outside the touched
/// columns); a column bitmap that yields the touched columns in ascending order without
/// sorting; the per-block run panels, the group queue and row scratch (a dense row, a row's
/// entries outside its run, segment lists).
struct PartWorkspace {
  std::size_t n;
  double r_sq = 0.0;
  std::vector<double> own_matrix;  ///< the part's matrix, unless it adds into the result
  double* matrix = nullptr;        ///< own_matrix or the result (n x n): see use_matrix
  std::vector<double> rhs, b, e, row;
  std::vector<std::uint64_t> bits;
  std::vector<std::size_t> touched, seg_of, seg_first, seg_last, other_col;
  std::vector<double> other_val;
  std::vector<RunPanel> panels;
  GroupQueue queue;
  /// @p column_offsets and @p runs: each block's first global column and dense run.
  PartWorkspace(std::size_t n_params, const std::vector<std::size_t>& column_offsets,
                const std::vector<DenseRun>& runs)
      : n(n_params), rhs(n_params, 0.0), b(n_params, 0.0),
        e(n_params, 0.0), row(n_params, 0.0), bits((n_params + 63) / 64, 0),
        other_col(n_params, 0), other_val(n_params, 0.0),
        panels(runs.size()), queue(n_params) {
    for (std::size_t k = 0; k < runs.size(); ++k) panels[k].reset(runs[k], column_offsets[k]);
  }

  /// The next part's terms go into @p into (the result), or, with nullptr, into the
  /// workspace's own matrix (allocated on first use) zeroed.
  void use_matrix(double* into) {
    if (into != nullptr) {
      matrix = into;
      return;
    }
    if (own_matrix.empty())
      own_matrix.assign(n * n, 0.0);
    else
      std::fill(own_matrix.begin(), own_matrix.end(), 0.0);
    matrix = own_matrix.data();
  }
};

/// The rank-k update of a run panel's queued rows; empties it.
void flush_run_panel(PartWorkspace& ws, RunPanel& panel) {
  if (panel.used == 0) return;
  add_upper_product<false>(panel.used, RunPanel::kRows, panel.data.data(), panel.data.data(),
                           panel.cols, 1.0, ws.matrix, ws.n);
  panel.used = 0;
}

/// −Σ b bᵀ (schur) or Σ (e eᵀ − b bᵀ) (dials) of the queued groups as one rank-k update over
/// the union of their columns; empties the queue.
void flush_groups(PartWorkspace& ws, bool dials) {
  GroupQueue& q = ws.queue;
  const std::size_t groups = q.size();
  if (groups == 0) return;
  const std::size_t rows = dials ? 2 * groups : groups;
  // per union column its offset in the packed panel at row 0 (packed_index(0, c, rows)); row r
  // adds r·kStrip
  std::vector<std::size_t>& global = q.panel_cols.global;
  global.clear();
  for (std::size_t word = 0; word < q.bits.size(); ++word) {
    std::uint64_t x = q.bits[word];
    q.bits[word] = 0;
    while (x) {
      const std::size_t col = (word << 6) + lowest_bit(x);
      q.panel_column[col] = packed_index(0, global.size(), rows);
      global.push_back(col);
      x &= x - 1;
    }
  }
  q.panel_cols.set_consecutive();
  q.left.assign(rows * padded_columns(global.size()), 0.0);
  double* __restrict left = q.left.data();
  for (std::size_t grp = 0; grp < groups; ++grp) {
    const std::size_t row_offset = (dials ? 2 * grp : grp) * kStrip;
    for (std::size_t i = q.starts[grp]; i < q.starts[grp + 1]; ++i) {
      double* at = left + q.panel_column[q.cols[i]] + row_offset;
      if (dials) {  // rows 2 grp, 2 grp + 1: (e, b); the right operand (e, −b) by negation
        at[0] = q.e[i];
        at[kStrip] = q.b[i];
      } else {
        at[0] = q.b[i];
      }
    }
  }
  if (dials)
    add_upper_product<true>(rows, rows, q.left.data(), q.left.data(), q.panel_cols, 1.0,
                            ws.matrix, ws.n);
  else
    add_upper_product<false>(rows, rows, q.left.data(), q.left.data(), q.panel_cols, -1.0,
                             ws.matrix, ws.n);
  q.cols.clear();
  q.b.clear();
  q.e.clear();
  q.starts.assign(1, 0);
  q.union_size = 0;
  q.widest = 0;
}

// ------------------------------------------------------------------ observation terms

/// rhs += cr a and upper(matrix) += c a aᵀ of a row without its block's dense run: the row is
/// scattered densely (zero elsewhere) and cut into segments of ascending columns with gaps of
/// at most kObsGap merged, so a few long contiguous loops add it (the gaps add exact zeros).
XS_ALWAYS_INLINE void sparse_observation(PartWorkspace& ws, const DerivativesView& v,
                                         std::int64_t first, std::int64_t last, double c,
                                         double cr) {
  constexpr std::size_t kObsGap = 4;
  const auto k = static_cast<std::size_t>(last - first);
  const std::size_t off = v.column_offset;
  const double* av = v.values + first;
  const std::int32_t* iv = v.indices + first;
  const std::size_t n = ws.n;
  double* __restrict row = ws.row.data();
  ws.seg_of.resize(k);
  std::size_t* __restrict seg_of = ws.seg_of.data();
  ws.seg_first.clear();
  ws.seg_last.clear();
  for (std::size_t q = 0; q < k; ++q) {
    const std::size_t cq = off + static_cast<std::size_t>(iv[q]);
    row[cq] = av[q];
    if (q == 0 || cq - (off + static_cast<std::size_t>(iv[q - 1])) > kObsGap) {
      ws.seg_first.push_back(cq);
      ws.seg_last.push_back(cq + 1);
    }
    ws.seg_last.back() = cq + 1;
    seg_of[q] = ws.seg_first.size() - 1;
  }
  const std::size_t n_seg = ws.seg_first.size();
  const std::size_t* seg_first = ws.seg_first.data();
  const std::size_t* seg_last = ws.seg_last.data();
  double* __restrict matrix = ws.matrix;
  double* __restrict rhs = ws.rhs.data();
  for (std::size_t e1 = 0; e1 < k; ++e1) {
    const std::size_t c1 = off + static_cast<std::size_t>(iv[e1]);
    rhs[c1] += cr * av[e1];
    const double ca1 = c * av[e1];
    double* __restrict out = matrix + c1 * n;
    for (std::size_t sg = seg_of[e1]; sg < n_seg; ++sg) {
      const std::size_t to = seg_last[sg];
      for (std::size_t q = sg == seg_of[e1] ? c1 : seg_first[sg]; q < to; ++q)
        out[q] += ca1 * row[q];
    }
  }
  for (std::size_t q = 0; q < k; ++q) row[off + static_cast<std::size_t>(iv[q])] = 0.0;
}

/// Set the bits of columns [lo, hi) in a column bitmap.
XS_ALWAYS_INLINE void mark_columns(std::uint64_t* bits, std::size_t lo, std::size_t hi) {
  for (std::size_t word = lo >> 6; word <= ((hi - 1) >> 6); ++word) {
    const std::size_t from = std::max(lo, word << 6) - (word << 6);
    const std::size_t to = std::min(hi, (word + 1) << 6) - (word << 6);
    const std::uint64_t upto = to == 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << to) - 1;
    bits[word] |= upto & ~((std::uint64_t{1} << from) - 1);
  }
}

/// Set the bits of @p m ascending columns in a column bitmap. The bits of one word are
/// gathered in a register and stored once: or-ing each bit into memory made every column
/// wait for the previous one's store to the same word (a tenth of the normal matrix's time).
XS_ALWAYS_INLINE void mark_sorted_columns(std::uint64_t* bits, const std::size_t* columns, std::size_t m) {
  if (m == 0) return;
  std::size_t word = columns[0] >> 6;
  std::uint64_t word_bits = 0;
  for (std::size_t i = 0; i < m; ++i) {
    const std::size_t w = columns[i] >> 6;
    if (w != word) {
      bits[word] |= word_bits;
      word = w;
      word_bits = 0;
    }
    word_bits |= std::uint64_t{1} << (columns[i] & 63);
  }
  bits[word] |= word_bits;
}

/// The products of a row's m entries outside its block's run (columns oc, values ov) with the
/// run ad (one contiguous loop in each entry's matrix row) and with each other (scalars), times c.
/// kLen, kM: the run's length and m when known at compile time (0: use len, m).
template <std::size_t kLen, std::size_t kM>
XS_ALWAYS_INLINE void other_products(PartWorkspace& ws, double c, const std::size_t* __restrict oc,
                                     const double* __restrict ov, std::size_t m_runtime,
                                     const double* __restrict ad, std::size_t len_runtime,
                                     std::size_t run_column) {
  const std::size_t m = kM != 0 ? kM : m_runtime;
  const std::size_t len = kLen != 0 ? kLen : len_runtime;
  const std::size_t n = ws.n;
  for (std::size_t i = 0; i < m; ++i) {
    const double ca = c * ov[i];
    double* out = ws.matrix + oc[i] * n;
    double* __restrict cross = out + run_column;
    for (std::size_t j = 0; j < len; ++j) cross[j] += ca * ad[j];
    for (std::size_t t = i; t < m; ++t) out[oc[t]] += ca * ov[t];
  }
}

/// Everything of a row holding its block's dense run at entries [p, p + L): rhs += cr a;
/// matrix += c a aᵀ, the run's part √c·a_D queued in the block's panel, each other entry's
/// products with the run as one contiguous loop in its own matrix row (the lower triangle when
/// its column lies after the run) and with the other entries as scalars; when the group is
/// eliminated, the group sums b += cb a, e += ce a (dials), the columns marked in the bitmap and
/// the touched column range widened. kLen: the run's length when known at compile time (the
/// physical model's 8, 24 or 48 harmonics), so its loops unroll and the run stays in registers
/// across the other entries' products; 0: read from the panel.
template <std::size_t kLen>
XS_ALWAYS_INLINE void run_observation(PartWorkspace& ws, RunPanel& panel, const DerivativesView& v,
                                      std::int64_t first, std::int64_t last, std::int64_t p,
                                      const RowCoefficients& rc, bool eliminate, bool dials,
                                      std::size_t& col_min, std::size_t& col_max) {
  const std::size_t off = v.column_offset;
  const std::size_t len = kLen != 0 ? kLen : panel.run.size();
  const std::size_t run_column = off + panel.run.first;
  const double* __restrict ad = v.values + p;
  // the other entries, gathered once (a checked row has at most n entries; stay safe anyway)
  const auto k = static_cast<std::size_t>(last - first);
  if (k > ws.other_col.size()) {
    ws.other_col.resize(k);
    ws.other_val.resize(k);
  }
  std::size_t* __restrict oc = ws.other_col.data();
  double* __restrict ov = ws.other_val.data();
  std::size_t m = 0;
  for (auto q = first; q < p; ++q, ++m) {  // the entries before the run, then after it
    oc[m] = off + static_cast<std::size_t>(v.indices[q]);
    ov[m] = v.values[q];
  }
  for (auto q = p + static_cast<std::int64_t>(len); q < last; ++q, ++m) {
    oc[m] = off + static_cast<std::size_t>(v.indices[q]);
    ov[m] = v.values[q];
  }
  double* __restrict rhs = ws.rhs.data();
  if (eliminate) {
    double* __restrict b = ws.b.data();
    double* __restrict e = ws.e.data();
    for (std::size_t j = 0; j < len; ++j) {
      rhs[run_column + j] += rc.rhs * ad[j];
      b[run_column + j] += rc.b * ad[j];
    }
    for (std::size_t i = 0; i < m; ++i) {
      rhs[oc[i]] += rc.rhs * ov[i];
      b[oc[i]] += rc.b * ov[i];
    }
    if (dials) {
      for (std::size_t j = 0; j < len; ++j) e[run_column + j] += rc.e * ad[j];
      for (std::size_t i = 0; i < m; ++i) e[oc[i]] += rc.e * ov[i];
    }
    std::uint64_t* bits = ws.bits.data();
    mark_columns(bits, run_column, run_column + len);
    mark_sorted_columns(bits, oc, m);
    // columns ascend within a row
    col_min = std::min(col_min, off + static_cast<std::size_t>(v.indices[first]));
    col_max = std::max(col_max, off + static_cast<std::size_t>(v.indices[last - 1]));
  } else {
    for (std::size_t j = 0; j < len; ++j) rhs[run_column + j] += rc.rhs * ad[j];
    for (std::size_t i = 0; i < m; ++i) rhs[oc[i]] += rc.rhs * ov[i];
  }
  const double c = rc.obs;
  if (c == 0.0) return;
  if (panel.used == RunPanel::kRows) flush_run_panel(ws, panel);
  const double root = std::sqrt(c);
  for (std::size_t s = 0; s * kStrip < len; ++s) {
    double* __restrict dst = panel.data.data() + (s * RunPanel::kRows + panel.used) * kStrip;
    const std::size_t width = std::min(kStrip, len - s * kStrip);
    for (std::size_t jj = 0; jj < width; ++jj) dst[jj] = root * ad[s * kStrip + jj];
  }
  ++panel.used;
  if (m == 6)  // two 3-point smoothers (scale and decay): the loops unroll
    other_products<kLen, 6>(ws, c, oc, ov, 6, ad, len, run_column);
  else
    other_products<kLen, 0>(ws, c, oc, ov, m, ad, len, run_column);
}

/// The group sums b += cb a and (dials) e += ce a over a row's entries, the columns marked in
/// the bitmap (bits gathered per word in a register: columns ascend) and the touched column
/// range widened (rows not handled by run_observation).
XS_ALWAYS_INLINE void accumulate_group_sums(PartWorkspace& ws, const DerivativesView& v,
                                            std::int64_t first, std::int64_t last, double cb,
                                            double ce, bool dials, std::size_t& col_min,
                                            std::size_t& col_max) {
  const std::size_t off = v.column_offset;
  double* __restrict b = ws.b.data();
  double* __restrict e = ws.e.data();
  std::uint64_t* bits = ws.bits.data();
  std::size_t word = ~std::size_t{0};
  std::uint64_t word_bits = 0;
  for (auto q = first; q < last; ++q) {
    const std::size_t cq = off + static_cast<std::size_t>(v.indices[q]);
    b[cq] += cb * v.values[q];
    if (dials) e[cq] += ce * v.values[q];
    if ((cq >> 6) != word) {
      if (word_bits) bits[word] |= word_bits;
      word = cq >> 6;
      word_bits = 0;
    }
    word_bits |= std::uint64_t{1} << (cq & 63);
  }
  if (word_bits) bits[word] |= word_bits;
  col_min = std::min(col_min, off + static_cast<std::size_t>(v.indices[first]));
  col_max = std::max(col_max, off + static_cast<std::size_t>(v.indices[last - 1]));
}

// ------------------------------------------------------------------ group corrections

/// Groups touching fewer columns are corrected at once (rank-1/2 over their columns) rather
/// than queued: the bookkeeping of a queued update would outweigh its work.
constexpr std::size_t kMinQueuedColumns = 16;

/// A narrow group's correction −(b bᵀ − [dials] e eᵀ)/S now, upper triangle only, over its
/// touched columns cut into segments (gaps of at most kGap merged: b and e are zero in the
/// gaps, so they add exact zeros; long contiguous loops beat many short runs).
inline void correct_group_now(PartWorkspace& ws, double inv_s, bool dials) {
  constexpr std::size_t kGap = 8;
  const std::size_t m = ws.touched.size();
  const std::size_t* tc = ws.touched.data();
  ws.seg_of.resize(m);
  ws.seg_first.clear();
  ws.seg_last.clear();
  for (std::size_t i = 0; i < m; ++i) {
    if (i == 0 || tc[i] - tc[i - 1] > kGap) {
      ws.seg_first.push_back(tc[i]);
      ws.seg_last.push_back(tc[i] + 1);
    }
    ws.seg_last.back() = tc[i] + 1;
    ws.seg_of[i] = ws.seg_first.size() - 1;
  }
  const std::size_t n_seg = ws.seg_first.size();
  const std::size_t n = ws.n;
  double* __restrict matrix = ws.matrix;
  const double* __restrict b = ws.b.data();
  const double* __restrict e = ws.e.data();
  for (std::size_t i = 0; i < m; ++i) {
    const std::size_t ci = tc[i];
    const double bi = b[ci] * inv_s;
    const double ei = e[ci] * inv_s;
    double* __restrict out = matrix + ci * n;
    for (std::size_t sg = ws.seg_of[i]; sg < n_seg; ++sg) {
      const std::size_t from = sg == ws.seg_of[i] ? ci : ws.seg_first[sg];
      const std::size_t to = ws.seg_last[sg];
      if (dials) {
        for (std::size_t q = from; q < to; ++q) out[q] += ei * e[q] - bi * b[q];
      } else {
        for (std::size_t q = from; q < to; ++q) out[q] -= bi * b[q];
      }
    }
  }
}

/// The group's rank-1 (schur) or rank-2 (dials) correction over its touched columns (the bits
/// of words [col_min/64, col_max/64], ascending): applied now for a narrow group, else its
/// scaled vectors b/√S (and e/√S) are queued, the queue flushed first when its column union
/// would grow beyond twice its widest group (a sparse spread, such as many datasets, would make
/// the union update mostly zeros). Clears b, e and the bits.
inline void group_update(PartWorkspace& ws, double inv_s, bool dials, std::size_t col_min,
                         std::size_t col_max) {
  GroupQueue& q = ws.queue;
  std::uint64_t* bits = ws.bits.data();
  const std::size_t word_lo = col_min >> 6, word_hi = col_max >> 6;
  std::size_t m = 0, added = 0;
  for (std::size_t word = word_lo; word <= word_hi; ++word) {
    m += bit_count(bits[word]);
    added += bit_count(bits[word] & ~q.bits[word]);
  }
  double* __restrict b = ws.b.data();
  double* __restrict e = ws.e.data();
  if (m < kMinQueuedColumns) {
    ws.touched.clear();
    for (std::size_t word = word_lo; word <= word_hi; ++word) {
      for (std::uint64_t x = bits[word]; x; x &= x - 1)
        ws.touched.push_back((word << 6) + lowest_bit(x));
      bits[word] = 0;
    }
    correct_group_now(ws, inv_s, dials);
    for (const std::size_t c : ws.touched) b[c] = e[c] = 0.0;
    return;
  }
  if (q.size() > 0 && q.union_size + added > 2 * std::max(q.widest, m)) {
    flush_groups(ws, dials);
    added = m;
  }
  const double root = std::sqrt(inv_s);
  const std::size_t start = q.cols.size();
  q.cols.resize(start + m);
  q.b.resize(start + m);
  if (dials) q.e.resize(start + m);
  std::size_t i = start;
  for (std::size_t word = word_lo; word <= word_hi; ++word) {
    std::uint64_t x = bits[word];
    bits[word] = 0;
    q.bits[word] |= x;
    for (; x; x &= x - 1, ++i) {
      const std::size_t c = (word << 6) + lowest_bit(x);
      q.cols[i] = c;
      q.b[i] = b[c] * root;
      b[c] = 0.0;
      if (dials) {
        q.e[i] = e[c] * root;
        e[c] = 0.0;
      }
    }
  }
  q.starts.push_back(start + m);
  q.union_size += added;
  q.widest = std::max(q.widest, m);
  if (q.size() == GroupQueue::kGroups) flush_groups(ws, dials);
}

// ------------------------------------------------------------------ parts

/// Contiguous group ranges ("parts") with roughly equal observation counts. The number of parts
/// depends only on the data (never on the thread count), so the fixed-order reduction of the
/// part sums gives bit-identical results for any thread count. Parts are large enough that the
/// O(n²) zeroing and reduction of a part's private matrix stays small against its O(N k²) work.
std::vector<std::size_t> group_parts(const GroupedObservations& t, std::size_t n) {
  constexpr std::size_t kMaxParts = 64;
  constexpr std::size_t kMinObsPerPart = 4096;
  const double n_sq = static_cast<double>(n) * static_cast<double>(n);
  const double by_reduction = static_cast<double>(t.n_obs) * 48.0 / std::max(1.0, n_sq);
  std::size_t parts = std::min(kMaxParts, std::max<std::size_t>(1, t.n_obs / kMinObsPerPart));
  parts = std::min(parts, std::max<std::size_t>(1, static_cast<std::size_t>(by_reduction)));
  parts = std::min(parts, std::max<std::size_t>(1, t.n_groups));
  std::vector<std::size_t> bounds{0};
  for (std::size_t p = 1; p < parts; ++p) {
    const auto target = static_cast<std::int64_t>(t.n_obs * p / parts);
    const auto it = std::lower_bound(t.group_offsets, t.group_offsets + t.n_groups + 1, target);
    bounds.push_back(std::max(bounds.back(), static_cast<std::size_t>(it - t.group_offsets)));
  }
  bounds.push_back(t.n_groups);
  return bounds;
}

/// What the groups' terms read: the table, each block's view (indexed by RowSources::block),
/// where each table row's derivatives are, and g in table order (all rows of the groups read).
struct PartInputs {
  const GroupedObservations& t;
  const DerivativesView* views;  ///< per block
  const RowSources& src;
  const double* g;         ///< scales in table order
  const double* fixed_Ih;  ///< nullptr: Ĩ eliminated
  bool dials;
};

/// All terms of the groups [g_first, g_last) into the workspace: every observation is read
/// once, in table order, and each group's sums are formed once. Terms may stay queued in the
/// workspace (run panels, group queue) until finish_part: consecutive group ranges of one part
/// may be added by consecutive calls (the fused build's chunks), with the same arithmetic as
/// one call over their union.
XS_MULTIVERSION
void group_terms(const PartInputs& in, std::size_t g_first, std::size_t g_last, PartWorkspace& ws) {
  const GroupedObservations& t = in.t;
  for (std::size_t h = g_first; h < g_last; ++h) {
    const GroupElimination ge = group_elimination(t, in.g, h, in.fixed_Ih != nullptr);
    const bool eliminate = ge.inv_s != 0.0;
    std::size_t col_min = ws.n, col_max = 0;
    for (auto l = t.group_offsets[h]; l < t.group_offsets[h + 1]; ++l) {
      const RowCoefficients rc =
          row_coefficients(t, in.g, static_cast<std::size_t>(l), ge, in.fixed_Ih);
      ws.r_sq += rc.r_sq;
      if (!ge.has_terms) continue;  // singleton or empty group: no information on p
      const auto source = static_cast<std::size_t>(l) - in.src.first;
      const auto blk = static_cast<std::size_t>(in.src.block[source]);
      const DerivativesView& v = in.views[blk];
      if (v.n_cols == 0) continue;
      const auto r = static_cast<std::size_t>(in.src.row[source]);
      const std::int64_t first = v.indptr[r];
      const std::int64_t last = v.indptr[r + 1];
      if (first == last) continue;
      RunPanel& panel = ws.panels[blk];
      const std::int64_t p = run_position(v.indices, first, last, panel.run);
      const bool terms = rc.obs != 0.0 || rc.rhs != 0.0;
      if (terms && p < last) {
        switch (panel.run.size()) {  // the physical model's absorption lmax 2, 4, 6
          case 8:
            run_observation<8>(ws, panel, v, first, last, p, rc, eliminate, in.dials, col_min, col_max);
            break;
          case 24:
            run_observation<24>(ws, panel, v, first, last, p, rc, eliminate, in.dials, col_min, col_max);
            break;
          case 48:
            run_observation<48>(ws, panel, v, first, last, p, rc, eliminate, in.dials, col_min, col_max);
            break;
          default:
            run_observation<0>(ws, panel, v, first, last, p, rc, eliminate, in.dials, col_min, col_max);
        }
        continue;
      }
      if (terms) sparse_observation(ws, v, first, last, rc.obs, rc.rhs);
      if (eliminate)
        accumulate_group_sums(ws, v, first, last, rc.b, rc.e, in.dials, col_min, col_max);
    }
    if (eliminate && col_min <= col_max) group_update(ws, ge.inv_s, in.dials, col_min, col_max);
  }
}

/// The part's queued terms (group queue, run panels) into its matrix.
void finish_part(PartWorkspace& ws, bool dials) {
  flush_groups(ws, dials);
  for (RunPanel& panel : ws.panels) flush_run_panel(ws, panel);
}

/// The parts' sum into @p matrix (unfolded) and @p rhs, returning Σ w r². Each thread makes its
/// state with make_state() (a struct whose member ws is its PartWorkspace); part_terms(state, p)
/// adds part p's terms to state.ws, which is zeroed for it. Part 0's terms go straight into
/// the result (no private matrix to zero and add: 11 MB per block at 1,176 parameters); each
/// later part is summed into a thread's private matrix and added to the result in part order
/// (ordered region). The summation order of every element is fixed by the data, the same for
/// any thread count. part_terms must not throw (no exception may leave an OpenMP region).
template <class MakeState, class PartTerms>
double sum_parts(std::size_t n_parts, std::size_t n, int n_threads, double* matrix, double* rhs,
                 MakeState make_state, PartTerms part_terms) {
  const int nt = std::max(1, std::min<int>(n_threads, static_cast<int>(n_parts)));
  double r_sq = 0.0;
  auto run_part = [&](auto& state, std::size_t p) {
    PartWorkspace& ws = state.ws;
    ws.use_matrix(p == 0 ? matrix : nullptr);
    std::fill(ws.rhs.begin(), ws.rhs.end(), 0.0);
    ws.r_sq = 0.0;
    part_terms(state, p);
  };
  auto add_part = [&](const PartWorkspace& ws, std::size_t p) {
    if (p != 0) {
      const double* __restrict src_matrix = ws.matrix;
      for (std::size_t i = 0; i < n * n; ++i) matrix[i] += src_matrix[i];
    }
    for (std::size_t i = 0; i < n; ++i) rhs[i] += ws.rhs[i];
    r_sq += ws.r_sq;
  };
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    auto state = make_state();
    const auto count = static_cast<std::int64_t>(n_parts);
#pragma omp for ordered schedule(static, 1)
    for (std::int64_t p = 0; p < count; ++p) {
      run_part(state, static_cast<std::size_t>(p));
#pragma omp ordered
      add_part(state.ws, static_cast<std::size_t>(p));
    }
  }
#else
  {
    (void)nt;
    auto state = make_state();
    for (std::size_t p = 0; p < n_parts; ++p) {
      run_part(state, p);
      add_part(state.ws, p);
    }
  }
#endif
  return r_sq;
}

/// A thread's state in the whole-table build: its workspace alone.
struct TableState {
  PartWorkspace ws;
};

}  // namespace

NormalEquationsSummary normal_equations(const GroupedObservations& t,
                                        const std::vector<FitBlock>& blocks, std::size_t n,
                                        double* matrix, double* rhs, NormalMatrixKind kind,
                                        const double* fixed_Ih, int n_threads, bool accumulate) {
  std::vector<double> g(t.n_obs);
  gather_scales(blocks, g.data(), n_threads);
  const RowSources src = row_sources(t, blocks, n_threads);
  std::vector<DerivativesView> views;
  std::vector<std::size_t> column_offsets;
  std::vector<DenseRun> runs;
  for (const FitBlock& b : blocks) {
    views.push_back(b.view);
    column_offsets.push_back(b.view.column_offset);
    runs.push_back(find_dense_run(b.view));
  }
  if (!accumulate) {
    std::fill(matrix, matrix + n * n, 0.0);
    std::fill(rhs, rhs + n, 0.0);
  }
  const auto parts = group_parts(t, n);
  const bool dials = kind == NormalMatrixKind::dials;
  const PartInputs in{t, views.data(), src, g.data(), fixed_Ih, dials};
  const double r_sq = sum_parts(
      parts.size() - 1, n, n_threads, matrix, rhs,
      [&] { return TableState{PartWorkspace(n, column_offsets, runs)}; },
      [&](TableState& state, std::size_t p) {
        group_terms(in, parts[p], parts[p + 1], state.ws);
        finish_part(state.ws, dials);
      });
  if (!accumulate) fold_normal_matrix(n, matrix);
  return {r_sq, t.n_obs};
}

namespace {

/// The dense run find_dense_run finds on a model's evaluated rows [first_row, first_row + n_rows),
/// from the pattern of its sampled rows alone (each active term's pattern_rows, columns shifted
/// to the block's): the rows are sampled as there, so the run is the one the whole-table build
/// finds on the model block's matrix, and no value is evaluated.
DenseRun model_dense_run(const TableModel& m) {
  const ModelBlock& block = *m.block;
  const std::size_t samples = std::min(m.n_rows, kRunSampleRows);
  std::vector<std::int64_t> indptr{0};
  std::vector<std::int32_t> indices;
  std::int64_t term_indptr[2] = {0, 0};
  std::vector<std::int32_t> term_indices;
  for (std::size_t s = 0; s < samples; ++s) {
    const std::size_t r = m.first_row + s * m.n_rows / samples;
    for (std::size_t k = 0; k < block.n_terms(); ++k) {
      const ModelTerm& term = block.term(k);
      if (!block.active(k) || term.n_cols() == 0) continue;
      term_indices.resize(term.n_cols());
      term.pattern_rows(r, 1, term_indptr, term_indices.data());
      for (auto q = term_indptr[0]; q < term_indptr[1]; ++q)
        indices.push_back(static_cast<std::int32_t>(block.column_start(k)) + term_indices[q]);
    }
    indptr.push_back(static_cast<std::int64_t>(indices.size()));
  }
  DerivativesView sampled;  // the sampled rows only: find_dense_run then samples each of them
  sampled.n_rows = samples;
  sampled.n_cols = block.n_cols();
  sampled.indptr = indptr.data();
  sampled.indices = indices.data();
  return find_dense_run(sampled);
}

/// Table rows per chunk of the fused build: the chunk's ∂g/∂p (~460 B a row at the physical
/// model's ~38 derivatives, ~0.5 MB) stays in L2 while its groups' terms are added. Measured
/// on a 60k-row physical-model block (1 thread): 1024 rows beat 2048 and 4096.
constexpr std::int64_t kFusedChunkRows = 1024;

/// A thread's state in the fused build: its workspace, and per model its evaluated rows of
/// the current chunk (scratch and view); where each of the chunk's table rows comes from.
struct FusedState {
  PartWorkspace ws;
  std::vector<RowsScratch> scratch;
  std::vector<DerivativesView> views;
  RowSources src;
  bool scales_usable = true;
};

/// Evaluate every model's rows of the groups [h_first, h_last) into the state (views and row
/// sources of these table rows) and their g into @p g_table. A model's rows of a run of groups
/// are consecutive (its table rows ascend), found by bisection.
void evaluate_chunk(const GroupedObservations& t, const std::vector<TableModel>& models,
                    std::size_t h_first, std::size_t h_last, FusedState& state, double* g_table) {
  const std::int64_t row_lo = t.group_offsets[h_first], row_hi = t.group_offsets[h_last];
  RowSources& src = state.src;
  src.first = static_cast<std::size_t>(row_lo);
  src.block.resize(static_cast<std::size_t>(row_hi - row_lo));
  src.row.resize(static_cast<std::size_t>(row_hi - row_lo));
  for (std::size_t k = 0; k < models.size(); ++k) {
    const TableModel& m = models[k];
    const std::int64_t* lo = std::lower_bound(m.table_rows, m.table_rows + m.n_rows, row_lo);
    const std::int64_t* hi = std::lower_bound(lo, m.table_rows + m.n_rows, row_hi);
    const auto count = static_cast<std::size_t>(hi - lo);
    DerivativesView& v = state.views[k];
    v = DerivativesView{};
    v.n_cols = m.block->n_cols();
    v.column_offset = m.column_offset;
    if (count == 0) continue;  // no row of this chunk refers to the model
    RowsScratch& rows = state.scratch[k];
    m.block->evaluate_rows(m.params, m.n_params, m.first_row + static_cast<std::size_t>(lo - m.table_rows),
                           count, rows);
    v.n_rows = count;
    v.scales = rows.g.data();
    v.indptr = rows.indptr.data();
    v.indices = rows.indices.data();
    v.values = rows.values.data();
    for (std::size_t i = 0; i < count; ++i) {
      const auto l = static_cast<std::size_t>(lo[i]);
      src.block[l - src.first] = static_cast<std::int32_t>(k);
      src.row[l - src.first] = static_cast<std::int64_t>(i);
      const double g = rows.g[i];
      g_table[l] = g;
      state.scales_usable = state.scales_usable && std::isfinite(g) && g > 0.0;
    }
  }
}

/// Each table row's least-squares Ĩ from g in table order. Here, outside the kernels compiled
/// for several instruction sets, the group sums are formed as calc_Ih and calc_Ih_rows form
/// them (a kernel's copy may fuse their multiply-adds): the Ĩ a caller stores is theirs, bit
/// for bit.
void least_squares_Ih_rows(const GroupedObservations& t, const double* g_table, double* Ih_table) {
  for (std::size_t h = 0; h < t.n_groups; ++h) {
    const detail::GroupSums sums = detail::group_sums(t, g_table, h);
    const double ih = sums.wgg > 0.0 ? sums.wgi / sums.wgg : 0.0;
    std::fill(Ih_table + t.group_offsets[h], Ih_table + t.group_offsets[h + 1], ih);
  }
}

/// The end of the chunk of groups starting at @p h_first within [h_first, h_last): whole groups
/// up to kFusedChunkRows rows (at least one group, however long).
std::size_t chunk_end(const GroupedObservations& t, std::size_t h_first, std::size_t h_last) {
  const std::int64_t* offsets = t.group_offsets;
  const std::int64_t* past = std::upper_bound(offsets + h_first + 1, offsets + h_last + 1,
                                              offsets[h_first] + kFusedChunkRows);
  return std::max(h_first + 1, static_cast<std::size_t>(past - offsets) - 1);
}

}  // namespace

NormalEquationsSummary model_normal_equations(const GroupedObservations& t,
                                              const std::vector<TableModel>& models, std::size_t n,
                                              double* matrix, double* rhs, double* g_table,
                                              double* Ih_table, NormalMatrixKind kind,
                                              const double* fixed_Ih, int n_threads,
                                              bool accumulate) {
  std::vector<std::size_t> column_offsets;
  std::vector<DenseRun> runs;
  for (const TableModel& m : models) {
    column_offsets.push_back(m.column_offset);
    runs.push_back(model_dense_run(m));
  }
  if (!accumulate) {
    std::fill(matrix, matrix + n * n, 0.0);
    std::fill(rhs, rhs + n, 0.0);
  }
  // the parts of the whole-table build: with the same g and ∂g/∂p, the same bits
  const auto parts = group_parts(t, n);
  const std::size_t n_parts = parts.size() - 1;
  const bool dials = kind == NormalMatrixKind::dials;
  std::vector<std::exception_ptr> errors(n_parts);
  std::vector<char> usable(n_parts, 1);
  const double r_sq = sum_parts(
      n_parts, n, n_threads, matrix, rhs,
      [&] {
        return FusedState{PartWorkspace(n, column_offsets, runs),
                          std::vector<RowsScratch>(models.size()),
                          std::vector<DerivativesView>(models.size()), RowSources{}, true};
      },
      [&](FusedState& state, std::size_t p) {
        try {
          state.scales_usable = true;
          for (std::size_t h = parts[p]; h < parts[p + 1];) {
            const std::size_t h_end = chunk_end(t, h, parts[p + 1]);
            evaluate_chunk(t, models, h, h_end, state, g_table);
            const PartInputs in{t, state.views.data(), state.src, g_table, fixed_Ih, dials};
            group_terms(in, h, h_end, state.ws);
            h = h_end;
          }
          finish_part(state.ws, dials);
          usable[p] = state.scales_usable ? 1 : 0;
        } catch (...) {  // no exception may leave the OpenMP region: rethrown below
          errors[p] = std::current_exception();
        }
      });
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
  if (!accumulate) fold_normal_matrix(n, matrix);
  if (Ih_table && !fixed_Ih) least_squares_Ih_rows(t, g_table, Ih_table);
  NormalEquationsSummary summary{r_sq, t.n_obs};
  summary.scales_usable = std::all_of(usable.begin(), usable.end(), [](char u) { return u != 0; });
  return summary;
}

void fold_normal_matrix(std::size_t n, double* matrix) {
  // Terms sit in either triangle: add the lower triangle into the upper one and mirror it.
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = i + 1; j < n; ++j) {
      const double sum = matrix[i * n + j] + matrix[j * n + i];
      matrix[i * n + j] = sum;
      matrix[j * n + i] = sum;
    }
}

void normal_matrix_diagonal(const GroupedObservations& t, const std::vector<FitBlock>& blocks,
                            std::size_t n, double* diagonal, const double* fixed_Ih) {
  std::vector<double> g(t.n_obs);
  gather_scales(blocks, g.data());
  const RowTerms rt = row_terms(t, g.data(), fixed_Ih);
  const RowSources src = row_sources(t, blocks);
  std::fill(diagonal, diagonal + n, 0.0);
  for (std::size_t b = 0; b < blocks.size(); ++b) {
    const DerivativesView& v = blocks[b].view;
    for (std::size_t r = 0; r < v.n_rows; ++r) {
      const std::size_t row = detail::table_row(blocks[b], r);
      for (auto e = v.indptr[r]; e < v.indptr[r + 1]; ++e)
        diagonal[v.column_offset + static_cast<std::size_t>(v.indices[e])] +=
            rt.obs[row] * v.values[e] * v.values[e];
    }
  }
  if (fixed_Ih) return;
  std::vector<double> bsum(n, 0.0);
  std::vector<std::size_t> touched;
  for (std::size_t h = 0; h < t.n_groups; ++h) {
    if (rt.inv_s[h] == 0.0) continue;
    touched.clear();
    for_each_group_derivative(t, blocks, src, h, [&](auto l, std::size_t c, double d) {
      if (bsum[c] == 0.0) touched.push_back(c);
      bsum[c] += rt.b[l] * d;
      if (bsum[c] == 0.0) bsum[c] = 1e-300;  // keep it marked as touched
    });
    for (std::size_t c : touched) {
      diagonal[c] -= bsum[c] * bsum[c] * rt.inv_s[h];
      bsum[c] = 0.0;
    }
  }
}

namespace {

/// The quadratic forms x_r V_DD x_rᵀ + 2 z_r x_rᵀ of four rows' dense-run parts x_r with their
/// cross vectors z_r, added to @p out4. @p x and @p z hold the rows (4 x padded_columns(len),
/// zero-padded), @p xt the same x transposed (len x 4); @p vdd is V on the run,
/// len x padded_columns(len), zero-padded. Per 4 x 8 tile the products x V_DD + 2 z are summed
/// in registers and multiplied by x into per-lane totals, summed last in a fixed order: each
/// row's arithmetic is the same whichever rows share the call.
XS_MULTIVERSION
void add_run_quadratic_forms(std::size_t len, const double* __restrict x,
                             const double* __restrict xt, const double* __restrict z,
                             const double* __restrict vdd, double* __restrict out4) {
  const std::size_t len_pad = padded_columns(len);
  double lanes[kTileRows][kStrip] = {};
  for (std::size_t j0 = 0; j0 < len_pad; j0 += kStrip) {
    double acc[kTileRows][kStrip];
    for (std::size_t rr = 0; rr < kTileRows; ++rr)
      for (std::size_t jj = 0; jj < kStrip; ++jj) acc[rr][jj] = 2.0 * z[rr * len_pad + j0 + jj];
#ifdef XS_TILE_FMA
    if (cpu_has_avx2_fma()) {
      tile_sum_fma(len, xt, kTileRows, vdd + j0, len_pad, acc);
    } else
#endif
    {
      for (std::size_t i = 0; i < len; ++i) {
        const double* xi = xt + i * kTileRows;
        const double* vr = vdd + i * len_pad + j0;
        for (std::size_t rr = 0; rr < kTileRows; ++rr)
          for (std::size_t jj = 0; jj < kStrip; ++jj) acc[rr][jj] += xi[rr] * vr[jj];
      }
    }
    for (std::size_t rr = 0; rr < kTileRows; ++rr)
      for (std::size_t jj = 0; jj < kStrip; ++jj)
        lanes[rr][jj] += acc[rr][jj] * x[rr * len_pad + j0 + jj];
  }
  for (std::size_t rr = 0; rr < kTileRows; ++rr) {
    const double* l = lanes[rr];
    out4[rr] += ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
  }
}

/// Σ_ab J_a V_ab J_b of one CSR row, entry by entry (rows without the dense run).
inline double row_quadratic_form(std::int64_t first, std::int64_t last, const std::int32_t* indices,
                                 const double* values, std::size_t n, const double* V) {
  double acc = 0.0;
  for (auto a = first; a < last; ++a) {
    const double* Va = V + static_cast<std::size_t>(indices[a]) * n;
    double inner = 0.0;
    for (auto b = first; b < last; ++b) inner += Va[indices[b]] * values[b];
    acc += values[a] * inner;
  }
  return acc;
}

/// Rows [lo, hi) of row_quadratic_forms with V symmetric (@p vs). A row holding the dense run
/// D of J: Σ_st v_s V_st v_t over its other entries now; x_D V_DD x_Dᵀ + 2 z x_Dᵀ, with
/// z = Σ_s v_s V_sD, four rows at a time (add_run_quadratic_forms).
XS_MULTIVERSION
void quadratic_forms_rows(std::size_t lo, std::size_t hi, const std::int64_t* indptr,
                          const std::int32_t* indices, const double* values, std::size_t n,
                          const double* vs, const DenseRun& run, const double* vdd, double* out) {
  const std::size_t len = run.size();
  const std::size_t len_pad = padded_columns(len);
  std::vector<double> x(kTileRows * len_pad, 0.0), z(kTileRows * len_pad, 0.0),
      xt(len * kTileRows, 0.0);
  std::size_t pending[kTileRows] = {};
  std::size_t used = 0;
  double forms[kTileRows] = {};
  auto flush = [&]() {
    for (std::size_t rr = used; rr < kTileRows; ++rr)  // unused slots: zero rows
      for (std::size_t j = 0; j < len; ++j)
        x[rr * len_pad + j] = xt[j * kTileRows + rr] = z[rr * len_pad + j] = 0.0;
    for (std::size_t rr = 0; rr < kTileRows; ++rr) forms[rr] = 0.0;
    add_run_quadratic_forms(len, x.data(), xt.data(), z.data(), vdd, forms);
    for (std::size_t rr = 0; rr < used; ++rr) out[pending[rr]] += forms[rr];
    used = 0;
  };
  for (std::size_t r = lo; r < hi; ++r) {
    const std::int64_t first = indptr[r];
    const std::int64_t last = indptr[r + 1];
    const std::int64_t p = run_position(indices, first, last, run);
    if (p == last) {
      out[r] = row_quadratic_form(first, last, indices, values, n, vs);
      continue;
    }
    const auto run_end = p + static_cast<std::int64_t>(len);
    double* __restrict xr = x.data() + used * len_pad;
    double* __restrict zr = z.data() + used * len_pad;
    for (std::size_t j = 0; j < len; ++j) {
      xr[j] = xt[j * kTileRows + used] = values[p + static_cast<std::int64_t>(j)];
      zr[j] = 0.0;
    }
    const std::int64_t side_first[2] = {first, run_end};
    const std::int64_t side_last[2] = {p, last};
    double sparse = 0.0;  // Σ_s v_s (v_s V_ss + 2 Σ_{t after s} V_st v_t) over the other entries
    for (int side = 0; side < 2; ++side)
      for (auto s = side_first[side]; s < side_last[side]; ++s) {
        const double* vrow = vs + static_cast<std::size_t>(indices[s]) * n;
        const double* __restrict vsd = vrow + run.first;
        for (std::size_t j = 0; j < len; ++j) zr[j] += values[s] * vsd[j];
        double after = 0.0;
        for (int other = side; other < 2; ++other)
          for (auto t = other == side ? s + 1 : side_first[other]; t < side_last[other]; ++t)
            after += vrow[indices[t]] * values[t];
        sparse += values[s] * (values[s] * vrow[indices[s]] + 2.0 * after);
      }
    out[r] = sparse;
    pending[used] = r;
    if (++used == kTileRows) flush();
  }
  if (used > 0) flush();
}

/// row_quadratic_form of a row without the dense run, compiled for each target as
/// quadratic_forms_rows inlines it (the same FMAs): for the AVX-512 kernel below.
XS_MULTIVERSION
double row_quadratic_form_any(std::int64_t first, std::int64_t last, const std::int32_t* indices,
                              const double* values, std::size_t n, const double* V) {
  return row_quadratic_form(first, last, indices, values, n, V);
}

#ifdef XS_TILE_FMA
/// quadratic_forms_rows for a dense run of at most 8 · kStrips columns, with AVX-512: each
/// row's cross vector z and its run's products x V_DD + 2 z held in registers (kStrips
/// strips of 8), four rows' products interleaved for independent FMA chains, x read in place
/// from the row's entries. Every value is the x86-64-v3 quadratic_forms_rows' operation for
/// operation: z_j = fma(v_s, V_sj, z_j) over the other entries s in order; the sparse sum
/// fma(v_s, fma(after_s, 2, v_s V_ss), ·) with after_s an FMA chain; per 8-column strip
/// acc = 2z then fma(x_i, V_ij, acc) over i, lanes = fma(acc, x, lanes) over the strips, and
/// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) + 0 added to the sparse sum: the bits do
/// not change, only the speed (the zero-padded columns past the run stay +0 as there).
template <int kStrips>
struct RunTileAvx512 {
  std::size_t used = 0;
  std::size_t pending[kTileRows] = {};
  const double* run_values[kTileRows] = {};  ///< each row's run entries (x), in place
  double sparse_sums[kTileRows] = {};
  __m512d z[kTileRows][kStrips];
};

/// The dense-run part of the tile's rows (see quadratic_forms_rows_avx512), written to @p out.
template <int kStrips>
__attribute__((target("avx512f,fma"))) void flush_run_tile_avx512(RunTileAvx512<kStrips>& tile,
                                                                   std::size_t len,
                                                                   const double* vdd,
                                                                   __mmask8 tail, double* out) {
  const std::size_t len_pad = padded_columns(len);
  const std::size_t used = tile.used;
  __m512d acc[kTileRows][kStrips];
  for (std::size_t rr = 0; rr < used; ++rr)
    for (int k = 0; k < kStrips; ++k) acc[rr][k] = _mm512_add_pd(tile.z[rr][k], tile.z[rr][k]);
  if (used == kTileRows) {  // the usual case: four chains per strip, unrolled
    for (std::size_t i = 0; i < len; ++i) {
      const double* vr = vdd + i * len_pad;
      __m512d vrow[kStrips];
      for (int k = 0; k < kStrips; ++k) vrow[k] = _mm512_loadu_pd(vr + k * kStrip);
      for (std::size_t rr = 0; rr < kTileRows; ++rr) {
        const __m512d xi = _mm512_set1_pd(tile.run_values[rr][i]);
        for (int k = 0; k < kStrips; ++k) acc[rr][k] = _mm512_fmadd_pd(xi, vrow[k], acc[rr][k]);
      }
    }
  } else {
    for (std::size_t i = 0; i < len; ++i) {
      const double* vr = vdd + i * len_pad;
      for (std::size_t rr = 0; rr < used; ++rr) {
        const __m512d xi = _mm512_set1_pd(tile.run_values[rr][i]);
        for (int k = 0; k < kStrips; ++k)
          acc[rr][k] = _mm512_fmadd_pd(xi, _mm512_loadu_pd(vr + k * kStrip), acc[rr][k]);
      }
    }
  }
  for (std::size_t rr = 0; rr < used; ++rr) {
    __m512d lanes = _mm512_setzero_pd();
    for (int k = 0; k < kStrips; ++k) {
      const __mmask8 m = k == kStrips - 1 ? tail : static_cast<__mmask8>(0xFF);
      lanes = _mm512_fmadd_pd(acc[rr][k], _mm512_maskz_loadu_pd(m, tile.run_values[rr] + k * kStrip), lanes);
    }
    // (l0 + l1), (l2 + l3), ... in every pair; then pairs of pairs; then the two halves
    // (a + b and b + a are the same bits)
    const __m512d pairs = _mm512_add_pd(lanes, _mm512_shuffle_pd(lanes, lanes, 0x55));
    const __m512d quads = _mm512_add_pd(pairs, _mm512_maskz_shuffle_f64x2(0xFF, pairs, pairs, 0xB1));
    const __m512d all = _mm512_add_pd(quads, _mm512_maskz_shuffle_f64x2(0xFF, quads, quads, 0x4E));
    const double form = 0.0 + _mm512_cvtsd_f64(all);
    out[tile.pending[rr]] = tile.sparse_sums[rr] + form;
  }
  tile.used = 0;
}

/// quadratic_forms_rows for a dense run of at most 8 · kStrips columns, with AVX-512: each
/// row's cross vector z and its run's products x V_DD + 2 z held in registers (kStrips
/// strips of 8), four rows' products interleaved for independent FMA chains, x read in place
/// from the row's entries. Every value is the x86-64-v3 quadratic_forms_rows' operation for
/// operation: z_j = fma(v_s, V_sj, z_j) over the other entries s in order; the sparse sum
/// fma(v_s, fma(after_s, 2, v_s V_ss), ·) with after_s an FMA chain; per 8-column strip
/// acc = 2z then fma(x_i, V_ij, acc) over i, lanes = fma(acc, x, lanes) over the strips, and
/// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) + 0 added to the sparse sum: the bits do
/// not change, only the speed (the zero-padded columns past the run stay +0 as there).
template <int kStrips>
__attribute__((target("avx512f,fma"))) void quadratic_forms_rows_avx512(
    std::size_t lo, std::size_t hi, const std::int64_t* indptr, const std::int32_t* indices,
    const double* values, std::size_t n, const double* vs, const DenseRun& run,
    const double* vdd, double* out) {
  const std::size_t len = run.size();
  // lanes of the last strip past the run: masked off (loaded as +0)
  const auto tail = static_cast<__mmask8>(len % kStrip == 0 ? 0xFF : (1u << (len % kStrip)) - 1u);
  RunTileAvx512<kStrips> tile;
  for (std::size_t r = lo; r < hi; ++r) {
    const std::int64_t first = indptr[r];
    const std::int64_t last = indptr[r + 1];
    const std::int64_t p = run_position(indices, first, last, run);
    if (p == last) {
      out[r] = row_quadratic_form_any(first, last, indices, values, n, vs);
      continue;
    }
    const auto run_end = p + static_cast<std::int64_t>(len);
    __m512d zr[kStrips];
    for (int k = 0; k < kStrips; ++k) zr[k] = _mm512_setzero_pd();
    const std::int64_t side_first[2] = {first, run_end};
    const std::int64_t side_last[2] = {p, last};
    double sparse = 0.0;
    for (int side = 0; side < 2; ++side)
      for (auto s = side_first[side]; s < side_last[side]; ++s) {
        const double* vrow = vs + static_cast<std::size_t>(indices[s]) * n;
        const double* vsd = vrow + run.first;
        const __m512d vs_b = _mm512_set1_pd(values[s]);
        for (int k = 0; k < kStrips; ++k) {
          const __mmask8 m = k == kStrips - 1 ? tail : static_cast<__mmask8>(0xFF);
          zr[k] = _mm512_fmadd_pd(vs_b, _mm512_maskz_loadu_pd(m, vsd + k * kStrip), zr[k]);
        }
        double after = 0.0;
        for (int other = side; other < 2; ++other)
          for (auto t = other == side ? s + 1 : side_first[other]; t < side_last[other]; ++t)
            after = std::fma(vrow[indices[t]], values[t], after);
        const double diagonal = values[s] * vrow[indices[s]];
        sparse = std::fma(values[s], std::fma(after, 2.0, diagonal), sparse);
      }
    const std::size_t u = tile.used;
    for (int k = 0; k < kStrips; ++k) tile.z[u][k] = zr[k];
    tile.sparse_sums[u] = sparse;
    tile.run_values[u] = values + p;
    tile.pending[u] = r;
    if (++tile.used == kTileRows) flush_run_tile_avx512<kStrips>(tile, len, vdd, tail, out);
  }
  if (tile.used > 0) flush_run_tile_avx512<kStrips>(tile, len, vdd, tail, out);
}

/// quadratic_forms_rows, with the AVX-512 kernel when the CPU has it and the run fits in four
/// strips (the same bits either way).
void quadratic_forms_rows_widest(std::size_t lo, std::size_t hi, const std::int64_t* indptr,
                                 const std::int32_t* indices, const double* values, std::size_t n,
                                 const double* vs, const DenseRun& run, const double* vdd,
                                 double* out) {
  const std::size_t strips = padded_columns(run.size()) / kStrip;
  if (cpu_has_avx512() && strips >= 1 && strips <= 4) {
    switch (strips) {
      case 1: return quadratic_forms_rows_avx512<1>(lo, hi, indptr, indices, values, n, vs, run, vdd, out);
      case 2: return quadratic_forms_rows_avx512<2>(lo, hi, indptr, indices, values, n, vs, run, vdd, out);
      case 3: return quadratic_forms_rows_avx512<3>(lo, hi, indptr, indices, values, n, vs, run, vdd, out);
      default: return quadratic_forms_rows_avx512<4>(lo, hi, indptr, indices, values, n, vs, run, vdd, out);
    }
  }
  quadratic_forms_rows(lo, hi, indptr, indices, values, n, vs, run, vdd, out);
}
#else
void quadratic_forms_rows_widest(std::size_t lo, std::size_t hi, const std::int64_t* indptr,
                                 const std::int32_t* indices, const double* values, std::size_t n,
                                 const double* vs, const DenseRun& run, const double* vdd,
                                 double* out) {
  quadratic_forms_rows(lo, hi, indptr, indices, values, n, vs, run, vdd, out);
}
#endif

}  // namespace

void row_quadratic_forms(std::size_t n_rows, const std::int64_t* indptr,
                         const std::int32_t* indices, const double* values, std::size_t n,
                         const double* V, double* out, int n_threads) {
  // Σ_ab J_a V_ab J_b only sees the symmetric part of V: symmetrise a copy if V is not exactly
  // symmetric (for a symmetric V the copy would be V itself).
  bool symmetric = true;
  for (std::size_t a = 0; a < n && symmetric; ++a)
    for (std::size_t b = a + 1; b < n; ++b)
      if (V[a * n + b] != V[b * n + a]) {
        symmetric = false;
        break;
      }
  std::vector<double> symmetrised;
  if (!symmetric) {
    symmetrised.resize(n * n);
    for (std::size_t a = 0; a < n; ++a)
      for (std::size_t b = 0; b < n; ++b)
        symmetrised[a * n + b] = 0.5 * (V[a * n + b] + V[b * n + a]);
  }
  const double* vs = symmetric ? V : symmetrised.data();
  DerivativesView view;
  view.n_rows = n_rows;
  view.n_cols = n;
  view.indptr = indptr;
  view.indices = indices;
  view.values = values;
  const DenseRun run = find_dense_run(view);
  const std::size_t len = run.size();
  const std::size_t len_pad = padded_columns(len);
  std::vector<double> vdd(len * len_pad, 0.0);  // V on the run, zero-padded
  for (std::size_t i = 0; i < len; ++i)
    for (std::size_t j = 0; j < len; ++j)
      vdd[i * len_pad + j] = vs[(run.first + i) * n + run.first + j];
  const int nt =
      std::max(1, std::min<int>(n_threads, static_cast<int>(std::max<std::size_t>(n_rows, 1))));
  detail::per_thread(nt, [&](int th, int) {
    const std::size_t lo = n_rows * static_cast<std::size_t>(th) / static_cast<std::size_t>(nt);
    const std::size_t hi = n_rows * static_cast<std::size_t>(th + 1) / static_cast<std::size_t>(nt);
    quadratic_forms_rows_widest(lo, hi, indptr, indices, values, n, vs, run, vdd.data(), out);
  });
}

namespace {

/// The equal row chunks of model_row_variances for a block of @p n_rows rows on @p n_threads
/// threads: at most 4096 rows each (a chunk's ∂g/∂p, ~0.5 MB, stays in L2), their count a
/// whole multiple of the threads (a streamed block of ~20k rows is then 6 chunks, 3 : 3 on two
/// threads, instead of 5 of 4096 rows, 3 : 2). Each row's variance does not depend on it.
struct RowChunks {
  std::size_t rows_per_chunk = 0, n_chunks = 0;
};

RowChunks row_chunks(std::size_t n_rows, int n_threads) {
  constexpr std::size_t kMaxRows = 4096;
  const auto threads = static_cast<std::size_t>(std::max(1, n_threads));
  std::size_t n_chunks = (n_rows + kMaxRows - 1) / kMaxRows;
  if (threads > 1 && n_chunks > 0) n_chunks = (n_chunks + threads - 1) / threads * threads;
  RowChunks c;
  c.rows_per_chunk = n_chunks > 0 ? (n_rows + n_chunks - 1) / n_chunks : kMaxRows;
  c.n_chunks = c.rows_per_chunk > 0 ? (n_rows + c.rows_per_chunk - 1) / c.rows_per_chunk : 0;
  return c;
}

}  // namespace

void model_row_variances(const ModelBlock& block, const double* params, std::size_t n_params,
                         const double* V, double* variances, double* g, int n_threads) {
  const ModelBlock* blocks[1] = {&block};
  model_row_variances_into(1, blocks, params, n_params, V, nullptr, variances, g, n_threads);
}

void model_row_variances_into(std::size_t n_blocks, const ModelBlock* const* blocks,
                              const double* params, std::size_t n_params, const double* V,
                              const std::int64_t* const* rows, double* variances, double* g,
                              int n_threads) {
  // The tasks are every block's chunks, block after block: each chunk as model_row_variances
  // of its block alone cuts it (the same rows evaluated and reduced together).
  struct Task {
    std::size_t block, first, count;
  };
  std::vector<Task> tasks;
  std::size_t n_cols = 0;
  for (std::size_t b = 0; b < n_blocks; ++b) {
    if (b == 0) n_cols = blocks[b]->n_cols();
    if (blocks[b]->n_cols() != n_cols)
      throw std::invalid_argument("model_row_variances: the blocks have different column counts");
    const std::size_t n_rows = blocks[b]->n_rows();
    const RowChunks c = row_chunks(n_rows, n_threads);
    for (std::size_t k = 0; k < c.n_chunks; ++k) {
      const std::size_t first = k * c.rows_per_chunk;
      tasks.push_back({b, first, std::min(c.rows_per_chunk, n_rows - first)});
    }
  }
  const std::size_t n_tasks = tasks.size();
  const int nt = std::max(1, std::min<int>(n_threads, static_cast<int>(std::max<std::size_t>(n_tasks, 1))));
  std::vector<std::string> failure(static_cast<std::size_t>(nt));
  // threads take contiguous runs of whole chunks; each row's result does not depend on the split
  detail::per_thread(nt, [&](int th, int) {
    const std::size_t lo = n_tasks * static_cast<std::size_t>(th) / static_cast<std::size_t>(nt);
    const std::size_t hi = n_tasks * static_cast<std::size_t>(th + 1) / static_cast<std::size_t>(nt);
    RowsScratch scratch;
    std::vector<double> chunk_variances;
    try {
      for (std::size_t k = lo; k < hi; ++k) {
        const Task& task = tasks[k];
        blocks[task.block]->evaluate_rows(params, n_params, task.first, task.count, scratch);
        if (rows == nullptr) {  // the block's own rows, in order
          std::copy(scratch.g.begin(), scratch.g.end(), g + task.first);
          row_quadratic_forms(task.count, scratch.indptr.data(), scratch.indices.data(),
                              scratch.values.data(), n_cols, V, variances + task.first, 1);
          continue;
        }
        chunk_variances.resize(task.count);
        row_quadratic_forms(task.count, scratch.indptr.data(), scratch.indices.data(),
                            scratch.values.data(), n_cols, V, chunk_variances.data(), 1);
        const std::int64_t* at = rows[task.block] + task.first;
        for (std::size_t r = 0; r < task.count; ++r) {
          const auto out = static_cast<std::size_t>(at[r]);
          variances[out] = chunk_variances[r];
          g[out] = scratch.g[r];
        }
      }
    } catch (const std::exception& e) {  // no exception may leave an OpenMP region
      failure[static_cast<std::size_t>(th)] = e.what();
    }
  });
  for (const auto& f : failure)
    if (!f.empty()) throw std::invalid_argument(f);
}

namespace {

/// Forward substitution L y = b (row i of L is contiguous: a dot product per row), then back
/// substitution Lᵀ x = y, column by column of Lᵀ (row i of L again: an axpy per row).
XS_MULTIVERSION
void cholesky_substitutions(std::size_t n, const double* __restrict lower, double* __restrict x) {
  for (std::size_t i = 0; i < n; ++i) {
    const double* row = lower + i * n;
    double acc = 0.0;
    for (std::size_t k = 0; k < i; ++k) acc += row[k] * x[k];
    x[i] = (x[i] - acc) / row[i];
  }
  for (std::size_t i = n; i-- > 0;) {
    const double* row = lower + i * n;
    x[i] /= row[i];
    const double xi = x[i];
    for (std::size_t k = 0; k < i; ++k) x[k] -= row[k] * xi;
  }
}

}  // namespace

void cholesky_solve(std::size_t n, const double* lower, double* x) {
  for (std::size_t i = 0; i < n; ++i)
    require(lower[i * n + i] != 0.0 && std::isfinite(lower[i * n + i]),
            "cholesky_solve: the factor's diagonal must be finite and non-zero");
  cholesky_substitutions(n, lower, x);
}

}  // namespace xtalscale::fit
