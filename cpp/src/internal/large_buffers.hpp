// Internal helper (not installed): large per-reflection buffers, optionally backed by
// transparent huge pages. A 10⁶-row weight matrix or derivative buffer is 0.1–0.4 GB; filled
// through 4 kB pages its first touch costs ~10⁵ page faults. Huge pages cut the faults and win
// in a loop that frees and re-allocates the same buffers (bench_smoothers: 1-D API 26 → 12
// ns/point), but on a virtual machine a huge page is usually fresh guest memory the host has
// not backed yet: first touch then measured 2.1 s/GiB against 0.4 s/GiB for 4 kB pages, and
// the whole scale job (1.1 × 10⁶ observations, nproc 1) was 0.3–0.6 s slower with the advice.
// So the advice is off unless the environment variable XTALSCALE_HUGE_PAGES=1 (read once)
// or set_huge_pages(true) asks for it. With the kernel's THP in "madvise" mode (the
// Debian/Ubuntu default) a region must ask for huge pages before it is touched.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#endif

namespace xtalscale::detail {

/// Buffers below this size are left to the allocator as they are.
constexpr std::size_t kHugePageMinBytes = std::size_t(4) << 20;

/// The process-wide switch (see the file notes): initialised from XTALSCALE_HUGE_PAGES.
inline std::atomic<bool>& huge_pages_switch() noexcept {
  static std::atomic<bool> enabled{[] {
    const char* env = std::getenv("XTALSCALE_HUGE_PAGES");
    return env != nullptr && std::strcmp(env, "1") == 0;
  }()};
  return enabled;
}

/// Whether large buffers ask for transparent huge pages.
inline bool huge_pages_enabled() noexcept { return huge_pages_switch().load(std::memory_order_relaxed); }

/// Turn the huge-page advice on or off for buffers allocated from now on.
inline void set_huge_pages(bool enabled) noexcept { huge_pages_switch().store(enabled); }

/// Ask for transparent huge pages on the whole 4 kB pages inside [p, p + bytes) when enabled
/// (Linux; a no-op elsewhere or for small buffers). Advice only: failure changes nothing but
/// speed.
inline void advise_huge_pages(void* p, std::size_t bytes) noexcept {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (p == nullptr || bytes < kHugePageMinBytes || !huge_pages_enabled()) return;
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

/// Room for @p n values in @p v, grown when needed and never shrunk (resize_large): a run of
/// row chunks of varying length then allocates and zero-fills nothing after the longest.
template <class T>
T* sized(std::vector<T>& v, std::size_t n) {
  if (v.size() < n) resize_large(v, n);
  return v.data();
}

/// A new vector of @p n value-initialised elements (see resize_large).
template <class T>
std::vector<T> large_vector(std::size_t n) {
  std::vector<T> v;
  resize_large(v, n);
  return v;
}

/// Copy @p n doubles to @p dst with stores that bypass the cache (x86-64; a plain copy
/// elsewhere): for an output written once per call and not read again soon, so that writing it
/// costs no read of the old contents from memory and evicts nothing. Ends with a store fence,
/// so the values are visible to any thread that synchronises with this one afterwards.
inline void copy_streaming(const double* src, std::size_t n, double* dst) noexcept {
#if defined(__x86_64__) || defined(_M_X64)
  std::size_t i = 0;
  if ((reinterpret_cast<std::uintptr_t>(dst) & 15) != 0 && n > 0) {  // to a 16-byte boundary
    dst[0] = src[0];
    i = 1;
  }
  for (; i + 2 <= n; i += 2) _mm_stream_pd(dst + i, _mm_loadu_pd(src + i));
  if (i < n) dst[i] = src[i];
  _mm_sfence();
#else
  std::copy(src, src + n, dst);
#endif
}

}  // namespace xtalscale::detail
