// Argument checks of the ops (csrc/checks.h).
#include "checks.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace decaf {

void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()),
                    name, " must be a floating point tensor, got ", t.scalar_type());
}

Shapes check_factors(const at::Tensor& A, const at::Tensor& B, const at::Tensor& W) {
  check_floating(A, "A");
  check_floating(B, "B");
  check_floating(W, "W");
  TORCH_CHECK_VALUE(A.dim() >= 3, "A must have shape [..., N_in, r, n], got ", A.sizes());
  TORCH_CHECK_VALUE(B.dim() == A.dim(), "B must have shape [..., N_in, m, r] with the same number of dims as A, got B ",
                    B.sizes(), " and A ", A.sizes());
  TORCH_CHECK_VALUE(A.scalar_type() == B.scalar_type(), "B must have the dtype of A (", A.scalar_type(),
                    "), got ", B.scalar_type());
  TORCH_CHECK_VALUE(A.device() == B.device(), "B must be on the device of A (", A.device(), "), got ", B.device());
  TORCH_CHECK_VALUE(W.device() == A.device() || W.is_cpu(), "W must be on the CPU or on the device of A (",
                    A.device(), "), got ", W.device());
  TORCH_CHECK_VALUE(W.dim() == 2, "W must have shape [N_out, N_in], got ", W.sizes());
  const int64_t d = A.dim();
  Shapes s;
  s.n_in = A.size(d - 3);
  s.r = A.size(d - 2);
  s.n = A.size(d - 1);
  s.m = B.size(d - 2);
  TORCH_CHECK_VALUE(B.size(d - 3) == s.n_in && B.size(d - 1) == s.r,
                    "B must have shape [..., N_in, m, r] = [..., ", s.n_in, ", m, ", s.r, "] to match A ", A.sizes(),
                    ", got ", B.sizes());
  for (int64_t k = 0; k < d - 3; ++k) {
    TORCH_CHECK_VALUE(A.size(k) == B.size(k), "B must have the leading dims of A ", A.sizes(), ", got ", B.sizes());
    s.lead.push_back(A.size(k));
  }
  TORCH_CHECK_VALUE(s.n_in >= 1 && s.r >= 1 && s.m >= 1 && s.n >= 1,
                    "A and B must be non-empty, got A ", A.sizes(), " and B ", B.sizes());
  TORCH_CHECK_VALUE(W.size(1) == s.n_in, "W must have shape [N_out, N_in] with N_in = ", s.n_in,
                    " (the agents in A and B), got ", W.sizes());
  TORCH_CHECK_VALUE(W.size(0) >= 1, "W must have at least one row, got ", W.sizes());
  s.n_out = W.size(0);
  s.batch = 1;
  for (int64_t v : s.lead) s.batch *= v;
  return s;
}

std::vector<int64_t> with_lead(const Shapes& s, std::initializer_list<int64_t> tail) {
  std::vector<int64_t> out = s.lead;
  out.insert(out.end(), tail);
  return out;
}

void check_truncation(int64_t rank, int64_t m, int64_t n, int64_t oversample, int64_t n_iter) {
  TORCH_CHECK_VALUE(rank >= 1 && rank <= std::min(m, n), "rank must be in [1, min(m, n)] = [1, ", std::min(m, n),
                    "], got ", rank);
  TORCH_CHECK_VALUE(oversample >= 0, "oversample must be >= 0, got ", oversample);
  TORCH_CHECK_VALUE(n_iter >= 0, "n_iter must be >= 0, got ", n_iter);
}

void split_exponents(const std::string& split, double* exp_b, double* exp_a) {
  if (split == "balanced") {
    *exp_b = 0.5;
    *exp_a = 0.5;
  } else if (split == "left") {
    *exp_b = 1.0;
    *exp_a = 0.0;
  } else if (split == "right") {
    *exp_b = 0.0;
    *exp_a = 1.0;
  } else if (split == "none") {  // internal: U and V^T unscaled (tsvd)
    *exp_b = 0.0;
    *exp_a = 0.0;
  } else {
    TORCH_CHECK_VALUE(false, "split must be 'balanced', 'left' or 'right', got '", split, "'");
  }
}

Method method_code(const std::string& method) {
  if (method == "exact") return Method::kExact;
  if (method == "randomized") return Method::kRandomized;
  if (method == "auto") return Method::kAuto;
  TORCH_CHECK_VALUE(false, "method must be 'auto', 'exact' or 'randomized' (or 'dense' in Python), got '", method, "'");
  return Method::kAuto;
}

}  // namespace decaf
