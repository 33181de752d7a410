// Python bindings of the CPU blockwise quantizer (format: agoq_ds/quant/format.py).
//
//   quantize(x, bits, group_size, symmetric, stochastic, seed, scale_dtype) -> (codes, scales, zeros_or_empty)
//   dequantize(codes, scales, zeros_or_empty, bits, group_size, numel, out_dtype) -> Tensor
//   dequantize_add_(codes, scales, group_size, out)       out += dequantized int8 codes (fp32, in place)
//   requantize_add_(codes, scales, addend, has_value, group_size, stochastic, seed)
//                                                         int8 codes/scales := Q(D(codes) + addend), in place
//
// Round-to-nearest results are bit-exact with agoq_ds/quant/reference.py; stochastic rounding uses
// a counter-based hash of (seed, group, index), so it does not depend on the thread count.
// gcc 12 reports its own AVX-512 intrinsics' "undefined vector" idiom as maybe-uninitialized
// (GCC bug 105593); the pragma must precede the first include of <immintrin.h>.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <atomic>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "agoq_accumulate.h"
#include "agoq_quant_kernels.h"

namespace {

using torch::Tensor;

// Whether the explicit SIMD loops are used (when compiled in); tests switch it off to check the
// generic loops against the reference with the same build.
std::atomic<bool> g_simd{true};

bool simd_compiled() {
#if defined(AGOQ_HAVE_AVX512)
    return true;
#else
    return false;
#endif
}

bool set_simd(bool enabled) { return g_simd.exchange(enabled && simd_compiled()); }

int64_t set_streaming_threshold(int64_t bytes) { return agoq::streaming_threshold_bytes().exchange(bytes); }

// A 1-D output tensor for a kernel to fill. Large ones are advised to use transparent huge pages
// (when the system's THP mode is "madvise") and are faulted in by all threads, one huge page each,
// before the kernel runs: on a fresh allocation, 4 KiB page faults, TLB misses and threads queuing
// on the same page's first touch otherwise cost more than the kernel itself.
Tensor empty_output(int64_t n, const at::TensorOptions& opts) {
    Tensor t = torch::empty({n}, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr int64_t kHuge = int64_t(2) << 20;
    const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const auto bytes = static_cast<int64_t>(t.nbytes());
    if (bytes >= 4 * kHuge) {
        const uintptr_t lo = (p + kHuge - 1) & ~uintptr_t(kHuge - 1);
        const uintptr_t hi = (p + bytes) & ~uintptr_t(kHuge - 1);
        if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice only
        auto* base = static_cast<volatile char*>(t.data_ptr());
#pragma omp parallel for schedule(static)
        for (int64_t offset = 0; offset < bytes; offset += kHuge) base[offset] = 0;
    }
#endif
    return t;
}

void check_params(int64_t bits, int64_t group_size) {
    TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "agoq quantize: bits=", bits, " must be 2, 4 or 8");
    TORCH_CHECK(group_size >= 32 && group_size <= agoq::kMaxGroup && (group_size & (group_size - 1)) == 0,
                "agoq quantize: group_size=", group_size, " must be a power of two in [32, ", agoq::kMaxGroup, "]");
}

template <class T>
void quantize_dispatch(const Tensor& x, int64_t bits, bool symmetric, const agoq::QuantArgs& a, uint8_t* codes,
                       void* scales, float* zeros) {
    const auto* src = reinterpret_cast<const typename T::storage*>(x.data_ptr());
    const auto run = [&](auto bits_c, auto sym_c) {
        agoq::quantize_kernel<T, decltype(bits_c)::value, decltype(sym_c)::value>(src, a, codes, scales, zeros);
    };
    using t = std::true_type;
    using f = std::false_type;
    using b8 = std::integral_constant<int, 8>;
    using b4 = std::integral_constant<int, 4>;
    using b2 = std::integral_constant<int, 2>;
    if (bits == 8) symmetric ? run(b8{}, t{}) : run(b8{}, f{});
    else if (bits == 4) symmetric ? run(b4{}, t{}) : run(b4{}, f{});
    else symmetric ? run(b2{}, t{}) : run(b2{}, f{});
}

void check_float_input(const Tensor& t, const char* what) {
    TORCH_CHECK(t.device().is_cpu(), "agoq (cpp backend): ", what, " must be on the CPU, got ", t.device());
    const auto d = t.scalar_type();
    TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, "agoq: ", what, " dtype ", d,
                " not supported; use float32, bfloat16 or float16");
}

void check_output(const Tensor& t, const char* what, at::ScalarType dtype, int64_t numel) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "agoq: ", what, " must be a contiguous CPU tensor");
    TORCH_CHECK(t.scalar_type() == dtype && t.numel() == numel, "agoq: ", what, " must hold ", numel, " ",
                c10::toString(dtype), " elements, got ", t.numel(), " ", c10::toString(t.scalar_type()));
}

// Quantize x into preallocated codes / scales (/ zeros) of the exact sizes and dtypes quantize() returns
// (the scale dtype is taken from `scales`).
void quantize_into(const Tensor& input, Tensor& codes, Tensor& scales, Tensor& zeros, int64_t bits,
                   int64_t group_size, bool symmetric, bool stochastic, uint64_t seed) {
    check_params(bits, group_size);
    check_float_input(input, "quantize input");
    const Tensor x = input.contiguous();
    const int64_t numel = x.numel();
    const int64_t ngroups = (numel + group_size - 1) / group_size;
    const int64_t per_byte = 8 / bits;
    const auto scale_dtype = scales.scalar_type();
    TORCH_CHECK(scale_dtype == at::kFloat || scale_dtype == at::kBFloat16,
                "agoq quantize: scale_dtype must be float32 or bfloat16");
    TORCH_CHECK(symmetric || scale_dtype == at::kFloat, "agoq quantize: asymmetric scales and zeros are float32");
    check_output(codes, "codes", bits == 8 && symmetric ? at::kChar : at::kByte, (numel + per_byte - 1) / per_byte);
    check_output(scales, "scales", scale_dtype, ngroups);
    if (!symmetric) check_output(zeros, "zeros", at::kFloat, ngroups);
    if (numel == 0) return;

    const bool simd = g_simd.load();
    const bool nt = simd && !stochastic && agoq::use_streaming(codes.data_ptr(), codes.numel());
    const agoq::QuantArgs a{numel, group_size, stochastic, seed, scale_dtype == at::kBFloat16, simd, nt};
    auto* c = reinterpret_cast<uint8_t*>(codes.data_ptr());
    void* s = scales.data_ptr();
    float* z = symmetric ? nullptr : zeros.data_ptr<float>();
    const auto dtype = x.scalar_type();
    if (dtype == at::kFloat) quantize_dispatch<agoq::F32>(x, bits, symmetric, a, c, s, z);
    else if (dtype == at::kBFloat16) quantize_dispatch<agoq::BF16>(x, bits, symmetric, a, c, s, z);
    else quantize_dispatch<agoq::F16>(x, bits, symmetric, a, c, s, z);
}

std::tuple<Tensor, Tensor, Tensor> quantize(const Tensor& x, int64_t bits, int64_t group_size, bool symmetric,
                                            bool stochastic, uint64_t seed, at::ScalarType scale_dtype) {
    check_params(bits, group_size);
    check_float_input(x, "quantize input");
    TORCH_CHECK(scale_dtype == at::kFloat || scale_dtype == at::kBFloat16,
                "agoq quantize: scale_dtype must be float32 or bfloat16");
    const int64_t numel = x.numel();
    const int64_t ngroups = (numel + group_size - 1) / group_size;
    const int64_t per_byte = 8 / bits;
    const auto opts = x.options();
    const auto code_dtype = bits == 8 && symmetric ? at::kChar : at::kByte;
    Tensor codes = empty_output((numel + per_byte - 1) / per_byte, opts.dtype(code_dtype));
    Tensor scales = torch::empty({ngroups}, opts.dtype(scale_dtype));
    Tensor zeros = torch::empty({symmetric ? 0 : ngroups}, opts.dtype(at::kFloat));
    quantize_into(x, codes, scales, zeros, bits, group_size, symmetric, stochastic, seed);
    return {codes, scales, zeros};
}

template <class T>
void dequantize_dispatch(const uint8_t* codes, bool int8_codes, const void* scales, bool scale_bf16,
                         const float* zeros, int64_t bits, int64_t numel, int64_t group_size, Tensor& out) {
    auto* dst = reinterpret_cast<typename T::storage*>(out.data_ptr());
    const auto run = [&](auto bits_c, auto sym_c, auto int8_c) {
        agoq::dequantize_kernel<T, decltype(bits_c)::value, decltype(sym_c)::value, decltype(int8_c)::value>(
            codes, scales, scale_bf16, zeros, numel, group_size, g_simd.load(), dst);
    };
    using t = std::true_type;
    using f = std::false_type;
    using b8 = std::integral_constant<int, 8>;
    using b4 = std::integral_constant<int, 4>;
    using b2 = std::integral_constant<int, 2>;
    const bool sym = zeros == nullptr;
    if (bits == 8) {
        if (sym) int8_codes ? run(b8{}, t{}, t{}) : run(b8{}, t{}, f{});
        else int8_codes ? run(b8{}, f{}, t{}) : run(b8{}, f{}, f{});
    } else if (bits == 4) {
        sym ? run(b4{}, t{}, f{}) : run(b4{}, f{}, f{});
    } else {
        sym ? run(b2{}, t{}, f{}) : run(b2{}, f{}, f{});
    }
}

// Dequantize into a preallocated contiguous `out` (its numel and dtype give numel and out_dtype).
void dequantize_into(const Tensor& codes_in, const Tensor& scales_in, const Tensor& zeros_in, int64_t bits,
                     int64_t group_size, Tensor& out) {
    check_params(bits, group_size);
    TORCH_CHECK(codes_in.device().is_cpu() && scales_in.device().is_cpu() && zeros_in.device().is_cpu(),
                "agoq dequantize (cpp backend): tensors must be on the CPU");
    TORCH_CHECK(out.device().is_cpu() && out.is_contiguous(), "agoq dequantize: out must be a contiguous CPU tensor");
    const auto out_dtype = out.scalar_type();
    TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
                "agoq dequantize: out_dtype ", out_dtype, " not supported");
    TORCH_CHECK(codes_in.scalar_type() == at::kByte || codes_in.scalar_type() == at::kChar,
                "agoq dequantize: codes must be uint8 or int8");
    TORCH_CHECK(scales_in.scalar_type() == at::kFloat || scales_in.scalar_type() == at::kBFloat16,
                "agoq dequantize: scales must be float32 or bfloat16");
    const int64_t numel = out.numel();
    const int64_t ngroups = (numel + group_size - 1) / group_size;
    const int64_t per_byte = 8 / bits;
    TORCH_CHECK(codes_in.numel() >= (numel + per_byte - 1) / per_byte, "agoq dequantize: ", codes_in.numel(),
                " code bytes cannot hold ", numel, " elements of ", bits, " bits");
    TORCH_CHECK(scales_in.numel() >= ngroups, "agoq dequantize: ", scales_in.numel(), " scales for ", ngroups,
                " groups");
    const bool symmetric = zeros_in.numel() == 0;
    TORCH_CHECK(symmetric || (zeros_in.scalar_type() == at::kFloat && zeros_in.numel() >= ngroups),
                "agoq dequantize: zeros must be float32 with one entry per group (or empty)");
    if (numel == 0) return;
    const Tensor codes = codes_in.contiguous();
    const Tensor scales = scales_in.contiguous();
    const Tensor zeros = zeros_in.contiguous();
    const auto* c = reinterpret_cast<const uint8_t*>(codes.data_ptr());
    const bool int8_codes = codes.scalar_type() == at::kChar;
    const bool sbf16 = scales.scalar_type() == at::kBFloat16;
    const float* z = symmetric ? nullptr : zeros.data_ptr<float>();
    if (out_dtype == at::kFloat)
        dequantize_dispatch<agoq::F32>(c, int8_codes, scales.data_ptr(), sbf16, z, bits, numel, group_size, out);
    else if (out_dtype == at::kBFloat16)
        dequantize_dispatch<agoq::BF16>(c, int8_codes, scales.data_ptr(), sbf16, z, bits, numel, group_size, out);
    else
        dequantize_dispatch<agoq::F16>(c, int8_codes, scales.data_ptr(), sbf16, z, bits, numel, group_size, out);
}

Tensor dequantize(const Tensor& codes, const Tensor& scales, const Tensor& zeros, int64_t bits, int64_t group_size,
                  int64_t numel, at::ScalarType out_dtype) {
    TORCH_CHECK(numel >= 0, "agoq dequantize: numel must be >= 0");
    TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
                "agoq dequantize: out_dtype ", out_dtype, " not supported");
    Tensor out = empty_output(numel, scales.options().dtype(out_dtype));
    dequantize_into(codes, scales, zeros, bits, group_size, out);
    return out;
}

void check_int8_fp32(const Tensor& codes, const Tensor& scales, int64_t numel, int64_t group_size, const char* op) {
    check_params(8, group_size);
    const int64_t ngroups = (numel + group_size - 1) / group_size;
    TORCH_CHECK(codes.device().is_cpu() && codes.is_contiguous() && codes.scalar_type() == at::kChar &&
                    codes.numel() == numel,
                "agoq ", op, ": codes must be a contiguous CPU int8 tensor of ", numel, " elements");
    TORCH_CHECK(scales.device().is_cpu() && scales.is_contiguous() && scales.scalar_type() == at::kFloat &&
                    scales.numel() == ngroups,
                "agoq ", op, ": scales must be a contiguous CPU float32 tensor of ", ngroups, " elements");
}

// out += codes * scales (symmetric int8, fp32 scales), out fp32 contiguous.
void dequantize_add_(const Tensor& codes, const Tensor& scales, int64_t group_size, Tensor& out) {
    TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.scalar_type() == at::kFloat,
                "agoq dequantize_add_: out must be a contiguous CPU float32 tensor");
    check_int8_fp32(codes, scales, out.numel(), group_size, "dequantize_add_");
    if (out.numel() == 0) return;
    agoq::dequantize_add_kernel(codes.data_ptr<int8_t>(), scales.data_ptr<float>(), out.numel(), group_size,
                                out.data_ptr<float>());
}

// codes/scales := quantize((has_value ? dequantize(codes, scales) : 0) + addend), in place.
void requantize_add_(Tensor& codes, Tensor& scales, const Tensor& addend, bool has_value, int64_t group_size,
                     bool stochastic, uint64_t seed) {
    TORCH_CHECK(addend.device().is_cpu() && addend.is_contiguous() &&
                    (addend.scalar_type() == at::kFloat || addend.scalar_type() == at::kBFloat16),
                "agoq requantize_add_: addend must be a contiguous CPU float32 or bfloat16 tensor");
    const int64_t numel = addend.numel();
    check_int8_fp32(codes, scales, numel, group_size, "requantize_add_");
    if (numel == 0) return;
    const agoq::QuantArgs a{numel, group_size, stochastic, seed, false, g_simd.load(), false};
    if (addend.scalar_type() == at::kFloat)
        agoq::requantize_add_kernel<agoq::F32>(codes.data_ptr<int8_t>(), scales.data_ptr<float>(),
                                               addend.data_ptr<float>(), has_value, a);
    else
        agoq::requantize_add_kernel<agoq::BF16>(codes.data_ptr<int8_t>(), scales.data_ptr<float>(),
                                                reinterpret_cast<const uint16_t*>(addend.data_ptr()), has_value, a);
}

std::string build_info() {
    std::string simd = "generic";
#if defined(AGOQ_HAVE_AVX512)
    simd = g_simd.load() ? "AVX-512" : "AVX-512 off";
#elif defined(__AVX2__)
    simd = "AVX2, auto-vectorized";
#elif defined(__ARM_NEON)
    simd = "NEON";
#endif
#if defined(_OPENMP)
    simd += ", OpenMP";
#endif
    return simd;
}

int64_t max_threads() {
#if defined(_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
}

#define AGOQ_STRINGIFY2(x) #x
#define AGOQ_STRINGIFY(x) AGOQ_STRINGIFY2(x)
#if !defined(AGOQ_SOURCE_HASH)
#define AGOQ_SOURCE_HASH unknown
#endif

std::string source_hash() { return AGOQ_STRINGIFY(AGOQ_SOURCE_HASH); }

std::string torch_version() { return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR); }

}  // namespace

namespace {

// The dispatcher's CPU kernels of agoq::quantize / agoq::dequantize (schemas: agoq_ds/quant/ops.py):
// a call through torch.ops costs what an aten op costs, no Python in between. The seed is the
// int64 of the schema; its bits are the uint64 seed the pybind entry point takes.
std::tuple<Tensor, Tensor, Tensor> quantize_op(const Tensor& x, int64_t bits, int64_t group_size, bool symmetric,
                                               bool stochastic, int64_t seed, at::ScalarType scale_dtype) {
    return quantize(x.contiguous(), bits, group_size, symmetric, stochastic, static_cast<uint64_t>(seed), scale_dtype);
}

Tensor dequantize_op(const Tensor& codes, const Tensor& scales, const Tensor& zeros, int64_t bits, int64_t group_size,
                     int64_t numel, at::ScalarType out_dtype) {
    return dequantize(codes, scales, zeros, bits, group_size, numel, out_dtype);
}

// The fused gradient ops agoq::dequantize_add_ / agoq::requantize_add_ (in place; schemas in ops.py).
void dequantize_add_op(Tensor& out, const Tensor& codes, const Tensor& scales, int64_t group_size) {
    dequantize_add_(codes, scales, group_size, out);
}

void requantize_add_op(Tensor& codes, Tensor& scales, const Tensor& addend, bool has_value, int64_t group_size,
                       bool stochastic, int64_t seed) {
    requantize_add_(codes, scales, addend, has_value, group_size, stochastic, static_cast<uint64_t>(seed));
}

}  // namespace

// Every op here is listed in NATIVE_KERNELS["cpu"] (agoq_ds/quant/ops.py); tests/quant/test_registry.py checks.
TORCH_LIBRARY_IMPL(agoq, CPU, m) {
    m.impl("quantize", &quantize_op);
    m.impl("dequantize", &dequantize_op);
    m.impl("dequantize_add_", &dequantize_add_op);
    m.impl("requantize_add_", &requantize_add_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "agoq-ds blockwise quantization kernels for CPU";
    m.def("quantize", &quantize, "Blockwise quantize (see agoq_ds/quant/format.py)", py::arg("x"), py::arg("bits"),
          py::arg("group_size"), py::arg("symmetric"), py::arg("stochastic"), py::arg("seed"),
          py::arg("scale_dtype"), py::call_guard<py::gil_scoped_release>());
    m.def("dequantize", &dequantize, "Inverse of quantize", py::arg("codes"), py::arg("scales"), py::arg("zeros"),
          py::arg("bits"), py::arg("group_size"), py::arg("numel"), py::arg("out_dtype"),
          py::call_guard<py::gil_scoped_release>());
    m.def("quantize_into", &quantize_into, "quantize into preallocated codes/scales/zeros", py::arg("x"),
          py::arg("codes"), py::arg("scales"), py::arg("zeros"), py::arg("bits"), py::arg("group_size"),
          py::arg("symmetric"), py::arg("stochastic"), py::arg("seed"), py::call_guard<py::gil_scoped_release>());
    m.def("dequantize_into", &dequantize_into, "dequantize into a preallocated tensor", py::arg("codes"),
          py::arg("scales"), py::arg("zeros"), py::arg("bits"), py::arg("group_size"), py::arg("out"),
          py::call_guard<py::gil_scoped_release>());
    m.def("dequantize_add_", &dequantize_add_, "out += dequantized symmetric int8 codes (fp32 scales), in place",
          py::arg("codes"), py::arg("scales"), py::arg("group_size"), py::arg("out"),
          py::call_guard<py::gil_scoped_release>());
    m.def("requantize_add_", &requantize_add_, "int8 codes/scales := quantize(dequantize(codes) + addend), in place",
          py::arg("codes"), py::arg("scales"), py::arg("addend"), py::arg("has_value"), py::arg("group_size"),
          py::arg("stochastic"), py::arg("seed"), py::call_guard<py::gil_scoped_release>());
    m.def("build_info", &build_info, "SIMD width and threading the module was compiled for");
    m.def("set_simd", &set_simd, "Enable/disable the explicit SIMD loops; returns the previous setting",
          py::arg("enabled"));
    m.def("set_streaming_threshold", &set_streaming_threshold,
          "Outputs of at least this many bytes use streaming stores; returns the previous threshold",
          py::arg("bytes"));
    m.def("simd_compiled", &simd_compiled, "Whether explicit SIMD loops were compiled in");
    m.def("max_threads", &max_threads, "OpenMP threads a kernel called from this thread would use");
    m.def("source_hash", &source_hash, "hash of the csrc/cpu sources this module was built from");
    m.def("torch_version", &torch_version, "major.minor of the torch this module was compiled against");
}
