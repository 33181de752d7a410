// Python binding of the CUDA quantization kernels (module agoq_quant_cuda).
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#include "agoq_quant.h"

namespace {

// Major.minor of the torch this module was compiled against (checked at load time).
std::string torch_version() { return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR); }

// The CUDA toolkit and architectures the kernels were compiled for.
std::string build_info() { return "CUDA " + agoq::cuda_build_info(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "agoq-ds blockwise quantization kernels (CUDA)";
  m.def("quantize", &agoq::quantize, "Blockwise quantize -> [codes, scales, zeros]", py::arg("x"), py::arg("bits"),
        py::arg("group_size"), py::arg("symmetric"), py::arg("stochastic"), py::arg("seed"), py::arg("bf16_scale"));
  m.def("dequantize", &agoq::dequantize, "Blockwise dequantize into out", py::arg("codes"), py::arg("scales"),
        py::arg("zeros"), py::arg("bits"), py::arg("group_size"), py::arg("numel"), py::arg("out"));
  m.def("build_info", &build_info, "CUDA toolkit version the kernels were compiled with");
  m.def("torch_version", &torch_version, "major.minor of the torch this module was compiled against");
}
