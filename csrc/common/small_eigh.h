// Eigendecomposition of one small symmetric matrix (n <= kSmallEighMax, float64) by cyclic Jacobi,
// written once against a Team (team.h): one CUDA thread block per matrix in the CUDA backend's eigh
// (where ATen's batched eigh reads its status on the host), several std::threads in the native
// tests. Same output as at::linalg_eigh: eigenvalues ascending, eigenvectors as columns (each up to
// sign).
//
// The numerical null space is deflated first: a Householder QR with column pivoting, H P = Q R, stopped
// at the first column whose remaining norm is at most sqrt(n) eps64 ||H||_F, gives the numerical rank k;
// the sweeps then run on the leading k x k block of Q^T H Q = R P^T Q (the rest, at most about n eps64
// ||H||_F, is dropped: eigenvalue 0, vectors the trailing columns of Q). Jacobi converges quadratically
// on distinct eigenvalues but only linearly on a cluster, and the null space of a rank-deficient core
// (C C^T of a ring row whose zero weights arrive on the GPU) is such a cluster, kept from being exact by
// rounding; after the deflation such a core converges as a full-rank matrix of size k does.
//
// Each sweep visits every pair (p, q) once in k' - 1 rounds of k'/2 disjoint pairs (round-robin
// tournament, k' = k rounded up to even; pairs with the padding index are skipped). The rotations of
// one round commute, so the team applies them together: all rows, then all columns of A and V.
// Sweeps stop when the off-diagonal Frobenius norm is at most n eps64 times the whole norm, or after
// kSmallEighSweeps (clusters of nonzero eigenvalues still converge linearly). The team's copies of A
// and V have rows of an odd number of doubles (n rounded up to odd), so that a column, which the
// threads of a round read one row each, falls in distinct shared-memory banks on the GPU.
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
// each), one rotation (c, s) per pair of a round (before the sweeps: the QR's column norms, then one
// row of R), and the QR's column order.
DECAF_HD inline int64_t small_eigh_workspace(int n) {
  return 2 * (int64_t)n * small_eigh_stride(n) + 2 * ((n + 1) / 2) + n;
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

// Deflates the numerical null space of the symmetric a [n, n] (row stride ld) in place, with v = I on
// entry: returns the numerical rank k, with a's leading k x k block = that of Q^T H Q (symmetrized),
// its trailing diagonal 0, and v = Q. `buf` holds n doubles, `order` n (the pivot order, as doubles).
// A matrix with a NaN or Inf entry (norm2_all not finite) is left as it is (k = n).
template <class Team>
DECAF_HD int deflate_null_space(const Team& team, int n, int ld, double norm2_all, double* a, double* v, double* buf,
                                double* order) {
  if (!(norm2_all < INFINITY)) return n;
  const double tol2 = (double)n * 4.93e-32 * norm2_all;  // (sqrt(n) eps64 ||H||_F)^2
  for (int c = team.rank(); c < n; c += team.size()) order[c] = c;
  int k = 0;
  for (; k < n; ++k) {
    // Squared norms of the remaining columns (rows k..n-1); the largest is the pivot.
    for (int c = k + team.rank(); c < n; c += team.size()) {
      double sum = 0.0;
      for (int row = k; row < n; ++row) sum += a[row * ld + c] * a[row * ld + c];
      buf[c] = sum;
    }
    team.sync();
    int p = k;
    for (int c = k + 1; c < n; ++c) p = buf[c] > buf[p] ? c : p;
    const double norm2 = buf[p];
    if (!(norm2 > tol2)) break;
    if (p != k) {
      for (int row = team.rank(); row < n; row += team.size()) {
        const double t = a[row * ld + k];
        a[row * ld + k] = a[row * ld + p];
        a[row * ld + p] = t;
      }
      if (team.rank() == 0) {
        const double t = order[k];
        order[k] = order[p];
        order[p] = t;
      }
    }
    team.sync();
    // The reflector I - u u^T / (norm2 - alpha x0) with u = x - alpha e_k, x = column k from row k on,
    // maps x to alpha e_k; applied to the later columns of a and accumulated into v (v <- v (I - ...)),
    // one column or row per thread. u is read from column k, whose entries are final but for u_k.
    const double x0 = a[k * ld + k];
    const double alpha = x0 < 0.0 ? sqrt(norm2) : -sqrt(norm2);
    const double u0 = x0 - alpha, beta = 1.0 / (norm2 - alpha * x0);
    for (int x = team.rank(); x < 2 * n - k - 1; x += team.size()) {
      if (x < n - k - 1) {
        double* col = a + k + 1 + x;  // column k + 1 + x, row stride ld
        double dot = u0 * col[k * ld];
        for (int row = k + 1; row < n; ++row) dot += a[row * ld + k] * col[row * ld];
        dot *= beta;
        col[k * ld] -= dot * u0;
        for (int row = k + 1; row < n; ++row) col[row * ld] -= dot * a[row * ld + k];
      } else {
        double* row = v + (x - (n - k - 1)) * ld;
        double dot = u0 * row[k];
        for (int i = k + 1; i < n; ++i) dot += row[i] * a[i * ld + k];
        dot *= beta;
        row[k] -= dot * u0;
        for (int i = k + 1; i < n; ++i) row[i] -= dot * a[i * ld + k];
      }
    }
    team.sync();
    if (team.rank() == 0) a[k * ld + k] = alpha;  // R's diagonal; nothing reads column k before the next sync
  }
  team.sync();
  // Row i of Q^T H Q = (row i of R, its columns put back in H's order) Q, for the rows and columns below k.
  for (int i = 0; i < k; ++i) {
    for (int l = team.rank(); l < n; l += team.size()) buf[(int)order[l]] = l >= i ? a[i * ld + l] : 0.0;
    team.sync();
    for (int j = team.rank(); j < k; j += team.size()) {
      double sum = 0.0;
      for (int l = 0; l < n; ++l) sum += buf[l] * v[l * ld + j];
      a[i * ld + j] = sum;
    }
    team.sync();
  }
  // Symmetric up to rounding: average the two triangles; the deflated diagonal is 0.
  for (int e = team.rank(); e < n * n; e += team.size()) {
    const int i = e / n, j = e % n;
    if (i < j && j < k) a[i * ld + j] = a[j * ld + i] = 0.5 * (a[i * ld + j] + a[j * ld + i]);
    if (i == j && i >= k) a[i * ld + i] = 0.0;
  }
  team.sync();
  return k;
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
  double norm2 = 0.0;
  for (int e = team.rank(); e < n * n; e += team.size()) {
    a[e / n * ld + e % n] = H[e];
    v[e / n * ld + e % n] = (e / n == e % n) ? 1.0 : 0.0;
    norm2 += H[e] * H[e];
  }
  norm2 = team_sum(team, norm2);
  const int k = deflate_null_space(team, n, ld, norm2, a, v, rot, rot + 2 * ((n + 1) / 2));
  const int k_even = k + (k & 1), pairs = k_even / 2;
  int sweep = 0;
  for (; sweep < kSmallEighSweeps; ++sweep) {
    double off = 0.0, all = 0.0;
    for (int e = team.rank(); e < k * k; e += team.size()) {
      const double x = a[e / k * ld + e % k] * a[e / k * ld + e % k];
      all += x;
      if (e / k != e % k) off += x;
    }
    off = team_sum(team, off);
    all = team_sum(team, all);
    // Converged: off-diagonal norm at most n eps64 times the whole norm (rounding keeps it near eps64
    // times the whole norm, so a bound of eps64 itself is never met). Also stops on an all-zero matrix.
    if (!(off > (double)n * n * 4.93e-32 * all)) break;
    for (int round = 0; round < k_even - 1; ++round) {
      for (int i = team.rank(); i < pairs; i += team.size()) {
        int p, q;
        tournament_pair(k_even, round, i, &p, &q);
        double c = 1.0, s = 0.0;
        if (p < k && q < k && a[p * ld + q] != 0.0) {
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
      // Rows p and q of A's leading block <- J^T A.
      for (int x = team.rank(); x < pairs * k; x += team.size()) {
        const int i = x / k, col = x % k;
        int p, q;
        tournament_pair(k_even, round, i, &p, &q);
        if (p >= k || q >= k) continue;
        rotate(&a[p * ld + col], &a[q * ld + col], rot[2 * i], rot[2 * i + 1]);
      }
      team.sync();
      // Columns p and q of A's leading block <- A J and of V (all n rows) <- V J.
      for (int x = team.rank(); x < pairs * n; x += team.size()) {
        const int i = x / n, row = x % n;
        int p, q;
        tournament_pair(k_even, round, i, &p, &q);
        if (p >= k || q >= k) continue;
        if (row < k) rotate(&a[row * ld + p], &a[row * ld + q], rot[2 * i], rot[2 * i + 1]);
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
