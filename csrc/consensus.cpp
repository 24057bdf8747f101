// The host-side entry points of the ops (csrc/consensus.h): argument checks (csrc/checks.cpp), the
// call's plan (csrc/plan.cpp), the solve of its buckets (csrc/solve.h) and the completion of zero
// directions in the Backend (csrc/cpu, csrc/cuda).
#include "consensus.h"

#include <algorithm>
#include <vector>

#include "checks.h"
#include "plan.h"
#include "solve.h"
#include "tensor_helpers.h"

namespace decaf {
namespace {

// float32 products on CUDA computed without TF32 whatever the user's global setting (restored on exit).
struct NoTF32 {
  bool saved;
  explicit NoTF32(bool cuda) : saved(cuda && at::globalContext().allowTF32CuBLAS()) {
    if (saved) at::globalContext().setAllowTF32CuBLAS(false);
  }
  ~NoTF32() {
    if (saved) at::globalContext().setAllowTF32CuBLAS(true);
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> consensus_tsvd_impl(
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& W, int64_t rank,
    const std::string& method, const std::string& split, int64_t oversample, int64_t n_iter,
    int64_t seed, const Backend& backend) {
  const Shapes s = check_factors(A, B, W);
  check_truncation(rank, s.m, s.n, oversample, n_iter);
  Options o;
  split_exponents(split, &o.exp_b, &o.exp_a);
  o.method = method_code(method);
  o.rank = rank;
  o.oversample = oversample;
  o.n_iter = n_iter;
  o.seed = (uint64_t)seed;

  const at::Tensor Wd = W.to(at::kDouble).contiguous();
  const bool read_w = Wd.is_cpu() && !backend.plan_as_device;
  const Plan plan = read_w ? host_plan(Wd, s.r, s.m, s.n) : device_plan(s.n_out, s.n_in);
  TORCH_CHECK_VALUE(plan.max_agents * s.r <= kMaxStackedColumns, "W: a receiving agent stacks k*r = ",
                    plan.max_agents, "*", s.r, " = ", plan.max_agents * s.r, " factor columns (k = nonzero weights ",
 read_w ? "in its row" : "allowed by W's shape: W on a GPU is not read", "), at most ",
                    kMaxStackedColumns, " are supported");
  const NoTF32 no_tf32(A.is_cuda());
  const auto out_dtype = A.scalar_type();
  if (auto fused = solve_fused(A, B, plan, Wd, read_w, s, o, backend)) {
    const auto& [A_new, B_new, S] = *fused;
    return {A_new.reshape(with_lead(s, {s.n_out, rank, s.n})), B_new.reshape(with_lead(s, {s.n_out, s.m, rank})),
            S.reshape(with_lead(s, {s.n_out, rank}))};
  }

  // A in the compute dtype, batch dims flattened: rows [batch, N_in r, n].
  const at::Tensor Af = A.to(compute_dtype(A.scalar_type())).reshape({s.batch, s.n_in * s.r, s.n}).contiguous();
  const Solved out = solve_modules(Af, B, plan, Wd, s, o, backend);
  at::Tensor A_new = out.A_new.contiguous(), B_new = out.B_new, S = out.S, missing = out.missing.contiguous();
  backend.complete_rows(A_new, missing, Af, on_device(Wd, Af.device()));

  return {A_new.to(out_dtype).reshape(with_lead(s, {s.n_out, rank, s.n})),
          B_new.to(out_dtype).contiguous().reshape(with_lead(s, {s.n_out, s.m, rank})),
          S.to(out_dtype).reshape(with_lead(s, {s.n_out, rank}))};
}

at::Tensor weighted_product_sum_impl(const at::Tensor& A, const at::Tensor& B, const at::Tensor& W) {
  const Shapes s = check_factors(A, B, W);
  const at::ScalarType ct = compute_dtype(A.scalar_type());
  const int64_t NR = s.n_in * s.r;
  const at::Tensor Af = A.to(ct).reshape({s.batch, 1, NR, s.n});
  const at::Tensor Bf = B.to(ct).reshape({s.batch, s.n_in, s.m, s.r}).permute({0, 2, 1, 3}).reshape({s.batch, 1, s.m, NR});
  // Column (j, t) of Bf scaled by W[i, j] for every output agent i: [1, N_out, 1, NR].
  const at::Tensor scale = repeat_columns(on_device(W.to(ct), A.device()), s.r).view({1, s.n_out, 1, NR});
  const at::Tensor M = at::matmul(Bf * scale, Af);  // [batch, N_out, m, n]
  return M.to(A.scalar_type()).reshape(with_lead(s, {s.n_out, s.m, s.n}));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tsvd_impl(const at::Tensor& M, int64_t rank,
                                                         int64_t oversample, int64_t n_iter,
                                                         int64_t seed, const Backend& backend) {
  check_floating(M, "M");
  TORCH_CHECK_VALUE(M.dim() >= 2, "M must have shape [..., m, n], got ", M.sizes());
  const int64_t d = M.dim(), m = M.size(d - 2), n = M.size(d - 1);
  TORCH_CHECK_VALUE(m >= 1 && n >= 1, "M must be non-empty, got ", M.sizes());
  check_truncation(rank, m, n, oversample, n_iter);
  const int64_t l = std::min(rank + oversample, std::min(m, n));
  const at::ScalarType ct = compute_dtype(M.scalar_type());
  std::vector<int64_t> lead(M.sizes().begin(), M.sizes().end() - 2);
  int64_t batch = 1;
  for (int64_t v : lead) batch *= v;
  const at::Tensor Mf = M.to(ct).reshape({batch, m, n});

  // Range finder with power iterations (Halko, Martinsson & Tropp, Alg. 4.4).
  at::Tensor omega = at::empty({batch, n, l}, Mf.options().dtype(at::kDouble));
  backend.fill_normal(omega, (uint64_t)seed, 0);
  at::Tensor Qm = std::get<0>(backend.qr(at::bmm(Mf, omega.to(ct))));
  for (int64_t it = 0; it < n_iter; ++it) {
    const at::Tensor Z = std::get<0>(backend.qr(at::bmm(Mf.transpose(1, 2), Qm)));
    Qm = std::get<0>(backend.qr(at::bmm(Mf, Z)));
  }
  // M ~= Qm (Qm^T M): the exact truncated SVD of this factorized form is one consensus core.
  const at::Tensor Bsmall = at::bmm(Qm.transpose(1, 2), Mf);  // [batch, l, n]
  const at::Tensor W1 = at::ones({1, 1}, Mf.options());
  auto [Vh, U, S] = consensus_tsvd_impl(Bsmall.unsqueeze(1), Qm.unsqueeze(1), W1, rank, "exact", "none", 0, 0,
                                        seed, backend);
  std::vector<int64_t> u_shape = lead, s_shape = lead, v_shape = lead;
  u_shape.insert(u_shape.end(), {m, rank});
  s_shape.push_back(rank);
  v_shape.insert(v_shape.end(), {rank, n});
  const auto dt = M.scalar_type();
  return {U.to(dt).reshape(u_shape), S.to(dt).reshape(s_shape), Vh.to(dt).reshape(v_shape)};
}

}  // namespace decaf
