// CUDA backend: the completion of zero directions (csrc/common/completion.h) with one thread block
// per (batch entry, receiving agent) as a BlockTeam, the counter-based normal generator, the
// eigendecomposition of small float64 matrices (csrc/common/small_eigh.h, one block per matrix), the
// exact Gram path's small problems as batched ATen calls (csrc/cuda/gram_svd_batched.cpp), and the other
// batched factorizations through ATen (cuSOLVER / MAGMA). Every size is known from the shapes, W on
// the GPU is never read on the host (W on the CPU is, to plan), and all work is queued on the current
// stream.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../common/completion.h"
#include "../common/counter_normal.h"
#include "../common/small_eigh.h"
#include "../consensus.h"
#include "fused_cuda.h"
#include "gram_svd_batched.h"

namespace decaf {
namespace {

struct BlockTeam {
  double* scratch;  // blockDim.x doubles of shared memory
  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
};

constexpr int kThreads = 128;

template <class T>
__global__ void __launch_bounds__(kThreads) complete_rows_kernel(CompletionView<T> v) {
  __shared__ double scratch[kThreads];
  const BlockTeam team{scratch};
  for (int64_t p = blockIdx.x; p < v.problems; p += gridDim.x) complete_rows(team, v, p);
}

void complete_rows_cuda(at::Tensor& A_new, const at::Tensor& missing, const at::Tensor& A_in, const at::Tensor& W) {
  const int64_t problems = missing.numel();
  if (problems == 0) return;
  const unsigned blocks = (unsigned)std::min<int64_t>(problems, 65535);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(A_new.scalar_type(), "complete_rows_cuda", [&] {
    const CompletionView<scalar_t> v{A_new.data_ptr<scalar_t>(), missing.data_ptr<int>(),
                                     A_in.data_ptr<scalar_t>(),  W.data_ptr<double>(),
                                     problems,                   W.size(0),
                                     W.size(1),                  A_in.size(1) / W.size(1),
                                     A_new.size(2),              A_new.size(3),
                                     A_in.stride(0)};
    complete_rows_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(v);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

__global__ void fill_normal_kernel(double* out, int64_t count, uint64_t seed, uint64_t first) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < count; e += (int64_t)gridDim.x * blockDim.x)
    out[e] = counter_normal(seed, first + (uint64_t)e);
}

void fill_normal_cuda(at::Tensor& out, uint64_t seed, uint64_t first) {
  const int64_t count = out.numel();
  if (count == 0) return;
  const unsigned blocks = (unsigned)std::min<int64_t>((count + 255) / 256, 4096);
  fill_normal_kernel<<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(out.data_ptr<double>(), count, seed, first);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> geqrf_cuda(const at::Tensor& X) { return at::geqrf(X); }

at::Tensor ormqr_cuda(const at::Tensor& h, const at::Tensor& tau, const at::Tensor& C, bool left, bool transpose) {
  return at::ormqr(h, tau, C, left, transpose);
}

std::tuple<at::Tensor, at::Tensor> qr_cuda(const at::Tensor& X) { return at::linalg_qr(X); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> svd_cuda(const at::Tensor& X) { return at::linalg_svd(X, false); }

constexpr int kEighThreads = 128;

__global__ void __launch_bounds__(kEighThreads)
    small_eigh_kernel(const double* H, int64_t count, int n, double* values, double* vectors) {
  extern __shared__ double shared[];  // small_eigh_workspace(n) + kEighThreads doubles
  const BlockTeam team{shared + small_eigh_workspace(n)};
  for (int64_t p = blockIdx.x; p < count; p += gridDim.x)
    small_eigh(team, H + p * n * n, n, shared, values + p * n, vectors + p * n * n);
}

// Shared memory of small_eigh_kernel for n x n matrices (68 KB for n = 64), or 0 when the device's
// opt-in limit per block is below it. Above the default 48 KB a kernel must opt in.
size_t small_eigh_shared_bytes(int64_t n) {
  const size_t bytes = (size_t)(small_eigh_workspace((int)n) + kEighThreads) * sizeof(double);
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, c10::cuda::current_device()));
  if (bytes > (size_t)limit) return 0;
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(small_eigh_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
  return bytes;
}

// at::linalg_eigh's semantics. float64 matrices up to kSmallEighMax whose workspace fits in shared
// memory: one thread block per matrix (common/small_eigh.h), nothing read on the host; others: ATen
// (which checks its status on the host).
std::tuple<at::Tensor, at::Tensor> eigh_cuda(const at::Tensor& H) {
  const int64_t n = H.size(-1);
  const size_t shared = H.scalar_type() == at::kDouble && n >= 1 && n <= kSmallEighMax ? small_eigh_shared_bytes(n) : 0;
  if (shared == 0) return at::linalg_eigh(H);
  const at::Tensor h = H.contiguous();
  const int64_t count = h.numel() / (n * n);
  at::Tensor values = at::empty(h.sizes().slice(0, h.dim() - 1), h.options());
  at::Tensor vectors = at::empty_like(h);
  if (count == 0) return {values, vectors};
  const unsigned blocks = (unsigned)std::min<int64_t>(count, 65535);
  small_eigh_kernel<<<blocks, kEighThreads, shared, c10::cuda::getCurrentCUDAStream()>>>(
      h.data_ptr<double>(), count, (int)n, values.data_ptr<double>(), vectors.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {values, vectors};
}

const Backend kCudaBackend{.complete_rows = complete_rows_cuda,
                           .fill_normal = fill_normal_cuda,
                           .geqrf = geqrf_cuda,
                           .ormqr = ormqr_cuda,
                           .qr = qr_cuda,
                           .svd = svd_cuda,
                           .eigh = eigh_cuda,
                           .gram_svd = gram_svd_batched,
                           .support_grams = nullptr,
                           .times_stacks = nullptr,
                           .float64_grams = true,
                           .auto_exact_max_columns = kMaxStackedColumns,
                           .stack_chunk_bytes = int64_t{256} << 20,
                           .module_chunk_bytes = std::numeric_limits<int64_t>::max(),
                           .fused = &kFusedCuda};

std::tuple<at::Tensor, at::Tensor, at::Tensor> consensus_tsvd_cuda(
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& W, int64_t rank,
    c10::string_view method, c10::string_view split, int64_t oversample, int64_t n_iter, int64_t seed) {
  const c10::cuda::CUDAGuard guard(A.device());
  return consensus_tsvd_impl(A, B, W, rank, std::string(method), std::string(split), oversample, n_iter, seed,
                             kCudaBackend);
}

at::Tensor weighted_product_sum_cuda(const at::Tensor& A, const at::Tensor& B, const at::Tensor& W) {
  const c10::cuda::CUDAGuard guard(A.device());
  return weighted_product_sum_impl(A, B, W);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tsvd_cuda(const at::Tensor& M, int64_t rank, int64_t oversample,
                                                         int64_t n_iter, int64_t seed) {
  const c10::cuda::CUDAGuard guard(M.device());
  return tsvd_impl(M, rank, oversample, n_iter, seed, kCudaBackend);
}

}  // namespace

TORCH_LIBRARY_IMPL(decaf_ext, CUDA, m) {
  m.impl("consensus_tsvd", &consensus_tsvd_cuda);
  m.impl("weighted_product_sum", &weighted_product_sum_cuda);
  m.impl("tsvd", &tsvd_cuda);
}

}  // namespace decaf
