// The CPU backend's write-back product (Backend::times_stacks): coefficient rows times each
// support's stacked factor rows, the rows read in place (no gathered stacks, no multiply-adds with
// the zero coefficients of agents outside a support).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace decaf {

// coef_rows [batch, G, R, K] times the rows X[:, cols[g K + k]] (k < K) of X [batch, N_in r, c]
// for each support g: [batch, G, R, c], or its transpose [batch, G, c, R] when `columns`
// (contiguous, X's dtype: float or double).
at::Tensor times_stacks_cpu(const at::Tensor& coef_rows, const at::Tensor& X, const std::vector<int64_t>& cols,
                            bool columns);

}  // namespace decaf
