// The coefficients of the split factors from a core's SVD, shared by the solvers (csrc/solve.h).
#include "solve.h"

#include <algorithm>
#include <cmath>

#include "tensor_helpers.h"

namespace decaf {

double zero_tolerance(int64_t m, int64_t n, int64_t K, at::ScalarType compute) {
  return 16.0 * std::sqrt((double)std::max({m, n, K})) * eps_of(compute);
}

Coefficients split_coefficients(const at::Tensor& U, const at::Tensor& Sv, const at::Tensor& V,
                                const at::Tensor& sB, const at::Tensor& sA, const Options& o, double tol_rel) {
  const int64_t q = std::min<int64_t>(Sv.size(-1), o.rank);
  const at::Tensor u = U.narrow(-1, 0, q), s = Sv.narrow(-1, 0, q), v = V.narrow(-1, 0, q);
  const at::Tensor keep = s > s.narrow(-1, 0, 1) * tol_rel;
  // Sign rule: the left vector's entries sum to a positive number (negligible sum: the right one's).
  const at::Tensor cu = sB.unsqueeze(-1) * u, cv = sA.unsqueeze(-1) * v;
  const at::Tensor t1 = cu.sum(-2), t2 = cv.sum(-2);
  const at::Tensor flip = at::where(t1.abs() > cu.abs().sum(-2) * 1e-10, t1 < 0, t2 < cv.abs().sum(-2) * -1e-10);
  const at::Tensor sgn = 1.0 - 2.0 * flip.to(at::kDouble);
  const at::Tensor zero = at::zeros({}, s.options());
  Coefficients c;
  c.B = u * at::where(keep, sgn * s.pow(o.exp_b), zero).unsqueeze(-2);
  c.A = v * at::where(keep, sgn * s.pow(o.exp_a), zero).unsqueeze(-2);
  c.S = at::where(keep, s, zero);
  if (q < o.rank) {
    c.B = at::constant_pad_nd(c.B, {0, o.rank - q});
    c.A = at::constant_pad_nd(c.A, {0, o.rank - q});
    c.S = at::constant_pad_nd(c.S, {0, o.rank - q});
  }
  c.missing = (o.rank - keep.sum(-1)).to(at::kInt);
  return c;
}

}  // namespace decaf
