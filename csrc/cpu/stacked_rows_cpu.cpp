// The Gram and write-back passes of the CPU backend over stacked rows read in place (see
// stacked_rows_cpu.h), each support's output computed in register tiles: the K stacked rows are
// read through pointers into X, so a sparse graph costs multiply-adds only for its neighbors' rows.
// The Gram takes the upper triangle of tiles (dot products over c, kept in kLanes partial sums), each
// distinct pair of tiles once for all supports that share it; the write-back stores B's columns
// transposed straight from the tile. The kernels are compiled for AVX-512, AVX2 and the baseline
// (vector_clones.h).
#include "stacked_rows_cpu.h"

#include "vector_clones.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <map>

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

// out[a kGramTile + b] = sum_x ri[a][x] rj[b][x] (float64; a, b < kGramTile) for two tiles of rows of
// length c, the products accumulated in T. Inlined into each target clone below.
template <class T>
DECAF_ALWAYS_INLINE void gram_block(const T* const* ri, const T* const* rj, int64_t c, double* out) {
  using V = typename Lanes<T>::type;
  const int64_t c_vec = c - c % kLanes;
  V acc[kGramTile][kGramTile] = {};
  for (int64_t x0 = 0; x0 < c_vec; x0 += kLanes) {
    V xi[kGramTile], xj[kGramTile];
    for (int64_t a = 0; a < kGramTile; ++a) {
      std::memcpy(&xi[a], ri[a] + x0, sizeof(V));
      std::memcpy(&xj[a], rj[a] + x0, sizeof(V));
    }
    for (int64_t a = 0; a < kGramTile; ++a)
      for (int64_t b = 0; b < kGramTile; ++b) acc[a][b] += xi[a] * xj[b];
  }
  for (int64_t a = 0; a < kGramTile; ++a)
    for (int64_t b = 0; b < kGramTile; ++b) {
      T sum = 0;
      for (int64_t v = 0; v < kLanes; ++v) sum += acc[a][b][v];
      for (int64_t x = c_vec; x < c; ++x) sum += ri[a][x] * rj[b][x];
      out[a * kGramTile + b] = (double)sum;
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

DECAF_VECTOR_CLONES void gram_block_cloned(const float* const* ri, const float* const* rj, int64_t c, double* out) {
  gram_block(ri, rj, c, out);
}

DECAF_VECTOR_CLONES void gram_block_cloned(const double* const* ri, const double* const* rj, int64_t c,
                                           double* out) {
  gram_block(ri, rj, c, out);
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

// The Gram matrices as blocks of dot products between tiles (runs of kGramTile stacked rows of a
// support; a partial last run repeats its last row). Supports that overlap (a ring's agent is in k of
// them) share tiles, so each distinct pair of tiles is computed once per module and copied into every
// support's Gram that holds it.
struct GramBlocks {
  int64_t tiles_per_support;
  std::vector<std::array<int64_t, kGramTile>> tiles;  // rows of X of each distinct tile
  std::vector<std::array<int64_t, 2>> pairs;          // distinct tile pairs (first <= second)
  std::vector<int64_t> at;  // [G, T, T] for tiles i <= j of a support: 2 pair + 1 if the pair is (j, i)
};

GramBlocks plan_gram_blocks(const std::vector<int64_t>& cols, int64_t G) {
  const int64_t K = (int64_t)cols.size() / G, T = (K + kGramTile - 1) / kGramTile;
  GramBlocks plan{T, {}, {}, std::vector<int64_t>(G * T * T, -1)};
  std::map<std::array<int64_t, kGramTile>, int64_t> tile_index;
  std::map<std::array<int64_t, 2>, int64_t> pair_index;
  std::vector<int64_t> ids(T);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t t = 0; t < T; ++t) {
      std::array<int64_t, kGramTile> rows;
      for (int64_t a = 0; a < kGramTile; ++a) rows[a] = cols[g * K + std::min(t * kGramTile + a, K - 1)];
      ids[t] = tile_index.emplace(rows, (int64_t)plan.tiles.size()).first->second;
      if (ids[t] == (int64_t)plan.tiles.size()) plan.tiles.push_back(rows);
    }
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = i; j < T; ++j) {
        const std::array<int64_t, 2> key{std::min(ids[i], ids[j]), std::max(ids[i], ids[j])};
        const int64_t pair = pair_index.emplace(key, (int64_t)plan.pairs.size()).first->second;
        if (pair == (int64_t)plan.pairs.size()) plan.pairs.push_back(key);
        plan.at[(g * T + i) * T + j] = 2 * pair + (ids[i] > ids[j] ? 1 : 0);
      }
  }
  return plan;
}

}  // namespace

at::Tensor support_grams_cpu(const at::Tensor& X, const std::vector<int64_t>& cols, int64_t G) {
  const int64_t batch = X.size(0), NR = X.size(1), c = X.size(2), K = (int64_t)cols.size() / G;
  const at::Tensor x = X.contiguous();
  const GramBlocks plan = plan_gram_blocks(cols, G);
  const int64_t T = plan.tiles_per_support, pairs = (int64_t)plan.pairs.size();
  constexpr int64_t kBlock = kGramTile * kGramTile;
  std::vector<double> blocks(batch * pairs * kBlock);  // [batch, pairs, kGramTile, kGramTile]
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "support_grams_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, batch * pairs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t b = q / pairs;
        const scalar_t* rows[2][kGramTile];
        for (int64_t side = 0; side < 2; ++side)
          for (int64_t a = 0; a < kGramTile; ++a)
            rows[side][a] = xp + (b * NR + plan.tiles[plan.pairs[q % pairs][side]][a]) * c;
        gram_block_cloned(rows[0], rows[1], c, blocks.data() + q * kBlock);
      }
    });
  });
  at::Tensor out = at::empty({batch, G, K, K}, X.options().dtype(at::kDouble));
  double* op = out.data_ptr<double>();
  at::parallel_for(0, batch * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / G, g = p % G;
      double* Gp = op + p * K * K;
      for (int64_t i = 0; i < T; ++i)
        for (int64_t j = i; j < T; ++j) {
          const int64_t code = plan.at[(g * T + i) * T + j];
          const double* block = blocks.data() + (b * pairs + code / 2) * kBlock;
          const bool swapped = code % 2 == 1;
          for (int64_t a = 0; a < std::min(kGramTile, K - i * kGramTile); ++a)
            for (int64_t e = 0; e < std::min(kGramTile, K - j * kGramTile); ++e) {
              const int64_t row = i * kGramTile + a, col = j * kGramTile + e;
              Gp[row * K + col] = Gp[col * K + row] = swapped ? block[e * kGramTile + a] : block[a * kGramTile + e];
            }
        }
    }
  });
  return out;
}

at::Tensor times_stacks_cpu(const at::Tensor& coef_rows, const at::Tensor& X, const std::vector<int64_t>& cols,
                            bool columns, const at::Tensor& dest) {
  const int64_t batch = X.size(0), NR = X.size(1), c = X.size(2);
  const int64_t G = coef_rows.size(1), R = coef_rows.size(2), K = coef_rows.size(3);
  const at::Tensor coef = coef_rows.contiguous(), x = X.contiguous();
  const std::vector<int64_t> shape = columns ? std::vector<int64_t>{batch, G, c, R} : std::vector<int64_t>{batch, G, R, c};
  at::Tensor out = dest.defined() ? dest : at::empty(shape, X.options());
  TORCH_INTERNAL_ASSERT(out.sizes() == at::IntArrayRef(shape) && out.is_contiguous() &&
                        out.scalar_type() == X.scalar_type());
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
