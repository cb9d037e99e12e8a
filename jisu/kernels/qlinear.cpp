// Reference (portable, scalar) implementations of qlinear.h. Correct first; vectorised kernels replace the
// inner loops (see qlinear.h for the formats).
#include "qlinear.h"
#include <ATen/Parallel.h>

QWeight::QWeight(int64_t bits_, at::Tensor data_, c10::optional<at::Tensor> scales_, c10::optional<at::Tensor> zeros_,
                 int64_t group_, c10::optional<at::Tensor> bias_)
    : bits(bits_), group(group_), data(data_.contiguous()) {
  TORCH_CHECK(bits == 32 || bits == 8 || bits == 4, "bits must be 32, 8 or 4, got ", bits);
  TORCH_CHECK(data.dim() == 2 && data.device().is_cpu(), "weight data must be a 2-D CPU tensor");
  N = data.size(0);
  if (bits == 32) {
    TORCH_CHECK(data.scalar_type() == at::kFloat, "bits 32 needs float32 data");
    K = data.size(1);
    group = K;
  } else {
    K = bits == 8 ? data.size(1) : data.size(1) * 2;
    TORCH_CHECK(data.scalar_type() == (bits == 8 ? at::kChar : at::kByte), "bits ", bits, " needs ",
                bits == 8 ? "int8" : "uint8", " data");
    TORCH_CHECK(group > 0 && K % group == 0, "group size ", group, " does not divide ", K, " inputs");
    TORCH_CHECK(bits == 8 || group % 32 == 0, "int4 group size must be a multiple of 32, got ", group);
    TORCH_CHECK(scales_.has_value() && scales_->defined(), "bits ", bits, " needs scales");
    scales = scales_->contiguous();
    TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 2 && scales.size(0) == N &&
                    scales.size(1) == K / group,
                "scales must be float16 [", N, ", ", K / group, "]");
    if (bits == 4) {
      TORCH_CHECK(zeros_.has_value() && zeros_->defined(), "int4 needs zeros");
      zeros = zeros_->contiguous();
      TORCH_CHECK(zeros.scalar_type() == at::kHalf && zeros.sizes() == scales.sizes(),
                  "zeros must be float16 shaped like scales");
    }
  }
  if (bias_.has_value() && bias_->defined()) {
    bias = bias_->contiguous();
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == N, "bias must be float32 [", N, "]");
  }
}

int64_t QWeight::nbytes() const {
  int64_t n = data.nbytes();
  if (scales.defined()) n += scales.nbytes();
  if (zeros.defined()) n += zeros.nbytes();
  if (bias.defined()) n += bias.nbytes();
  return n;
}

namespace {

// Row n of W as float32 into out[K].
void dequantize_row(const QWeight& w, int64_t n, float* out) {
  const int64_t K = w.K;
  if (w.bits == 32) {
    const float* src = w.data.data_ptr<float>() + n * K;
    for (int64_t k = 0; k < K; ++k) out[k] = src[k];
    return;
  }
  const at::Half* sc = w.scales.data_ptr<at::Half>() + n * (K / w.group);
  if (w.bits == 8) {
    const int8_t* q = w.data.data_ptr<int8_t>() + n * K;
    for (int64_t k = 0; k < K; ++k) out[k] = float(sc[k / w.group]) * float(q[k]);
    return;
  }
  const at::Half* zp = w.zeros.data_ptr<at::Half>() + n * (K / w.group);
  const uint8_t* q = w.data.data_ptr<uint8_t>() + n * (K / 2);
  for (int64_t b = 0; b < K / 32; ++b) {
    for (int64_t j = 0; j < 16; ++j) {
      const uint8_t byte = q[b * 16 + j];
      const int64_t k0 = b * 32 + j, k1 = k0 + 16;
      out[k0] = float(sc[k0 / w.group]) * float(byte & 0xF) + float(zp[k0 / w.group]);
      out[k1] = float(sc[k1 / w.group]) * float(byte >> 4) + float(zp[k1 / w.group]);
    }
  }
}

}  // namespace

void qweight_matvec(const QWeight& w, const float* x, int64_t M, float* y) {
  const int64_t N = w.N, K = w.K;
  const float* bp = w.bias.defined() ? w.bias.data_ptr<float>() : nullptr;
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(K);
    for (int64_t n = n0; n < n1; ++n) {
      dequantize_row(w, n, row.data());
      for (int64_t m = 0; m < M; ++m) {
        float s = 0.f;
        for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * row[k];
        y[m * N + n] = s + (bp ? bp[n] : 0.f);
      }
    }
  });
}

at::Tensor qweight_dequantize(const QWeight& w) {
  at::Tensor out = at::empty({w.N, w.K}, at::kFloat);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, w.N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) dequantize_row(w, n, op + n * w.K);
  });
  return out;
}

at::Tensor qlinear(const at::Tensor& x, const QWeight& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be float32 [M, K] on CPU");
  TORCH_CHECK(x.size(1) == w.K, "x has ", x.size(1), " columns, the weight has ", w.K, " inputs");
  at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0);
  at::Tensor y = at::empty({M, w.N}, xc.options());
  if (M <= 16) {
    qweight_matvec(w, xc.data_ptr<float>(), M, y.data_ptr<float>());
    return y;
  }
  if (w.bits == 32) return at::linear(xc, w.data, w.bias.defined() ? c10::optional<at::Tensor>(w.bias) : c10::nullopt);
  // Prefill: dequantize a tile of rows at a time into a float32 GEMM.
  const int64_t tile = 256;
  for (int64_t n0 = 0; n0 < w.N; n0 += tile) {
    const int64_t n1 = std::min(w.N, n0 + tile);
    at::Tensor wt = at::empty({n1 - n0, w.K}, at::kFloat);
    float* wp = wt.data_ptr<float>();
    at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n) dequantize_row(w, n, wp + (n - n0) * w.K);
    });
    y.narrow(1, n0, n1 - n0).copy_(at::mm(xc, wt.t()));
  }
  if (w.bias.defined()) y.add_(w.bias);
  return y;
}

void register_qlinear(pybind11::module_& m) {
  pybind11::class_<QWeight>(m, "QWeight")
      .def(pybind11::init<int64_t, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>, int64_t,
                          c10::optional<at::Tensor>>(),
           pybind11::arg("bits"), pybind11::arg("data"), pybind11::arg("scales") = pybind11::none(),
           pybind11::arg("zeros") = pybind11::none(), pybind11::arg("group") = 0,
           pybind11::arg("bias") = pybind11::none())
      .def_readonly("bits", &QWeight::bits)
      .def_readonly("N", &QWeight::N)
      .def_readonly("K", &QWeight::K)
      .def_readonly("group", &QWeight::group)
      .def("nbytes", &QWeight::nbytes);
  m.def("qlinear", &qlinear, "y = x @ W.T + b for a QWeight W (float32 x on CPU)");
  m.def("qweight_dequantize", &qweight_dequantize, "a QWeight as a float32 [N, K] matrix");
}
