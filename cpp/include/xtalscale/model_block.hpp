/// @file model_block.hpp
/// @brief The model side of the fit contract: a model block owns g and ∂g/∂p of one scaling
/// model over one selection of observations, and hands them out as a DerivativesView.
///
/// A model is a product of scale components, g = Π_c s_c. A ModelBlock holds one ModelTerm per
/// component (its scales s_c and derivatives ∂s_c/∂p_c over the block's rows) and evaluates
/// all of them, then the product rule, in one call that touches no Python object:
///
/// @code
///   xtalscale::ModelBlock block(n_rows);
///   block.add_term(std::make_shared<xtalscale::SmoothTerm>(weights));        // active
///   block.add_term(std::make_shared<xtalscale::ExpFactorTerm>(factor));      // active
///   block.add_term(std::make_shared<xtalscale::FixedScalesTerm>(g_fixed), false);  // no columns
///   block.evaluate(params.data(), params.size());  // every term's parameters, concatenated
///   const xtalscale::DerivativesView v = block.view();  // what the target / normal equations read
/// @endcode
///
/// Ownership and lifetime:
///  * The sparsity pattern of ∂g/∂p (row starts, column indices) is built by the first
///    evaluate() and rebuilt only when a term's pattern changes (ModelTerm::pattern_version(),
///    e.g. an ExternalTerm given a new pattern) or a term is added; each build bumps
///    version(). Between builds only g and the derivative values are rewritten, in place.
///  * Terms are immutable after construction (except ExternalTerm::set) and hold their
///    parameter-independent data (weight matrices, harmonic blocks, factors) through shared
///    pointers (HeldArray); the block owns the per-evaluation scratch. So several blocks (one per
///    thread or MPI rank) may hold the same terms and evaluate concurrently; one block is not to
///    be evaluated from two threads at once.
///  * The output arrays live in shared buffers (buffers()): a holder of a buffer keeps it alive
///    across a pattern rebuild, which allocates new ones.
///
/// Columns: active terms (add_term(t, true)) get n_cols() columns each, in the order added;
/// inactive terms contribute their scales to g only. Parameters: evaluate() reads each term's
/// n_params() values from one vector, in the order added (active or not).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "xtalscale/components.hpp"
#include "xtalscale/derivatives_view.hpp"
#include "xtalscale/export.hpp"
#include "xtalscale/harmonics.hpp"
#include "xtalscale/ih_table.hpp"
#include "xtalscale/smoother.hpp"

namespace xtalscale {

/// A read-only array whose memory is kept alive by @p owner (a std::vector, a numpy array...).
template <typename T>
struct HeldArray {
  const T* data = nullptr;            ///< first element
  std::size_t size = 0;               ///< number of elements
  std::shared_ptr<const void> owner;  ///< keeps the memory alive

  /// Take ownership of a vector.
  static HeldArray from_vector(std::vector<T> values) {
    auto v = std::make_shared<const std::vector<T>>(std::move(values));
    return HeldArray{v->data(), v->size(), v};
  }
};

/// Per-evaluation buffers of one term, owned by the caller (a ModelBlock holds one per term),
/// so that a term itself is immutable and can be shared by blocks on several threads.
struct TermScratch {
  std::vector<double> scales;  ///< the term's scales
  std::vector<double> values;  ///< the term's derivative values (when they are computed)
  std::vector<double> aux;     ///< a term's own working space (e.g. fused_transpose_rows())
  std::vector<std::uint32_t> indices;  ///< a term's own integer working space (e.g. what
                                       ///< fused_rows() keeps for fused_transpose_rows())
};

/// One component's scales and derivatives after an evaluation; the pointers stay valid until
/// the next evaluate() with the same scratch.
struct TermValues {
  const double* scales = nullptr;      ///< s_c, n_rows values
  const double* values = nullptr;      ///< ∂s_c/∂p_c: nnz values in pattern order (sparse
                                       ///< terms), or n_rows × n_cols row-major (dense terms)
  const float* values_f32 = nullptr;   ///< dense float32 derivatives (set instead of values)
};

/// One scale component of a model block: its scales s_c and derivatives ∂s_c/∂p_c.
///
/// A dense term has every column in every row (values row-major); a sparse term describes its
/// pattern with pattern(). Subclasses implement evaluate() (and pattern() when sparse).
class XTALSCALE_EXPORT ModelTerm {
 public:
  virtual ~ModelTerm();
  ModelTerm(const ModelTerm&) = delete;
  ModelTerm& operator=(const ModelTerm&) = delete;

  std::size_t n_rows() const noexcept { return n_rows_; }      ///< observations
  std::size_t n_cols() const noexcept { return n_cols_; }      ///< derivative columns (free parameters)
  std::size_t n_params() const noexcept { return n_params_; }  ///< parameters evaluate() reads
  bool dense() const noexcept { return dense_; }               ///< all columns in every row
  /// Stored derivatives (n_rows·n_cols for a dense term).
  std::size_t nnz() const noexcept { return dense_ ? n_rows_ * n_cols_ : nnz_; }
  /// Changes whenever the term's sparsity pattern changes.
  std::uint64_t pattern_version() const noexcept { return pattern_version_; }
  /// Sparse terms: write the row starts (n_rows + 1) and column indices (nnz(), ascending in
  /// each row). Dense terms write the full pattern. The base writes pattern_rows(0, n_rows()),
  /// so a term that serves row ranges defines its pattern there alone.
  virtual void pattern(std::int64_t* indptr, std::int32_t* indices) const;
  /// Scales and derivatives at the parameters @p p (n_params() values), written into
  /// @p scratch (resized on first use) or pointing at data the term holds. Const: a term may be
  /// evaluated from several threads at once with distinct scratch.
  virtual TermValues evaluate(const double* p, TermScratch& scratch) const = 0;
  /// Bytes this term holds (shared data counted in full).
  virtual std::size_t nbytes() const = 0;
  /// out[j] += Σ_i u[i]·∂s_i/∂p_j for j < n_cols(): the transposed derivative matrix times a
  /// row vector @p u (n_rows values), from @p v, this term's evaluate() result. Nothing of
  /// size n_rows × n_cols is formed. The base takes dense terms and terms that serve row
  /// ranges as the one range of all rows (add_transpose_product_rows), other sparse terms
  /// through their pattern() (built into temporaries).
  virtual void add_transpose_product(const TermValues& v, const double* u, double* out) const;

  /// True when evaluate_rows() and add_transpose_product_rows() serve row ranges, so that a
  /// block can work through its rows in small chunks with scratch that stays in cache and is
  /// reused (no fresh memory per evaluation).
  virtual bool evaluates_rows() const { return false; }
  /// evaluate() restricted to rows [first, first + count): the values returned are those of
  /// evaluate() for these rows, relative to row @p first. Only when evaluates_rows().
  virtual TermValues evaluate_rows(const double* p, std::size_t first, std::size_t count,
                                   TermScratch& scratch) const;
  /// The scales of evaluate_rows() (bit for bit) without its derivatives, for a caller that
  /// needs g alone; valid until the next use of @p scratch. The base calls evaluate_rows().
  virtual const double* scales_rows(const double* p, std::size_t first, std::size_t count,
                                    TermScratch& scratch) const;
  /// add_transpose_product() over rows [first, first + count), @p v from evaluate_rows() and
  /// @p u relative to row @p first. The base serves dense terms; sparse ones override it.
  virtual void add_transpose_product_rows(const TermValues& v, std::size_t first,
                                          std::size_t count, const double* u, double* out) const;
  /// The pattern of rows [first, first + count) (as pattern() writes it, @p indptr relative
  /// to row @p first, count + 1 values from 0; @p indices room for count·n_cols()). Only when
  /// evaluates_rows(); the base serves dense terms, sparse ones override it.
  virtual void pattern_rows(std::size_t first, std::size_t count, std::int64_t* indptr,
                            std::int32_t* indices) const;
  /// The number of derivatives stored for rows [first, first + count) (indptr[count] of
  /// pattern_rows() there), so that a block can size each chunk of its pattern before the
  /// chunks are written in parallel. Only when evaluates_rows(). The base counts dense terms
  /// in O(1) and other terms through pattern_rows() into temporaries; sparse terms override it
  /// with a count that writes no column.
  virtual std::size_t nnz_rows(std::size_t first, std::size_t count) const;
  /// For a sparse term whose every row holds one run of consecutive columns (e.g. a 1-D
  /// smoother's window): row i of rows [first, first + count) holds columns
  /// [@p run_first[i], @p run_first[i] + @p run_length[i]), the pattern of pattern_rows() in a
  /// form that costs two values a row and no column list. Returns the rows' number of
  /// derivatives (Σ run_length), or -1 (writing nothing) when the term's rows are not runs
  /// (the base: callers then use pattern_rows()). Only when evaluates_rows().
  virtual std::int64_t column_runs(std::size_t first, std::size_t count, std::int32_t* run_first,
                                   std::int32_t* run_length) const;
  /// The rows' evaluation for a consumer of their transposed product alone (the one-pass f+g
  /// and the chunked transposed product of a ModelBlock): the scales of rows
  /// [first, first + count), bit for bit those of scales_rows(), and derivative values in
  /// whatever form fused_transpose_rows() reads (not necessarily evaluate_rows()'s compact
  /// rows), in @p scratch. Only when evaluates_rows(). The base returns evaluate_rows().
  virtual TermValues fused_rows(const double* p, std::size_t first, std::size_t count,
                                TermScratch& scratch) const;
  /// @p out[j] += Σ_i u[i]·∂s_i/∂p_j over rows [first, first + count), @p v from fused_rows()
  /// of the same rows and @p scratch (which it may also use as working space); equal to
  /// add_transpose_product_rows() up to rounding (the summation order may differ, but it is
  /// fixed: the same bits for the same rows at every SIMD level). The base calls
  /// add_transpose_product_rows().
  virtual void fused_transpose_rows(const TermValues& v, std::size_t first, std::size_t count,
                                    const double* u, double* out, TermScratch& scratch) const;

 protected:
  ModelTerm(std::size_t n_rows, std::size_t n_cols, std::size_t n_params, bool dense)
      : n_rows_(n_rows), n_cols_(n_cols), n_params_(n_params), dense_(dense) {}
  /// Every column of every row: the pattern of a dense @p n_rows × @p n_cols block.
  static void full_pattern(std::size_t n_rows, std::size_t n_cols, std::int64_t* indptr,
                           std::int32_t* indices);
  std::size_t nnz_ = 0;                 ///< sparse terms set this
  std::uint64_t pattern_version_ = 1;   ///< bump when the pattern changes

 private:
  std::size_t n_rows_, n_cols_, n_params_;
  bool dense_;
};

/// A single overall scale: s = p₀, ∂s/∂p₀ = 1 (DIALS SingleScaleFactor).
class XTALSCALE_EXPORT ScaleFactorTerm final : public ModelTerm {
 public:
  explicit ScaleFactorTerm(std::size_t n_rows);
  TermValues evaluate(const double* p, TermScratch& scratch) const override;
  std::size_t nbytes() const override;
  bool evaluates_rows() const override { return true; }
  TermValues evaluate_rows(const double* p, std::size_t first, std::size_t count,
                           TermScratch& scratch) const override;

 private:
  std::vector<double> ones_;
};

/// s = exp(p₀·f), ∂s/∂p₀ = s·f for a fixed per-row factor f (B factor: 1/(2d²); dose decay).
class XTALSCALE_EXPORT ExpFactorTerm final : public ModelTerm {
 public:
  explicit ExpFactorTerm(HeldArray<double> factor);
  TermValues evaluate(const double* p, TermScratch& scratch) const override;
  std::size_t nbytes() const override;
  bool evaluates_rows() const override { return true; }
  TermValues evaluate_rows(const double* p, std::size_t first, std::size_t count,
                           TermScratch& scratch) const override;
  const double* scales_rows(const double* p, std::size_t first, std::size_t count,
                            TermScratch& scratch) const override;

 private:
  HeldArray<double> factor_;
};

/// A smooth component from its held normalised weight matrix W: s = W·p (linear form) or, with
/// a per-row @p b_factor f, s = exp((W·p)·f) and ∂s/∂p = W·s·f (smoothed B factor).
class XTALSCALE_EXPORT SmoothTerm final : public ModelTerm {
 public:
  explicit SmoothTerm(std::shared_ptr<const components::WeightMatrix> weights,
                      HeldArray<double> b_factor = {});
  TermValues evaluate(const double* p, TermScratch& scratch) const override;
  std::size_t nbytes() const override;
  bool evaluates_rows() const override { return true; }
  TermValues evaluate_rows(const double* p, std::size_t first, std::size_t count,
                           TermScratch& scratch) const override;
  void add_transpose_product_rows(const TermValues& v, std::size_t first, std::size_t count,
                                  const double* u, double* out) const override;
  void pattern_rows(std::size_t first, std::size_t count, std::int64_t* indptr,
                    std::int32_t* indices) const override;
  std::size_t nnz_rows(std::size_t first, std::size_t count) const override;

 private:
  std::shared_ptr<const components::WeightMatrix> w_;
  HeldArray<double> factor_;
};

/// A 1-D smooth component that holds no weights (components::smooth_1d_prepare/apply): the
/// window records and q are held, the weights recomputed per evaluation. Optional @p b_factor
/// as in SmoothTerm. The coordinates @p x are read by the constructor and not held: an
/// evaluation needs them only at the rows far outside the smoother's range (NaN q, DIALS's
/// direct formula), whose coordinates are copied (none in a usual data set), so a row costs
/// the 10 bytes of its window record and q (18 with a B factor).
class XTALSCALE_EXPORT LeanSmoothTerm final : public ModelTerm {
 public:
  /// @throws std::invalid_argument for arrays of another length than @p x, a window record
  /// outside the smoother's values, or a @p b_factor that is not finite and > 0.
  LeanSmoothTerm(const GaussianSmoother<1>& smoother, HeldArray<double> x, double x_shift,
                 HeldArray<std::uint16_t> window, HeldArray<double> q, bool first_fixed,
                 HeldArray<double> b_factor = {});
  TermValues evaluate(const double* p, TermScratch& scratch) const override;
  std::size_t nbytes() const override;
  bool evaluates_rows() const override { return true; }
  TermValues evaluate_rows(const double* p, std::size_t first, std::size_t count,
                           TermScratch& scratch) const override;
  const double* scales_rows(const double* p, std::size_t first, std::size_t count,
                            TermScratch& scratch) const override;
  void add_transpose_product_rows(const TermValues& v, std::size_t first, std::size_t count,
                                  const double* u, double* out) const override;
  void pattern_rows(std::size_t first, std::size_t count, std::int64_t* indptr,
                    std::int32_t* indices) const override;
  std::size_t nnz_rows(std::size_t first, std::size_t count) const override;
  /// A row's columns are its window's (from its window record alone).
  std::int64_t column_runs(std::size_t first, std::size_t count, std::int32_t* run_first,
                           std::int32_t* run_length) const override;
  /// Scales and every row's normalised weights at a fixed stride (zeros past its window): no
  /// compaction into rows of the window's columns, and no smoothed-B row scaling (applied to
  /// the coefficients by fused_transpose_rows() instead).
  TermValues fused_rows(const double* p, std::size_t first, std::size_t count,
                        TermScratch& scratch) const override;
  /// Each row's weights added as one short vector into an accumulator per window start.
  void fused_transpose_rows(const TermValues& v, std::size_t first, std::size_t count,
                            const double* u, double* out, TermScratch& scratch) const override;

 private:
  /// Row @p i's first derivative column and number of columns (from its window record).
  std::pair<int, std::size_t> row_columns(std::size_t i) const;
  /// The coordinates of rows [first, first + count) as the kernels read them: a pointer to
  /// @p count values valid at the far rows (the only ones read), filled in @p scratch.aux when
  /// the range has far rows, else any array of @p count values.
  const double* x_rows(std::size_t first, std::size_t count, TermScratch& scratch) const;

  GaussianSmoother<1> smoother_;
  std::vector<std::size_t> far_rows_;  ///< rows with a NaN q, ascending
  std::vector<double> far_x_;          ///< their coordinates
  double x_shift_;
  HeldArray<std::uint16_t> window_;
  HeldArray<double> q_;
  bool first_fixed_;
  HeldArray<double> factor_;
};

/// A 2-D or 3-D smooth component that holds no weights, only its normalised coordinates: the
/// pattern is read from the windows once per block build and the normalised weights are
/// recomputed by every evaluate() (GaussianSmoother::multi_value_derivatives), s = Σwp/Σw.
/// Recomputing ~10–30 weights per row costs less than streaming a held 9–27-entry weight row
/// (108–324 B) from memory, and nothing per row is held but the coordinates.
template <int D>
class XTALSCALE_EXPORT GridSmoothTerm final : public ModelTerm {
  static_assert(D == 2 || D == 3, "GridSmoothTerm is for 2-D and 3-D smoothers");

 public:
  /// @p coords: one array per axis, the normalised coordinates (as the smoother reads them).
  /// @throws std::invalid_argument for arrays of different lengths or non-finite coordinates.
  GridSmoothTerm(const GaussianSmoother<D>& smoother, std::array<HeldArray<double>, D> coords);
  void pattern(std::int64_t* indptr, std::int32_t* indices) const override;
  TermValues evaluate(const double* p, TermScratch& scratch) const override;
  std::size_t nbytes() const override;

 private:
  std::array<const double*, D> coordinate_pointers() const;
  GaussianSmoother<D> smoother_;
  std::array<HeldArray<double>, D> coords_;
};

extern template class GridSmoothTerm<2>;
extern template class GridSmoothTerm<3>;

/// Spherical-harmonic surface from a held row-major n_rows × n_params harmonic block H
/// (float64, or float32 in the lookup regime): s = 1 + H·c, ∂s/∂c = H (dense, no copy).
class XTALSCALE_EXPORT HarmonicsTerm final : public ModelTerm {
 public:
  HarmonicsTerm(HeldArray<double> harmonics, std::size_t n_params);
  HarmonicsTerm(HeldArray<float> harmonics, std::size_t n_params);
  TermValues evaluate(const double* p, TermScratch& scratch) const override;
  std::size_t nbytes() const override;
  bool evaluates_rows() const override { return true; }
  TermValues evaluate_rows(const double* p, std::size_t first, std::size_t count,
                           TermScratch& scratch) const override;

 private:
  HeldArray<double> h64_;
  HeldArray<float> h32_;
};

/// Spherical-harmonic surface read from the lookup grid's separable factors: s = 1 + h·c,
/// ∂s/∂c = h, where row i's harmonics are h_k = (T[s0_i, k] + T[s1_i, k]) / 2 for the lookup
/// table T, each entry formed on the fly as the product of its θ and φ factors
/// (harmonics::LookupFactors). The derivative rows are harmonics::harmonics_from_lookup()'s
/// bit for bit, and nothing per row is held but the two int32 grid indices (8 B), against
/// 8·n_params B for a held float64 block: the factor tables (~200 KB for lmax 4) stay in
/// cache, so forming a row costs less than streaming it from memory.
///
/// Two ways to the scales and the transposed product, fixed at construction (Path):
///  * by rows: each row's harmonics formed and dotted with c, the scale 1 + Σ_k c_k·h_k in
///    eight lanes (lane j takes k ≡ j mod 8 in ascending k by fused multiply-add), reduced
///    as ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)); the transposed product per column
///    in row order by fused multiply-add on the rows (components::dense_transpose_product).
///  * by grid rows (θ rows): the φ factor of harmonic (l, m) is trig_m(φ) whatever l (1,
///    cos mφ or sin |m|φ), so the surface on the grid is Y(t, j) = Σ_m F_m(t)·trig_m(φ_j)
///    with F_m(t) = Σ_l c_lm·A_lm(t): 2·lmax + 1 terms instead of n_params. Per parameter
///    vector F is formed once for the grid's θ rows (cached); a row's scale is then
///    s = 1 + ½·((F_0(t0) + F_0(t1)) + Σ over the 2·lmax lanes m ≠ 0 of the two points'
///    F_m·trig_m) (eight lanes by fused multiply-add, the first point's products then the
///    second's, reduced as above), no harmonic formed. The transposed product Σ_i u_i·h_ik =
///    ½·Σ_t A_k(t)·M_m(k)(t) with M_m(t) the sum of u_i·trig_m(φ) over the rows' grid points
///    on θ row t: per row two short vector updates, per chunk of rows one pass over the θ
///    rows (in fused_transpose_rows(), so each chunk's sum is its own: the same for any
///    thread count). The scales differ from the by-rows path's in the last bits (another
///    summation order), the transposed product by rounding; the derivative rows are the same.
/// Either way every path of a term (evaluate(), evaluate_rows(), scales_rows(), fused_rows(),
/// a ModelBlock's evaluate_scales(), transpose_product(), functional_and_gradient() and the
/// fused normal equations) gives the same scales, at every SIMD level and thread count.
///
/// Dense, n_cols = n_params. scales_rows() stores no row; evaluate() materialises every row
/// (for a caller that wants the whole matrix), evaluate_rows() a chunk's rows; fused_rows()
/// keeps the rows for the transposed product by rows (storing and reading back a chunk's rows,
/// in cache, costs less than forming them again) and stores none by grid rows.
class XTALSCALE_EXPORT LookupHarmonicsTerm final : public ModelTerm {
 public:
  /// The way to the scales and transposed product (see the class notes). automatic: by grid
  /// rows from kMinRowsPerThetaRow rows per θ row of the grid on (1440 rows at 2 points per
  /// degree), else by rows: the grid path's fixed costs (F, n_theta·n_params multiply-adds per
  /// parameter vector; per chunk of rows one pass over its θ rows for the transposed product)
  /// are what forming about 100–200 rows' harmonics costs, so fewer rows keep the per-row path.
  enum class Path { automatic, rows, grid };
  /// automatic's threshold, in rows per θ row of the grid.
  static constexpr std::size_t kMinRowsPerThetaRow = 4;

  /// @p factors: the grid's factor tables (shared by every term of that grid); @p s0_lookup,
  /// @p s1_lookup: grid indices per row (held, not copied); @p n_params: harmonics used, the
  /// first n_params of the factors' (a table built for a larger lmax serves a smaller one).
  /// @throws std::invalid_argument for null factors, index arrays of different lengths or
  /// @p n_params outside [1, factors->n_params]; std::out_of_range (naming s0_lookup or
  /// s1_lookup) for an index outside the grid.
  LookupHarmonicsTerm(std::shared_ptr<const harmonics::LookupFactors> factors,
                      HeldArray<std::int32_t> s0_lookup, HeldArray<std::int32_t> s1_lookup,
                      std::size_t n_params, Path path = Path::automatic);
  ~LookupHarmonicsTerm() override;
  /// Materialises every row (n_rows × n_params doubles in @p scratch): for callers that want
  /// the whole derivative matrix.
  TermValues evaluate(const double* p, TermScratch& scratch) const override;
  /// The held indices, the factor tables (counted in full, though shared) and the grid rows'
  /// tables.
  std::size_t nbytes() const override;
  bool evaluates_rows() const override { return true; }
  /// The rows' scales and their harmonics, materialised in @p scratch.
  TermValues evaluate_rows(const double* p, std::size_t first, std::size_t count,
                           TermScratch& scratch) const override;
  const double* scales_rows(const double* p, std::size_t first, std::size_t count,
                            TermScratch& scratch) const override;
  /// By rows evaluate_rows() (its rows kept for fused_transpose_rows()), by grid rows the
  /// scales, and each row's two grid points in @p scratch.indices (split into θ row and φ
  /// column once, for both passes).
  TermValues fused_rows(const double* p, std::size_t first, std::size_t count,
                        TermScratch& scratch) const override;
  /// By rows the dense transposed product of fused_rows()'s rows; by grid rows through the
  /// θ rows' sums (see the class notes).
  void fused_transpose_rows(const TermValues& v, std::size_t first, std::size_t count,
                            const double* u, double* out, TermScratch& scratch) const override;
  /// True when the term goes by grid rows (see Path).
  bool by_grid() const noexcept { return by_grid_; }
  /// The factor tables: those given, or a copy of their first n_params harmonics when a
  /// smaller lmax than theirs is used (so that the kernels read rows of a fixed length).
  const std::shared_ptr<const harmonics::LookupFactors>& factors() const noexcept {
    return factors_;
  }

 private:
  struct ThetaSums;  ///< F of one parameter vector (see the class notes)
  /// F at @p p: the cached sums when @p p is the cached vector (the same bits), else formed and
  /// cached (under a mutex: threads evaluating one term share the cache). Shared, so that a
  /// caller keeps its sums while another thread caches another vector's.
  std::shared_ptr<const ThetaSums> theta_sums(const double* p) const;
  /// By grid rows: the scales of rows [first, first + count) at @p p, from each row's two
  /// grid points split into θ rows and φ columns in @p points (4·count values, grown when
  /// needed: what fused_rows() keeps for fused_transpose_rows()).
  void grid_scales(const double* p, std::size_t first, std::size_t count, double* scales,
                   std::vector<std::uint32_t>& points) const;

  std::shared_ptr<const harmonics::LookupFactors> factors_;
  HeldArray<std::int32_t> s0_, s1_;
  bool by_grid_ = false;
  std::size_t lanes_ = 0;               ///< by grid rows: the m ≠ 0 lanes, 2·lmax rounded up to 8
  std::vector<int> lane_of_;            ///< per harmonic its lane, or −1 for m = 0
  std::vector<double> trig_;            ///< n_phi × lanes_: trig_m(φ) of the m ≠ 0 lanes
  struct SumCache;
  std::unique_ptr<SumCache> cache_;     ///< the last parameter vector's F
};

/// Fixed scales with no parameters (an analytical correction, or the product of the fixed
/// components of a refinement cycle).
class XTALSCALE_EXPORT FixedScalesTerm final : public ModelTerm {
 public:
  explicit FixedScalesTerm(HeldArray<double> scales);
  TermValues evaluate(const double* p, TermScratch& scratch) const override;
  std::size_t nbytes() const override;
  bool evaluates_rows() const override { return true; }
  TermValues evaluate_rows(const double* p, std::size_t first, std::size_t count,
                           TermScratch& scratch) const override;

 private:
  HeldArray<double> scales_;
};

/// A component evaluated elsewhere (e.g. a Python-defined component): its scales and CSR
/// derivatives are copied in with set() before each ModelBlock::evaluate(). It reads no
/// parameters. A set() with a different pattern bumps pattern_version(). Unlike the other
/// terms it is mutable: do not set() it while a block that holds it evaluates.
class XTALSCALE_EXPORT ExternalTerm final : public ModelTerm {
 public:
  ExternalTerm(std::size_t n_rows, std::size_t n_cols);
  /// Copy scales (n_rows, finite) and ∂s/∂p as CSR (indptr n_rows + 1 from 0, indices in
  /// [0, n_cols) ascending within a row, values finite). Throws std::invalid_argument naming
  /// the offending array.
  void set(const double* scales, const std::int64_t* indptr, const std::int32_t* indices,
           const double* values);
  /// Copy scales and a dense row-major n_rows × n_cols derivative matrix.
  void set_dense(const double* scales, const double* derivatives);
  /// True once set() or set_dense() was called.
  bool is_set() const noexcept { return is_set_; }
  void pattern(std::int64_t* indptr, std::int32_t* indices) const override;
  TermValues evaluate(const double* p, TermScratch& scratch) const override;
  std::size_t nbytes() const override;
  void add_transpose_product(const TermValues& v, const double* u, double* out) const override;

 private:
  void take_pattern(std::vector<std::int64_t> indptr, std::vector<std::int32_t> indices);
  bool is_set_ = false;
  std::vector<double> scales_, values_;
  std::vector<std::int64_t> indptr_;
  std::vector<std::int32_t> indices_;
};

/// Caller-owned buffers of ModelBlock::evaluate_rows (one per thread): g and ∂g/∂p of a row
/// range as CSR, and the terms' scratch. Reused from call to call: sized on first use and
/// never shrunk, so that a run of chunks of varying length allocates (and zero-fills) nothing
/// after the longest. g and indptr hold exactly count and count + 1 values; indices and
/// values hold at least indptr[count] (entries past it are room for a later call).
struct RowsScratch {
  std::vector<double> g;                  ///< g of the rows
  std::vector<std::int64_t> indptr;       ///< count + 1 row starts, from 0
  std::vector<std::int32_t> indices;      ///< block columns, ascending within a row
  std::vector<double> values;             ///< ∂g/∂p
  std::vector<TermScratch> terms;         ///< per term
  std::vector<TermValues> term_values;    ///< per term, the last evaluate_rows()
  std::vector<std::vector<std::int64_t>> term_indptr;   ///< sparse terms' row patterns
  std::vector<std::vector<std::int32_t>> term_indices;  ///< (or, for column_runs(), run starts)
  std::vector<std::vector<std::int32_t>> term_lengths;  ///< column_runs() terms' run lengths
  std::vector<double> work;               ///< the product rule's multipliers of the rows
};

/// Caller-owned buffers of ModelBlock::fused_scales_rows() and fused_transpose_rows() (one per
/// thread): the terms' values of the last row range, kept between the two calls, and their
/// scratch. Reused from call to call (sized on first use, never shrunk).
struct FusedRowsScratch {
  std::vector<TermScratch> terms;   ///< per term, then the block's own chunk workspace
  std::vector<TermValues> values;   ///< per term, fused_rows() of the last rows
  std::size_t first = 0;            ///< those rows: [first, first + count)
  std::size_t count = 0;
};

/// g = Π_c s_c and ∂g/∂p of one model over one block of observations (see the file notes).
class XTALSCALE_EXPORT ModelBlock {
 public:
  /// The owned outputs; shared so that a holder (e.g. a numpy view) outlives a rebuild.
  struct Buffers {
    std::shared_ptr<std::vector<double>> scales;         ///< g (n_rows)
    std::shared_ptr<std::vector<std::int64_t>> indptr;   ///< row starts (n_rows + 1)
    std::shared_ptr<std::vector<std::int32_t>> indices;  ///< columns (nnz)
    std::shared_ptr<std::vector<double>> values;         ///< ∂g/∂p (nnz)
  };

  /// An empty block of @p n_rows observations (g = 1 until terms are added).
  explicit ModelBlock(std::size_t n_rows);

  /// Append a term. Active terms get columns; inactive ones only multiply g.
  /// @throws std::invalid_argument for a null term or one with a different n_rows.
  void add_term(std::shared_ptr<ModelTerm> term, bool active = true);

  std::size_t n_rows() const noexcept { return n_rows_; }
  std::size_t n_cols() const noexcept { return n_cols_; }      ///< Σ n_cols of active terms
  std::size_t n_params() const noexcept { return n_params_; }  ///< Σ n_params of all terms
  std::size_t n_terms() const noexcept { return terms_.size(); }
  const ModelTerm& term(std::size_t i) const { return *terms_.at(i); }
  std::shared_ptr<ModelTerm> term_ptr(std::size_t i) const { return terms_.at(i); }
  bool active(std::size_t i) const { return active_.at(i); }
  /// First column of active term i (its column offset within the block).
  std::size_t column_start(std::size_t i) const { return col_start_.at(i); }
  /// First parameter of term i in the vector evaluate() reads.
  std::size_t parameter_start(std::size_t i) const { return param_start_.at(i); }

  /// Where column 0 lies in the global parameter vector (DerivativesView::column_offset).
  std::size_t column_offset() const noexcept { return column_offset_; }
  void set_column_offset(std::size_t offset) noexcept { column_offset_ = offset; }

  /// Evaluate every term at its slice of @p params (length n_params()), rebuild the pattern if
  /// needed, then write g and ∂g/∂p. Holds no Python object: safe without the GIL. When every
  /// term evaluates row ranges (evaluates_rows()), chunks of at most 4096 rows go over up to
  /// @p n_threads threads (each with its own scratch; rows are independent, so the values do
  /// not depend on the count, and the chunks are of equal length, a whole multiple of the
  /// count, for balance; likewise evaluate_scales(), and transpose_product(), whose fixed
  /// 4096-row chunks' sums are added in chunk order).
  /// @throws std::invalid_argument for a wrong parameter count or an unset ExternalTerm.
  void evaluate(const double* params, std::size_t n_params, int n_threads = 1);

  /// g only, at @p params: every term's scales multiplied, no derivative values written and no
  /// pattern built (for a caller that needs the residuals, e.g. a trial step); the terms'
  /// scratch is freed afterwards. evaluated() is false afterwards (the derivatives, if any,
  /// are for other parameters). g equals evaluate()'s bit for bit.
  /// @throws std::invalid_argument as evaluate().
  void evaluate_scales(const double* params, std::size_t n_params, int n_threads = 1);

  /// J(params)ᵀ·@p coefficients into @p out (n_cols() values, written): out[j] = Σ_i c_i·∂g_i/∂p_j
  /// without forming ∂g/∂p. Each active term's own derivatives are multiplied by the other
  /// terms' scales (the product rule, as evaluate()) and summed in row order, so nothing per
  /// row is stored beyond the terms' scratch and one row vector: the gradient of a target
  /// through g (c_i = ∂f/∂g_i) at the cost of the terms' evaluation. Also writes g as
  /// evaluate_scales() does, bit for bit; evaluated() is false afterwards and the terms'
  /// scratch is freed. Equal to view()ᵀ·c of evaluate() up to rounding (summation order).
  /// @throws std::invalid_argument as evaluate(), or for non-finite @p coefficients.
  void transpose_product(const double* params, std::size_t n_params, const double* coefficients,
                         double* out, int n_threads = 1);

  /// The scaling target f = Σ w (I − g Ĩ)² (Ĩ per group, held: the envelope theorem) and its
  /// gradient ∂f/∂p into @p gradient (n_cols() values, written) at @p params, in one pass over
  /// the rows, for a @p table whose rows are this block's rows in order (one block of one
  /// dataset, not reordered). The rows go in chunks of whole groups (about 4096 rows, a longer
  /// group alone), over up to @p n_threads threads; each chunk's terms are evaluated once and
  /// serve g, its groups' Ĩ and ∂f/∂g, and the transposed product while they are in cache
  /// (evaluate_scales(), the target kernel and transpose_product() in one, without the second
  /// evaluation and the passes over memory between them). Per-chunk sums are added in chunk
  /// order, the chunks fixed by the groups: identical results for any thread count; equal to
  /// the three calls' to rounding. Writes g as evaluate_scales() does; evaluated() is false
  /// afterwards. Needs evaluates_rows().
  /// @throws std::invalid_argument as evaluate(), for a table of another length, or for a scale
  /// g that is not finite and > 0; std::logic_error unless evaluates_rows().
  double functional_and_gradient(const double* params, std::size_t n_params,
                                 const fit::GroupedObservations& table, double* gradient,
                                 int n_threads = 1);

  /// The first half of functional_and_gradient()'s work on one chunk, for a caller that owns
  /// the chunking (several models in one table: fit::model_functional_and_gradient): g of rows
  /// [first, first + count) into @p g (count values, functional_and_gradient()'s bits), and
  /// the terms' fused_rows() values of these rows kept in @p scratch for fused_transpose_rows().
  /// Const: threads with their own scratch may work on any rows at once.
  /// @throws std::invalid_argument as evaluate() or for rows out of range; std::logic_error
  /// unless evaluates_rows().
  /// With @p g_rows, row i's g goes to g[g_rows[i] − g_row_base] instead of g[i] (the
  /// caller's table order: its rows of several models interleaved), in the same pass; the
  /// caller guarantees those positions lie in its array.
  void fused_scales_rows(const double* params, std::size_t n_params, std::size_t first,
                         std::size_t count, FusedRowsScratch& scratch, double* g,
                         const std::int64_t* g_rows = nullptr, std::int64_t g_row_base = 0) const;
  /// The second half: @p acc[j] += Σ_i c_i·∂g_i/∂p_j (j < n_cols()) over the rows of the last
  /// fused_scales_rows() with @p scratch, @p coefficients c of those rows (count values), in
  /// functional_and_gradient()'s order (the same bits for the same rows).
  /// @throws std::logic_error when @p scratch holds no rows of this block.
  /// With @p c_rows, row i's coefficient is coefficients[c_rows[i] − c_row_base] (read in the
  /// pass that forms the terms' coefficients: no gathered copy); the caller guarantees those
  /// positions lie in its array.
  void fused_transpose_rows(const double* coefficients, FusedRowsScratch& scratch, double* acc,
                            const std::int64_t* c_rows = nullptr,
                            std::int64_t c_row_base = 0) const;

  /// True when every term evaluates row ranges: evaluate_rows() is then available.
  bool evaluates_rows() const;
  /// g and ∂g/∂p of rows [first, first + count) into @p scratch (CSR with block columns; the
  /// values of evaluate() for these rows, bit for bit), without touching the block's own
  /// buffers: const, so threads with their own scratch may evaluate disjoint or overlapping
  /// ranges at once. For a caller that consumes the derivatives chunk by chunk (e.g. scale
  /// variances) and never needs them all at once.
  /// @throws std::invalid_argument as evaluate(), or std::logic_error unless evaluates_rows().
  void evaluate_rows(const double* params, std::size_t n_params, std::size_t first,
                     std::size_t count, RowsScratch& scratch) const;

  /// True once evaluate() has run (view() is empty before).
  bool evaluated() const noexcept { return evaluated_; }
  /// Bumped by every pattern build (0 before the first).
  std::uint64_t version() const noexcept { return version_; }
  /// The fit layer's view of the last evaluation.
  DerivativesView view() const;
  /// The output buffers (scales is allocated at construction, the rest by the first evaluate).
  const Buffers& buffers() const noexcept { return out_; }
  /// Bytes held by the block: outputs, per-term row starts and scratch (not the terms' data).
  std::size_t nbytes() const noexcept;

  /// Free the derivative values and the terms' scratch (most of nbytes()), keeping g and the
  /// pattern: for a caller that consumed this evaluation and evaluates blocks one after the
  /// other, so that one block's worth of values is alive at a time and the allocator hands
  /// the same memory to the next block. evaluated() is false afterwards (view() is empty
  /// until the next evaluate(), which allocates the values again). A holder of the old values
  /// buffer keeps it alive. With @p pattern the row starts and column indices go too (about a
  /// third of the rest); the next evaluate() builds them again (bumping version()).
  void release_values(bool pattern = false);

 private:
  bool pattern_stale() const;
  /// @throws std::invalid_argument for a wrong parameter count or a non-finite parameter.
  void check_params(const double* params, std::size_t n_params) const;
  /// check_params, then the chunked paths' per-term scratch (reused from call to call).
  void start_chunks(const double* params, std::size_t n_params);
  /// True when every term evaluates row ranges (the chunked paths below apply).
  bool chunked() const;
  /// g into the scales buffer, chunk by chunk (evaluate_scales with chunked()).
  void scales_by_chunks(const double* params, int n_threads);
  /// transpose_product with chunked(): per chunk of rows each term's values, then the products
  /// into that chunk's partial sums, added in chunk order.
  void transpose_product_by_chunks(const double* params, const double* coefficients, double* out,
                                   int n_threads);
  /// g of rows [first, first + count) into @p g (count values) and, into @p acc (n_cols()),
  /// those rows' share of (∂g/∂p)ᵀc (@p coefficients: c of these rows), from the terms' values
  /// @p tv of the rows: evaluate()'s of every row when @p whole (then first = 0,
  /// count = n_rows()), else evaluate_rows()'s.
  void rows_transpose_product(const std::vector<TermValues>& tv, std::size_t first,
                              std::size_t count, bool whole, const double* coefficients,
                              double* g, double* acc) const;
  /// For every 4096-row chunk: each term's values of its rows at @p params (evaluate_rows), then
  /// body(first, count, values); chunks over up to @p n_threads threads, each thread with its
  /// own terms' scratch (the block's own when single-threaded). An exception from a chunk is
  /// rethrown (as std::invalid_argument) after the loop.
  /// What for_each_chunk() asks of each term: evaluate_rows(), scales_rows() (the values hold
  /// the scales alone) or fused_rows() (for fused_transpose_rows()).
  enum class ChunkValues { all, scales, fused };
  /// With @p what, the terms' values (evaluate_rows() by default; see ChunkValues). With
  /// @p bounds, chunk c is rows [bounds[c], bounds[c + 1]) instead. body(c, first, count, tv).
  /// @p chunk_rows (0: 4096) sets the chunk length without @p bounds: a pass whose outputs
  /// are per row may balance its chunks over the threads; a reduction keeps the fixed length,
  /// so that its summation order does not depend on the thread count.
  template <class Body>
  void for_each_chunk(const double* params, int n_threads, Body body,
                      ChunkValues what = ChunkValues::all,
                      const std::vector<std::size_t>* bounds = nullptr,
                      std::size_t chunk_rows = 0);
  /// One chunk of functional_and_gradient: rows [first, first + count), groups
  /// [group_first, group_last), the terms' fused_rows() values @p tv (and their @p scratch);
  /// its f returned, its gradient share into @p acc. @p table_ok is cleared when a weight of
  /// the chunk is not finite and >= 0 or an intensity is not finite (the caller then names it).
  double chunk_functional_and_gradient(const std::vector<TermValues>& tv, std::size_t first,
                                       std::size_t count, const fit::GroupedObservations& table,
                                       std::size_t group_first, std::size_t group_last,
                                       double* acc, std::vector<TermScratch>& scratch,
                                       bool& table_ok) const;
  /// The transposed product of a chunk's rows from the terms' fused_rows() values: g into
  /// @p g, (∂g/∂p)ᵀc into @p acc, @p coefficients c of these rows (the chunk's g, when
  /// @p g_known, already in @p g). With @p c_rows, row i's coefficient is
  /// coefficients[c_rows[i] − c_row_base] (fused_transpose_rows()).
  void rows_fused_transpose(const std::vector<TermValues>& tv, std::size_t first,
                            std::size_t count, const double* coefficients, double* g,
                            bool g_known, double* acc, std::vector<TermScratch>& scratch,
                            const std::int64_t* c_rows = nullptr,
                            std::int64_t c_row_base = 0) const;
  /// g = Π_t s_t of @p count rows from the terms' values @p tv (fill()'s product order).
  void product_of_scales(const std::vector<TermValues>& tv, std::size_t count, double* g) const;
  /// Check @p params and evaluate every term into its scratch (term_values_).
  void evaluate_terms(const double* params, std::size_t n_params);
  /// Drop the terms' scratch (allocated again by the next evaluation).
  void free_scratch();
  /// The pattern of ∂g/∂p (and the sparse terms' row starts) into fresh buffers: chunk by
  /// chunk over up to @p n_threads threads when chunked() (each chunk's size counted first,
  /// then its rows written at their offsets; the same arrays for any thread count), else
  /// from the terms' whole patterns.
  void build_pattern(int n_threads = 1);
  /// build_pattern() of a block whose terms do not all serve row ranges (serial).
  void build_pattern_whole();
  /// g and ∂g/∂p of rows [first, first + count) from the terms' values of those rows.
  void fill(const std::vector<TermValues>& tv, std::size_t first, std::size_t count);
  /// The pattern of @p count rows: @p indptr[1..count] (row ends, counted from @p origin;
  /// indptr[0] is the caller's, not written, so adjacent chunks never write the same entry)
  /// and, unless @p indices is null, the block columns (each active term's in term order)
  /// at indices[origin...]. Sparse term t's row starts are @p starts[t] (any origin; its
  /// columns @p columns[t] are indexed from starts[t][0]).
  void pattern_of_rows(std::size_t count, const std::vector<const std::int64_t*>& starts,
                       const std::vector<const std::int32_t*>& columns, std::int64_t origin,
                       std::int64_t* indptr, std::int32_t* indices) const;
  /// The product rule of @p count rows: g into @p g and ∂g/∂p into @p values, row j's entries
  /// ending at @p row_ptr[j + 1]; @p tv the terms' values of the rows (sparse term t's values
  /// indexed from @p starts[t][0], as pattern_of_rows).
  void product_rule(const std::vector<TermValues>& tv, std::size_t count,
                    const std::vector<const std::int64_t*>& starts, const std::int64_t* row_ptr,
                    double* g, double* values) const;

  std::size_t n_rows_;
  std::size_t n_cols_ = 0, n_params_ = 0, column_offset_ = 0;
  std::vector<std::shared_ptr<ModelTerm>> terms_;
  std::vector<bool> active_;
  std::vector<std::size_t> col_start_, param_start_;
  std::vector<std::uint64_t> built_versions_;     ///< term pattern versions of the last build
  std::vector<std::vector<std::int64_t>> row_starts_;  ///< sparse active terms' indptr
  std::vector<TermScratch> scratch_;                  ///< one per term
  std::vector<std::vector<TermScratch>> thread_scratch_;  ///< for_each_chunk's, per thread
  std::vector<TermValues> term_values_;
  Buffers out_;
  std::uint64_t version_ = 0;
  bool built_ = false, evaluated_ = false;
};

/// g of several distinct blocks (e.g. one data block of many datasets' models) in one call:
/// block k's ModelBlock::evaluate_scales() at @p params[k] (@p n_params[k] values), its g
/// copied to @p out from row Σ_{j<k} n_rows(j) (out holds Σ n_rows values). The blocks go over
/// up to @p n_threads threads, each block on one thread: a block's g is the same for any
/// thread count, so @p out is too. With @p stop_at_bad, once a block's g is found not finite
/// and > 0 the blocks not yet started are skipped (their rows of @p out are left unwritten):
/// for a caller that discards the point (a line search's rejected trial step).
/// @returns true when every evaluated g is finite and > 0 (with @p stop_at_bad: every block's).
/// @throws std::invalid_argument for a repeated or null block, unequal list lengths, or as
/// evaluate_scales() (the lowest-numbered failing block's error).
XTALSCALE_EXPORT bool evaluate_scales_of_blocks(const std::vector<ModelBlock*>& blocks,
                                                const std::vector<const double*>& params,
                                                const std::vector<std::size_t>& n_params,
                                                double* out, bool stop_at_bad, int n_threads = 1);

/// ModelBlock::evaluate() (g and ∂g/∂p, each block's own buffers) of several distinct blocks in
/// one call, block k at @p params[k] (@p n_params[k] values): blocks over up to @p n_threads
/// threads, each block on one thread (a block's values are the same for any thread count). For
/// many small blocks, whose rows are too few for evaluate()'s own row chunks to spread.
/// @throws std::invalid_argument as evaluate_scales_of_blocks() or evaluate().
XTALSCALE_EXPORT void evaluate_blocks(const std::vector<ModelBlock*>& blocks,
                                      const std::vector<const double*>& params,
                                      const std::vector<std::size_t>& n_params, int n_threads = 1);

/// (∂g/∂p)ᵀ·c of several distinct blocks in one call: block k's ModelBlock::transpose_product()
/// at @p params[k] with the coefficients of its rows (@p coefficients from row
/// Σ_{j<k} n_rows(j)), written to @p out from column Σ_{j<k} n_cols(j) (the blocks' columns
/// side by side, as for one dataset after another). Blocks over up to @p n_threads threads,
/// each on one thread; the same values for any count. Writes each block's g as
/// transpose_product() does.
/// @throws std::invalid_argument as evaluate_scales_of_blocks() or transpose_product().
XTALSCALE_EXPORT void transpose_product_of_blocks(const std::vector<ModelBlock*>& blocks,
                                                  const std::vector<const double*>& params,
                                                  const std::vector<std::size_t>& n_params,
                                                  const double* coefficients, double* out,
                                                  int n_threads = 1);

}  // namespace xtalscale
