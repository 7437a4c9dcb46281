// Internal helper (not installed): prefetching the per-row values of rows visited through an
// order array (a grouping's rows, group by group).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>

namespace xtalscale::detail {

/// Prefetches the per-row values of the rows a few positions ahead in @c order. Kernels that
/// walk a grouping group by group read rows scattered over the per-row arrays: without this
/// each row's values arrive one cache miss after another. Issuing the loads ahead keeps several
/// misses in flight (a hint only: it changes no result).
class RowPrefetcher {
 public:
  /// Rows this far ahead (in @c order) are fetched: enough to cover a miss's latency at the
  /// kernels' few tens of ns per row.
  static constexpr std::int64_t kDistance = 24;

  /// @p end: the number of positions in @p order; @p flags: an optional per-row byte array.
  RowPrefetcher(const std::int64_t* order, std::int64_t end, std::initializer_list<const double*> arrays,
                const std::uint8_t* flags = nullptr)
      : order_(order), end_(end), flags_(flags) {
    for (const double* a : arrays)
      if (a != nullptr && n_arrays_ < kMaxArrays) arrays_[n_arrays_++] = a;
  }

  /// Fetch ahead of position @p position (an index into @c order).
  void ahead_of(std::int64_t position) {
    const std::int64_t target = std::min(end_, position + kDistance);
    if (next_ < position) next_ = position;
    for (; next_ < target; ++next_) {
      const auto r = order_[next_];
      for (std::size_t a = 0; a < n_arrays_; ++a) __builtin_prefetch(arrays_[a] + r);
      if (flags_ != nullptr) __builtin_prefetch(flags_ + r);
    }
  }

 private:
  static constexpr std::size_t kMaxArrays = 4;
  const std::int64_t* order_;
  std::int64_t end_;
  const std::uint8_t* flags_;
  std::int64_t next_ = 0;
  const double* arrays_[kMaxArrays] = {};
  std::size_t n_arrays_ = 0;
};

}  // namespace xtalscale::detail
