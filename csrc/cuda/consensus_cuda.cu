// CUDA backend: one thread block per (batch entry, receiving agent) runs the shared per-agent
// core (csrc/common) as a BlockTeam, with its workspace in shared memory when it fits (N_in r up
// to ~64 on A100/H100) and in global memory otherwise. No host synchronization: every size is
// known from the shapes, and all work is queued on the current stream.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/consensus_core.h"
#include "../consensus.h"

namespace decaf {
namespace {

struct BlockTeam {
  double* scratch;
  DECAF_HD int rank() const {
#ifdef __CUDA_ARCH__
    return threadIdx.x;
#else
    return 0;
#endif
  }
  DECAF_HD int size() const {
#ifdef __CUDA_ARCH__
    return blockDim.x;
#else
    return 1;
#endif
  }
  DECAF_HD bool leader() const { return rank() == 0; }
  DECAF_HD void sync() const {
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
  }
};

constexpr int kThreads = 128;

__global__ void __launch_bounds__(kThreads) solve_cores_kernel(CoreBatchView v, int64_t first, long n_ws, long n_iws,
                                                               bool in_shared, double* ws_global, int* iws_global) {
  extern __shared__ double smem[];
  const int64_t local = blockIdx.x;
  const BlockTeam team{smem};
  double* ws = in_shared ? smem + kThreads : ws_global + local * n_ws;
  int* iws = in_shared ? reinterpret_cast<int*>(smem + kThreads + n_ws) : iws_global + local * n_iws;
  solve_consensus_core(team, core_problem(v, first + local), ws, iws, JacobiEigh{});
}

void solve_cores_cuda(CoreBatch& cb) {
  const CoreBatchView v = view_of(cb);
  if (v.problems == 0) return;
  const long n_ws = core_workspace_doubles((int)v.n_in, (int)v.r, (int)v.rank, v.oversample);
  const long n_iws = core_workspace_ints((int)v.n_in, (int)v.r);

  int device = 0, max_shared = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t scratch_bytes = kThreads * sizeof(double);
  const size_t shared_bytes = scratch_bytes + n_ws * sizeof(double) + n_iws * sizeof(int);
  const bool in_shared = shared_bytes <= (size_t)max_shared;
  const size_t dyn = in_shared ? shared_bytes : scratch_bytes;
  if (dyn > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(solve_cores_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)dyn));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (in_shared) {
    solve_cores_kernel<<<(unsigned)v.problems, kThreads, dyn, stream>>>(v, 0, n_ws, n_iws, true, nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Global workspace, in chunks of problems so that it stays under ~1 GiB.
  const int64_t per = n_ws * (int64_t)sizeof(double) + n_iws * (int64_t)sizeof(int);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(v.problems, (int64_t(1) << 30) / per));
  at::Tensor ws = at::empty({chunk, n_ws}, cb.GB.options());
  at::Tensor iws = at::empty({chunk, n_iws}, cb.missing.options());
  for (int64_t first = 0; first < v.problems; first += chunk) {
    const int64_t count = std::min(chunk, v.problems - first);
    solve_cores_kernel<<<(unsigned)count, kThreads, dyn, stream>>>(v, first, n_ws, n_iws, false,
                                                                   ws.data_ptr<double>(), iws.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <class T>
__global__ void complete_identity_kernel(T* A, const int* missing, int64_t count, int rank, int n) {
  const int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (p < count && missing[p] > 0) complete_rows_with_identity(A + p * rank * n, rank, n, missing[p]);
}

void complete_identity_cuda(at::Tensor& A_new, const at::Tensor& missing) {
  const int64_t count = missing.numel();
  if (count == 0) return;
  const int rank = (int)A_new.size(2), n = (int)A_new.size(3);
  const unsigned blocks = (unsigned)((count + 127) / 128);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(A_new.scalar_type(), "complete_identity_cuda", [&] {
    complete_identity_kernel<scalar_t><<<blocks, 128, 0, stream>>>(A_new.data_ptr<scalar_t>(),
                                                                   missing.data_ptr<int>(), count, rank, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

__global__ void fill_normal_kernel(double* out, int64_t count, uint64_t seed) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < count; e += (int64_t)gridDim.x * blockDim.x)
    out[e] = counter_normal(seed, (uint64_t)e);
}

void fill_normal_cuda(at::Tensor& out, uint64_t seed) {
  const int64_t count = out.numel();
  if (count == 0) return;
  const unsigned blocks = (unsigned)std::min<int64_t>((count + 255) / 256, 4096);
  fill_normal_kernel<<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(out.data_ptr<double>(), count, seed);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

const Backend kCudaBackend{solve_cores_cuda, complete_identity_cuda, fill_normal_cuda};

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
