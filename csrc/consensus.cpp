// Device-independent parts of the ops: argument checks, the batched Gram products that read the
// factors, and the batched back-projection that writes the split factors, for the problems of the
// call's plan (plan.h), in chunks of modules. The per-agent small problems in between run in a
// Backend (csrc/cpu, csrc/cuda).
#include "consensus.h"
#include "plan.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

namespace decaf {
namespace {

at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

double eps_of(at::ScalarType compute) {
  return compute == at::kDouble ? 2.220446049250313e-16 : 1.1920928955078125e-07;
}

// The smallest Gram diagonal entry (a sum of squares formed in `products`) trusted to full precision:
// min_normal / eps^2, so that terms lost to underflow (each below min_normal) cost less than
// len eps^2 of it. Smaller column norms (float32: below about 1e-12) take the Householder path.
double min_gram_diagonal(at::ScalarType products) {
  const double min_normal =
      products == at::kDouble ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
  return min_normal / (eps_of(products) * eps_of(products));
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
  TORCH_CHECK_VALUE(W.device() == A.device() || W.is_cpu(), "W must be on the CPU or on the device of A (",
                    A.device(), "), got ", W.device());
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

enum class Method { kExact, kRandomized, kAuto };

Method method_code(const std::string& method) {
  if (method == "exact") return Method::kExact;
  if (method == "randomized") return Method::kRandomized;
  if (method == "auto") return Method::kAuto;
  TORCH_CHECK_VALUE(false, "method must be 'auto', 'exact' or 'randomized' (or 'dense' in Python), got '", method, "'");
  return Method::kAuto;
}

// t on `device`: a host tensor goes through pinned memory as an asynchronous copy (no host
// synchronization; the caching host allocator keeps the pinned block until the copy has run).
at::Tensor on_device(const at::Tensor& t, const at::Device& device) {
  if (t.device() == device) return t;
  return (t.is_cpu() && device.is_cuda() ? t.pin_memory() : t).to(device, /*non_blocking=*/true);
}

// x [rows, N] -> [rows, N * r], each column repeated r times (a copy of an expanded view:
// repeat_interleave may read its output size on the host).
at::Tensor repeat_columns(const at::Tensor& x, int64_t r) {
  return x.unsqueeze(-1).expand({x.size(0), x.size(1), r}).reshape({x.size(0), x.size(1) * r});
}

at::Tensor index_tensor(const std::vector<int64_t>& v, const at::Device& device) {
  return on_device(at::tensor(v, at::TensorOptions().dtype(at::kLong)), device);
}

// Rows [problems] of x [batch, groups, ...] for the bucket's problems (a view when they coincide).
at::Tensor per_problem(const at::Tensor& x, const Bucket& bk) {
  bool same = bk.rows.size() == (size_t)bk.supports;
  for (size_t p = 0; same && p < bk.group.size(); ++p) same = bk.group[p] == (int64_t)p;
  if (same) return x;
  if (bk.supports == 1) {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape[1] = (int64_t)bk.rows.size();
    return x.expand(shape);
  }
  return x.index_select(1, index_tensor(bk.group, x.device()));
}

// The split factors of one bucket's problems, before completion.
struct Solved {
  at::Tensor A_new, B_new;  // [batch, P, rank, n], [batch, P, m, rank] (compute dtype)
  at::Tensor S;             // [batch, P, rank] float64
  at::Tensor missing;       // int32 [batch, P]: trailing zero-sigma rows of A_new to complete
};

struct Options {
  int64_t rank, oversample, n_iter;
  double exp_b, exp_a;
  Method method;
  uint64_t seed;
  int64_t first_module;  // of the chunk being solved: its random test matrices continue the whole call's
};

// From the core's SVD in orthonormal coordinates (U [.., Kb, c], Sv [.., c], V [.., Ka, c],
// float64) and the coordinates of the all-ones vector on both sides (sB [.., Kb], sA [.., Ka]):
// the coefficients of the split factors, S and the count of zero directions. Singular values at or
// below tol_rel * sigma_1 count as zero: their coefficients are zero, to be completed.
struct Coefficients {
  at::Tensor B, A, S, missing;  // [.., Kb, rank], [.., Ka, rank], [.., rank], int32 [..]
};

Coefficients split_coefficients(const at::Tensor& U, const at::Tensor& Sv, const at::Tensor& V,
                                const at::Tensor& sB, const at::Tensor& sA, const Options& o, double tol_rel) {
  const int64_t q = std::min<int64_t>(Sv.size(-1), o.rank);
  const at::Tensor u = U.narrow(-1, 0, q), s = Sv.narrow(-1, 0, q), v = V.narrow(-1, 0, q);
  const at::Tensor keep = s > s.narrow(-1, 0, 1) * tol_rel;
  // Sign rule: the left vector's entries sum to a positive number (negligible sum: the right one's).
  const at::Tensor cu = sB.unsqueeze(-1) * u, cv = sA.unsqueeze(-1) * v;
  const at::Tensor t1 = cu.sum(-2), t2 = cv.sum(-2);
  const at::Tensor flip = at::where(t1.abs() > cu.abs().sum(-2) * 1e-10, t1 < 0, t2 < cv.abs().sum(-2) * -1e-10);
  const at::Tensor sgn = 1.0 - 2.0 * flip.to(at::kDouble);
  const at::Tensor zero = at::zeros({}, s.options());
  Coefficients c;
  c.B = u * at::where(keep, sgn * s.pow(o.exp_b), zero).unsqueeze(-2);
  c.A = v * at::where(keep, sgn * s.pow(o.exp_a), zero).unsqueeze(-2);
  c.S = at::where(keep, s, zero);
  if (q < o.rank) {
    c.B = at::constant_pad_nd(c.B, {0, o.rank - q});
    c.A = at::constant_pad_nd(c.A, {0, o.rank - q});
    c.S = at::constant_pad_nd(c.S, {0, o.rank - q});
  }
  c.missing = (o.rank - keep.sum(-1)).to(at::kInt);
  return c;
}

// Position of each problem among its bucket's (support, slot) pairs, and whether that is the
// identity (one problem per support, in support order).
std::vector<int64_t> slot_positions(const Bucket& bk, bool* identity) {
  std::vector<int64_t> at_slot(bk.rows.size());
  *identity = (int64_t)at_slot.size() == bk.supports * bk.slots;
  for (size_t p = 0; p < at_slot.size(); ++p) {
    at_slot[p] = bk.group[p] * bk.slots + bk.slot[p];
    *identity = *identity && at_slot[p] == (int64_t)p;
  }
  return at_slot;
}

// Coefficients [batch, P, K', rank] laid out as the right-hand sides of one Householder
// application per support: [batch, supports, rows, slots * rank], zero-padded to `rows`.
at::Tensor per_support_rhs(const at::Tensor& coef, const Bucket& bk, int64_t rows) {
  const int64_t batch = coef.size(0), Kc = coef.size(2), rank = coef.size(3);
  at::Tensor buf = at::zeros({batch, bk.supports * bk.slots, Kc, rank}, coef.options());
  bool identity;
  const std::vector<int64_t> at_slot = slot_positions(bk, &identity);
  buf.index_copy_(1, index_tensor(at_slot, coef.device()), coef);
  buf = buf.view({batch, bk.supports, bk.slots, Kc, rank}).permute({0, 1, 3, 2, 4})
            .reshape({batch, bk.supports, Kc, bk.slots * rank});
  return at::constant_pad_nd(buf, {0, 0, 0, rows - Kc});
}

// Inverse of per_support_rhs after the Householder application: [batch, supports, rows, slots *
// rank] -> [batch, P, rows, rank].
at::Tensor per_problem_result(const at::Tensor& out, const Bucket& bk, int64_t rank) {
  const int64_t batch = out.size(0), rows = out.size(2);
  const at::Tensor flat = out.view({batch, bk.supports, rows, bk.slots, rank}).permute({0, 1, 3, 2, 4})
                              .reshape({batch, bk.supports * bk.slots, rows, rank});
  bool identity;
  const std::vector<int64_t> at_slot = slot_positions(bk, &identity);
  return identity ? flat : flat.index_select(1, index_tensor(at_slot, out.device()));
}

// Coefficients [batch, P, K, rank] as the rows of one product per support:
// [batch, G, slots * rank, K], problem p in the rank rows of its slot (unused slots zero).
at::Tensor per_support_rows(const at::Tensor& coef, const Bucket& bk) {
  const int64_t batch = coef.size(0), K = coef.size(2), rank = coef.size(3);
  bool identity;
  const std::vector<int64_t> at_slot = slot_positions(bk, &identity);
  const at::Tensor rows = coef.transpose(-1, -2);  // [batch, P, rank, K]
  if (identity) return rows.reshape({batch, bk.supports, bk.slots * rank, K});
  at::Tensor buf = at::zeros({batch, bk.supports * bk.slots, rank, K}, coef.options());
  buf.index_copy_(1, index_tensor(at_slot, coef.device()), rows);
  return buf.view({batch, bk.supports, bk.slots * rank, K});
}

// Inverse of per_support_rows after the product: [batch, G, slots * rank, c] -> [batch, P, rank, c],
// or [batch, G, c, slots * rank] -> [batch, P, c, rank] when `columns`.
at::Tensor per_problem_rows(const at::Tensor& out, const Bucket& bk, int64_t rank, bool columns) {
  bool identity;
  const std::vector<int64_t> at_slot = slot_positions(bk, &identity);
  const int64_t batch = out.size(0), P = bk.supports * bk.slots;
  const at::Tensor flat =
      columns ? out.view({batch, bk.supports, out.size(2), bk.slots, rank}).transpose(2, 3)
                    .reshape({batch, P, out.size(2), rank})
              : out.view({batch, P, rank, out.size(-1)});
  return identity ? flat : flat.index_select(1, index_tensor(at_slot, out.device()));
}

// Exact: Householder QR of each support's stacked factors, Bs^T = Q_B R_B and As^T = Q_A R_A
// (compute dtype, backward stable), so M = Q_B (R_B D R_A^T) Q_A^T; the SVD of the small core in
// float64; the split factors written back through the Householder reflectors.
// Bs [batch, G, K, m] (B columns as rows), As [batch, G, K, n], d [P, K] float64.
Solved solve_exact(const at::Tensor& Bs, const at::Tensor& As, const at::Tensor& d, const Bucket& bk,
                   const Options& o, const Backend& backend) {
  const int64_t batch = Bs.size(0), K = Bs.size(2), m = Bs.size(3), n = As.size(3), P = d.size(0);
  const int64_t Kb = std::min(m, K), Ka = std::min(n, K);
  const auto [hB, tauB] = backend.geqrf(Bs.transpose(-1, -2));  // [batch, G, m, K]
  const auto [hA, tauA] = backend.geqrf(As.transpose(-1, -2));  // [batch, G, n, K]
  const at::Tensor RB = per_problem(hB.narrow(-2, 0, Kb).triu().to(at::kDouble), bk);  // [batch, P, Kb, K]
  const at::Tensor RA = per_problem(hA.narrow(-2, 0, Ka).triu().to(at::kDouble), bk);  // [batch, P, Ka, K]
  const at::Tensor core = at::matmul(RB * d.view({1, P, 1, K}), RA.transpose(-1, -2));  // [batch, P, Kb, Ka]
  at::Tensor U, Sv, V;
  if (Bs.scalar_type() == at::kFloat) {
    // float32 inputs: the top eigenpairs of core core^T in float64 (several times cheaper than an
    // SVD); the squared conditioning costs sigma errors up to ~sqrt(K eps64) sigma_1 ~ 1e-7 sigma_1,
    // below the float32 QR's own error.
    const auto [lam, Z] = backend.eigh(at::matmul(core, core.transpose(-1, -2)));  // ascending
    const int64_t q = std::min(o.rank, Kb);
    U = Z.narrow(-1, Kb - q, q).flip(-1);
    Sv = lam.narrow(-1, Kb - q, q).flip(-1).clamp_min(0).sqrt();
    const at::Tensor inv = at::where(Sv > 0, 1.0 / Sv, at::zeros({}, Sv.options()));
    V = at::matmul(core.transpose(-1, -2), U) * inv.unsqueeze(-2);
  } else {
    const auto [Uf, Sf, Vh] = backend.svd(core);
    U = Uf;
    Sv = Sf;
    V = Vh.transpose(-1, -2);
  }
  // Coordinates of the all-ones vector in the orthonormal bases (sign rule).
  const auto ones = [&](int64_t rows) { return at::ones({batch, bk.supports, rows, 1}, Bs.options()); };
  const at::Tensor sB = per_problem(backend.ormqr(hB, tauB, ones(m), true, true).narrow(-2, 0, Kb).squeeze(-1), bk);
  const at::Tensor sA = per_problem(backend.ormqr(hA, tauA, ones(n), true, true).narrow(-2, 0, Ka).squeeze(-1), bk);
  const double tol = 16.0 * std::sqrt((double)std::max({m, n, K})) * eps_of(Bs.scalar_type());
  const Coefficients c = split_coefficients(U, Sv, V, sB.to(at::kDouble), sA.to(at::kDouble), o, tol);
  const at::Tensor ct_B = per_support_rhs(c.B.to(Bs.scalar_type()), bk, m);
  const at::Tensor ct_A = per_support_rhs(c.A.to(Bs.scalar_type()), bk, n);
  Solved out;
  out.B_new = per_problem_result(backend.ormqr(hB, tauB, ct_B, true, false), bk, o.rank);  // [batch, P, m, rank]
  out.A_new = per_problem_result(backend.ormqr(hA, tauA, ct_A, true, false), bk, o.rank).transpose(-1, -2);
  out.S = c.S;
  out.missing = c.missing;
  return out;
}

// Rows of x [batch, N_in r, c] stacked per support of the bucket: [batch, G, K, c].
at::Tensor support_rows(const at::Tensor& x, const Bucket& bk) {
  if (bk.all) return x.unsqueeze(1);
  const int64_t batch = x.size(0), NR = x.size(1), K = (int64_t)bk.cols.size() / bk.supports;
  // Whole rows of the flattened [batch N_in r, c] (ATen's row-copy path; selecting along dim 1 is
  // several times slower).
  const at::Tensor cols = index_tensor(bk.cols, x.device());
  const at::Tensor rows = (at::arange(batch, cols.options()).unsqueeze(1) * NR + cols.unsqueeze(0)).view({-1});
  return x.reshape({batch * NR, x.size(2)}).index_select(0, rows).view({batch, bk.supports, K, x.size(2)});
}

// f(Xs, begin, len) for the stacked rows Xs [len, G, K, c] of each support (support_rows) of
// X [batch, N_in r, c], over chunks of modules of at most backend.stack_chunk_bytes of stacks; the
// results are concatenated along dim 0.
template <class F>
at::Tensor over_stacks(const at::Tensor& X, const Bucket& bk, const Backend& backend, F f) {
  const int64_t batch = X.size(0), module_bytes = (int64_t)bk.cols.size() * X.size(2) * X.element_size();
  const int64_t chunk = bk.all ? batch : std::max<int64_t>(1, backend.stack_chunk_bytes / module_bytes);
  std::vector<at::Tensor> parts;
  for (int64_t b = 0; b < batch; b += chunk) {
    const int64_t len = std::min(chunk, batch - b);
    parts.push_back(f(support_rows(X.narrow(0, b, len), bk), b, len));
  }
  return parts.size() == 1 ? parts[0] : at::cat(parts, 0);
}

// A gathered element of a stack (support_rows) costs about as much as this many multiply-adds of the
// float32 GEMMs around it (CPU preset: 0.12 ms to gather 1.8 M elements, 0.42 ms for 38 M
// multiply-adds in one batched GEMM).
constexpr int64_t kGatherCost = 16;

// Gram matrices [batch, G, K, K] (float64, computed in X's dtype) of each support's stacked rows of
// X [batch, N_in r, c], by whichever computes fewer dot products: blocks of the all-pairs Gram (NR^2,
// plus gathering the blocks), or one Gram per support. Per support, the backend's kernel reads the
// rows in place and computes the upper triangle, about G K (K + 1) / 2 (CPU); without a kernel, one
// GEMM per gathered stack costs G K (K + kGatherCost) (CUDA).
at::Tensor support_grams(const at::Tensor& X, const Bucket& bk, const Backend& backend) {
  const int64_t NR = X.size(1), G = bk.supports, K = (int64_t)bk.cols.size() / G;
  if (!bk.all && backend.support_grams != nullptr && G * K * (K + 1) / 2 <= NR * NR)
    return backend.support_grams(X, bk.cols, G);
  if (bk.all || NR * NR > G * K * (K + kGatherCost))
    return over_stacks(X, bk, backend, [](const at::Tensor& Xs, int64_t, int64_t) {
      return at::matmul(Xs, Xs.transpose(-1, -2)).to(at::kDouble);
    });
  std::vector<int64_t> at_pair;  // [G, K, K] entries of the all-pairs Gram
  for (int64_t g = 0; g < G; ++g)
    for (int64_t a = 0; a < K; ++a)
      for (int64_t b = 0; b < K; ++b) at_pair.push_back(bk.cols[g * K + a] * NR + bk.cols[g * K + b]);
  const at::Tensor all = at::matmul(X, X.transpose(-1, -2)).view({X.size(0), NR * NR});
  const at::Tensor pairs = index_tensor(at_pair, X.device()).unsqueeze(0).expand({X.size(0), G * K * K});
  return at::gather(all, 1, pairs).to(at::kDouble).view({X.size(0), G, K, K});
}

// coef_rows [batch, G, R, K] times each support's stacked rows of X [batch, N_in r, c]:
// [batch, G, R, c], or its transpose [batch, G, c, R] (possibly a view) when `columns`. A sparse
// bucket goes to the backend's kernel where it has one (CPU), which writes into `out` where it is
// defined (contiguous, that shape). Otherwise, through coefficient rows scattered over all N_in r
// rows (one GEMM, no gather) when those extra multiply-adds cost less than gathering the stacks
// (dense graphs, few agents); that GEMM's G R output columns are wide, so for `columns` it is
// computed as X^T times the coefficients, leaving B's columns in B's own layout.
at::Tensor times_stacks(const at::Tensor& coef_rows, const at::Tensor& X, const Bucket& bk, bool columns,
                        const Backend& backend, const at::Tensor& out) {
  if (!bk.all && backend.times_stacks != nullptr) return backend.times_stacks(coef_rows, X, bk.cols, columns, out);
  const int64_t batch = X.size(0), NR = X.size(1), c = X.size(2);
  const int64_t G = bk.supports, R = coef_rows.size(2), K = coef_rows.size(3);
  const auto oriented = [columns](const at::Tensor& rows) { return columns ? rows.transpose(-1, -2) : rows; };
  if (bk.all) return oriented(at::matmul(coef_rows, X.unsqueeze(1)));
  if (R * NR <= R * K + K * kGatherCost) {
    const at::Tensor cols = index_tensor(bk.cols, X.device()).view({1, G, 1, K}).expand_as(coef_rows);
    const at::Tensor full = at::zeros({batch, G, R, NR}, coef_rows.options()).scatter_(-1, cols, coef_rows);
    if (columns) return at::matmul(X.transpose(1, 2), full.view({batch, G * R, NR}).transpose(1, 2))
                            .view({batch, c, G, R}).transpose(1, 2);
    return at::matmul(full.view({batch, G * R, NR}), X).view({batch, G, R, c});
  }
  return oriented(over_stacks(X, bk, backend, [&](const at::Tensor& Xs, int64_t b, int64_t len) {
    return at::matmul(coef_rows.narrow(0, b, len), Xs);
  }));
}

// Exact, from Gram matrices: G_B = Bs Bs^T and G_A = As As^T per support in the compute
// dtype, Cholesky R_B^T R_B = G_B and R_A^T R_A = G_A, so that P = Bs^T = U_P R_B with
// U_P = P R_B^{-1} orthonormal (likewise Q = As^T = U_Q R_A) and M = U_P (R_B D R_A^T) U_Q^T.
// float64: SVD of the core R_B D R_A^T. float32: eigenpairs of H = R_B D G_A D R_B^T = core core^T
// (squared conditioning, as in solve_exact), V from M^T U / sigma. These small problems run in
// backend.gram_svd (CPU: as above; CUDA: a jittered Cholesky factorization of float64 Grams and
// batched small eigensolves, csrc/gram_svd_batched.cpp). The split factors are P and Q times small
// coefficient matrices: one pass over the stacks for the Grams, one for the write-back. None when
// backend.gram_svd declines (a Gram not safely positive definite on the CPU): solve_exact then runs
// instead. With `dest` (the call's outputs for these modules, given when each support of the bucket
// has one problem and these are the call's rows in order), the split factors are written into it.
std::optional<Solved> solve_gram(const at::Tensor& Bt, const at::Tensor& Af, const at::Tensor& d, const Bucket& bk,
                                 const Options& o, const Backend& backend, const Solved* dest) {
  const int64_t K = d.size(1), m = Bt.size(2), n = Af.size(2);
  const at::ScalarType ct = Bt.scalar_type(), products = backend.float64_grams ? at::kDouble : ct;
  const auto gram_of = [&](const at::Tensor& X) { return support_grams(X.to(products), bk, backend); };
  const auto svd = backend.gram_svd(backend, gram_of(Bt), gram_of(Af), d, bk.group,
                                    [&](const at::Tensor& x) { return per_problem(x, bk); }, std::min(o.rank, K),
                                    ct == at::kFloat, (double)K * eps_of(ct),
                                    min_gram_diagonal(products));
  if (!svd) return std::nullopt;
  // Column sums of P and Q: the sums of the singular vectors' entries are sB^T U and sA^T V.
  const at::Tensor sB = per_problem(support_rows(Bt.sum(-1, true), bk).squeeze(-1).to(at::kDouble), bk);
  const at::Tensor sA = per_problem(support_rows(Af.sum(-1, true), bk).squeeze(-1).to(at::kDouble), bk);
  const double tol = 16.0 * std::sqrt((double)std::max({m, n, K})) * eps_of(ct);
  const Coefficients c = split_coefficients(svd->U, svd->S, svd->V, sB, sA, o, tol);
  Solved out;
  // Coefficient rows times the stacks: B's as columns [batch, G, m, slots rank], A's as rows
  // [batch, G, slots rank, n] (with `dest`, [batch, G, ...] is [batch, P, ...]).
  const at::Tensor BP = times_stacks(per_support_rows(c.B.to(ct), bk), Bt, bk, /*columns=*/true, backend,
                                     dest != nullptr ? dest->B_new : at::Tensor());
  const at::Tensor AQ = times_stacks(per_support_rows(c.A.to(ct), bk), Af, bk, /*columns=*/false, backend,
                                     dest != nullptr ? dest->A_new : at::Tensor());
  out.B_new = per_problem_rows(BP, bk, o.rank, /*columns=*/true);   // [batch, P, m, rank]
  out.A_new = per_problem_rows(AQ, bk, o.rank, /*columns=*/false);  // [batch, P, rank, n]
  out.S = c.S;
  out.missing = c.missing;
  return out;
}

// Randomized: range finder with power iterations on the factored M_i = Bs^T D As (Halko,
// Martinsson & Tropp, Alg. 4.4), never forming M_i: Y = M Omega (m x L) -> Q_Y, then
// X = M^T Q_Y = Q_X R_X so that Q_Y^T M = R_X^T Q_X^T; SVD of the L x L core R_X^T in float64.
Solved solve_randomized(const at::Tensor& Bs, const at::Tensor& As, const at::Tensor& d, const Bucket& bk,
                        const Options& o, const Backend& backend) {
  const int64_t batch = Bs.size(0), K = Bs.size(2), m = Bs.size(3), n = As.size(3), P = d.size(0);
  const int64_t L = std::min({o.rank + o.oversample, K, m, n});
  const at::Tensor Bp = per_problem(Bs, bk), Ap = per_problem(As, bk);  // [batch, P, K, m|n]
  const at::Tensor dw = d.to(Bs.scalar_type()).view({1, P, K, 1});
  const auto apply = [&](const at::Tensor& X) { return at::matmul(Bp.transpose(-1, -2), dw * at::matmul(Ap, X)); };
  const auto apply_t = [&](const at::Tensor& Y) { return at::matmul(Ap.transpose(-1, -2), dw * at::matmul(Bp, Y)); };
  const auto orth = [&](const at::Tensor& X) { return std::get<0>(backend.qr(X)); };
  at::Tensor omega = at::empty({batch, 1, n, L}, Bs.options().dtype(at::kDouble));
  backend.fill_normal(omega, o.seed, (uint64_t)(o.first_module * n * L));
  at::Tensor Y = apply(omega.to(Bs.scalar_type()));  // [batch, P, m, L]
  for (int64_t it = 0; it < o.n_iter; ++it) Y = apply(orth(apply_t(orth(Y))));
  const at::Tensor QY = orth(Y);
  const auto [QX, RX] = backend.qr(apply_t(QY));  // [batch, P, n, L], [batch, P, L, L]
  const auto [U, Sv, Vh] = backend.svd(RX.transpose(-1, -2).to(at::kDouble));
  const double tol = 16.0 * std::sqrt((double)std::max({m, n, K})) * eps_of(Bs.scalar_type());
  const Coefficients c = split_coefficients(U, Sv, Vh.transpose(-1, -2), QY.sum(-2).to(at::kDouble),
                                            QX.sum(-2).to(at::kDouble), o, tol);
  Solved out;
  out.B_new = at::matmul(QY, c.B.to(Bs.scalar_type()));                          // [batch, P, m, rank]
  out.A_new = at::matmul(QX, c.A.to(Bs.scalar_type())).transpose(-1, -2);        // [batch, P, rank, n]
  out.S = c.S;
  out.missing = c.missing;
  return out;
}

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

// Every bucket's problems for the modules of one chunk: Af [len, N_in r, n] and Bt [len, N_in r, m]
// (compute dtype, B's columns as rows). Returns A_new [len, N_out, rank, n], B_new [len, N_out, m,
// rank], S [len, N_out, rank] and missing [len, N_out] (before completion), the split factors written
// into `dest` (the same shapes) where the plan is one bucket whose supports have one problem each,
// in the order of the rows.
Solved solve_modules(const at::Tensor& Af, const at::Tensor& Bt, const Plan& plan, const at::Tensor& Wd,
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> consensus_tsvd_impl(
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& W, int64_t rank,
    const std::string& method, const std::string& split, int64_t oversample, int64_t n_iter,
    int64_t seed, const Backend& backend) {
  const Shapes s = check_factors(A, B, W);
  TORCH_CHECK_VALUE(rank >= 1 && rank <= std::min(s.m, s.n), "rank must be in [1, min(m, n)] = [1, ",
                    std::min(s.m, s.n), "], got ", rank);
  TORCH_CHECK_VALUE(oversample >= 0, "oversample must be >= 0, got ", oversample);
  TORCH_CHECK_VALUE(n_iter >= 0, "n_iter must be >= 0, got ", n_iter);
  Options o;
  split_exponents(split, &o.exp_b, &o.exp_a);
  o.method = method_code(method);
  o.rank = rank;
  o.oversample = oversample;
  o.n_iter = n_iter;
  o.seed = (uint64_t)seed;

  const at::Tensor Wd = W.to(at::kDouble).contiguous();
  const Plan plan = Wd.is_cpu() ? host_plan(Wd, s.r, s.m, s.n) : device_plan(s.n_out, s.n_in);
  TORCH_CHECK_VALUE(plan.max_agents * s.r <= kMaxStackedColumns, "W: a receiving agent stacks k*r = ",
                    plan.max_agents, "*", s.r, " = ", plan.max_agents * s.r, " factor columns (k = nonzero weights ",
                    Wd.is_cpu() ? "in its row" : "allowed by W's shape: W on a GPU is not read", "), at most ",
                    kMaxStackedColumns, " are supported");
  const NoTF32 no_tf32(A.is_cuda());

  const at::ScalarType ct = compute_dtype(A.scalar_type());
  const int64_t NR = s.n_in * s.r;
  // Factors in the compute dtype, batch dims flattened: A rows [batch, N_in r, n]; B columns as rows
  // [len, N_in r, m] for the modules [b, b + len) of a chunk (a transposing copy, made per chunk).
  const at::Tensor Af = A.to(ct).reshape({s.batch, NR, s.n}).contiguous();
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
    out = solve_modules(Af, B_rows(0, s.batch), plan, Wd, s, o, backend, nullptr);
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
      const Solved part = solve_modules(modules(Af), B_rows(b, len), plan, Wd, s, o, backend, &dest);
      // What the solver did not write into dest (copy_ skips a tensor onto itself).
      dest.A_new.copy_(part.A_new);
      dest.B_new.copy_(part.B_new);
      dest.S.copy_(part.S);
      dest.missing.copy_(part.missing);
    }
  }
  at::Tensor A_new = out.A_new.contiguous(), B_new = out.B_new, S = out.S, missing = out.missing.contiguous();
  backend.complete_rows(A_new, missing, Af, on_device(Wd, Af.device()));

  const auto out_dtype = A.scalar_type();
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
