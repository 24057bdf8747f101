// Device-independent parts of the ops: argument checks, the batched Gram products that read the
// factors, and the batched back-projection that writes the split factors. The per-agent small
// problems in between run in a Backend (csrc/cpu, csrc/cuda).
#include "consensus.h"

#include <c10/util/Exception.h>

namespace decaf {
namespace {

at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()),
                    name, " must be a floating point tensor, got ", t.scalar_type());
}

struct Shapes {
  int64_t batch, n_in, n_out, r, m, n;
  std::vector<int64_t> lead;  // leading (batch) dims
};

Shapes check_factors(const at::Tensor& A, const at::Tensor& B, const at::Tensor& W) {
  check_floating(A, "A");
  check_floating(B, "B");
  check_floating(W, "W");
  TORCH_CHECK_VALUE(A.dim() >= 3, "A must have shape [..., N_in, r, n], got ", A.sizes());
  TORCH_CHECK_VALUE(B.dim() == A.dim(), "B must have shape [..., N_in, m, r] with the same number of dims as A, got B ",
                    B.sizes(), " and A ", A.sizes());
  TORCH_CHECK_VALUE(A.scalar_type() == B.scalar_type(), "B must have the dtype of A (", A.scalar_type(),
                    "), got ", B.scalar_type());
  TORCH_CHECK_VALUE(A.device() == B.device(), "B must be on the device of A (", A.device(), "), got ", B.device());
  TORCH_CHECK_VALUE(W.device() == A.device(), "W must be on the device of A (", A.device(), "), got ", W.device());
  TORCH_CHECK_VALUE(W.dim() == 2, "W must have shape [N_out, N_in], got ", W.sizes());
  const int64_t d = A.dim();
  Shapes s;
  s.n_in = A.size(d - 3);
  s.r = A.size(d - 2);
  s.n = A.size(d - 1);
  s.m = B.size(d - 2);
  TORCH_CHECK_VALUE(B.size(d - 3) == s.n_in && B.size(d - 1) == s.r,
                    "B must have shape [..., N_in, m, r] = [..., ", s.n_in, ", m, ", s.r, "] to match A ", A.sizes(),
                    ", got ", B.sizes());
  for (int64_t k = 0; k < d - 3; ++k) {
    TORCH_CHECK_VALUE(A.size(k) == B.size(k), "B must have the leading dims of A ", A.sizes(), ", got ", B.sizes());
    s.lead.push_back(A.size(k));
  }
  TORCH_CHECK_VALUE(s.n_in >= 1 && s.r >= 1 && s.m >= 1 && s.n >= 1,
                    "A and B must be non-empty, got A ", A.sizes(), " and B ", B.sizes());
  TORCH_CHECK_VALUE(W.size(1) == s.n_in, "W must have shape [N_out, N_in] with N_in = ", s.n_in,
                    " (the agents in A and B), got ", W.sizes());
  TORCH_CHECK_VALUE(W.size(0) >= 1, "W must have at least one row, got ", W.sizes());
  s.n_out = W.size(0);
  s.batch = 1;
  for (int64_t v : s.lead) s.batch *= v;
  return s;
}

std::vector<int64_t> with_lead(const Shapes& s, std::initializer_list<int64_t> tail) {
  std::vector<int64_t> out = s.lead;
  out.insert(out.end(), tail);
  return out;
}

void split_exponents(const std::string& split, double* exp_b, double* exp_a) {
  if (split == "balanced") {
    *exp_b = 0.5;
    *exp_a = 0.5;
  } else if (split == "left") {
    *exp_b = 1.0;
    *exp_a = 0.0;
  } else if (split == "right") {
    *exp_b = 0.0;
    *exp_a = 1.0;
  } else if (split == "none") {  // internal: U and V^T unscaled (tsvd)
    *exp_b = 0.0;
    *exp_a = 0.0;
  } else {
    TORCH_CHECK_VALUE(false, "split must be 'balanced', 'left' or 'right', got '", split, "'");
  }
}

int method_code(const std::string& method) {
  if (method == "exact") return kExact;
  if (method == "randomized") return kRandomized;
  if (method == "auto") return kAuto;
  TORCH_CHECK_VALUE(false, "method must be 'auto', 'exact' or 'randomized' (or 'dense' in Python), got '", method, "'");
  return kAuto;
}

}  // namespace

CoreBatchView view_of(CoreBatch& cb) {
  CoreBatchView v;
  v.GB = cb.GB.data_ptr<double>();
  v.GA = cb.GA.data_ptr<double>();
  v.sB = cb.sB.data_ptr<double>();
  v.sA = cb.sA.data_ptr<double>();
  v.W = cb.W.data_ptr<double>();
  v.coefB = cb.coefB.data_ptr<double>();
  v.coefA = cb.coefA.data_ptr<double>();
  v.S = cb.S.data_ptr<double>();
  v.missing = cb.missing.data_ptr<int>();
  v.n_out = cb.W.size(0);
  v.n_in = cb.W.size(1);
  v.problems = cb.GB.size(0) * v.n_out;
  v.NR = cb.GB.size(1);
  v.r = cb.r;
  v.rank = cb.rank;
  v.method = cb.method;
  v.oversample = cb.oversample;
  v.n_iter = cb.n_iter;
  v.exp_b = cb.exp_b;
  v.exp_a = cb.exp_a;
  v.seed = cb.seed;
  return v;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> consensus_tsvd_impl(
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& W, int64_t rank,
    const std::string& method, const std::string& split, int64_t oversample, int64_t n_iter,
    int64_t seed, const Backend& backend) {
  const Shapes s = check_factors(A, B, W);
  TORCH_CHECK_VALUE(rank >= 1 && rank <= std::min(s.m, s.n), "rank must be in [1, min(m, n)] = [1, ",
                    std::min(s.m, s.n), "], got ", rank);
  TORCH_CHECK_VALUE(oversample >= 0, "oversample must be >= 0, got ", oversample);
  TORCH_CHECK_VALUE(n_iter >= 0, "n_iter must be >= 0, got ", n_iter);
  TORCH_CHECK_VALUE(s.n_in * s.r <= 4096, "N_in * r must be at most 4096, got ", s.n_in * s.r);

  CoreBatch cb;
  split_exponents(split, &cb.exp_b, &cb.exp_a);
  cb.method = method_code(method);
  cb.r = s.r;
  cb.rank = rank;
  cb.oversample = (int)oversample;
  cb.n_iter = (int)n_iter;
  cb.seed = (uint64_t)seed;

  const at::ScalarType ct = compute_dtype(A.scalar_type());
  const int64_t NR = s.n_in * s.r;
  // Factors in the compute dtype, batch dims flattened: A [batch, N_in r, n], B [batch, m, N_in r].
  const at::Tensor Af = A.to(ct).reshape({s.batch, NR, s.n});
  const at::Tensor Bf = B.to(ct).reshape({s.batch, s.n_in, s.m, s.r}).permute({0, 2, 1, 3}).reshape({s.batch, s.m, NR});
  // Read pass: Gram matrices and sums in float64 (the conditioning of the stacks is squared here).
  const at::Tensor Ad = Af.to(at::kDouble), Bd = Bf.to(at::kDouble);
  cb.GA = at::bmm(Ad, Ad.transpose(1, 2)).contiguous();
  cb.GB = at::bmm(Bd.transpose(1, 2), Bd).contiguous();
  const auto dopts = Af.options().dtype(at::kDouble);
  cb.sA = at::matmul(Ad, at::ones({s.n, 1}, dopts)).view({s.batch, NR});
  cb.sB = at::matmul(at::ones({1, s.m}, dopts), Bd).view({s.batch, NR});
  cb.W = W.to(at::kDouble).contiguous();
  cb.coefB = at::zeros({s.batch, s.n_out, NR, rank}, dopts);
  cb.coefA = at::zeros({s.batch, s.n_out, NR, rank}, dopts);
  cb.S = at::zeros({s.batch, s.n_out, rank}, dopts);
  cb.missing = at::zeros({s.batch, s.n_out}, dopts.dtype(at::kInt));
  backend.solve_cores(cb);

  // Write pass: B_new [batch, m, N_out rank] = Bf @ coefB, A_new [batch, N_out rank, n] = coefA^T @ Af.
  const at::Tensor cB = cb.coefB.permute({0, 2, 1, 3}).reshape({s.batch, NR, s.n_out * rank}).to(ct);
  const at::Tensor cA = cb.coefA.permute({0, 1, 3, 2}).reshape({s.batch, s.n_out * rank, NR}).to(ct);
  at::Tensor B_new = at::bmm(Bf, cB).view({s.batch, s.m, s.n_out, rank}).permute({0, 2, 1, 3});
  at::Tensor A_new = at::bmm(cA, Af).view({s.batch, s.n_out, rank, s.n});
  backend.complete_identity(A_new, cb.missing);

  const auto out_dtype = A.scalar_type();
  return {A_new.to(out_dtype).reshape(with_lead(s, {s.n_out, rank, s.n})),
          B_new.to(out_dtype).contiguous().reshape(with_lead(s, {s.n_out, s.m, rank})),
          cb.S.to(out_dtype).reshape(with_lead(s, {s.n_out, rank}))};
}

at::Tensor weighted_product_sum_impl(const at::Tensor& A, const at::Tensor& B, const at::Tensor& W) {
  const Shapes s = check_factors(A, B, W);
  const at::ScalarType ct = compute_dtype(A.scalar_type());
  const int64_t NR = s.n_in * s.r;
  const at::Tensor Af = A.to(ct).reshape({s.batch, 1, NR, s.n});
  const at::Tensor Bf = B.to(ct).reshape({s.batch, s.n_in, s.m, s.r}).permute({0, 2, 1, 3}).reshape({s.batch, 1, s.m, NR});
  // Column (j, t) of Bf scaled by W[i, j] for every output agent i: [1, N_out, 1, NR].
  const at::Tensor scale = W.to(ct).repeat_interleave(s.r, 1).view({1, s.n_out, 1, NR});
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
  TORCH_CHECK_VALUE(rank >= 1 && rank <= std::min(m, n), "rank must be in [1, min(m, n)] = [1, ",
                    std::min(m, n), "], got ", rank);
  TORCH_CHECK_VALUE(oversample >= 0, "oversample must be >= 0, got ", oversample);
  TORCH_CHECK_VALUE(n_iter >= 0, "n_iter must be >= 0, got ", n_iter);
  const int64_t l = std::min(rank + oversample, std::min(m, n));
  const at::ScalarType ct = compute_dtype(M.scalar_type());
  std::vector<int64_t> lead(M.sizes().begin(), M.sizes().end() - 2);
  int64_t batch = 1;
  for (int64_t v : lead) batch *= v;
  const at::Tensor Mf = M.to(ct).reshape({batch, m, n});

  // Range finder with power iterations (Halko, Martinsson & Tropp, Alg. 4.4).
  at::Tensor omega = at::empty({batch, n, l}, Mf.options().dtype(at::kDouble));
  backend.fill_normal(omega, (uint64_t)seed);
  at::Tensor Qm = std::get<0>(at::linalg_qr(at::bmm(Mf, omega.to(ct))));
  for (int64_t it = 0; it < n_iter; ++it) {
    const at::Tensor Z = std::get<0>(at::linalg_qr(at::bmm(Mf.transpose(1, 2), Qm)));
    Qm = std::get<0>(at::linalg_qr(at::bmm(Mf, Z)));
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
