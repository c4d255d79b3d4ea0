// fusedrl.engine._rollout: shared boundary checks for the rollout extension.
//
// Every Python-facing function validates its arguments here before touching memory, and every error
// names the argument, what was expected and what was given. Arrays come in through the buffer protocol
// (NumPy arrays, zero-copy views of CPU torch tensors); nothing in this extension knows about torch.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace py = pybind11;

namespace fusedrl {

// Reads a T at p whatever p's alignment: NumPy arrays may be unaligned (np.frombuffer with an offset), and
// dereferencing a misaligned int64_t* is undefined. Compiles to a plain load on x86 and ARM.
template <typename T>
inline T load(const char* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}

// "float64", "int32", ... (needs the GIL).
std::string dtype_name(const py::array& a);
// "(3, 4)".
std::string shape_str(const py::array& a);

// Any array-like (NumPy array, CPU tensor, buffer, list) as a NumPy array, without copying when it
// already is one. Anything else raises TypeError naming `name`.
py::array as_array(const std::string& name, py::handle obj);
// Raises ValueError unless `a` is 1-D.
void require_1d(const std::string& name, const py::array& a);
// True for signed and unsigned integer dtypes (bool excluded).
bool is_integer(const py::array& a);

// A Python integer argument (anything with __index__, bool excluded) in [lo, hi]. Taking py::handle rather
// than int64_t lets an out-of-range value (2**63, 2**70) get an error naming the argument instead of
// pybind11's "incompatible function arguments".
int64_t int_arg(const std::string& name, py::handle obj, int64_t lo, int64_t hi);

// A 1-D integer array read as int64: zero-copy for contiguous int64 input, a converted copy otherwise.
// Keeps the source array alive for as long as `data` is used. A zero-copy view reads the caller's memory,
// which another thread may change at any time: read each entry once, validate that value and use it.
// An empty array is accepted whatever its numeric dtype (np.asarray([]) is float64).
struct Int64Array {
    py::array keep;
    std::vector<int64_t> owned;
    const int64_t* data = nullptr;
    int64_t size = 0;
    int64_t operator[](int64_t i) const { return data[i]; }
};
Int64Array as_int64_1d(const std::string& name, py::handle obj);

// Strided read access to a 1-D int32 / int64 array (token ids) without copying it.
struct TokenView {
    const char* data = nullptr;
    int64_t size = 0;
    int64_t stride = 0;  // bytes
    bool is64 = true;
    int64_t operator[](int64_t i) const {
        const char* p = data + i * stride;
        return is64 ? load<int64_t>(p) : load<int32_t>(p);
    }
};
TokenView as_token_view(const std::string& name, const py::array& a);

void bind_buffer(py::module_& m);
void bind_plan(py::module_& m);
void bind_pack(py::module_& m);

}  // namespace fusedrl
