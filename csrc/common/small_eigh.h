// Eigendecomposition of one small symmetric matrix (n <= kSmallEighMax, float64) by cyclic Jacobi,
// written once against a Team (team.h): one CUDA thread block per matrix in the CUDA backend's eigh
// (where ATen's batched eigh reads its status on the host), several std::threads in the native
// tests. Same output as at::linalg_eigh: eigenvalues ascending, eigenvectors as columns (each up to
// sign).
//
// Each sweep visits every pair (p, q) once in n' - 1 rounds of n'/2 disjoint pairs (round-robin
// tournament, n' = n rounded up to even; pairs with the padding index are skipped). The rotations of
// one round commute, so the team applies them together: all rows, then all columns of A and V.
// Sweeps stop when the off-diagonal Frobenius norm is at most n eps64 times the whole norm (Jacobi
// converges quadratically on distinct eigenvalues: 7-10 sweeps for C C^T of a random C of 24 x 24 to
// 64 x 64; slower on clusters: 15 with 56 zero eigenvalues of 64, 27 with three values 21 times each),
// or after kSmallEighSweeps. The team's copies of A and V have rows of an odd number of doubles (n
// rounded up to odd), so that a column, which the threads of a round read one row each, falls in
// distinct shared-memory banks on the GPU.
#pragma once

#include <math.h>
#include <stdint.h>

#include "team.h"

namespace decaf {

constexpr int kSmallEighMax = 64;
constexpr int kSmallEighSweeps = 30;

// Row length (doubles) of the team's copies of A and V: n rounded up to odd.
DECAF_HD inline int small_eigh_stride(int n) { return n | 1; }

// Doubles of workspace small_eigh needs for an n x n matrix: A and V (n rows of small_eigh_stride(n)
// each), and one rotation (c, s) per pair of a round.
DECAF_HD inline int64_t small_eigh_workspace(int n) {
  return 2 * (int64_t)n * small_eigh_stride(n) + 2 * ((n + 1) / 2);
}

// Pair `i` of round `round` among n_even players: (p, q), p the fixed player for i = 0.
DECAF_HD inline void tournament_pair(int n_even, int round, int i, int* p, int* q) {
  const int m = n_even - 1;
  *p = i == 0 ? m : (round + i) % m;
  *q = (round - i + m) % m;
}

// (x, y) <- (c x - s y, s x + c y): one plane rotation of a pair of entries.
DECAF_HD inline void rotate(double* x, double* y, double c, double s) {
  const double a = *x, b = *y;
  *x = c * a - s * b;
  *y = s * a + c * b;
}

// H [n, n] (row-major, read only) -> values [n] ascending, vectors [n, n] (row-major; column k is the
// eigenvector of values[k]). `work` holds small_eigh_workspace(n) doubles private to the team.
// Returns the number of sweeps run.
template <class Team>
DECAF_HD int small_eigh(const Team& team, const double* H, int n, double* work, double* values, double* vectors) {
  const int ld = small_eigh_stride(n);
  double* a = work;
  double* v = a + n * ld;
  double* rot = v + n * ld;
  const int n_even = n + (n & 1), pairs = n_even / 2;
  for (int e = team.rank(); e < n * n; e += team.size()) {
    a[e / n * ld + e % n] = H[e];
    v[e / n * ld + e % n] = (e / n == e % n) ? 1.0 : 0.0;
  }
  team.sync();
  int sweep = 0;
  for (; sweep < kSmallEighSweeps; ++sweep) {
    double off = 0.0, all = 0.0;
    for (int e = team.rank(); e < n * n; e += team.size()) {
      const double x = a[e / n * ld + e % n] * a[e / n * ld + e % n];
      all += x;
      if (e / n != e % n) off += x;
    }
    off = team_sum(team, off);
    all = team_sum(team, all);
    // Converged: off-diagonal norm at most n eps64 times the whole norm (rounding keeps it near eps64
    // times the whole norm, so a bound of eps64 itself is never met). Also stops on an all-zero matrix.
    if (!(off > (double)n * n * 4.93e-32 * all)) break;
    for (int round = 0; round < n_even - 1; ++round) {
      for (int i = team.rank(); i < pairs; i += team.size()) {
        int p, q;
        tournament_pair(n_even, round, i, &p, &q);
        double c = 1.0, s = 0.0;
        if (p < n && q < n && a[p * ld + q] != 0.0) {
          // The rotation that zeroes a[p][q] in J^T A J (Golub & Van Loan, sym.schur2).
          const double tau = (a[q * ld + q] - a[p * ld + p]) / (2.0 * a[p * ld + q]);
          const double t = (tau >= 0.0 ? 1.0 : -1.0) / (fabs(tau) + sqrt(1.0 + tau * tau));
          c = 1.0 / sqrt(1.0 + t * t);
          s = t * c;
        }
        rot[2 * i] = c;
        rot[2 * i + 1] = s;
      }
      team.sync();
      // Rows p and q of A <- J^T A.
      for (int x = team.rank(); x < pairs * n; x += team.size()) {
        const int i = x / n, col = x % n;
        int p, q;
        tournament_pair(n_even, round, i, &p, &q);
        if (p >= n || q >= n) continue;
        rotate(&a[p * ld + col], &a[q * ld + col], rot[2 * i], rot[2 * i + 1]);
      }
      team.sync();
      // Columns p and q of A <- A J and of V <- V J.
      for (int x = team.rank(); x < pairs * n; x += team.size()) {
        const int i = x / n, row = x % n;
        int p, q;
        tournament_pair(n_even, round, i, &p, &q);
        if (p >= n || q >= n) continue;
        rotate(&a[row * ld + p], &a[row * ld + q], rot[2 * i], rot[2 * i + 1]);
        rotate(&v[row * ld + p], &v[row * ld + q], rot[2 * i], rot[2 * i + 1]);
      }
      team.sync();
    }
  }
  // Ascending order: the position of diagonal entry k is the count of entries before it (ties by
  // index; NaN after everything, so that every position is written).
  for (int k = team.rank(); k < n; k += team.size()) {
    const double d = isnan(a[k * ld + k]) ? INFINITY : a[k * ld + k];
    int at = 0;
    for (int j = 0; j < n; ++j) {
      const double e = isnan(a[j * ld + j]) ? INFINITY : a[j * ld + j];
      at += (e < d || (e == d && j < k)) ? 1 : 0;
    }
    values[at] = a[k * ld + k];
    for (int row = 0; row < n; ++row) vectors[row * n + at] = v[row * ld + k];
  }
  team.sync();
  return sweep;
}

}  // namespace decaf
