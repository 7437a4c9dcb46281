// The smallest program that uses an installed xtalscale: find_package(xtalscale) + xtalscale::core.
#include <cstdio>
#include <cstring>

#include "xtalscale/core.hpp"

int main() {
  std::printf("xtalscale %s\n", xtalscale::version());
  return std::strcmp(xtalscale::version(), XTALSCALE_VERSION_STRING) == 0 ? 0 : 1;
}
