// The CUDA backend's fused kernels (csrc/cuda/fused_cuda.cu) with CPU loops: the same per-element and
// per-team code (common/fused_io.h, common/gram_core.h) run by one-thread teams, each launch recorded as
// one kernel for decaf_launch_count. Used by cuda_path_on_cpu().
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <vector>

#include "../fused_views.h"

namespace decaf {

// The most Krylov cycles of a problem run by fused_core_serial since the caller last reset it.
inline int fused_most_cycles = 0;

inline bool fused_fits_cpu(int64_t) { return true; }

inline void fused_stage_serial(const at::Tensor& A, const at::Tensor& B, at::Tensor& XA, at::Tensor& XB) {
  RECORD_FUNCTION("decaf::fused_stage", std::vector<c10::IValue>({A, B}));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "fused_stage", [&] {
    const StageView<scalar_t> v = stage_view<scalar_t>(A, B, XA, XB);
    for (int64_t e = 0; e < v.count(); ++e) stage_element(v, e);
  });
}

inline void fused_core_serial(const FusedCore& call) {
  RECORD_FUNCTION("decaf::fused_core", std::vector<c10::IValue>({call.GB, call.GA}));
  const int64_t items = call.GB.size(0) * call.problems;
  std::vector<double> work(core_workspace_of(call));
  std::vector<double> eig_work(small_eigh_workspace((int)std::min<int64_t>(call.kmax, kSmallEighMax)));
  double scratch = 0.0;
  const SerialTeam team{&scratch};
  const CoreView v = core_view(call, work.data());
  for (int64_t item = 0; item < items; ++item)
    fused_most_cycles = std::max(fused_most_cycles, gram_core(team, v, item, work.data(), eig_work.data()));
}

inline void fused_finish_serial(at::Tensor& A64, const at::Tensor& BT, const at::Tensor& S, const at::Tensor& missing,
                                const at::Tensor& A_in, const at::Tensor& W, at::Tensor& A_out, at::Tensor& B_out,
                                at::Tensor& S_out) {
  RECORD_FUNCTION("decaf::fused_finish", std::vector<c10::IValue>({A64, BT}));
  double scratch = 0.0;
  const SerialTeam team{&scratch};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A_out.scalar_type(), "fused_finish", [&] {
    const FinishView<scalar_t> v = finish_view<scalar_t>(A64, BT, S, missing, A_in, W, A_out, B_out, S_out);
    for (int64_t p = 0; p < missing.numel(); ++p) finish_row(team, v, p);
  });
}

inline const FusedKernels kFusedOnCpu{.fits = fused_fits_cpu,
                                      .stage = fused_stage_serial,
                                      .core = fused_core_serial,
                                      .finish = fused_finish_serial};

}  // namespace decaf
