// The CPU backend's two passes over each support's stacked factor rows, the rows read in place
// through pointers into the factors (no gathered stacks, no multiply-adds with the zero coefficients
// of agents outside a support): the Gram matrices (Backend::support_grams) and the write-back
// product (Backend::times_stacks).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace decaf {

// Gram matrices [batch, G, K, K] (float64; the products accumulated in X's dtype, float or double) of
// the rows X[:, cols[g K + k]] (k < K) of X [batch, N_in r, c], for each of the G supports.
at::Tensor support_grams_cpu(const at::Tensor& X, const std::vector<int64_t>& cols, int64_t G);

// coef_rows [batch, G, R, K] times the rows X[:, cols[g K + k]] (k < K) of X [batch, N_in r, c]
// for each support g: [batch, G, R, c], or its transpose [batch, G, c, R] when `columns`
// (contiguous, X's dtype: float or double), written into `out` where it is defined.
at::Tensor times_stacks_cpu(const at::Tensor& coef_rows, const at::Tensor& X, const std::vector<int64_t>& cols,
                            bool columns, const at::Tensor& out = {});

}  // namespace decaf
