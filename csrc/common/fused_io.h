// The fused exact path's reads and writes of the factors (csrc/solve_fused.cpp), written once for the
// CUDA kernels (csrc/cuda/fused_cuda.cu) and the CUDA path run on the CPU (csrc/tests/fused_on_cpu.h):
//   stage:  A [batch, NR, n] and B [batch, n_in, m, r] (any strides, the input dtype) -> the float64
//           stacks X_A [batch, NR + 1, n] and X_B [batch, NR + 1, m] (row j r + t: agent j's row t of A,
//           column t of B; row NR: ones, so that the Grams' last row holds the column sums), one element
//           per call of stage_element;
//   finish: per (module, output row), a Team (team.h): the completion of zero directions
//           (completion.h) on the float64 A_new, then A_new, B_new (transposed from [rank, m]) and S
//           written in the output dtype.
#pragma once

#include <stdint.h>

#include "completion.h"
#include "team.h"

namespace decaf {

template <class T>
struct StageView {
  const T* A;  // [batch, NR, n] with strides a_stride
  const T* B;  // [batch, n_in, m, r] with strides b_stride
  double* XA;  // [batch, NR + 1, n]
  double* XB;  // [batch, NR + 1, m]
  int64_t batch, n_in, r, m, n;
  int64_t a_stride[3], b_stride[4];
  DECAF_HD int64_t count() const { return batch * (n_in * r + 1) * (m + n); }
};

// Element e of count(): X_A's elements first, then X_B's.
template <class T>
DECAF_HD void stage_element(const StageView<T>& v, int64_t e) {
  const int64_t rows = v.n_in * v.r + 1, a_count = v.batch * rows * v.n;
  const bool is_a = e < a_count;
  const int64_t x = is_a ? e : e - a_count, c = is_a ? v.n : v.m;
  const int64_t b = x / (rows * c), row = x / c % rows, i = x % c;
  double value = 1.0;
  if (row < rows - 1) {
    const int64_t j = row / v.r, t = row % v.r;
    value = is_a ? (double)(float)v.A[b * v.a_stride[0] + row * v.a_stride[1] + i * v.a_stride[2]]
                 : (double)(float)v.B[b * v.b_stride[0] + j * v.b_stride[1] + i * v.b_stride[2] + t * v.b_stride[3]];
  }
  (is_a ? v.XA : v.XB)[x] = value;
}

template <class T>
struct FinishView {
  CompletionView<double> completion;  // A_new (float64, [batch, n_out, rank, n]) completed in place
  const double* BT;                   // [batch, n_out, rank, m]: B_new transposed
  T* A_out;                           // [batch, n_out, rank, n]
  T* B_out;                           // [batch, n_out, m, rank]
  const double* S;                    // [batch, n_out, rank]
  T* S_out;                           // [batch, n_out, rank]
  int64_t m;
};

template <class Team, class T>
DECAF_HD void finish_row(const Team& team, const FinishView<T>& v, int64_t p) {
  complete_rows(team, v.completion, p);
  team.sync();
  const int64_t rank = v.completion.rank, n = v.completion.n, m = v.m;
  const double* a = v.completion.A_new + p * rank * n;
  for (int64_t e = team.rank(); e < rank * n; e += team.size()) v.A_out[p * rank * n + e] = (T)(float)a[e];
  const double* bt = v.BT + p * rank * m;
  for (int64_t e = team.rank(); e < m * rank; e += team.size())
    v.B_out[p * m * rank + e] = (T)(float)bt[(e % rank) * m + e / rank];
  for (int64_t j = team.rank(); j < rank; j += team.size()) v.S_out[p * rank + j] = (T)(float)v.S[p * rank + j];
}

}  // namespace decaf
