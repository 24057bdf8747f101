// A "team" is the group of threads that solves one small problem together.
//
// The per-problem code in this folder is written once against this interface and runs in three
// places: on the CPU with a SerialTeam (one thread, no barriers), on the GPU with a BlockTeam (one
// CUDA thread block per problem, csrc/cuda), and in csrc/tests/team_test.cpp with a team of
// std::threads sharing a std::barrier (also under ThreadSanitizer). Work is split with
// `for (int x = team.rank(); x < n; x += team.size())`, reductions use team_sum, and
// `team.sync()` is the barrier.
#pragma once

#ifdef __CUDACC__
#define DECAF_HD __host__ __device__
#else
#define DECAF_HD
#endif

namespace decaf {

// One thread does everything. `scratch` holds at least one double per thread (here: one).
struct SerialTeam {
  double* scratch;
  DECAF_HD int rank() const { return 0; }
  DECAF_HD int size() const { return 1; }
  DECAF_HD void sync() const {}
};

// Deterministic sum of one value per thread: every thread passes its partial sum and gets the
// total, added in thread order (so the result does not depend on scheduling).
template <class Team>
DECAF_HD double team_sum(const Team& team, double partial) {
  team.sync();
  team.scratch[team.rank()] = partial;
  team.sync();
  double total = 0.0;
  for (int t = 0; t < team.size(); ++t) total += team.scratch[t];
  team.sync();
  return total;
}

}  // namespace decaf
