// Exact: Householder QR of each support's stacked factors, Bs^T = Q_B R_B and As^T = Q_A R_A
// (compute dtype, backward stable), so M = Q_B (R_B D R_A^T) Q_A^T; the SVD of the small core in
// float64; the split factors written back through the Householder reflectors.
#include "solve.h"

#include <algorithm>

#include "slots.h"

namespace decaf {

Solved solve_exact(const at::Tensor& Bs, const at::Tensor& As, const at::Tensor& d, const Bucket& bk,
                   const Options& o, const Backend& backend) {
  const int64_t batch = Bs.size(0), K = Bs.size(2), m = Bs.size(3), n = As.size(3), P = d.size(0);
  const int64_t Kb = std::min(m, K), Ka = std::min(n, K);
  const auto [hB, tauB] = backend.geqrf(Bs.transpose(-1, -2));  // [batch, G, m, K]
  const auto [hA, tauA] = backend.geqrf(As.transpose(-1, -2));  // [batch, G, n, K]
  const at::Tensor RB = per_problem(hB.narrow(-2, 0, Kb).triu().to(at::kDouble), bk);  // [batch, P, Kb, K]
  const at::Tensor RA = per_problem(hA.narrow(-2, 0, Ka).triu().to(at::kDouble), bk);  // [batch, P, Ka, K]
  const at::Tensor core = at::matmul(RB * d.view({1, P, 1, K}), RA.transpose(-1, -2));  // [batch, P, Kb, Ka]
  at::Tensor U, Sv, V;
  if (Bs.scalar_type() == at::kFloat) {
    // float32 inputs: the top eigenpairs of core core^T in float64 (several times cheaper than an
    // SVD); the squared conditioning costs sigma errors up to ~sqrt(K eps64) sigma_1 ~ 1e-7 sigma_1,
    // below the float32 QR's own error.
    const auto [lam, Z] = backend.eigh(at::matmul(core, core.transpose(-1, -2)));  // ascending
    const int64_t q = std::min(o.rank, Kb);
    U = Z.narrow(-1, Kb - q, q).flip(-1);
    Sv = lam.narrow(-1, Kb - q, q).flip(-1).clamp_min(0).sqrt();
    const at::Tensor inv = at::where(Sv > 0, 1.0 / Sv, at::zeros({}, Sv.options()));
    V = at::matmul(core.transpose(-1, -2), U) * inv.unsqueeze(-2);
  } else {
    const auto [Uf, Sf, Vh] = backend.svd(core);
    U = Uf;
    Sv = Sf;
    V = Vh.transpose(-1, -2);
  }
  // Coordinates of the all-ones vector in the orthonormal bases (sign rule).
  const auto ones = [&](int64_t rows) { return at::ones({batch, bk.supports, rows, 1}, Bs.options()); };
  const at::Tensor sB = per_problem(backend.ormqr(hB, tauB, ones(m), true, true).narrow(-2, 0, Kb).squeeze(-1), bk);
  const at::Tensor sA = per_problem(backend.ormqr(hA, tauA, ones(n), true, true).narrow(-2, 0, Ka).squeeze(-1), bk);
  const Coefficients c = split_coefficients(U, Sv, V, sB.to(at::kDouble), sA.to(at::kDouble), o,
                                            zero_tolerance(m, n, K, Bs.scalar_type()));
  const at::Tensor ct_B = per_support_rhs(c.B.to(Bs.scalar_type()), bk, m);
  const at::Tensor ct_A = per_support_rhs(c.A.to(Bs.scalar_type()), bk, n);
  Solved out;
  out.B_new = per_problem_result(backend.ormqr(hB, tauB, ct_B, true, false), bk, o.rank);  // [batch, P, m, rank]
  out.A_new = per_problem_result(backend.ormqr(hA, tauA, ct_A, true, false), bk, o.rank).transpose(-1, -2);
  out.S = c.S;
  out.missing = c.missing;
  return out;
}

}  // namespace decaf
