// CPU backend: the shared per-agent core (csrc/common) run by one thread per problem, problems
// spread over threads with at::parallel_for. Deterministic: each problem is solved serially.
// The small symmetric eigenproblems go to LAPACK (torch.linalg.eigh), several times faster than
// the Jacobi solver the GPU uses; that solver is checked on the CPU by the native test program.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common/consensus_core.h"
#include "../consensus.h"

namespace decaf {
namespace {

// LAPACK eigensolver with jacobi_eigh's contract: lambda descending, eigenvector k in column
// order[k] of V (row-major n x n).
struct LapackEigh {
  void operator()(const SerialTeam&, double* H, int n, double* V, double* lambda, int* order, double*) const {
    if (n == 0) return;
    const auto opts = at::TensorOptions().dtype(at::kDouble);
    auto [values, vectors] = at::linalg_eigh(at::from_blob(H, {n, n}, opts));  // ascending
    at::from_blob(V, {n, n}, opts).copy_(vectors.flip(1));
    at::from_blob(lambda, {n}, opts).copy_(values.flip(0));
    for (int k = 0; k < n; ++k) order[k] = k;
  }
};

template <class Eigh>
void solve_cores_cpu(CoreBatch& cb, const Eigh& eigh) {
  const CoreBatchView v = view_of(cb);
  const long n_ws = core_workspace_doubles((int)v.n_in, (int)v.r, (int)v.rank, v.oversample);
  const long n_iws = core_workspace_ints((int)v.n_in, (int)v.r);
  at::parallel_for(0, v.problems, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> ws(n_ws);
    std::vector<int> iws(n_iws);
    double scratch = 0.0;
    const SerialTeam team{&scratch};
    for (int64_t p = begin; p < end; ++p) solve_consensus_core(team, core_problem(v, p), ws.data(), iws.data(), eigh);
  });
}

void complete_identity_cpu(at::Tensor& A_new, const at::Tensor& missing) {
  const at::Tensor flags = missing.reshape({-1});
  const int* miss = flags.data_ptr<int>();
  const int64_t count = flags.numel(), rank = A_new.size(2), n = A_new.size(3);
  AT_DISPATCH_FLOATING_TYPES(A_new.scalar_type(), "complete_identity_cpu", [&] {
    scalar_t* base = A_new.data_ptr<scalar_t>();
    for (int64_t p = 0; p < count; ++p)
      if (miss[p] > 0) complete_rows_with_identity(base + p * rank * n, (int)rank, (int)n, miss[p]);
  });
}

void fill_normal_cpu(at::Tensor& out, uint64_t seed) {
  double* data = out.data_ptr<double>();
  const int64_t count = out.numel();
  at::parallel_for(0, count, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) data[e] = counter_normal(seed, (uint64_t)e);
  });
}

const Backend kCpuBackend{[](CoreBatch& cb) { solve_cores_cpu(cb, LapackEigh{}); }, complete_identity_cpu,
                          fill_normal_cpu};
const Backend kCpuJacobiBackend{[](CoreBatch& cb) { solve_cores_cpu(cb, JacobiEigh{}); }, complete_identity_cpu,
                                fill_normal_cpu};

std::tuple<at::Tensor, at::Tensor, at::Tensor> consensus_tsvd_cpu(
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& W, int64_t rank,
    c10::string_view method, c10::string_view split, int64_t oversample, int64_t n_iter, int64_t seed) {
  return consensus_tsvd_impl(A, B, W, rank, std::string(method), std::string(split), oversample, n_iter, seed,
                             kCpuBackend);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tsvd_cpu(const at::Tensor& M, int64_t rank, int64_t oversample,
                                                        int64_t n_iter, int64_t seed) {
  return tsvd_impl(M, rank, oversample, n_iter, seed, kCpuBackend);
}

}  // namespace

const Backend& cpu_jacobi_backend() { return kCpuJacobiBackend; }

TORCH_LIBRARY_IMPL(decaf_ext, CPU, m) {
  m.impl("consensus_tsvd", &consensus_tsvd_cpu);
  m.impl("weighted_product_sum", &weighted_product_sum_impl);
  m.impl("tsvd", &tsvd_cpu);
}

}  // namespace decaf
