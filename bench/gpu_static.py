"""Static GPU checks (issue 18): every Triton kernel of fusedrl.kernels compiled ahead of time for sm_90 (H100 /
H200) and sm_80 (A100) at the block sizes and warps its own launcher picks for realistic shapes, with registers,
spills, shared memory and occupancy; and the bandwidth model (bytes each pass must move) that turns a measured GPU
time into a fraction of its floor. No GPU is needed: Triton ships ptxas and cuobjdump.

    python bench/gpu_static.py              # -> bench/results/gpu-static-<yyyy-mm-dd>.json / .md
    python bench/gpu_static.py --out DIR    # elsewhere

How the launches are found: the public ops (logprobs, ppo_loss, value_loss, gae) run forward and backward on
meta tensors (no memory, any size) while Triton's ``JITFunction.run`` only records its arguments. The meta device
is not "cpu", so every launcher takes its GPU branch (``vocab_block``, rows per program, warps) exactly as on
CUDA; ``Tensor.is_cuda`` is made to answer True for meta tensors for the launchers that ask that instead. Each
recorded launch is then specialised by Triton's own binder (16-byte alignment, strides equal to 1, divisibility
by 16: what the JIT would do for contiguous CUDA tensors) and compiled with ``triton.compile`` for each target.
Every ``@triton.jit`` function named ``*_kernel`` in fusedrl.kernels must be reached, so a new kernel cannot
escape the table.

Resources: registers, stack and shared memory from ``cuobjdump --dump-resource-usage`` of the cubin; spill
bytes from the ptxas ``-v`` log Triton writes when TRITON_DUMP_PTXAS_LOG=1 (a fresh cache dir makes ptxas run).
Loads: the widest ``ld.global`` inside the kernel's loops (its main loop: the vocabulary stream of the logits
kernels, the time blocks of GAE), or of the whole kernel when it has no loop, read from the PTX: a streaming
kernel whose logits load is a scalar per element instead of a 16-byte vector moves a fraction of the bytes.
On a CUDA machine ``CompiledKernel.n_regs`` / ``n_spills`` only exist after the binary is loaded on a device, so
this path is the one that works on both Triton 3.6 and 3.9 and with or without a GPU.

Occupancy per SM (the CUDA occupancy calculator's rules for sm_80 / sm_90)::

    regs_per_warp = ceil(regs_per_thread * 32 / 256) * 256                 (allocation unit: 256 per warp)
    blocks_regs   = floor(floor(65536 / regs_per_warp) / warps_per_block)  (65536 registers per SM)
    blocks_smem   = floor(smem_per_sm / (ceil(shared / 128) * 128 + 1024)) (1 KiB per block reserved; 228 KiB
                                                                            sm_90, 164 KiB sm_80; inf if 0)
    blocks_warps  = floor(64 / warps_per_block)                            (2048 threads = 64 warps per SM)
    blocks        = min(blocks_regs, blocks_smem, blocks_warps, 32)        (32 resident blocks per SM)
    occupancy     = blocks * warps_per_block / 64
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEVICE = "none (static, sm_90/sm_80 AOT)"
VOCABS = (32000, 128256, 151936, 262144)
DTYPES = ("float32", "bfloat16")
N_TOKENS = 8192  # rows of the logits-level benchmarks (bench/gpu_suite.py)
GAE_SHAPE = (256, 2048)  # sequences x tokens of the GAE benchmark
ARCHS = (90, 80)

# Per-SM limits, identical on sm_80 and sm_90 except shared memory.
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM, REG_UNIT = 65536, 64, 32, 256
SMEM_PER_SM = {90: 228 * 1024, 80: 164 * 1024}
SMEM_RESERVED_PER_BLOCK, SMEM_UNIT = 1024, 128
SM_COUNT = {90: 132, 80: 108}  # H100 SXM / H200 and A100: how many blocks one wave holds

# Occupancy floor per kernel, justified where the test holds the table to it (tests/test_gpu_static.py).
FLOORS = {"_logprobs_fwd_kernel": 0.5, "_logprobs_bwd_kernel": 0.5, "_ppo_fwd_kernel": 0.5,
          "_value_loss_fwd_kernel": 0.25, "_gae_fwd_kernel": 0.125}  # fmt: skip

# Kernels that stream the logits: their main loop must load 16-byte vectors (tests/test_gpu_static.py).
STREAMING = ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel", "_ppo_fwd_kernel")
VECTOR_LOAD_BITS = 128

# Peak HBM bandwidth from the data sheets (bytes/s): the floor of a memory-bound pass is bytes / peak.
PEAK_BW = {"h100": 3.35e12, "h200": 4.8e12}


# ----------------------------------------------------------------------------------------------------
# Bandwidth model: bytes each kernel pass must read and write, nothing cached between passes
# ----------------------------------------------------------------------------------------------------
def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def pass_bytes(
    op: str, pass_: str, shape: str, dtype: str, *, entropy: bool = False, ref: bool = True, n_tokens: int | None = None
) -> dict:
    """``{"read", "write", "bytes", "formula"}`` for one pass of a fused op at a ``shape`` string as the
    benchmarks write it ("NxV" for logprobs / ppo_loss, "BxT" (sequences x tokens) for gae, "N" for value_loss).

    Counts what the Triton kernels of the pass must move at minimum: each logits row read once per kernel, the
    gradient written once, per-token vectors (int64 labels, float32 statistics) once. ``full`` is fwd + bwd. The
    small torch glue of ppo_loss (the (N,) coefficient products and metric means) is left out: a floor."""
    e = _itemsize(dtype)
    if pass_ == "full":
        f, b = (
            pass_bytes(op, "fwd", shape, dtype, entropy=entropy, ref=ref),
            pass_bytes(op, "bwd", shape, dtype, entropy=entropy, ref=ref),
        )
        return {
            "read": f["read"] + b["read"],
            "write": f["write"] + b["write"],
            "bytes": f["bytes"] + b["bytes"],
            "formula": f"fwd + bwd: {f['formula']} | {b['formula']}",
        }
    dims = [int(s) for s in shape.split(" ")[0].split("x")]
    if op in ("logprobs", "ppo_loss"):
        N, V = dims
        if op == "logprobs" and pass_ == "fwd":
            read, write = N * V * e + 8 * N, 4 * N * (3 + entropy)
            formula = f"read N*V*{e} + N*8 (labels); write N*4*{3 + entropy} (logp, 2 row stats{', entropy' * entropy})"
        elif op == "ppo_loss" and pass_ == "fwd":
            read, write = N * V * e + 8 * N + 4 * N * (3 + ref), 4 * N * 10
            formula = (
                f"read N*V*{e} + N*8 (labels) + N*4*{3 + ref} (old logp, advantages, weights"
                f"{', ref logp' * ref}); write N*4*10 (8 token stats, 2 row stats)"
            )
        elif pass_ == "bwd":  # the logprobs backward kernel, also the PPO backward
            k = 4 + 2 * entropy  # 2 row stats + dlogp [+ entropy + dent] float32, labels int64
            read, write = N * V * e + 8 * N + 4 * N * (k - 1), N * V * e
            formula = f"read N*V*{e} + N*8 (labels) + N*4*{k - 1} (row stats, upstream grads); write N*V*{e} (dlogits)"
        else:
            raise ValueError(f"pass_bytes: no model for {op!r} pass {pass_!r}")
    elif op == "gae" and pass_ == "fwd":
        B, T = dims
        n = B * T if n_tokens is None else n_tokens  # a ragged batch: its real token count
        read, write = 2 * n * e + 4 * (B + 1), 2 * 4 * n
        formula = f"read n*{e}*2 (rewards, values) + (B+1)*4 (cu_seqlens); write n*4*2 (advantages, returns), n tokens"
    elif op == "value_loss" and pass_ == "fwd":
        (n,) = dims
        read, write = 3 * n * e + 2 * 4 * n, 4 * 4 * n
        formula = f"read n*{e}*3 (values, old values, returns) + n*4*2 (weights, mask); write n*4*4 (token stats)"
    else:
        raise ValueError(f"pass_bytes: no model for {op!r} pass {pass_!r}")
    return {"read": read, "write": write, "bytes": read + write, "formula": formula}


def peak_bandwidth(name: str) -> tuple[float | None, str | None]:
    """(bytes/s, basis) of a CUDA device's data-sheet HBM peak from its name; (None, None) when unknown."""
    n = name.lower()
    if "gh200" in n:  # 96 GB HBM3 and 144 GB HBM3e parts differ: no single figure
        return None, None
    for key, bw, label in (("h100 pcie", 2.0e12, "H100 PCIe"), ("h100 nvl", 3.9e12, "H100 NVL"),
                           ("h200", PEAK_BW["h200"], "H200"), ("h100", PEAK_BW["h100"], "H100 SXM")):  # fmt: skip
        if key in n or key.replace(" ", "-") in n:
            return bw, f"{label} data-sheet peak {bw / 1e12:.2f} TB/s"
    return None, None


def bandwidth_table() -> list[dict]:
    """The model at the benchmark shapes, with its time floor on an H100 and an H200."""
    rows = []
    cases = [("logprobs", f"{N_TOKENS}x{V}", dict(entropy=False)) for V in VOCABS]
    cases += [("ppo_loss", f"{N_TOKENS}x{V}", dict(ref=True)) for V in VOCABS]  # bench_ppo_loss: k3 vs ref
    cases += [("gae", "x".join(map(str, GAE_SHAPE)), {}), ("value_loss", str(N_TOKENS * 8), {})]
    for op, shape, kw in cases:
        for dtype in DTYPES:
            for pass_ in ("fwd", "bwd", "full") if op in ("logprobs", "ppo_loss") else ("fwd",):
                b = pass_bytes(op, pass_, shape, dtype, **kw)
                rows.append(
                    {
                        "op": op,
                        "pass": pass_,
                        "shape": shape,
                        "dtype": dtype,
                        **b,
                        **{f"floor_ms_{g}": b["bytes"] / bw * 1e3 for g, bw in PEAK_BW.items()},
                    }
                )
    return rows


# ----------------------------------------------------------------------------------------------------
# Occupancy
# ----------------------------------------------------------------------------------------------------
def occupancy(regs: int, shared: int, num_warps: int, arch: int) -> dict:
    """Resident blocks and warps per SM and the limiting resource (the formula in the module docstring)."""
    regs_per_warp = math.ceil(regs * 32 / REG_UNIT) * REG_UNIT
    limits = {
        "registers": (REGS_PER_SM // regs_per_warp) // num_warps if regs_per_warp else MAX_BLOCKS_PER_SM,
        "shared": (
            SMEM_PER_SM[arch] // (math.ceil(shared / SMEM_UNIT) * SMEM_UNIT + SMEM_RESERVED_PER_BLOCK)
            if shared
            else MAX_BLOCKS_PER_SM
        ),
        "warps": MAX_WARPS_PER_SM // num_warps,
        "blocks": MAX_BLOCKS_PER_SM,
    }
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "warps"))  # a tie with the warp limit is no loss
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * num_warps,
        "occupancy": blocks * num_warps / MAX_WARPS_PER_SM,
        "limiter": limiter,
    }


# ----------------------------------------------------------------------------------------------------
# Recording launches on meta tensors
# ----------------------------------------------------------------------------------------------------
def _prepare_env(cache_dir: str) -> None:
    """Before triton is imported: compiled kernels (not the interpreter), a fresh cache so that ptxas runs and
    logs every kernel, and the ptxas -v log printed."""
    if "triton" in sys.modules:
        raise RuntimeError("bench/gpu_static.py must set up Triton's environment before triton is imported")
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"


@contextlib.contextmanager
def recording():
    """Within: launching any Triton kernel records (kernel, args, kwargs, grid) instead of running it, and meta
    tensors answer ``is_cuda`` with True. Yields the list of records."""
    import torch
    from triton.runtime.jit import JITFunction

    launches = []
    run, is_cuda = JITFunction.run, vars(torch.Tensor).get("is_cuda")

    def record(self, *args, grid, warmup, **kwargs):
        launches.append({"kernel": self, "args": args, "kwargs": kwargs, "grid": grid})

    own = "is_cuda" in vars(torch.Tensor)  # normally inherited from the C base class
    JITFunction.run = record
    torch.Tensor.is_cuda = property(lambda t: t.device.type in ("cuda", "meta"))
    try:
        yield launches
    finally:
        JITFunction.run = run
        if own:
            torch.Tensor.is_cuda = is_cuda
        else:
            del torch.Tensor.is_cuda


def scenarios(vocabs=VOCABS, dtypes=DTYPES, n_tokens=N_TOKENS, gae_shape=GAE_SHAPE) -> list[dict]:
    """Run every public op forward and backward on meta tensors; returns the recorded launches, each tagged with
    the case that made it (op, pass, V, dtype, variant)."""
    import torch

    from fusedrl.kernels import PPOLossConfig, gae, logprobs, ppo_loss, validation, value_loss

    out = []

    def run(tag: dict, fn) -> None:
        with recording() as launches:
            fn()
        for i, rec in enumerate(launches):
            out.append({**rec, **tag, "launch": i})

    meta = dict(device="meta")
    N = n_tokens
    with validation(False):  # label / cu_seqlens value checks would read meta data
        for dtype in dtypes:
            dt = getattr(torch, dtype)
            for V in vocabs:
                y = torch.empty(N, dtype=torch.int64, **meta)
                vec = torch.empty(N, **meta)

                def lp(ent):
                    x = torch.empty(N, V, dtype=dt, requires_grad=True, **meta)
                    res = logprobs(x, y, return_entropy=ent, backend="triton")
                    res = res if ent else (res,)
                    torch.autograd.backward(res, [torch.empty_like(r) for r in res])

                def ppo(cfg, ref, rollout=False):
                    x = torch.empty(N, V, dtype=dt, requires_grad=True, **meta)
                    loss, _ = ppo_loss(x, y, vec, vec, vec, ref_logp=vec if ref else None,
                                       rollout_logp=vec if rollout else None, config=cfg, backend="triton")  # fmt: skip
                    loss.backward()

                base = {"V": V, "N": N, "dtype": dtype}
                run({**base, "op": "logprobs", "variant": "entropy"}, lambda: lp(True))
                run({**base, "op": "logprobs", "variant": "logp only"}, lambda: lp(False))
                run({**base, "op": "ppo_loss", "variant": "no ref"}, lambda: ppo(PPOLossConfig(), False))
                for est in ("k1", "k2", "k3", "k3+"):
                    cfg = PPOLossConfig(kl_coef=0.04, kl_estimator=est, entropy_coef=0.01 if est == "k3" else 0.0)
                    run(
                        {**base, "op": "ppo_loss", "variant": f"kl {est}" + (" + entropy" if est == "k3" else "")},
                        lambda cfg=cfg: ppo(cfg, True),
                    )
                # The other objectives and per-token terms of the fused kernel (constexpr POLICY, KL_IW, HAS_IS).
                kl = dict(kl_coef=0.04, kl_estimator="k3")
                others = {
                    "cispo + tis": (PPOLossConfig(policy_loss="cispo", clip_low=1.0, clip_high=4.0,
                                                  rollout_correction="tis", **kl), True),
                    "sapo": (PPOLossConfig(policy_loss="sapo", **kl), False),
                    "delta + abs kl, clamped, IS-weighted": (PPOLossConfig(
                        clip_delta=3.0, kl_coef=0.04, kl_estimator="abs", kl_clamp=10.0,
                        kl_importance_weighted=True), False),
                }  # fmt: skip
                for variant, (cfg, rollout) in others.items():
                    run({**base, "op": "ppo_loss", "variant": variant},
                        lambda cfg=cfg, rollout=rollout: ppo(cfg, True, rollout))  # fmt: skip
            n = N * 8
            v = torch.empty(n, dtype=dt, requires_grad=True, **meta)

            def vl():
                loss, _ = value_loss(v, v.detach(), v.detach(), torch.ones(n, **meta), backend="triton")
                loss.backward()

            run({"V": None, "N": n, "dtype": dtype, "op": "value_loss", "variant": ""}, vl)
            B, T = gae_shape
            r = torch.empty(B * T, dtype=dt, **meta)
            cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, **meta)
            run(
                {"V": None, "N": B * T, "dtype": dtype, "op": "gae", "variant": f"{B}x{T}"},
                lambda: gae(r, r, cu, backend="triton"),
            )
    return out


def discovered_kernels() -> dict[str, str]:
    """``{kernel name: module}`` for every ``@triton.jit`` function named ``*_kernel`` in fusedrl.kernels."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import fusedrl.kernels as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.fn.__module__ == mod.__name__:
                found[name] = info.name
    return found


# ----------------------------------------------------------------------------------------------------
# Compiling and reading the resources
# ----------------------------------------------------------------------------------------------------
class _Ptr:
    """A tensor argument as Triton's binder sees it: a dtype and a 16-byte aligned address (torch's CUDA
    allocations are 512-byte aligned)."""

    def __init__(self, dtype):
        self.dtype = dtype

    @staticmethod
    def data_ptr():
        return 0


def _specialise(kernel, args, kwargs, target):
    """Triton's own binder on the recorded arguments: (ASTSource, options) as the JIT would build them."""
    import torch
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    args = [_Ptr(a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options


_PTXAS_FUNC = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _parse_ptxas_log(log: str) -> dict | None:
    if not _PTXAS_FUNC.search(log):
        return None
    spill = _PTXAS_SPILL.search(log)
    regs = _PTXAS_REGS.search(log)
    return {"ptxas_regs": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(2)) if spill else None,
            "spill_load_bytes": int(spill.group(3)) if spill else None}  # fmt: skip


def _resource_usage(cubin: bytes, cuobjdump: str, tmp: Path) -> dict:
    path = tmp / "kernel.cubin"
    path.write_bytes(cubin)
    text = subprocess.run([cuobjdump, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    m = _RES.search(text)
    if not m:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    regs, stack, shared, local = map(int, m.groups())
    return {"regs": regs, "stack_bytes": stack, "static_shared_bytes": shared, "local_bytes": local}


_PTX_LABEL = re.compile(r"^\s*(\$L__\w+):")
_PTX_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+)\s*;")
_PTX_LOAD = re.compile(r"\bld\.global((?:\.[\w:]+)*)")


def _load_bits(qualifiers: str) -> int:
    """Bits one ``ld.global<qualifiers>`` moves: vector width x element bits (.v4.b32 -> 128, .b16 -> 16)."""
    vec, bits = 1, 0
    for q in qualifiers.split(".")[1:]:
        if m := re.fullmatch(r"v(\d+)", q):
            vec = int(m.group(1))
        elif m := re.fullmatch(r"[bsuf](\d+)", q):
            bits = int(m.group(1))
    return vec * bits


def widest_load(ptx: str) -> dict:
    """``{"loop_load", "loop_load_bits", "in_loop"}``: the widest global load inside the PTX's loops (a label with a
    branch back to it from below), or of the whole kernel when it has no loop."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _PTX_LABEL.match(line))}
    bodies = [(labels[m.group(1)], i) for i, line in enumerate(lines)
              if (m := _PTX_BRANCH.search(line)) and labels.get(m.group(1), len(lines)) < i]  # fmt: skip
    in_loop = bool(bodies)
    spans = bodies or [(0, len(lines))]
    best = ("", 0)
    for lo, hi in spans:
        for line in lines[lo:hi]:
            for m in _PTX_LOAD.finditer(line):
                bits = _load_bits(m.group(1))
                if bits > best[1]:
                    best = ("ld.global" + m.group(1), bits)
    return {"loop_load": best[0] or None, "loop_load_bits": best[1], "in_loop": in_loop}


def compile_launch(launch: dict, arch: int, tmp: Path) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    src, options = _specialise(launch["kernel"], launch["args"], launch["kwargs"], target)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # ptxas -v, printed by Triton (TRITON_DUMP_PTXAS_LOG)
        compiled = triton.compile(src, target=target, options=options.__dict__)
    res = _resource_usage(compiled.asm["cubin"], knobs.nvidia.cuobjdump.path, tmp)
    ptxas = _parse_ptxas_log(log.getvalue()) or {"ptxas_regs": None, "spill_store_bytes": None,
                                                  "spill_load_bytes": None}  # fmt: skip
    if ptxas["ptxas_regs"] is not None and ptxas["ptxas_regs"] != res["regs"]:
        raise RuntimeError(f"{compiled.name}: ptxas reports {ptxas['ptxas_regs']} registers, the cubin {res['regs']}")
    md = compiled.metadata
    shared = int(md.shared)  # Triton's dynamic shared memory (scratch for reductions / layout conversions)
    return {
        "regs": res["regs"],
        **{k: ptxas[k] for k in ("spill_store_bytes", "spill_load_bytes")},
        "stack_bytes": res["stack_bytes"],
        "local_bytes": res["local_bytes"],
        "shared_bytes": shared + res["static_shared_bytes"],
        "num_warps": int(md.num_warps),
        **occupancy(res["regs"], shared + res["static_shared_bytes"], int(md.num_warps), arch),
        **widest_load(compiled.asm["ptx"]),
    }


def meets_floor(r: dict) -> bool | None:
    """Whether a record is free of spills and stack, at or above its kernel's floor and (a streaming kernel) loads
    16-byte vectors in its main loop; None: no floor stated."""
    floor = FLOORS.get(r["kernel"])
    if floor is None:
        return None
    clean = r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0 and r["stack_bytes"] == 0
    vector = r["kernel"] not in STREAMING or r["loop_load_bits"] >= VECTOR_LOAD_BITS
    return clean and vector and r["occupancy"] >= floor


def _constexprs(launch: dict) -> dict:
    return {k: v for k, v in launch["kwargs"].items() if k.isupper()}


def static_table(archs=ARCHS, **scenario_kw) -> tuple[list[dict], dict[str, str]]:
    """One record per recorded launch and target; identical compilations (same kernel, signature, constexprs,
    warps, target) are compiled once."""
    from triton.backends.compiler import GPUTarget

    launches = scenarios(**scenario_kw)
    cache: dict = {}
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for la in launches:
                src, options = _specialise(la["kernel"], la["args"], la["kwargs"], GPUTarget("cuda", arch, 32))
                key = (arch, la["kernel"].__name__, repr(sorted(src.signature.items())), repr(src.constants),
                       repr(src.attrs), options.num_warps)  # fmt: skip
                if key not in cache:
                    cache[key] = compile_launch(la, arch, Path(tmp))
                grid = list(la["grid"]) if isinstance(la["grid"], (tuple, list)) else [la["grid"]]
                programs = math.prod(grid)
                records.append({"kernel": la["kernel"].__name__, "op": la["op"], "variant": la["variant"],
                                "dtype": la["dtype"], "V": la["V"], "N": la["N"], "arch": f"sm_{arch}",
                                "constexprs": _constexprs(la), "grid": grid, **cache[key],
                                "waves": programs / (cache[key]["blocks_per_sm"] * SM_COUNT[arch])})  # fmt: skip
                records[-1]["meets_floor"] = meets_floor(records[-1])
    return records, discovered_kernels()


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------
def _versions() -> dict:
    import torch
    import triton

    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                                         stderr=subprocess.DEVNULL).strip()  # fmt: skip
        # The table is of the working tree's kernels: say so when they differ from the commit.
        if subprocess.check_output(["git", "status", "--porcelain", "--", "kernels"], cwd=REPO, text=True).strip():
            commit += "+dirty kernels/"
    except Exception:
        commit = "unknown"
    import platform

    return {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "commit": commit,
    }


def _block(c: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in c.items() if k.startswith("BLOCK"))


def _flags(c: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in c.items() if not k.startswith("BLOCK"))


def _floor_text(kernel: str) -> str:
    f = FLOORS.get(kernel)
    return "none stated" if f is None else f"{f:.1%}".replace(".0%", "%")


def _load_text(r: dict) -> str:
    return f"{r['loop_load']} ({r['loop_load_bits']} bit)" if r["loop_load"] else "none"


def markdown(payload: dict) -> str:
    recs = payload["records"]
    by = {}
    for r in recs:  # one row per distinct compilation and dtype; the vocabularies it serves are listed
        k = (r["kernel"], _flags(r["constexprs"]), r["dtype"], _block(r["constexprs"]), r["num_warps"])
        by.setdefault(k, {"V": set(), "ops": set()})
        by[k].setdefault(r["arch"], r)
        if r["V"]:
            by[k]["V"].add(r["V"])
        by[k]["ops"].add(f"{r['op']} ({r['variant']})" if r["variant"] and r["op"] != "gae" else r["op"])
    lines = [f"# fusedrl static GPU checks: {payload['device']}, {payload['date']}", "",
             f"torch {payload['torch']}, triton {payload['triton']}, commit {payload['commit']}. Registers and "
             "spills from ptxas / cuobjdump of the AOT cubin, at the launchers' own BLOCK / num_warps for "
             f"V in {', '.join(map(str, VOCABS))} (N = {N_TOKENS}); occupancy by the formula in "
             "bench/gpu_static.py. Floor: the kernel's stated occupancy floor (tests/test_gpu_static.py says "
             "why), no spill, no stack.", "",
             "| kernel | constexprs | dtype | V | block | warps | regs sm_90 / sm_80 | spill+stack B | smem B | "
             "occupancy sm_90 / sm_80 | limiter | widest loop load sm_90 / sm_80 | floor | ok |",
             "|" + "---|" * 14]  # fmt: skip
    for (kernel, flags, dtype, block, warps), g in by.items():
        a, b = g.get("sm_90"), g.get("sm_80")
        both = [x for x in (a, b) if x]
        V = "all" if len(g["V"]) == len(VOCABS) else ",".join(map(str, sorted(g["V"]))) or "-"
        spill = max((x["spill_store_bytes"] or 0) + (x["spill_load_bytes"] or 0) + x["stack_bytes"] for x in both)
        lines.append(
            f"| {kernel} | {flags or '-'} | {dtype} | {V} | {block} | {warps} | "
            f"{' / '.join(str(x['regs']) for x in both)} | {spill} | {max(x['shared_bytes'] for x in both)} | "
            f"{' / '.join(format(x['occupancy'], '.0%') for x in both)} | "
            f"{' / '.join(x['limiter'] for x in both)} | "
            f"{' / '.join(_load_text(x) for x in both)} | "
            f"{_floor_text(kernel)} | "
            f"{'yes' if all(x['meets_floor'] for x in both) else 'NO'} |"
        )
    lines += ["", "## Bandwidth model: bytes each pass must move, and its time floor at the data-sheet peak", "",
              "| op | pass | shape | dtype | MB read | MB written | floor ms H100 (3.35 TB/s) | floor ms H200 (4.8 TB/s) |",
              "|" + "---|" * 8]  # fmt: skip
    for b in payload["bandwidth"]:  # the md keeps bf16 at the benchmark vocabularies; the JSON has every case
        if (
            b["dtype"] != "bfloat16"
            or not any(b["shape"].endswith(f"x{V}") for V in (128256, 151936, 2048))
            and b["op"] != "value_loss"
        ):
            continue
        lines.append(f"| {b['op']} | {b['pass']} | {b['shape']} | {b['dtype']} | {b['read'] / 1e6:.1f} | "
                     f"{b['write'] / 1e6:.1f} | {b['floor_ms_h100']:.4g} | {b['floor_ms_h200']:.4g} |")  # fmt: skip
    lines += ["", "Formulas: " + "; ".join(sorted({f"{b['op']} {b['pass']}: {b['formula']}" for b in
                                                   payload["bandwidth"] if b["pass"] != "full" and b["dtype"] == "bfloat16"}))]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    ap.add_argument("--archs", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 90,80")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        _prepare_env(cache)
        records, kernels = static_table(archs=tuple(int(a) for a in args.archs.split(",")))
    date = _dt.date.today().isoformat()
    payload = {"device": DEVICE, **_versions(), "date": date, "limits": {
        "regs_per_sm": REGS_PER_SM, "max_warps_per_sm": MAX_WARPS_PER_SM, "max_blocks_per_sm": MAX_BLOCKS_PER_SM,
        "reg_alloc_unit_per_warp": REG_UNIT, "smem_per_sm": {f"sm_{a}": v for a, v in SMEM_PER_SM.items()},
        "smem_reserved_per_block": SMEM_RESERVED_PER_BLOCK}, "occupancy_formula": __doc__.split("::")[1].strip(),
        "sm_count": {f"sm_{a}": v for a, v in SM_COUNT.items()}, "floors": FLOORS, "streaming": STREAMING,
        "vector_load_bits": VECTOR_LOAD_BITS, "peak_bw": PEAK_BW, "kernels": kernels,
        "records": records, "bandwidth": bandwidth_table()}  # fmt: skip
    sys.path.insert(0, str(REPO))
    from bench.common import write_report  # imports torch: only once the table is built

    write_report(args.out, f"gpu-static-{date}", payload, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
