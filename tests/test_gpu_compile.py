"""Every Triton kernel compiles ahead of time for an H100 (sm_90) on this machine, GPU or not: Triton's
compiler and ptxas ship in its wheel. CI has no GPU; this catches code that only the interpreter accepts
(the interpreter runs Python, the GPU compiler needs typed, statically shaped Triton code)."""

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import inspect, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import fusedrl.kernels  # noqa: F401
    mods = {n: sys.modules["fusedrl.kernels." + n] for n in ("logprobs", "ppo_loss", "value_loss", "gae")}
    F32 = ("inv_temp", "clip_low", "clip_high", "dual_clip", "clip_delta", "log_ratio_clip", "sapo_tau_pos", "sapo_tau_neg", "kl_clamp", "kl_coef", "entropy_coef", "clip", "gamma", "lam")
    CASES = [  # (module, kernel, argument types where the defaults below are wrong, constexprs)
        ("logprobs", "_logprobs_fwd_kernel", {"X": "*bf16", "LABELS": "*i64"}, {"RETURN_ENTROPY": True, "BLOCK_M": 1, "BLOCK_V": 8192}),
        ("logprobs", "_logprobs_bwd_kernel", {"X": "*bf16", "DX": "*bf16", "LABELS": "*i64"}, {"HAS_DENT": True, "BLOCK_M": 1, "BLOCK_V": 8192}),
        ("ppo_loss", "_ppo_fwd_kernel", {"X": "*bf16", "LABELS": "*i64"}, {"KL_MODE": 3, "KL_IW": True, "POLICY": 0, "HAS_IS": True, "BLOCK_M": 1, "BLOCK_V": 8192}),
        ("ppo_loss", "_ppo_fwd_kernel", {"X": "*fp32", "LABELS": "*i64"}, {"KL_MODE": 4, "KL_IW": False, "POLICY": 1, "HAS_IS": False, "BLOCK_M": 1, "BLOCK_V": 4096}),
        ("ppo_loss", "_ppo_fwd_kernel", {"X": "*bf16", "LABELS": "*i64"}, {"KL_MODE": 5, "KL_IW": False, "POLICY": 2, "HAS_IS": True, "BLOCK_M": 1, "BLOCK_V": 8192}),
        ("value_loss", "_value_loss_fwd_kernel", {"VALUES": "*bf16", "OLD": "*bf16", "RETURNS": "*fp32"}, {"BLOCK": 1024}),
        ("gae", "_gae_fwd_kernel", {"R": "*bf16", "V": "*fp32", "CU": "*i32", "N": "i64"}, {"BLOCK_T": 64}),
    ]
    for mod, name, ptrs, consts in CASES:
        k = getattr(mods[mod], name)
        params = list(inspect.signature(k.fn).parameters)
        sig = {}
        for p in params:
            if p in consts:
                sig[p] = "constexpr"
            elif p in ptrs:
                sig[p] = ptrs[p]
            elif p.isupper() and p not in ("V", "N"):  # other upper-case arguments: float32 buffers
                sig[p] = "*fp32"
            else:
                sig[p] = "fp32" if p in F32 else "i64"
        src = ASTSource(fn=k, signature=sig, constexprs={(params.index(c),): v for c, v in consts.items()})
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        assert out.asm.get("cubin"), name
        print("compiled", name)
    """
)


def test_kernels_compile_for_sm90(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=600)  # fmt: skip
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("this triton build ships no ptxas")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("compiled") == 7, out.stdout
