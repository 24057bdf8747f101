// The Gram and write-back passes of the CPU backend over stacked rows read in place (see
// stacked_rows_cpu.h), each support's output computed in register tiles: the K stacked rows are
// read through pointers into X, so a sparse graph costs multiply-adds only for its neighbors' rows.
// The Gram takes the upper triangle of tiles (dot products over c, kept in kLanes partial sums);
// the write-back stores B's columns transposed straight from the tile. The kernels are compiled for
// AVX-512, AVX2 and the baseline (vector_clones.h).
#include "stacked_rows_cpu.h"

#include "vector_clones.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

namespace decaf {
namespace {

constexpr int64_t kTileRows = 4, kTileCols = 32;  // write-back tile
constexpr int64_t kGramTile = 4, kLanes = 16;       // Gram tile of kGramTile x kGramTile dot products

// kLanes values of T as one GCC/Clang vector (split into registers of the clone's width); elsewhere
// (or with DECAF_PLAIN_LANES) a plain array with the same operations.
#if defined(__GNUC__) && !defined(DECAF_PLAIN_LANES)
template <class T>
struct Lanes {
  typedef T type __attribute__((vector_size(kLanes * sizeof(T))));
};
#else
template <class T>
struct Lanes {
  struct type {
    T v[kLanes];
    T operator[](int64_t i) const { return v[i]; }
    type& operator+=(const type& o) {
      for (int64_t i = 0; i < kLanes; ++i) v[i] += o.v[i];
      return *this;
    }
    friend type operator*(const type& a, const type& b) {
      type p;
      for (int64_t i = 0; i < kLanes; ++i) p.v[i] = a.v[i] * b.v[i];
      return p;
    }
  };
};
#endif

// G[i K + j] = G[j K + i] = sum_x rows[i][x] rows[j][x] (float64) for i, j < K, each row of length c,
// the products accumulated in T. Inlined into each target clone below.
template <class T>
DECAF_ALWAYS_INLINE void gram_rows(const T* const* rows, int64_t K, int64_t c, double* G) {
  using V = typename Lanes<T>::type;
  const int64_t c_vec = c - c % kLanes;
  for (int64_t i0 = 0; i0 < K; i0 += kGramTile)
    for (int64_t j0 = i0; j0 < K; j0 += kGramTile) {
      const int64_t hi = std::min(kGramTile, K - i0), hj = std::min(kGramTile, K - j0);
      V acc[kGramTile][kGramTile] = {};
      // Rows past K (a partial tile) repeat the last one; their sums are not stored.
      const T* ri[kGramTile];
      const T* rj[kGramTile];
      for (int64_t a = 0; a < kGramTile; ++a) {
        ri[a] = rows[i0 + std::min(a, hi - 1)];
        rj[a] = rows[j0 + std::min(a, hj - 1)];
      }
      for (int64_t x0 = 0; x0 < c_vec; x0 += kLanes) {
        V xi[kGramTile], xj[kGramTile];
        for (int64_t a = 0; a < kGramTile; ++a) {
          std::memcpy(&xi[a], ri[a] + x0, sizeof(V));
          std::memcpy(&xj[a], rj[a] + x0, sizeof(V));
        }
        for (int64_t a = 0; a < kGramTile; ++a)
          for (int64_t b = 0; b < kGramTile; ++b) acc[a][b] += xi[a] * xj[b];
      }
      for (int64_t a = 0; a < hi; ++a)
        for (int64_t b = 0; b < hj; ++b) {
          T sum = 0;
          for (int64_t v = 0; v < kLanes; ++v) sum += acc[a][b][v];
          for (int64_t x = c_vec; x < c; ++x) sum += rows[i0 + a][x] * rows[j0 + b][x];
          G[(i0 + a) * K + j0 + b] = G[(j0 + b) * K + i0 + a] = (double)sum;
        }
    }
}

// out[r * rs + j * cs] = sum_k C[r K + k] rows[k][j] for r < R, j < c: C [R, K] row-major, each of
// the K rows of length c. Inlined into each target clone below.
template <class T>
DECAF_ALWAYS_INLINE void rows_times(const T* C, int64_t R, int64_t K, const T* const* rows, int64_t c, T* out,
                                    int64_t rs, int64_t cs) {
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

DECAF_VECTOR_CLONES void gram_rows_cloned(const float* const* rows, int64_t K, int64_t c, double* G) {
  gram_rows(rows, K, c, G);
}

DECAF_VECTOR_CLONES void gram_rows_cloned(const double* const* rows, int64_t K, int64_t c, double* G) {
  gram_rows(rows, K, c, G);
}

DECAF_VECTOR_CLONES void rows_times_cloned(const float* C, int64_t R, int64_t K, const float* const* rows, int64_t c,
                                          float* out, int64_t rs, int64_t cs) {
  rows_times(C, R, K, rows, c, out, rs, cs);
}

DECAF_VECTOR_CLONES void rows_times_cloned(const double* C, int64_t R, int64_t K, const double* const* rows,
                                           int64_t c, double* out, int64_t rs, int64_t cs) {
  rows_times(C, R, K, rows, c, out, rs, cs);
}

// f(p, rows) for every (module, support) p = b G + g of X [batch, N_in r, c], in parallel, with
// rows [K] pointing at the support's stacked rows X[b, cols[g K + k]].
template <class T, class F>
void for_each_support(const T* X, int64_t batch, int64_t NR, int64_t c, const std::vector<int64_t>& cols, int64_t G,
                      F f) {
  const int64_t K = (int64_t)cols.size() / G;
  at::parallel_for(0, batch * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<const T*> rows(K);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / G, g = p % G;
      for (int64_t k = 0; k < K; ++k) rows[k] = X + (b * NR + cols[g * K + k]) * c;
      f(p, rows.data());
    }
  });
}

}  // namespace

at::Tensor support_grams_cpu(const at::Tensor& X, const std::vector<int64_t>& cols, int64_t G) {
  const int64_t batch = X.size(0), NR = X.size(1), c = X.size(2), K = (int64_t)cols.size() / G;
  const at::Tensor x = X.contiguous();
  at::Tensor out = at::empty({batch, G, K, K}, X.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "support_grams_cpu", [&] {
    double* op = out.data_ptr<double>();
    for_each_support(x.data_ptr<scalar_t>(), batch, NR, c, cols, G, [&](int64_t p, const scalar_t* const* rows) {
      gram_rows_cloned(rows, K, c, op + p * K * K);
    });
  });
  return out;
}

at::Tensor times_stacks_cpu(const at::Tensor& coef_rows, const at::Tensor& X, const std::vector<int64_t>& cols,
                            bool columns) {
  const int64_t batch = X.size(0), NR = X.size(1), c = X.size(2);
  const int64_t G = coef_rows.size(1), R = coef_rows.size(2), K = coef_rows.size(3);
  const at::Tensor coef = coef_rows.contiguous(), x = X.contiguous();
  at::Tensor out = columns ? at::empty({batch, G, c, R}, X.options()) : at::empty({batch, G, R, c}, X.options());
  const int64_t rs = columns ? 1 : c, cs = columns ? R : 1;  // strides of out's rows and columns
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "times_stacks_cpu", [&] {
    const scalar_t* cp = coef.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for_each_support(x.data_ptr<scalar_t>(), batch, NR, c, cols, G, [&](int64_t p, const scalar_t* const* rows) {
      rows_times_cloned(cp + p * R * K, R, K, rows, c, op + p * R * c, rs, cs);
    });
  });
  return out;
}

}  // namespace decaf
