// The CUDA backend's fused exact path (csrc/solve_fused.cpp): the stage kernel (one thread per element,
// common/fused_io.h), the core kernel (one thread block per (module, problem), common/gram_core.h, its
// workspace in global memory and small_eigh's in shared memory) and the finish kernel (one block per
// (module, output row): completion and the outputs in their dtype). Nothing is read on the host; the
// device attributes are read once per device and kernel, so that a call can be captured in a CUDA
// graph once one call has run.
#include "fused_cuda.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <mutex>

#include "../fused_views.h"

namespace decaf {
namespace {

struct BlockTeam {
  double* scratch;  // blockDim.x doubles of shared memory
  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
};

constexpr int kCoreThreads = 256;
constexpr int kFinishThreads = 128;

template <class T>
__global__ void stage_kernel(StageView<T> v) {
  const int64_t count = v.count();
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < count; e += (int64_t)gridDim.x * blockDim.x)
    stage_element(v, e);
}

__global__ void __launch_bounds__(kCoreThreads) core_kernel(CoreView v, int64_t items, int64_t work_per_block) {
  extern __shared__ double shared[];  // small_eigh_workspace(min(kmax, 64)) + kCoreThreads doubles
  const int eig_n = (int)(v.kmax < kSmallEighMax ? v.kmax : kSmallEighMax);
  const BlockTeam team{shared + small_eigh_workspace(eig_n)};
  double* work = v.work + blockIdx.x * work_per_block;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) gram_core(team, v, item, work, shared);
}

template <class T>
__global__ void __launch_bounds__(kFinishThreads) finish_kernel(FinishView<T> v, int64_t rows) {
  __shared__ double scratch[kFinishThreads];
  const BlockTeam team{scratch};
  for (int64_t p = blockIdx.x; p < rows; p += gridDim.x) finish_row(team, v, p);
}

size_t core_shared_bytes(int64_t kmax) {
  return (size_t)(small_eigh_workspace((int)std::min<int64_t>(kmax, kSmallEighMax)) + kCoreThreads) * sizeof(double);
}

// A device attribute (cudaDevAttr*), read once per device; 0 for devices beyond the first 64.
template <cudaDeviceAttr kAttribute>
int device_attribute(int device) {
  static std::mutex mutex;
  static int values[64] = {};
  const std::lock_guard<std::mutex> lock(mutex);
  if (device < 64 && values[device] == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&values[device], kAttribute, device));
  return device < 64 ? values[device] : 0;
}

// Opts core_kernel in to its largest shared memory once per device (above the default 48 KB).
void opt_in(int device) {
  static std::mutex mutex;
  static bool done[64] = {};
  const std::lock_guard<std::mutex> lock(mutex);
  if (device >= 64 || done[device]) return;
  const size_t bytes = core_shared_bytes(kSmallEighMax);
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(core_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
  done[device] = true;
}

bool fused_fits_cuda(int64_t kmax) {
  const int device = c10::cuda::current_device();
  const int limit = device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device);
  return core_shared_bytes(kSmallEighMax) <= (size_t)limit && kmax <= kFusedMaxColumns;
}

void fused_stage_cuda(const at::Tensor& A, const at::Tensor& B, at::Tensor& XA, at::Tensor& XB) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "fused_stage_cuda", [&] {
    const StageView<scalar_t> v = stage_view<scalar_t>(A, B, XA, XB);
    const unsigned blocks = (unsigned)std::max<int64_t>(1, std::min<int64_t>((v.count() + 255) / 256, 65535));
    stage_kernel<scalar_t><<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(v);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fused_core_cuda(const FusedCore& call) {
  const int device = c10::cuda::current_device();
  const int64_t items = call.GB.size(0) * call.problems;
  if (items == 0) return;
  const int64_t sms = device_attribute<cudaDevAttrMultiProcessorCount>(device);
  const int64_t blocks = std::min<int64_t>(items, 2 * sms), per_block = core_workspace_of(call);
  const at::Tensor work = at::empty({blocks * per_block}, call.GB.options());
  opt_in(device);
  core_kernel<<<(unsigned)blocks, kCoreThreads, core_shared_bytes(call.kmax), c10::cuda::getCurrentCUDAStream()>>>(
      core_view(call, work.data_ptr<double>()), items, per_block);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fused_finish_cuda(at::Tensor& A64, const at::Tensor& BT, const at::Tensor& S, const at::Tensor& missing,
                       const at::Tensor& A_in, const at::Tensor& W, at::Tensor& A_out, at::Tensor& B_out,
                       at::Tensor& S_out) {
  const int64_t rows = missing.numel();
  if (rows == 0) return;
  const unsigned blocks = (unsigned)std::min<int64_t>(rows, 65535);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A_out.scalar_type(), "fused_finish_cuda", [&] {
    const FinishView<scalar_t> v = finish_view<scalar_t>(A64, BT, S, missing, A_in, W, A_out, B_out, S_out);
    finish_kernel<scalar_t><<<blocks, kFinishThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(v, rows);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

const FusedKernels kFusedCuda{.fits = fused_fits_cuda,
                              .stage = fused_stage_cuda,
                              .core = fused_core_cuda,
                              .finish = fused_finish_cuda};

}  // namespace decaf
