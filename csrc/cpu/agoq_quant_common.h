// Scalar building blocks shared by the generic and the AVX-512 quantization kernels: bit casts,
// bf16/fp16 conversions identical to torch's, exact rounding, and the counter-based RNG.
#pragma once

#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#if defined(__unix__)
#include <unistd.h>
#endif

namespace agoq {

// Orders this thread's streaming stores before anything it does next.
inline void sfence() {
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

constexpr float kTiny = 0x1p-100f;
constexpr int64_t kMaxGroup = 4096;

inline uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    return u;
}

inline float float_of(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
}

// fp32 -> bf16 round-to-nearest-even, NaN -> 0x7FC0: identical to c10::BFloat16(float).
inline uint16_t f32_to_bf16(float f) {
    const uint32_t u = bits_of(f);
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>(0x7FC0) : rounded;
}

inline float bf16_to_f32(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

// Element types. F32 and BF16 load/store single elements (gcc vectorizes the loops around them);
// F16 converts whole blocks with F16C / AVX-512 instructions through an fp32 buffer.
struct F32 {
    using storage = float;
    static constexpr bool kDirect = true;
    static float load(const float* p, int64_t i) { return p[i]; }
    static void store(float* p, int64_t i, float v) { p[i] = v; }
};

struct BF16 {
    using storage = uint16_t;
    static constexpr bool kDirect = true;
    static float load(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
    static void store(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }
};

struct F16 {
    using storage = uint16_t;
    static constexpr bool kDirect = false;
    static void to_f32(const uint16_t* src, float* dst, int64_t n) {
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#endif
#if defined(__F16C__)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
        for (; i < n; ++i) dst[i] = static_cast<float>(c10::Half(src[i], c10::Half::from_bits()));
    }
    static void from_f32(const float* src, uint16_t* dst, int64_t n) {
#if defined(__AVX512F__) || defined(__F16C__)
        constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#endif
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                                _mm512_cvtps_ph(_mm512_loadu_ps(src + i), kRne));
#endif
#if defined(__F16C__)
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), kRne));
#endif
        for (; i < n; ++i) dst[i] = c10::Half(src[i]).x;
    }
};

// Round half to even for |v| < 2**22 (all codes here): adding and subtracting 1.5 * 2**23 leaves
// the nearest integer under the default rounding mode, and the sum's low mantissa bits hold it.
constexpr float kRoundMagic = 12582912.0f;
constexpr int32_t kRoundMagicBits = 0x4B400000;

inline int32_t round_half_even(float v) { return static_cast<int32_t>(bits_of(v + kRoundMagic)) - kRoundMagicBits; }

// floor(w) for |w| < 2**22.
inline int32_t floor_small(float w) {
    const int32_t r = round_half_even(w);
    return r - (static_cast<float>(r) > w ? 1 : 0);
}

inline uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

inline uint32_t mix32(uint32_t x) {  // "lowbias32" (C. Wellons): a bijective 32-bit hash
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

// Counter-based uniform in [0, 1): depends only on (seed, group, index in group), never on threads.
inline uint64_t group_key(uint64_t seed, int64_t group) {
    return splitmix64(seed ^ splitmix64(static_cast<uint64_t>(group)));
}

inline float uniform(uint32_t key_lo, uint32_t key_hi, uint32_t j) {
    const uint32_t h = mix32(mix32(j ^ key_lo) + key_hi);
    return static_cast<float>(h >> 8) * 0x1p-24f;
}

}  // namespace agoq
