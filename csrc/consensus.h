// The host-side entry points of the decaf_ext ops (csrc/consensus.cpp), shared by the CPU and CUDA
// registrations. Each device supplies a Backend (the kernels that differ per device); everything else
// is ATen.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace decaf {

// Largest k * r (neighbors times LoRA rank of one receiving agent) the op accepts.
constexpr int64_t kMaxStackedColumns = 2048;

// The top q singular triplets of each problem's M = Bs^T D As (Bs, As: a support's stacked factor
// rows) as coefficients on the stacks: M ~= (Bs^T U) diag(S) (As^T V)^T.
struct GramSvd {
  at::Tensor U, S, V;  // [batch, P, K, q], [batch, P, q], [batch, P, K, q] float64
};

// x [batch, G, ...] (one entry per support) -> [batch, P, ...] (one per problem), a view where possible.
using PerProblem = std::function<at::Tensor(const at::Tensor&)>;

// One bucket's small problems of the exact Gram path (Backend::gram_svd's input): the Gram matrices
// GB, GA [batch, G, K, K] of each support's stacks (float64), weights d [P, K] (float64), each
// problem's support `group` and the selection of per-support tensors for the problems (`per_problem`,
// the caller's rule); q triplets per problem, from the eigenpairs of core core^T when `squared`
// (float32 inputs) or the SVD of the core (core = R_B D R_A^T, R^T R = G by Cholesky). A Gram whose
// diagonal entry is below min_diag (zero, or so small that its products lost digits to underflow) or
// whose scaled Cholesky pivot is not above min_pivot is not safely positive definite.
struct GramProblems {
  at::Tensor GB, GA, d;
  std::vector<int64_t> group;
  PerProblem per_problem;
  int64_t q;
  bool squared;
  double min_pivot, min_diag;
};

// One launch of the fused exact path's core (common/gram_core.h; csrc/solve_fused.cpp): the Grams GB, GA
// [batch, NR + 1, NR + 1] (float64, with the column sums), W [n_out, n_in] (float64, on the device: W on
// a GPU) or the host plan's table (float64), outputs coef_B, coef_A [batch, n_out, rank, NR] (float64),
// S [batch, n_out, rank] (float64) and missing int32 [batch, n_out].
struct FusedCore {
  at::Tensor GB, GA, W, table, coef_B, coef_A, S, missing;
  int64_t problems, n_out, n_in, r, rank, kmax, mn;
  double exp_b, exp_a, eps;
};

// The kernels of the fused exact path (csrc/solve_fused.cpp), float32-computed inputs, k*r up to
// kFusedMaxColumns: a handful of launches per call and no host synchronization.
struct FusedKernels {
  // Whether the device runs the core for problems of up to kmax stacked columns.
  bool (*fits)(int64_t kmax);
  // The float64 stacks XA [batch, NR + 1, n], XB [batch, NR + 1, m] (common/fused_io.h) of
  // A [batch, NR, n] and B [batch, n_in, m, r] (input dtype, any strides).
  void (*stage)(const at::Tensor& A, const at::Tensor& B, at::Tensor& XA, at::Tensor& XB);
  // One team per (module, problem) (common/gram_core.h).
  void (*core)(const FusedCore& call);
  // One team per (module, output row) (common/fused_io.h): completes A64 [batch, n_out, rank, n] in
  // place (candidates A_in [batch, NR, n], any batch stride, W [n_out, n_in] float64, both float64 on
  // the device), then writes A_out [batch, n_out, rank, n], B_out [batch, n_out, m, rank] and S_out
  // [batch, n_out, rank] (output dtype) from A64, BT [batch, n_out, rank, m] and S (float64).
  void (*finish)(at::Tensor& A64, const at::Tensor& BT, const at::Tensor& S, const at::Tensor& missing,
                 const at::Tensor& A_in, const at::Tensor& W, at::Tensor& A_out, at::Tensor& B_out, at::Tensor& S_out);
};

struct Backend {
  // Completes the zero-singular-value rows of A_new [batch, N_out, rank, n] (contiguous, float or
  // double) in place: `missing` int32 [batch, N_out] trailing rows each, candidates from
  // A_in [batch, N_in * r, n] (A_new's dtype) ordered by W [N_out, N_in] (float64); see
  // common/completion.h.
  void (*complete_rows)(at::Tensor& A_new, const at::Tensor& missing, const at::Tensor& A_in, const at::Tensor& W);
  // Fills a contiguous float64 tensor with counter_normal(seed, first + linear index).
  void (*fill_normal)(at::Tensor& out, uint64_t seed, uint64_t first);
  // Batched dense factorizations with the semantics of at::geqrf, at::ormqr, at::linalg_qr
  // (reduced), at::linalg_svd (thin) and at::linalg_eigh, over any leading dims. The CPU runs the small matrices
  // of a batch in parallel, one thread each.
  std::tuple<at::Tensor, at::Tensor> (*geqrf)(const at::Tensor& X);
  at::Tensor (*ormqr)(const at::Tensor& h, const at::Tensor& tau, const at::Tensor& C, bool left, bool transpose);
  std::tuple<at::Tensor, at::Tensor> (*qr)(const at::Tensor& X);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*svd)(const at::Tensor& X);
  std::tuple<at::Tensor, at::Tensor> (*eigh)(const at::Tensor& H);
  // The small problems of the exact Gram path (GramProblems). None sends the bucket to the
  // Householder path: the CPU's (csrc/cpu/gram_svd_cpu.cpp) when a Gram is not safely positive
  // definite or an eigensolve did not converge; the batched one of csrc/cuda/gram_svd_batched.cpp
  // (CUDA; no value read on the host) for float64 inputs. nullptr: always Householder.
  std::optional<GramSvd> (*gram_svd)(const Backend& backend, const GramProblems& problems);
  // The Gram matrices [batch, G, K, K] (float64, products in X's dtype) of each support's stacked
  // rows X[:, cols[g K + k]] (k < K) of X [batch, N_in r, c], for a sparse bucket whose Grams take
  // fewer dot products than the all-pairs Gram. CPU: a kernel reading the rows in place
  // (csrc/cpu/stacked_rows_cpu.cpp). nullptr: ATen GEMMs on stacks gathered per chunk of modules.
  at::Tensor (*support_grams)(const at::Tensor& X, const std::vector<int64_t>& cols, int64_t G);
  // The write-back product of the Gram path on a sparse bucket: coef_rows [batch, G, R, K] times the
  // stacked rows X[:, cols[g K + k]] (k < K) of X [batch, N_in r, c] for each support g:
  // [batch, G, R, c], or [batch, G, c, R] when `columns`, written into `out` where it is defined
  // (contiguous, that shape). CPU: a kernel reading the rows in place (csrc/cpu/stacked_rows_cpu.cpp).
  // nullptr: ATen GEMMs on gathered stacks, or on coefficients scattered over all N_in r rows.
  at::Tensor (*times_stacks)(const at::Tensor& coef_rows, const at::Tensor& X, const std::vector<int64_t>& cols,
                             bool columns, const at::Tensor& out);
  // gram_svd's Gram matrices are formed from float64 copies of the factors (a gram_svd without a
  // pivot check needs zero and repeated columns to give Grams singular to float64 rounding).
  bool float64_grams;
  // Above this k * r, method "auto" uses the randomized method. CPU: 128, where randomized starts to pay
  // off; CUDA: kMaxStackedColumns (never), since randomized was measured slower than exact at every k * r
  // a GPU run covered (bench/RESULTS.md) and the exact path takes every k * r the op accepts.
  int64_t auto_exact_max_columns;
  // Where support_grams or times_stacks is nullptr, the stacks are gathered for chunks of modules of at
  // most this many bytes (CUDA: 256 MiB, a bound on memory, since every chunk costs a gather and a GEMM
  // launch per pass; CPU: 1 MiB, cache-sized, so that the products read them back from cache, which
  // only a CPU backend without the two kernels reaches, such as the native test's swapped one).
  int64_t stack_chunk_bytes;
  // A call runs its passes over chunks of modules whose factors (A and B in the compute dtype) take at
  // most this many bytes, so that each pass after the first reads them from cache (CPU: 8 MiB, a
  // share of the last-level cache; CUDA: no limit). Results do not depend on it.
  int64_t module_chunk_bytes;
  // The fused exact path (csrc/solve_fused.cpp) where the device has one (CUDA), else nullptr.
  const FusedKernels* fused = nullptr;
  // Plan every call as for W on a GPU (every row on every agent), W read nowhere on the host: only the
  // CUDA path run on the CPU sets it (csrc/tests/cuda_path_on_cpu.h), to count and test that case.
  bool plan_as_device = false;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> consensus_tsvd_impl(
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& W, int64_t rank,
    const std::string& method, const std::string& split, int64_t oversample, int64_t n_iter,
    int64_t seed, const Backend& backend);

at::Tensor weighted_product_sum_impl(const at::Tensor& A, const at::Tensor& B, const at::Tensor& W);

std::tuple<at::Tensor, at::Tensor, at::Tensor> tsvd_impl(const at::Tensor& M, int64_t rank,
                                                         int64_t oversample, int64_t n_iter,
                                                         int64_t seed, const Backend& backend);

}  // namespace decaf
