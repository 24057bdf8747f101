// Operator schemas of decaf_ext, declared once; implementations are registered per device in
// csrc/cpu and csrc/cuda (TORCH_LIBRARY_IMPL), fake kernels in decaf_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(decaf_ext, m) {
  m.def(
      "consensus_tsvd(Tensor A, Tensor B, Tensor W, int rank, str method, str split, int oversample, "
      "int n_iter, int seed) -> (Tensor, Tensor, Tensor)");
  m.def("weighted_product_sum(Tensor A, Tensor B, Tensor W) -> Tensor");
  m.def("tsvd(Tensor M, int rank, int oversample, int n_iter, int seed) -> (Tensor, Tensor, Tensor)");
}
