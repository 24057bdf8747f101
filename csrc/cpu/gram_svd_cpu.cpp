// The small problems of the exact Gram path on the CPU (see csrc/solve_gram.cpp), in
// float64, mostly as plain loops run per problem instead of a dozen batched ATen calls on tiny matrices:
//   per support:  scaled Cholesky R^T R = G of the Gram matrices G_B and G_A (pivot check);
//   all problems: each one's K x K matrix (core core^T or the core) by batched GEMMs;
//   per problem:  the top q singular triplets of M = Bs^T D As in coefficients on the stacks, from
//                 the top eigenpairs of core core^T (float32 inputs, csrc/cpu/top_eigenpairs.h) or
//                 LAPACK's SVD of the core (float64 inputs).
// A failed pivot check or an eigensolve that did not converge returns None: the caller then takes
// the Householder path for the whole bucket.
// Supports, then problems, are spread over threads with at::parallel_for; each one is solved
// serially, so the results do not depend on the thread count.
#include "gram_svd.h"

#include "top_eigenpairs.h"

#include <ATen/Parallel.h>
#include <ATen/native/BatchLinearAlgebra.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace decaf {
namespace {

// Upper R (row-major K x K) with R^T R = G from a Cholesky factorization of G scaled to a unit
// diagonal. False when a diagonal entry is below min_diag or a scaled pivot r_kk^2 is not above
// min_pivot.
bool scaled_cholesky(const double* G, int64_t K, double min_pivot, double min_diag, double* R, double* norms) {
  for (int64_t a = 0; a < K; ++a) {
    if (!(G[a * K + a] >= min_diag)) return false;
    norms[a] = std::sqrt(G[a * K + a]);
  }
  std::fill(R, R + K * K, 0.0);
  for (int64_t a = 0; a < K; ++a)
    for (int64_t c = a; c < K; ++c) R[a * K + c] = G[a * K + c] / (norms[a] * norms[c]);
  // Right-looking, by rows: row j of R is final once divided by its pivot; the rows below are
  // updated with it (contiguous row updates, vectorized).
  for (int64_t j = 0; j < K; ++j) {
    const double diag = R[j * K + j];
    if (!(diag > min_pivot)) return false;
    const double pivot = std::sqrt(diag);
    for (int64_t c = j; c < K; ++c) R[j * K + c] /= pivot;
    for (int64_t i = j + 1; i < K; ++i) {
      const double f = R[j * K + i];
      for (int64_t c = i; c < K; ++c) R[i * K + c] -= f * R[j * K + c];
    }
  }
  for (int64_t a = 0; a < K; ++a)
    for (int64_t c = a; c < K; ++c) R[a * K + c] *= norms[c];
  return true;
}

// x <- R^{-1} x for upper triangular R (row-major K x K) and x of q columns (row-major K x q).
void solve_upper(const double* R, int64_t K, int64_t q, double* x) {
  for (int64_t a = K - 1; a >= 0; --a)
    for (int64_t l = 0; l < q; ++l) {
      double v = x[a * q + l];
      for (int64_t c = a + 1; c < K; ++c) v -= R[a * K + c] * x[c * q + l];
      x[a * q + l] = v / R[a * K + a];
    }
}

// Per-thread workspace of one problem.
struct Workspace {
  int64_t K;
  std::vector<double> values, work, left, right, top;
  std::vector<int> iwork;
  explicit Workspace(int64_t K) : K(K), values(K), left(K * K), right(K * K), iwork(8 * K) {}

  // SVD of the square H [K, K] (column-major, destroyed): values descending, left vectors in
  // `left`'s columns, right vectors in `right`'s rows (both column-major).
  void svd(double* H) {
    int info = 0;
    if (work.empty()) {  // workspace query
      double lwork = 0.0;
      at::native::lapackSvd<double, double>('S', (int)K, (int)K, H, (int)K, values.data(), left.data(), (int)K,
                                            right.data(), (int)K, &lwork, -1, nullptr, iwork.data(), &info);
      work.resize((size_t)lwork);
    }
    at::native::lapackSvd<double, double>('S', (int)K, (int)K, H, (int)K, values.data(), left.data(), (int)K,
                                          right.data(), (int)K, work.data(), (int)work.size(), nullptr, iwork.data(),
                                          &info);
    TORCH_CHECK(info == 0, "consensus_tsvd: the SVD of a core failed (info ", info, ")");
  }
};

// One problem from its matrix H [K, K] (row-major, destroyed): H = RBD GA RBD^T when `squared`,
// else the core RBD RA^T, with RBD = RB diag(d). U, V [K, q] (row-major) and S [q]. False when the
// top eigenpair solver did not converge.
bool solve_problem(const double* RB, const double* RA, const double* d, double* H, int64_t q, bool squared,
                   Workspace& ws, double* U, double* S, double* V) {
  const int64_t K = ws.K;
  if (squared) {
    for (int64_t a = 0; a < K; ++a)  // symmetric up to rounding: make it exactly so
      for (int64_t c = 0; c < a; ++c) H[a * K + c] = H[c * K + a] = 0.5 * (H[a * K + c] + H[c * K + a]);
    if (!top_eigenpairs(H, K, q, S, U, ws.top)) return false;
    for (int64_t l = 0; l < q; ++l) S[l] = std::sqrt(std::max(S[l], 0.0));
    // V = (RB D)^T X / sigma (before X becomes U), then U = RB^{-1} X.
    for (int64_t c = 0; c < K; ++c)
      for (int64_t l = 0; l < q; ++l) {
        double v = 0.0;
        for (int64_t a = 0; a <= c; ++a) v += RB[a * K + c] * U[a * q + l];
        V[c * q + l] = S[l] > 0.0 ? d[c] * v / S[l] : 0.0;
      }
    solve_upper(RB, K, q, U);
  } else {
    // The row-major core read as column-major is core^T = V S U^T: its left vectors are V.
    ws.svd(H);
    for (int64_t l = 0; l < q; ++l) {
      S[l] = ws.values[l];
      for (int64_t a = 0; a < K; ++a) {
        V[a * q + l] = ws.left[l * K + a];
        U[a * q + l] = ws.right[a * K + l];
      }
    }
    solve_upper(RB, K, q, U);
    solve_upper(RA, K, q, V);
  }
  return true;
}

}  // namespace

std::optional<GramSvd> gram_svd_cpu(const Backend& /*backend*/, const GramProblems& problems) {
  const at::Tensor gb = problems.GB.contiguous(), ga = problems.GA.contiguous(), dc = problems.d.contiguous();
  const int64_t batch = gb.size(0), G = gb.size(1), K = gb.size(2), P = dc.size(0), q = problems.q;
  const PerProblem& per_problem = problems.per_problem;
  at::Tensor RB = at::empty({batch, G, K, K}, gb.options()), RA = at::empty_like(RB);
  std::vector<char> ok(batch * G, 0);
  at::parallel_for(0, batch * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> norms(K);
    for (int64_t x = begin; x < end; ++x)
      ok[x] = scaled_cholesky(ga.data_ptr<double>() + x * K * K, K, problems.min_pivot, problems.min_diag,
                              RA.data_ptr<double>() + x * K * K, norms.data()) &&
              scaled_cholesky(gb.data_ptr<double>() + x * K * K, K, problems.min_pivot, problems.min_diag,
                              RB.data_ptr<double>() + x * K * K, norms.data());
  });
  if (std::find(ok.begin(), ok.end(), 0) != ok.end()) return std::nullopt;
  // Each problem's K x K matrix, by batched GEMMs (BLAS; large K is where the time goes).
  const at::Tensor RBD = per_problem(RB) * dc.view({1, P, 1, K});  // [batch, P, K, K]
  at::Tensor H = problems.squared ? at::matmul(at::matmul(RBD, per_problem(ga)), RBD.transpose(-1, -2))
                                  : at::matmul(RBD, per_problem(RA).transpose(-1, -2));
  H = H.contiguous();
  GramSvd out;
  out.U = at::empty({batch, P, K, q}, gb.options());
  out.V = at::empty({batch, P, K, q}, gb.options());
  out.S = at::empty({batch, P, q}, gb.options());
  std::vector<char> solved(batch * P, 0);
  at::parallel_for(0, batch * P, 1, [&](int64_t begin, int64_t end) {
    Workspace ws(K);
    for (int64_t x = begin; x < end; ++x) {
      const int64_t b = x / P, p = x % P, sup = (b * G + problems.group[p]) * K * K;
      solved[x] = solve_problem(RB.data_ptr<double>() + sup, RA.data_ptr<double>() + sup, dc.data_ptr<double>() + p * K,
                                H.data_ptr<double>() + x * K * K, q, problems.squared, ws,
                                out.U.data_ptr<double>() + x * K * q, out.S.data_ptr<double>() + x * q,
                                out.V.data_ptr<double>() + x * K * q);
    }
  });
  if (std::find(solved.begin(), solved.end(), 0) != solved.end()) return std::nullopt;
  return out;
}

}  // namespace decaf
