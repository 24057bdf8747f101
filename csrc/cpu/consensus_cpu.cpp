// CPU backend: the completion of zero directions (csrc/common/completion.h) run by one thread per
// problem, problems spread over threads with at::parallel_for (each problem is solved serially, so
// results do not depend on the thread count), and the counter-based normal generator.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/completion.h"
#include "../common/counter_normal.h"
#include "../consensus.h"

namespace decaf {
namespace {

void complete_rows_cpu(at::Tensor& A_new, const at::Tensor& missing, const at::Tensor& A_in, const at::Tensor& W) {
  AT_DISPATCH_FLOATING_TYPES(A_new.scalar_type(), "complete_rows_cpu", [&] {
    const CompletionView<scalar_t> v{A_new.data_ptr<scalar_t>(), missing.data_ptr<int>(),
                                     A_in.data_ptr<scalar_t>(),  W.data_ptr<double>(),
                                     missing.numel(),            W.size(0),
                                     W.size(1),                  A_in.size(1) / W.size(1),
                                     A_new.size(2),              A_new.size(3)};
    at::parallel_for(0, v.problems, 1, [&](int64_t begin, int64_t end) {
      double scratch = 0.0;
      const SerialTeam team{&scratch};
      for (int64_t p = begin; p < end; ++p) complete_rows(team, v, p);
    });
  });
}

void fill_normal_cpu(at::Tensor& out, uint64_t seed) {
  double* data = out.data_ptr<double>();
  const int64_t count = out.numel();
  at::parallel_for(0, count, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) data[e] = counter_normal(seed, (uint64_t)e);
  });
}

const Backend kCpuBackend{complete_rows_cpu, fill_normal_cpu};

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

TORCH_LIBRARY_IMPL(decaf_ext, CPU, m) {
  m.impl("consensus_tsvd", &consensus_tsvd_cpu);
  m.impl("weighted_product_sum", &weighted_product_sum_impl);
  m.impl("tsvd", &tsvd_cpu);
}

}  // namespace decaf
