// The Python extension module decaf_ext._C: importing it loads the operator library.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "decaf_ext compiled kernels (operators under torch.ops.decaf_ext)";
#ifdef DECAF_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
}
