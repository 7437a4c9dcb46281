/// @file components.hpp
/// @brief Kernels behind the scale components (spec §2): CSR weight-matrix helpers, fused exp
/// scales and derivatives, CSR products and the SH surface. The smoother weights themselves come
/// from xtalscale/smoother.hpp (GaussianSmoother<D>::multi_value_weight, normalised mode; the
/// 1-D DIALS-exact rows from SmootherAxis::eval).
///
/// Every kernel works on caller-owned, row-major buffers so the Python layer can hand numpy
/// arrays in and out without copies. A CSR matrix here is (indptr[n_rows+1], indices[nnz],
/// data[nnz]) with 32-bit indices and sorted column indices within each row (scipy canonical
/// form). Kernels hold no state and are safe to call concurrently on distinct outputs.
#pragma once

#include <cstddef>
#include <array>
#include <cstdint>
#include <vector>

#include <Eigen/SparseCore>

#include "xtalscale/export.hpp"
#include "xtalscale/smoother.hpp"

namespace xtalscale::components {

/// Normalised weights w_j/Σw of a 1-D @p smoother at n points x[i] as CSR, with DIALS's own
/// operations (SmootherAxis::eval: w = exp(−ds·ds), ds = (z − pos)/σ, each row scaled by 1/Σw),
/// so the weights are DIALS's bit for bit. The exactness policy: 1-D blocks up to
/// lean_min_reflections use this (DIALS's tests compare these weights exactly); 2-D/3-D blocks
/// and large 1-D blocks use the smoother's bulk kernel (GaussianSmoother::multi_value_weight,
/// within ~1e-15 relative of DIALS; golden DIALS scales still agree to 1e-12).
/// @p indices / @p data need capacity n·smoother.max_row_nnz(); returns nnz. Throws
/// std::invalid_argument naming "x" for a non-finite coordinate.
XTALSCALE_EXPORT std::size_t dials_weight_matrix_1d(const GaussianSmoother<1>& smoother,
                                                   std::size_t n, const double* x,
                                                   std::int32_t* indptr, std::int32_t* indices,
                                                   double* data);

/// Move column 0 of a CSR matrix out into a dense vector, in place: for each row whose first
/// stored column is 0, first_col[row] receives that entry and it is removed; every other column
/// index is decreased by one. indptr is rewritten; returns the new nnz. This turns the
/// normalised weight matrix of a first-fixed 1-D smoother into (∂s/∂p₁.., ∂s/∂p₀) so that
/// value = W'·p[1:] + first_col·p₀ while W' is the derivative matrix (spec §3.4).
XTALSCALE_EXPORT std::size_t split_first_column(std::size_t n_rows, std::int32_t* indptr,
                                                std::int32_t* indices, double* data,
                                                double* first_col);

/// out[i] = Σ_k data[k]·p[indices[k]] over row i (+ first_col[i]·p0 if first_col is non-null).
XTALSCALE_EXPORT void csr_matvec(std::size_t n_rows, const std::int32_t* indptr,
                                 const std::int32_t* indices, const double* data,
                                 const double* p, const double* first_col, double p0,
                                 double* out);

/// out[i] = (v − start)/width with v = values[i·stride], or v = 1/(x·x) for x = values[i·stride]
/// with @p inverse_square (DIALS's smoother coordinates from a detector position, a time or
/// a resolution 1/d², with DIALS's operations so the numbers are the same); @p stride is in
/// elements (a column of an n × 3 array has stride 3).
XTALSCALE_EXPORT void bin_coordinates(std::size_t n, const double* values, std::ptrdiff_t stride,
                                      double start, double width, bool inverse_square,
                                      double* out);

/// scales[i] = exp(coef·factor[i]); if @p derivs is non-null, derivs[i] = scales[i]·factor[i].
/// One kernel for B factors (factor 1/(2d²)) and dose decay (x/d or x/d²).
XTALSCALE_EXPORT void exp_scales(std::size_t n, const double* factor, double coef, double* scales,
                                 double* derivs);

/// Smoothed B: value = W·p (with first_col/p0 as in csr_matvec), scales = exp(value·factor);
/// if @p d_data is non-null it receives data[k]·scales[i]·factor[i] (row-multiplied W).
XTALSCALE_EXPORT void smooth_b_scales(std::size_t n_rows, const std::int32_t* indptr,
                                      const std::int32_t* indices, const double* data,
                                      const double* p, const double* first_col, double p0,
                                      const double* factor, double* scales, double* d_data);

/// out_data[k] = data[k]·v[row(k)] (DIALS row_multiply on a CSR matrix).
XTALSCALE_EXPORT void row_multiply(std::size_t n_rows, const std::int64_t* indptr,
                                   const double* data, const double* v, double* out_data);

/// SH surface: scales[i] = 1 + Σ_k H[i,k]·coef[k] for a row-major n × n_params matrix H.
XTALSCALE_EXPORT void sh_scales(std::size_t n, std::size_t n_params, const double* harmonics,
                                const double* coef, double* scales);

/// SH surface from a float32 harmonic block: scales[i] = 1 + Σ_k double(H[i,k])·coef[k], summed
/// in double (four partial sums per row in a fixed order; also compiled for AVX2+FMA and
/// picked at run time, where FMA may change the last bit). Used in the large-data (lookup-table) regime, where the block is held as float32:
/// its 2^-24 ≈ 6e-8 relative rounding is far below the ~1e-2 error of the 0.5° lookup table.
XTALSCALE_EXPORT void sh_scales_f32(std::size_t n, std::size_t n_params, const float* harmonics,
                                    const double* coef, double* scales);

/// Dense transposed product out[k] += Σ_i u[i]·H[i,k] for k < @p n_cols, H a row-major
/// n × n_cols float32 block (the derivatives of a harmonic term). Each column is summed in row
/// order by FMA from out[k] (a fixed order: identical bits on every SIMD level, any CPU with
/// FMA); up to 32 columns are held in registers over all rows.
XTALSCALE_EXPORT void dense_transpose_product(std::size_t n, std::size_t n_cols, const float* h,
                                              const double* u, double* out);
/// The same for a float64 block.
XTALSCALE_EXPORT void dense_transpose_product(std::size_t n, std::size_t n_cols, const double* h,
                                              const double* u, double* out);

/// Float32 harmonic block from the lookup table: out[j, k] = float((t[i0[j], k] + t[i1[j], k])/2)
/// for k < n_cols, with t an n_rows × row_stride row-major table. Throws std::out_of_range
/// naming s0_lookup / s1_lookup for an index outside [0, n_rows).
XTALSCALE_EXPORT void harmonics_from_lookup_f32(const std::int32_t* i0, const std::int32_t* i1,
                                                std::size_t n, const double* table,
                                                std::size_t n_rows, std::size_t row_stride,
                                                std::size_t n_cols, float* out);

/// A lean window record (see smooth_1d_prepare): the first smoother value of the window ...
constexpr std::uint16_t window_record(int first, int count) noexcept {
  return static_cast<std::uint16_t>((first << 3) | count);
}
/// ... read back: its first smoother value and its number of values (at most 5).
constexpr int window_first(std::uint16_t record) noexcept { return record >> 3; }
constexpr int window_count(std::uint16_t record) noexcept { return record & 7; }

/// Lean 1-D smooth component (holds no weights), for repeated calls on the same coordinates.
/// Prepare once: window[i] = first << 3 | count of point i's smoother window, and q[i] = exp(2a·d_i),
/// a = 1/σ², d_i = z_i − pos[first] (NaN for a point so far outside the range that q^k could
/// overflow; those rows use DIALS's direct formula from x at apply time). 10 bytes per point.
/// Returns the number of such far points. Needs num_values() <= 8191.
XTALSCALE_EXPORT std::size_t smooth_1d_prepare(const GaussianSmoother<1>& smoother,
                                               std::size_t n, const double* x, double x_shift,
                                               std::uint16_t* window, double* q);

/// Apply: write, into caller buffers, scales[i] = Σ_j w_ij p_j (or, with @p factor, the
/// smoothed-B scale exp(that · factor[i])) and, if @p data is non-null, the derivative matrix
/// ∂s/∂p (CSR, 32-bit indices; without column 0 when @p first_fixed; for the B form each row is
/// also multiplied by scales[i]·factor[i]); @p indices / @p data need capacity
/// n·smoother.max_row_nnz() (entries of @p data past the returned nnz may be overwritten: rows
/// in SIMD lanes are written at the full window width, within that capacity). The windows and q come from smooth_1d_prepare, so a row costs no
/// exponential: the normalised weights are q^k·c_k / Σ_j q^j·c_j with c_k = exp(−a k²)
/// (the common factor exp(−a d²) cancels), within a few ulp of DIALS's direct formula.
/// The smoothed-B form takes @p factor = 1/(2d²) per point (finite, > 0) instead of d.
/// With @p write_pattern false, indptr/indices are neither written nor read (they hold the
/// pattern of an earlier call on the same windows): only scales and data are written.
XTALSCALE_EXPORT std::size_t smooth_1d_apply(const GaussianSmoother<1>& smoother, std::size_t n,
                                             const double* x, double x_shift,
                                             const std::uint16_t* window, const double* q,
                                             const double* p, std::size_t n_params,
                                             bool first_fixed, const double* factor,
                                             double* scales,
                                             std::int32_t* indptr, std::int32_t* indices,
                                             double* data, bool write_pattern = true);

/// Check that a CSR structure is well formed for a n_rows × n_cols matrix: indptr starts at 0,
/// is non-decreasing and ends at nnz, and every index is in [0, n_cols). Throws naming @p what.
XTALSCALE_EXPORT void validate_csr(std::size_t n_rows, std::size_t n_cols,
                                   const std::int64_t* indptr, const std::int64_t* indices,
                                   std::size_t nnz, const char* what);

/// The normalised weight matrix of a smooth component for one block of reflections: built
/// once (it depends only on the coordinates and the smoother settings), validated once, then
/// reused on every call since only the parameters change. With a fixed first parameter, its
/// column is held separately (first_col) and the matrix has columns for p₁.. only.
class XTALSCALE_EXPORT WeightMatrix {
 public:
  /// Zero-copy Eigen view of the CSR arrays (row-major sparse, 32-bit indices).
  using EigenMap = Eigen::Map<const Eigen::SparseMatrix<double, Eigen::RowMajor, std::int32_t>>;

  WeightMatrix() = default;
  /// Take ownership of CSR arrays (validated): n_rows × n_cols; with @p fixed_first, first_col
  /// holds the n_rows weights of p₀, otherwise it must be empty.
  WeightMatrix(std::size_t n_rows, std::size_t n_cols, std::vector<std::int32_t> indptr,
               std::vector<std::int32_t> indices, std::vector<double> data,
               std::vector<double> first_col, bool fixed_first);

  std::size_t n_rows() const noexcept { return n_rows_; }
  /// Columns of the derivative matrix (n_params, or n_params − 1 with a fixed first parameter).
  std::size_t n_cols() const noexcept { return n_cols_; }
  /// Length of the full parameter vector the value needs.
  std::size_t n_params() const noexcept { return n_cols_ + (fixed_first() ? 1 : 0); }
  bool fixed_first() const noexcept { return fixed_; }
  /// Bytes held (the arrays' sizes, not their capacities).
  std::size_t nbytes() const noexcept {
    return indptr_.size() * sizeof(std::int32_t) + indices_.size() * sizeof(std::int32_t) +
           (data_.size() + first_col_.size()) * sizeof(double);
  }
  std::size_t nnz() const noexcept { return data_.size(); }
  const std::vector<std::int32_t>& indptr() const noexcept { return indptr_; }
  const std::vector<std::int32_t>& indices() const noexcept { return indices_; }
  const std::vector<double>& data() const noexcept { return data_; }
  const std::vector<double>& first_col() const noexcept { return first_col_; }
  /// The derivative matrix ∂value/∂p (n_rows × n_cols) as an Eigen sparse view of this object.
  EigenMap as_eigen() const {
    return EigenMap(static_cast<Eigen::Index>(n_rows_), static_cast<Eigen::Index>(n_cols_),
                    static_cast<Eigen::Index>(data_.size()), indptr_.data(), indices_.data(),
                    data_.data());
  }

  /// value[i] = Σ w_ij p_j over the full parameter vector @p p (length n_params()).
  void values(const double* p, double* out) const;
  /// Smoothed-B scales exp(value·factor) and, if @p d_data is non-null, the derivative values
  /// data[k]·scale[i]·factor[i] (same sparsity as this matrix).
  void b_scales(const double* p, const double* factor, double* scales, double* d_data) const;
  /// values() of rows [first, first + count) into @p out (count values), bit for bit.
  void values_rows(const double* p, std::size_t first, std::size_t count, double* out) const;
  /// b_scales() of rows [first, first + count): @p factor is indexed by absolute row, @p scales
  /// has count values, @p d_data the rows' stored entries from the first row's (bit for bit
  /// when @p first is a multiple of 8, as the vectorised exponential then sees the same lanes).
  void b_scales_rows(const double* p, const double* factor, std::size_t first, std::size_t count,
                     double* scales, double* d_data) const;

 private:
  std::size_t n_rows_ = 0, n_cols_ = 0;
  bool fixed_ = false;
  std::vector<std::int32_t> indptr_{0};
  std::vector<std::int32_t> indices_;
  std::vector<double> data_;
  std::vector<double> first_col_;
};

}  // namespace xtalscale::components
