// The fused exact path (csrc/solve.h, solve_fused): the whole call in a handful of launches, none of
// which reads a value on the host, for float32-computed inputs on a backend with FusedKernels (CUDA):
//   1. stage: the float64 stacks X_A [batch, NR + 1, n], X_B [batch, NR + 1, m] (a row of ones last);
//   2. two GEMMs: the all-pairs Grams X X^T [batch, NR + 1, NR + 1] (their last rows: column sums);
//   3. core: one team per (module, problem) (common/gram_core.h): each support's Gram blocks, Cholesky,
//      the top eigenpairs of the core, the coefficient rows over all NR stacked columns, S, missing;
//   4. two GEMMs: coefficient rows times the stacks, B_new^T [batch, N_out rank, m] and A_new;
//   5. finish: one team per (module, row): completion (common/completion.h), outputs in A's dtype.
// W on the host adds one asynchronous copy (the plan's table, W included); W on the device in another
// dtype than float64, its conversion. The Grams cover all NR stacked columns (a ring's rows read their
// neighbors' blocks of them), so the call's GEMMs do not depend on the graph.
#include <ATen/record_function.h>

#include <algorithm>
#include <vector>

#include "common/gram_core.h"
#include "solve.h"
#include "tensor_helpers.h"

namespace decaf {
namespace {

// The host plan as common/gram_core.h reads it (table_problem): each row's problem, W, and per problem
// its stacked columns and their weights.
at::Tensor fused_table(const Plan& plan, const at::Tensor& Wd, int64_t r, int64_t kmax) {
  const int64_t n_out = Wd.size(0), n_in = Wd.size(1);
  int64_t problems = 0;
  for (const Bucket& bk : plan.buckets) problems += (int64_t)bk.rows.size();
  std::vector<double> t(table_problem(n_out, n_in, kmax, problems), 0.0);
  for (int64_t i = 0; i < n_out; ++i) t[i] = (double)plan.problem_of_row[i];
  const double* w = Wd.data_ptr<double>();
  std::copy(w, w + n_out * n_in, t.begin() + table_weights(n_out));
  int64_t p = 0;
  for (const Bucket& bk : plan.buckets) {
    const int64_t K = bk.agents * r;
    for (size_t x = 0; x < bk.rows.size(); ++x, ++p) {
      double* row = t.data() + table_problem(n_out, n_in, kmax, p);
      row[0] = (double)K;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = bk.cols[bk.group[x] * K + k];
        row[1 + k] = w[bk.rows[x] * n_in + c / r];
        row[1 + kmax + k] = (double)c;
      }
    }
  }
  return at::tensor(t, Wd.options());
}

}  // namespace

std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> solve_fused(
    const at::Tensor& A, const at::Tensor& B, const Plan& plan, const at::Tensor& Wd, bool host_plan,
    const Shapes& s, const Options& o, const Backend& backend) {
  const int64_t NR = s.n_in * s.r, kmax = plan.max_agents * s.r, q = std::min(o.rank, kmax);
  const bool exact = o.method == Method::kExact || (o.method == Method::kAuto && kmax <= backend.auto_exact_max_columns);
  if (backend.fused == nullptr || A.scalar_type() == at::kDouble || !exact || kmax < 1 || kmax > kFusedMaxColumns ||
      (kmax > kSmallEighMax && q > kKrylovMaxRank) || !backend.fused->fits(kmax))
    return std::nullopt;
  const at::TensorOptions f64 = A.options().dtype(at::kDouble);
  at::Tensor XA = at::empty({s.batch, NR + 1, s.n}, f64), XB = at::empty({s.batch, NR + 1, s.m}, f64);
  backend.fused->stage(A.reshape({s.batch, NR, s.n}), B.reshape({s.batch, s.n_in, s.m, s.r}), XA, XB);
  FusedCore call;
  call.GB = at::bmm(XB, XB.transpose(1, 2));
  call.GA = at::bmm(XA, XA.transpose(1, 2));
  at::Tensor W_dev;  // W [n_out, n_in] float64 on the device, for the completion
  if (host_plan) {
    RECORD_FUNCTION("decaf::copy_plan_to_device", std::vector<c10::IValue>({Wd}));  // one asynchronous copy
    call.table = on_device(fused_table(plan, Wd, s.r, kmax), A.device());
    W_dev = call.table.narrow(0, table_weights(s.n_out), s.n_out * s.n_in).view({s.n_out, s.n_in});
  } else {
    call.W = W_dev = Wd;
  }
  call.problems = 0;
  for (const Bucket& bk : plan.buckets) call.problems += (int64_t)bk.rows.size();
  call.n_out = s.n_out, call.n_in = s.n_in, call.r = s.r, call.rank = o.rank, call.kmax = kmax;
  call.mn = std::max(s.m, s.n), call.exp_b = o.exp_b, call.exp_a = o.exp_a, call.eps = eps_of(at::kFloat);
  call.coef_B = at::empty({s.batch, s.n_out, o.rank, NR}, f64);
  call.coef_A = at::empty({s.batch, s.n_out, o.rank, NR}, f64);
  call.S = at::empty({s.batch, s.n_out, o.rank}, f64);
  call.missing = at::empty({s.batch, s.n_out}, A.options().dtype(at::kInt));
  backend.fused->core(call);
  const at::Tensor BT = at::bmm(call.coef_B.view({s.batch, s.n_out * o.rank, NR}), XB.narrow(1, 0, NR));
  at::Tensor A64 = at::bmm(call.coef_A.view({s.batch, s.n_out * o.rank, NR}), XA.narrow(1, 0, NR))
                       .view({s.batch, s.n_out, o.rank, s.n});
  at::Tensor A_out = at::empty({s.batch, s.n_out, o.rank, s.n}, A.options());
  at::Tensor B_out = at::empty({s.batch, s.n_out, s.m, o.rank}, A.options());
  at::Tensor S_out = at::empty({s.batch, s.n_out, o.rank}, A.options());
  backend.fused->finish(A64, BT, call.S, call.missing, XA.narrow(1, 0, NR), W_dev, A_out, B_out, S_out);
  return std::make_tuple(A_out, B_out, S_out);
}

}  // namespace decaf
