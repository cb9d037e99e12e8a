// The one Python module of jisu's C++ kernels; each source file registers its own functions.
#include <torch/extension.h>
#include "qlinear.h"

void register_fused_decode(pybind11::module_& m);       // fused_decode.cpp
void register_prefill_attention(pybind11::module_& m);  // prefill_attention.cpp
void register_rowwise(pybind11::module_& m);            // rowwise.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The instruction set this build was compiled for (jisu/kernels/build.py's KERNEL_SETS), from what the compiler
  // was told rather than what the build was named.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__AVX2__)
  m.attr("instruction_set") = "avx512";
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  m.attr("instruction_set") = "avx2";
#else
  m.attr("instruction_set") = "portable";
#endif
  register_qlinear(m);
  register_fused_decode(m);
  register_prefill_attention(m);
  register_rowwise(m);
}
