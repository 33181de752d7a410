// AVX-512 (F + BW + VL) versions of the hot loops, 16 elements per step, for fp32 and bf16 data.
//
// They compute exactly what the generic loops in agoq_quant_kernels.h compute (same integer
// reductions, round-half-to-even conversion, separate multiply and add); the generic loops handle
// other ISAs, fp16 (via an fp32 buffer), stochastic rounding and the ragged end of a tensor.
// NT = true writes with non-temporal (streaming) stores, for outputs larger than the cache: they
// skip reading each destination line before overwriting it. They need aligned destinations (every
// 16-element step of a group is, when the tensor start is 64-byte aligned) and an sfence after.
#pragma once

#include "agoq_quant_common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define AGOQ_HAVE_AVX512 1
#include <immintrin.h>

namespace agoq::avx512 {

constexpr int64_t kStep = 16;

template <class T>
inline __m512 load(const typename T::storage* p) {
    if constexpr (std::is_same_v<T, F32>) {
        return _mm512_loadu_ps(p);
    } else {
        static_assert(std::is_same_v<T, BF16>);
        const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
    }
}

template <class T, bool NT>
inline void store(typename T::storage* p, __m512 v) {
    if constexpr (std::is_same_v<T, F32>) {
        if constexpr (NT) _mm512_stream_ps(p, v);
        else _mm512_storeu_ps(p, v);
    } else {
        static_assert(std::is_same_v<T, BF16>);
        // Integer round-to-nearest-even like c10::BFloat16 (vcvtneps2bf16 would flush denormals).
        const __m512i u = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
        const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
        if constexpr (NT) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
        else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
    }
}

// The statistics pass is the first to read each input line. Hardware prefetchers stop at 4 KiB
// page boundaries, so the next page is requested in software (measured ~15% faster at 64M elements).
constexpr int kPrefetchBytes = 4096;

inline void prefetch_ahead(const void* p) {
    _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);  // never faults
}

// Max over |x| bit patterns of the first n (a multiple of kStep) elements.
template <class T>
inline uint32_t absmax_bits(const typename T::storage* x, int64_t n) {
    const __m512i mask = _mm512_set1_epi32(0x7FFFFFFF);
    __m512i m = _mm512_setzero_si512();
    for (int64_t i = 0; i < n; i += kStep) {
        prefetch_ahead(x + i);
        m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_castps_si512(load<T>(x + i)), mask));
    }
    return _mm512_reduce_max_epu32(m);
}

inline __m512i ordered(__m512 v) {
    const __m512i s = _mm512_castps_si512(v);
    return _mm512_xor_si512(s, _mm512_and_si512(_mm512_srai_epi32(s, 31), _mm512_set1_epi32(0x7FFFFFFF)));
}

// Min and max of ordered(x) over the first n (a multiple of kStep) elements.
template <class T>
inline void minmax_ordered(const typename T::storage* x, int64_t n, int32_t& lo, int32_t& hi) {
    __m512i mn = _mm512_set1_epi32(INT32_MAX), mx = _mm512_set1_epi32(INT32_MIN);
    for (int64_t i = 0; i < n; i += kStep) {
        prefetch_ahead(x + i);
        const __m512i s = ordered(load<T>(x + i));
        mn = _mm512_min_epi32(mn, s);
        mx = _mm512_max_epi32(mx, s);
    }
    lo = _mm512_reduce_min_epi32(mn);
    hi = _mm512_reduce_max_epi32(mx);
}

// Round-to-nearest codes of the first n (a multiple of kStep) elements, packed like pack_codes.
template <class T, int BITS, bool SYM, bool NT>
inline void encode_rtn(const typename T::storage* x, int64_t n, float zero, float inv, uint8_t* out) {
    constexpr int32_t top = SYM ? (1 << (BITS - 1)) - 1 : (1 << BITS) - 1;
    constexpr int32_t offset = SYM && BITS < 8 ? (1 << (BITS - 1)) : 0;
    const __m512 vinv = _mm512_set1_ps(inv), vzero = _mm512_set1_ps(zero);
    const __m512i vtop = _mm512_set1_epi32(top), vbottom = _mm512_set1_epi32(SYM ? -top : 0);
    const __m512i voff = _mm512_set1_epi32(offset);
    for (int64_t i = 0; i < n; i += kStep) {
        __m512 v = load<T>(x + i);
        v = SYM ? _mm512_mul_ps(v, vinv) : _mm512_mul_ps(_mm512_sub_ps(v, vzero), vinv);
        __m512i r = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(r, vbottom), vtop), voff);
        uint8_t* o = out + i * BITS / 8;
        if constexpr (BITS == 8) {
            if constexpr (NT) _mm_stream_si128(reinterpret_cast<__m128i*>(o), _mm512_cvtepi32_epi8(r));
            else _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm512_cvtepi32_epi8(r));
        } else if constexpr (BITS == 4) {
            // Each 64-bit lane holds codes (lo, hi) as two dwords: its low byte becomes lo | hi << 4.
            const __m512i t = _mm512_or_si512(r, _mm512_srli_epi64(r, 28));
            const __m128i packed = _mm512_cvtepi64_epi8(t);
            if constexpr (NT) _mm_stream_si64(reinterpret_cast<long long*>(o), _mm_cvtsi128_si64(packed));
            else _mm_storel_epi64(reinterpret_cast<__m128i*>(o), packed);
        } else {
            const __m128i c = _mm512_cvtepi32_epi8(r);  // 16 one-byte codes
            const __m128i t = _mm_or_si128(c, _mm_srli_epi32(c, 6));
            const __m128i b = _mm_or_si128(_mm_and_si128(t, _mm_set1_epi32(0x0F)),
                                           _mm_and_si128(_mm_srli_epi32(t, 12), _mm_set1_epi32(0xF0)));
            const int32_t word = _mm_cvtsi128_si32(_mm_cvtepi32_epi8(b));
            if constexpr (NT) _mm_stream_si32(reinterpret_cast<int*>(o), word);
            else std::memcpy(o, &word, 4);
        }
    }
}

// Dequantize the first n (a multiple of kStep) elements: y = q * s (+ z).
template <class T, int BITS, bool SYM, bool INT8, bool NT>
inline void decode(const uint8_t* codes, int64_t n, float s, float z, typename T::storage* out) {
    constexpr int32_t offset = SYM && BITS < 8 ? (1 << (BITS - 1)) : 0;
    const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z);
    const __m512i voff = _mm512_set1_epi32(offset);
    for (int64_t i = 0; i < n; i += kStep) {
        const uint8_t* c = codes + i * BITS / 8;
        __m512i q;
        if constexpr (BITS == 8) {
            const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c));
            q = INT8 ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
        } else if constexpr (BITS == 4) {
            __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
            w = _mm_and_si128(_mm_or_si128(w, _mm_slli_epi16(w, 4)), _mm_set1_epi16(0x0F0F));
            q = _mm512_sub_epi32(_mm512_cvtepu8_epi32(w), voff);
        } else {
            int32_t word;
            std::memcpy(&word, c, 4);
            __m128i w = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(word));
            w = _mm_and_si128(_mm_or_si128(w, _mm_slli_epi32(w, 12)), _mm_set1_epi32(0x000F000F));
            w = _mm_and_si128(_mm_or_si128(w, _mm_slli_epi32(w, 6)), _mm_set1_epi32(0x03030303));
            q = _mm512_sub_epi32(_mm512_cvtepu8_epi32(w), voff);
        }
        __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(q), vs);
        if constexpr (!SYM) y = _mm512_add_ps(y, vz);
        store<T, NT>(out + i, y);
    }
}

}  // namespace agoq::avx512

#endif
