// The write-back product of the CPU backend (see times_stacks_cpu.h). Each support's output is
// computed in register tiles of kTileRows x kTileCols: the K stacked rows are read through pointers
// into X, so a sparse graph costs multiply-adds only for its neighbors' rows, and B's columns are
// stored transposed straight from the tile. On x86-64 with GCC the kernel is compiled for AVX-512,
// AVX2 and the baseline, the best one chosen when the library loads (target_clones).
#include "times_stacks_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DECAF_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DECAF_VECTOR_CLONES
#endif

namespace decaf {
namespace {

constexpr int64_t kTileRows = 4, kTileCols = 32;

// out[r * rs + j * cs] = sum_k C[r K + k] rows[k][j] for r < R, j < c: C [R, K] row-major, each of
// the K rows of length c. Inlined into each target clone below.
template <class T>
__attribute__((always_inline)) inline void rows_times(const T* C, int64_t R, int64_t K, const T* const* rows,
                                                      int64_t c, T* out, int64_t rs, int64_t cs) {
  for (int64_t j0 = 0; j0 < c; j0 += kTileCols) {
    const int64_t w = std::min(kTileCols, c - j0);
    for (int64_t r0 = 0; r0 < R; r0 += kTileRows) {
      const int64_t h = std::min(kTileRows, R - r0);
      T acc[kTileRows][kTileCols] = {};
      if (w == kTileCols && h == kTileRows) {  // fixed trip counts: vectorized
        for (int64_t k = 0; k < K; ++k) {
          const T* x = rows[k] + j0;
          for (int64_t r = 0; r < kTileRows; ++r) {
            const T coef = C[(r0 + r) * K + k];
            for (int64_t j = 0; j < kTileCols; ++j) acc[r][j] += coef * x[j];
          }
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          const T* x = rows[k] + j0;
          for (int64_t r = 0; r < h; ++r) {
            const T coef = C[(r0 + r) * K + k];
            for (int64_t j = 0; j < w; ++j) acc[r][j] += coef * x[j];
          }
        }
      }
      for (int64_t r = 0; r < h; ++r)
        for (int64_t j = 0; j < w; ++j) out[(r0 + r) * rs + (j0 + j) * cs] = acc[r][j];
    }
  }
}

DECAF_VECTOR_CLONES void rows_times_cloned(const float* C, int64_t R, int64_t K, const float* const* rows, int64_t c,
                                          float* out, int64_t rs, int64_t cs) {
  rows_times(C, R, K, rows, c, out, rs, cs);
}

DECAF_VECTOR_CLONES void rows_times_cloned(const double* C, int64_t R, int64_t K, const double* const* rows,
                                           int64_t c, double* out, int64_t rs, int64_t cs) {
  rows_times(C, R, K, rows, c, out, rs, cs);
}

}  // namespace

at::Tensor times_stacks_cpu(const at::Tensor& coef_rows, const at::Tensor& X, const std::vector<int64_t>& cols,
                            bool columns) {
  const int64_t batch = X.size(0), NR = X.size(1), c = X.size(2);
  const int64_t G = coef_rows.size(1), R = coef_rows.size(2), K = coef_rows.size(3);
  const at::Tensor coef = coef_rows.contiguous(), x = X.contiguous();
  at::Tensor out = columns ? at::empty({batch, G, c, R}, X.options()) : at::empty({batch, G, R, c}, X.options());
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "times_stacks_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cp = coef.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * G, 1, [&](int64_t begin, int64_t end) {
      std::vector<const scalar_t*> rows(K);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / G, g = p % G;
        for (int64_t k = 0; k < K; ++k) rows[k] = xp + (b * NR + cols[g * K + k]) * c;
        const int64_t rs = columns ? 1 : c, cs = columns ? R : 1;
        rows_times_cloned(cp + p * R * K, R, K, rows.data(), c, op + p * R * c, rs, cs);
      }
    });
  });
  return out;
}

}  // namespace decaf
