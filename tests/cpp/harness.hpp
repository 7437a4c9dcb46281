// A minimal C++ test harness: CHECK macros count failures, main() returns the count.
#pragma once

#include <cmath>
#include <cstdio>
#include <exception>
#include <functional>
#include <string>
#include <vector>

namespace xs_test {

inline int& failures() {
  static int count = 0;
  return count;
}

struct Case {
  const char* name;
  std::function<void()> body;
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

struct Register {
  Register(const char* name, std::function<void()> body) {
    registry().push_back({name, std::move(body)});
  }
};

inline void fail(const char* file, int line, const std::string& what) {
  ++failures();
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what.c_str());
}

inline int run_all() {
  for (const auto& c : registry()) {
    try {
      c.body();
    } catch (const std::exception& e) {
      fail(c.name, 0, std::string("unexpected exception: ") + e.what());
    }
  }
  std::printf("%zu cases, %d failed checks\n", registry().size(), failures());
  return failures() == 0 ? 0 : 1;
}

}  // namespace xs_test

#define XS_CAT2(a, b) a##b
#define XS_CAT(a, b) XS_CAT2(a, b)
#define TEST_CASE(name)                                                           \
  static void XS_CAT(xs_case_, __LINE__)();                                       \
  static xs_test::Register XS_CAT(xs_reg_, __LINE__)(name, XS_CAT(xs_case_, __LINE__)); \
  static void XS_CAT(xs_case_, __LINE__)()

#define CHECK(cond) \
  do { if (!(cond)) xs_test::fail(__FILE__, __LINE__, #cond); } while (0)

#define CHECK_CLOSE(a, b, tol)                                                         \
  do {                                                                                 \
    const double xs_a = (a), xs_b = (b);                                               \
    if (!(std::fabs(xs_a - xs_b) <= (tol)))                                            \
      xs_test::fail(__FILE__, __LINE__, std::string(#a " == " #b ": ") +               \
                                            std::to_string(xs_a) + " vs " + std::to_string(xs_b)); \
  } while (0)

#define CHECK_THROWS_AS(expr, exc)                                                 \
  do {                                                                             \
    bool xs_thrown = false;                                                        \
    try { (void)(expr); } catch (const exc&) { xs_thrown = true; } catch (...) {}  \
    if (!xs_thrown) xs_test::fail(__FILE__, __LINE__, #expr " did not throw " #exc); \
  } while (0)

#define XS_TEST_MAIN() int main() { return xs_test::run_all(); }
