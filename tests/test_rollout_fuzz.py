"""Property-based fuzz of every function of the C++ extension fusedrl.engine._rollout, called directly
(below the Python wrapper, as any caller could): arbitrary dtypes, shapes, strides, unaligned and reversed
views, extreme integers, views of the buffer's own memory, generators.

Every call must either give the result of the pure-Python reference (tests/packing_ref.py) or raise a
TypeError / ValueError / IndexError whose message names the offending argument. Run under the sanitizer
build (tests/sanitizer/run.sh, `make sanitize`) it also proves that no input reads or writes out of bounds
or hits undefined behaviour. FUSEDRL_FUZZ_EXAMPLES sets the number of examples per property (the
sanitizer run uses more).
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from packing_ref import kk_partition, lpt_partition, pack_ref, plan_microbatches_ref

from fusedrl.engine import _rollout

EXAMPLES = int(os.environ.get("FUSEDRL_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
I64_MAX = 2**63 - 1
INT_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
ANY_DTYPES = INT_DTYPES + ["bool", "float32", "float64", "float16", "complex64", "U3", "O", "V8", ">i8"]
# Integers that break naive size arithmetic.
EXTREMES = [-(2**63), -(2**31) - 1, -1, 0, 1, 2**31 - 1, 2**31, 2**32, 2**62, I64_MAX]


def expect_clear_error(call, *names):
    """Run call(); if it raises, the exception must be a plain argument error naming one of `names`.
    Returns (True, result) or (False, exception)."""
    try:
        return True, call()
    except (TypeError, ValueError, IndexError, OverflowError) as e:
        msg = str(e)
        assert any(n in msg for n in names), f"{type(e).__name__} does not name any of {names}: {msg!r}"
        return False, e


@st.composite
def layouts(draw, values: np.ndarray):
    """`values` (1-D) as one of the memory layouts a caller can hand over, same logical content."""
    kind = draw(st.sampled_from(["plain", "reversed", "strided", "unaligned", "list"]))
    if kind == "reversed":
        return values[::-1].copy()[::-1]
    if kind == "strided":
        wide = np.empty(2 * len(values), values.dtype)
        wide[::2] = values
        return wide[::2]
    if kind == "unaligned" and values.dtype.itemsize > 1:
        raw = np.empty(values.nbytes + 1, np.uint8)
        view = raw[1:].view(values.dtype)
        view[:] = values
        return view
    if kind == "list":
        return values.tolist()
    return values


def cast(values, dtype: str):
    """values as dtype where representable, else None."""
    arr = np.asarray(values, dtype=object)
    if dtype in INT_DTYPES:
        info = np.iinfo(dtype)
        if len(arr) and (min(arr) < info.min or max(arr) > info.max):
            return None
    return np.array(values, dtype=dtype)


@st.composite
def int_arrays(draw, values):
    """`values` (Python ints) as an integer array of some dtype that holds them, in some layout."""
    dtypes = [d for d in INT_DTYPES if cast(values, d) is not None] or ["object"]
    dtype = draw(st.sampled_from(dtypes))
    if dtype == "object":
        return values  # a list the extension must turn into an error, not a crash
    return draw(layouts(cast(values, dtype)))


def junk():
    """Things that are not what any argument wants."""
    return st.sampled_from(
        [None, 3, 2.5, "abc", b"ab", {"a": 1}, object(), np.zeros((2, 2)), np.zeros(()), np.array(["x"]),
         np.array([None, 1], dtype=object), np.zeros(3, ">i8"), np.zeros(2, [("a", "i4"), ("b", "O")])]
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# plan_microbatches / _partition
# ----------------------------------------------------------------------------------------------------
lengths_values = st.one_of(
    st.lists(st.integers(1, 60), max_size=40),
    st.lists(st.sampled_from(EXTREMES + [1, 2, 3]), max_size=6),
)
int_args = st.one_of(st.integers(-3, 70), st.sampled_from(EXTREMES + [2**63, 2**70, -(2**70)]), junk())


@FUZZ
@given(data=st.data(), lengths=lengths_values, max_tokens=int_args, num_ranks=int_args,
       balance=st.one_of(st.sampled_from(["kk", "lpt"]), junk()))  # fmt: skip
def test_fuzz_plan_microbatches(data, lengths, max_tokens, num_ranks, balance):
    arr = data.draw(st.one_of(int_arrays(lengths), junk()))
    ok, plan = expect_clear_error(
        lambda: _rollout.plan_microbatches(arr, max_tokens, num_ranks, balance), "lengths", "max_tokens", "num_ranks",
        "balance",
    )  # fmt: skip
    if ok:
        assert len(plan) == num_ranks
        if sum(lengths) < 10**4 and num_ranks < 100:
            assert [[mb.tolist() for mb in r] for r in plan] == plan_microbatches_ref(
                lengths, max_tokens, num_ranks=num_ranks, balance=balance
            )


@FUZZ
@given(data=st.data(), lengths=lengths_values, k=int_args, balance=st.sampled_from(["kk", "lpt"]))
def test_fuzz_partition(data, lengths, k, balance):
    arr = data.draw(int_arrays(lengths))
    ok, bins = expect_clear_error(lambda: _rollout._partition(arr, k, balance), "lengths", "k")
    if ok and len(lengths) * k < 10**5:
        ref = (kk_partition if balance == "kk" else lpt_partition)(lengths, k)
        assert [b.tolist() for b in bins] == ref


# ----------------------------------------------------------------------------------------------------
# pack / unpack
# ----------------------------------------------------------------------------------------------------
@st.composite
def pack_inputs(draw):
    """Buffer offsets (mostly valid, sometimes corrupted with extremes), indices, tokens."""
    lens = draw(st.lists(st.integers(1, 12), min_size=0, max_size=12))
    offsets = [0] + np.cumsum(lens, dtype=np.int64).tolist()
    for _ in range(draw(st.integers(0, 2))):
        offsets[draw(st.integers(0, len(offsets) - 1))] = draw(st.sampled_from(EXTREMES))
    n = len(offsets) - 1
    indices = draw(st.lists(st.one_of(st.integers(-1, n), st.sampled_from(EXTREMES)), max_size=10))
    tokens = None
    if draw(st.booleans()):
        size = max(0, offsets[-1]) if offsets[-1] <= 200 else draw(st.integers(0, 50))
        tokens = np.arange(size, dtype=draw(st.sampled_from(["int32", "int64"]))) * 7 + 3
        tokens = draw(layouts(tokens))
        tokens = np.asarray(tokens) if isinstance(tokens, list) else tokens
        if draw(st.integers(0, 9)) == 0:
            tokens = draw(junk())
    return offsets, indices, tokens


@FUZZ
@given(data=st.data(), inputs=pack_inputs(), ignore_index=st.one_of(st.sampled_from([-100, 0]), int_args))
def test_fuzz_pack(data, inputs, ignore_index):
    offsets, indices, tokens = inputs
    off = data.draw(int_arrays(offsets))
    idx = data.draw(
        st.one_of(int_arrays(indices), junk()) if data.draw(st.integers(0, 9)) == 0 else int_arrays(indices)
    )
    ok, got = expect_clear_error(
        lambda: _rollout.pack(off, idx, tokens, ignore_index), "offsets", "indices", "tokens", "ignore_index"
    )
    if not ok:
        return
    cu, pos, index, target, labels, max_seqlen = got
    ref = pack_ref(offsets, indices, None if tokens is None else np.asarray(tokens), ignore_index=ignore_index)
    assert cu.dtype == np.int32 and cu.tolist() == ref["cu_seqlens"]
    assert pos.tolist() == ref["position_ids"] and index.tolist() == ref["index"]
    assert target.tolist() == ref["target_index"] and max_seqlen == ref["max_seqlen"]
    assert (labels is None) == (tokens is None)
    if labels is not None:
        assert labels.tolist() == ref["labels"]


@FUZZ
@given(
    data=st.data(),
    n_out=st.integers(0, 8),
    n=st.integers(0, 8),
    trailing=st.sampled_from([(), (1,), (3,), (2, 2), (0,)]),
    dtype=st.sampled_from(["float32", "float64", "int64", "int8", "complex64", "V3"]),
)
def test_fuzz_unpack(data, n_out, n, trailing, dtype):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    out = np.zeros((n_out, *trailing), dtype=dtype)
    row = int(np.prod(trailing, dtype=np.int64))
    values = np.frombuffer(rng.bytes(n * row * out.itemsize), dtype=dtype).reshape((n, *trailing))
    index = data.draw(st.lists(st.one_of(st.integers(-1, n_out), st.sampled_from(EXTREMES)), min_size=n, max_size=n))
    idx = data.draw(int_arrays(index))
    mode = data.draw(st.sampled_from(["plain", "self", "strided_out", "readonly", "mismatch", "junk"]))
    if mode == "self" and not (n_out and n <= n_out):
        mode = "plain"
    if mode == "self":
        values = out[:n]  # a view of out itself: memmove semantics, in index order
    elif mode == "strided_out":
        out = np.zeros((2 * n_out, *trailing), dtype=dtype)[::2]
    elif mode == "readonly":
        out.flags.writeable = False
    elif mode == "mismatch":
        values = np.zeros((n, 5), dtype=dtype)
    elif mode == "junk":
        out = data.draw(junk())
    want = out.copy() if isinstance(out, np.ndarray) else None
    ok, _ = expect_clear_error(lambda: _rollout.unpack(values, idx, out), "values", "index", "out")
    if ok and want is not None:
        src = values.copy() if mode != "self" else None
        for t, i in enumerate(index):
            want[i] = src[t] if src is not None else want[t]
        assert out.tobytes() == want.tobytes()


# ----------------------------------------------------------------------------------------------------
# RolloutBuffer: a state machine against a list-of-sequences model
# ----------------------------------------------------------------------------------------------------
FIELDS = ("a", "b")


class BufferMachine(RuleBasedStateMachine):
    @initialize(token_dtype=st.sampled_from(["int32", "int64"]), extra=st.integers(0, 3))
    def setup(self, token_dtype, extra):
        self.fields = FIELDS + tuple(f"x{i}" for i in range(extra))
        self.buf = _rollout.RolloutBuffer(list(self.fields), np.dtype(token_dtype))
        self.hi = np.iinfo(token_dtype).max
        self.seqs = []  # model: (tokens, mask, {field: values}) as lists

    def _check_append(self, tokens, mask, fields):
        """Which argument (if any) makes this sequence invalid, in the extension's checking order."""
        if not len(tokens) or any(t < 0 or t > self.hi for t in tokens):
            return "tokens"
        if len(mask) != len(tokens) or any(m not in (0, 1) for m in mask):
            return "response_mask"
        for k, v in fields.items():
            with np.errstate(over="ignore"):  # 1e39 becomes inf in float32: the buffer must refuse it
                finite = np.all(np.isfinite(np.asarray(v, np.float32)))
            if k not in self.fields or len(v) != len(tokens) or not finite:
                return k
        return None

    @st.composite
    def sequences(draw, self_view=False):  # noqa: N805 (a strategy, drawn with the machine's data)
        L = draw(st.integers(0, 300)) if draw(st.integers(0, 9)) == 0 else draw(st.integers(1, 20))
        tokens = draw(st.lists(st.one_of(st.integers(0, 1000), st.sampled_from(EXTREMES)), min_size=L, max_size=L)
                      if draw(st.integers(0, 4)) == 0 else st.just(list(range(L))))  # fmt: skip
        mask = draw(st.lists(st.integers(0, 1), min_size=L, max_size=L) if draw(st.integers(0, 9)) else
                    st.lists(st.integers(-1, 2), min_size=L, max_size=L))  # fmt: skip
        fields = {}
        for f in draw(st.lists(st.sampled_from(FIELDS + ("x0", "nope")), unique=True, max_size=3)):
            n = L if draw(st.integers(0, 9)) else L + 1
            vals = [float(v) for v in range(n)]
            if n and draw(st.integers(0, 9)) == 0:
                vals[0] = draw(st.sampled_from([float("nan"), float("inf"), 1e39]))
            fields[f] = vals
        return tokens, mask, fields

    @rule(data=st.data(), seq=sequences())
    def append(self, data, seq):
        tokens, mask, fields = seq
        t_arr = data.draw(int_arrays(tokens))
        m_arr = data.draw(
            st.one_of(int_arrays(mask), st.just(np.array(mask, bool)) if set(mask) <= {0, 1} else int_arrays(mask))
        )
        with np.errstate(over="ignore"):  # 1e39 -> inf in float32, which the buffer must refuse
            f_arr = {k: data.draw(layouts(np.array(v, data.draw(st.sampled_from(["float32", "float64"])))))
                     for k, v in fields.items()}  # fmt: skip
        bad = self._check_append(tokens, mask, fields)
        n0 = len(self.seqs)
        ok, got = expect_clear_error(lambda: self.buf.append(t_arr, m_arr, f_arr), "tokens", "response_mask", "field",
                                     *self.fields)  # fmt: skip
        assert ok == (bad is None), f"append ok={ok} but the model says {bad}: {got}"
        if ok:
            assert got == n0
            self.seqs.append((tokens, mask, {k: np.float32(v).tolist() for k, v in fields.items()}))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), which=st.sampled_from(["tokens", "mask", "a", "b"]), rev=st.booleans())
    def append_own_view(self, data, which, rev):
        """A sequence made of the buffer's own exported memory (zero-copy views), maybe reversed."""
        n = self.buf.num_tokens
        tok, mask, a = self.buf.tokens(), self.buf.response_mask(), self.buf.field("a")
        model_tok = [t for s in self.seqs for t in s[0]]
        model_mask = [m for s in self.seqs for m in s[1]]
        model_a = [v for s in self.seqs for v in s[2].get("a", [0.0] * len(s[0]))]
        sl = slice(None, None, -1) if rev else slice(None)
        if data.draw(st.booleans()):
            self.buf.clear()
            self.seqs = []
        self.buf.append(tok[sl] if which == "tokens" else np.arange(n), mask[sl] if which == "mask" else np.ones(n, bool),
                        {"a": a[sl]} if which == "a" else {})  # fmt: skip
        self.seqs.append((
            model_tok[sl] if which == "tokens" else list(range(n)),
            model_mask[sl] if which == "mask" else [1] * n,
            {"a": model_a[sl]} if which == "a" else {},
        ))  # fmt: skip

    @rule(data=st.data(), seqs=st.lists(sequences(), max_size=4), gen=st.booleans())
    def append_many(self, data, seqs, gen):
        toks = [data.draw(int_arrays(s[0])) for s in seqs]
        masks = [np.array(s[1]) for s in seqs]
        names = {k for s in seqs for k in s[2]}
        with np.errstate(over="ignore"):  # 1e39 -> inf, which the buffer must refuse
            fields = {k: [np.array(s[2][k], np.float32) if k in s[2] else None for s in seqs] for k in names}
        # A None item of a given field is that field omitted for that one sequence: zero-filled.
        bad = next((b for s in seqs if (b := self._check_append(*s))), None)
        wrap = (lambda x: (v for v in x)) if gen else list
        ok, got = expect_clear_error(
            lambda: self.buf.append_many(wrap(toks), wrap(masks), {k: wrap(v) for k, v in fields.items()}),
            "tokens", "response_mask", "field", *self.fields,
        )  # fmt: skip
        assert ok == (bad is None), f"append_many ok={ok} but the model says {bad}: {got}"
        if ok:
            self.seqs += [(s[0], s[1], {k: np.float32(v).tolist() for k, v in s[2].items()}) for s in seqs]

    @rule(i=st.one_of(st.integers(-25, 25), st.sampled_from(EXTREMES + [2**63, -(2**63) - 1, 2**70]), junk()))
    def get(self, i):
        ok, got = expect_clear_error(lambda: self.buf.get(i), "sequence index", "i must be")
        n = len(self.seqs)
        valid = isinstance(i, int) and -n <= i < n
        assert ok == valid, (i, n, got)
        if ok:
            tokens, mask, fields = self.seqs[i]
            assert got["tokens"].tolist() == tokens and got["response_mask"].tolist() == [bool(m) for m in mask]
            for f in self.fields:
                assert got[f].tolist() == fields.get(f, [0.0] * len(tokens))

    @rule(name=st.one_of(st.sampled_from(FIELDS + ("x2", "nope", "")), junk()))
    def field(self, name):
        ok, got = expect_clear_error(lambda: self.buf.field(name), "field", "name")
        assert ok == (isinstance(name, str) and name in self.fields), (name, got)

    @rule()
    def clear(self):
        self.buf.clear()
        self.seqs = []

    @invariant()
    def matches_model(self):
        if not hasattr(self, "buf"):
            return
        lens = [len(s[0]) for s in self.seqs]
        assert len(self.buf) == len(self.seqs) and self.buf.num_tokens == sum(lens)
        assert self.buf.lengths().tolist() == lens
        assert self.buf.offsets().tolist() == [0] + np.cumsum(lens, dtype=np.int64).tolist()
        assert self.buf.tokens().tolist() == [t for s in self.seqs for t in s[0]]
        assert self.buf.response_mask().tolist() == [bool(m) for s in self.seqs for m in s[1]]
        assert self.buf.fields == self.fields and self.buf.token_dtype.kind == "i"
        for f in self.fields:
            want = [v for s in self.seqs for v in s[2].get(f, [0.0] * len(s[0]))]
            assert self.buf.field(f).tolist() == want


BufferMachine.TestCase.settings = settings(
    max_examples=max(5, EXAMPLES // 4), stateful_step_count=20, deadline=None, suppress_health_check=list(HealthCheck)
)
test_fuzz_rollout_buffer = BufferMachine.TestCase


@FUZZ
@given(fields=st.one_of(st.lists(st.text(max_size=4), max_size=5), junk(), st.just(["\ud800"])),
       token_dtype=st.one_of(st.sampled_from(ANY_DTYPES), junk()))  # fmt: skip
def test_fuzz_buffer_construction(fields, token_dtype):
    ok, buf = expect_clear_error(lambda: _rollout.RolloutBuffer(fields, token_dtype), "fields", "token_dtype")
    if ok:
        assert buf.fields == tuple(fields) and len(buf) == 0 and buf.num_tokens == 0


@pytest.mark.parametrize("n_fields", [2, 3000])
def test_fuzz_many_fields_round_trip(n_fields):
    names = [f"f{i}" for i in range(n_fields)]
    buf = _rollout.RolloutBuffer(names, np.int32)
    for L in (1, 5000):
        buf.append(np.ones(L, np.int32), np.ones(L, bool), {names[-1]: np.full(L, 2.0, np.float32)})
    assert buf.field(names[-1]).sum() == 2 * 5001 and not buf.field(names[0]).any()
