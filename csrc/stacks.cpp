// The products that read a bucket's stacked factor rows (csrc/stacks.h): whichever takes fewer
// multiply-adds of the backend's in-place kernels, GEMMs on the stacks gathered per chunk of modules,
// and GEMMs on all N_in r rows.
#include "stacks.h"

#include <algorithm>
#include <vector>

#include "tensor_helpers.h"

namespace decaf {
namespace {

// f(Xs, begin, len) for the stacked rows Xs [len, G, K, c] of each support (support_rows) of
// X [batch, N_in r, c], over chunks of modules of at most backend.stack_chunk_bytes of stacks; the
// results are concatenated along dim 0.
template <class F>
at::Tensor over_stacks(const at::Tensor& X, const Bucket& bk, const Backend& backend, F f) {
  const int64_t batch = X.size(0), module_bytes = (int64_t)bk.cols.size() * X.size(2) * X.element_size();
  const int64_t chunk = bk.all ? batch : std::max<int64_t>(1, backend.stack_chunk_bytes / module_bytes);
  std::vector<at::Tensor> parts;
  for (int64_t b = 0; b < batch; b += chunk) {
    const int64_t len = std::min(chunk, batch - b);
    parts.push_back(f(support_rows(X.narrow(0, b, len), bk), b, len));
  }
  return parts.size() == 1 ? parts[0] : at::cat(parts, 0);
}

// A gathered element of a stack (support_rows) costs about as much as this many multiply-adds of the
// float32 GEMMs around it (measured on the CPU preset, bench/RESULTS.md).
constexpr int64_t kGatherCost = 16;

}  // namespace

at::Tensor support_rows(const at::Tensor& x, const Bucket& bk) {
  if (bk.all) return x.unsqueeze(1);
  const int64_t batch = x.size(0), NR = x.size(1), K = (int64_t)bk.cols.size() / bk.supports;
  // Whole rows of the flattened [batch N_in r, c] (ATen's row-copy path; selecting along dim 1 is
  // several times slower).
  const at::Tensor cols = index_tensor(bk.cols, x.device());
  const at::Tensor rows = (at::arange(batch, cols.options()).unsqueeze(1) * NR + cols.unsqueeze(0)).view({-1});
  return x.reshape({batch * NR, x.size(2)}).index_select(0, rows).view({batch, bk.supports, K, x.size(2)});
}

// By whichever computes fewer dot products: blocks of the all-pairs Gram (NR^2, plus gathering the
// blocks), or one Gram per support. Per support, the backend's kernel reads the rows in place and
// computes the upper triangle, about G K (K + 1) / 2 (CPU); without a kernel, one GEMM per gathered
// stack costs G K (K + kGatherCost) (CUDA).
at::Tensor support_grams(const at::Tensor& X, const Bucket& bk, const Backend& backend) {
  const int64_t NR = X.size(1), G = bk.supports, K = (int64_t)bk.cols.size() / G;
  if (!bk.all && backend.support_grams != nullptr && G * K * (K + 1) / 2 <= NR * NR)
    return backend.support_grams(X, bk.cols, G);
  if (bk.all || NR * NR > G * K * (K + kGatherCost))
    return over_stacks(X, bk, backend, [](const at::Tensor& Xs, int64_t, int64_t) {
      return at::matmul(Xs, Xs.transpose(-1, -2)).to(at::kDouble);
    });
  std::vector<int64_t> at_pair;  // [G, K, K] entries of the all-pairs Gram
  for (int64_t g = 0; g < G; ++g)
    for (int64_t a = 0; a < K; ++a)
      for (int64_t b = 0; b < K; ++b) at_pair.push_back(bk.cols[g * K + a] * NR + bk.cols[g * K + b]);
  const at::Tensor all = at::matmul(X, X.transpose(-1, -2)).view({X.size(0), NR * NR});
  const at::Tensor pairs = index_tensor(at_pair, X.device()).unsqueeze(0).expand({X.size(0), G * K * K});
  return at::gather(all, 1, pairs).to(at::kDouble).view({X.size(0), G, K, K});
}

// A sparse bucket goes to the backend's kernel where it has one (CPU). Otherwise, through coefficient
// rows scattered over all N_in r rows (one GEMM, no gather) when those extra multiply-adds cost less
// than gathering the stacks (dense graphs, few agents); that GEMM's G R output columns are wide, so for
// `columns` it is computed as X^T times the coefficients, leaving B's columns in B's own layout.
at::Tensor times_stacks(const at::Tensor& coef_rows, const at::Tensor& X, const Bucket& bk, bool columns,
                        const Backend& backend, const at::Tensor& out) {
  if (!bk.all && backend.times_stacks != nullptr) return backend.times_stacks(coef_rows, X, bk.cols, columns, out);
  const int64_t batch = X.size(0), NR = X.size(1), c = X.size(2);
  const int64_t G = bk.supports, R = coef_rows.size(2), K = coef_rows.size(3);
  const auto oriented = [columns](const at::Tensor& rows) { return columns ? rows.transpose(-1, -2) : rows; };
  if (bk.all) return oriented(at::matmul(coef_rows, X.unsqueeze(1)));
  if (R * NR <= R * K + K * kGatherCost) {
    const at::Tensor cols = index_tensor(bk.cols, X.device()).view({1, G, 1, K}).expand_as(coef_rows);
    const at::Tensor full = at::zeros({batch, G, R, NR}, coef_rows.options()).scatter_(-1, cols, coef_rows);
    if (columns) return at::matmul(X.transpose(1, 2), full.view({batch, G * R, NR}).transpose(1, 2))
                            .view({batch, c, G, R}).transpose(1, 2);
    return at::matmul(full.view({batch, G * R, NR}), X).view({batch, G, R, c});
  }
  return oriented(over_stacks(X, bk, backend, [&](const at::Tensor& Xs, int64_t b, int64_t len) {
    return at::matmul(coef_rows.narrow(0, b, len), Xs);
  }));
}

}  // namespace decaf
