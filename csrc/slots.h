// The layout of one bucket's problems (plan.h) against its supports: a problem is one row of W and a
// support the stacked factors that row reads; problems of the same support fill its slots. These
// move per-support tensors to per-problem ones and per-problem coefficients into the layout of one
// product per support, and back.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "plan.h"

namespace decaf {

// Rows [problems] of x [batch, groups, ...] for the bucket's problems (a view when they coincide).
at::Tensor per_problem(const at::Tensor& x, const Bucket& bk);

// Coefficients [batch, P, K', rank] laid out as the right-hand sides of one Householder
// application per support: [batch, supports, rows, slots * rank], zero-padded to `rows`.
at::Tensor per_support_rhs(const at::Tensor& coef, const Bucket& bk, int64_t rows);

// Inverse of per_support_rhs after the Householder application: [batch, supports, rows, slots *
// rank] -> [batch, P, rows, rank].
at::Tensor per_problem_result(const at::Tensor& out, const Bucket& bk, int64_t rank);

// Coefficients [batch, P, K, rank] as the rows of one product per support:
// [batch, G, slots * rank, K], problem p in the rank rows of its slot (unused slots zero).
at::Tensor per_support_rows(const at::Tensor& coef, const Bucket& bk);

// Inverse of per_support_rows after the product: [batch, G, slots * rank, c] -> [batch, P, rank, c],
// or [batch, G, c, slots * rank] -> [batch, P, c, rank] when `columns`.
at::Tensor per_problem_rows(const at::Tensor& out, const Bucket& bk, int64_t rank, bool columns);

}  // namespace decaf
