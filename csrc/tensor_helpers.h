// Small tensor helpers of the host-side code: the compute dtype and its epsilon, copies to the
// factors' device without a host synchronization, index tensors.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace decaf {

inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline double eps_of(at::ScalarType compute) {
  return compute == at::kDouble ? 2.220446049250313e-16 : 1.1920928955078125e-07;
}

// t on `device`: a host tensor goes through pinned memory as an asynchronous copy (no host
// synchronization; the caching host allocator keeps the pinned block until the copy has run).
inline at::Tensor on_device(const at::Tensor& t, const at::Device& device) {
  if (t.device() == device) return t;
  return (t.is_cpu() && device.is_cuda() ? t.pin_memory() : t).to(device, /*non_blocking=*/true);
}

// x [rows, N] -> [rows, N * r], each column repeated r times (a copy of an expanded view:
// repeat_interleave may read its output size on the host).
inline at::Tensor repeat_columns(const at::Tensor& x, int64_t r) {
  return x.unsqueeze(-1).expand({x.size(0), x.size(1), r}).reshape({x.size(0), x.size(1) * r});
}

inline at::Tensor index_tensor(const std::vector<int64_t>& v, const at::Device& device) {
  return on_device(at::tensor(v, at::TensorOptions().dtype(at::kLong)), device);
}

}  // namespace decaf
