// Blockwise quantizer, CUDA kernels. Contract: agoq_ds/quant/format.py; definition:
// agoq_ds/quant/reference.py. Round-to-nearest results are bit-identical to the reference because
// every fp32 operation that the reference performs separately is an explicitly rounded intrinsic
// here (__fdiv_rn, __fmul_rn, __fsub_rn, __fadd_rn: never contracted into an FMA, never affected by
// --use_fast_math), rounding is rintf (half to even) and bf16/fp16 conversions are _rn.
//
// Quantize: a team of `tpg` threads (a power of two, 8..256) owns one group; thread t handles the
// group's bytes t, t + tpg, ... (one byte = 8/BITS consecutive codes). Pass 1 reduces the group's
// statistics over the team (warp shuffles, plus shared memory for teams wider than a warp); pass 2
// re-reads the group (from L1/L2), rounds and packs. Dequantize: one thread per byte, grid-stride.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>
#include <string>

#include "agoq_quant.h"

namespace agoq {
namespace {

constexpr int kBlock = 256;           // threads per block
constexpr float kTiny = 0x1p-100f;    // format.TINY: groups below it are flushed (scale 0)
constexpr uint64_t kSeedMask = 0x7FFFFFFFFFFFFFFFull;

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// False for NaN and +-Inf.
__device__ __forceinline__ bool is_finite(float v) { return fabsf(v) <= FLT_MAX; }

__device__ __forceinline__ float nan_f32() { return __int_as_float(0x7fc00000); }

// Uniform in [0, 1) with 24 random bits, a pure function of (seed, element index): SplitMix64.
__device__ __forceinline__ float uniform01(uint64_t seed, uint64_t idx) {
  uint64_t z = seed + (idx + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * 0x1p-24f;
}

// Per-group statistics over the finite values, plus whether any value is non-finite.
struct Stats {
  float lo;  // minimum (asymmetric)
  float hi;  // maximum (asymmetric) or absmax (symmetric)
  int bad;   // 1 when the group holds NaN or +-Inf
};

__device__ __forceinline__ Stats combine(Stats a, Stats b) {
  return {fminf(a.lo, b.lo), fmaxf(a.hi, b.hi), a.bad | b.bad};
}

// Reduces `s` over aligned teams of `tpg` threads (power of two). Every thread of the block must call
// it (it may synchronise the block); every thread gets its team's result.
__device__ Stats team_reduce(Stats s, int tpg, Stats* smem) {
  const int width = tpg < 32 ? tpg : 32;
  for (int offset = width / 2; offset > 0; offset >>= 1) {
    Stats o;
    o.lo = __shfl_xor_sync(0xffffffffu, s.lo, offset);
    o.hi = __shfl_xor_sync(0xffffffffu, s.hi, offset);
    o.bad = __shfl_xor_sync(0xffffffffu, s.bad, offset);
    s = combine(s, o);
  }
  if (tpg <= 32) return s;
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) smem[warp] = s;
  __syncthreads();
  const int warps = tpg >> 5;
  const int first = (threadIdx.x / tpg) * warps;
  Stats r = smem[first];
  for (int w = 1; w < warps; ++w) r = combine(r, smem[first + w]);
  return r;
}

template <typename T, int BITS, bool SYM>
__global__ void __launch_bounds__(kBlock)
    quantize_kernel(const T* __restrict__ x, uint8_t* __restrict__ codes, float* __restrict__ scales_f32,
                    __nv_bfloat16* __restrict__ scales_bf16, float* __restrict__ zeros, int64_t numel,
                    int64_t ngroups, int group_size, int tpg, bool stochastic, uint64_t seed) {
  constexpr int PER = 8 / BITS;
  constexpr int QMAX = (1 << (BITS - 1)) - 1;
  constexpr int LEVELS = (1 << BITS) - 1;
  constexpr int OFFSET = 1 << (BITS - 1);
  __shared__ Stats smem[kBlock / 32];

  const int teams = kBlock / tpg;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * teams + threadIdx.x / tpg;
  const int t = threadIdx.x % tpg;
  const int nbytes = group_size / PER;
  const bool active = group < ngroups;
  const int64_t base = group * group_size;

  // Pass 1: statistics.
  Stats s{INFINITY, -INFINITY, 0};
  if (active) {
    for (int b = t; b < nbytes; b += tpg) {
#pragma unroll
      for (int i = 0; i < PER; ++i) {
        const int64_t e = base + static_cast<int64_t>(b) * PER + i;
        if (e < numel) {
          const float v = to_f32(x[e]);
          if (!is_finite(v)) {
            s.bad = 1;
          } else if (SYM) {
            s.hi = fmaxf(s.hi, fabsf(v));
          } else {
            s.lo = fminf(s.lo, v);
            s.hi = fmaxf(s.hi, v);
          }
        }
      }
    }
  }
  s = team_reduce(s, tpg, smem);
  if (!active) return;  // no block-wide synchronisation below

  bool bad = s.bad != 0;
  float scale;
  float inv;
  float zero = 0.0f;
  if (SYM) {
    const float amax = s.hi;
    scale = __fdiv_rn(amax, static_cast<float>(QMAX));
    if (scales_bf16 != nullptr) scale = __bfloat162float(__float2bfloat16_rn(scale));
    const bool flushed = amax < kTiny;
    if (flushed) scale = 0.0f;
    inv = (flushed || bad) ? 0.0f : __fdiv_rn(1.0f, scale);
  } else {
    const float span = __fsub_rn(s.hi, s.lo);
    bad = bad || !is_finite(span);
    scale = __fdiv_rn(span, static_cast<float>(LEVELS));
    const bool flushed = span < kTiny;
    inv = (flushed || bad) ? 0.0f : __fdiv_rn(1.0f, scale);
    if (flushed) scale = 0.0f;
    zero = s.lo;
  }

  // Pass 2: codes. Codes past numel in the last byte are 0.
  for (int b = t; b < nbytes; b += tpg) {
    const int64_t e0 = base + static_cast<int64_t>(b) * PER;
    if (e0 >= numel) break;
    uint32_t packed = 0;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int64_t e = e0 + i;
      if (e < numel) {
        int q = 0;
        if (!bad) {
          const float v = to_f32(x[e]);
          const float y = SYM ? __fmul_rn(v, inv) : __fmul_rn(__fsub_rn(v, zero), inv);
          float r = stochastic ? floorf(__fadd_rn(y, uniform01(seed, static_cast<uint64_t>(e)))) : rintf(y);
          r = SYM ? fminf(fmaxf(r, static_cast<float>(-QMAX)), static_cast<float>(QMAX))
                  : fminf(fmaxf(r, 0.0f), static_cast<float>(LEVELS));
          q = static_cast<int>(r);
        }
        if (SYM && BITS < 8) q += OFFSET;
        packed |= (static_cast<uint32_t>(q) & 0xFFu) << (i * BITS);
      }
    }
    codes[e0 / PER] = static_cast<uint8_t>(packed);
  }

  if (t == 0) {
    const float out_scale = bad ? nan_f32() : scale;
    if (scales_bf16 != nullptr) {
      scales_bf16[group] = __float2bfloat16_rn(out_scale);
    } else {
      scales_f32[group] = out_scale;
    }
    if (!SYM) zeros[group] = bad ? nan_f32() : s.lo;
  }
}

template <typename T, int BITS, bool SYM>
__global__ void __launch_bounds__(kBlock)
    dequantize_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ scales_f32,
                      const __nv_bfloat16* __restrict__ scales_bf16, const float* __restrict__ zeros,
                      T* __restrict__ out, int64_t numel, int group_shift) {
  constexpr int PER = 8 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  constexpr int OFFSET = 1 << (BITS - 1);
  const int64_t nbytes = (numel + PER - 1) / PER;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < nbytes; b += stride) {
    const uint32_t byte = codes[b];
    const int64_t e0 = b * PER;
    const int64_t g = e0 >> group_shift;  // all codes of a byte share a group
    const float s = scales_bf16 != nullptr ? __bfloat162float(scales_bf16[g]) : scales_f32[g];
    const float z = SYM ? 0.0f : zeros[g];
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int64_t e = e0 + i;
      if (e < numel) {
        int q;
        if (BITS == 8) {
          q = SYM ? static_cast<int>(static_cast<int8_t>(byte)) : static_cast<int>(byte);
        } else {
          q = static_cast<int>((byte >> (i * BITS)) & MASK);
          if (SYM) q -= OFFSET;
        }
        float v = __fmul_rn(static_cast<float>(q), s);
        if (!SYM) v = __fadd_rn(v, z);
        out[e] = from_f32<T>(v);
      }
    }
  }
}

struct QuantArgs {
  uint8_t* codes;
  float* scales_f32;
  __nv_bfloat16* scales_bf16;
  float* zeros;
  int64_t numel;
  int64_t ngroups;
  int group_size;
  int tpg;
  bool stochastic;
  uint64_t seed;
  unsigned blocks;
  cudaStream_t stream;
};

template <typename T, int BITS, bool SYM>
void launch_quantize(const QuantArgs& a, const T* x) {
  quantize_kernel<T, BITS, SYM><<<a.blocks, kBlock, 0, a.stream>>>(x, a.codes, a.scales_f32, a.scales_bf16, a.zeros,
                                                                   a.numel, a.ngroups, a.group_size, a.tpg,
                                                                   a.stochastic, a.seed);
}

template <typename T>
void dispatch_quantize(const QuantArgs& a, const T* x, int64_t bits, bool symmetric) {
  if (bits == 8) {
    symmetric ? launch_quantize<T, 8, true>(a, x) : launch_quantize<T, 8, false>(a, x);
  } else if (bits == 4) {
    symmetric ? launch_quantize<T, 4, true>(a, x) : launch_quantize<T, 4, false>(a, x);
  } else {
    symmetric ? launch_quantize<T, 2, true>(a, x) : launch_quantize<T, 2, false>(a, x);
  }
}

struct DequantArgs {
  const uint8_t* codes;
  const float* scales_f32;
  const __nv_bfloat16* scales_bf16;
  const float* zeros;
  int64_t numel;
  int group_shift;
  unsigned blocks;
  cudaStream_t stream;
};

template <typename T, int BITS, bool SYM>
void launch_dequantize(const DequantArgs& a, T* out) {
  dequantize_kernel<T, BITS, SYM><<<a.blocks, kBlock, 0, a.stream>>>(a.codes, a.scales_f32, a.scales_bf16, a.zeros,
                                                                     out, a.numel, a.group_shift);
}

template <typename T>
void dispatch_dequantize(const DequantArgs& a, T* out, int64_t bits, bool symmetric) {
  if (bits == 8) {
    symmetric ? launch_dequantize<T, 8, true>(a, out) : launch_dequantize<T, 8, false>(a, out);
  } else if (bits == 4) {
    symmetric ? launch_dequantize<T, 4, true>(a, out) : launch_dequantize<T, 4, false>(a, out);
  } else {
    symmetric ? launch_dequantize<T, 2, true>(a, out) : launch_dequantize<T, 2, false>(a, out);
  }
}

void check_params(int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "agoq: bits=", bits, " must be 2, 4 or 8");
  TORCH_CHECK(group_size >= 32 && group_size <= 4096 && (group_size & (group_size - 1)) == 0, "agoq: group_size=",
              group_size, " must be a power of two from 32 to 4096");
}

int log2_int(int64_t v) {
  int r = 0;
  while ((int64_t{1} << r) < v) ++r;
  return r;
}

}  // namespace

std::vector<at::Tensor> quantize(const at::Tensor& x_in, int64_t bits, int64_t group_size, bool symmetric,
                                 bool stochastic, int64_t seed, bool bf16_scale) {
  check_params(bits, group_size);
  TORCH_CHECK(x_in.is_cuda(), "agoq: quantize expects a CUDA tensor");
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "agoq: quantize supports float32, float16 and bfloat16, got ", dtype);
  TORCH_CHECK(symmetric || !bf16_scale, "agoq: asymmetric quantization stores fp32 scales");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t numel = x.numel();
  const int per = 8 / static_cast<int>(bits);
  const int64_t ngroups = (numel + group_size - 1) / group_size;
  const auto opts = x.options();
  at::Tensor codes = at::empty({(numel + per - 1) / per}, opts.dtype(bits == 8 && symmetric ? at::kChar : at::kByte));
  at::Tensor scales = at::empty({ngroups}, opts.dtype(bf16_scale ? at::kBFloat16 : at::kFloat));
  at::Tensor zeros = at::empty({symmetric ? 0 : ngroups}, opts.dtype(at::kFloat));
  if (numel == 0) return {codes, scales, zeros};

  const int nbytes = static_cast<int>(group_size) / per;
  const int tpg = nbytes < kBlock ? nbytes : kBlock;
  const int64_t blocks = (ngroups + (kBlock / tpg) - 1) / (kBlock / tpg);
  TORCH_CHECK(blocks <= 0x7FFFFFFF, "agoq: tensor too large");
  QuantArgs a;
  a.codes = static_cast<uint8_t*>(codes.data_ptr());
  a.scales_f32 = bf16_scale ? nullptr : scales.data_ptr<float>();
  a.scales_bf16 = bf16_scale ? reinterpret_cast<__nv_bfloat16*>(scales.data_ptr<at::BFloat16>()) : nullptr;
  a.zeros = symmetric ? nullptr : zeros.data_ptr<float>();
  a.numel = numel;
  a.ngroups = ngroups;
  a.group_size = static_cast<int>(group_size);
  a.tpg = tpg;
  a.stochastic = stochastic;
  a.seed = static_cast<uint64_t>(seed) & kSeedMask;
  a.blocks = static_cast<unsigned>(blocks);
  a.stream = c10::cuda::getCurrentCUDAStream();
  if (dtype == at::kFloat) {
    dispatch_quantize(a, x.data_ptr<float>(), bits, symmetric);
  } else if (dtype == at::kHalf) {
    dispatch_quantize(a, reinterpret_cast<const __half*>(x.data_ptr<at::Half>()), bits, symmetric);
  } else {
    dispatch_quantize(a, reinterpret_cast<const __nv_bfloat16*>(x.data_ptr<at::BFloat16>()), bits, symmetric);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, scales, zeros};
}

void dequantize(const at::Tensor& codes_in, const at::Tensor& scales_in, const at::Tensor& zeros_in, int64_t bits,
                int64_t group_size, int64_t numel, at::Tensor& out) {
  check_params(bits, group_size);
  TORCH_CHECK(codes_in.is_cuda() && scales_in.is_cuda() && out.is_cuda(), "agoq: dequantize expects CUDA tensors");
  TORCH_CHECK(out.is_contiguous() && out.numel() == numel, "agoq: out must be contiguous with numel elements");
  const auto odt = out.scalar_type();
  TORCH_CHECK(odt == at::kFloat || odt == at::kHalf || odt == at::kBFloat16,
              "agoq: dequantize writes float32, float16 or bfloat16, got ", odt);
  const bool symmetric = zeros_in.numel() == 0;
  const int per = 8 / static_cast<int>(bits);
  const int64_t nbytes = (numel + per - 1) / per;
  const int64_t ngroups = (numel + group_size - 1) / group_size;
  TORCH_CHECK(codes_in.numel() * codes_in.element_size() >= nbytes, "agoq: codes hold fewer than ", nbytes, " bytes");
  TORCH_CHECK(scales_in.numel() >= ngroups, "agoq: need ", ngroups, " scales");
  TORCH_CHECK(symmetric || zeros_in.numel() >= ngroups, "agoq: need ", ngroups, " zeros");
  const auto sdt = scales_in.scalar_type();
  TORCH_CHECK(sdt == at::kFloat || (sdt == at::kBFloat16 && symmetric), "agoq: scales must be float32 (or bfloat16 "
              "for symmetric codes)");
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  const at::Tensor zeros = symmetric ? zeros_in : zeros_in.to(at::kFloat).contiguous();

  int64_t blocks = (nbytes + kBlock - 1) / kBlock;
  if (blocks > (int64_t{1} << 20)) blocks = int64_t{1} << 20;
  DequantArgs a;
  a.codes = static_cast<const uint8_t*>(codes.data_ptr());
  a.scales_f32 = sdt == at::kFloat ? scales.data_ptr<float>() : nullptr;
  a.scales_bf16 =
      sdt == at::kBFloat16 ? reinterpret_cast<const __nv_bfloat16*>(scales.data_ptr<at::BFloat16>()) : nullptr;
  a.zeros = symmetric ? nullptr : zeros.data_ptr<float>();
  a.numel = numel;
  a.group_shift = log2_int(group_size);
  a.blocks = static_cast<unsigned>(blocks);
  a.stream = c10::cuda::getCurrentCUDAStream();
  if (odt == at::kFloat) {
    dispatch_dequantize(a, out.data_ptr<float>(), bits, symmetric);
  } else if (odt == at::kHalf) {
    dispatch_dequantize(a, reinterpret_cast<__half*>(out.data_ptr<at::Half>()), bits, symmetric);
  } else {
    dispatch_dequantize(a, reinterpret_cast<__nv_bfloat16*>(out.data_ptr<at::BFloat16>()), bits, symmetric);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::string cuda_build_info() {
  return std::to_string(__CUDACC_VER_MAJOR__) + "." + std::to_string(__CUDACC_VER_MINOR__);
}

}  // namespace agoq
