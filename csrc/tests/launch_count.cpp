// ATen kernels per consensus_tsvd call on the CUDA backend's path (tests/cuda_path_on_cpu.h), counted
// on the CPU with a RecordFunction callback around one exact call after a warm-up call: the outermost
// ATen ops other than views and allocations (a conversion or `contiguous` counts only where it copies),
// and the backend's own kernels (the fused path's stage, core and finish, the Jacobi eigh) and the
// copy of a host plan to the device. On a GPU each is one kernel launch or copy, or a few where
// cuBLAS/cuSOLVER split one (batched Cholesky, triangular solves). W on the CPU: rows are planned on
// their supports (ring: k*r = 3 r; complete: N r), and W's conversion to float64 (a host op) counts too;
// W on the GPU: not read on the host, every row on every agent (k*r = N r), the plan the CUDA backend
// makes for W on a GPU. The GPU preset's shapes: r = rank = 8, 16 modules of 4096 x 4096 (the count
// does not depend on the modules' number or size; SIZE and MODULES change them). Exits 1 when a row
// exceeds 10. Built by CMake, not run by ctest (CI runs and prints the table):
//   ./build/cmake/decaf_launch_count [SIZE [MODULES]]  the table over agents, topologies, W's device, dtypes
//   ./build/cmake/decaf_launch_count 8 complete gpu   the kernels of one call by op name
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "cuda_path_on_cpu.h"

namespace {

// One open op: its name, whether it called other ops, and the kernels counted inside it so far.
struct Frame {
  std::string name;
  bool has_child;
  std::vector<std::string> inner;
};
thread_local std::vector<Frame> stack;
std::map<std::string, int> kernels;

bool view_or_allocation(const std::string& op) {
  static const char* const kNames[] = {
      "aten::view",         "aten::as_strided",  "aten::reshape",     "aten::_reshape_alias", "aten::unsqueeze",
      "aten::squeeze",      "aten::narrow",      "aten::slice",       "aten::select",         "aten::transpose",
      "aten::t",            "aten::permute",     "aten::expand",      "aten::expand_as",      "aten::diagonal",
      "aten::alias",        "aten::detach",      "aten::resolve_conj", "aten::resolve_neg",   "aten::_unsafe_view",
      "aten::empty",        "aten::empty_strided", "aten::empty_like", "aten::result_type",   "aten::lift_fresh",
      "aten::scalar_tensor", "aten::resize_",    "aten::unbind",      "aten::split"};
  for (const char* name : kNames)
    if (op == name) return true;
  return false;
}

// A kernel of its own where it runs: views and allocations are not; conversions only where they copy.
bool is_kernel(const Frame& f) {
  if (view_or_allocation(f.name)) return false;
  if (f.name == "aten::to" || f.name == "aten::contiguous") return f.has_child;
  return true;
}

std::unique_ptr<at::ObserverContext> enter(const at::RecordFunction& fn) {
  if (!stack.empty()) stack.back().has_child = true;
  stack.push_back({fn.name(), false, {}});
  return nullptr;
}

// The outermost kernel counts, with whatever it runs inside.
void leave(const at::RecordFunction&, at::ObserverContext*) {
  Frame frame = std::move(stack.back());
  stack.pop_back();
  std::vector<std::string> counted = is_kernel(frame) ? std::vector<std::string>{frame.name} : std::move(frame.inner);
  if (!stack.empty()) {
    auto& inner = stack.back().inner;
    inner.insert(inner.end(), counted.begin(), counted.end());
  } else {
    for (const auto& name : counted) kernels[name]++;
  }
}

// Kernels of one exact call on `agents` agents (ring or complete), W float32 on the CPU or (as the CUDA
// backend plans it) on the GPU, `modules` modules of size x size, r = rank = 8, factors of `dtype`.
int count(int64_t agents, bool complete, bool w_on_gpu, at::ScalarType dtype, int64_t size, int64_t modules) {
  at::Tensor W = at::zeros({agents, agents}, at::kFloat);
  for (int64_t i = 0; i < agents; ++i)
    for (int64_t j = 0; j < agents; ++j) {
      const int64_t hop = std::min((i - j + agents) % agents, (j - i + agents) % agents);
      if (complete || hop <= 1) W[i][j] = complete ? 1.0 / (double)agents : 1.0 / 3.0;
    }
  at::manual_seed(0);
  const at::Tensor A = at::randn({modules, agents, 8, size}).to(dtype), B = at::randn({modules, agents, size, 8}).to(dtype);
  decaf::Backend backend = decaf::cuda_path_on_cpu();
  backend.plan_as_device = w_on_gpu;
  // Warm-up (ATen's one-time work) on one module.
  decaf::consensus_tsvd_impl(A.narrow(0, 0, 1), B.narrow(0, 0, 1), W, 8, "exact", "balanced", 10, 2, 0, backend);
  kernels.clear();
  const auto handle = at::addThreadLocalCallback(at::RecordFunctionCallback(enter, leave));
  decaf::consensus_tsvd_impl(A, B, W, 8, "exact", "balanced", 10, 2, 0, backend);
  at::removeCallback(handle);
  int total = 0;
  for (const auto& [name, n] : kernels) total += n;
  return total;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[3]).size() == 3) {
    const int total = count(std::atoll(argv[1]), std::string(argv[2]) == "complete", std::string(argv[3]) == "gpu",
                            at::kFloat, 256, 16);
    for (const auto& [name, n] : kernels) std::printf("%5d %s\n", n, name.c_str());
    std::printf("%5d kernels\n", total);
    return 0;
  }
  const int64_t size = argc >= 2 ? std::atoll(argv[1]) : 4096, modules = argc >= 3 ? std::atoll(argv[2]) : 16;
  std::printf("kernels per consensus_tsvd call on the CUDA path (%lld modules of %lld x %lld, r = rank = 8)\n",
              (long long)modules, (long long)size, (long long)size);
  std::printf("agents topology W on  k*r  float32  bfloat16\n");
  int most = 0;
  for (int64_t agents : {8, 16, 32})
    for (bool complete : {false, true})
      for (bool w_on_gpu : {false, true}) {
        const int f32 = count(agents, complete, w_on_gpu, at::kFloat, size, modules);
        const int b16 = count(agents, complete, w_on_gpu, at::kBFloat16, size, modules);
        most = std::max({most, f32, b16});
        std::printf("%6lld %-8s %-4s %5lld %8d %9d\n", (long long)agents, complete ? "complete" : "ring",
                    w_on_gpu ? "gpu" : "cpu", (long long)(complete || w_on_gpu ? agents * 8 : 24), f32, b16);
      }
  constexpr int kMostLaunches = 10;  // issue 28's bound for every row
  std::printf("most kernels in a call: %d (%s: at most %d)\n", most, most <= kMostLaunches ? "PASS" : "FAIL",
              kMostLaunches);
  return most <= kMostLaunches ? 0 : 1;
}
