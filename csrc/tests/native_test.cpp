// Native (no Python) checks against float64 dense references:
//  - the registered operator (CPU backend, LAPACK eigensolver) through the dispatcher;
//  - the same pipeline with the GPU's Jacobi eigensolver (cpu_jacobi_backend), so the shared
//    per-agent core the CUDA kernel runs is checked on the CPU end to end;
//  - jacobi_eigh itself against at::linalg_eigh.
// Prints "N passed, N failed".
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

#include "../common/small_linalg.h"
#include "../consensus.h"

namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Outputs call_op(const at::Tensor& A, const at::Tensor& B, const at::Tensor& W, int64_t rank, const std::string& method) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("decaf_ext::consensus_tsvd", "")
                       .typed<Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                      c10::string_view, c10::string_view, int64_t, int64_t, int64_t)>();
  return op.call(A, B, W, rank, method, "balanced", 10, 2, 0);
}

Outputs call_jacobi(const at::Tensor& A, const at::Tensor& B, const at::Tensor& W, int64_t rank,
                    const std::string& method) {
  return decaf::consensus_tsvd_impl(A, B, W, rank, method, "balanced", 10, 2, 0, decaf::cpu_jacobi_backend());
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

template <class Call>
void compare_with_dense(const char* backend, Call call, int64_t n_agents, int64_t r, int64_t m, int64_t n,
                        int64_t rank, at::ScalarType dtype, const std::string& method, double tol,
                        int shared = 0) {
  at::manual_seed(n_agents * 100 + r);
  at::Tensor A = at::randn({2, n_agents, r, n}, at::kDouble);
  at::Tensor B = at::randn({2, n_agents, m, r}, at::kDouble);
  // shared = 1: duplicated neighbors (M_i = B_0 A_0); 2: agents near consensus (decaying spectrum).
  if (shared > 0) {
    const double spread = shared == 1 ? 0.0 : 1e-3;
    A = A.narrow(1, 0, 1).expand({2, n_agents, r, n}) + spread * A;
    B = B.narrow(1, 0, 1).expand({2, n_agents, m, r}) + spread * B;
  }
  const at::Tensor W = ring(n_agents);
  const Outputs out = call(A.to(dtype), B.to(dtype), W.to(dtype), rank, method);
  const auto& [A_new, B_new, S] = out;
  const at::Tensor M = at::einsum("ij,bjmr,bjrn->bimn", {W, B, A});
  auto [U, Sr, Vh] = at::linalg_svd(M, false);
  const at::Tensor S_ref = Sr.narrow(-1, 0, rank);
  const at::Tensor best = at::matmul(U.narrow(-1, 0, rank) * S_ref.unsqueeze(-2), Vh.narrow(-2, 0, rank));
  const at::Tensor P = at::matmul(B_new.to(at::kDouble), A_new.to(at::kDouble));
  const double s_err = ((S.to(at::kDouble) - S_ref).abs().max() / Sr.max()).item<double>();
  const double p_err = ((P - best).norm() / best.norm()).item<double>();
  const bool finite = at::isfinite(A_new).all().item<bool>() && at::isfinite(B_new).all().item<bool>();
  char name[200];
  std::snprintf(name, sizeof(name), "%s %s N=%lld r=%lld m=%lld n=%lld rank=%lld %s%s (S err %.2e, product err %.2e)",
                backend, method.c_str(), (long long)n_agents, (long long)r, (long long)m, (long long)n,
                (long long)rank, c10::toString(dtype), shared == 1 ? " duplicated" : shared == 2 ? " near consensus" : "",
                s_err, p_err);
  check(finite && s_err <= tol && p_err <= 10 * tol, name);
}

template <class Call>
void zero_products(const char* backend, Call call) {
  at::manual_seed(1);
  const at::Tensor A = at::randn({1, 3, 2, 9}, at::kFloat);
  const Outputs out = call(A, at::zeros({1, 3, 7, 2}, at::kFloat), ring(3).to(at::kFloat), 2, "exact");
  const auto& [A_new, B_new, S] = out;
  check(S.abs().max().item<float>() == 0.0f && B_new.abs().max().item<float>() == 0.0f,
        std::string(backend) + " zero products give S = 0 and B = 0");
  check((A_new.norm(2, -1) - 1.0).abs().max().item<float>() < 1e-5f,
        std::string(backend) + " zero products keep unit-norm A rows");
}

void jacobi_matches_lapack(int n, int rank_deficit) {
  at::manual_seed(n);
  at::Tensor X = at::randn({n, std::max(1, n - rank_deficit)}, at::kDouble);
  at::Tensor H = at::matmul(X, X.t()).contiguous();
  auto [values, vectors] = at::linalg_eigh(H);
  std::vector<double> h(H.data_ptr<double>(), H.data_ptr<double>() + n * n), v(n * n), lambda(n),
      rot(2 * (n + 2));
  std::vector<int> order(n);
  double scratch = 0.0;
  decaf::jacobi_eigh(decaf::SerialTeam{&scratch}, h.data(), n, v.data(), lambda.data(), order.data(), rot.data());
  const at::Tensor V = at::from_blob(v.data(), {n, n}, at::kDouble).clone();
  const at::Tensor order_t = at::from_blob(order.data(), {n}, at::kInt).to(at::kLong);
  const at::Tensor Vs = V.index_select(1, order_t);
  const at::Tensor L = at::from_blob(lambda.data(), {n}, at::kDouble).clone();
  const double scale = values.abs().max().item<double>();
  const double val_err = (L - values.flip(0)).abs().max().item<double>() / scale;
  const double res = (at::matmul(H, Vs) - Vs * L.unsqueeze(0)).abs().max().item<double>() / scale;
  const double orth = (at::matmul(Vs.t(), Vs) - at::eye(n, at::kDouble)).abs().max().item<double>();
  char name[160];
  std::snprintf(name, sizeof(name), "jacobi_eigh n=%d rank deficit %d (eigenvalue err %.1e, residual %.1e, orth %.1e)",
                n, rank_deficit, val_err, res, orth);
  check(val_err < 1e-13 && res < 1e-13 && orth < 1e-13, name);
}

}  // namespace

int main() {
  for (int n : {1, 2, 5, 24, 33, 64}) jacobi_matches_lapack(n, 0);
  jacobi_matches_lapack(20, 7);
  for (const char* backend : {"op", "jacobi"}) {
    auto call = [&](const at::Tensor& A, const at::Tensor& B, const at::Tensor& W, int64_t rank,
                    const std::string& method) {
      return std::string(backend) == "op" ? call_op(A, B, W, rank, method) : call_jacobi(A, B, W, rank, method);
    };
    compare_with_dense(backend, call, 4, 3, 20, 17, 3, at::kDouble, "exact", 1e-10);
    compare_with_dense(backend, call, 6, 8, 40, 64, 8, at::kFloat, "exact", 1e-5);
    compare_with_dense(backend, call, 8, 2, 33, 21, 4, at::kDouble, "auto", 1e-10);
    compare_with_dense(backend, call, 16, 8, 200, 160, 8, at::kDouble, "exact", 1e-10);
    compare_with_dense(backend, call, 5, 4, 30, 30, 12, at::kDouble, "randomized", 1e-9);  // rank(M_i) = 12
    compare_with_dense(backend, call, 5, 4, 30, 30, 6, at::kDouble, "exact", 1e-10, 1);
    compare_with_dense(backend, call, 16, 8, 60, 50, 8, at::kDouble, "randomized", 1e-9, 2);  // sketch 18 < 24
    zero_products(backend, call);
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
