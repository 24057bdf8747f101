// Randomized: range finder with power iterations on the factored M_i = Bs^T D As (Halko,
// Martinsson & Tropp, Alg. 4.4), never forming M_i: Y = M Omega (m x L) -> Q_Y, then
// X = M^T Q_Y = Q_X R_X so that Q_Y^T M = R_X^T Q_X^T; SVD of the L x L core R_X^T in float64.
#include "solve.h"

#include <algorithm>

#include "slots.h"

namespace decaf {

Solved solve_randomized(const at::Tensor& Bs, const at::Tensor& As, const at::Tensor& d, const Bucket& bk,
                        const Options& o, const Backend& backend) {
  const int64_t batch = Bs.size(0), K = Bs.size(2), m = Bs.size(3), n = As.size(3), P = d.size(0);
  const int64_t L = std::min({o.rank + o.oversample, K, m, n});
  const at::Tensor Bp = per_problem(Bs, bk), Ap = per_problem(As, bk);  // [batch, P, K, m|n]
  const at::Tensor dw = d.to(Bs.scalar_type()).view({1, P, K, 1});
  const auto apply = [&](const at::Tensor& X) { return at::matmul(Bp.transpose(-1, -2), dw * at::matmul(Ap, X)); };
  const auto apply_t = [&](const at::Tensor& Y) { return at::matmul(Ap.transpose(-1, -2), dw * at::matmul(Bp, Y)); };
  const auto orth = [&](const at::Tensor& X) { return std::get<0>(backend.qr(X)); };
  at::Tensor omega = at::empty({batch, 1, n, L}, Bs.options().dtype(at::kDouble));
  backend.fill_normal(omega, o.seed, (uint64_t)(o.first_module * n * L));
  at::Tensor Y = apply(omega.to(Bs.scalar_type()));  // [batch, P, m, L]
  for (int64_t it = 0; it < o.n_iter; ++it) Y = apply(orth(apply_t(orth(Y))));
  const at::Tensor QY = orth(Y);
  const auto [QX, RX] = backend.qr(apply_t(QY));  // [batch, P, n, L], [batch, P, L, L]
  const auto [U, Sv, Vh] = backend.svd(RX.transpose(-1, -2).to(at::kDouble));
  const Coefficients c = split_coefficients(U, Sv, Vh.transpose(-1, -2), QY.sum(-2).to(at::kDouble),
                                            QX.sum(-2).to(at::kDouble), o, zero_tolerance(m, n, K, Bs.scalar_type()));
  Solved out;
  out.B_new = at::matmul(QY, c.B.to(Bs.scalar_type()));                          // [batch, P, m, rank]
  out.A_new = at::matmul(QX, c.A.to(Bs.scalar_type())).transpose(-1, -2);        // [batch, P, rank, n]
  out.S = c.S;
  out.missing = c.missing;
  return out;
}

}  // namespace decaf
