// The CPU code compiled as target clones (csrc/cpu/vector_clones.h) built for one x86-64 level (-march,
// with DECAF_NO_CLONES), so that each clone the library picks from at load time is checked on any
// machine that can run it: the in-place Gram and write-back kernels (csrc/cpu/stacked_rows_cpu.cpp)
// against float64 ATen products of gathered stacks (float32 and float64, full and partial tiles, row
// lengths with and without a vector tail), and top_eigenpairs (its tridiagonalization is a clone) on
// the native test's spectra (top_eigenpairs_cases.h). Prints "N passed, N failed", or SKIP where this
// CPU lacks the level.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

#include "../cpu/stacked_rows_cpu.h"
#include "top_eigenpairs_cases.h"

namespace {

bool cpu_runs_this_build() {
#if defined(__AVX512F__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#elif defined(__AVX2__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return true;
#endif
}

double relative_error(const at::Tensor& x, const at::Tensor& ref) {
  return ((x.to(at::kDouble) - ref).abs().max() / ref.abs().max()).item<double>();
}

}  // namespace

int main() {
  if (!cpu_runs_this_build()) {
    std::printf("SKIP: this CPU lacks the instructions of this build's -march\n");
    return 0;
  }
  at::manual_seed(0);
  int passed = 0, failed = 0;
  const std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, bool>> shapes{
      // agents N, rank r, row length c, supports G, stacked rows K, ring supports (else any rows)
      {8, 8, 768, 8, 24, true}, {5, 3, 37, 5, 9, true},   {8, 8, 768, 8, 24, false}, {5, 3, 37, 5, 9, false},
      {7, 2, 16, 3, 14, false}, {4, 1, 5, 2, 3, false}, {6, 4, 33, 6, 8, false}};
  for (const at::ScalarType dtype : {at::kFloat, at::kDouble})
    for (const auto& [N, r, c, G, K, ring] : shapes) {
      const int64_t batch = 3, NR = N * r;
      const at::Tensor X = at::randn({batch, NR, c}, at::TensorOptions().dtype(dtype));
      // Ring: support g holds the rows of agents g, g + 1 and g - 1 in that order (overlapping
      // supports share tiles of the Gram, in either orientation). Else any rows, repeats included.
      std::vector<int64_t> cols;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t k = 0; k < K; ++k)
          cols.push_back(ring ? ((g + (k / r == 2 ? N - 1 : k / r)) % N) * r + k % r : (g * 5 + k * 7) % NR);
      const at::Tensor stacks = X.index_select(1, at::tensor(cols)).view({batch, G, K, c}).to(at::kDouble);
      const double tol = dtype == at::kFloat ? 1e-5 : 1e-12;
      const at::Tensor gram_ref = at::matmul(stacks, stacks.transpose(-1, -2));
      const double gram = relative_error(decaf::support_grams_cpu(X, cols, G), gram_ref);
      double product = 0.0;
      for (const int64_t R : {8, 5, 1}) {
        const at::Tensor coef = at::randn({batch, G, R, K}, X.options());
        const at::Tensor ref = at::matmul(coef.to(at::kDouble), stacks);
        product = std::max({product, relative_error(decaf::times_stacks_cpu(coef, X, cols, false), ref),
                            relative_error(decaf::times_stacks_cpu(coef, X, cols, true), ref.transpose(-1, -2))});
      }
      const bool ok = gram <= tol && product <= tol;
      (ok ? passed : failed)++;
      std::printf("%s %s N=%ld r=%ld c=%ld G=%ld K=%ld%s (Gram error %.1e, write-back error %.1e)\n",
                  ok ? "PASS" : "FAIL", dtype == at::kFloat ? "float32" : "float64", (long)N, (long)r, (long)c,
                  (long)G, (long)K, ring ? " ring" : "", gram, product);
    }
  decaf::top_eigenpairs_cases([&](bool ok, const std::string& name) {
    std::printf("%s %s\n", ok ? "PASS" : "FAIL", name.c_str());
    (ok ? passed : failed)++;
  });
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
