// The one Python module of jisu's C++ kernels; each source file registers its own functions.
#include <torch/extension.h>
#include "qlinear.h"

void register_fused_decode(pybind11::module_& m);       // fused_decode.cpp
void register_prefill_attention(pybind11::module_& m);  // prefill_attention.cpp
void register_rowwise(pybind11::module_& m);            // rowwise.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_qlinear(m);
  register_fused_decode(m);
  register_prefill_attention(m);
  register_rowwise(m);
}
