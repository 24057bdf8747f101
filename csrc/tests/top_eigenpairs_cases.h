// The CPU's top eigenpair solver (csrc/cpu/top_eigenpairs.cpp) against at::linalg_eigh, shared by the
// native test (the library's build) and the clone test (one build per x86-64 level). Each case goes to
// check(ok, name).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "../cpu/top_eigenpairs.h"

namespace decaf {

// top_eigenpairs on Q diag(spectrum) Q^T (Q random orthogonal) against at::linalg_eigh: values within
// K eps ||H||, orthonormal vectors, and residuals ||H x - lambda x|| within 64 K eps ||H||.
template <class Check>
void top_eigenpairs_case(const Check& check, const std::string& what, const at::Tensor& spectrum, int64_t q) {
  const int64_t K = spectrum.size(0);
  at::manual_seed(K * 7 + q);
  const at::Tensor Q = std::get<0>(at::linalg_qr(at::randn({K, K}, at::kDouble)));
  const at::Tensor H = at::matmul(Q * spectrum.unsqueeze(0), Q.t());
  const double norm = H.abs().sum(1).max().item<double>() + 1e-300;
  at::Tensor work = H.clone().contiguous(), values = at::empty({q}, at::kDouble);
  at::Tensor X = at::empty({K, q}, at::kDouble);
  std::vector<double> scratch;
  const bool ok = decaf::top_eigenpairs(work.data_ptr<double>(), K, q, values.data_ptr<double>(),
                                        X.data_ptr<double>(), scratch);
  const at::Tensor ref = std::get<0>(at::linalg_eigh(H)).flip(0).narrow(0, 0, q);
  const double eps = 2.220446049250313e-16;
  const double v_err = ok ? (values - ref).abs().max().item<double>() / norm : 1.0;
  const double o_err = ok ? (at::matmul(X.t(), X) - at::eye(q, at::kDouble)).abs().max().item<double>() : 1.0;
  const double r_err =
      ok ? (at::matmul(H, X) - X * values.unsqueeze(0)).norm(2, 0).max().item<double>() / norm : 1.0;
  char name[200];
  std::snprintf(name, sizeof(name),
                "top_eigenpairs %s K=%lld q=%lld (value err %.1e, orthogonality %.1e, residual %.1e)", what.c_str(),
                (long long)K, (long long)q, v_err, o_err, r_err);
  check(ok && v_err <= K * eps && o_err <= 64 * K * eps && r_err <= 64 * K * eps, name);
}

// Spectra from spread out to repeated, zero, clustered across the cut, rank-deficient, signed and at
// extreme scales, K up to 128.
template <class Check>
void top_eigenpairs_cases(const Check& check) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  for (int64_t K : {1, 2, 3, 24, 128}) {
    const int64_t q = std::min<int64_t>(K, 8);
    top_eigenpairs_case(check, "spread", at::linspace(1.0, 2.0 * K, K, opts), q);
    top_eigenpairs_case(check, "decaying", at::pow(at::full({K}, 0.5, opts), at::arange(K, opts)), q);
    top_eigenpairs_case(check, "all equal", at::ones({K}, opts), q);
    top_eigenpairs_case(check, "zero", at::zeros({K}, opts), q);
  }
  // Clusters across the cut at q, a low-rank PSD matrix (a core core^T), and extreme scales.
  at::Tensor clustered = at::ones({24}, opts);
  clustered.narrow(0, 0, 12).fill_(3.0);
  clustered.narrow(0, 6, 1).fill_(3.0 + 1e-12);
  top_eigenpairs_case(check, "clusters", clustered, 8);
  at::Tensor low_rank = at::zeros({24}, opts);
  low_rank.narrow(0, 0, 5).copy_(at::linspace(1.0, 5.0, 5, opts));
  top_eigenpairs_case(check, "rank 5 of 24", low_rank, 8);
  top_eigenpairs_case(check, "signed", at::linspace(-3.0, 2.0, 24, opts), 8);
  top_eigenpairs_case(check, "scale 1e-150", at::linspace(1.0, 24.0, 24, opts) * 1e-150, 8);
  top_eigenpairs_case(check, "scale 1e150", at::linspace(1.0, 24.0, 24, opts) * 1e150, 8);
  top_eigenpairs_case(check, "all of them", at::linspace(1.0, 24.0, 24, opts), 24);
}

}  // namespace decaf
