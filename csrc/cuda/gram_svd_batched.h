// The small problems of the exact Gram path from batched eigendecompositions (ATen only, no value
// read on the host): the CUDA backend's gram_svd (csrc/cuda/gram_svd_batched.cpp).
#pragma once

#include "../consensus.h"

namespace decaf {

std::optional<GramSvd> gram_svd_batched(const Backend& backend, const GramProblems& problems);

}  // namespace decaf
