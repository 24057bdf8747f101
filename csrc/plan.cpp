// The plan of a consensus_tsvd call (see plan.h).
#include "plan.h"

#include <algorithm>
#include <map>

namespace decaf {

Plan device_plan(int64_t n_out, int64_t n_in) {
  Plan plan;
  Bucket bk;
  bk.agents = n_in;
  bk.all = true;
  bk.supports = 1;
  bk.slots = n_out;
  for (int64_t i = 0; i < n_out; ++i) {
    bk.rows.push_back(i);
    bk.group.push_back(0);
    bk.slot.push_back(i);
    plan.problem_of_row.push_back(i);
  }
  plan.buckets.push_back(bk);
  plan.max_agents = n_in;
  return plan;
}

// Cost, in flops up to a constant: Gram or QR of each support's stacks (m + n) K^2, each distinct row's
// core ~20 K^3.
Plan host_plan(const at::Tensor& Wd, int64_t r, int64_t m, int64_t n) {
  const int64_t n_out = Wd.size(0), n_in = Wd.size(1);
  const double* w = Wd.data_ptr<double>();
  std::map<std::vector<double>, int64_t> row_ids;
  std::vector<int64_t> distinct, distinct_of_row(n_out);
  for (int64_t i = 0; i < n_out; ++i) {
    const auto [it, fresh] = row_ids.emplace(std::vector<double>(w + i * n_in, w + (i + 1) * n_in), distinct.size());
    if (fresh) distinct.push_back(i);
    distinct_of_row[i] = it->second;
  }
  std::map<std::vector<int64_t>, int64_t> support_ids;
  std::vector<std::vector<int64_t>> supports;
  std::vector<int64_t> support_of(distinct.size());
  double local_cost = 0.0;
  int64_t max_agents = 0;
  for (size_t d = 0; d < distinct.size(); ++d) {
    std::vector<int64_t> agents;
    for (int64_t j = 0; j < n_in; ++j)
      if (w[distinct[d] * n_in + j] != 0.0) agents.push_back(j);
    const auto [it, fresh] = support_ids.emplace(agents, supports.size());
    const double K = (double)agents.size() * r;
    local_cost += 20.0 * K * K * K;
    if (fresh) {
      local_cost += (double)(m + n) * K * K;
      max_agents = std::max<int64_t>(max_agents, agents.size());
      supports.push_back(agents);
    }
    support_of[d] = it->second;
  }
  const double NR = (double)n_in * r;
  if (supports.size() > 1 && local_cost > (double)(m + n) * NR * NR + 20.0 * distinct.size() * NR * NR * NR) {
    std::vector<int64_t> every(n_in);
    for (int64_t j = 0; j < n_in; ++j) every[j] = j;
    supports.assign(1, every);
    std::fill(support_of.begin(), support_of.end(), 0);
    max_agents = n_in;
  }
  // Buckets by support size; a support's index inside its bucket.
  std::map<int64_t, Bucket> by_size;
  std::vector<int64_t> local_index(supports.size());
  for (size_t g = 0; g < supports.size(); ++g) {
    Bucket& bk = by_size[(int64_t)supports[g].size()];
    bk.agents = supports[g].size();
    bk.all = bk.agents == n_in;
    local_index[g] = bk.supports++;
    for (int64_t j : supports[g])
      for (int64_t t = 0; t < r; ++t) bk.cols.push_back(j * r + t);
  }
  std::vector<int64_t> slot_count(supports.size(), 0);
  for (size_t d = 0; d < distinct.size(); ++d) {
    const int64_t g = support_of[d];
    Bucket& bk = by_size[(int64_t)supports[g].size()];
    bk.rows.push_back(distinct[d]);
    bk.group.push_back(local_index[g]);
    bk.slot.push_back(slot_count[g]++);
    bk.slots = std::max(bk.slots, slot_count[g]);
  }
  Plan plan;
  plan.max_agents = max_agents;
  std::vector<int64_t> problem_of_distinct(distinct.size());
  int64_t first = 0;
  for (auto& [size, bk] : by_size) {
    for (size_t p = 0; p < bk.rows.size(); ++p) {
      const int64_t d = distinct_of_row[bk.rows[p]];
      problem_of_distinct[d] = first + (int64_t)p;
    }
    first += bk.rows.size();
    plan.buckets.push_back(std::move(bk));
  }
  for (int64_t i = 0; i < n_out; ++i) {
    plan.problem_of_row.push_back(problem_of_distinct[distinct_of_row[i]]);
    plan.identity = plan.identity && plan.problem_of_row[i] == i;
  }
  plan.identity = plan.identity && first == n_out;
  return plan;
}

}  // namespace decaf
