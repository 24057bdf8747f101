// The solvers of one bucket's problems (plan.h): exact by Householder QR (csrc/solve_exact.cpp),
// exact from Gram matrices (csrc/solve_gram.cpp) and randomized (csrc/solve_randomized.cpp); what
// they share (csrc/coefficients.cpp); the call's solve of every bucket over chunks of modules
// (csrc/solve_modules.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "checks.h"
#include "consensus.h"
#include "plan.h"

namespace decaf {

// The split factors of one bucket's problems, before completion.
struct Solved {
  at::Tensor A_new, B_new;  // [batch, P, rank, n], [batch, P, m, rank] (compute dtype)
  at::Tensor S;             // [batch, P, rank] float64
  at::Tensor missing;       // int32 [batch, P]: trailing zero-sigma rows of A_new to complete
};

struct Options {
  int64_t rank, oversample, n_iter;
  double exp_b, exp_a;
  Method method;
  uint64_t seed;
  int64_t first_module;  // of the chunk being solved: its random test matrices continue the whole call's
};

// From the core's SVD in orthonormal coordinates (U [.., Kb, c], Sv [.., c], V [.., Ka, c],
// float64) and the coordinates of the all-ones vector on both sides (sB [.., Kb], sA [.., Ka]):
// the coefficients of the split factors, S and the count of zero directions. Singular values at or
// below tol_rel * sigma_1 count as zero: their coefficients are zero, to be completed.
struct Coefficients {
  at::Tensor B, A, S, missing;  // [.., Kb, rank], [.., Ka, rank], [.., rank], int32 [..]
};

// tol_rel for split_coefficients: 16 sqrt(max(m, n, K)) eps of the compute dtype.
double zero_tolerance(int64_t m, int64_t n, int64_t K, at::ScalarType compute);

Coefficients split_coefficients(const at::Tensor& U, const at::Tensor& Sv, const at::Tensor& V,
                                const at::Tensor& sB, const at::Tensor& sA, const Options& o, double tol_rel);

// Exact by Householder QR of each support's stacks Bs [batch, G, K, m] (B columns as rows) and
// As [batch, G, K, n]; problem weights d [P, K] float64.
Solved solve_exact(const at::Tensor& Bs, const at::Tensor& As, const at::Tensor& d, const Bucket& bk,
                   const Options& o, const Backend& backend);

// Exact from the Gram matrices of the stacks of Bt [batch, N_in r, m] (B columns as rows) and
// Af [batch, N_in r, n]; None when backend.gram_svd declines. With `dest` (the call's outputs for these
// modules, given when each support of the bucket has one problem and these are the call's rows in
// order), the split factors are written into it.
std::optional<Solved> solve_gram(const at::Tensor& Bt, const at::Tensor& Af, const at::Tensor& d, const Bucket& bk,
                                 const Options& o, const Backend& backend, const Solved* dest);

// Randomized range finder on the stacks (as solve_exact's).
Solved solve_randomized(const at::Tensor& Bs, const at::Tensor& As, const at::Tensor& d, const Bucket& bk,
                        const Options& o, const Backend& backend);

// The whole call by the backend's fused kernels (Backend::fused; csrc/solve_fused.cpp): A_new
// [batch, N_out, rank, n], B_new [batch, N_out, m, rank] and S [batch, N_out, rank] in A's dtype,
// completed; None where the call does not qualify (no fused kernels, float64 inputs, randomized, k*r above
// kFusedMaxColumns, more than kKrylovMaxRank triplets above kSmallEighMax columns, or the device's
// shared memory too small). `host_plan`: the plan read W on the host (Wd on the CPU).
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> solve_fused(
    const at::Tensor& A, const at::Tensor& B, const Plan& plan, const at::Tensor& Wd, bool host_plan,
    const Shapes& s, const Options& o, const Backend& backend);

// Every bucket of the plan for all modules: Af [batch, N_in r, n] (compute dtype), B as given to the
// op, Wd W in float64. Returns A_new [batch, N_out, rank, n], B_new [batch, N_out, m, rank],
// S [batch, N_out, rank] and missing [batch, N_out], before completion.
Solved solve_modules(const at::Tensor& Af, const at::Tensor& B, const Plan& plan, const at::Tensor& Wd,
                     const Shapes& s, Options o, const Backend& backend);

}  // namespace decaf
