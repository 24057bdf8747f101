// The small problems of the exact Gram path (see csrc/solve_gram.cpp) as batched ATen calls and the
// backend's batched eigh (CUDA: a Jacobi kernel up to 64 x 64, common/small_eigh.h), none of which
// reads a value on the host, for devices where the per-problem loops of csrc/cpu/gram_svd_cpu.cpp do
// not fit (CUDA). Plain C++ on ATen, so that the CMake build also runs it on the CPU
// (csrc/tests/cuda_path_on_cpu.h). Grams G = P^T P (P = Bs^T or As^T) arrive in float64,
// formed from float64 copies of the factors (Backend::float64_grams), so that zero and repeated
// columns give Grams singular to float64 rounding.
//   per support:  G = (R diag(s))^T (R diag(s)): s the column norms, R^T R the Cholesky factorization
//                 of the unit-diagonal scaled Gram plus a jitter (kJitter K eps64) I, always positive
//                 definite, so P = U R diag(s) with U = P diag(1/s) R^{-1} orthonormal on P's range
//                 (zero columns: s = 0, left out);
//   per problem:  M = P D Q^T = U_B C U_A^T with the K x K core C = R_B diag(s_B d s_A) R_A^T; its top q
//                 singular triplets from the eigenpairs of C C^T (one batched eigh, K <= kDirectMax) or
//                 by subspace iteration on C with kSubspaceColumns columns (larger K: batched
//                 eigensolvers of larger matrices loop over the batch), then Rayleigh-Ritz on the
//                 kSubspaceColumns-dimensional subspace; coefficients on the stacks
//                 U = diag(1/s_B) R_B^{-1} Y, V = diag(1/s_A) R_A^{-1} X.
// The jitter perturbs singular values by about sqrt(kJitter K eps64) ~ 1e-7 of the support's scale:
// directions of repeated or zero columns come out as (near-)zero singular values, which the caller
// drops and completes. Float32 inputs only (the squared conditioning of C C^T costs about half of
// float64's digits, below the float32 products' own error); float64 inputs return None and take the
// Householder path.
#include "gram_svd_batched.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "../common/small_eigh.h"

namespace decaf {
namespace {

constexpr double kJitter = 4.0;
// The CUDA backend's batched eigh is one kernel up to kSmallEighMax x kSmallEighMax (common/small_eigh.h);
// ATen's loops over the batch above 32 x 32.
constexpr int64_t kDirectMax = kSmallEighMax;
constexpr int64_t kSubspaceColumns = 32;
constexpr int kSubspaceIterations = 32;

// 1/x where x > 0, else 0.
at::Tensor reciprocal_or_zero(const at::Tensor& x) { return at::where(x > 0, 1.0 / at::where(x > 0, x, 1.0), 0.0); }

// (R, s, 1/s) of the Gram matrices G [batch, G, K, K]: upper R [batch, G, K, K] with R^T R = the
// unit-diagonal scaled G + jitter, the column norms s [batch, G, K] and 1/s (0 for zero columns).
std::tuple<at::Tensor, at::Tensor, at::Tensor> scaled_cholesky(const at::Tensor& G) {
  const int64_t K = G.size(-1);
  const at::Tensor s = G.diagonal(0, -2, -1).clamp_min(0).sqrt();
  const at::Tensor inv = reciprocal_or_zero(s);
  const double jitter = kJitter * (double)K * std::numeric_limits<double>::epsilon();
  at::Tensor Gs = G * inv.unsqueeze(-1) * inv.unsqueeze(-2);
  Gs.diagonal(0, -2, -1).add_(jitter);  // + jitter I, without an identity matrix and two more launches
  const at::Tensor L = std::get<0>(at::linalg_cholesky_ex(Gs));
  return {L.transpose(-1, -2), s, inv};
}

// Orthonormal columns spanning X [..., K, L] (columns numerically dependent on the others come out
// zero): X E diag(lam^{-1/2}) from the eigenpairs of X^T X, twice (the second pass restores
// orthogonality lost to the squared conditioning of the first).
at::Tensor orthonormal(const Backend& backend, at::Tensor X) {
  for (int pass = 0; pass < 2; ++pass) {
    const auto [lam, E] = backend.eigh(at::matmul(X.transpose(-1, -2), X));
    const at::Tensor top = lam.narrow(-1, lam.size(-1) - 1, 1).clamp_min(0);
    const at::Tensor keep = lam > top * (1e3 * (double)X.size(-2) * std::numeric_limits<double>::epsilon());
    const at::Tensor scale = at::where(keep, at::where(keep, lam, 1.0).rsqrt(), 0.0);
    X = at::matmul(X, E * scale.unsqueeze(-2));
  }
  return X;
}

// Columns spanning about the same space as X [..., K, L], scaled to about unit norm: X R^{-1} with R^T R
// the Cholesky factorization of X^T X plus a small jitter (one batched Cholesky and one triangular
// solve, no host read; columns dependent on the others come out as bounded noise, which the next
// product with the core filters out like a fresh start column).
at::Tensor cholesky_orthonormal(const at::Tensor& X) {
  at::Tensor H = at::matmul(X.transpose(-1, -2), X);
  const at::Tensor diagonal = H.diagonal(0, -2, -1);
  diagonal.add_(1e-12 * diagonal.mean(-1, true).clamp_min(1e-300));  // + jitter I (mean diagonal scale)
  const at::Tensor Lc = std::get<0>(at::linalg_cholesky_ex(H));
  return at::linalg_solve_triangular(Lc.transpose(-1, -2), X, /*upper=*/true, /*left=*/false);
}

// Deterministic, well spread start columns [K, L] (no random state, no host-to-device copy).
at::Tensor start_columns(int64_t K, int64_t L, const at::TensorOptions& options) {
  const at::Tensor i = at::arange(1, K + 1, options).unsqueeze(1), j = at::arange(1, L + 1, options).unsqueeze(0);
  return at::sin(i * j * 0.7548776662466927 + j * 0.5698402909980532 + i * 0.3819660112501051);
}

// Top q singular triplets (Y [.., K, q], sigma [.., q], X [.., K, q]) of C [.., K, K].
std::tuple<at::Tensor, at::Tensor, at::Tensor> top_triplets(const Backend& backend, const at::Tensor& C, int64_t q) {
  const int64_t K = C.size(-1);
  at::Tensor Y, lam;
  if (K <= kDirectMax) {
    const auto [values, vectors] = backend.eigh(at::matmul(C, C.transpose(-1, -2)));  // ascending
    Y = vectors.narrow(-1, K - q, q).flip(-1);
    lam = values.narrow(-1, K - q, q).flip(-1);
  } else {
    // Subspace iteration on C C^T from C^T-side columns (Cholesky orthonormalization: no host read),
    // then Rayleigh-Ritz on an eigh-orthonormalized final basis.
    const int64_t L = std::min(K, std::max(kSubspaceColumns, 2 * q));
    at::Tensor X = orthonormal(backend, at::matmul(C.transpose(-1, -2), start_columns(K, L, C.options())));
    at::Tensor Z;
    for (int it = 0; it < kSubspaceIterations; ++it) {
      Z = cholesky_orthonormal(at::matmul(C, X));
      X = cholesky_orthonormal(at::matmul(C.transpose(-1, -2), Z));
    }
    Z = orthonormal(backend, at::matmul(C, X));
    const at::Tensor T = at::matmul(Z.transpose(-1, -2), C);  // [.., L, K]: C ~= Z T on the subspace
    const auto [values, vectors] = backend.eigh(at::matmul(T, T.transpose(-1, -2)));
    Y = at::matmul(Z, vectors.narrow(-1, L - q, q).flip(-1));
    lam = values.narrow(-1, L - q, q).flip(-1);
  }
  const at::Tensor sigma = lam.clamp_min(0).sqrt();
  return {Y, sigma, at::matmul(C.transpose(-1, -2), Y) * reciprocal_or_zero(sigma).unsqueeze(-2)};
}

}  // namespace

std::optional<GramSvd> gram_svd_batched(const Backend& backend, const GramProblems& problems) {
  if (!problems.squared) return std::nullopt;
  const PerProblem& per_problem = problems.per_problem;
  const int64_t K = problems.GB.size(-1), P = problems.d.size(0);
  const auto [RB, sB, invB] = scaled_cholesky(problems.GB);
  const auto [RA, sA, invA] = scaled_cholesky(problems.GA);
  const at::Tensor RBp = per_problem(RB), RAp = per_problem(RA);
  const at::Tensor weights = per_problem(sB) * problems.d.view({1, P, K}) * per_problem(sA);  // [batch, P, K]
  const at::Tensor C = at::matmul(RBp * weights.unsqueeze(-2), RAp.transpose(-1, -2));
  auto [Y, sigma, X] = top_triplets(backend, C, problems.q);
  GramSvd out;
  out.U = at::linalg_solve_triangular(RBp, Y, /*upper=*/true) * per_problem(invB).unsqueeze(-1);
  out.V = at::linalg_solve_triangular(RAp, X, /*upper=*/true) * per_problem(invA).unsqueeze(-1);
  out.S = sigma;
  return out;
}

}  // namespace decaf
