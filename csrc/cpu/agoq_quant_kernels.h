// Blockwise quantization kernels for CPU (see agoq_ds/quant/format.py for the format contract).
//
// Threads (OpenMP) take batches of whole groups; within a group, full 16-element steps go through
// explicit AVX-512 code when the build has it and it is enabled (`simd` flag, switchable at run
// time so both paths are testable), everything else through generic block loops that gcc -O3
// vectorizes. No -ffast-math anywhere: NaN handling and bit-exactness with the pure-torch reference
// need IEEE semantics, so reductions run on integer bit patterns instead of float max/min (which
// would also drop NaNs). Must be compiled with -ffp-contract=off: gcc would otherwise fuse
// q * s + z (and the AVX-512 mul/add intrinsics) into FMAs that round once instead of twice.
#pragma once

#include "agoq_quant_avx512.h"
#include "agoq_quant_common.h"

namespace agoq {

// Inner loops run over blocks of kBlock elements (a compile-time trip count, so gcc emits straight
// vector code without per-group prologues); every group size is a multiple of it, and only the
// last group of a tensor can end in a partial block.
constexpr int64_t kBlock = 32;

// Per-group statistics on fp32 bit patterns: exact, NaN-propagating, vectorizable without
// -ffast-math (float max/min reductions are not, and std::max would drop NaNs).
struct AbsMax {
    float absmax;
    bool nonfinite;
};

template <class T>
inline AbsMax group_absmax(const typename T::storage* x, int64_t n, [[maybe_unused]] bool simd) {
    uint32_t lanes[kBlock] = {};
    int64_t i = 0;
#if defined(AGOQ_HAVE_AVX512)
    if (simd) {
        i = n / avx512::kStep * avx512::kStep;
        lanes[0] = avx512::absmax_bits<T>(x, i);
        if (i == n) return {float_of(lanes[0]), lanes[0] >= 0x7F800000u};
    }
#endif
    for (; i + kBlock <= n; i += kBlock)
        for (int64_t j = 0; j < kBlock; ++j) {
            const uint32_t a = bits_of(T::load(x, i + j)) & 0x7FFFFFFFu;
            lanes[j] = a > lanes[j] ? a : lanes[j];
        }
    for (int64_t j = 0; i + j < n; ++j) {
        const uint32_t a = bits_of(T::load(x, i + j)) & 0x7FFFFFFFu;
        lanes[j] = a > lanes[j] ? a : lanes[j];
    }
    uint32_t m = 0;
    for (int64_t j = 0; j < kBlock; ++j) m = lanes[j] > m ? lanes[j] : m;
    return {float_of(m), m >= 0x7F800000u};  // NaN and Inf patterns are above every finite one
}

// Float order as signed-int order (-0 < +0); NaNs land beyond +-Inf.
inline int32_t ordered(float f) {
    const int32_t s = static_cast<int32_t>(bits_of(f));
    return s ^ ((s >> 31) & 0x7FFFFFFF);
}

inline float from_ordered(int32_t s) { return float_of(static_cast<uint32_t>(s ^ ((s >> 31) & 0x7FFFFFFF))); }

struct MinMax {
    float mn, mx;
    bool nonfinite;
};

template <class T>
inline MinMax group_minmax(const typename T::storage* x, int64_t n, [[maybe_unused]] bool simd) {
    int32_t lo[kBlock], hi[kBlock];
    for (int64_t j = 0; j < kBlock; ++j) lo[j] = INT32_MAX, hi[j] = INT32_MIN;
    int64_t i = 0;
#if defined(AGOQ_HAVE_AVX512)
    if (simd) {
        i = n / avx512::kStep * avx512::kStep;
        avx512::minmax_ordered<T>(x, i, lo[0], hi[0]);
        if (i == n) return {from_ordered(lo[0]), from_ordered(hi[0]), hi[0] > 0x7F7FFFFF || lo[0] < -0x7F800000};
    }
#endif
    for (; i + kBlock <= n; i += kBlock)
        for (int64_t j = 0; j < kBlock; ++j) {
            const int32_t s = ordered(T::load(x, i + j));
            lo[j] = s < lo[j] ? s : lo[j];
            hi[j] = s > hi[j] ? s : hi[j];
        }
    for (int64_t j = 0; i + j < n; ++j) {
        const int32_t s = ordered(T::load(x, i + j));
        lo[j] = s < lo[j] ? s : lo[j];
        hi[j] = s > hi[j] ? s : hi[j];
    }
    int32_t mn = INT32_MAX, mx = INT32_MIN;
    for (int64_t j = 0; j < kBlock; ++j) mn = lo[j] < mn ? lo[j] : mn, mx = hi[j] > mx ? hi[j] : mx;
    // Finite floats map to [ordered(-FLT_MAX), ordered(FLT_MAX)] = [-0x7F800000, 0x7F7FFFFF].
    const bool nonfinite = mx > 0x7F7FFFFF || mn < -0x7F800000;
    return {from_ordered(mn), from_ordered(mx), nonfinite};
}

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "code packing below assumes a little-endian host");

// Pack 8/BITS one-byte codes (each < 2**BITS) per output byte, little end first. Multi-byte word
// loads and shifts instead of strided byte access, so gcc vectorizes the loops.
template <int BITS>
inline void pack_codes(const uint8_t* c, int64_t nbytes, uint8_t* out) {
    if constexpr (BITS == 8) {
        std::memcpy(out, c, static_cast<size_t>(nbytes));
    } else if constexpr (BITS == 4) {
        for (int64_t b = 0; b < nbytes; ++b) {
            uint16_t w;
            std::memcpy(&w, c + 2 * b, 2);
            out[b] = static_cast<uint8_t>(w | (w >> 4));  // lo | hi << 4
        }
    } else {
        for (int64_t b = 0; b < nbytes; ++b) {
            uint32_t w;
            std::memcpy(&w, c + 4 * b, 4);
            const uint32_t t = w | (w >> 6);  // c0 | c1 << 2 in bits 0-3, c2 | c3 << 2 in bits 16-19
            out[b] = static_cast<uint8_t>((t & 0x0Fu) | ((t >> 12) & 0xF0u));
        }
    }
}

// Inverse of pack_codes: 8/BITS one-byte codes per input byte.
template <int BITS>
inline void unpack_codes(const uint8_t* in, int64_t nbytes, uint8_t* c) {
    if constexpr (BITS == 8) {
        std::memcpy(c, in, static_cast<size_t>(nbytes));
    } else if constexpr (BITS == 4) {
        for (int64_t b = 0; b < nbytes; ++b) {
            uint16_t w = in[b];
            w = static_cast<uint16_t>((w | (w << 4)) & 0x0F0Fu);
            std::memcpy(c + 2 * b, &w, 2);
        }
    } else {
        for (int64_t b = 0; b < nbytes; ++b) {
            uint32_t w = in[b];
            w = (w | (w << 12)) & 0x000F000Fu;
            w = (w | (w << 6)) & 0x03030303u;
            std::memcpy(c + 4 * b, &w, 4);
        }
    }
}

// Codes of one block of `count` (<= kBlock; kBlock when FULL) elements, starting at element
// `base` of its group: round (x - zero) * inv, clamp, offset, pack into count * BITS / 8 bytes
// (rounded up; unused high bits of a partial byte are 0, like the reference's zero padding).
template <class T, int BITS, bool SYM, bool STOCH, bool FULL>
inline void encode_block(const typename T::storage* x, int64_t count, float zero, float inv, uint32_t key_lo,
                         uint32_t key_hi, int64_t base, uint8_t* out) {
    constexpr int32_t top = SYM ? (1 << (BITS - 1)) - 1 : (1 << BITS) - 1;
    constexpr int32_t bottom = SYM ? -top : 0;
    constexpr int32_t offset = SYM && BITS < 8 ? (1 << (BITS - 1)) : 0;
    constexpr int per = 8 / BITS;
    const int64_t m = FULL ? kBlock : count;
    alignas(64) uint8_t c[kBlock] = {};  // zeros also pad a partial block's last byte
    for (int64_t j = 0; j < m; ++j) {
        const float v = SYM ? T::load(x, j) * inv : (T::load(x, j) - zero) * inv;
        int32_t r;
        if constexpr (STOCH) {
            r = floor_small(v + uniform(key_lo, key_hi, static_cast<uint32_t>(base + j)));
        } else {
            r = round_half_even(v);
        }
        r = r < bottom ? bottom : r;
        r = r > top ? top : r;
        c[j] = static_cast<uint8_t>(r + offset);
    }
    pack_codes<BITS>(c, FULL ? kBlock / per : std::min<int64_t>((count + per - 1) / per, kBlock / per), out);
}

template <class T, int BITS, bool SYM, bool STOCH>
inline void encode_group(const typename T::storage* x, int64_t n, float zero, float inv, uint64_t key,
                         [[maybe_unused]] bool simd, [[maybe_unused]] bool nt, uint8_t* out) {
    const uint32_t key_lo = static_cast<uint32_t>(key), key_hi = static_cast<uint32_t>(key >> 32);
    int64_t i = 0;
#if defined(AGOQ_HAVE_AVX512)
    if (!STOCH && simd) {
        i = n / avx512::kStep * avx512::kStep;
        if (nt) avx512::encode_rtn<T, BITS, SYM, true>(x, i, zero, inv, out);
        else avx512::encode_rtn<T, BITS, SYM, false>(x, i, zero, inv, out);
    }
#endif
    for (; i + kBlock <= n; i += kBlock)
        encode_block<T, BITS, SYM, STOCH, true>(x + i, kBlock, zero, inv, key_lo, key_hi, i, out + i * BITS / 8);
    if (i < n) encode_block<T, BITS, SYM, STOCH, false>(x + i, n - i, zero, inv, key_lo, key_hi, i, out + i * BITS / 8);
}

struct QuantArgs {
    int64_t numel;
    int64_t group_size;
    bool stochastic;
    uint64_t seed;
    bool scale_bf16;
    bool simd;  // use the explicit SIMD loops where built
    bool nt;    // ... with streaming stores (output larger than the cache, aligned)
};

// Outputs at least this large are written with streaming stores (when aligned). The default is
// min(LLC, 32 MiB), since a VM may report the whole host's LLC; tests lower it to cover that path.
inline std::atomic<int64_t>& streaming_threshold_bytes() {
    static std::atomic<int64_t> bytes{[] {
        constexpr int64_t kCap = int64_t(32) << 20;
#if defined(_SC_LEVEL3_CACHE_SIZE)
        const long llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
        if (llc > 0) return std::min<int64_t>(llc, kCap);
#endif
        return kCap;
    }()};
    return bytes;
}

inline bool use_streaming(const void* out, int64_t bytes) {
    return bytes >= streaming_threshold_bytes().load() && reinterpret_cast<uintptr_t>(out) % 64 == 0;
}

// Groups are processed in batches of about kBatchElems elements: statistics of the whole batch
// first, then its scales with vector divisions, then its codes. Done group by group, the chain
// reduction -> divide -> reciprocal -> encode stalls on division latency for small groups.
constexpr int64_t kBatchElems = 4096;
constexpr int64_t kMaxBatch = kBatchElems / 32;

// Work is handed to threads dynamically in tasks of about kTaskElems elements (results never
// depend on it): on a shared machine a static split waits for whichever thread was descheduled.
constexpr int64_t kTaskElems = 1 << 18;
constexpr int64_t kBatchesPerTask = kTaskElems / kBatchElems;

// Every q of the group is 0 (non-finite, flushed or overflowing scale): same codes as the reference.
template <int BITS, bool SYM>
inline void fill_zero_codes(int64_t n, uint8_t* out) {
    constexpr int per = 8 / BITS;
    constexpr uint32_t code = SYM && BITS < 8 ? (1u << (BITS - 1)) : 0u;
    uint32_t byte = 0;
    for (int k = 0; k < per; ++k) byte |= code << (k * BITS);
    std::memset(out, static_cast<int>(byte), static_cast<size_t>(n / per));
    if (n % per) {
        uint32_t last = 0;
        for (int64_t k = 0; k < n % per; ++k) last |= code << (k * BITS);
        out[n / per] = static_cast<uint8_t>(last);
    }
}

// Quantize groups [g0, g0 + count) whose data starts at x (group g0's first element).
template <class T, int BITS, bool SYM>
inline void quantize_batch(const typename T::storage* x, int64_t g0, int64_t count, const QuantArgs& a,
                           uint8_t* codes, void* scales, float* zeros) {
    constexpr float top = SYM ? static_cast<float>((1 << (BITS - 1)) - 1) : static_cast<float>((1 << BITS) - 1);
    const int64_t G = a.group_size;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const auto len = [&](int64_t k) { return std::min(G, a.numel - (g0 + k) * G); };
    alignas(64) float lo[kMaxBatch], span[kMaxBatch], scale[kMaxBatch], inv[kMaxBatch];
    alignas(64) int32_t bad[kMaxBatch];
    for (int64_t k = 0; k < count; ++k) {
        if constexpr (SYM) {
            const AbsMax st = group_absmax<T>(x + k * G, len(k), a.simd);
            span[k] = st.absmax;  // NaN when non-finite: fails the TINY test below
            bad[k] = st.nonfinite;
            lo[k] = 0.0f;
        } else {
            const MinMax st = group_minmax<T>(x + k * G, len(k), a.simd);
            span[k] = st.mx - st.mn;
            bad[k] = st.nonfinite;
            lo[k] = st.mn;
        }
    }
    for (int64_t k = 0; k < count; ++k) {  // vectorized: exact IEEE divisions, lane by lane
        float s = span[k] / top;
        if (a.scale_bf16) s = bf16_to_f32(f32_to_bf16(s));
        const bool nonfinite = bad[k] != 0 || !(span[k] <= std::numeric_limits<float>::max());
        const bool flushed = span[k] < kTiny;
        const float r = 1.0f / s;  // of the stored (possibly bf16-rounded) scale
        inv[k] = nonfinite || flushed ? 0.0f : r;
        scale[k] = nonfinite ? nan : (flushed ? 0.0f : s);
        if constexpr (!SYM) lo[k] = nonfinite ? nan : lo[k];
    }
    for (int64_t k = 0; k < count; ++k) {
        const int64_t g = g0 + k;
        if (a.scale_bf16) static_cast<uint16_t*>(scales)[g] = f32_to_bf16(scale[k]);
        else static_cast<float*>(scales)[g] = scale[k];
        if constexpr (!SYM) zeros[g] = lo[k];
        uint8_t* out = codes + g * G * BITS / 8;
        // inv == 0 also when a bf16-rounded scale overflowed to Inf: the reference's x * 0 gives q = 0 too.
        const auto* xg = x + k * G;
        const int64_t n = len(k);
        if (inv[k] == 0.0f) fill_zero_codes<BITS, SYM>(n, out);
        else if (a.stochastic)
            encode_group<T, BITS, SYM, true>(xg, n, lo[k], inv[k], group_key(a.seed, g), a.simd, a.nt, out);
        else encode_group<T, BITS, SYM, false>(xg, n, lo[k], inv[k], 0, a.simd, a.nt, out);
    }
}

template <class T, int BITS, bool SYM>
void quantize_kernel(const typename T::storage* x, const QuantArgs& a, uint8_t* codes, void* scales, float* zeros) {
    const int64_t G = a.group_size;
    const int64_t ngroups = (a.numel + G - 1) / G;
    const int64_t per_batch = std::max<int64_t>(1, kBatchElems / G);
    const int64_t nbatches = (ngroups + per_batch - 1) / per_batch;
#pragma omp parallel if (a.numel >= 32768)
    {
        alignas(64) float buf[T::kDirect ? 1 : std::max(kBatchElems, kMaxGroup)];
#pragma omp for schedule(dynamic, kBatchesPerTask)
        for (int64_t b = 0; b < nbatches; ++b) {
            const int64_t g0 = b * per_batch;
            const int64_t count = std::min(per_batch, ngroups - g0);
            const int64_t start = g0 * G;
            if constexpr (T::kDirect) {
                quantize_batch<T, BITS, SYM>(x + start, g0, count, a, codes, scales, zeros);
            } else {
                T::to_f32(x + start, buf, std::min(count * G, a.numel - start));
                quantize_batch<F32, BITS, SYM>(buf, g0, count, a, codes, scales, zeros);
            }
        }
        if (a.nt) sfence();
    }
}

// Dequantize one block of `count` (kBlock when FULL) elements: y = q * s (+ z), stored through T.
template <class T, int BITS, bool SYM, bool INT8, bool FULL>
inline void decode_block(const uint8_t* codes, int64_t count, float s, float z, typename T::storage* out) {
    constexpr int per = 8 / BITS;
    constexpr int32_t offset = SYM && BITS < 8 ? (1 << (BITS - 1)) : 0;
    const int64_t m = FULL ? kBlock : count;
    alignas(64) uint8_t c[kBlock];
    unpack_codes<BITS>(codes, FULL ? kBlock / per : std::min<int64_t>((count + per - 1) / per, kBlock / per), c);
    for (int64_t j = 0; j < m; ++j) {
        const int32_t q = INT8 ? static_cast<int32_t>(static_cast<int8_t>(c[j])) : static_cast<int32_t>(c[j]) - offset;
        float y = static_cast<float>(q) * s;
        if constexpr (!SYM) y = y + z;  // a separate rounding: built with -ffp-contract=off, like the reference
        T::store(out, j, y);
    }
}

template <class T, int BITS, bool SYM, bool INT8>
inline void decode_group(const uint8_t* codes, int64_t n, float s, float z, [[maybe_unused]] bool simd,
                         [[maybe_unused]] bool nt, typename T::storage* out) {
    int64_t i = 0;
#if defined(AGOQ_HAVE_AVX512)
    if (simd) {
        i = n / avx512::kStep * avx512::kStep;
        if (nt) avx512::decode<T, BITS, SYM, INT8, true>(codes, i, s, z, out);
        else avx512::decode<T, BITS, SYM, INT8, false>(codes, i, s, z, out);
    }
#endif
    for (; i + kBlock <= n; i += kBlock)
        decode_block<T, BITS, SYM, INT8, true>(codes + i * BITS / 8, kBlock, s, z, out + i);
    if (i < n) decode_block<T, BITS, SYM, INT8, false>(codes + i * BITS / 8, n - i, s, z, out + i);
}

template <class T, int BITS, bool SYM, bool INT8>
void dequantize_kernel(const uint8_t* codes, const void* scales, bool scale_bf16, const float* zeros, int64_t numel,
                       int64_t G, bool simd, typename T::storage* out) {
    const int64_t ngroups = (numel + G - 1) / G;
    const bool nt = simd && T::kDirect && use_streaming(out, numel * int64_t(sizeof(*out)));
#pragma omp parallel if (numel >= 32768)
    {
        alignas(64) float buf[T::kDirect ? 1 : kMaxGroup];
#pragma omp for schedule(dynamic, std::max<int64_t>(1, kTaskElems / G))
        for (int64_t g = 0; g < ngroups; ++g) {
            const int64_t start = g * G;
            const int64_t n = std::min(G, numel - start);
            const float s = scale_bf16 ? bf16_to_f32(static_cast<const uint16_t*>(scales)[g])
                                       : static_cast<const float*>(scales)[g];
            const float z = SYM ? 0.0f : zeros[g];
            const uint8_t* c = codes + start * BITS / 8;
            if constexpr (T::kDirect) {
                decode_group<T, BITS, SYM, INT8>(c, n, s, z, simd, nt, out + start);
            } else {
                decode_group<F32, BITS, SYM, INT8>(c, n, s, z, simd, false, buf);
                T::from_f32(buf, out + start, n);
            }
        }
        if (nt) sfence();
    }
}

}  // namespace agoq
