// Host-side orchestration of the decaf_ext ops, shared by the CPU and CUDA registrations.
// Each device supplies a Backend (the kernels that differ per device); everything else is ATen.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "common/consensus_core.h"

namespace decaf {

// Everything the per-agent core solver needs for a whole call (float64 unless noted, one device).
struct CoreBatch {
  at::Tensor GB, GA;         // [batch, NR, NR] Gram matrices of B columns / A rows, NR = N_in * r
  at::Tensor sB, sA;         // [batch, NR] column sums of B, row sums of A
  at::Tensor W;              // [N_out, N_in]
  at::Tensor coefB, coefA;   // [batch, N_out, NR, rank] outputs, zero-initialized
  at::Tensor S;              // [batch, N_out, rank] output
  at::Tensor missing;        // int32 [batch, N_out] output: A rows left for identity completion
  int64_t r = 0, rank = 0;
  int method = 0, oversample = 0, n_iter = 0;
  double exp_b = 0.5, exp_a = 0.5;
  uint64_t seed = 0;
};

// Raw view of a CoreBatch's tensors for the per-problem solvers.
CoreBatchView view_of(CoreBatch& batch);

struct Backend {
  // Runs solve_consensus_core for every (batch entry, receiving agent).
  void (*solve_cores)(CoreBatch& batch);
  // Identity completion of rows flagged in `missing` ([batch, N_out]) of A_new
  // ([batch, N_out, rank, n], contiguous, float or double), in place.
  void (*complete_identity)(at::Tensor& A_new, const at::Tensor& missing);
  // Fills a contiguous float64 tensor with counter_normal(seed, linear index).
  void (*fill_normal)(at::Tensor& out, uint64_t seed);
};

// The CPU backend with the GPU's Jacobi eigensolver instead of LAPACK (for the native tests).
const Backend& cpu_jacobi_backend();

std::tuple<at::Tensor, at::Tensor, at::Tensor> consensus_tsvd_impl(
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& W, int64_t rank,
    const std::string& method, const std::string& split, int64_t oversample, int64_t n_iter,
    int64_t seed, const Backend& backend);

at::Tensor weighted_product_sum_impl(const at::Tensor& A, const at::Tensor& B, const at::Tensor& W);

std::tuple<at::Tensor, at::Tensor, at::Tensor> tsvd_impl(const at::Tensor& M, int64_t rank,
                                                         int64_t oversample, int64_t n_iter,
                                                         int64_t seed, const Backend& backend);

}  // namespace decaf
