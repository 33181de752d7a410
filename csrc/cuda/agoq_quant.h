// Blockwise quantizer, CUDA kernels: the contract is agoq_ds/quant/format.py, the definition
// agoq_ds/quant/reference.py. Declarations shared by the kernels (agoq_quant.cu) and the Python
// binding (agoq_quant_binding.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace agoq {

// Quantizes the contiguous CUDA tensor `x` (fp32/bf16/fp16). Returns {codes, scales, zeros}:
// codes int8 (8-bit symmetric) or uint8 (packed 8/bits per byte, little end first); scales bf16
// when `bf16_scale` (symmetric only) else fp32; zeros fp32 per group (asymmetric) or empty.
std::vector<at::Tensor> quantize(const at::Tensor& x, int64_t bits, int64_t group_size, bool symmetric,
                                 bool stochastic, int64_t seed, bool bf16_scale);

// Writes the `numel` dequantized elements into `out` (fp32/bf16/fp16, contiguous, on the same
// device). `zeros` is empty for symmetric codes.
void dequantize(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                int64_t group_size, int64_t numel, at::Tensor& out);

// CUDA toolkit version the kernels were compiled with, e.g. "12.8".
std::string cuda_build_info();

}  // namespace agoq
