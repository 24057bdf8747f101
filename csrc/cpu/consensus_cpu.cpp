// CPU backend: the completion of zero directions (csrc/common/completion.h) run by one thread per
// problem, problems spread over threads with at::parallel_for (each problem is solved serially, so
// results do not depend on the thread count), and the counter-based normal generator.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/completion.h"
#include "../common/counter_normal.h"
#include "../consensus.h"
#include "cpu_backend.h"
#include "gram_svd.h"
#include "stacked_rows_cpu.h"

namespace decaf {
namespace {

void complete_rows_cpu(at::Tensor& A_new, const at::Tensor& missing, const at::Tensor& A_in, const at::Tensor& W) {
  AT_DISPATCH_FLOATING_TYPES(A_new.scalar_type(), "complete_rows_cpu", [&] {
    const CompletionView<scalar_t> v{A_new.data_ptr<scalar_t>(), missing.data_ptr<int>(),
                                     A_in.data_ptr<scalar_t>(),  W.data_ptr<double>(),
                                     missing.numel(),            W.size(0),
                                     W.size(1),                  A_in.size(1) / W.size(1),
                                     A_new.size(2),              A_new.size(3),
                                     A_in.stride(0)};
    at::parallel_for(0, v.problems, 1, [&](int64_t begin, int64_t end) {
      double scratch = 0.0;
      const SerialTeam team{&scratch};
      for (int64_t p = begin; p < end; ++p) complete_rows(team, v, p);
    });
  });
}

void fill_normal_cpu(at::Tensor& out, uint64_t seed, uint64_t first) {
  double* data = out.data_ptr<double>();
  const int64_t count = out.numel();
  at::parallel_for(0, count, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) data[e] = counter_normal(seed, first + (uint64_t)e);
  });
}

// Applies `fn` to slices of a batch of `count` small matrices in parallel (inside the parallel
// region LAPACK runs single-threaded, which is much faster than threading each small matrix) and
// concatenates its outputs along dim 0. Slices are fixed by `count` and the thread count alone.
template <class F>
std::vector<at::Tensor> map_slices(int64_t count, F fn) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (count <= 1 || threads == 1) return fn(0, count);
  const int64_t size = (count + threads - 1) / threads, slices = (count + size - 1) / size;
  std::vector<std::vector<at::Tensor>> parts(slices);
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) parts[c] = fn(c * size, std::min(count, (c + 1) * size) - c * size);
  });
  std::vector<at::Tensor> out;
  for (size_t k = 0; k < parts[0].size(); ++k) {
    std::vector<at::Tensor> pieces;
    for (const auto& part : parts) pieces.push_back(part[k]);
    out.push_back(at::cat(pieces, 0));
  }
  return out;
}

// x [..., tail] -> [count, tail] with count the product of the leading dims.
at::Tensor flat(const at::Tensor& x, int tail) {
  std::vector<int64_t> shape{-1};
  shape.insert(shape.end(), x.sizes().end() - tail, x.sizes().end());
  return x.reshape(shape);
}

// out [count, tail] -> lead dims of `like` (all but its last like_tail dims) + tail.
at::Tensor unflat(const at::Tensor& out, const at::Tensor& like, int like_tail) {
  std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end() - like_tail);
  shape.insert(shape.end(), out.sizes().begin() + 1, out.sizes().end());
  return out.reshape(shape);
}

std::tuple<at::Tensor, at::Tensor> geqrf_cpu(const at::Tensor& X) {
  const at::Tensor x = flat(X, 2);
  const auto out = map_slices(x.size(0), [&](int64_t b, int64_t len) {
    const auto [h, tau] = at::geqrf(x.narrow(0, b, len));
    return std::vector<at::Tensor>{h, tau};
  });
  return {unflat(out[0], X, 2), unflat(out[1], X, 2)};
}

at::Tensor ormqr_cpu(const at::Tensor& h, const at::Tensor& tau, const at::Tensor& C, bool left, bool transpose) {
  const at::Tensor hf = flat(h, 2), tf = flat(tau, 1), cf = flat(C, 2);
  const auto out = map_slices(hf.size(0), [&](int64_t b, int64_t len) {
    return std::vector<at::Tensor>{
        at::ormqr(hf.narrow(0, b, len), tf.narrow(0, b, len), cf.narrow(0, b, len), left, transpose)};
  });
  return unflat(out[0], C, 2);
}

std::tuple<at::Tensor, at::Tensor> qr_cpu(const at::Tensor& X) {
  const at::Tensor x = flat(X, 2);
  const auto out = map_slices(x.size(0), [&](int64_t b, int64_t len) {
    const auto [Q, R] = at::linalg_qr(x.narrow(0, b, len));
    return std::vector<at::Tensor>{Q, R};
  });
  return {unflat(out[0], X, 2), unflat(out[1], X, 2)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> svd_cpu(const at::Tensor& X) {
  const at::Tensor x = flat(X, 2);
  const auto out = map_slices(x.size(0), [&](int64_t b, int64_t len) {
    const auto [U, S, Vh] = at::linalg_svd(x.narrow(0, b, len), false);
    return std::vector<at::Tensor>{U, S, Vh};
  });
  return {unflat(out[0], X, 2), unflat(out[1], X, 2), unflat(out[2], X, 2)};
}

std::tuple<at::Tensor, at::Tensor> eigh_cpu(const at::Tensor& H) {
  const at::Tensor x = flat(H, 2);
  const auto out = map_slices(x.size(0), [&](int64_t b, int64_t len) {
    const auto [values, vectors] = at::linalg_eigh(x.narrow(0, b, len));
    return std::vector<at::Tensor>{values, vectors};
  });
  return {unflat(out[0], H, 2), unflat(out[1], H, 2)};
}

}  // namespace

const Backend kCpuBackend{.complete_rows = complete_rows_cpu,
                          .fill_normal = fill_normal_cpu,
                          .geqrf = geqrf_cpu,
                          .ormqr = ormqr_cpu,
                          .qr = qr_cpu,
                          .svd = svd_cpu,
                          .eigh = eigh_cpu,
                          .gram_svd = gram_svd_cpu,
                          .support_grams = support_grams_cpu,
                          .times_stacks = times_stacks_cpu,
                          .float64_grams = false,
                          .auto_exact_max_columns = 128,
                          .stack_chunk_bytes = 1 << 20,
                          .module_chunk_bytes = 8 << 20};

namespace {

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
