// The layout of one bucket's problems against its supports (csrc/slots.h).
#include "slots.h"

#include <vector>

#include "tensor_helpers.h"

namespace decaf {
namespace {

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

}  // namespace

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

at::Tensor per_problem_result(const at::Tensor& out, const Bucket& bk, int64_t rank) {
  const int64_t batch = out.size(0), rows = out.size(2);
  const at::Tensor flat = out.view({batch, bk.supports, rows, bk.slots, rank}).permute({0, 1, 3, 2, 4})
                              .reshape({batch, bk.supports * bk.slots, rows, rank});
  bool identity;
  const std::vector<int64_t> at_slot = slot_positions(bk, &identity);
  return identity ? flat : flat.index_select(1, index_tensor(at_slot, out.device()));
}

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

}  // namespace decaf
