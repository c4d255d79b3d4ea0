// fusedrl.kernels._cpu_rows: the streaming row softmax of fusedrl.kernels' log-prob ops as native CPU loops.
//
// The same math as the Triton kernels in kernels/_rows.py (_stream_rows, _logprobs_bwd_kernel), for float32 and
// bfloat16 logits whose vocabulary axis is contiguous:
//   forward   one read of each row: per block of the row, its max, then sum exp(x - m) (and, for the entropy,
//             sum exp(x - m) (x - m)) against a running max that is re-referenced when a block raises it;
//   backward  one read and one write: dL/dx_j = (1/T) [g_lp ([j = y] - p_j) - g_H p_j (log p_j + H)].
// No (rows, V) temporary: a block of the row lives in a stack buffer while it is in L1. The loops are written
// for the compiler's vectoriser (a branch-free exp, selects instead of branches) and compiled once per x86
// level (AVX-512, AVX2 + FMA, baseline), the best one picked at load time.
//
// The contract on NaN / Inf is the Triton kernels': a NaN or +inf in a valid row makes every output of that row
// NaN, a -inf logit has p = 0 and adds nothing, an ignored row (label == ignore_index) gives exact zeros
// whatever it holds, a label outside [0, V) gives logp NaN and no label column in the gradient.
//
// Arrays arrive through the buffer protocol (NumPy views of CPU tensors; bfloat16 as int16 / uint16 bits), so
// every extent and stride is known here and checked before anything is read: no call reads or writes outside
// the buffers it was given, whatever their shapes.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace py = pybind11;

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FUSEDRL_NO_CLONES)
#if __GNUC__ >= 11  // the x86-64 micro-architecture levels
#define FUSEDRL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FUSEDRL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#else
#define FUSEDRL_CLONES
#endif
// Everything a cloned function calls is inlined into it, so that it is compiled for the clone's instruction set.
#define FUSEDRL_INLINE inline __attribute__((always_inline))

// 16 floats: GCC / Clang vector extensions, lowered to one AVX-512 register, two AVX2 ones or four SSE ones by the
// clone being compiled. Comparisons give 0 / -1 lanes and `c ? a : b` selects lane-wise.
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
constexpr int kLanes = 16;
constexpr int64_t kBlock = 1024;  // floats of a row held at once: 4 KiB, with its source, well inside L1
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

FUSEDRL_INLINE f32x16 splat(float a) { return f32x16{} + a; }

FUSEDRL_INLINE float float_of(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// exp(x) for the x <= 0 of a softmax (correct up to x = 88): Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2,
// a degree-5 minimax polynomial for e^r (Cephes' expf coefficients, ~1 ulp), 2^n built in the exponent bits.
// No branch: below -87.3 the result is exactly 0 (a -inf logit too), and NaN stays NaN (every comparison with it
// is false, so the selects keep it; a NaN r makes the product NaN whatever 2^n came out as).
FUSEDRL_INLINE f32x16 exp_v(f32x16 x) {
    f32x16 t = x * 1.44269504088896341f;
    t = t < -126.0f ? splat(-126.0f) : t;
    t = t > 127.0f ? splat(127.0f) : t;
    const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds t to an integer held in the low mantissa bits
    const f32x16 tm = t + magic;
    const f32x16 n = tm - magic;
    const f32x16 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    f32x16 p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const f32x16 er = (p * r) * r + r + 1.0f;
    const u32x16 scale = ((u32x16)tm - 0x4B400000u + 127u) << 23;
    const f32x16 y = er * (f32x16)scale;
    return x < -87.33654475f ? splat(0.0f) : y;
}

// Every access goes through memcpy: a caller's array may be unaligned (a NumPy view at an odd byte offset).
FUSEDRL_INLINE float load_one(const float* p) {
    float v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
FUSEDRL_INLINE float load_one(const uint16_t* p) {
    uint16_t h;
    std::memcpy(&h, p, sizeof h);
    return float_of(static_cast<uint32_t>(h) << 16);
}

// Loads of 16 logits as float32 (bfloat16 is the high half of a float32); a partial load pads with `fill`.
FUSEDRL_INLINE f32x16 load16(const float* p) {
    f32x16 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
FUSEDRL_INLINE f32x16 load16(const uint16_t* p) {
    u16x16 h;
    std::memcpy(&h, p, sizeof h);
    return (f32x16)(__builtin_convertvector(h, u32x16) << 16);
}
template <typename T>
FUSEDRL_INLINE f32x16 load_part(const T* p, int64_t n, float fill) {
    f32x16 v = splat(fill);
    float lanes[kLanes];
    std::memcpy(lanes, &v, sizeof v);
    for (int64_t l = 0; l < n; ++l) lanes[l] = load_one(p + l);
    std::memcpy(&v, lanes, sizeof v);
    return v;
}

// Stores of 16 gradients; float32 -> bfloat16 rounds to nearest even, and a NaN stays a quiet NaN (the rounding
// increment would carry some NaN payloads into inf).
FUSEDRL_INLINE void store16(float* p, f32x16 v, int64_t n = kLanes) { std::memcpy(p, &v, sizeof(float) * n); }
FUSEDRL_INLINE void store16(uint16_t* p, f32x16 v, int64_t n = kLanes) {
    const u32x16 u = (u32x16)v;
    const u32x16 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const u32x16 nan = ((u >> 16) & 0x8000u) | 0x7FC0u;
    const u16x16 h = __builtin_convertvector(v != v ? nan : rounded, u16x16);
    std::memcpy(p, &h, sizeof(uint16_t) * n);
}

FUSEDRL_INLINE float hsum(f32x16 v) {
    float s = 0.0f;
    for (int l = 0; l < kLanes; ++l) s += v[l];
    return s;
}

struct RowStats {
    float m, log_s, logp, ent;
};

// 1 / T in double and rounded to float (hi).
struct InvTemp {
    float hi;
    double d;
};

// What the hot loops subtract from x * hi (one fused multiply-add where the clone has FMA): c = m - (m / hi) lo with
// lo = 1 / T - hi, so that x * hi - c = x / T - m - (x - max) lo. x * hi - m alone is off by x lo, the same
// relative amount (|lo / hi| <= 6e-8) for every logit near the row max: a bias of every log-prob that no mean over
// tokens removes (~3e-7 at T = 0.7 and logits of a few units). c is rounded to float; `delta` = c - fl(c) is put
// back into log s once per row. The (x - max) lo left over is a relative 6e-8 of z: nothing for the terms of s.
struct Ref {
    float c;
    double delta;
};

FUSEDRL_INLINE Ref ref_of(float m, InvTemp inv) {
    if (!std::isfinite(m) || !(inv.hi > 0.0f) || !std::isfinite(inv.hi)) return {m == kNegInf ? 0.0f : m, 0.0};
    const double c = m - static_cast<double>(m) / inv.hi * (inv.d - inv.hi);
    const float cf = static_cast<float>(c);
    return {cf, c - cf};
}

// One valid row: the forward kernel's (m, log s, logp, entropy), m = fl(max(x) * hi) the row max of logits / T. Per
// block of the row: load it into `buf` with its max, re-reference the running sums when the max rises, add
// sum exp(z) (and sum exp(z) z) with z = x * hi - c (see Ref), log s corrected by delta at the end. The max skips
// NaN (a NaN-sticky select does not vectorise); a NaN logit still makes s, and with it log s, logp, the entropy and
// every gradient of the row, NaN through exp(NaN - c). A +inf logit makes m = +inf and its own term NaN.
template <typename T>
FUSEDRL_INLINE RowStats forward_row(const T* x, int64_t V, InvTemp inv, int64_t label, bool with_entropy) {
    f32x16 buf[kBlock / kLanes];
    float mx = kNegInf, m = kNegInf, s = 0.0f, w = 0.0f;  // mx: the max of the logits so far
    Ref ref = ref_of(m, inv);
    for (int64_t start = 0; start < V; start += kBlock) {
        const int64_t n = std::min(kBlock, V - start);
        const int64_t full = n / kLanes, tail = n % kLanes;
        f32x16 mv = splat(kNegInf);
        for (int64_t k = 0; k < full; ++k) {
            const f32x16 v = load16(x + start + k * kLanes);
            buf[k] = v;
            mv = v > mv ? v : mv;
        }
        if (tail) {
            const f32x16 v = load_part(x + start + full * kLanes, tail, kNegInf);
            buf[full] = v;
            mv = v > mv ? v : mv;
        }
        float bm = mv[0];
        for (int l = 1; l < kLanes; ++l) bm = mv[l] > bm ? mv[l] : bm;
        if (bm > mx) {
            mx = bm;
            m = bm * inv.hi;
            const Ref next = ref_of(m, inv);
            if (s > 0.0f) {  // re-reference the terms so far to the new max
                const float d = static_cast<float>(static_cast<double>(ref.c) - next.c);  // exact
                const float alpha = std::exp(d);
                w = alpha * (w + d * s);
                s *= alpha;
            }
            ref = next;
        }
        // Every logit so far -inf: c = 0, and exp(x * hi) adds 0 for them (NaN for a NaN among them).
        const float c = ref.c, hi = inv.hi;
        const int64_t nv = full + (tail ? 1 : 0);
        f32x16 acc = splat(0.0f);
        if (with_entropy) {
            f32x16 accw = splat(0.0f);
            for (int64_t k = 0; k < nv; ++k) {
                const f32x16 z = buf[k] * hi - c;
                const f32x16 e = exp_v(z);
                acc += e;
                accw += e > 0.0f ? e * z : splat(0.0f);  // exp(z) = 0 adds 0, not 0 * -inf = NaN
            }
            w += hsum(accw);
        } else {
            for (int64_t k = 0; k < nv; ++k) acc += exp_v(buf[k] * hi - c);
        }
        s += hsum(acc);
    }
    const double log_s_d = std::log(static_cast<double>(s)) - ref.delta;  // log sum exp(x / T - m)
    const float log_s = static_cast<float>(log_s_d);
    float logp = kNaN;  // a label outside [0, V) never reads out of bounds
    if (label >= 0 && label < V) {
        // x_y / T - m - log s in double, rounded once: delta (a fraction of an ulp of log s) is not lost, and log s
        // survives when it is tiny (p_y -> 1).
        logp = static_cast<float>(static_cast<double>(load_one(x + label)) * inv.d - m - log_s_d);
        logp = logp > 0.0f ? 0.0f : logp;  // a last-ulp excess; NaN stays
    }
    float ent = std::log(s) - w / s;  // the same for any reference of z
    ent = ent < 0.0f ? 0.0f : ent;
    return {m, log_s, logp, ent};
}

// dL/dx for one valid row, written to dx (which may be x itself: the label logit is read first, and each group of
// 16 is read before it is written).
template <typename T, typename D>
FUSEDRL_INLINE void backward_row(const T* x, D* dx, int64_t V, InvTemp inv, int64_t label, float m, float log_s,
                                 float ent, float g_lp, float g_h, bool with_entropy) {
    const bool has_label = label >= 0 && label < V;
    const float x_y = has_label ? load_one(x + label) : 0.0f;  // read before dx (maybe x) is written
    const float inv_temp = inv.hi;
    const float c = -g_lp * inv_temp;
    const float cg = -g_h * inv_temp;
    const Ref ref = ref_of(m, inv);  // log p = (x * hi - c) - (log s + delta), as the forward formed its terms
    const float ref_c = ref.c, log_s_c = static_cast<float>(log_s + ref.delta);
    auto grad = [&](f32x16 v) {
        const f32x16 lp = (v * inv_temp - ref_c) - log_s_c;
        const f32x16 p = exp_v(lp);
        if (!with_entropy) return c * p;
        return c * p + (p > 0.0f ? cg * (p * (lp + ent)) : splat(0.0f));  // dH/dx_j = -p_j (log p_j + H)
    };
    const int64_t full = V / kLanes, tail = V % kLanes;
    for (int64_t k = 0; k < full; ++k) store16(dx + k * kLanes, grad(load16(x + k * kLanes)));
    if (tail) store16(dx + full * kLanes, grad(load_part(x + full * kLanes, tail, 0.0f)), tail);
    if (has_label) {
        const float lp_y = static_cast<float>(static_cast<double>(x_y) * inv.d - m) - log_s;
        const float p_y = std::exp(lp_y);
        float g = g_lp * -std::expm1(lp_y);  // 1 - p_y without cancellation when p_y -> 1
        if (with_entropy) g -= g_h * (p_y > 0.0f ? p_y * (lp_y + ent) : 0.0f);
        store16(dx + label, splat(g * inv_temp), 1);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Buffers and their checks
// ---------------------------------------------------------------------------------------------------------
enum class Kind { f32, bf16 };

struct Rows {  // a (rows, V) array whose last axis is contiguous
    char* ptr;
    int64_t rows, V, row_stride;  // row stride in bytes
    Kind kind;
};

struct Vec {  // a contiguous (n,) array
    char* ptr;
    int64_t n;
};

std::string shape_of(const py::buffer_info& b) {
    std::string s = "(";
    for (size_t d = 0; d < b.shape.size(); ++d) s += std::to_string(b.shape[d]) + (d + 1 < b.shape.size() ? ", " : "");
    return s + (b.shape.size() == 1 ? ",)" : ")");
}

// The struct-module type code of a buffer in native byte order ("f" from "f", "=f", "@f", and "<f" on a
// little-endian host: NumPy writes "=f" for an unaligned view), or "" for a foreign byte order ('>f') or a
// compound format: those are refused, never reinterpreted.
std::string native_code(const std::string& format) {
    if (format.size() == 1) return format;
    const bool little = [] {
        const uint16_t one = 1;
        uint8_t first;
        std::memcpy(&first, &one, 1);
        return first == 1;
    }();
    if (format.size() == 2 && (format[0] == '=' || format[0] == '@' || (format[0] == '<' && little))) {
        return format.substr(1);
    }
    return "";
}

Kind kind_of(const std::string& name, const py::buffer_info& b) {
    const std::string code = native_code(b.format);
    if (b.itemsize == 4 && code == "f") return Kind::f32;
    if (b.itemsize == 2 && (code == "h" || code == "H")) return Kind::bf16;
    throw py::type_error(name + " must hold native float32 ('f') or bfloat16 bits (int16 / uint16), got format '" +
                         b.format + "' with itemsize " + std::to_string(b.itemsize));
}

py::buffer_info request(const std::string& name, const py::object& obj, bool writable) {
    if (!PyObject_CheckBuffer(obj.ptr())) {
        throw py::type_error(name + " must be an array (buffer protocol), got " +
                             py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
    }
    try {
        return py::reinterpret_borrow<py::buffer>(obj).request(writable);
    } catch (py::error_already_set& e) {  // a read-only array asked to be written, a buffer without strides
        throw py::value_error(name + ": " + std::string(writable ? "a writable " : "a ") + "strided buffer is needed (" +
                              e.what() + ")");
    }
}

Rows rows_arg(const std::string& name, const py::object& obj, bool writable) {
    py::buffer_info b = request(name, obj, writable);
    if (b.ndim != 2) throw py::value_error(name + " must be 2-D (rows, V), got shape " + shape_of(b));
    const Kind kind = kind_of(name, b);
    if (b.shape[0] > 0 && b.shape[1] > 1 && b.strides[1] != b.itemsize) {
        throw py::value_error(name + " must be contiguous along V (stride " + std::to_string(b.itemsize) +
                              " bytes), got stride " + std::to_string(b.strides[1]));
    }
    if (b.shape[0] > 1 && b.strides[0] < 0) {
        throw py::value_error(name + " must have a non-negative row stride, got " + std::to_string(b.strides[0]));
    }
    if (writable && b.shape[0] > 1 && b.shape[1] > 0 && b.strides[0] < b.shape[1] * b.itemsize) {
        throw py::value_error(name + " rows must not overlap (row stride " + std::to_string(b.strides[0]) +
                              " bytes < V * itemsize)");
    }
    return {static_cast<char*>(b.ptr), b.shape[0], b.shape[1], b.shape[0] > 1 ? b.strides[0] : 0, kind};
}

Vec vec_arg(const std::string& name, const py::object& obj, int64_t n, char kind, bool writable) {
    py::buffer_info b = request(name, obj, writable);
    const std::string code = native_code(b.format);
    const bool ok = kind == 'f' ? (b.itemsize == 4 && code == "f") : (b.itemsize == 8 && (code == "l" || code == "q"));
    if (!ok) {
        throw py::type_error(name + " must hold " + std::string(kind == 'f' ? "float32" : "int64") +
                             ", got format '" + b.format + "' with itemsize " + std::to_string(b.itemsize));
    }
    if (b.ndim != 1 || b.shape[0] != n) {
        throw py::value_error(name + " must have shape (" + std::to_string(n) + ",), got " + shape_of(b));
    }
    if (n > 1 && b.strides[0] != b.itemsize) throw py::value_error(name + " must be contiguous");
    return {static_cast<char*>(b.ptr), n};
}

inline float f32_at(const Vec& v, int64_t i) {
    float x;
    std::memcpy(&x, v.ptr + 4 * i, 4);
    return x;
}
inline void set_f32(const Vec& v, int64_t i, float x) { std::memcpy(v.ptr + 4 * i, &x, 4); }
inline int64_t i64_at(const Vec& v, int64_t i) {
    int64_t y;
    std::memcpy(&y, v.ptr + 8 * i, 8);
    return y;
}

// Rows split into contiguous ranges over up to `threads` threads (the calling one included); small work stays
// on the calling thread.
template <typename F>
void parallel_rows(int64_t rows, int64_t V, int64_t threads, F&& fn) {
    const int64_t by_work = std::max<int64_t>(1, rows * std::max<int64_t>(V, 1) / (1 << 18));
    const int64_t t = std::max<int64_t>(1, std::min({threads, rows, by_work}));
    if (t == 1) {
        fn(0, rows);
        return;
    }
    std::vector<std::thread> pool;
    int64_t started = 1;
    try {
        pool.reserve(t - 1);
        for (; started < t; ++started) pool.emplace_back(fn, rows * started / t, rows * (started + 1) / t);
    } catch (const std::exception&) {  // no thread to be had (a process limit): the calling thread does the rest
    }
    for (int64_t i = started; i < t; ++i) fn(rows * i / t, rows * (i + 1) / t);
    fn(0, rows / t);
    for (auto& th : pool) th.join();
}

template <typename T>
FUSEDRL_CLONES void forward_range(const Rows& x, const Vec& labels, InvTemp inv_temp, int64_t ignore_index,
                                  const Vec& logp, const Vec& m, const Vec& log_s, const Vec* ent, int64_t r0,
                                  int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t y = i64_at(labels, r);
        RowStats st{0.0f, 0.0f, 0.0f, 0.0f};  // an ignored row reads nothing and stores zeros
        if (y != ignore_index) {
            st = forward_row(reinterpret_cast<const T*>(x.ptr + r * x.row_stride), x.V, inv_temp, y, ent != nullptr);
        }
        set_f32(logp, r, st.logp);
        set_f32(m, r, st.m);
        set_f32(log_s, r, st.log_s);
        if (ent) set_f32(*ent, r, st.ent);
    }
}

template <typename T, typename D>
FUSEDRL_CLONES void backward_range(const Rows& x, const Rows& dx, const Vec& labels, InvTemp inv_temp,
                                   int64_t ignore_index, const Vec& m, const Vec& log_s, const Vec* ent,
                                   const Vec& g_lp, const Vec* g_h, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        D* out = reinterpret_cast<D*>(dx.ptr + r * dx.row_stride);
        const int64_t y = i64_at(labels, r);
        if (y == ignore_index) {
            std::memset(out, 0, sizeof(D) * x.V);  // +0.0 in both dtypes
            continue;
        }
        backward_row(reinterpret_cast<const T*>(x.ptr + r * x.row_stride), out, x.V, inv_temp, y, f32_at(m, r),
                     f32_at(log_s, r), ent ? f32_at(*ent, r) : 0.0f, f32_at(g_lp, r), g_h ? f32_at(*g_h, r) : 0.0f,
                     g_h != nullptr);
    }
}

// Asks for transparent huge pages under a large fresh gradient buffer (honoured where THP is in "madvise" or
// "always" mode): its first touch is otherwise a page fault per 4 KiB, which at (1024, 151936) bfloat16 costs more
// than computing the gradient (~190 ms against ~90 ms with 2 MiB pages, one thread). Only the 2 MiB-aligned
// interior of the buffer is advised; it is a hint (contents and ownership unchanged, errors ignored).
void advise_huge_pages(const Rows& dx) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const int64_t itemsize = dx.kind == Kind::bf16 ? 2 : 4;
    constexpr uintptr_t kHuge = uintptr_t(1) << 21;
    if (dx.rows == 0 || (dx.rows > 1 && dx.row_stride != dx.V * itemsize)) return;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(dx.ptr);
    const uintptr_t bytes = static_cast<uintptr_t>(dx.rows) * static_cast<uintptr_t>(dx.V * itemsize);
    if (bytes < 4 * kHuge) return;
    const uintptr_t a = (begin + kHuge - 1) & ~(kHuge - 1), e = (begin + bytes) & ~(kHuge - 1);
    if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
    (void)dx;
#endif
}

InvTemp inv_temp_arg(double inv_temp) {
    if (!(std::isfinite(inv_temp) && inv_temp > 0.0)) {
        throw py::value_error("inv_temp must be a finite number > 0, got " + std::to_string(inv_temp));
    }
    const float hi = static_cast<float>(inv_temp);
    return {hi, inv_temp};
}

int64_t threads_arg(int64_t threads) {
    if (threads < 1 || threads > 4096) {
        throw py::value_error("num_threads must be in [1, 4096], got " + std::to_string(threads));
    }
    return threads;
}

void logprobs_fwd(py::object x_obj, py::object labels_obj, double inv_temp_d, int64_t ignore_index, py::object logp_obj,
                  py::object m_obj, py::object log_s_obj, py::object ent_obj, int64_t threads) {
    const Rows x = rows_arg("logits", x_obj, false);
    const Vec labels = vec_arg("labels", labels_obj, x.rows, 'i', false);
    const Vec logp = vec_arg("logp", logp_obj, x.rows, 'f', true);
    const Vec m = vec_arg("m", m_obj, x.rows, 'f', true);
    const Vec log_s = vec_arg("log_s", log_s_obj, x.rows, 'f', true);
    Vec ent_v{nullptr, 0};
    const bool with_ent = !ent_obj.is_none();
    if (with_ent) ent_v = vec_arg("entropy", ent_obj, x.rows, 'f', true);
    const InvTemp inv_temp = inv_temp_arg(inv_temp_d);
    threads = threads_arg(threads);
    if (x.V == 0 && x.rows > 0) throw py::value_error("logits must have V > 0 columns, got 0");
    const Vec* ent = with_ent ? &ent_v : nullptr;
    py::gil_scoped_release nogil;
    parallel_rows(x.rows, x.V, threads, [&](int64_t r0, int64_t r1) {
        if (x.kind == Kind::f32) {
            forward_range<float>(x, labels, inv_temp, ignore_index, logp, m, log_s, ent, r0, r1);
        } else {
            forward_range<uint16_t>(x, labels, inv_temp, ignore_index, logp, m, log_s, ent, r0, r1);
        }
    });
}

void logprobs_bwd(py::object x_obj, py::object labels_obj, py::object m_obj, py::object log_s_obj, py::object ent_obj,
                  py::object g_lp_obj, py::object g_h_obj, double inv_temp_d, int64_t ignore_index, py::object dx_obj,
                  int64_t threads) {
    const Rows x = rows_arg("logits", x_obj, false);
    const Rows dx = rows_arg("out", dx_obj, true);
    if (dx.rows != x.rows || dx.V != x.V) {
        throw py::value_error("out must have the shape of logits (" + std::to_string(x.rows) + ", " +
                              std::to_string(x.V) + "), got (" + std::to_string(dx.rows) + ", " +
                              std::to_string(dx.V) + ")");
    }
    const Vec labels = vec_arg("labels", labels_obj, x.rows, 'i', false);
    const Vec m = vec_arg("m", m_obj, x.rows, 'f', false);
    const Vec log_s = vec_arg("log_s", log_s_obj, x.rows, 'f', false);
    const Vec g_lp = vec_arg("grad_logp", g_lp_obj, x.rows, 'f', false);
    if (ent_obj.is_none() != g_h_obj.is_none()) {
        throw py::value_error("entropy and grad_entropy must be given together (or both None)");
    }
    Vec ent_v{nullptr, 0}, g_h_v{nullptr, 0};
    const bool with_ent = !ent_obj.is_none();
    if (with_ent) {
        ent_v = vec_arg("entropy", ent_obj, x.rows, 'f', false);
        g_h_v = vec_arg("grad_entropy", g_h_obj, x.rows, 'f', false);
    }
    const InvTemp inv_temp = inv_temp_arg(inv_temp_d);
    threads = threads_arg(threads);
    const Vec* ent = with_ent ? &ent_v : nullptr;
    const Vec* g_h = with_ent ? &g_h_v : nullptr;
    py::gil_scoped_release nogil;
    if (dx.ptr != x.ptr) advise_huge_pages(dx);  // not when overwriting the logits
    parallel_rows(x.rows, x.V, threads, [&](int64_t r0, int64_t r1) {
        const bool in16 = x.kind == Kind::bf16, out16 = dx.kind == Kind::bf16;
        if (!in16 && !out16) backward_range<float, float>(x, dx, labels, inv_temp, ignore_index, m, log_s, ent, g_lp, g_h, r0, r1);
        if (!in16 && out16) backward_range<float, uint16_t>(x, dx, labels, inv_temp, ignore_index, m, log_s, ent, g_lp, g_h, r0, r1);
        if (in16 && !out16) backward_range<uint16_t, float>(x, dx, labels, inv_temp, ignore_index, m, log_s, ent, g_lp, g_h, r0, r1);
        if (in16 && out16) backward_range<uint16_t, uint16_t>(x, dx, labels, inv_temp, ignore_index, m, log_s, ent, g_lp, g_h, r0, r1);
    });
}

}  // namespace

PYBIND11_MODULE(_cpu_rows, mod) {
    mod.doc() = "Native CPU loops for the streaming row softmax of fusedrl.kernels' log-prob ops (float32 / bfloat16).";
    mod.def("logprobs_fwd", &logprobs_fwd, py::arg("logits"), py::arg("labels"), py::arg("inv_temp"),
            py::arg("ignore_index"), py::arg("logp"), py::arg("m"), py::arg("log_s"), py::arg("entropy"),
            py::arg("num_threads") = 1,
            "Per row of logits (rows, V): logp, row max m and log sum-exp of logits * inv_temp (and the entropy "
            "when `entropy` is an array), written into the given float32 (rows,) arrays.");
    mod.def("logprobs_bwd", &logprobs_bwd, py::arg("logits"), py::arg("labels"), py::arg("m"), py::arg("log_s"),
            py::arg("entropy"), py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("inv_temp"),
            py::arg("ignore_index"), py::arg("out"), py::arg("num_threads") = 1,
            "dL/dlogits from the forward's row stats and the upstream gradients, written into `out` (rows, V), "
            "float32 or bfloat16 bits; `out` may be `logits` itself.");
}
