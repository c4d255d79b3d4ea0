// fusedrl.engine._rollout: packed variable-length rollout buffer, token-budget micro-batch planning and
// padding-free packing, over NumPy arrays. The module definition and the shared boundary checks live
// here; the buffer, the planner and the packer each have their own file.
#include "rollout.h"

#include <cstring>
#include <limits>

namespace fusedrl {

std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t d = 0; d < a.ndim(); ++d) {
        s += std::to_string(a.shape(d));
        if (a.ndim() == 1 || d + 1 < a.ndim()) s += a.ndim() == 1 ? "," : ", ";
    }
    return s + ")";
}

py::array as_array(const std::string& name, py::handle obj) {
    if (obj.is_none()) throw py::type_error(name + " must be an array, got None");
    py::array a = py::isinstance<py::array>(obj) ? py::reinterpret_borrow<py::array>(obj) : py::array::ensure(obj);
    auto given = [&] { return py::str(py::type::of(obj).attr("__name__")).cast<std::string>(); };
    if (!a) throw py::type_error(name + " must be a NumPy array, a CPU tensor or a sequence of numbers, got " + given());
    // A list of mixed objects becomes an object array.
    if (a.dtype().kind() == 'O') {
        throw py::type_error(name + " must be a numeric array, got dtype object (from " + given() + ")");
    }
    // memcpy of Python object pointers (a structured dtype with an object field) would skip refcounting.
    if (a.dtype().attr("hasobject").cast<bool>()) {
        throw py::type_error(name + " must be a numeric array, got dtype " + dtype_name(a) + " (holds Python objects)");
    }
    if (!a.dtype().attr("isnative").cast<bool>()) {
        throw py::type_error(name + " must be in native byte order, got dtype " + dtype_name(a));
    }
    return a;
}

void require_1d(const std::string& name, const py::array& a) {
    if (a.ndim() != 1) {
        throw py::value_error(name + " must be 1-D, got shape " + shape_str(a));
    }
}

bool is_integer(const py::array& a) {
    const char k = a.dtype().kind();
    return k == 'i' || k == 'u';
}

int64_t int_arg(const std::string& name, py::handle obj, int64_t lo, int64_t hi) {
    auto given = [&] { return py::repr(obj).cast<std::string>() + " (" + py::str(py::type::of(obj).attr("__name__")).cast<std::string>() + ")"; };
    if (PyBool_Check(obj.ptr()) || !PyIndex_Check(obj.ptr())) throw py::type_error(name + " must be an integer, got " + given());
    // A NumPy array has __index__ too, and raises from it unless it is a single integer.
    py::object v = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
    if (!v) {
        PyErr_Clear();
        throw py::type_error(name + " must be an integer, got " + given());
    }
    int overflow = 0;
    const long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
    if (overflow == 0 && x == -1 && PyErr_Occurred()) throw py::error_already_set();
    const bool below = overflow < 0 || (overflow == 0 && x < lo);
    const bool above = overflow > 0 || (overflow == 0 && x > hi);
    if (below || above) {
        const std::string want = below ? ">= " + std::to_string(lo) : "<= " + std::to_string(hi);
        throw py::value_error(name + " must be " + want + ", got " + py::repr(v).cast<std::string>());
    }
    return static_cast<int64_t>(x);
}

namespace {

template <typename T>
void copy_ints(const std::string& name, const py::array& a, std::vector<int64_t>& out) {
    const int64_t n = a.shape(0);
    const int64_t stride = a.strides(0);
    const char* base = static_cast<const char*>(a.data());
    out.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
        const T v = load<T>(base + i * stride);
        if constexpr (std::is_same_v<T, uint64_t>) {
            if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
                throw py::value_error(name + "[" + std::to_string(i) + "] = " + std::to_string(v) +
                                      " does not fit in int64");
            }
        }
        out[static_cast<size_t>(i)] = static_cast<int64_t>(v);
    }
}

}  // namespace

Int64Array as_int64_1d(const std::string& name, py::handle obj) {
    Int64Array r;
    r.keep = as_array(name, obj);
    const py::array& a = r.keep;
    if (a.ndim() == 1 && a.shape(0) == 0 && std::strchr("iufb", a.dtype().kind()) != nullptr) return r;
    if (!is_integer(a)) {
        throw py::type_error(name + " must be an integer array (int32 or int64), got dtype " + dtype_name(a));
    }
    require_1d(name, a);
    r.size = a.shape(0);
    const char kind = a.dtype().kind();
    const auto size = a.itemsize();
    const bool aligned = reinterpret_cast<uintptr_t>(a.data()) % alignof(int64_t) == 0;
    if (kind == 'i' && size == 8 && aligned && (r.size <= 1 || a.strides(0) == 8)) {
        r.data = static_cast<const int64_t*>(a.data());
        return r;
    }
    if (kind == 'i') {
        if (size == 1) copy_ints<int8_t>(name, a, r.owned);
        else if (size == 2) copy_ints<int16_t>(name, a, r.owned);
        else if (size == 4) copy_ints<int32_t>(name, a, r.owned);
        else copy_ints<int64_t>(name, a, r.owned);
    } else {
        if (size == 1) copy_ints<uint8_t>(name, a, r.owned);
        else if (size == 2) copy_ints<uint16_t>(name, a, r.owned);
        else if (size == 4) copy_ints<uint32_t>(name, a, r.owned);
        else copy_ints<uint64_t>(name, a, r.owned);
    }
    r.data = r.owned.data();
    return r;
}

TokenView as_token_view(const std::string& name, const py::array& a) {
    const char kind = a.dtype().kind();
    if (kind != 'i' || (a.itemsize() != 4 && a.itemsize() != 8)) {
        throw py::type_error(name + " must be int32 or int64, got dtype " + dtype_name(a));
    }
    require_1d(name, a);
    TokenView v;
    v.data = static_cast<const char*>(a.data());
    v.size = a.shape(0);
    v.stride = a.strides(0);
    v.is64 = a.itemsize() == 8;
    return v;
}

}  // namespace fusedrl

PYBIND11_MODULE(_rollout, m) {
    m.doc() =
        "fusedrl packed rollouts (C++): a variable-length rollout buffer, token-budget micro-batch planning "
        "and padding-free packing over NumPy arrays. Use it through fusedrl.engine.packing.";
    m.attr("__version__") = "0.1.0";
    fusedrl::bind_buffer(m);
    fusedrl::bind_plan(m);
    fusedrl::bind_pack(m);
}
