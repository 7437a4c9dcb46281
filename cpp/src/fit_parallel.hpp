// Private helpers shared by the fit kernels (ih_table.cpp, target.cpp, normal_equations.cpp):
// fixed work chunks (independent of the thread count, so reductions are bit-identical) and a
// thin OpenMP wrapper that degrades to a serial loop when OpenMP is absent.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "xtalscale/ih_table.hpp"

namespace xtalscale::fit::detail {

/// Rows per work chunk. Fixed, so chunk partial sums never depend on the thread count.
constexpr std::size_t kChunkRows = std::size_t{1} << 14;

/// A contiguous row range of one model block.
struct BlockChunk {
  std::size_t block;
  std::size_t first;
  std::size_t last;
};

/// Split every block into chunks of at most kChunkRows rows, in block then row order.
inline std::vector<BlockChunk> block_chunks(const std::vector<FitBlock>& blocks) {
  std::vector<BlockChunk> chunks;
  for (std::size_t b = 0; b < blocks.size(); ++b) {
    const std::size_t n = blocks[b].view.n_rows;
    for (std::size_t first = 0; first < n; first += kChunkRows)
      chunks.push_back({b, first, std::min(n, first + kChunkRows)});
  }
  return chunks;
}

/// Table row of view row @p r of @p block.
inline std::size_t table_row(const FitBlock& block, std::size_t r) {
  return block.table_rows ? static_cast<std::size_t>(block.table_rows[r]) : r;
}

/// Σ w·g² and Σ w·g·I over the observations of group @p h (the least-squares I_h is wgi / wgg).
struct GroupSums {
  double wgg = 0.0;
  double wgi = 0.0;
};

/// The weighted sums of group @p h under scales @p g (same summation order everywhere, so the
/// I_h of calc_Ih, the target and the normal equations agree to the last bit).
inline GroupSums group_sums(const GroupedObservations& t, const double* g, std::size_t h) {
  GroupSums sums;
  for (auto l = t.group_offsets[h]; l < t.group_offsets[h + 1]; ++l) {
    const double wg = t.weights[l] * g[l];
    sums.wgg += wg * g[l];
    sums.wgi += wg * t.intensities[l];
  }
  return sums;
}

/// Run body(i) for i in [0, n) over up to @p n_threads threads (dynamic schedule, one i at a
/// time: each body(i) must own its outputs, so results do not depend on the thread count).
/// No more threads than items: a single item (a small table's one chunk) runs on the calling
/// thread instead of waking a sleeping worker for nothing (~0.1 ms per call).
template <class Body>
void parallel_for(std::size_t n, int n_threads, Body body) {
#ifdef _OPENMP
  const auto count = static_cast<std::int64_t>(n);
  const int team = static_cast<int>(std::min<std::int64_t>(std::max(1, n_threads), std::max<std::int64_t>(count, 1)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(team) if (team > 1)
  for (std::int64_t i = 0; i < count; ++i) body(static_cast<std::size_t>(i));
#else
  (void)n_threads;
  for (std::size_t i = 0; i < n; ++i) body(i);
#endif
}

/// parallel_for for bodies that may throw: no exception may leave an OpenMP region, so each
/// item's is caught where it happens, and after the loop the lowest item's is rethrown as it
/// was thrown (the same error whatever the thread count).
template <class Body>
void parallel_for_rethrowing(std::size_t n, int n_threads, Body body) {
  std::vector<std::exception_ptr> errors(n);
  parallel_for(n, n_threads, [&](std::size_t i) {
    try {
      body(i);
    } catch (...) {
      errors[i] = std::current_exception();
    }
  });
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
}

/// Number of the calling thread within the current parallel region (0 outside one).
inline int thread_number() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

/// Run body(t) once per thread t in [0, n_threads) (threads own disjoint output ranges).
template <class Body>
void per_thread(int n_threads, Body body) {
  const int nt = std::max(1, n_threads);
#ifdef _OPENMP
#pragma omp parallel for schedule(static, 1) num_threads(nt) if (nt > 1)
  for (int t = 0; t < nt; ++t) body(t, nt);
#else
  for (int t = 0; t < nt; ++t) body(t, nt);
#endif
}

}  // namespace xtalscale::fit::detail
