// The eager layers' RMSNorm and gated activation (jisu/models/layers.py) on rowwise.h's code: the numbers the fused
// decoder computes for a row, so a prompt prefilled by the eager layers and the tokens decoded by the fused stack
// see one arithmetic. Also faster than torch's composite ops on CPU for these shapes (layers.py has the figures).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <string>

#include "rowwise.h"

namespace {

// Rows per parallel task: a row is ~1 us of work; fewer per task costs more to hand out than it saves.
constexpr int64_t kRowGrain = 16;

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() >= 1,
              name, " must be a float32 CPU tensor of at least 1 dimension, got ",
              t.defined() ? toString(t.scalar_type()) : "undefined");
}

at::Tensor rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(weight, "weight");
  const int64_t n = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n, "weight must be [", n, "] (x's last dimension), got ",
              weight.sizes());
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t rows = n ? xc.numel() / n : 0;
  const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_norm(xp + r * n, wp, n, e, yp + r * n);
  });
  return y;
}

at::Tensor gated_activation(const at::Tensor& gate_up, const std::string& activation) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(activation == "silu" || activation == "gelu_tanh", "activation must be silu or gelu_tanh, got ",
              activation);
  const int64_t two_i = gate_up.size(-1), I = two_i / 2;
  TORCH_CHECK(two_i % 2 == 0, "gate_up's last dimension holds gate then up, so it must be even, got ", two_i);
  const Act act = activation == "silu" ? Act::Silu : Act::GeluTanh;
  const at::Tensor gu = gate_up.contiguous();
  std::vector<int64_t> shape(gu.sizes().begin(), gu.sizes().end());
  shape.back() = I;
  at::Tensor a = at::empty(shape, gu.options());
  const int64_t rows = two_i ? gu.numel() / two_i : 0;
  const float* gp = gu.data_ptr<float>();
  float* ap = a.data_ptr<float>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) gated_act_row(act, gp + r * two_i, gp + r * two_i + I, I, ap + r * I);
  });
  return a;
}

}  // namespace

void register_rowwise(pybind11::module_& m) {
  m.def("rms_norm_rows", &rms_norm_rows,
        "x / sqrt(mean(x^2) + eps) * weight over x's last dimension, as the fused decoder computes it",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("eps"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("gated_activation", &gated_activation,
        "act(gate) * up for gate_up = [..., 2I] (gate, then up), act silu or gelu_tanh, as the fused decoder",
        pybind11::arg("gate_up"), pybind11::arg("activation"), pybind11::call_guard<pybind11::gil_scoped_release>());
}
