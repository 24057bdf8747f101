// The per-agent core of consensus_tsvd, shared by the CPU and CUDA implementations.
//
// For one batch entry and one receiving agent i, with neighbors j (W[i, j] != 0), let
//   P = [W_ij B_j]_j  (m x K)  and  Q = [A_j^T]_j  (n x K),  K = k r,  so that  M_i = P Q^T.
// From the pairwise Gram matrices of the factors (GB = B^T B, GA = A A^T over all agents, in
// float64) the core
//   1. factors P^T P = Rp^T Rp by pivoted Cholesky (rank-revealing; zero and duplicated
//      neighbors drop out), so P = Op Rp with Op orthonormal,
//   2. forms H = Rp (Q^T Q) Rp^T = Op^T M M^T Op  (rp x rp),
//   3. takes its top eigenpairs (Jacobi, or randomized subspace iteration for large rp):
//      H z = sigma^2 z, so u = Op z is a left singular vector of M_i,
//   4. expresses the split factors as coefficients on the inputs:
//        B_new[:, k] = sigma^a  P x,  x = Rp11^{-1} z   (scattered to the pivot order)
//        A_new[k, :] = sigma^b  y^T Q^T,  y = Rp^T z / sigma
//      with (a, b) = (1/2, 1/2), (1, 0) or (0, 1) for the balanced, left and right splits,
//   5. completes directions with a zero singular value (zero B column) with unit A rows from the
//      neighbors' own A row space (Gram-Schmidt in the Q^T Q metric), and counts what is still
//      missing for a final identity completion done on the explicit rows.
// The caller multiplies the coefficients back onto the factors (one batched GEMM per side).
#pragma once

#include "small_linalg.h"

namespace decaf {

enum CoreMethod : int { kExact = 0, kRandomized = 1, kAuto = 2 };

// Above this numerical rank of the stacked B factors, method "auto" uses subspace iteration.
constexpr int kAutoExactMaxRank = 128;

struct CoreProblem {
  // Inputs for one (batch entry, receiving agent); NR = n_in * r.
  const double* GB;  // [NR x NR] Gram matrix of the columns of all B_j
  const double* GA;  // [NR x NR] Gram matrix of the rows of all A_j
  const double* sB;  // [NR] column sums of B_j (sign rule)
  const double* sA;  // [NR] row sums of A_j (sign rule tie-break)
  const double* w;   // [n_in] row i of W
  int n_in, r, rank;
  int self_index;  // i when W is square (completion prefers the agent's own A), else -1
  int method, oversample, n_iter;
  double exp_b, exp_a;  // sigma exponents of the B and A sides (the split)
  uint64_t seed, stream;  // randomized test matrix: counter_normal(seed, stream * 2^32 + entry)
  // Outputs (zero-initialized by the caller).
  double* coefB;  // [NR x rank]: B_new[:, k] = sum_x B_flat[:, x] coefB[x, k]
  double* coefA;  // [NR x rank]: A_new[k, :] = sum_x coefA[x, k] A_flat[x, :]
  double* S;      // [rank]
  int* missing;   // rows of A_new still to complete with the identity rule
};

// Raw pointers and sizes of a whole call (every batch entry and receiving agent), passed by value
// to kernels; core_problem() cuts out problem p = batch_index * n_out + agent.
struct CoreBatchView {
  const double *GB, *GA, *sB, *sA, *W;  // [batch, NR, NR] x2, [batch, NR] x2, [n_out, n_in]
  double *coefB, *coefA, *S;            // [batch, n_out, NR, rank] x2, [batch, n_out, rank]
  int* missing;                         // [batch, n_out]
  int64_t problems, n_out, n_in, NR, r, rank;
  int method, oversample, n_iter;
  double exp_b, exp_a;
  uint64_t seed;
};

DECAF_HD inline CoreProblem core_problem(const CoreBatchView& v, int64_t p) {
  const int64_t b = p / v.n_out, i = p % v.n_out;
  CoreProblem pb;
  pb.GB = v.GB + b * v.NR * v.NR;
  pb.GA = v.GA + b * v.NR * v.NR;
  pb.sB = v.sB + b * v.NR;
  pb.sA = v.sA + b * v.NR;
  pb.w = v.W + i * v.n_in;
  pb.n_in = (int)v.n_in;
  pb.r = (int)v.r;
  pb.rank = (int)v.rank;
  pb.self_index = v.n_out == v.n_in ? (int)i : -1;
  pb.method = v.method;
  pb.oversample = v.oversample;
  pb.n_iter = v.n_iter;
  pb.exp_b = v.exp_b;
  pb.exp_a = v.exp_a;
  pb.seed = v.seed;
  pb.stream = (uint64_t)p;
  pb.coefB = v.coefB + p * v.NR * v.rank;
  pb.coefA = v.coefA + p * v.NR * v.rank;
  pb.S = v.S + p * v.rank;
  pb.missing = v.missing + p;
  return pb;
}

DECAF_HD inline int core_sketch_width(int K, int rank, int oversample) {
  const int l = rank + oversample;
  return l < K ? l : K;
}

// Workspace sizes for one problem (NR = n_in * r is the largest K).
DECAF_HD inline long core_workspace_doubles(int n_in, int r, int rank, int oversample) {
  const long K = (long)n_in * r;
  const long L = core_sketch_width((int)K, rank, oversample);
  return 4 * K * K + 2 * K * L + 2 * L * L + 4 * K + 2 * (K + 2) + 3 * (long)rank * K;
}
DECAF_HD inline long core_workspace_ints(int n_in, int r) { return 2L * n_in + 3L * n_in * r; }

// `eigh(team, H, n, V, lambda, order, rot)` is the symmetric eigensolver, with jacobi_eigh's
// contract (JacobiEigh on the GPU; the CPU backend passes LAPACK's).
template <class Team, class Eigh>
DECAF_HD void solve_consensus_core(const Team& team, const CoreProblem& pb, double* ws, int* iws,
                                   const Eigh& eigh) {
  const int n_in = pb.n_in, r = pb.r, rank = pb.rank, NR = n_in * r;
  const int Lmax = core_sketch_width(NR, rank, pb.oversample);
  // Workspace layout (sizes for the largest K = NR).
  double* Gp = ws;                       // K x K; later T = Rp Gq, then eigenvectors
  double* Rt = Gp + (long)NR * NR;       // K x K
  double* Gq = Rt + (long)NR * NR;       // K x K
  double* H = Gq + (long)NR * NR;        // K x K
  double* Y = H + (long)NR * NR;         // K x L   (randomized)
  double* HY = Y + (long)NR * Lmax;      // K x L
  double* Tsm = HY + (long)NR * Lmax;    // L x L
  double* Zs = Tsm + (long)Lmax * Lmax;  // L x L
  double* diag = Zs + (long)Lmax * Lmax; // K
  double* lambda = diag + NR;            // K
  double* gvec = lambda + NR;            // K
  double* cvec = gvec + NR;              // K
  double* rot = cvec + NR;               // 2 (K + 2): Jacobi rotations
  double* xs = rot + 2 * (NR + 2);       // rank x K
  double* ys = xs + (long)rank * NR;     // rank x K
  double* gs = ys + (long)rank * NR;     // rank x K  (Gq y for accepted A rows)
  int* act = iws;                        // n_in: active neighbors, ascending
  int* cand = act + n_in;                // n_in: completion order (compact indices)
  int* piv = cand + n_in;                // K
  int* done = piv + NR;                  // K
  int* order = done + NR;                // K

  // Active neighbors. Every thread computes k; the leader writes the lists.
  int k = 0;
  for (int j = 0; j < n_in; ++j) k += pb.w[j] != 0.0;
  if (team.leader()) {
    int a = 0;
    for (int j = 0; j < n_in; ++j)
      if (pb.w[j] != 0.0) act[a++] = j;
    // Completion order: larger weight first, the agent itself first among equals, then index.
    for (int a2 = 0; a2 < k; ++a2) cand[a2] = a2;
    for (int s = 0; s < k; ++s) {
      int best = s;
      for (int t = s + 1; t < k; ++t) {
        const double wt = pb.w[act[cand[t]]], wb = pb.w[act[cand[best]]];
        const bool t_self = act[cand[t]] == pb.self_index, b_self = act[cand[best]] == pb.self_index;
        if (wt > wb || (wt == wb && t_self && !b_self)) best = t;
      }
      const int tmp = cand[s];
      cand[s] = cand[best];
      cand[best] = tmp;
    }
  }
  team.sync();
  const int K = k * r;
  auto gidx = [&](int x) { return act[x / r] * r + x % r; };  // compact -> global index
  auto weight = [&](int x) { return pb.w[act[x / r]]; };

  for (int e = team.rank(); e < K * K; e += team.size()) {
    const int x = e / K, y = e % K;
    Gp[e] = weight(x) * weight(y) * pb.GB[(long)gidx(x) * NR + gidx(y)];
    Gq[e] = pb.GA[(long)gidx(x) * NR + gidx(y)];
  }
  team.sync();

  const int rp = pivoted_cholesky(team, Gp, K, K * 64.0 * kEps, Rt, piv, diag, done);

  int nv = 0, zld = 1;
  const double* Z = Gp;
  if (rp > 0) {
    double* T = Gp;  // Gp is no longer needed
    team_matmul(team, Rt, K, Gq, K, T, K, rp, K, K);
    team_matmul_nt(team, T, K, Rt, K, H, rp, rp, K, rp);
    team_symmetrize(team, H, rp);
    const int L = core_sketch_width(rp, rank, pb.oversample);
    const bool randomized =
        (pb.method == kRandomized || (pb.method == kAuto && rp > kAutoExactMaxRank)) && L < rp;
    if (!randomized) {
      eigh(team, H, rp, Gp, lambda, order, rot);
      nv = rp;
      zld = rp;
    } else {
      // Randomized subspace iteration on H = Op^T M M^T Op (Halko, Martinsson & Tropp, Alg. 4.4).
      // Y and HY are rp x L (row stride L); `cols` of their columns are in use.
      for (int e = team.rank(); e < rp * L; e += team.size())
        HY[e] = counter_normal(pb.seed, (pb.stream << 32) + (uint64_t)e);
      team.sync();
      team_matmul(team, H, rp, HY, L, Y, L, rp, rp, L);
      int cols = L;
      for (int it = 0; it < pb.n_iter; ++it) {
        cols = team_orthonormalize_columns(team, Y, rp, cols, L, 1e-10);
        team_matmul(team, H, rp, Y, L, HY, L, rp, rp, cols);
        for (int e = team.rank(); e < rp * L; e += team.size()) Y[e] = HY[e];
        team.sync();
      }
      cols = team_orthonormalize_columns(team, Y, rp, cols, L, 1e-10);
      team_matmul(team, H, rp, Y, L, HY, L, rp, rp, cols);
      for (int e = team.rank(); e < cols * cols; e += team.size()) {
        const int a = e / cols, b = e % cols;
        double acc = 0.0;
        for (int t = 0; t < rp; ++t) acc += Y[t * L + a] * HY[t * L + b];
        Tsm[e] = acc;
      }
      team.sync();
      team_symmetrize(team, Tsm, cols);
      eigh(team, Tsm, cols, Zs, lambda, order, rot);
      double* Zfull = Gp;  // rp x cols Ritz vectors, columns in `order`
      team_matmul(team, Y, L, Zs, cols, Zfull, cols, rp, cols, cols);
      nv = cols;
      zld = cols;
    }
  }

  // Kept singular triplets: lambda above a relative floor (sigma / sigma_1 > ~sqrt(16 K eps)).
  int kept = 0;
  if (nv > 0 && lambda[0] > 0.0 && lambda[0] < 1e300) {
    const double floor = lambda[0] * K * 16.0 * kEps;
    while (kept < rank && kept < nv && lambda[kept] > floor) ++kept;
  }
  for (int q = team.rank(); q < kept; q += team.size()) {
    const double sigma = sqrt(lambda[q]);
    double* x = xs + (long)q * NR;
    double* y = ys + (long)q * NR;
    // Column q of Z in the rp-dimensional core, then the two coefficient vectors.
    double* zq = y;  // y is filled last; use it to hold z while solving for x
    for (int t = 0; t < rp; ++t) zq[t] = Z[t * zld + order[q]];
    double* ztmp = gs + (long)q * NR;  // gs row q is rebuilt below for the completion
    pivoted_back_substitute(Rt, piv, K, rp, zq, ztmp, x);
    for (int t = 0; t < rp; ++t) ztmp[t] = zq[t];
    for (int xi = 0; xi < K; ++xi) {
      double acc = 0.0;
      for (int t = 0; t < rp; ++t) acc += Rt[t * K + xi] * ztmp[t];
      y[xi] = acc / sigma;
    }
    // Sign: the left singular vector's entries sum to a positive number (tie: the right one's).
    double t1 = 0.0, s1 = 0.0, t2 = 0.0, s2 = 0.0;
    for (int xi = 0; xi < K; ++xi) {
      const double b = weight(xi) * pb.sB[gidx(xi)] * x[xi];
      const double a = pb.sA[gidx(xi)] * y[xi];
      t1 += b;
      s1 += fabs(b);
      t2 += a;
      s2 += fabs(a);
    }
    const bool flip = fabs(t1) > 1e-10 * s1 ? t1 < 0.0 : t2 < -1e-10 * s2;
    const double sgn = flip ? -1.0 : 1.0;
    const double fb = sgn * pow(sigma, pb.exp_b), fa = pow(sigma, pb.exp_a);
    for (int xi = 0; xi < K; ++xi) {
      y[xi] *= sgn;
      pb.coefB[(long)gidx(xi) * rank + q] = fb * weight(xi) * x[xi];
      pb.coefA[(long)gidx(xi) * rank + q] = fa * y[xi];
    }
    pb.S[q] = sigma;
  }
  team.sync();

  // Completion of the zero-sigma directions (serial: it only runs when M_i has low rank).
  if (team.leader()) {
    for (int q = 0; q < kept; ++q) {
      const double* y = ys + (long)q * NR;
      double* g = gs + (long)q * NR;
      for (int xi = 0; xi < K; ++xi) {
        double acc = 0.0;
        for (int t = 0; t < K; ++t) acc += Gq[xi * K + t] * y[t];
        g[xi] = acc;
      }
    }
    int filled = kept;
    for (int a = 0; a < k && filled < rank; ++a) {
      for (int s = 0; s < r && filled < rank; ++s) {
        const int c = cand[a] * r + s;
        const double dcc = Gq[c * K + c];
        if (!(dcc > 0.0)) continue;
        for (int xi = 0; xi < K; ++xi) cvec[xi] = xi == c ? 1.0 : 0.0;
        for (int pass = 0; pass < 2; ++pass) {
          for (int q = 0; q < filled; ++q) {
            double h = 0.0;
            for (int xi = 0; xi < K; ++xi) h += gs[(long)q * NR + xi] * cvec[xi];
            for (int xi = 0; xi < K; ++xi) cvec[xi] -= h * ys[(long)q * NR + xi];
          }
        }
        double norm2 = 0.0;
        for (int xi = 0; xi < K; ++xi) {
          double acc = 0.0;
          for (int t = 0; t < K; ++t) acc += Gq[xi * K + t] * cvec[t];
          gvec[xi] = acc;
          norm2 += cvec[xi] * acc;
        }
        if (!(norm2 > 1e-6 * dcc)) continue;
        const double inv = 1.0 / sqrt(norm2);
        for (int xi = 0; xi < K; ++xi) {
          ys[(long)filled * NR + xi] = cvec[xi] * inv;
          gs[(long)filled * NR + xi] = gvec[xi] * inv;
          pb.coefA[(long)gidx(xi) * rank + filled] = cvec[xi] * inv;
        }
        pb.S[filled] = 0.0;
        ++filled;
      }
    }
    *pb.missing = rank - filled;
  }
  team.sync();
}

// Identity completion on explicit rows: rows [rank - missing, rank) of A (rank x n, row stride n)
// are zero; each becomes the first unit vector e_t (t = 0, 1, ...) that keeps a clear component
// after Gram-Schmidt against the rows above it. Runs only where the neighbors' A factors span
// fewer than `rank` directions (e.g. all zero).
template <class T>
DECAF_HD void complete_rows_with_identity(T* A, int rank, int n, int missing) {
  for (int k = rank - missing; k < rank; ++k) {
    for (int t = 0; t < n; ++t) {
      // Residual of e_t against rows 0..k-1: e_t - sum_q (A_q[t] / |A_q|^2) A_q, twice.
      for (int j = 0; j < n; ++j) A[k * n + j] = (T)(j == t ? 1.0 : 0.0);
      for (int pass = 0; pass < 2; ++pass) {
        for (int q = 0; q < k; ++q) {
          double dot = 0.0, nn = 0.0;
          for (int j = 0; j < n; ++j) {
            dot += (double)A[q * n + j] * (double)A[k * n + j];
            nn += (double)A[q * n + j] * (double)A[q * n + j];
          }
          if (nn <= 0.0) continue;
          for (int j = 0; j < n; ++j) A[k * n + j] = (T)((double)A[k * n + j] - dot / nn * (double)A[q * n + j]);
        }
      }
      double nrm = 0.0;
      for (int j = 0; j < n; ++j) nrm += (double)A[k * n + j] * (double)A[k * n + j];
      if (nrm > 0.25) {
        const double inv = 1.0 / sqrt(nrm);
        for (int j = 0; j < n; ++j) A[k * n + j] = (T)((double)A[k * n + j] * inv);
        break;
      }
      if (t == n - 1) {
        for (int j = 0; j < n; ++j) A[k * n + j] = (T)0;
      }
    }
  }
}

}  // namespace decaf
