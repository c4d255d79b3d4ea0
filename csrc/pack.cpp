// Padding-free packing of one micro-batch and the inverse scatter.
//
// pack: the sequences `indices` of a buffer laid out by `offsets` become one packed row of N tokens:
// cu_seqlens (int32, flash-attn's varlen convention), position ids restarting at 0 per sequence, the
// gather index from the buffer into the packed row and, for causal LM training, the buffer position of
// each token's next token. That next-token index is -1 at every sequence's last token, so a label never
// crosses into the following sequence (a plain roll over the packed row would hand one sequence's last
// token the next sequence's first token as its label).
#include <algorithm>
#include <cstring>
#include <limits>

#include "rollout.h"

namespace fusedrl {
namespace {

py::tuple pack(py::handle offsets_obj, py::handle indices_obj, py::handle tokens_obj, py::handle ignore_obj) {
    const int64_t ignore_index = int_arg("ignore_index", ignore_obj, std::numeric_limits<int64_t>::min(),
                                         std::numeric_limits<int64_t>::max());
    // Zero-copy for the buffer's own int64 offsets: pack runs once per micro-batch and must stay O(B + N),
    // so only the referenced sequences are validated.
    Int64Array off = as_int64_1d("offsets", offsets_obj);
    if (off.size < 1) throw py::value_error("offsets must hold n + 1 >= 1 entries starting with 0, got an empty array");
    if (off[0] != 0) throw py::value_error("offsets[0] must be 0, got " + std::to_string(off[0]));
    const int64_t nseq = off.size - 1;
    Int64Array idx = as_int64_1d("indices", indices_obj);
    const int64_t B = idx.size;

    const bool has_tokens = !tokens_obj.is_none();
    py::array tok_arr;
    TokenView tok;
    if (has_tokens) {
        tok_arr = as_array("tokens", tokens_obj);
        tok = as_token_view("tokens", tok_arr);
        const int64_t last = off[nseq];
        if (tok.size != last) {
            throw py::value_error("tokens must hold offsets[-1] = " + std::to_string(last) +
                                  " token ids (the whole buffer), got " + std::to_string(tok.size));
        }
    }

    // One read of every referenced offset and index, checked and kept: the loop below works from these
    // copies, never from the caller's arrays, which another thread may rewrite once the GIL is released.
    // The total is checked before it is added, so it cannot overflow, and before anything is allocated.
    std::vector<int64_t> start(static_cast<size_t>(B)), len(static_cast<size_t>(B));
    int64_t total = 0;
    int64_t max_seqlen = 0;
    for (int64_t b = 0; b < B; ++b) {
        const int64_t i = idx[b];
        if (i < 0 || i >= nseq) {
            throw py::value_error("indices[" + std::to_string(b) + "] = " + std::to_string(i) + " is out of range [0, " +
                                  std::to_string(nseq) + ") (offsets has " + std::to_string(off.size) + " entries)");
        }
        const int64_t s = off[i];
        const int64_t e = off[i + 1];
        if (s < 0 || e <= s) {
            throw py::value_error("offsets must increase from 0 (every sequence has >= 1 token), got offsets[" +
                                  std::to_string(i) + "] = " + std::to_string(s) + ", offsets[" + std::to_string(i + 1) +
                                  "] = " + std::to_string(e) + " for indices[" + std::to_string(b) + "]");
        }
        if (has_tokens && e > tok.size) {
            throw py::value_error("offsets[" + std::to_string(i + 1) + "] = " + std::to_string(e) +
                                  " is past the end of tokens (" + std::to_string(tok.size) + " entries)");
        }
        const int64_t L = e - s;  // no overflow: 0 <= s < e
        if (L > std::numeric_limits<int32_t>::max() - total) {
            throw py::value_error("indices select more than 2^31 - 1 tokens (cu_seqlens is int32): indices[" +
                                  std::to_string(b) + "] = " + std::to_string(i) + " adds " + std::to_string(L) +
                                  " tokens to " + std::to_string(total));
        }
        total += L;
        max_seqlen = std::max(max_seqlen, L);
        start[static_cast<size_t>(b)] = s;
        len[static_cast<size_t>(b)] = L;
    }

    py::array_t<int32_t> cu(B + 1);
    py::array_t<int64_t> pos(total), index(total), target(total);
    py::array_t<int64_t> labels(has_tokens ? total : 0);
    int32_t* __restrict cu_p = cu.mutable_data();
    int64_t* __restrict pos_p = pos.mutable_data();
    int64_t* __restrict index_p = index.mutable_data();
    int64_t* __restrict target_p = target.mutable_data();
    int64_t* __restrict labels_p = labels.mutable_data();
    {
        py::gil_scoped_release nogil;
        int64_t t0 = 0;
        cu_p[0] = 0;
        for (int64_t b = 0; b < B; ++b) {
            const int64_t s = start[static_cast<size_t>(b)];
            const int64_t L = len[static_cast<size_t>(b)];
            // Separate affine loops: each vectorises.
            for (int64_t p = 0; p < L; ++p) pos_p[t0 + p] = p;
            for (int64_t p = 0; p < L; ++p) index_p[t0 + p] = s + p;
            for (int64_t p = 0; p < L; ++p) target_p[t0 + p] = s + p + 1;
            target_p[t0 + L - 1] = -1;
            if (has_tokens) {
                if (tok.is64 && tok.stride == 8) {
                    std::memcpy(labels_p + t0, tok.data + (s + 1) * 8, (L - 1) * sizeof(int64_t));
                } else if (!tok.is64 && tok.stride == 4) {
                    const char* src = tok.data + (s + 1) * 4;
                    for (int64_t p = 0; p + 1 < L; ++p) labels_p[t0 + p] = load<int32_t>(src + p * 4);
                } else {
                    for (int64_t p = 0; p + 1 < L; ++p) labels_p[t0 + p] = tok[s + p + 1];
                }
                labels_p[t0 + L - 1] = ignore_index;
            }
            t0 += L;
            cu_p[b + 1] = static_cast<int32_t>(t0);
        }
    }
    return py::make_tuple(cu, pos, index, target, has_tokens ? py::object(labels) : py::object(py::none()),
                          max_seqlen);
}

// out[index[t]] = values[t] row by row; rows may be strided, the dims after the first must be contiguous.
void unpack(py::handle values_obj, py::handle index_obj, py::handle out_obj) {
    py::array values = as_array("values", values_obj);
    if (!py::isinstance<py::array>(out_obj)) {
        throw py::type_error("out must be a NumPy array (it is written in place), got " +
                             py::str(py::type::of(out_obj).attr("__name__")).cast<std::string>());
    }
    auto out = py::reinterpret_borrow<py::array>(out_obj);
    if (!out.writeable()) throw py::value_error("out must be writable, got a read-only array");
    if (!values.dtype().equal(out.dtype())) {
        throw py::type_error("values must have the dtype of out (" + dtype_name(out) + "), got " + dtype_name(values));
    }
    if (values.ndim() < 1 || out.ndim() != values.ndim()) {
        throw py::value_error("values must have the number of dims of out (" + std::to_string(out.ndim()) +
                              ", >= 1), got shape " + shape_str(values));
    }
    const auto itemsize = values.itemsize();
    int64_t row_elems = 1;
    for (py::ssize_t d = values.ndim() - 1; d >= 1; --d) {
        if (values.shape(d) != out.shape(d)) {
            throw py::value_error("values must match out in every dim after the first: out " + shape_str(out) +
                                  ", values " + shape_str(values));
        }
        const int64_t want = itemsize * row_elems;
        if (values.shape(d) > 1 && (values.strides(d) != want || out.strides(d) != want)) {
            throw py::value_error("values and out must be contiguous after their first dim, got strides " +
                                  std::to_string(values.strides(d)) + " and " + std::to_string(out.strides(d)) +
                                  " in dim " + std::to_string(d));
        }
        row_elems *= values.shape(d);
    }
    Int64Array idx = as_int64_1d("index", index_obj);
    if (idx.size != values.shape(0)) {
        throw py::value_error("index must have one entry per row of values (" + std::to_string(values.shape(0)) +
                              "), got " + std::to_string(idx.size));
    }
    const int64_t n_out = out.shape(0);
    const int64_t row_bytes = itemsize * row_elems;
    const char* src = static_cast<const char*>(values.data());
    char* dst = static_cast<char*>(out.mutable_data());
    const int64_t vs = values.strides(0);
    const int64_t os = out.strides(0);
    const int64_t N = idx.size;
    // Each index is read once, validated and kept as a byte offset: the writes use only these copies, never
    // the caller's index again (another thread may rewrite it while the GIL is released).
    std::vector<int64_t> dst_off(static_cast<size_t>(N));
    int64_t bad = -1, bad_value = 0;
    {
        py::gil_scoped_release nogil;
        // Validate every index before the first write: a bad index leaves out untouched.
        for (int64_t t = 0; t < N; ++t) {
            const int64_t i = idx[t];
            if (i < 0 || i >= n_out) {
                bad = t, bad_value = i;
                break;
            }
            dst_off[static_cast<size_t>(t)] = i * os;
        }
        if (bad < 0) {
            // memmove: values may be a view of out itself.
            const int64_t* d = dst_off.data();
            if (row_bytes == 4) {
                for (int64_t t = 0; t < N; ++t) std::memmove(dst + d[t], src + t * vs, 4);
            } else if (row_bytes == 8) {
                for (int64_t t = 0; t < N; ++t) std::memmove(dst + d[t], src + t * vs, 8);
            } else if (row_bytes > 0) {
                for (int64_t t = 0; t < N; ++t) std::memmove(dst + d[t], src + t * vs, row_bytes);
            }
        }
    }
    if (bad >= 0) {
        throw py::value_error("index[" + std::to_string(bad) + "] = " + std::to_string(bad_value) +
                              " is out of range for out with " + std::to_string(n_out) + " rows");
    }
}

}  // namespace

void bind_pack(py::module_& m) {
    m.def("pack", &pack, py::arg("offsets"), py::arg("indices"), py::arg("tokens") = py::none(),
          py::arg("ignore_index") = -100,
          "Pack one micro-batch: (cu_seqlens, position_ids, index, target_index, labels | None, max_seqlen) (see "
          "fusedrl.engine.packing.pack).");
    m.def("unpack", &unpack, py::arg("values"), py::arg("index"), py::arg("out"),
          "out[index[t]] = values[t] (see fusedrl.engine.packing.unpack).");
}

}  // namespace fusedrl
