// Completion of the directions of M_i with a zero singular value, for one (batch entry, receiving
// agent) at a time, written once against a Team (team.h): one CPU thread per problem, one CUDA
// thread block per problem, or (native test) several std::threads sharing a barrier.
//
// Rows [rank - missing, rank) of A_new are zero on entry. Each becomes, in turn, the first
// candidate row that keeps a clear component after Gram-Schmidt (twice) against the rows above it,
// normalized to unit length:
//   1. the rows of the neighbors' own A factors: the agent itself first (where its weight is
//      positive), then by decreasing weight W[i, j], then by index (a residual above 1e-3 of the
//      row's norm), so that with B = 0 everywhere each agent keeps a basis of its own A's rows;
//   2. the unit vectors e_0, e_1, ... (a residual above 1/2).
// A row for which nothing qualifies stays zero (only when n < rank, which the op rejects).
#pragma once

#include <math.h>
#include <stdint.h>

#include "team.h"

namespace decaf {

// Raw view of a whole call; problem p = batch_index * n_out + agent.
template <class T>
struct CompletionView {
  T* A_new;          // [problems, rank, n] output rows (completed in place)
  const int* missing;  // [problems] how many trailing rows of each problem to complete
  const T* A_in;     // [batch, n_in * r, n] the senders' A rows (agent j's row s at j * r + s), batch stride a_in_batch
  const double* W;   // [n_out, n_in]
  int64_t problems, n_out, n_in, r, rank, n, a_in_batch;
};

// True when agent a precedes agent b among the candidates of a row with weights w.
DECAF_HD inline bool candidate_before(const double* w, int self, int a, int b) {
  if ((a == self) != (b == self)) return a == self;
  if (w[a] != w[b]) return w[a] > w[b];
  return a < b;
}

// The candidate agent after `prev` (-1: the first), or -1 when none is left. Agents with zero
// weight are not neighbors.
DECAF_HD inline int next_candidate(const double* w, int n_in, int self, int prev) {
  int best = -1;
  for (int j = 0; j < n_in; ++j) {
    if (!(w[j] > 0.0) || (prev >= 0 && !candidate_before(w, self, prev, j))) continue;
    if (best < 0 || candidate_before(w, self, j, best)) best = j;
  }
  return best;
}

// Writes `src` (or the unit vector e_unit when src is null) into rows[filled], orthogonalizes it
// against rows[0 .. filled) twice, and keeps it (normalized) when its squared norm stays above
// keep_rel times the original; otherwise zeroes it. Returns whether it was kept.
template <class Team, class T>
DECAF_HD bool append_orthogonal_row(const Team& team, T* rows, int filled, int n, const T* src, int e_unit,
                                    double keep_rel) {
  T* x = rows + (int64_t)filled * n;
  double norm0 = 0.0;
  for (int e = team.rank(); e < n; e += team.size()) {
    const double v = src ? (double)src[e] : (e == e_unit ? 1.0 : 0.0);
    x[e] = (T)v;
    norm0 += (double)x[e] * (double)x[e];
  }
  norm0 = team_sum(team, norm0);
  if (!(norm0 > 0.0)) return false;  // x is zero already
  for (int pass = 0; pass < 2; ++pass) {
    for (int q = 0; q < filled; ++q) {
      const T* y = rows + (int64_t)q * n;
      double dot = 0.0, nn = 0.0;
      for (int e = team.rank(); e < n; e += team.size()) {
        dot += (double)y[e] * (double)x[e];
        nn += (double)y[e] * (double)y[e];
      }
      dot = team_sum(team, dot);
      nn = team_sum(team, nn);
      if (!(nn > 0.0)) continue;
      const double f = dot / nn;
      for (int e = team.rank(); e < n; e += team.size()) x[e] = (T)((double)x[e] - f * (double)y[e]);
    }
  }
  double norm = 0.0;
  for (int e = team.rank(); e < n; e += team.size()) norm += (double)x[e] * (double)x[e];
  norm = team_sum(team, norm);
  const bool keep = norm > keep_rel * norm0;
  const double scale = keep ? 1.0 / sqrt(norm) : 0.0;
  for (int e = team.rank(); e < n; e += team.size()) x[e] = (T)((double)x[e] * scale);
  team.sync();
  return keep;
}

template <class Team, class T>
DECAF_HD void complete_rows(const Team& team, const CompletionView<T>& v, int64_t p) {
  const int missing = v.missing[p];
  if (missing <= 0) return;
  const int64_t b = p / v.n_out, i = p % v.n_out;
  const int n_in = (int)v.n_in, r = (int)v.r, rank = (int)v.rank, n = (int)v.n;
  const double* w = v.W + i * v.n_in;
  const int self = v.n_out == v.n_in ? (int)i : -1;
  T* rows = v.A_new + p * rank * (int64_t)n;
  const T* cand = v.A_in + b * v.a_in_batch;
  int filled = rank - missing;
  for (int j = next_candidate(w, n_in, self, -1); j >= 0 && filled < rank; j = next_candidate(w, n_in, self, j))
    for (int s = 0; s < r && filled < rank; ++s)
      filled += append_orthogonal_row(team, rows, filled, n, cand + ((int64_t)j * r + s) * n, -1, 1e-6);
  for (int t = 0; t < n && filled < rank; ++t) filled += append_orthogonal_row(team, rows, filled, n, (const T*)nullptr, t, 0.25);
}

}  // namespace decaf
