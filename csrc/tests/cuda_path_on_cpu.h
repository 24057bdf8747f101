// The CUDA backend's configuration with CPU kernels: its batched Gram path (csrc/cuda/gram_svd_batched.cpp),
// its Jacobi eigh (common/small_eigh.h, a one-thread team per matrix) and ATen's Grams and write-back,
// shared by the native test (results against float64 references) and decaf_launch_count (ATen ops
// per call, which on a GPU are kernel launches).
#pragma once

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "../common/small_eigh.h"
#include "../consensus.h"
#include "../cpu/cpu_backend.h"
#include "../cuda/gram_svd_batched.h"
#include "fused_on_cpu.h"

namespace decaf {

// The most Jacobi sweeps of a matrix solved by small_eigh_serial since the caller last reset it.
inline int small_eigh_most_sweeps = 0;

// The CUDA backend's eigh on the CPU: common/small_eigh.h per float64 matrix up to kSmallEighMax
// (one-thread team), ATen otherwise.
inline std::tuple<at::Tensor, at::Tensor> small_eigh_serial(const at::Tensor& H) {
  const int64_t n = H.size(-1);
  if (H.scalar_type() != at::kDouble || n > kSmallEighMax || n == 0) return at::linalg_eigh(H);
  RECORD_FUNCTION("decaf::small_eigh", std::vector<c10::IValue>({H}));  // one kernel on the GPU
  const at::Tensor h = H.contiguous();
  const int64_t count = h.numel() / (n * n);
  at::Tensor values = at::empty(h.sizes().slice(0, h.dim() - 1), h.options()), vectors = at::empty_like(h);
  std::vector<double> work(small_eigh_workspace((int)n));
  double scratch = 0.0;
  const SerialTeam team{&scratch};
  for (int64_t p = 0; p < count; ++p)
    small_eigh_most_sweeps =
        std::max(small_eigh_most_sweeps, small_eigh(team, h.data_ptr<double>() + p * n * n, (int)n, work.data(),
                                                     values.data_ptr<double>() + p * n, vectors.data_ptr<double>() + p * n * n));
  return {values, vectors};
}

// kCpuBackend with the CUDA backend's fused path, small-problem path, Grams, write-back and chunk sizes.
inline Backend cuda_path_on_cpu() {
  Backend backend = kCpuBackend;
  backend.gram_svd = gram_svd_batched;
  backend.support_grams = nullptr;
  backend.times_stacks = nullptr;
  backend.float64_grams = true;
  backend.eigh = small_eigh_serial;
  backend.stack_chunk_bytes = int64_t{256} << 20;
  backend.module_chunk_bytes = std::numeric_limits<int64_t>::max();
  backend.auto_exact_max_columns = kMaxStackedColumns;
  backend.fused = &kFusedOnCpu;
  return backend;
}

}  // namespace decaf
