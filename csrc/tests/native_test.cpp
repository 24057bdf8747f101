// Native (no Python) checks of the registered operator (CPU backend, through the dispatcher)
// against float64 dense references, on rings and complete graphs (k*r up to 256), duplicated
// neighbors, agents near consensus (exact and randomized) and zero products; calls run in chunks of
// modules against whole calls; and the CPU's top eigenpair solver against at::linalg_eigh on spectra
// from spread out to repeated; the float32 cases again with the CUDA backend's batched Gram path run
// on the CPU, and its fused path (also planned as for W on a GPU; float32 and bfloat16). Prints "N passed,
// N failed".
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../cpu/cpu_backend.h"
#include "cuda_path_on_cpu.h"
#include "top_eigenpairs_cases.h"

namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Set: calls run consensus_tsvd_impl with this backend instead of the registered operator, and the
// checks' names start with its label.
const decaf::Backend* swapped_backend = nullptr;
std::string swapped_label;

Outputs call_op(const at::Tensor& A, const at::Tensor& B, const at::Tensor& W, int64_t rank, const std::string& method) {
  if (swapped_backend != nullptr)
    return decaf::consensus_tsvd_impl(A, B, W, rank, method, "balanced", 10, 2, 0, *swapped_backend);
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

at::Tensor complete(int64_t n) { return at::full({n, n}, 1.0 / n, at::kDouble); }

// Every agent but the opposite one (i + n/2): dense enough that the plan (csrc/plan.cpp) factors one
// support of all agents for large m + n, so that each row's core has r zero-weight columns, as every
// row's core has with W on a GPU.
at::Tensor all_but_opposite(int64_t n) {
  at::Tensor W = at::full({n, n}, 1.0 / (n - 1), at::kDouble);
  for (int64_t i = 0; i < n; ++i) W[i][(i + n / 2) % n] = 0.0;
  return W;
}

enum class Graph { kRing, kComplete, kAllButOpposite };

int passed = 0, failed = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
  (ok ? passed : failed)++;
}

void compare_with_dense(Graph graph, int64_t n_agents, int64_t r, int64_t m, int64_t n, int64_t rank,
                        at::ScalarType dtype, const std::string& method, double tol, int shared = 0) {
  at::manual_seed(n_agents * 100 + r);
  at::Tensor A = at::randn({2, n_agents, r, n}, at::kDouble);
  at::Tensor B = at::randn({2, n_agents, m, r}, at::kDouble);
  if (dtype == at::kBFloat16) {  // the reference of the factors as the op receives them
    A = A.to(dtype).to(at::kDouble);
    B = B.to(dtype).to(at::kDouble);
  }
  // shared = 1: duplicated neighbors (M_i = B_0 A_0); 2: agents near consensus (decaying spectrum);
  // 3: closer still (differences of 1e-6, a few float32 ulps of the factors' scale above rounding).
  if (shared > 0) {
    const double spread = shared == 1 ? 0.0 : shared == 2 ? 1e-3 : 1e-6;
    A = A.narrow(1, 0, 1).expand({2, n_agents, r, n}) + spread * A;
    B = B.narrow(1, 0, 1).expand({2, n_agents, m, r}) + spread * B;
  }
  const at::Tensor W = graph == Graph::kRing       ? ring(n_agents)
                       : graph == Graph::kComplete ? complete(n_agents)
                                                   : all_but_opposite(n_agents);
  const Outputs out = call_op(A.to(dtype), B.to(dtype), W.to(dtype), rank, method);
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
  const char* sharing = shared == 1   ? " duplicated"
                        : shared == 2 ? " near consensus"
                        : shared == 3 ? " nearer consensus"
                                      : "";
  std::snprintf(name, sizeof(name), "%s%s %s N=%lld r=%lld m=%lld n=%lld rank=%lld %s%s (S err %.2e, product err %.2e)",
                swapped_label.c_str(),
                graph == Graph::kRing ? "ring" : graph == Graph::kComplete ? "complete" : "all but the opposite", method.c_str(),
                (long long)n_agents, (long long)r, (long long)m, (long long)n, (long long)rank, c10::toString(dtype),
                sharing, s_err, p_err);
  check(finite && s_err <= tol && p_err <= 10 * tol, name);
}

void zero_products() {
  at::manual_seed(1);
  const at::Tensor A = at::randn({1, 3, 2, 9}, at::kFloat);
  const Outputs out = call_op(A, at::zeros({1, 3, 7, 2}, at::kFloat), ring(3).to(at::kFloat), 2, "exact");
  const auto& [A_new, B_new, S] = out;
  check(S.abs().max().item<float>() == 0.0f && B_new.abs().max().item<float>() == 0.0f,
        swapped_label + "zero products give S = 0 and B = 0");
  check((A_new.norm(2, -1) - 1.0).abs().max().item<float>() < 1e-5f,
        swapped_label + "zero products keep unit-norm A rows");
}

// Results do not depend on Backend::module_chunk_bytes: the CPU backend on whole calls against one
// module per chunk (the split factors written into the outputs in place, or copied there; the
// randomized test matrices continued across chunks).
void chunks_match_whole_calls() {
  decaf::Backend chunked = decaf::kCpuBackend;
  chunked.module_chunk_bytes = 1;
  at::Tensor repeated_rows = ring(6), mixed_degrees = ring(6), zero_row = ring(6);
  repeated_rows[1] = repeated_rows[0];                                  // problems not the rows in order
  mixed_degrees[0] = 0.0;                                               // supports of 1 and 3 agents: two buckets
  mixed_degrees[0][0] = 1.0;
  zero_row[2] = 0.0;                                                    // a row without a support
  // Rows 0..2 on agents {0, 1, 2} and rows 3..5 on {3, 4, 5}, weights differing: one bucket of two
  // supports of three problems each, the rows in order.
  at::Tensor shared_supports = at::zeros({6, 6}, at::kDouble);
  for (int64_t i = 0; i < 6; ++i)
    for (int64_t j = i / 3 * 3; j < i / 3 * 3 + 3; ++j) shared_supports[i][j] = 1.0 + 0.1 * (double)((i + 2 * j) % 5);
  const struct {
    const char* name;
    at::Tensor W;
    at::ScalarType dtype;
    const char* method;
  } cases[] = {{"ring float32 exact", ring(6), at::kFloat, "exact"},
               {"complete float64 exact", complete(6), at::kDouble, "exact"},
               {"ring float64 randomized", ring(6), at::kDouble, "randomized"},
               {"repeated rows float32 exact", repeated_rows, at::kFloat, "exact"},
               {"two buckets float32 exact", mixed_degrees, at::kFloat, "exact"},
               {"zero row float64 exact", zero_row, at::kDouble, "exact"},
               {"shared supports float32 exact", shared_supports, at::kFloat, "exact"}};
  for (const auto& c : cases) {
    at::manual_seed(5);
    const at::Tensor A = at::randn({5, 6, 4, 30}, c.dtype), B = at::randn({5, 6, 40, 4}, c.dtype);
    const Outputs whole = decaf::consensus_tsvd_impl(A, B, c.W.to(c.dtype), 3, c.method, "balanced", 4, 2, 0,
                                                     decaf::kCpuBackend);
    const Outputs parts = decaf::consensus_tsvd_impl(A, B, c.W.to(c.dtype), 3, c.method, "balanced", 4, 2, 0, chunked);
    // Exact: bitwise. Randomized: batched QRs and products of other batch sizes round differently.
    const double tol = std::string(c.method) == "randomized" ? 1e-12 : 0.0;
    double diff = 0.0;
    for (const auto& [x, y] : {std::pair{std::get<0>(whole), std::get<0>(parts)}, std::pair{std::get<1>(whole), std::get<1>(parts)},
                               std::pair{std::get<2>(whole), std::get<2>(parts)}})
      diff = std::max(diff, ((x - y).abs().max() / x.abs().max()).item<double>());
    char name[120];
    std::snprintf(name, sizeof(name), "one module per chunk equals the whole call: %s (diff %.1e)", c.name, diff);
    check(diff <= tol, name);
  }
}

}  // namespace

int main() {
  decaf::top_eigenpairs_cases(check);
  for (Graph graph : {Graph::kRing, Graph::kComplete}) {
    compare_with_dense(graph, 4, 3, 20, 17, 3, at::kDouble, "exact", 1e-10);
    compare_with_dense(graph, 6, 8, 40, 64, 8, at::kFloat, "exact", 1e-5);
    compare_with_dense(graph, 8, 2, 33, 21, 4, at::kDouble, "auto", 1e-10);
    compare_with_dense(graph, 16, 8, 200, 160, 8, at::kDouble, "exact", 1e-10);   // complete: k*r = 128
    compare_with_dense(graph, 32, 8, 300, 280, 8, at::kFloat, "exact", 1e-5);     // complete: k*r = 256
    compare_with_dense(graph, 5, 4, 30, 30, 12, at::kDouble, "randomized", 1e-9);  // rank(M_i) <= 12 + 8
    compare_with_dense(graph, 5, 4, 30, 30, 6, at::kDouble, "exact", 1e-10, 1);
    compare_with_dense(graph, 16, 8, 60, 50, 8, at::kDouble, "randomized", 1e-9, 2);
    compare_with_dense(graph, 8, 4, 60, 50, 4, at::kDouble, "exact", 1e-10, 2);
    compare_with_dense(graph, 8, 4, 60, 50, 4, at::kFloat, "exact", 1e-5, 2);
    compare_with_dense(graph, 8, 4, 60, 50, 4, at::kFloat, "exact", 1e-5, 3);
  }
  zero_products();
  chunks_match_whole_calls();
  // The CUDA backend's paths on the CPU: its batched Gram path (csrc/cuda/gram_svd_batched.cpp, eigh by
  // common/small_eigh.h; the fused path switched off) and its fused path (csrc/solve_fused.cpp,
  // common/gram_core.h), the latter also planned as for W on a GPU (every row on every agent): float32
  // cases, sparse and dense buckets, duplicated neighbors, agents near consensus, zero products.
  decaf::Backend batched_backend = decaf::cuda_path_on_cpu(), fused_backend = decaf::cuda_path_on_cpu();
  batched_backend.stack_chunk_bytes = 1;  // one module per chunk: the chunked gathers and their concatenation
  batched_backend.fused = nullptr;
  decaf::Backend device_plan_backend = fused_backend;
  device_plan_backend.plan_as_device = true;
  const std::pair<const decaf::Backend*, const char*> paths[] = {{&batched_backend, "[batched Gram path] "},
                                                                 {&fused_backend, "[fused path] "},
                                                                 {&device_plan_backend, "[fused path, W as on a GPU] "}};
  for (const auto& [backend, label] : paths) {
    swapped_backend = backend;
    swapped_label = label;
    for (Graph graph : {Graph::kRing, Graph::kComplete}) {
      compare_with_dense(graph, 6, 8, 40, 64, 8, at::kFloat, "exact", 1e-5);
      compare_with_dense(graph, 16, 8, 200, 160, 8, at::kFloat, "exact", 1e-5);  // complete: k*r = 128
      compare_with_dense(graph, 32, 8, 300, 280, 8, at::kFloat, "exact", 1e-5);  // complete: k*r = 256
      compare_with_dense(graph, 5, 4, 30, 30, 6, at::kFloat, "exact", 1e-5, 1);
      compare_with_dense(graph, 8, 4, 60, 50, 4, at::kFloat, "exact", 1e-5, 2);
      compare_with_dense(graph, 16, 4, 60, 50, 6, at::kFloat, "exact", 1e-5, 1);    // complete: k*r = 64
      compare_with_dense(graph, 16, 8, 200, 160, 8, at::kFloat, "exact", 1e-5, 2);  // complete: k*r = 128
      compare_with_dense(graph, 8, 4, 60, 50, 4, at::kFloat, "exact", 1e-5, 3);
      compare_with_dense(graph, 16, 8, 200, 160, 8, at::kFloat, "exact", 1e-5, 3);
      compare_with_dense(graph, 4, 3, 20, 17, 3, at::kDouble, "exact", 1e-10);  // declined: Householder
      if (backend != &batched_backend) compare_with_dense(graph, 8, 8, 64, 48, 8, at::kBFloat16, "exact", 1e-2);
    }
    zero_products();
  }
  swapped_backend = &batched_backend;
  swapped_label = "[batched Gram path] ";
  // Cores with a null space (r zero-weight columns of 64): Jacobi's sweeps, which converge only linearly
  // on a cluster such as a null space left inexact by rounding, run after its deflation.
  decaf::small_eigh_most_sweeps = 0;
  compare_with_dense(Graph::kAllButOpposite, 8, 8, 400, 400, 8, at::kFloat, "exact", 1e-5);
  check(decaf::small_eigh_most_sweeps <= 12,
        "[batched Gram path] cores with 8 zero-weight columns of 64 converge within 12 Jacobi sweeps (" +
            std::to_string(decaf::small_eigh_most_sweeps) + ")");
  // The fused path's block Krylov (k*r = 128 and 256 on every agent) converges well within its cycle limit.
  swapped_backend = &device_plan_backend;
  swapped_label = "[fused path, W as on a GPU] ";
  decaf::fused_most_cycles = 0;
  compare_with_dense(Graph::kComplete, 16, 8, 300, 280, 8, at::kFloat, "exact", 1e-5, 2);
  compare_with_dense(Graph::kRing, 32, 8, 300, 280, 8, at::kFloat, "exact", 1e-5);
  check(decaf::fused_most_cycles > 0 && decaf::fused_most_cycles < decaf::kKrylovCycles,
        "[fused path, W as on a GPU] block Krylov converged within " + std::to_string(decaf::fused_most_cycles) +
            " cycles (limit " + std::to_string(decaf::kKrylovCycles) + ")");
  // rank 32 above k*r = 64 (block Krylov with two blocks of 32 converged to product errors of 0.1 to 0.2
  // within its cycle limit; from rank 12 up it stopped above its tolerance): such calls leave the fused path.
  compare_with_dense(Graph::kComplete, 32, 8, 300, 280, 32, at::kFloat, "exact", 1e-5);
  compare_with_dense(Graph::kComplete, 32, 8, 300, 280, 16, at::kFloat, "exact", 1e-5);
  swapped_backend = nullptr;
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
