// The block-level algorithm of the CUDA backend (common/completion.h) run on the CPU by a team of
// real threads sharing a std::barrier, as a thread block would, and compared with the one-thread
// team. No libtorch: this program is also built with ThreadSanitizer (CMake build type TSan).
// Cases include k*r = 128 and 256 candidate rows per problem, most of them rejected (duplicated
// neighbors), so every candidate is visited. Prints "N passed, N failed".
#include <barrier>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../common/completion.h"

namespace {

struct ThreadTeam {
  double* scratch;
  int id, count;
  std::barrier<>* barrier;
  int rank() const { return id; }
  int size() const { return count; }
  void sync() const { barrier->arrive_and_wait(); }
};

int passed = 0, failed = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
  (ok ? passed : failed)++;
}

struct Case {
  int n_out, n_in, r, rank, n, distinct;  // distinct: agents with their own A (the rest copy agent 0)
};

// Completes every problem with a team of `threads` threads (0: SerialTeam) and returns A_new.
std::vector<double> run(const Case& c, const std::vector<double>& A_in, const std::vector<double>& W,
                        const std::vector<int>& missing, std::vector<double> A_new, int threads) {
  decaf::CompletionView<double> v{A_new.data(), missing.data(), A_in.data(), W.data(),
                                  (int64_t)missing.size(), c.n_out, c.n_in, c.r, c.rank, c.n};
  if (threads == 0) {
    double scratch = 0.0;
    const decaf::SerialTeam team{&scratch};
    for (int64_t p = 0; p < v.problems; ++p) decaf::complete_rows(team, v, p);
    return A_new;
  }
  std::vector<double> scratch(threads);
  std::barrier<> barrier(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      const ThreadTeam team{scratch.data(), t, threads, &barrier};
      for (int64_t p = 0; p < v.problems; ++p) decaf::complete_rows(team, v, p);
    });
  for (auto& th : pool) th.join();
  return A_new;
}

void compare(const Case& c, int threads) {
  std::mt19937_64 gen(c.n_in * 1000 + c.r);
  std::normal_distribution<double> normal;
  const int NR = c.n_in * c.r;
  std::vector<double> A_in((size_t)NR * c.n);
  for (int j = 0; j < c.n_in; ++j)
    for (int x = 0; x < c.r * c.n; ++x)
      A_in[(size_t)j * c.r * c.n + x] = j < c.distinct ? normal(gen) : A_in[x];
  std::vector<double> W((size_t)c.n_out * c.n_in);
  for (auto& w : W) w = 1.0 / c.n_in;  // complete graph, equal weights: the agent itself first
  // Problem i keeps i % rank rows above (orthogonal, of norm 1 + q, like sigma^b v^T); the rest is missing.
  std::vector<int> missing(c.n_out);
  std::vector<double> A_new((size_t)c.n_out * c.rank * c.n, 0.0);
  for (int i = 0; i < c.n_out; ++i) {
    const int kept = i % c.rank;
    missing[i] = c.rank - kept;
    double* rows = A_new.data() + (size_t)i * c.rank * c.n;
    for (int q = 0; q < kept; ++q) {
      double* x = rows + (size_t)q * c.n;
      for (int e = 0; e < c.n; ++e) x[e] = normal(gen);
      for (int pass = 0; pass < 2; ++pass)
        for (int u = 0; u < q; ++u) {
          double dot = 0.0;
          for (int e = 0; e < c.n; ++e) dot += x[e] * rows[(size_t)u * c.n + e];
          for (int e = 0; e < c.n; ++e) x[e] -= dot * rows[(size_t)u * c.n + e];
        }
      double norm = 0.0;
      for (int e = 0; e < c.n; ++e) norm += x[e] * x[e];
      for (int e = 0; e < c.n; ++e) x[e] /= std::sqrt(norm);
    }
    for (int q = 0; q < kept; ++q)
      for (int e = 0; e < c.n; ++e) rows[(size_t)q * c.n + e] *= 1.0 + q;
  }
  const std::vector<double> serial = run(c, A_in, W, missing, A_new, 0);
  const std::vector<double> team = run(c, A_in, W, missing, A_new, threads);
  double diff = 0.0, orth = 0.0;
  for (size_t x = 0; x < serial.size(); ++x) diff = std::fmax(diff, std::fabs(serial[x] - team[x]));
  // Completed rows: unit norm and orthogonal to every row above them.
  for (int i = 0; i < c.n_out; ++i) {
    const double* rows = team.data() + (size_t)i * c.rank * c.n;
    for (int k = c.rank - missing[i]; k < c.rank; ++k)
      for (int q = 0; q <= k; ++q) {
        double dot = 0.0, nq = 0.0;
        for (int e = 0; e < c.n; ++e) {
          dot += rows[k * c.n + e] * rows[q * c.n + e];
          nq += rows[q * c.n + e] * rows[q * c.n + e];
        }
        orth = std::fmax(orth, std::fabs(q == k ? dot - 1.0 : dot / std::sqrt(nq)));
      }
  }
  char name[200];
  std::snprintf(name, sizeof(name),
                "complete_rows %d threads vs 1: n_in=%d r=%d (k*r=%d) rank=%d n=%d distinct=%d (diff %.1e, orth %.1e)",
                threads, c.n_in, c.r, NR, c.rank, c.n, c.distinct, diff, orth);
  check(diff < 1e-12 && orth < 1e-12, name);
}

}  // namespace

int main() {
  for (int threads : {2, 7}) {
    compare({6, 6, 4, 4, 40, 6}, threads);        // own rows suffice
    compare({4, 16, 8, 12, 150, 1}, threads);     // k*r = 128, one distinct agent: 8 rows, then unit vectors
    compare({3, 32, 8, 16, 150, 2}, threads);     // k*r = 256, two distinct agents
    compare({2, 3, 2, 6, 6, 0}, threads);         // all-zero candidates: unit vectors only
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
