// The small problems of the exact Gram path from batched eigendecompositions (ATen only, no value
// read on the host): the CUDA backend's gram_svd (csrc/gram_svd_batched.cpp).
#pragma once

#include "consensus.h"

namespace decaf {

std::optional<GramSvd> gram_svd_batched(const Backend& backend, const at::Tensor& GB, const at::Tensor& GA,
                                        const at::Tensor& d, const std::vector<int64_t>& group,
                                        const PerProblem& per_problem, int64_t q, bool squared, double min_pivot,
                                    double min_diag);

}  // namespace decaf
