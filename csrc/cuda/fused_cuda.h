// The CUDA backend's fused exact path kernels (csrc/cuda/fused_cuda.cu, csrc/solve_fused.cpp).
#pragma once

#include "../consensus.h"

namespace decaf {

extern const FusedKernels kFusedCuda;

}  // namespace decaf
