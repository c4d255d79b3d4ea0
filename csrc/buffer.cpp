// RolloutBuffer: variable-length sequences stored back to back, with int64 offsets.
//
// Columns: token ids (int32 or int64), a response mask (one byte per token, 0/1, exported as bool) and
// any number of named float32 per-token fields, exported as zero-copy writable NumPy views; the offsets
// are exported as a copy. Each column lives in a reference-counted block and every view holds a reference
// to the block it was taken from, so a view never dangles: after the buffer reallocates (an append past
// capacity) an old view keeps the old memory alive and simply stops aliasing the buffer. That is why the
// documented contract is "valid until the next append" rather than "undefined after the next append".
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <pybind11/stl.h>
#include <unordered_map>

#include "rollout.h"

namespace fusedrl {
namespace {

constexpr int64_t kInitialTokens = 4096;
constexpr int64_t kInitialSequences = 256;

struct Block {
    char* data;
    explicit Block(size_t bytes) : data(static_cast<char*>(std::malloc(bytes > 0 ? bytes : 1))) {
        if (data == nullptr) throw std::bad_alloc();
    }
    ~Block() { std::free(data); }
    Block(const Block&) = delete;
    Block& operator=(const Block&) = delete;
};

// A growable typed column. `used` (how many elements are live) is tracked by the buffer, which passes it
// in when growth has to copy.
class Column {
   public:
    Column(size_t itemsize, int64_t capacity)
        : itemsize_(itemsize), cap_(capacity), block_(std::make_shared<Block>(itemsize * capacity)) {}

    char* data() const { return block_->data; }
    template <typename T>
    T* as() const { return reinterpret_cast<T*>(block_->data); }

    // Geometric growth keeps appends amortised O(1); the old block is released once no view holds it.
    void reserve(int64_t needed, int64_t used) {
        if (needed <= cap_) return;
        int64_t cap = std::max(needed, cap_ * 2);
        auto grown = std::make_shared<Block>(itemsize_ * static_cast<size_t>(cap));
        std::memcpy(grown->data, block_->data, itemsize_ * static_cast<size_t>(used));
        block_ = std::move(grown);
        cap_ = cap;
    }

    // [begin, end) of this column's memory.
    std::pair<uintptr_t, uintptr_t> extent() const {
        const auto begin = reinterpret_cast<uintptr_t>(block_->data);
        return {begin, begin + itemsize_ * static_cast<size_t>(cap_)};
    }

    // A writable view of the first n elements that keeps this block alive.
    py::array view(const py::dtype& dt, int64_t n) const {
        auto* ref = new std::shared_ptr<Block>(block_);
        py::capsule owner(ref, [](void* p) { delete static_cast<std::shared_ptr<Block>*>(p); });
        return py::array(dt, std::vector<py::ssize_t>{n}, std::vector<py::ssize_t>{static_cast<py::ssize_t>(itemsize_)},
                         block_->data, owner);
    }

   private:
    size_t itemsize_;
    int64_t cap_;
    std::shared_ptr<Block> block_;
};

// Calls f(T{}) with T the C type of an integer or bool array's elements.
template <typename F>
void visit_int(const py::array& a, F&& f) {
    const char k = a.dtype().kind();
    const auto s = a.itemsize();
    if (k == 'b') return f(uint8_t{});
    if (k == 'i') {
        if (s == 1) return f(int8_t{});
        if (s == 2) return f(int16_t{});
        if (s == 4) return f(int32_t{});
        return f(int64_t{});
    }
    if (s == 1) return f(uint8_t{});
    if (s == 2) return f(uint16_t{});
    if (s == 4) return f(uint32_t{});
    return f(uint64_t{});
}

template <typename T>
T at(const py::array& a, int64_t i) {
    return load<T>(static_cast<const char*>(a.data()) + i * a.strides(0));
}

// One validated sequence, ready to be written. Validation reads everything first so that a bad argument
// leaves the buffer untouched (append_many is all-or-nothing too).
struct Pending {
    py::array tokens;
    py::array mask;
    std::vector<py::array> fields;  // one per buffer field, meaningful where `given`
    // Not "fields[f] is null": a default-constructed py::array is a real 0-element float64 array.
    std::vector<bool> given;        // false: the field was omitted and is zero-filled
    int64_t length = 0;
};

}  // namespace

class RolloutBuffer {
   public:
    RolloutBuffer(py::handle fields, const py::object& token_dtype)
        : names_(parse_fields(fields)),
          token_dtype_(parse_token_dtype(token_dtype)),
          tok64_(token_dtype_.itemsize() == 8),
          tokens_(token_dtype_.itemsize(), kInitialTokens),
          mask_(1, kInitialTokens) {
        offsets_.reserve(kInitialSequences + 1);
        offsets_.push_back(0);
        for (size_t i = 0; i < names_.size(); ++i) {
            const std::string& f = names_[i];
            if (f.empty()) throw py::value_error("fields must be non-empty names, got '' at position " + std::to_string(i));
            if (f == "tokens" || f == "response_mask") {
                throw py::value_error("fields must not be named '" + f + "' (that name is reserved for the buffer's own column)");
            }
            if (!index_.emplace(f, i).second) throw py::value_error("fields must be unique, got '" + f + "' twice");
            fields_.emplace_back(sizeof(float), kInitialTokens);
        }
    }

    int64_t append(py::handle tokens, py::handle mask, py::handle fields) {
        std::vector<py::object> given = field_args(fields, -1);
        Pending p = check("tokens", "response_mask", "", tokens, mask, given);
        reserve(1, p.length);
        write(p);
        return n_ - 1;
    }

    void append_many(py::handle tokens, py::handle masks, py::handle fields) {
        const py::list tok_seq = as_list("tokens", tokens);
        const py::list mask_seq = as_list("response_masks", masks);
        const int64_t count = static_cast<int64_t>(tok_seq.size());
        if (static_cast<int64_t>(mask_seq.size()) != count) {
            throw py::value_error("response_masks must hold one mask per sequence: " + std::to_string(count) +
                                  " token arrays, got " + std::to_string(mask_seq.size()) + " masks");
        }
        std::vector<py::object> lists = field_args(fields, count);
        std::vector<Pending> pending;
        pending.reserve(static_cast<size_t>(count));
        int64_t total = 0;
        for (int64_t s = 0; s < count; ++s) {
            const std::string idx = "[" + std::to_string(s) + "]";
            std::vector<py::object> given(names_.size(), py::none());
            for (size_t f = 0; f < names_.size(); ++f) {
                if (!lists[f].is_none()) given[f] = py::reinterpret_borrow<py::list>(lists[f])[static_cast<size_t>(s)];
            }
            pending.push_back(check("tokens" + idx, "response_masks" + idx, idx, tok_seq[static_cast<size_t>(s)],
                                    mask_seq[static_cast<size_t>(s)], given));
            total += pending.back().length;
        }
        reserve(count, total);
        for (const Pending& p : pending) write(p);
    }

    int64_t size() const { return n_; }
    int64_t num_tokens() const { return ntok_; }

    py::dict get(py::handle index) const {
        auto out_of_range = [&](const std::string& i) {
            return py::index_error("sequence index " + i + " is out of range for a buffer of " + std::to_string(n_) +
                                   " sequences");
        };
        if (PyBool_Check(index.ptr()) || !PyIndex_Check(index.ptr())) {
            throw py::type_error("i must be an integer, got " + py::repr(index).cast<std::string>() + " (" +
                                 type_name(index) + ")");
        }
        py::object v = py::reinterpret_steal<py::object>(PyNumber_Index(index.ptr()));
        if (!v) {  // e.g. a NumPy array of several values
            PyErr_Clear();
            throw py::type_error("i must be an integer, got " + py::repr(index).cast<std::string>());
        }
        int overflow = 0;
        int64_t i = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
        if (overflow == 0 && i == -1 && PyErr_Occurred()) throw py::error_already_set();
        if (overflow != 0 || i < -n_ || i >= n_) throw out_of_range(py::repr(v).cast<std::string>());
        if (i < 0) i += n_;
        const int64_t start = offsets_[i];
        const int64_t len = offsets_[i + 1] - start;
        py::dict out;
        py::array tok(token_dtype_, std::vector<py::ssize_t>{len});
        std::memcpy(tok.mutable_data(), tokens_.data() + start * token_dtype_.itemsize(), len * token_dtype_.itemsize());
        out["tokens"] = tok;
        py::array_t<bool> mask(len);
        std::memcpy(mask.mutable_data(), mask_.data() + start, static_cast<size_t>(len));
        out["response_mask"] = mask;
        for (size_t f = 0; f < names_.size(); ++f) {
            py::array_t<float> v(len);
            std::memcpy(v.mutable_data(), fields_[f].as<float>() + start, len * sizeof(float));
            out[py::str(names_[f])] = v;
        }
        return out;
    }

    py::array lengths() const {
        py::array_t<int64_t> out(n_);
        int64_t* o = out.mutable_data();
        for (int64_t i = 0; i < n_; ++i) o[i] = offsets_[i + 1] - offsets_[i];
        return out;
    }

    // A copy (8 bytes a sequence): a writable view would let a stray write send later reads outside the
    // buffer, and a read-only one makes torch.from_numpy warn.
    py::array offsets() const {
        py::array_t<int64_t> out(n_ + 1);
        std::memcpy(out.mutable_data(), offsets_.data(), static_cast<size_t>(n_ + 1) * sizeof(int64_t));
        return out;
    }
    py::array tokens() const { return tokens_.view(token_dtype_, ntok_); }
    py::array response_mask() const { return mask_.view(py::dtype::of<bool>(), ntok_); }

    py::array field(py::handle name) const {
        if (!py::isinstance<py::str>(name)) throw py::type_error("name must be a str, got " + type_name(name));
        return fields_[field_index(name.cast<std::string>())].view(py::dtype::of<float>(), ntok_);
    }

    // Keeps the allocations: the next rollout of similar size appends without reallocating.
    void clear() {
        n_ = 0;
        ntok_ = 0;
        offsets_.resize(1);
    }

    const std::vector<std::string>& fields() const { return names_; }
    py::dtype token_dtype() const { return token_dtype_; }

   private:
    static std::vector<std::string> parse_fields(py::handle obj) {
        if (py::isinstance<py::str>(obj) || py::isinstance<py::bytes>(obj)) {
            throw py::type_error("fields must be a sequence of names, got the single string " +
                                 py::repr(obj).cast<std::string>());
        }
        py::list items = as_list("fields", obj);
        std::vector<std::string> names;
        names.reserve(items.size());
        for (size_t i = 0; i < items.size(); ++i) {
            py::handle f = items[i];
            if (!py::isinstance<py::str>(f)) {
                throw py::type_error("fields[" + std::to_string(i) + "] must be a str, got " + type_name(f));
            }
            // Encoding fails for lone surrogates ('\ud800'): a UnicodeEncodeError, but say which field.
            Py_ssize_t size = 0;
            const char* utf8 = PyUnicode_AsUTF8AndSize(f.ptr(), &size);
            if (utf8 == nullptr) {
                PyErr_Clear();
                throw py::value_error("fields[" + std::to_string(i) + "] must be encodable as UTF-8, got " +
                                      py::repr(f).cast<std::string>());
            }
            names.emplace_back(utf8, static_cast<size_t>(size));
        }
        return names;
    }

    // Any iterable but a string, as a list (a generator is consumed once, here).
    static py::list as_list(const std::string& name, py::handle obj) {
        if (py::isinstance<py::str>(obj) || py::isinstance<py::bytes>(obj) || !py::hasattr(obj, "__iter__")) {
            throw py::type_error(name + " must be a sequence of 1-D arrays, got " + type_name(obj));
        }
        try {
            return py::list(py::reinterpret_borrow<py::object>(obj));
        } catch (py::error_already_set& e) {  // e.g. iterating over a 0-d array
            throw py::type_error(name + " must be a sequence of 1-D arrays, got " + type_name(obj) + " (" + e.what() + ")");
        }
    }

    static py::dtype parse_token_dtype(const py::object& obj) {
        py::dtype dt;
        try {
            dt = py::dtype::from_args(obj);
        } catch (py::error_already_set&) {
            throw py::type_error("token_dtype must be int32 or int64, got " + py::repr(obj).cast<std::string>());
        }
        if (dt.kind() != 'i' || (dt.itemsize() != 4 && dt.itemsize() != 8)) {
            throw py::value_error("token_dtype must be int32 or int64, got " + py::str(dt).cast<std::string>());
        }
        return dt;
    }

    static std::string type_name(py::handle obj) {
        return py::str(py::type::of(obj).attr("__name__")).cast<std::string>();
    }

    std::string known_fields() const {
        std::string s;
        for (const auto& f : names_) s += (s.empty() ? "" : ", ") + f;
        return "(" + s + ")";
    }

    size_t field_index(const std::string& name) const {
        const auto it = index_.find(name);
        if (it != index_.end()) return it->second;
        throw py::value_error("unknown field '" + name + "': this buffer has fields " + known_fields());
    }

    // Keyword fields in buffer order, None where not given; with count >= 0 each must be a sequence of
    // that many arrays (append_many).
    std::vector<py::object> field_args(py::handle fields_obj, int64_t count) const {
        if (!py::isinstance<py::dict>(fields_obj)) {
            throw py::type_error("fields must be a dict of field name -> array, got " + type_name(fields_obj));
        }
        const auto fields = py::reinterpret_borrow<py::dict>(fields_obj);
        std::vector<py::object> out(names_.size(), py::none());
        for (auto item : fields) {
            if (!py::isinstance<py::str>(item.first)) {
                throw py::type_error("field names must be strings, got " + type_name(item.first));
            }
            const std::string name = item.first.cast<std::string>();
            const size_t f = field_index(name);
            py::object v = py::reinterpret_borrow<py::object>(item.second);
            if (count >= 0 && !v.is_none()) {
                py::list items = as_list(name, v);
                if (static_cast<int64_t>(items.size()) != count) {
                    throw py::value_error(name + " must be a sequence of " + std::to_string(count) +
                                          " arrays (one per sequence), got " + std::to_string(items.size()) + " items");
                }
                v = std::move(items);
            }
            out[f] = v;
        }
        return out;
    }

    Pending check(const std::string& tok_name, const std::string& mask_name, const std::string& suffix,
                  py::handle tokens, py::handle mask, const std::vector<py::object>& given) const {
        Pending p;
        const auto ext = extents();
        p.tokens = own(as_array(tok_name, tokens), ext);
        if (!is_integer(p.tokens)) {
            throw py::type_error(tok_name + " must be an integer array of token ids, got dtype " + dtype_name(p.tokens));
        }
        require_1d(tok_name, p.tokens);
        p.length = p.tokens.shape(0);
        if (p.length < 1) throw py::value_error(tok_name + " must hold at least one token, got length 0");
        const int64_t hi = tok64_ ? std::numeric_limits<int64_t>::max() : std::numeric_limits<int32_t>::max();
        visit_int(p.tokens, [&](auto zero) {
            using T = decltype(zero);
            for (int64_t i = 0; i < p.length; ++i) {
                const T v = at<T>(p.tokens, i);
                const bool neg = std::is_signed_v<T> && v < 0;
                if (neg || static_cast<uint64_t>(v) > static_cast<uint64_t>(hi)) {
                    throw py::value_error(tok_name + "[" + std::to_string(i) + "] = " + std::to_string(v) +
                                          " is not a token id in [0, " + std::to_string(hi) + "] (buffer token_dtype " +
                                          py::str(token_dtype_).cast<std::string>() + ")");
                }
            }
        });

        p.mask = own(as_array(mask_name, mask), ext);
        const char mk = p.mask.dtype().kind();
        if (mk != 'b' && mk != 'i' && mk != 'u') {
            throw py::type_error(mask_name + " must be a bool or integer array of 0/1, got dtype " + dtype_name(p.mask));
        }
        require_1d(mask_name, p.mask);
        if (p.mask.shape(0) != p.length) {
            throw py::value_error(mask_name + " must have the length of " + tok_name + " (" + std::to_string(p.length) +
                                  "), got " + std::to_string(p.mask.shape(0)));
        }
        visit_int(p.mask, [&](auto zero) {
            using T = decltype(zero);
            for (int64_t i = 0; i < p.length; ++i) {
                const T v = at<T>(p.mask, i);
                if (v != 0 && v != 1) {
                    throw py::value_error(mask_name + " must hold only 0 and 1, got " + std::to_string(v) +
                                          " at position " + std::to_string(i));
                }
            }
        });

        p.fields.resize(names_.size());
        p.given.assign(names_.size(), false);
        for (size_t f = 0; f < names_.size(); ++f) {
            if (given[f].is_none()) continue;
            const std::string name = names_[f] + suffix;
            py::array a = own(as_array(name, given[f]), ext);
            const char k = a.dtype().kind();
            if (k != 'f' || (a.itemsize() != 4 && a.itemsize() != 8)) {
                throw py::type_error(name + " must be float32 (float64 is converted), got dtype " + dtype_name(a));
            }
            require_1d(name, a);
            if (a.shape(0) != p.length) {
                throw py::value_error(name + " must have the length of " + tok_name + " (" + std::to_string(p.length) +
                                      "), got " + std::to_string(a.shape(0)));
            }
            for (int64_t i = 0; i < p.length; ++i) {
                const double v = a.itemsize() == 4 ? at<float>(a, i) : at<double>(a, i);
                // Checked as stored: a float64 1e39 is finite but would become inf in float32.
                if (!(std::fabs(v) <= std::numeric_limits<float>::max())) {
                    throw py::value_error(name + " must be finite in float32, got " + py::repr(py::float_(v)).cast<std::string>() +
                                          " at position " + std::to_string(i));
                }
            }
            p.fields[f] = std::move(a);
            p.given[f] = true;
        }
        return p;
    }

    // The columns' memory, sorted (blocks never overlap), to find views of the buffer itself.
    std::vector<std::pair<uintptr_t, uintptr_t>> extents() const {
        std::vector<std::pair<uintptr_t, uintptr_t>> out{tokens_.extent(), mask_.extent()};
        for (const Column& c : fields_) out.push_back(c.extent());
        std::sort(out.begin(), out.end());
        return out;
    }

    // A view of this buffer's own memory (e.g. tokens() taken before clear()) is copied first: write()
    // could otherwise overwrite parts of it before reading them.
    static py::array own(py::array a, const std::vector<std::pair<uintptr_t, uintptr_t>>& extents) {
        if (a.ndim() != 1 || a.shape(0) == 0) return a;  // rejected (or nothing to read) later
        const auto base = reinterpret_cast<uintptr_t>(a.data());
        const int64_t span = (a.shape(0) - 1) * a.strides(0);
        const uintptr_t lo = span < 0 ? base - static_cast<uintptr_t>(-span) : base;
        const uintptr_t hi = (span < 0 ? base : base + static_cast<uintptr_t>(span)) + static_cast<uintptr_t>(a.itemsize());
        // The last block starting below hi is the only one that can overlap [lo, hi).
        auto it = std::lower_bound(extents.begin(), extents.end(), std::make_pair(hi, uintptr_t{0}));
        const bool alias = it != extents.begin() && std::prev(it)->second > lo;
        return alias ? py::array(a.attr("copy")()) : a;
    }

    void reserve(int64_t sequences, int64_t tokens) {
        const int64_t need = ntok_ + tokens;
        tokens_.reserve(need, ntok_);
        mask_.reserve(need, ntok_);
        for (auto& c : fields_) c.reserve(need, ntok_);
        const size_t need_offsets = static_cast<size_t>(n_ + 1 + sequences);
        if (need_offsets > offsets_.capacity()) offsets_.reserve(std::max(need_offsets, 2 * offsets_.capacity()));
    }

    // Only after check() and reserve(): nothing here can fail.
    void write(const Pending& p) {
        const int64_t L = p.length;
        const int64_t start = ntok_;
        visit_int(p.tokens, [&](auto zero) {
            using T = decltype(zero);
            if (tok64_) {
                int64_t* dst = tokens_.as<int64_t>() + start;
                for (int64_t i = 0; i < L; ++i) dst[i] = static_cast<int64_t>(at<T>(p.tokens, i));
            } else {
                int32_t* dst = tokens_.as<int32_t>() + start;
                for (int64_t i = 0; i < L; ++i) dst[i] = static_cast<int32_t>(at<T>(p.tokens, i));
            }
        });
        visit_int(p.mask, [&](auto zero) {
            using T = decltype(zero);
            uint8_t* dst = mask_.as<uint8_t>() + start;
            for (int64_t i = 0; i < L; ++i) dst[i] = static_cast<uint8_t>(at<T>(p.mask, i));
        });
        for (size_t f = 0; f < names_.size(); ++f) {
            float* dst = fields_[f].as<float>() + start;
            const py::array& a = p.fields[f];
            if (!p.given[f]) {
                std::memset(dst, 0, static_cast<size_t>(L) * sizeof(float));
            } else if (a.itemsize() == 4) {
                for (int64_t i = 0; i < L; ++i) dst[i] = at<float>(a, i);
            } else {
                for (int64_t i = 0; i < L; ++i) dst[i] = static_cast<float>(at<double>(a, i));
            }
        }
        ntok_ += L;
        ++n_;
        offsets_.push_back(ntok_);
    }

    std::vector<std::string> names_;
    py::dtype token_dtype_;
    bool tok64_;
    Column tokens_;
    Column mask_;
    std::vector<int64_t> offsets_;  // (n + 1,)
    std::vector<Column> fields_;
    std::unordered_map<std::string, size_t> index_;  // field name -> position: thousands of fields stay O(1)
    int64_t n_ = 0;
    int64_t ntok_ = 0;
};

void bind_buffer(py::module_& m) {
    // The GIL stays held in every method: they mutate shared state, and their loops are single memcpy-like
    // passes over one sequence.
    py::class_<RolloutBuffer>(m, "RolloutBuffer",
                              "Variable-length sequences stored contiguously with int64 offsets (see "
                              "fusedrl.engine.packing.RolloutBuffer for the documented interface).")
        .def(py::init<py::handle, const py::object&>(), py::arg("fields"), py::arg("token_dtype"))
        .def("append", &RolloutBuffer::append, py::arg("tokens"), py::arg("response_mask"), py::arg("fields"))
        .def("append_many", &RolloutBuffer::append_many, py::arg("tokens"), py::arg("response_masks"),
             py::arg("fields"))
        .def("__len__", &RolloutBuffer::size)
        .def_property_readonly("num_tokens", &RolloutBuffer::num_tokens)
        .def_property_readonly("fields", [](const RolloutBuffer& b) { return py::tuple(py::cast(b.fields())); })
        .def_property_readonly("token_dtype", &RolloutBuffer::token_dtype)
        .def("get", &RolloutBuffer::get, py::arg("i"))
        .def("lengths", &RolloutBuffer::lengths)
        .def("offsets", &RolloutBuffer::offsets)
        .def("tokens", &RolloutBuffer::tokens)
        .def("response_mask", &RolloutBuffer::response_mask)
        .def("field", &RolloutBuffer::field, py::arg("name"))
        .def("clear", &RolloutBuffer::clear);
}

}  // namespace fusedrl
