// The products that read a bucket's stacked factor rows (each support's rows of the factors, plan.h):
// the stacks themselves, their Gram matrices and coefficient rows times them, by the backend's kernels
// that read the rows in place, or by ATen GEMMs on stacks gathered per chunk of modules.
#pragma once

#include <ATen/ATen.h>

#include "consensus.h"
#include "plan.h"

namespace decaf {

// Rows of x [batch, N_in r, c] stacked per support of the bucket: [batch, G, K, c].
at::Tensor support_rows(const at::Tensor& x, const Bucket& bk);

// Gram matrices [batch, G, K, K] (float64, computed in X's dtype) of each support's stacked rows of
// X [batch, N_in r, c].
at::Tensor support_grams(const at::Tensor& X, const Bucket& bk, const Backend& backend);

// coef_rows [batch, G, R, K] times each support's stacked rows of X [batch, N_in r, c]:
// [batch, G, R, c], or its transpose [batch, G, c, R] (possibly a view) when `columns`. The backend's
// kernel, where it has one, writes into `out` where it is defined (contiguous, that shape).
at::Tensor times_stacks(const at::Tensor& coef_rows, const at::Tensor& X, const Bucket& bk, bool columns,
                        const Backend& backend, const at::Tensor& out);

}  // namespace decaf
