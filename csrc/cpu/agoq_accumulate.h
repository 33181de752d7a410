// Fused single-pass kernels for int8 gradient accumulation (symmetric int8 codes, fp32 scales).
//
//   dequantize_add:  out += codes * scale                      (a receiver summing what peers sent)
//   requantize_add:  codes, scales = Q(codes * scale + addend)  (an int8 accumulator taking a gradient)
//
// Both give exactly what the unfused sequence gives (dequantize to a temporary, add in fp32,
// quantize): the products and sums round separately (-ffp-contract=off), and requantize_add hands
// each batch of groups to the same quantize_batch the quantizer uses, with the same group numbers,
// so stochastic rounding draws the same noise. The difference is memory traffic: one read of the
// codes and the addend and one write of the codes, through an L1-resident batch buffer, instead of
// fresh full-size fp32 temporaries.
#pragma once

#include "agoq_quant_kernels.h"

namespace agoq {

// out[i] += codes[i] * scales[i / G] for i < numel.
inline void dequantize_add_kernel(const int8_t* codes, const float* scales, int64_t numel, int64_t G, float* out) {
    const int64_t ngroups = (numel + G - 1) / G;
#pragma omp parallel for schedule(dynamic, std::max<int64_t>(1, kTaskElems / G)) if (numel >= 32768)
    for (int64_t g = 0; g < ngroups; ++g) {
        const int64_t start = g * G;
        const int64_t n = std::min(G, numel - start);
        const float s = scales[g];
        const int8_t* c = codes + start;
        float* o = out + start;
        for (int64_t j = 0; j < n; ++j) o[j] = o[j] + static_cast<float>(c[j]) * s;
    }
}

// In place: codes/scales (numel int8 codes, one fp32 scale per G) become the quantization of
// (has_value ? codes * scale : 0) + addend. `a` carries numel, G, rounding and seed as for quantize.
template <class T>
void requantize_add_kernel(int8_t* codes, float* scales, const typename T::storage* addend, bool has_value,
                           const QuantArgs& a) {
    const int64_t G = a.group_size;
    const int64_t ngroups = (a.numel + G - 1) / G;
    const int64_t per_batch = std::max<int64_t>(1, kBatchElems / G);
    const int64_t nbatches = (ngroups + per_batch - 1) / per_batch;
#pragma omp parallel if (a.numel >= 32768)
    {
        alignas(64) float buf[std::max(kBatchElems, kMaxGroup)];
#pragma omp for schedule(dynamic, kBatchesPerTask)
        for (int64_t b = 0; b < nbatches; ++b) {
            const int64_t g0 = b * per_batch;
            const int64_t count = std::min(per_batch, ngroups - g0);
            const int64_t start = g0 * G;
            const int64_t n = std::min(count * G, a.numel - start);
            const typename T::storage* v = addend + start;
            if (has_value) {
                for (int64_t k = 0; k < count; ++k) {
                    const float s = scales[g0 + k];
                    const int8_t* c = codes + start + k * G;
                    const int64_t m = std::min(G, n - k * G);
                    for (int64_t j = 0; j < m; ++j)
                        buf[k * G + j] = static_cast<float>(c[j]) * s + T::load(v, k * G + j);
                }
            } else {
                for (int64_t j = 0; j < n; ++j) buf[j] = T::load(v, j);
            }
            quantize_batch<F32, 8, true>(buf, g0, count, a, reinterpret_cast<uint8_t*>(codes), scales, nullptr);
        }
    }
}

}  // namespace agoq
