// Microbenchmark of the CPU's top eigenpair solver (csrc/cpu/top_eigenpairs.cpp), one thread: the time
// per problem of the q = 8 largest eigenpairs of 2000 random positive semidefinite K x K matrices
// (G G^T, G Gaussian; "clustered": Q diag(1 + 0.1 z) Q^T squared, z Gaussian, Q random orthogonal, the
// flat spectra of independent agents' factors), best of 7 passes, next to LAPACK's full dsyevd
// (at::linalg_eigh, one matrix per call) on the same matrices. Built by CMake, not run by ctest:
//   ./build/cmake/decaf_eigen_bench
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "../cpu/top_eigenpairs.h"

namespace {

double best_us_per_problem(const at::Tensor& Hs, int64_t q, bool lapack) {
  const int64_t P = Hs.size(0), K = Hs.size(1);
  std::vector<double> H(K * K), values(q), X(K * q), scratch;
  double best = 1e300;
  for (int pass = 0; pass < 7; ++pass) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t p = 0; p < P; ++p) {
      if (lapack) {
        at::linalg_eigh(Hs[p]);
        continue;
      }
      std::copy(Hs[p].data_ptr<double>(), Hs[p].data_ptr<double>() + K * K, H.begin());
      decaf::top_eigenpairs(H.data(), K, q, values.data(), X.data(), scratch);
    }
    best = std::min(best, std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
  }
  return best / P;
}

}  // namespace

int main() {
  at::set_num_threads(1);
  at::manual_seed(0);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  std::printf("K   spectrum    top_eigenpairs q=8 (us)   linalg_eigh (us)   ratio\n");
  for (const int64_t K : {8, 24, 64, 256})
    for (const bool clustered : {false, true}) {
      const int64_t P = K >= 256 ? 50 : 2000, q = std::min<int64_t>(8, K);
      at::Tensor G = at::randn({P, K, K}, f64);
      if (clustered) {
        const at::Tensor Q = std::get<0>(at::linalg_qr(G));
        G = at::matmul(Q * (1.0 + 0.1 * at::randn({P, 1, K}, f64)), Q.transpose(1, 2));
      }
      const at::Tensor Hs = at::matmul(G, G.transpose(1, 2)).contiguous();
      const double ours = best_us_per_problem(Hs, q, false), lapack = best_us_per_problem(Hs, q, true);
      std::printf("%-3ld %-11s %-25.2f %-18.2f %.2f\n", (long)K, clustered ? "clustered" : "random", ours, lapack,
                  lapack / ours);
    }
  return 0;
}
