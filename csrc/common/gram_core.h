// The fused small problem of the exact Gram path for one (module, problem), written once against a Team
// (team.h): one CUDA thread block per problem in the CUDA backend (csrc/cuda/fused_cuda.cu), a one-thread
// team on the CUDA path run on the CPU (csrc/tests/fused_on_cpu.h), a team of std::threads in
// csrc/tests/team_test.cpp (also under ThreadSanitizer). It replaces the batched ATen calls of
// csrc/cuda/gram_svd_batched.cpp with one launch for the whole call.
//
// Input: the all-pairs Grams G_B = X_B X_B^T and G_A = X_A X_A^T [NR + 1, NR + 1] (float64) of one module,
// X = the NR stacked factor rows plus a row of ones, so that row NR holds each stacked column's sum. A
// problem stacks K of the NR columns (its support: cols) with weights d. With s the column norms,
// G_Bs = diag(1/s_B) G_B diag(1/s_B) (unit diagonal) and L L^T = G_Bs + jitter I (lower Cholesky; the
// jitter, as in gram_svd_batched.cpp, turns zero or repeated columns into ~1e-7 singular values, dropped
// and completed), M = P diag(d) Q^T = U_P C U_Q^T with U_P = P diag(1/s_B) L^{-T} orthonormal and
// C C^T = H = L^T F L, F = diag(e) G_A diag(e), e = s_B d (0 where a column of A is zero). The top q
// eigenpairs (y, theta) of H give sigma = sqrt(theta), the coefficients u = diag(1/s_B) L^{-T} y on P's
// columns and v = diag(e) L y / sigma on Q's (= M^T (P u) / sigma), signed and scaled as
// split_coefficients (csrc/coefficients.cpp) does, and written as coefficient rows over all NR stacked
// columns, so that each side's write-back is one GEMM over the call.
//
// Eigenpairs: K <= kSmallEighMax: small_eigh (Jacobi, common/small_eigh.h) of H. Larger K: restarted
// block Krylov (block size q, kKrylovBasis columns: [Y, H Y, H^2 Y, ...] orthonormalized by classical
// Gram-Schmidt twice), Rayleigh-Ritz by small_eigh of the kKrylovBasis-sized projection, restarted from
// the top q Ritz vectors until every one's residual |H y - theta y| is at most kKrylovTolerance theta_1
// (or kKrylovCycles cycles). Every value that reaches the output is computed by one thread (dot products
// are not split over the team), so results do not depend on the team's size.
#pragma once

#include <math.h>
#include <stdint.h>

#include "small_eigh.h"
#include "team.h"

namespace decaf {

constexpr int kFusedMaxColumns = 256;              // largest K of the fused path
constexpr int kKrylovBasis = kSmallEighMax;        // Krylov subspace dimension (Rayleigh-Ritz by small_eigh)
// q above kSmallEighMax columns: at least eight blocks. With two (q = 32), 24 restarts leave a random
// complete graph at k*r = 128 or 256 with product errors of 0.1 to 0.2 (native test); from q = 12 up they
// stop above the tolerance (product errors near 1e-5 where the batched path reaches 1e-7). Such calls take
// the batched Gram path.
constexpr int kKrylovMaxRank = kKrylovBasis / 8;
constexpr int kKrylovCycles = 24;
constexpr double kKrylovTolerance = 1e-9;

// A call's problems as the core reads them; item = module * problems + problem.
struct CoreView {
  const double* GB;     // [batch, NR + 1, NR + 1]
  const double* GA;     // [batch, NR + 1, NR + 1]
  const double* W;      // W on the device [n_out, n_in]: problem p is row p on every agent's columns; or null
  const double* table;  // W on the host: fused_table's layout (csrc/solve_fused.cpp); or null
  double* coef_B;       // [batch, n_out, rank, NR]: B_new^T of row i = coef_B[i] X_B[:NR]
  double* coef_A;       // [batch, n_out, rank, NR]: A_new of row i = coef_A[i] X_A[:NR]
  double* S;            // [batch, n_out, rank]
  int* missing;         // [batch, n_out]: trailing zero-sigma rows of A_new to complete
  double* work;         // per team: core_workspace(kmax, min(rank, kmax)) doubles
  int64_t problems, n_out, n_in, r, rank, kmax, mn;  // mn = max(m, n)
  double exp_b, exp_a, eps;                           // eps of the compute dtype (float32)
};

// The host plan's table (doubles): the problem of each output row [n_out], W [n_out, n_in] (for the
// completion), then per problem K, its weights [kmax] and its stacked columns [kmax].
DECAF_HD inline int64_t table_weights(int64_t n_out) { return n_out; }
DECAF_HD inline int64_t table_problem(int64_t n_out, int64_t n_in, int64_t kmax, int64_t p) {
  return n_out + n_out * n_in + p * (1 + 2 * kmax);
}

// Offsets (doubles) of one team's workspace for a problem of K columns and q triplets.
struct CoreLayout {
  int64_t s, inv, e, csB, csA, red, desc, L, F, T, H, vals, vecs, Q, HQ, t1, t2, Tm, theta, Z, Y, HY, U, V, total;
  DECAF_HD CoreLayout(int64_t K, int64_t q) {
    const int64_t B = kKrylovBasis, small = K <= kSmallEighMax ? K : 0, big = K > kSmallEighMax ? K : 0;
    int64_t at = 0;
    const auto take = [&at](int64_t n) {
      const int64_t here = at;
      at += n;
      return here;
    };
    s = take(K), inv = take(K), e = take(K), csB = take(K), csA = take(K), red = take(3 * B + 2), desc = take(B);
    L = take(K * K), F = take(K * K);
    T = take(small * small), H = take(small * small), vals = take(small), vecs = take(small * small);
    Q = take(big * B), HQ = take(big * B), t1 = take(big * q), t2 = take(big * q);
    Tm = take(big ? B * B : 0), theta = take(big ? B : 0), Z = take(big ? B * B : 0);
    Y = take(K * q), HY = take(big * q), U = take(K * q), V = take(K * q);
    total = at;
  }
};

// Doubles of workspace per team for problems of up to kmax columns and q triplets.
DECAF_HD inline int64_t core_workspace(int64_t kmax, int64_t q) {
  const int64_t small = kmax < kSmallEighMax ? kmax : kSmallEighMax;
  const int64_t a = CoreLayout(kmax, q < kmax ? q : kmax).total, b = CoreLayout(small, q < small ? q : small).total;
  return a > b ? a : b;
}

// In place: the lower Cholesky factor of the symmetric positive definite L [K, K] (row-major, lower
// triangle read; pivots below `floor` are raised to it).
template <class Team>
DECAF_HD void team_cholesky(const Team& team, double* L, int K, double floor) {
  for (int j = 0; j < K; ++j) {
    // L[j][j] is final here and written only after the loop, so every thread may read it now.
    const double pivot = sqrt(fmax(L[j * K + j], floor));
    for (int i = j + 1 + team.rank(); i < K; i += team.size()) L[i * K + j] /= pivot;
    team.sync();
    const int n = K - j - 1;
    for (int x = team.rank(); x < n * n; x += team.size()) {
      const int i = j + 1 + x / n, k = j + 1 + x % n;
      if (k <= i) L[i * K + k] -= L[i * K + j] * L[k * K + j];
    }
    team.sync();
  }
  for (int j = team.rank(); j < K; j += team.size()) L[j * K + j] = sqrt(fmax(L[j * K + j], floor));
  team.sync();
}

// Y [K, nc] (row stride ldy) = H X, H = L^T F L, for X [K, nc] (row stride ldx); t1, t2 hold K nc doubles.
template <class Team>
DECAF_HD void apply_core(const Team& team, const double* L, const double* F, int K, const double* X, int ldx,
                         double* Y, int ldy, int nc, double* t1, double* t2) {
  for (int x = team.rank(); x < K * nc; x += team.size()) {
    const int i = x / nc, c = x % nc;
    double sum = 0.0;
    for (int k = 0; k <= i; ++k) sum += L[i * K + k] * X[k * ldx + c];
    t1[x] = sum;
  }
  team.sync();
  for (int x = team.rank(); x < K * nc; x += team.size()) {
    const int i = x / nc, c = x % nc;
    double sum = 0.0;
    for (int l = 0; l < K; ++l) sum += F[i * K + l] * t1[l * nc + c];
    t2[x] = sum;
  }
  team.sync();
  for (int x = team.rank(); x < K * nc; x += team.size()) {
    const int i = x / nc, c = x % nc;
    double sum = 0.0;
    for (int k = i; k < K; ++k) sum += L[k * K + i] * t2[k * nc + c];
    Y[i * ldy + c] = sum;
  }
  team.sync();
}

// Column c of Q [K, ldq] orthonormalized against columns 0..c-1 (classical Gram-Schmidt, twice); a column
// that keeps at most 1e-12 of its norm becomes zero. red holds c + 2 doubles.
template <class Team>
DECAF_HD void orthonormalize_column(const Team& team, double* Q, int ldq, int K, int c, double* red) {
  team.sync();
  if (team.rank() == 0) {
    double sum = 0.0;
    for (int i = 0; i < K; ++i) sum += Q[i * ldq + c] * Q[i * ldq + c];
    red[c] = sum;
  }
  for (int pass = 0; pass < 2; ++pass) {
    team.sync();
    for (int t = team.rank(); t < c; t += team.size()) {
      double dot = 0.0;
      for (int i = 0; i < K; ++i) dot += Q[i * ldq + t] * Q[i * ldq + c];
      red[t] = dot;
    }
    team.sync();
    for (int i = team.rank(); i < K; i += team.size()) {
      double x = Q[i * ldq + c];
      for (int t = 0; t < c; ++t) x -= red[t] * Q[i * ldq + t];
      Q[i * ldq + c] = x;
    }
  }
  team.sync();
  if (team.rank() == 0) {
    double sum = 0.0;
    for (int i = 0; i < K; ++i) sum += Q[i * ldq + c] * Q[i * ldq + c];
    red[c + 1] = sum;
  }
  team.sync();
  const double before = red[c], after = red[c + 1];
  const double scale = after > 1e-24 * before && after > 0.0 ? 1.0 / sqrt(after) : 0.0;
  team.sync();
  for (int i = team.rank(); i < K; i += team.size()) Q[i * ldq + c] *= scale;
  team.sync();
}

// The top q eigenpairs of H = L^T F L (K > kSmallEighMax) by restarted block Krylov: Y [K, q] (row stride
// q) and theta [q] descending. Returns the number of cycles run.
template <class Team>
DECAF_HD int krylov_top(const Team& team, const double* L, const double* F, int K, int q, const CoreLayout& at,
                        double* work, double* eig_work, double* theta_out) {
  const int nb = q, blocks = kKrylovBasis / q, n = nb * blocks, B = kKrylovBasis;
  double *Q = work + at.Q, *HQ = work + at.HQ, *t1 = work + at.t1, *t2 = work + at.t2, *Tm = work + at.Tm;
  double *theta = work + at.theta, *Z = work + at.Z, *Y = work + at.Y, *HY = work + at.HY, *red = work + at.red;
  int cycle = 0;
  for (; cycle < kKrylovCycles; ++cycle) {
    for (int x = team.rank(); x < K * nb; x += team.size()) {
      const int i = x / nb, c = x % nb;
      Q[i * B + c] = cycle == 0 ? sin((i + 1.0) * (c + 1.0) * 0.7548776662466927 + (c + 1.0) * 0.5698402909980532 +
                                      (i + 1.0) * 0.3819660112501051)
                                : Y[i * q + c];
    }
    for (int c = 0; c < nb; ++c) orthonormalize_column(team, Q, B, K, c, red);
    for (int blk = 1; blk < blocks; ++blk) {
      apply_core(team, L, F, K, Q + (blk - 1) * nb, B, HQ + (blk - 1) * nb, B, nb, t1, t2);
      for (int x = team.rank(); x < K * nb; x += team.size())
        Q[(x / nb) * B + blk * nb + x % nb] = HQ[(x / nb) * B + (blk - 1) * nb + x % nb];
      for (int c = blk * nb; c < (blk + 1) * nb; ++c) orthonormalize_column(team, Q, B, K, c, red);
    }
    apply_core(team, L, F, K, Q + (blocks - 1) * nb, B, HQ + (blocks - 1) * nb, B, nb, t1, t2);
    // Rayleigh-Ritz: Tm = Q^T H Q (symmetrized), its eigenpairs, the top q Ritz pairs and their residuals.
    for (int x = team.rank(); x < n * n; x += team.size()) {
      const int a = x / n, c = x % n;
      if (a > c) continue;
      double ac = 0.0, ca = 0.0;
      for (int i = 0; i < K; ++i) {
        ac += Q[i * B + a] * HQ[i * B + c];
        ca += Q[i * B + c] * HQ[i * B + a];
      }
      Tm[a * n + c] = Tm[c * n + a] = 0.5 * (ac + ca);
    }
    team.sync();
    small_eigh(team, Tm, n, eig_work, theta, Z);
    for (int x = team.rank(); x < K * q; x += team.size()) {
      const int i = x / q, j = x % q;
      double y = 0.0, hy = 0.0;
      for (int a = 0; a < n; ++a) {
        y += Q[i * B + a] * Z[a * n + n - 1 - j];
        hy += HQ[i * B + a] * Z[a * n + n - 1 - j];
      }
      Y[x] = y;
      HY[x] = hy;
    }
    team.sync();
    for (int j = team.rank(); j < q; j += team.size()) {
      double sum = 0.0;
      for (int i = 0; i < K; ++i) {
        const double res = HY[i * q + j] - theta[n - 1 - j] * Y[i * q + j];
        sum += res * res;
      }
      red[j] = sum;
    }
    team.sync();
    double worst = 0.0;
    for (int j = 0; j < q; ++j) worst = fmax(worst, red[j]);
    const double top = theta[n - 1] * kKrylovTolerance;
    team.sync();
    if (!(top > 0.0) || worst <= top * top) break;
  }
  for (int j = team.rank(); j < q; j += team.size()) theta_out[j] = theta[n - 1 - j];
  team.sync();
  return cycle < kKrylovCycles ? cycle + 1 : cycle;
}

// One (module, problem) item: the coefficients, S and missing counts of every output row it serves.
// eig_work: small_eigh_workspace(min(kmax, kSmallEighMax)) doubles private to the team (shared memory
// on the GPU). Returns the Krylov cycles run (0: Jacobi on H).
template <class Team>
DECAF_HD int gram_core(const Team& team, const CoreView& v, int64_t item, double* work, double* eig_work) {
  const int64_t b = item / v.problems, p = item % v.problems;
  const int NR = (int)(v.n_in * v.r), ldg = NR + 1, rank = (int)v.rank, r = (int)v.r;
  const double* GB = v.GB + b * ldg * ldg;
  const double* GA = v.GA + b * ldg * ldg;
  const double* row_table = v.table ? v.table + table_problem(v.n_out, v.n_in, v.kmax, p) : nullptr;
  const int K = row_table ? (int)row_table[0] : NR;
  const auto col = [&](int x) { return row_table ? (int)row_table[1 + v.kmax + x] : x; };
  const auto weight = [&](int x) { return row_table ? row_table[1 + x] : v.W[p * v.n_in + x / r]; };
  const auto problem_of = [&](int64_t row) { return v.table ? (int64_t)v.table[row] : row; };
  const int q = K < rank ? K : rank;
  const CoreLayout at(K, q);
  // Singular values at or below tol_rel sigma_1 are zero (zero_tolerance, csrc/coefficients.cpp); the
  // jitter of gram_svd_batched.cpp.
  const double tol_rel = 16.0 * sqrt((double)(v.mn > K ? v.mn : K)) * v.eps, jitter = 4.0 * K * 2.220446049250313e-16;
  double *s = work + at.s, *inv = work + at.inv, *e = work + at.e, *csB = work + at.csB, *csA = work + at.csA;
  double *L = work + at.L, *F = work + at.F, *Y = work + at.Y, *U = work + at.U, *V = work + at.V, *red = work + at.red;
  int cycles = 0;
  if (K > 0) {
    for (int x = team.rank(); x < K; x += team.size()) {
      const int c = col(x);
      s[x] = sqrt(fmax(GB[c * ldg + c], 0.0));
      inv[x] = s[x] > 0.0 ? 1.0 / s[x] : 0.0;
      e[x] = GA[c * ldg + c] > 0.0 ? s[x] * weight(x) : 0.0;
      csB[x] = GB[NR * ldg + c];
      csA[x] = GA[NR * ldg + c];
    }
    team.sync();
    for (int x = team.rank(); x < K * K; x += team.size()) {
      const int i = x / K, j = x % K, ci = col(i), cj = col(j);
      L[x] = j > i ? 0.0 : GB[ci * ldg + cj] * inv[i] * inv[j] + (i == j ? jitter : 0.0);
      F[x] = e[i] * GA[ci * ldg + cj] * e[j];
    }
    team.sync();
    team_cholesky(team, L, K, jitter);
    double* theta = work + at.desc;  // [q] descending
    if (K <= kSmallEighMax) {
      // H = L^T (F L), upper triangle computed and mirrored.
      double *T = work + at.T, *H = work + at.H, *vals = work + at.vals, *vecs = work + at.vecs;
      for (int x = team.rank(); x < K * K; x += team.size()) {
        const int i = x / K, j = x % K;
        double sum = 0.0;
        for (int l = j; l < K; ++l) sum += F[i * K + l] * L[l * K + j];
        T[x] = sum;
      }
      team.sync();
      for (int x = team.rank(); x < K * K; x += team.size()) {
        const int i = x / K, j = x % K;
        if (i > j) continue;
        double sum = 0.0;
        for (int k = i; k < K; ++k) sum += L[k * K + i] * T[k * K + j];
        H[i * K + j] = H[j * K + i] = sum;
      }
      team.sync();
      small_eigh(team, H, K, eig_work, vals, vecs);  // ascending
      for (int x = team.rank(); x < K * q; x += team.size()) Y[x] = vecs[(x / q) * K + K - 1 - x % q];
      for (int j = team.rank(); j < q; j += team.size()) theta[j] = vals[K - 1 - j];
      team.sync();
    } else {
      cycles = krylov_top(team, L, F, K, q, at, work, eig_work, theta);
    }
    // U = diag(1/s_B) L^{-T} Y (one column per thread), V = diag(e) L Y / sigma.
    for (int j = team.rank(); j < q; j += team.size()) {
      for (int i = K - 1; i >= 0; --i) {
        double x = Y[i * q + j];
        for (int k = i + 1; k < K; ++k) x -= L[k * K + i] * U[k * q + j];
        U[i * q + j] = x / L[i * K + i];
      }
      for (int i = 0; i < K; ++i) U[i * q + j] *= inv[i];
    }
    for (int x = team.rank(); x < K * q; x += team.size()) {
      const int i = x / q, j = x % q;
      const double sigma = sqrt(fmax(theta[j], 0.0));
      double sum = 0.0;
      for (int k = 0; k <= i; ++k) sum += L[i * K + k] * Y[k * q + j];
      V[x] = sigma > 0.0 ? e[i] * sum / sigma : 0.0;
    }
    team.sync();
    // Sign rule and scaling (split_coefficients): red[j] the B factor, red[q + j] the A factor, and
    // theta[j] becomes S (0 where dropped).
    for (int j = team.rank(); j < q; j += team.size()) {
      double t1 = 0.0, a1 = 0.0, t2 = 0.0, a2 = 0.0;
      for (int i = 0; i < K; ++i) {
        const double cu = csB[i] * U[i * q + j], cv = csA[i] * V[i * q + j];
        t1 += cu;
        a1 += fabs(cu);
        t2 += cv;
        a2 += fabs(cv);
      }
      const bool flip = fabs(t1) > a1 * 1e-10 ? t1 < 0.0 : t2 < -a2 * 1e-10;
      const double sgn = flip ? -1.0 : 1.0, sigma = sqrt(fmax(theta[j], 0.0));
      const bool keep = sigma > sqrt(fmax(theta[0], 0.0)) * tol_rel;
      red[j] = keep ? sgn * pow(sigma, v.exp_b) : 0.0;
      red[q + j] = keep ? sgn * pow(sigma, v.exp_a) : 0.0;
      red[2 * q + j] = keep ? sigma : 0.0;
    }
    team.sync();
  }
  int kept = 0;
  for (int j = 0; j < q; ++j) kept += K > 0 && red[2 * q + j] > 0.0 ? 1 : 0;
  for (int64_t row = 0; row < v.n_out; ++row) {
    if (problem_of(row) != p) continue;
    const int64_t out = b * v.n_out + row;
    double* cB = v.coef_B + out * rank * NR;
    double* cA = v.coef_A + out * rank * NR;
    if (K < NR) {
      for (int x = team.rank(); x < rank * NR; x += team.size()) cB[x] = cA[x] = 0.0;
      team.sync();
    }
    for (int x = team.rank(); x < rank * K; x += team.size()) {
      const int j = x / K, i = x % K;
      cB[j * NR + col(i)] = j < q ? U[i * q + j] * red[j] : 0.0;
      cA[j * NR + col(i)] = j < q ? V[i * q + j] * red[q + j] : 0.0;
    }
    for (int j = team.rank(); j < rank; j += team.size()) v.S[out * rank + j] = j < q && K > 0 ? red[2 * q + j] : 0.0;
    if (team.rank() == 0) v.missing[out] = rank - kept;
  }
  team.sync();
  return cycles;
}

}  // namespace decaf
