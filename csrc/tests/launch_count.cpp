// ATen kernels per consensus_tsvd call on the CUDA backend's path (tests/cuda_path_on_cpu.h), counted
// on the CPU with a RecordFunction callback around one exact float32 call after a warm-up call: the
// outermost ATen ops other than views and allocations (a conversion or `contiguous` counts only where
// it copies), and the Jacobi eigh. On a GPU each is one kernel launch, or a few where cuBLAS/cuSOLVER
// split one (batched Cholesky, triangular solves). W is on the CPU, so rows are planned on their
// supports (ring: k*r = 3 r; complete: N r). Built by CMake, not run by ctest:
//   ./build/cmake/decaf_launch_count            a table over agents and topologies (r = 8, rank 8)
//   ./build/cmake/decaf_launch_count 8 complete  the kernels of one call by op name
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

// Kernels of one exact float32 call on `agents` agents (ring or complete), 16 modules of 256 x 256, r = 8.
int count(int64_t agents, bool complete) {
  at::Tensor W = at::zeros({agents, agents}, at::kFloat);
  for (int64_t i = 0; i < agents; ++i)
    for (int64_t j = 0; j < agents; ++j) {
      const int64_t hop = std::min((i - j + agents) % agents, (j - i + agents) % agents);
      if (complete || hop <= 1) W[i][j] = complete ? 1.0 / (double)agents : 1.0 / 3.0;
    }
  at::manual_seed(0);
  const at::Tensor A = at::randn({16, agents, 8, 256}), B = at::randn({16, agents, 256, 8});
  const decaf::Backend backend = decaf::cuda_path_on_cpu();
  decaf::consensus_tsvd_impl(A, B, W, 8, "exact", "balanced", 10, 2, 0, backend);  // warm-up
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
  if (argc == 3) {
    const int total = count(std::atoll(argv[1]), std::string(argv[2]) == "complete");
    for (const auto& [name, n] : kernels) std::printf("%5d %s\n", n, name.c_str());
    std::printf("%5d kernels\n", total);
    return 0;
  }
  std::printf("agents topology  k*r  kernels\n");
  for (int64_t agents : {8, 16, 32})
    for (bool complete : {false, true})
      std::printf("%6lld %-8s %5lld %8d\n", (long long)agents, complete ? "complete" : "ring",
                  (long long)(complete ? agents * 8 : 24), count(agents, complete));
  return 0;
}
