// The small problems of the exact Gram path on the CPU (csrc/cpu/gram_svd_cpu.cpp).
#pragma once

#include "../consensus.h"

namespace decaf {

std::optional<GramSvd> gram_svd_cpu(const Backend& backend, const at::Tensor& GB, const at::Tensor& GA,
                                    const at::Tensor& d, const std::vector<int64_t>& group,
                                    const PerProblem& per_problem, int64_t q, bool squared, double min_pivot,
                                    double min_diag);

}  // namespace decaf
