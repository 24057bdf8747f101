// The largest eigenpairs of a small symmetric matrix, without computing the others: Householder
// tridiagonalization, the wanted eigenvalues by bisection on Sturm counts turned into Newton steps
// on det(T - x I) once a bracket holds one eigenvalue, inverse iteration for their eigenvectors
// (reorthogonalized against the ones found before), back-transformation. It takes less time than
// at::linalg_eigh (LAPACK's full dsyevd) per matrix (csrc/tests/eigen_bench.cpp compares the two),
// and it runs on any thread.
#pragma once

#include <cstdint>
#include <vector>

namespace decaf {

// The q largest eigenvalues `values` [q] (descending) of the symmetric K x K matrix H (row-major,
// destroyed) and orthonormal eigenvectors X [K, q] (row-major, one per column). Eigenvalues are
// accurate to ~K eps ||H|| and every pair has a residual ||H x - lambda x|| below 64 K eps ||H||
// on the tridiagonal form; false when inverse iteration did not reach that (the caller then uses a
// full eigensolver). `scratch` is resized as needed and may be reused across calls.
bool top_eigenpairs(double* H, int64_t K, int64_t q, double* values, double* X, std::vector<double>& scratch);

}  // namespace decaf
