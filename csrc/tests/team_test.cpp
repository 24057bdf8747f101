// The block-level algorithms of the CUDA backend (common/completion.h, common/small_eigh.h, the fused
// path's common/gram_core.h and common/fused_io.h) run on the CPU by a team of real threads sharing a
// std::barrier, as a thread block would, and compared with the one-thread team. No libtorch: this program
// is also built with ThreadSanitizer (CMake build type TSan). Cases include k*r = 128 and 256 candidate
// rows per problem, most of them rejected (duplicated neighbors), so every candidate is visited, and
// fused cores of k*r = 12 to 256 (Jacobi and block Krylov, workspace in plain memory as in the GPU's
// global memory). Prints "N passed, N failed".
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../common/completion.h"
#include "../common/fused_io.h"
#include "../common/gram_core.h"
#include "../common/small_eigh.h"

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
                                  (int64_t)missing.size(), c.n_out, c.n_in, c.r, c.rank, c.n,
                                  (int64_t)c.n_in * c.r * c.n};
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

// small_eigh on `count` symmetric n x n matrices H (row-major, one after the other) with a team of
// `threads` threads (0: SerialTeam); returns values [count, n] followed by vectors [count, n, n], and
// the most sweeps of a matrix in *sweeps.
std::vector<double> run_eigh(const std::vector<double>& H, int n, int count, int threads, int* sweeps) {
  std::vector<double> out((size_t)count * n * (n + 1));
  const auto solve = [&](const auto& team, double* work) {
    int most = 0;
    for (int p = 0; p < count; ++p)
      most = std::max(most, decaf::small_eigh(team, H.data() + (size_t)p * n * n, n, work, out.data() + (size_t)p * n,
                                              out.data() + (size_t)count * n + (size_t)p * n * n));
    if (team.rank() == 0) *sweeps = most;
  };
  std::vector<double> work(decaf::small_eigh_workspace(n));
  if (threads == 0) {
    double scratch = 0.0;
    solve(decaf::SerialTeam{&scratch}, work.data());
    return out;
  }
  std::vector<double> scratch(threads);
  std::barrier<> barrier(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] { solve(ThreadTeam{scratch.data(), t, threads, &barrier}, work.data()); });
  for (auto& th : pool) th.join();
  return out;
}

// The core C C^T of a ring row whose weights arrive on the GPU, written to H [n, n]: C = R_B diag(w) R_A^T
// with R_B, R_A upper triangular (Cholesky factors of the stacks' Grams, every agent's columns stacked:
// 8 agents of n/8 columns) and w nonzero only on the columns of agents 0, 1 and 7 (the row's own agent
// and its neighbours): rank n/4 + n/8 (24 of 64), a null space that is not aligned with the axes.
void ring_core(int n, std::mt19937_64& gen, double* H) {
  std::normal_distribution<double> normal;
  std::vector<double> RB((size_t)n * n, 0.0), RA((size_t)n * n, 0.0), C((size_t)n * n);
  for (double* R : {RB.data(), RA.data()})
    for (int i = 0; i < n; ++i)
      for (int j = i; j < n; ++j) R[i * n + j] = i == j ? 1.0 + std::fabs(normal(gen)) : 0.3 * normal(gen);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      double x = 0.0;
      for (int l = 0; l < n; ++l)
        if (l < n / 4 || l >= n - n / 8) x += RB[i * n + l] * (1.0 + 0.1 * (l % 3)) / 3.0 * RA[j * n + l];
      C[i * n + j] = x;
    }
  for (int i = 0; i < n; ++i)
    for (int j = 0; j <= i; ++j) {
      double x = 0.0;
      for (int l = 0; l < n; ++l) x += C[i * n + l] * C[j * n + l];
      H[i * n + j] = H[j * n + i] = x;
    }
}

// Symmetric matrices (kind: 0 spread, 1 clustered (three values), 2 zero matrix, 3 already diagonal: each
// Q diag(spectrum) Q^T, Q from Gram-Schmidt on normal columns; 4 a rank-deficient ring core), solved by
// teams of 1 and `threads` threads: the same bits, eigenvalues ascending, orthonormal vectors, residuals
// within 64 n eps ||H||, converged before the sweep limit (the ring core: within kRankDeficientSweeps).
const char* const kKindNames[] = {"spread", "clustered", "zero", "diagonal", "ring core"};
// Sweeps allowed on the ring core: its null space is deflated before the sweeps, which then converge
// as on a full-rank matrix of the rank's size.
constexpr int kRankDeficientSweeps = 12;

void compare_eigh(int n, int kind, int threads) {
  const int count = 2;
  std::mt19937_64 gen(n * 10 + kind);
  std::normal_distribution<double> normal;
  std::vector<double> H((size_t)count * n * n, 0.0);
  for (int p = 0; p < count; ++p) {
    if (kind == 4) {
      ring_core(n, gen, H.data() + (size_t)p * n * n);
      continue;
    }
    std::vector<double> Q((size_t)n * n), lam(n);
    for (int k = 0; k < n; ++k) lam[k] = kind == 0 ? normal(gen) * (1 + k) : kind == 1 ? (double)(k % 3) : kind == 2 ? 0.0 : k - 0.5 * n;
    for (int k = 0; k < n; ++k) {  // column k of Q
      for (int e = 0; e < n; ++e) Q[e * n + k] = kind == 3 ? (e == k ? 1.0 : 0.0) : normal(gen);
      for (int pass = 0; pass < 2 && kind != 3; ++pass)
        for (int u = 0; u < k; ++u) {
          double dot = 0.0;
          for (int e = 0; e < n; ++e) dot += Q[e * n + k] * Q[e * n + u];
          for (int e = 0; e < n; ++e) Q[e * n + k] -= dot * Q[e * n + u];
        }
      double norm = 0.0;
      for (int e = 0; e < n; ++e) norm += Q[e * n + k] * Q[e * n + k];
      for (int e = 0; e < n; ++e) Q[e * n + k] /= std::sqrt(norm);
    }
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        double x = 0.0;
        for (int k = 0; k < n; ++k) x += Q[i * n + k] * lam[k] * Q[j * n + k];
        H[(size_t)p * n * n + i * n + j] = x;
      }
    for (int i = 0; i < n; ++i)  // exactly symmetric
      for (int j = 0; j < i; ++j) H[(size_t)p * n * n + i * n + j] = H[(size_t)p * n * n + j * n + i];
  }
  int sweeps = 0, team_sweeps = 0;
  const std::vector<double> serial = run_eigh(H, n, count, 0, &sweeps), team = run_eigh(H, n, count, threads, &team_sweeps);
  bool same = true, ascending = true;
  for (size_t x = 0; x < serial.size(); ++x) same = same && serial[x] == team[x];
  double orth = 0.0, resid = 0.0;
  for (int p = 0; p < count; ++p) {
    const double* h = H.data() + (size_t)p * n * n;
    const double* values = team.data() + (size_t)p * n;
    const double* vectors = team.data() + (size_t)count * n + (size_t)p * n * n;
    double norm = 1e-300;
    for (int e = 0; e < n * n; ++e) norm += h[e] * h[e];
    norm = std::sqrt(norm);
    for (int k = 0; k < n; ++k) {
      if (k > 0) ascending = ascending && values[k - 1] <= values[k];
      for (int l = 0; l <= k; ++l) {
        double dot = 0.0;
        for (int e = 0; e < n; ++e) dot += vectors[e * n + k] * vectors[e * n + l];
        orth = std::fmax(orth, std::fabs(dot - (k == l ? 1.0 : 0.0)));
      }
      double r2 = 0.0;
      for (int i = 0; i < n; ++i) {
        double x = -values[k] * vectors[i * n + k];
        for (int j = 0; j < n; ++j) x += h[i * n + j] * vectors[j * n + k];
        r2 += x * x;
      }
      resid = std::fmax(resid, std::sqrt(r2) / norm);
    }
  }
  const double eps = 2.220446049250313e-16;
  char name[200];
  std::snprintf(name, sizeof(name),
                "small_eigh %d threads vs 1: n=%d %s (same bits %d, orthogonality %.1e, residual %.1e, %d sweeps)", threads,
                n, kKindNames[kind], (int)same, orth, resid,
                team_sweeps);
  check(same && sweeps == team_sweeps && sweeps <= (kind == 4 ? kRankDeficientSweeps : decaf::kSmallEighSweeps - 1) &&
            ascending && orth <= 64 * n * eps &&
            resid <= 64 * n * eps,
        name);
}


// Runs body(team) on a one-thread team (threads = 0) or a team of `threads` std::threads.
template <class Body>
void with_team(int threads, Body body) {
  if (threads == 0) {
    double scratch = 0.0;
    body(decaf::SerialTeam{&scratch});
    return;
  }
  std::vector<double> scratch(threads);
  std::barrier<> barrier(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { body(ThreadTeam{scratch.data(), t, threads, &barrier}); });
  for (auto& th : pool) th.join();
}

// One fused core case: `modules` modules of n_in agents of rank r (m = n = c features), every agent's
// factors random (`copies` > 0: agents >= copies repeat agent 0's, so stacks are rank-deficient); W
// [n_out, n_in] on the device plan (table = false: every row on every agent) or as a host plan's table
// of ring supports (rows i on agents i-1, i, i+1; row 1 all zero: K = 0).
struct CoreCase {
  int modules, n_out, n_in, r, rank, c, copies;
  bool table, complete;
};

struct CoreResult {
  std::vector<double> coef_B, coef_A;
  std::vector<double> S;
  std::vector<int> missing;
  int cycles = 0;
};

CoreResult run_core(const CoreCase& k, int threads) {
  const int NR = k.n_in * k.r, ld = NR + 1;
  std::mt19937_64 gen(NR * 7 + k.c);
  std::normal_distribution<double> normal;
  // Stacks X [modules, NR + 1, c] (ones last) for B and A, and their Grams.
  std::vector<double> GB((size_t)k.modules * ld * ld), GA(GB.size());
  for (int b = 0; b < k.modules; ++b)
    for (std::vector<double>* G : {&GB, &GA}) {
      std::vector<double> X((size_t)ld * k.c);
      for (int row = 0; row < ld; ++row)
        for (int i = 0; i < k.c; ++i)
          X[(size_t)row * k.c + i] = row == NR ? 1.0 : (k.copies > 0 && row / k.r >= k.copies) ? X[(size_t)(row % k.r) * k.c + i]
                                                                                                 : normal(gen);
      for (int x = 0; x < ld; ++x)
        for (int y = 0; y < ld; ++y) {
          double sum = 0.0;
          for (int i = 0; i < k.c; ++i) sum += X[(size_t)x * k.c + i] * X[(size_t)y * k.c + i];
          (*G)[(size_t)b * ld * ld + x * ld + y] = sum;
        }
    }
  std::vector<double> W((size_t)k.n_out * k.n_in, 0.0);
  for (int i = 0; i < k.n_out; ++i)
    for (int j = 0; j < k.n_in; ++j) {
      const int hop = std::min((i - j + k.n_in) % k.n_in, (j - i + k.n_in) % k.n_in);
      W[(size_t)i * k.n_in + j] = k.complete ? 1.0 / k.n_in : hop <= 1 ? (1.0 + 0.1 * j) / 3.0 : 0.0;
    }
  const int64_t kmax = k.table ? 3 * k.r : NR, problems = k.n_out;
  std::vector<double> table;
  if (k.table) {
    table.assign(decaf::table_problem(k.n_out, k.n_in, kmax, problems), 0.0);
    for (int i = 0; i < k.n_out; ++i) table[i] = i;
    std::copy(W.begin(), W.end(), table.begin() + decaf::table_weights(k.n_out));
    for (int p = 0; p < problems; ++p) {
      double* row = table.data() + decaf::table_problem(k.n_out, k.n_in, kmax, p);
      if (p == 1) continue;  // K = 0
      row[0] = (double)kmax;
      for (int x = 0; x < kmax; ++x) {
        const int agent = (p - 1 + x / k.r + k.n_in) % k.n_in, col = agent * k.r + x % k.r;
        row[1 + x] = W[(size_t)p * k.n_in + agent];
        row[1 + kmax + x] = col;
      }
    }
  }
  CoreResult out;
  out.coef_B.assign((size_t)k.modules * k.n_out * k.rank * NR, -1.0);
  out.coef_A = out.coef_B;
  out.S.assign((size_t)k.modules * k.n_out * k.rank, -1.0);
  out.missing.assign((size_t)k.modules * k.n_out, -1);
  const int64_t q = std::min<int64_t>(k.rank, kmax);
  std::vector<double> work(decaf::core_workspace(kmax, q));
  std::vector<double> eig_work(decaf::small_eigh_workspace((int)std::min<int64_t>(kmax, decaf::kSmallEighMax)));
  const decaf::CoreView v{GB.data(), GA.data(), k.table ? nullptr : W.data(), k.table ? table.data() : nullptr,
                                 out.coef_B.data(), out.coef_A.data(), out.S.data(), out.missing.data(), work.data(),
                                 problems, k.n_out, k.n_in, k.r, k.rank, kmax, k.c, 0.5, 0.5, 1.1920928955078125e-07};
  with_team(threads, [&](const auto& team) {
    int most = 0;
    for (int64_t item = 0; item < k.modules * problems; ++item)
      most = std::max(most, decaf::gram_core(team, v, item, work.data(), eig_work.data()));
    if (team.rank() == 0) out.cycles = most;
  });
  return out;
}

void compare_core(const CoreCase& k, int threads) {
  const CoreResult serial = run_core(k, 0), team = run_core(k, threads);
  const bool same = serial.coef_B == team.coef_B && serial.coef_A == team.coef_A && serial.S == team.S &&
                    serial.missing == team.missing && serial.cycles == team.cycles;
  // S descending and nonnegative, every output written, the zero row (table case) all missing.
  bool sane = true;
  for (size_t row = 0; row < team.missing.size(); ++row) {
    const double* S = team.S.data() + row * k.rank;
    for (int j = 0; j < k.rank; ++j) sane = sane && S[j] >= 0.0 && (j == 0 || S[j] <= S[j - 1]);
    sane = sane && team.missing[row] >= 0 && team.missing[row] <= k.rank;
    if (k.table && row % k.n_out == 1) sane = sane && team.missing[row] == k.rank && S[0] == 0.0;
  }
  for (double x : team.coef_B) sane = sane && x != -1.0 && std::isfinite(x);
  for (double x : team.coef_A) sane = sane && x != -1.0 && std::isfinite(x);
  char name[240];
  std::snprintf(name, sizeof(name),
                "gram_core %d threads vs 1: %s n_in=%d r=%d (k*r=%d) rank=%d c=%d%s%s (same bits %d, sane %d, %d Krylov cycles)",
                threads, k.table ? "table (ring supports, a zero row)" : k.complete ? "device plan, complete" : "device plan, ring",
                k.n_in, k.r, k.table ? 3 * k.r : k.n_in * k.r, k.rank, k.c, k.copies ? " repeated agents" : "", "",
                (int)same, (int)sane, team.cycles);
  check(same && sane && team.cycles < decaf::kKrylovCycles, name);
}

// finish_row: completion of float64 rows, then A, B (transposed) and S written as float.
void compare_finish(int threads) {
  const int modules = 2, n_out = 4, n_in = 4, r = 3, rank = 4, n = 20, m = 15, NR = n_in * r;
  std::mt19937_64 gen(99);
  std::normal_distribution<double> normal;
  std::vector<double> A_in((size_t)modules * (NR + 1) * n), BT((size_t)modules * n_out * rank * m), W((size_t)n_out * n_in, 0.25);
  for (double& x : A_in) x = normal(gen);
  for (double& x : BT) x = normal(gen);
  std::vector<double> S((size_t)modules * n_out * rank);
  for (double& x : S) x = normal(gen);
  std::vector<int> missing(modules * n_out);
  std::vector<double> A64((size_t)modules * n_out * rank * n, 0.0);
  for (int p = 0; p < modules * n_out; ++p) {
    missing[p] = p % (rank + 1);
    for (int j = 0; j < rank - missing[p]; ++j) A64[((size_t)p * rank + j) * n + j] = 1.0 + j;  // orthogonal rows
  }
  const auto run = [&](int t) {
    std::vector<double> a = A64;
    std::vector<float> A_out(a.size()), B_out((size_t)modules * n_out * m * rank), S_out((size_t)modules * n_out * rank);
    const decaf::CompletionView<double> completion{a.data(), missing.data(), A_in.data(), W.data(), (int64_t)missing.size(),
                                                   n_out, n_in, r, rank, n, (int64_t)(NR + 1) * n};
    const decaf::FinishView<float> v{completion, BT.data(), A_out.data(), B_out.data(), S.data(), S_out.data(), m};
    with_team(t, [&](const auto& team) {
      for (int64_t p = 0; p < (int64_t)missing.size(); ++p) decaf::finish_row(team, v, p);
    });
    A_out.insert(A_out.end(), B_out.begin(), B_out.end());
    A_out.insert(A_out.end(), S_out.begin(), S_out.end());
    return A_out;
  };
  const std::vector<float> serial = run(0), team = run(threads);
  double diff = 0.0;
  for (size_t x = 0; x < serial.size(); ++x) diff = std::fmax(diff, std::fabs(serial[x] - team[x]));
  bool transposed = true;  // B_out[p][i][t] = BT[p][t][i]
  const size_t a_size = (size_t)modules * n_out * rank * n;
  for (int p = 0; p < modules * n_out; ++p)
    for (int i = 0; i < m; ++i)
      for (int t = 0; t < rank; ++t)
        transposed = transposed && team[a_size + ((size_t)p * m + i) * rank + t] == (float)BT[((size_t)p * rank + t) * m + i];
  const size_t s_at = a_size + (size_t)modules * n_out * m * rank;
  for (size_t x = 0; x < S.size(); ++x) transposed = transposed && team[s_at + x] == (float)S[x];
  char name[160];
  std::snprintf(name, sizeof(name), "finish_row %d threads vs 1: completion, A, B and S written as float (diff %.1e, B transposed, S %d)",
                threads, diff, (int)transposed);
  check(diff < 1e-6 && transposed, name);
}

}  // namespace

int main() {
  for (int threads : {2, 7})
    for (int n : {1, 2, 3, 7, 32, 33, 64})
      for (int kind : {0, 1, 2, 3, 4}) compare_eigh(n, kind, threads);
  for (int threads : {2, 7}) {
    compare({6, 6, 4, 4, 40, 6}, threads);        // own rows suffice
    compare({4, 16, 8, 12, 150, 1}, threads);     // k*r = 128, one distinct agent: 8 rows, then unit vectors
    compare({3, 32, 8, 16, 150, 2}, threads);     // k*r = 256, two distinct agents
    compare({2, 3, 2, 6, 6, 0}, threads);         // all-zero candidates: unit vectors only
  }
  for (int threads : {2, 7}) {
    compare_core({2, 6, 6, 4, 4, 12, 0, true, false}, threads);     // host plan table: k*r = 12, a zero row
    compare_core({2, 8, 8, 8, 8, 96, 0, false, false}, threads);    // ring on every agent: k*r = 64, Jacobi
    compare_core({1, 8, 8, 8, 8, 96, 3, false, true}, threads);     // repeated agents: rank-deficient stacks
    compare_core({1, 3, 16, 8, 8, 160, 0, false, true}, threads);   // k*r = 128: block Krylov
    compare_core({1, 2, 32, 8, 8, 300, 0, false, false}, threads);  // k*r = 256: block Krylov, ring weights
    compare_finish(threads);
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
