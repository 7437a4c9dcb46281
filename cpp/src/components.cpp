// Scale-component kernels (see components.hpp). No allocation per reflection: callers
// preallocate every output, and the weight matrix is built in two passes (count, fill).
#include "xtalscale/components.hpp"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "xtalscale/check.hpp"

namespace xtalscale::components {
namespace {

/// Round half away from zero (boost iround), which the smoother window depends on.
inline int iround(double v) { return static_cast<int>(std::round(v)); }

/// Per-axis windows of one reflection; returns false when some window is empty.
inline void windows(const SmootherAxis* axes, int n_axes, const double* const* coords,
                    std::size_t row, int* first, int* last, double* z) {
  for (int a = 0; a < n_axes; ++a) {
    z[a] = (coords[a][row] - axes[a].x0) / axes[a].spacing;
    smoother_window(axes[a], z[a], first[a], last[a]);
  }
}

}  // namespace

void smoother_window(const SmootherAxis& axis, double z, int& first, int& last) {
  const int nvalues = axis.nvalues;
  if (nvalues <= 3) {
    first = 0;
    last = nvalues;
    return;
  }
  const int naverage = axis.naverage < nvalues ? axis.naverage : nvalues;
  const double half = naverage / 2.0;
  first = iround(z - half) + 1;
  last = first + naverage;
  if (first < 0) {
    first = 0;
    if (last < 2) last = 2;
  }
  if (last > nvalues) {
    last = nvalues;
    if (first > nvalues - 2) first = nvalues - 2;
  }
}

void validate_smoother(const SmootherAxis* axes, int n_axes, double sigma,
                       const double* const* coords, const char* const* coord_names,
                       std::size_t n) {
  require(n_axes >= 1 && n_axes <= 3, "a smoother has 1, 2 or 3 axes");
  require(std::isfinite(sigma) && sigma > 0.0, "smoother sigma must be finite and > 0");
  for (int a = 0; a < n_axes; ++a) {
    const std::string name = coord_names[a];
    const SmootherAxis& ax = axes[a];
    require(std::isfinite(ax.spacing) && ax.spacing > 0.0,
            name + ": smoother spacing must be finite and > 0");
    require(std::isfinite(ax.x0), name + ": smoother range must be finite");
    require(ax.nvalues >= 2, name + ": a smoother axis needs at least 2 values");
    require(ax.naverage >= 1 && ax.naverage <= 5, name + ": num_average must be in [1, 5]");
    require(ax.positions != nullptr, name + ": smoother positions are missing");
    require_finite(ax.positions, static_cast<std::size_t>(ax.nvalues), "smoother positions");
    require_finite(coords[a], n, coord_names[a]);
  }
  std::size_t total = 1;
  for (int a = 0; a < n_axes; ++a) total *= static_cast<std::size_t>(axes[a].nvalues);
  require(total <= static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()),
          "too many smoother parameters for 32-bit column indices");
}

std::size_t smoother_weights_indptr(const SmootherAxis* axes, int n_axes,
                                    const double* const* coords, std::size_t n,
                                    bool drop_first, std::int32_t* indptr) {
  int first[3], last[3];
  double z[3];
  std::size_t nnz = 0;
  indptr[0] = 0;
  for (std::size_t i = 0; i < n; ++i) {
    windows(axes, n_axes, coords, i, first, last, z);
    std::size_t count = 1;
    for (int a = 0; a < n_axes; ++a) count *= static_cast<std::size_t>(last[a] - first[a]);
    // With the first parameter fixed (1-D only) its column is not stored.
    if (drop_first && first[0] == 0) --count;
    nnz += count;
    if (nnz > static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()))
      throw std::invalid_argument("too many weight entries for 32-bit CSR indices; "
                                  "split the reflections into blocks");
    indptr[i + 1] = static_cast<std::int32_t>(nnz);
  }
  return nnz;
}

void smoother_weights_fill(const SmootherAxis* axes, int n_axes, double sigma,
                           const double* const* coords, std::size_t n, bool drop_first,
                           const std::int32_t* indptr, std::int32_t* indices, double* data,
                           double* first_col) {
  int first[3] = {0, 0, 0}, last[3] = {1, 1, 1};
  double z[3] = {0.0, 0.0, 0.0};
  double w_axis[3][5];  // per-axis squared scaled distances; windows are at most 5 wide
  const int nx = axes[0].nvalues;
  const int ny = n_axes > 1 ? axes[1].nvalues : 1;
  for (std::size_t i = 0; i < n; ++i) {
    windows(axes, n_axes, coords, i, first, last, z);
    for (int a = 0; a < n_axes; ++a) {
      for (int j = first[a]; j < last[a]; ++j) {
        const double ds = (z[a] - axes[a].positions[j]) / sigma;
        w_axis[a][j - first[a]] = ds * ds;
      }
    }
    for (int a = n_axes; a < 3; ++a) {
      first[a] = 0;
      last[a] = 1;
      w_axis[a][0] = 0.0;
    }
    // Raw weights first (exp of the summed squared distances, as the DIALS smoothers do),
    // then scale by 1/Σw exactly as DIALS's row_multiply(weight, 1/sumweight).
    const std::int32_t start = indptr[i];
    std::int32_t k = start;
    double sumw = 0.0, w_first = 0.0;
    for (int c = first[2]; c < last[2]; ++c) {
      for (int b = first[1]; b < last[1]; ++b) {
        for (int a = first[0]; a < last[0]; ++a) {
          const double w = std::exp(-(w_axis[0][a - first[0]] + w_axis[1][b - first[1]] +
                                      w_axis[2][c - first[2]]));
          sumw += w;
          if (drop_first && a == 0) {
            w_first = w;
            continue;
          }
          const int col = a + b * nx + c * nx * ny;
          indices[k] = drop_first ? col - 1 : col;
          data[k] = w;
          ++k;
        }
      }
    }
    const double inv = sumw > 0.0 ? 1.0 / sumw : 0.0;
    for (std::int32_t q = start; q < k; ++q) data[q] *= inv;
    if (first_col != nullptr) first_col[i] = w_first * inv;
  }
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
  if (derivs == nullptr) {
    for (std::size_t i = 0; i < n; ++i) scales[i] = std::exp(coef * factor[i]);
    return;
  }
  for (std::size_t i = 0; i < n; ++i) {
    const double s = std::exp(coef * factor[i]);
    scales[i] = s;
    derivs[i] = s * factor[i];
  }
}

void smooth_b_scales(std::size_t n_rows, const std::int32_t* indptr, const std::int32_t* indices,
                     const double* data, const double* p, const double* first_col, double p0,
                     const double* factor, double* scales, double* d_data) {
  for (std::size_t i = 0; i < n_rows; ++i) {
    double acc = first_col != nullptr ? first_col[i] * p0 : 0.0;
    for (std::int32_t k = indptr[i]; k < indptr[i + 1]; ++k) acc += data[k] * p[indices[k]];
    const double s = std::exp(acc * factor[i]);
    scales[i] = s;
    if (d_data != nullptr) {
      const double r = s * factor[i];
      for (std::int32_t k = indptr[i]; k < indptr[i + 1]; ++k) d_data[k] = data[k] * r;
    }
  }
}

void row_multiply(std::size_t n_rows, const std::int64_t* indptr, const double* data,
                  const double* v, double* out_data) {
  for (std::size_t i = 0; i < n_rows; ++i)
    for (std::int64_t k = indptr[i]; k < indptr[i + 1]; ++k) out_data[k] = data[k] * v[i];
}

void sh_scales(std::size_t n, std::size_t n_params, const double* harmonics, const double* coef,
               double* scales) {
  for (std::size_t i = 0; i < n; ++i) {
    const double* row = harmonics + i * n_params;
    double acc = 1.0;
    for (std::size_t k = 0; k < n_params; ++k) acc += row[k] * coef[k];
    scales[i] = acc;
  }
}

void validate_csr(std::size_t n_rows, std::size_t n_cols, const std::int64_t* indptr,
                  const std::int64_t* indices, std::size_t nnz, const char* what) {
  const std::string name = what;
  require(indptr[0] == 0, name + ": indptr must start at 0");
  for (std::size_t i = 0; i < n_rows; ++i)
    require(indptr[i + 1] >= indptr[i], name + ": indptr must be non-decreasing");
  require(static_cast<std::size_t>(indptr[n_rows]) == nnz,
          name + ": indptr must end at the number of stored entries");
  for (std::size_t k = 0; k < nnz; ++k)
    require_index(static_cast<std::ptrdiff_t>(indices[k]), n_cols, what);
}

}  // namespace xtalscale::components
