// Raw views of the fused exact path's tensors (csrc/solve_fused.cpp) for its per-element and per-team
// code (common/fused_io.h, common/gram_core.h), shared by the CUDA kernels (csrc/cuda/fused_cuda.cu) and
// the CUDA path run on the CPU (csrc/tests/fused_on_cpu.h).
#pragma once

#include <ATen/ATen.h>

#include "common/fused_io.h"
#include "common/gram_core.h"
#include "consensus.h"

namespace decaf {

template <class T>
StageView<T> stage_view(const at::Tensor& A, const at::Tensor& B, at::Tensor& XA, at::Tensor& XB) {
  StageView<T> v{A.data_ptr<T>(), B.data_ptr<T>(), XA.data_ptr<double>(), XB.data_ptr<double>(),
                 B.size(0),       B.size(1),       B.size(3),             B.size(2),
                 A.size(2),       {},              {}};
  for (int d = 0; d < 3; ++d) v.a_stride[d] = A.stride(d);
  for (int d = 0; d < 4; ++d) v.b_stride[d] = B.stride(d);
  return v;
}

inline CoreView core_view(const FusedCore& c, double* work) {
  return CoreView{c.GB.data_ptr<double>(),
                      c.GA.data_ptr<double>(),
                      c.W.defined() ? c.W.data_ptr<double>() : nullptr,
                      c.table.defined() ? c.table.data_ptr<double>() : nullptr,
                      c.coef_B.data_ptr<double>(),
                      c.coef_A.data_ptr<double>(),
                      c.S.data_ptr<double>(),
                      c.missing.data_ptr<int>(),
                      work,
                      c.problems,
                      c.n_out,
                      c.n_in,
                      c.r,
                      c.rank,
                      c.kmax,
                      c.mn,
                      c.exp_b,
                      c.exp_a,
                      c.eps};
}

// Doubles of one core team's workspace (global memory) for the call.
inline int64_t core_workspace_of(const FusedCore& c) { return core_workspace(c.kmax, std::min(c.rank, c.kmax)); }

template <class T>
FinishView<T> finish_view(at::Tensor& A64, const at::Tensor& BT, const at::Tensor& S, const at::Tensor& missing,
                          const at::Tensor& A_in, const at::Tensor& W, at::Tensor& A_out, at::Tensor& B_out,
                          at::Tensor& S_out) {
  const CompletionView<double> completion{A64.data_ptr<double>(), missing.data_ptr<int>(), A_in.data_ptr<double>(),
                                          W.data_ptr<double>(),   missing.numel(),         W.size(0),
                                          W.size(1),              A_in.size(1) / W.size(1), A64.size(2),
                                          A64.size(3),            A_in.stride(0)};
  return FinishView<T>{completion,       BT.data_ptr<double>(), A_out.data_ptr<T>(), B_out.data_ptr<T>(),
                       S.data_ptr<double>(), S_out.data_ptr<T>(), B_out.size(2)};
}

}  // namespace decaf
