// Which problems a consensus_tsvd call solves: one per distinct row of W, grouped by support (the
// agents whose factors the row reads) and bucketed by support size, so that each bucket is one
// batched call.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace decaf {

struct Bucket {
  int64_t agents = 0;                 // k: agents in each support of this bucket
  bool all = false;                   // the only support is every agent (no gather)
  std::vector<int64_t> cols;          // [supports, k r] stacked columns of each support
  int64_t supports = 0;
  std::vector<int64_t> rows;          // [problems] a row of W with this support
  std::vector<int64_t> group, slot;   // [problems] its support, and its index among that support's rows
  int64_t slots = 0;                  // most rows of one support
};

struct Plan {
  std::vector<Bucket> buckets;
  std::vector<int64_t> problem_of_row;  // [N_out] problem (buckets concatenated) giving each row
  bool identity = true;                 // problem_of_row[i] == i
  int64_t max_agents = 0;               // largest k
};

// W on the factors' GPU, never read on the host: every row is its own problem on the support of all
// agents (zero weights give zero columns of the core), so the call needs no host synchronization.
Plan device_plan(int64_t n_out, int64_t n_in);

// W on the CPU (Wd [N_out, N_in] float64, contiguous; the factors on any device, LoRA rank r, B and A
// of m and n features): identical rows are solved once; a row reads only its neighbors' factors
// unless one support of all agents costs less (dense graphs).
Plan host_plan(const at::Tensor& Wd, int64_t r, int64_t m, int64_t n);

}  // namespace decaf
