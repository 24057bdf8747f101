// Exact, from Gram matrices: G_B = Bs Bs^T and G_A = As As^T per support in the compute
// dtype, Cholesky R_B^T R_B = G_B and R_A^T R_A = G_A, so that P = Bs^T = U_P R_B with
// U_P = P R_B^{-1} orthonormal (likewise Q = As^T = U_Q R_A) and M = U_P (R_B D R_A^T) U_Q^T.
// float64: SVD of the core R_B D R_A^T. float32: eigenpairs of H = R_B D G_A D R_B^T = core core^T
// (squared conditioning, as in solve_exact), V from M^T U / sigma. These small problems run in
// backend.gram_svd (CPU: as above; CUDA: a jittered Cholesky factorization of float64 Grams and
// batched small eigensolves, csrc/cuda/gram_svd_batched.cpp). The split factors are P and Q times small
// coefficient matrices: one pass over the stacks for the Grams, one for the write-back. None when
// backend.gram_svd declines (a Gram not safely positive definite on the CPU): solve_exact then runs
// instead.
#include "solve.h"

#include <algorithm>
#include <limits>

#include "slots.h"
#include "stacks.h"
#include "tensor_helpers.h"

namespace decaf {
namespace {

// The smallest Gram diagonal entry (a sum of squares formed in `products`) trusted to full precision:
// min_normal / eps^2, so that terms lost to underflow (each below min_normal) cost less than
// len eps^2 of it. Smaller column norms (float32: below about 1e-12) take the Householder path.
double min_gram_diagonal(at::ScalarType products) {
  const double min_normal =
      products == at::kDouble ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
  return min_normal / (eps_of(products) * eps_of(products));
}

}  // namespace

std::optional<Solved> solve_gram(const at::Tensor& Bt, const at::Tensor& Af, const at::Tensor& d, const Bucket& bk,
                                 const Options& o, const Backend& backend, const Solved* dest) {
  const int64_t K = d.size(1), m = Bt.size(2), n = Af.size(2);
  const at::ScalarType ct = Bt.scalar_type(), products = backend.float64_grams ? at::kDouble : ct;
  const auto gram_of = [&](const at::Tensor& X) { return support_grams(X.to(products), bk, backend); };
  const GramProblems problems{.GB = gram_of(Bt),
                              .GA = gram_of(Af),
                              .d = d,
                              .group = bk.group,
                              .per_problem = [&](const at::Tensor& x) { return per_problem(x, bk); },
                              .q = std::min(o.rank, K),
                              .squared = ct == at::kFloat,
                              .min_pivot = (double)K * eps_of(ct),
                              .min_diag = min_gram_diagonal(products)};
  const std::optional<GramSvd> svd = backend.gram_svd(backend, problems);
  if (!svd) return std::nullopt;
  // Column sums of P and Q: the sums of the singular vectors' entries are sB^T U and sA^T V.
  const at::Tensor sB = per_problem(support_rows(Bt.sum(-1, true), bk).squeeze(-1).to(at::kDouble), bk);
  const at::Tensor sA = per_problem(support_rows(Af.sum(-1, true), bk).squeeze(-1).to(at::kDouble), bk);
  const Coefficients c = split_coefficients(svd->U, svd->S, svd->V, sB, sA, o, zero_tolerance(m, n, K, ct));
  Solved out;
  // Coefficient rows times the stacks: B's as columns [batch, G, m, slots rank], A's as rows
  // [batch, G, slots rank, n] (with `dest`, [batch, G, ...] is [batch, P, ...]).
  const at::Tensor BP = times_stacks(per_support_rows(c.B.to(ct), bk), Bt, bk, /*columns=*/true, backend,
                                     dest != nullptr ? dest->B_new : at::Tensor());
  const at::Tensor AQ = times_stacks(per_support_rows(c.A.to(ct), bk), Af, bk, /*columns=*/false, backend,
                                     dest != nullptr ? dest->A_new : at::Tensor());
  out.B_new = per_problem_rows(BP, bk, o.rank, /*columns=*/true);   // [batch, P, m, rank]
  out.A_new = per_problem_rows(AQ, bk, o.rank, /*columns=*/false);  // [batch, P, rank, n]
  out.S = c.S;
  out.missing = c.missing;
  return out;
}

}  // namespace decaf
