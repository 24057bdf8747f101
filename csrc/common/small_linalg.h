// Small dense float64 linear algebra for one team (see team.h): row-major matrices that fit in
// shared memory. Every routine is deterministic for a given team size.
#pragma once

#include <math.h>
#include <stdint.h>

#include "team.h"

namespace decaf {

constexpr double kEps = 2.220446049250313e-16;

// C[rows x cols] = A[rows x inner] * B[inner x cols]; lda/ldb/ldc are row strides.
template <class Team>
DECAF_HD void team_matmul(const Team& team, const double* A, int lda, const double* B, int ldb,
                          double* C, int ldc, int rows, int inner, int cols) {
  for (int x = team.rank(); x < rows * cols; x += team.size()) {
    const int i = x / cols, j = x % cols;
    double acc = 0.0;
    for (int k = 0; k < inner; ++k) acc += A[i * lda + k] * B[k * ldb + j];
    C[i * ldc + j] = acc;
  }
  team.sync();
}

// C[rows x cols] = A[rows x inner] * B[cols x inner]^T.
template <class Team>
DECAF_HD void team_matmul_nt(const Team& team, const double* A, int lda, const double* B, int ldb,
                             double* C, int ldc, int rows, int inner, int cols) {
  for (int x = team.rank(); x < rows * cols; x += team.size()) {
    const int i = x / cols, j = x % cols;
    double acc = 0.0;
    for (int k = 0; k < inner; ++k) acc += A[i * lda + k] * B[j * ldb + k];
    C[i * ldc + j] = acc;
  }
  team.sync();
}

// X <- (X + X^T) / 2 for an n x n matrix.
template <class Team>
DECAF_HD void team_symmetrize(const Team& team, double* X, int n) {
  for (int e = team.rank(); e < n * n; e += team.size()) {
    const int a = e / n, b = e % n;
    if (a < b) {
      const double v = 0.5 * (X[a * n + b] + X[b * n + a]);
      X[a * n + b] = v;
      X[b * n + a] = v;
    }
  }
  team.sync();
}

// Pivoted Cholesky of the K x K positive semidefinite matrix G (left untouched):
//   G ~= R^T R with R[s][x] = Rt[s * K + x] (rp x K, columns in the original order),
// pivoting on the largest remaining diagonal entry and stopping once it falls to
// tol_rel * max(diag G). piv[s] is the index pivoted at step s (R[s][piv[t]] = 0 for t < s).
// Scratch: diag[K], done[K]. Returns rp (the numerical rank of G, possibly 0).
template <class Team>
DECAF_HD int pivoted_cholesky(const Team& team, const double* G, int K, double tol_rel, double* Rt,
                              int* piv, double* diag, int* done) {
  for (int x = team.rank(); x < K; x += team.size()) {
    diag[x] = G[x * K + x];
    done[x] = 0;
  }
  team.sync();
  double max_diag = 0.0;
  for (int x = 0; x < K; ++x) max_diag = diag[x] > max_diag ? diag[x] : max_diag;
  const double tol = tol_rel * max_diag;
  int rp = 0;
  for (int s = 0; s < K; ++s) {
    int p = -1;
    double best = tol;
    for (int x = 0; x < K; ++x) {
      if (!done[x] && diag[x] > best) {
        best = diag[x];
        p = x;
      }
    }
    if (p < 0) break;  // every team member reaches the same decision
    const double pivot = sqrt(best);
    double* row = Rt + s * K;
    for (int x = team.rank(); x < K; x += team.size()) {
      if (x == p) {
        row[x] = pivot;
      } else if (done[x]) {
        row[x] = 0.0;
      } else {
        double acc = G[x * K + p];
        for (int u = 0; u < s; ++u) acc -= Rt[u * K + x] * Rt[u * K + p];
        row[x] = acc / pivot;
      }
    }
    team.sync();
    for (int x = team.rank(); x < K; x += team.size()) {
      if (x == p) {
        done[x] = 1;
        diag[x] = 0.0;
      } else if (!done[x]) {
        diag[x] -= row[x] * row[x];
      }
    }
    if (team.leader()) piv[s] = p;
    team.sync();
    rp = s + 1;
  }
  return rp;
}

// Solves R11 z = u for the leading rp x rp upper-triangular block of a pivoted Cholesky factor
// (R11[s][t] = Rt[s * K + piv[t]]) and scatters z to the original order: out[piv[t]] = z[t],
// out[x] = 0 for unpivoted x. Serial (one thread per right-hand side).
DECAF_HD inline void pivoted_back_substitute(const double* Rt, const int* piv, int K, int rp,
                                             const double* u, double* z, double* out) {
  for (int t = rp - 1; t >= 0; --t) {
    double acc = u[t];
    for (int t2 = t + 1; t2 < rp; ++t2) acc -= Rt[t * K + piv[t2]] * z[t2];
    z[t] = acc / Rt[t * K + piv[t]];
  }
  for (int x = 0; x < K; ++x) out[x] = 0.0;
  for (int t = 0; t < rp; ++t) out[piv[t]] = z[t];
}

// Round-robin ("circle method") pairing: in round `round` of n_even - 1 rounds, pair k of n_even/2
// is (p, q). Every unordered pair appears exactly once per sweep and the pairs of a round are
// disjoint, so their rotations can be applied at the same time.
DECAF_HD inline void round_robin_pair(int n_even, int round, int k, int* p, int* q) {
  const int m = n_even - 1;
  if (k == 0) {
    *p = 0;
    *q = (round % m) + 1;
  } else {
    *p = ((k + round) % m) + 1;
    *q = ((n_even - 1 - k + round) % m) + 1;
  }
}

// Jacobi rotation (c, s) that zeroes the off-diagonal entry of the symmetric 2 x 2 block
// [[app, apq], [apq, aqq]] under J^T A J with J = [[c, s], [-s, c]] (Golub & Van Loan, sym.schur2).
// Entries already negligible next to the diagonal (|apq| < eps/2 sqrt(|app aqq|)) are left alone.
DECAF_HD inline void jacobi_rotation(double app, double aqq, double apq, double* c, double* s) {
  if (apq == 0.0 || fabs(apq) < 0.5 * kEps * sqrt(fabs(app)) * sqrt(fabs(aqq))) {
    *c = 1.0;
    *s = 0.0;
    return;
  }
  const double tau = (aqq - app) / (2.0 * apq);
  const double t = tau >= 0.0 ? 1.0 / (tau + sqrt(1.0 + tau * tau))
                              : -1.0 / (-tau + sqrt(1.0 + tau * tau));
  *c = 1.0 / sqrt(1.0 + t * t);
  *s = t * (*c);
}

// Symmetric eigendecomposition of H (n x n, destroyed) by parallel cyclic Jacobi:
// H = V diag(lambda) V^T. On return lambda[k] (descending) and the eigenvector V[:, order[k]]
// (V is n x n, row-major). Sweeps stop once the off-diagonal mass is below (n eps)^2 of the total.
// Scratch: rot[2 * n_even] doubles (n_even = n rounded up to even).
template <class Team>
DECAF_HD void jacobi_eigh(const Team& team, double* H, int n, double* V, double* lambda, int* order,
                          double* rot, int max_sweeps = 30) {
  for (int x = team.rank(); x < n * n; x += team.size()) V[x] = (x / n == x % n) ? 1.0 : 0.0;
  team.sync();
  const int n_even = n + (n & 1);
  const int half = n_even / 2;
  const double tol = n * kEps;
  for (int sweep = 0; sweep < max_sweeps && n > 1; ++sweep) {
    double off = 0.0, total = 0.0;
    for (int x = team.rank(); x < n * n; x += team.size()) {
      const double h = H[x];
      total += h * h;
      if (x / n != x % n) off += h * h;
    }
    off = team_sum(team, off);
    total = team_sum(team, total);
    if (off <= tol * tol * total) break;
    for (int round = 0; round < n_even - 1; ++round) {
      // rot[4k .. 4k+3] = (c, s, p, q) of pair k; pairs touching the padding index are skipped.
      for (int k = team.rank(); k < half; k += team.size()) {
        int p, q;
        round_robin_pair(n_even, round, k, &p, &q);
        double c = 1.0, s = 0.0;
        if (p < n && q < n) jacobi_rotation(H[p * n + p], H[q * n + q], H[p * n + q], &c, &s);
        if (s == 0.0) p = q = -1;
        rot[4 * k] = c;
        rot[4 * k + 1] = s;
        rot[4 * k + 2] = p;
        rot[4 * k + 3] = q;
      }
      team.sync();
      // Rows: H <- J^T H.
      for (int x = team.rank(); x < half * n; x += team.size()) {
        const int k = x / n, j = x - k * n;
        const int p = (int)rot[4 * k + 2], q = (int)rot[4 * k + 3];
        if (p < 0) continue;
        const double c = rot[4 * k], s = rot[4 * k + 1];
        const double hp = H[p * n + j], hq = H[q * n + j];
        H[p * n + j] = c * hp - s * hq;
        H[q * n + j] = s * hp + c * hq;
      }
      team.sync();
      // Columns: H <- H J and V <- V J.
      for (int x = team.rank(); x < half * n; x += team.size()) {
        const int k = x / n, i = x - k * n;
        const int p = (int)rot[4 * k + 2], q = (int)rot[4 * k + 3];
        if (p < 0) continue;
        const double c = rot[4 * k], s = rot[4 * k + 1];
        const double hp = H[i * n + p], hq = H[i * n + q];
        H[i * n + p] = c * hp - s * hq;
        H[i * n + q] = s * hp + c * hq;
        const double vp = V[i * n + p], vq = V[i * n + q];
        V[i * n + p] = c * vp - s * vq;
        V[i * n + q] = s * vp + c * vq;
      }
      team.sync();
    }
  }
  if (team.leader()) {
    // Selection sort by descending eigenvalue; ties keep the lower index first.
    for (int k = 0; k < n; ++k) order[k] = k;
    for (int k = 0; k < n; ++k) {
      int best = k;
      for (int t = k + 1; t < n; ++t)
        if (H[order[t] * n + order[t]] > H[order[best] * n + order[best]]) best = t;
      const int tmp = order[k];
      order[k] = order[best];
      order[best] = tmp;
      lambda[k] = H[order[k] * n + order[k]];
    }
  }
  team.sync();
}

// jacobi_eigh as a callable, the default eigensolver of the per-agent core.
struct JacobiEigh {
  template <class Team>
  DECAF_HD void operator()(const Team& team, double* H, int n, double* V, double* lambda, int* order,
                           double* rot) const {
    jacobi_eigh(team, H, n, V, lambda, order, rot);
  }
};

// Orthonormalizes the first `cols` columns of Y (rows x ld, row-major, in place) by modified
// Gram-Schmidt applied twice; columns that fall below drop_rel of their original norm are removed
// and the rest are packed to the left. Returns the number of columns kept.
template <class Team>
DECAF_HD int team_orthonormalize_columns(const Team& team, double* Y, int rows, int cols, int ld,
                                         double drop_rel) {
  int kept = 0;
  for (int c = 0; c < cols; ++c) {
    double norm0 = 0.0;
    for (int i = team.rank(); i < rows; i += team.size()) norm0 += Y[i * ld + c] * Y[i * ld + c];
    norm0 = team_sum(team, norm0);
    for (int pass = 0; pass < 2; ++pass) {
      for (int k = 0; k < kept; ++k) {
        double dot = 0.0;
        for (int i = team.rank(); i < rows; i += team.size()) dot += Y[i * ld + k] * Y[i * ld + c];
        dot = team_sum(team, dot);
        for (int i = team.rank(); i < rows; i += team.size()) Y[i * ld + c] -= dot * Y[i * ld + k];
        team.sync();
      }
    }
    double norm = 0.0;
    for (int i = team.rank(); i < rows; i += team.size()) norm += Y[i * ld + c] * Y[i * ld + c];
    norm = team_sum(team, norm);
    if (norm0 <= 0.0 || norm <= drop_rel * drop_rel * norm0) continue;
    const double inv = 1.0 / sqrt(norm);
    for (int i = team.rank(); i < rows; i += team.size()) Y[i * ld + kept] = Y[i * ld + c] * inv;
    team.sync();
    ++kept;
  }
  return kept;
}

// Standard normal number for a 64-bit counter under a seed (SplitMix64 + Box-Muller): the same
// value on every device, so randomized methods are reproducible across CPU and GPU.
DECAF_HD inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

DECAF_HD inline double counter_normal(uint64_t seed, uint64_t counter) {
  const uint64_t a = splitmix64(seed ^ splitmix64(2 * counter));
  const uint64_t b = splitmix64(seed ^ splitmix64(2 * counter + 1));
  const double u1 = ((a >> 11) + 0.5) * (1.0 / 9007199254740992.0);  // (0, 1)
  const double u2 = (b >> 11) * (1.0 / 9007199254740992.0);           // [0, 1)
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

}  // namespace decaf
