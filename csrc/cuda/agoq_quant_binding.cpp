// Python binding of the CUDA quantization kernels (module agoq_quant_cuda).
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cstdint>
#include <string>

#include "agoq_quant.h"

namespace {

// Major.minor of the torch this module was compiled against (checked at load time).
std::string torch_version() { return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR); }

// The CUDA toolkit and architectures the kernels were compiled for.
std::string build_info() { return "CUDA " + agoq::cuda_build_info(); }

// The dispatcher's CUDA kernels of agoq::quantize / agoq::dequantize (schemas: agoq_ds/quant/ops.py).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_op(const at::Tensor& x, int64_t bits, int64_t group_size,
                                                           bool symmetric, bool stochastic, int64_t seed,
                                                           at::ScalarType scale_dtype) {
  auto r = agoq::quantize(x.contiguous(), bits, group_size, symmetric, stochastic, seed & INT64_MAX,
                          scale_dtype == at::kBFloat16);
  return {r[0], r[1], r[2]};
}

at::Tensor dequantize_op(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                         int64_t group_size, int64_t numel, at::ScalarType out_dtype) {
  at::Tensor out = at::empty({numel}, scales.options().dtype(out_dtype));
  agoq::dequantize(codes, scales, zeros, bits, group_size, numel, out);
  return out;
}

}  // namespace

// Every op here is listed in NATIVE_KERNELS["cuda"] (agoq_ds/quant/ops.py); tests/quant/test_registry.py checks.
TORCH_LIBRARY_IMPL(agoq, CUDA, m) {
  m.impl("quantize", &quantize_op);
  m.impl("dequantize", &dequantize_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "agoq-ds blockwise quantization kernels (CUDA)";
  m.def("quantize", &agoq::quantize, "Blockwise quantize -> [codes, scales, zeros]", py::arg("x"), py::arg("bits"),
        py::arg("group_size"), py::arg("symmetric"), py::arg("stochastic"), py::arg("seed"), py::arg("bf16_scale"));
  m.def("dequantize", &agoq::dequantize, "Blockwise dequantize into out", py::arg("codes"), py::arg("scales"),
        py::arg("zeros"), py::arg("bits"), py::arg("group_size"), py::arg("numel"), py::arg("out"));
  m.def("build_info", &build_info, "CUDA toolkit version the kernels were compiled with");
  m.def("torch_version", &torch_version, "major.minor of the torch this module was compiled against");
}
