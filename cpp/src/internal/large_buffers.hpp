// Internal helper (not installed): large per-reflection buffers backed by transparent huge
// pages. A 10⁶-row weight matrix or derivative buffer is 0.1–0.4 GB; filled through 4 kB
// pages its first touch costs ~10⁵ page faults, measured as 35–45 % of a 2-D/3-D smoother
// component's set-up. With the kernel's THP in "madvise" mode (the Debian/Ubuntu default)
// the region must ask for huge pages before it is touched.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace xtalscale::detail {

/// Buffers below this size are left to the allocator as they are.
constexpr std::size_t kHugePageMinBytes = std::size_t(4) << 20;

/// Ask for transparent huge pages on the whole 4 kB pages inside [p, p + bytes) (Linux; a
/// no-op elsewhere or for small buffers). Advice only: failure changes nothing but speed.
inline void advise_huge_pages(void* p, std::size_t bytes) noexcept {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (p == nullptr || bytes < kHugePageMinBytes) return;
  constexpr std::uintptr_t kPage = 4096;
  const auto begin = (reinterpret_cast<std::uintptr_t>(p) + kPage - 1) & ~(kPage - 1);
  const auto end = (reinterpret_cast<std::uintptr_t>(p) + bytes) & ~(kPage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

/// @p v resized to @p n (new elements value-initialised, as `resize`), with huge pages
/// requested before the first touch when it needs a new large allocation.
template <class T>
void resize_large(std::vector<T>& v, std::size_t n) {
  if (n > v.capacity() && n * sizeof(T) >= kHugePageMinBytes) {
    std::vector<T> fresh;
    fresh.reserve(n);
    advise_huge_pages(fresh.data(), n * sizeof(T));
    fresh.assign(v.begin(), v.end());
    v.swap(fresh);
  }
  v.resize(n);
}

/// A new vector of @p n value-initialised elements (see resize_large).
template <class T>
std::vector<T> large_vector(std::size_t n) {
  std::vector<T> v;
  resize_large(v, n);
  return v;
}

}  // namespace xtalscale::detail
