// Counter-based standard normal numbers: the same value for (seed, counter) on every device, so the
// randomized method draws the same test matrix on the CPU and the GPU.
#pragma once

#include <math.h>
#include <stdint.h>

#include "team.h"

namespace decaf {

DECAF_HD inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// SplitMix64 + Box-Muller.
DECAF_HD inline double counter_normal(uint64_t seed, uint64_t counter) {
  const uint64_t a = splitmix64(seed ^ splitmix64(2 * counter));
  const uint64_t b = splitmix64(seed ^ splitmix64(2 * counter + 1));
  const double u1 = ((a >> 11) + 0.5) * (1.0 / 9007199254740992.0);  // (0, 1)
  const double u2 = (b >> 11) * (1.0 / 9007199254740992.0);           // [0, 1)
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

}  // namespace decaf
