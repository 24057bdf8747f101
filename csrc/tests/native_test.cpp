// Native (no Python) check of the registered operators against a float64 dense reference:
// M_i = sum_j W_ij B_j A_j formed explicitly, then at::linalg_svd. Prints "N passed, N failed".
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>
#include <tuple>

namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Outputs call_consensus(const at::Tensor& A, const at::Tensor& B, const at::Tensor& W, int64_t rank,
                       const std::string& method) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("decaf_ext::consensus_tsvd", "")
                       .typed<Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                      c10::string_view, c10::string_view, int64_t, int64_t, int64_t)>();
  return op.call(A, B, W, rank, method, "balanced", 10, 2, 0);
}

at::Tensor ring(int64_t n) {
  at::Tensor W = at::zeros({n, n}, at::kDouble);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = -1; d <= 1; ++d) W[i][(i + d + n) % n] = 1.0 / 3.0;
  return W;
}

int passed = 0, failed = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
  (ok ? passed : failed)++;
}

void compare_with_dense(int64_t n_agents, int64_t r, int64_t m, int64_t n, int64_t rank, at::ScalarType dtype,
                        const std::string& method, double tol) {
  at::manual_seed(n_agents * 100 + r);
  const at::Tensor A = at::randn({2, n_agents, r, n}, at::kDouble);
  const at::Tensor B = at::randn({2, n_agents, m, r}, at::kDouble);
  const at::Tensor W = ring(n_agents);
  auto [A_new, B_new, S] = call_consensus(A.to(dtype), B.to(dtype), W.to(dtype), rank, method);
  // Dense reference.
  const at::Tensor M = at::einsum("ij,bjmr,bjrn->bimn", {W, B, A});
  auto [U, Sr, Vh] = at::linalg_svd(M, false);
  const at::Tensor S_ref = Sr.narrow(-1, 0, rank);
  const at::Tensor best = at::matmul(U.narrow(-1, 0, rank) * S_ref.unsqueeze(-2), Vh.narrow(-2, 0, rank));
  const at::Tensor P = at::matmul(B_new.to(at::kDouble), A_new.to(at::kDouble));
  const double s_err = ((S.to(at::kDouble) - S_ref).abs().max() / Sr.max()).item<double>();
  const double p_err = ((P - best).norm() / best.norm()).item<double>();
  const std::string name = method + " N=" + std::to_string(n_agents) + " r=" + std::to_string(r) +
                           " m=" + std::to_string(m) + " n=" + std::to_string(n) + " rank=" + std::to_string(rank) +
                           " " + std::string(c10::toString(dtype));
  char detail[96];
  std::snprintf(detail, sizeof(detail), " (S err %.2e, product err %.2e)", s_err, p_err);
  check(s_err <= tol && p_err <= 10 * tol, name + detail);
}

}  // namespace

int main() {
  compare_with_dense(4, 3, 20, 17, 3, at::kDouble, "exact", 1e-10);
  compare_with_dense(6, 8, 40, 64, 8, at::kFloat, "exact", 1e-5);
  compare_with_dense(8, 2, 33, 21, 4, at::kDouble, "auto", 1e-10);
  compare_with_dense(5, 4, 30, 30, 12, at::kDouble, "randomized", 1e-9);  // rank(M_i) = 12: exact
  // Zero products (LoRA's B = 0 start): finite, zero S, unit-norm A rows.
  at::manual_seed(1);
  const at::Tensor A = at::randn({1, 3, 2, 9}, at::kFloat);
  auto [A_new, B_new, S] = call_consensus(A, at::zeros({1, 3, 7, 2}, at::kFloat), ring(3).to(at::kFloat), 2, "exact");
  check(S.abs().max().item<float>() == 0.0f && B_new.abs().max().item<float>() == 0.0f, "zero products give S = 0");
  check((A_new.norm(2, -1) - 1.0).abs().max().item<float>() < 1e-5f, "zero products keep unit-norm A rows");
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
