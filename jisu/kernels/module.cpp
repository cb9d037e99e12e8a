// The one Python module of jisu's C++ kernels; each source file registers its own functions.
#include <torch/extension.h>
#include "qlinear.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_qlinear(m);
}
