// Every bucket of a call's plan (plan.h) for all its modules: per bucket the solver its method and
// backend choose, over chunks of modules of at most Backend::module_chunk_bytes of factors.
#include "solve.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "stacks.h"
#include "tensor_helpers.h"

namespace decaf {
namespace {

// Problem weights d [P, k r] float64: row W[rows[p]] on the bucket's support of problem p,
// repeated r times per agent.
at::Tensor problem_weights(const at::Tensor& Wd, const Bucket& bk, int64_t r) {
  if (bk.all) {
    bool every_row = (int64_t)bk.rows.size() == Wd.size(0);
    for (size_t p = 0; every_row && p < bk.rows.size(); ++p) every_row = bk.rows[p] == (int64_t)p;
    // Every row in order (the device plan): no index tensor to copy to the device.
    const at::Tensor rows = every_row ? Wd : Wd.index_select(0, index_tensor(bk.rows, Wd.device()));
    return repeat_columns(rows, r);
  }
  const int64_t P = (int64_t)bk.rows.size(), K = bk.agents * r, n_in = Wd.size(1);
  at::Tensor d = at::empty({P, K}, Wd.options());
  const double* w = Wd.data_ptr<double>();
  double* out = d.data_ptr<double>();
  for (int64_t p = 0; p < P; ++p)
    for (int64_t x = 0; x < K; ++x) out[p * K + x] = w[bk.rows[p] * n_in + bk.cols[bk.group[p] * K + x] / r];
  return d;
}

// Every bucket's problems for the modules of one chunk: Af [len, N_in r, n] and Bt [len, N_in r, m]
// (compute dtype, B's columns as rows). Returns A_new [len, N_out, rank, n], B_new [len, N_out, m,
// rank], S [len, N_out, rank] and missing [len, N_out] (before completion), the split factors written
// into `dest` (the same shapes) where the plan is one bucket whose supports have one problem each,
// in the order of the rows.
Solved solve_chunk(const at::Tensor& Af, const at::Tensor& Bt, const Plan& plan, const at::Tensor& Wd,
                   const Shapes& s, const Options& o, const Backend& backend, const Solved* dest) {
  const int64_t len = Af.size(0), rank = o.rank;
  const Solved* direct = plan.buckets.size() == 1 && plan.buckets[0].slots == 1 && plan.identity ? dest : nullptr;
  std::vector<at::Tensor> A_parts, B_parts, S_parts, miss_parts;
  for (const Bucket& bk : plan.buckets) {
    const int64_t P = (int64_t)bk.rows.size(), K = bk.agents * s.r;
    if (K == 0) {  // rows of zeros: M_i = 0
      A_parts.push_back(at::zeros({len, P, rank, s.n}, Af.options()));
      B_parts.push_back(at::zeros({len, P, s.m, rank}, Af.options()));
      S_parts.push_back(at::zeros({len, P, rank}, Wd.options()));
      miss_parts.push_back(at::full({len, P}, rank, Wd.options().dtype(at::kInt)));
      continue;
    }
    const at::Tensor d = on_device(problem_weights(Wd, bk, s.r), Af.device());
    const int64_t L = std::min({rank + o.oversample, K, s.m, s.n});
    const bool randomized = (o.method == Method::kRandomized ||
                             (o.method == Method::kAuto && K > backend.auto_exact_max_columns)) && L < K;
    // The Gram path, where the backend has one (it may decline: None, the Householder path runs).
    std::optional<Solved> gram;
    if (!randomized && backend.gram_svd != nullptr) gram = solve_gram(Bt, Af, d, bk, o, backend, direct);
    const auto stacked = [&](auto solve) {
      return solve(support_rows(Bt, bk), support_rows(Af, bk), d, bk, o, backend);  // stacks [len, G, K, m|n]
    };
    const Solved part = gram ? *std::move(gram) : randomized ? stacked(solve_randomized) : stacked(solve_exact);
    A_parts.push_back(part.A_new);
    B_parts.push_back(part.B_new);
    S_parts.push_back(part.S);
    miss_parts.push_back(part.missing);
  }
  const auto join = [](const std::vector<at::Tensor>& parts) { return parts.size() == 1 ? parts[0] : at::cat(parts, 1); };
  Solved out{join(A_parts), join(B_parts), join(S_parts), join(miss_parts)};
  if (!plan.identity) {
    const at::Tensor rows = index_tensor(plan.problem_of_row, Af.device());
    out.A_new = out.A_new.index_select(1, rows);
    out.B_new = out.B_new.index_select(1, rows);
    out.S = out.S.index_select(1, rows);
    out.missing = out.missing.index_select(1, rows);
  }
  return out;
}

}  // namespace

Solved solve_modules(const at::Tensor& Af, const at::Tensor& B, const Plan& plan, const at::Tensor& Wd,
                     const Shapes& s, Options o, const Backend& backend) {
  const at::ScalarType ct = Af.scalar_type();
  const int64_t NR = s.n_in * s.r, rank = o.rank;
  // B columns as rows [len, N_in r, m] for the modules [b, b + len) of a chunk (a transposing copy,
  // made per chunk).
  const at::Tensor Bm = B.reshape({s.batch, s.n_in, s.m, s.r});
  const auto B_rows = [&](int64_t b, int64_t len) {
    return Bm.narrow(0, b, len).to(ct).transpose(-1, -2).reshape({len, NR, s.m});
  };
  // As few chunks of modules as Backend::module_chunk_bytes allows, all of one size but the last.
  const int64_t module_bytes = NR * (s.m + s.n) * (int64_t)at::elementSize(ct);
  const int64_t fit = std::max<int64_t>(1, backend.module_chunk_bytes / module_bytes);
  const int64_t chunks = s.batch <= fit ? 1 : (s.batch + fit - 1) / fit;
  const int64_t per_chunk = (s.batch + chunks - 1) / chunks;
  Solved out;
  if (chunks == 1) {
    o.first_module = 0;
    out = solve_chunk(Af, B_rows(0, s.batch), plan, Wd, s, o, backend, nullptr);
  } else {
    out.A_new = at::empty({s.batch, s.n_out, rank, s.n}, Af.options());
    out.B_new = at::empty({s.batch, s.n_out, s.m, rank}, Af.options());
    out.S = at::empty({s.batch, s.n_out, rank}, Wd.options());
    out.missing = at::empty({s.batch, s.n_out}, Wd.options().dtype(at::kInt));
    for (int64_t b = 0; b < s.batch; b += per_chunk) {
      const int64_t len = std::min(per_chunk, s.batch - b);
      const auto modules = [&](const at::Tensor& x) { return x.narrow(0, b, len); };
      const Solved dest{modules(out.A_new), modules(out.B_new), modules(out.S), modules(out.missing)};
      o.first_module = b;
      const Solved part = solve_chunk(modules(Af), B_rows(b, len), plan, Wd, s, o, backend, &dest);
      // What the solver did not write into dest (copy_ skips a tensor onto itself).
      dest.A_new.copy_(part.A_new);
      dest.B_new.copy_(part.B_new);
      dest.S.copy_(part.S);
      dest.missing.copy_(part.missing);
    }
  }
  return out;
}

}  // namespace decaf
