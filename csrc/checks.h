// Argument checks of the ops, each failure a one-line ValueError naming the argument, and the
// shapes and options they establish.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace decaf {

void check_floating(const at::Tensor& t, const char* name);

// The sizes of a call's factors A [..., N_in, r, n], B [..., N_in, m, r] and weights W [N_out, N_in].
struct Shapes {
  int64_t batch, n_in, n_out, r, m, n;
  std::vector<int64_t> lead;  // leading (batch) dims
};

Shapes check_factors(const at::Tensor& A, const at::Tensor& B, const at::Tensor& W);

// s.lead followed by `tail`.
std::vector<int64_t> with_lead(const Shapes& s, std::initializer_list<int64_t> tail);

// rank in [1, min(m, n)], oversample and n_iter non-negative.
void check_truncation(int64_t rank, int64_t m, int64_t n, int64_t oversample, int64_t n_iter);

// The exponents of S given to B and to A: "balanced", "left", "right", or "none" (internal, tsvd:
// U and V^T unscaled).
void split_exponents(const std::string& split, double* exp_b, double* exp_a);

enum class Method { kExact, kRandomized, kAuto };

Method method_code(const std::string& method);

}  // namespace decaf
