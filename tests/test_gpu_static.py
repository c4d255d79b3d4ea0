"""Static GPU checks on the CPU-only CI machine (issue 18): bench/gpu_static.py compiles every Triton kernel ahead of
time for sm_90 and sm_80 at the block sizes and warps its launcher picks for V = 32000 .. 262144 (fp32, bf16); no
kernel may spill or use a stack, and each must reach the occupancy floor stated below.

The floors, from what the table measures (Triton 3.9 here, 3.6 on the GPU machine; both were run):
- Vocabulary-streaming kernels (logprobs forward / backward, PPO forward): 50%. They are bandwidth-bound, and
  bandwidth needs bytes in flight: at 50% an SM holds 2 bf16 blocks of 16 warps (or 4 fp32 blocks of 8), i.e.
  2 x 8192 x 2 B = 32 KiB of tile loads, about an H200's bandwidth x latency per SM (4.8 TB/s x ~0.8 us / 132
  SMs = 29 KB). The measured minimum is exactly 50% (the bf16 PPO forward: 40-57 registers with 16 warps), and
  the cliff is one register step away: at 65+ registers a 16-warp block gets 1 block per SM, 25%. That is the
  regression this floor exists to catch (a kernel edit, a new vocab_block choice or a Triton upgrade).
- The value loss (elementwise, 8 elements per thread): 25%, half the measured 44-50%; its bytes are tiny.
- GAE: 12.5%, two resident blocks of 4 warps per SM, so that one block's loads overlap another's serial scan.
  One program scans one whole sequence (256 programs at the benchmark shape, about 2 per SM), so more resident
  blocks buy nothing until a batch has more sequences than that. Measured: 96-128 registers (25-31%) with
  Triton 3.9, 209-219 with Triton 3.6 after the NaN-safe masked sum (12.5%: at the floor). With 4 warps no
  register count up to ptxas's cap of 255 goes below 12.5%, so for GAE the check that bites is the spill check
  (3.6 is ~40 registers from it); the floor still catches a shared-memory blow-up or a change of warps.
A kernel with no floor here fails the test: a new kernel needs a stated floor and its reason.

Loads: the streaming kernels' main loop must read the logits with 16-byte vector loads (``ld.global.v4.b32``: 8 bf16
or 4 fp32 per thread and instruction), read from the PTX. A load mask the compiler cannot prove constant over
aligned groups of columns (a per-row bound such as ``cols < where(valid, V, 0)``) makes every element its own
predicated scalar ``ld.global.b16``: 1/8 of the bytes per instruction in bf16. Triton 3.9 here; Triton 3.6 (the GPU
machine's) gave the same loads when run by hand (bench/results/gpu-static-*-triton3.6.json).
"""

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
FLOORS = {"_logprobs_fwd_kernel": 0.5, "_logprobs_bwd_kernel": 0.5, "_ppo_fwd_kernel": 0.5,
          "_value_loss_fwd_kernel": 0.25, "_gae_fwd_kernel": 0.125}  # fmt: skip
VOCABS = (32000, 128256, 151936, 262144)
ARCHS = ("sm_90", "sm_80")
STREAMING = ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel", "_ppo_fwd_kernel")
SMEM = {"sm_90": 228 * 1024, "sm_80": 164 * 1024}


def _load_static():
    """bench/gpu_static.py as a module by its path; its top level imports the standard library only."""
    spec = importlib.util.spec_from_file_location("gpu_static", REPO / "bench" / "gpu_static.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_static")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "bench/gpu_static.py", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("this triton build ships no ptxas")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (js,) = out.glob("gpu-static-*.json")
    return json.loads(js.read_text()), js.with_suffix(".md").read_text()


def occupancy(regs, shared, warps, arch):
    """The occupancy calculator's rule, written again here so that a slip in the script's copy shows."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (65536 // per_warp) // warps
    by_smem = SMEM[arch] // (-(-shared // 128) * 128 + 1024) if shared else 32
    return min(by_regs, by_smem, 64 // warps, 32) * warps / 64, min(by_regs, by_smem, 64 // warps, 32)


def violations(data) -> list[str]:
    bad = []
    for r in data["records"]:
        where = f"{r['kernel']} {r['arch']} {r['dtype']} V={r['V']} {r['constexprs']} warps={r['num_warps']}"
        if r["spill_store_bytes"] != 0 or r["spill_load_bytes"] != 0 or r["stack_bytes"] != 0:
            bad.append(
                f"{where}: spills {r['spill_store_bytes']}/{r['spill_load_bytes']} B, stack {r['stack_bytes']} B"
            )
        occ, blocks = occupancy(r["regs"], r["shared_bytes"], r["num_warps"], r["arch"])
        if occ != pytest.approx(r["occupancy"]):
            bad.append(f"{where}: the script says occupancy {r['occupancy']}, the formula {occ}")
        if r["kernel"] in STREAMING and r["loop_load_bits"] < 128:
            bad.append(f"{where}: the main loop loads the logits with {r['loop_load']} ({r['loop_load_bits']} bits), "
                       "not 16-byte vectors")  # fmt: skip
        floor = FLOORS.get(r["kernel"])
        if floor is None:
            bad.append(f"{where}: no occupancy floor stated for this kernel in tests/test_gpu_static.py")
        elif occ < floor:
            bad.append(
                f"{where}: occupancy {occ:.1%} < floor {floor:.1%} ({r['regs']} registers, "
                f"{r['shared_bytes']} B smem, {blocks} blocks per SM)"
            )
    return bad


def test_no_spill_and_occupancy_at_least_the_floor(table):
    data, _ = table
    assert data["floors"] == FLOORS, "bench/gpu_static.py and this test must state the same floors"
    bad = violations(data)
    assert not bad, "\n".join(bad)


def test_the_check_catches_a_spill_and_an_occupancy_cliff(table):
    data = copy.deepcopy(table[0])
    spilled = next(r for r in data["records"] if r["kernel"] == "_logprobs_bwd_kernel")
    spilled["spill_store_bytes"] = 8
    cliff = next(r for r in data["records"] if r["kernel"] == "_ppo_fwd_kernel" and r["num_warps"] == 16)
    cliff["regs"] = 65  # one register step above 64 with 16 warps: 1 block per SM
    cliff["occupancy"] = 0.25
    gae = next(r for r in data["records"] if r["kernel"] == "_gae_fwd_kernel")
    gae["shared_bytes"], gae["occupancy"] = 120 * 1024, 0.0625  # 1 block per SM on either target
    scalar = next(r for r in data["records"] if r["kernel"] == "_logprobs_fwd_kernel" and r["dtype"] == "bfloat16")
    scalar["loop_load"], scalar["loop_load_bits"] = "ld.global.b16", 16
    bad = violations(data)
    assert len(bad) == 4 and any("spills 8" in b for b in bad), bad
    assert any("ld.global.b16 (16 bits), not 16-byte vectors" in b for b in bad), bad
    assert any("occupancy 25.0% < floor 50.0%" in b for b in bad), bad
    assert any("occupancy 6.2% < floor 12.5%" in b for b in bad), bad


def test_every_kernel_compiled_for_both_targets_at_every_vocabulary(table):
    data, _ = table
    kernels = set(data["kernels"])
    assert {"_logprobs_fwd_kernel", "_logprobs_bwd_kernel", "_ppo_fwd_kernel", "_value_loss_fwd_kernel",
            "_gae_fwd_kernel"} <= kernels, kernels  # fmt: skip
    for arch in ARCHS:
        have = {r["kernel"] for r in data["records"] if r["arch"] == arch}
        assert have == kernels, f"{arch}: compiled {sorted(have)}, discovered {sorted(kernels)}"
        for op in ("logprobs", "ppo_loss"):
            for dtype in ("float32", "bfloat16"):
                vs = {r["V"] for r in data["records"] if (r["arch"], r["op"], r["dtype"]) == (arch, op, dtype)}
                assert vs == set(VOCABS), (arch, op, dtype, vs)
    for r in data["records"]:
        assert r["regs"] > 0 and r["num_warps"] > 0 and r["blocks_per_sm"] >= 1, r


def test_launch_configs_are_vocab_blocks_choice(table):
    """The table is about the configuration the launchers really pick on CUDA, not a hand-written one."""
    from fusedrl.kernels._utils import vocab_block

    data, _ = table
    cuda = torch.device("cuda")
    checked = 0
    for r in data["records"]:
        if "BLOCK_V" in r["constexprs"]:
            want = vocab_block(r["V"], getattr(torch, r["dtype"]), cuda)
            assert (r["constexprs"]["BLOCK_V"], r["num_warps"]) == tuple(want), r
            assert math.prod(r["grid"]) * r["constexprs"].get("BLOCK_M", 1) >= r["N"], r
            checked += 1
    assert checked >= 2 * 2 * len(VOCABS) * 3, checked


def test_bandwidth_model():
    gs = _load_static()
    N, V = 8192, 128256
    fwd = gs.pass_bytes("logprobs", "fwd", f"{N}x{V}", "bfloat16")
    assert fwd["read"] == N * V * 2 + 8 * N and fwd["write"] == 3 * 4 * N
    ent = gs.pass_bytes("logprobs", "fwd", f"{N}x{V}", "bfloat16", entropy=True)
    assert ent["write"] == fwd["write"] + 4 * N
    bwd = gs.pass_bytes("ppo_loss", "bwd", f"{N}x{V}", "float32")
    assert bwd["write"] == N * V * 4 and bwd["read"] > N * V * 4
    full = gs.pass_bytes("ppo_loss", "full", f"{N}x{V}", "float32")
    assert full["bytes"] == bwd["bytes"] + gs.pass_bytes("ppo_loss", "fwd", f"{N}x{V}", "float32")["bytes"]
    assert gs.pass_bytes("gae", "fwd", "256x2048 ragged", "float32")["write"] == 2 * 4 * 256 * 2048
    with pytest.raises(ValueError, match="no model"):
        gs.pass_bytes("logprobs", "step", f"{N}x{V}", "bfloat16")
    # The ratio of bytes to the logits is what makes a fraction of the floor meaningful: ~1 read, ~1 write.
    assert 2.99 < full["bytes"] / (N * V * 4) < 3.01


def test_json_and_markdown(table):
    data, md = table
    assert data["device"] == "none (static, sm_90/sm_80 AOT)"
    for k in ("torch", "triton", "commit", "date", "occupancy_formula", "limits", "bandwidth", "peak_bw"):
        assert data.get(k), k
    assert "| kernel | constexprs |" in md and "## Bandwidth model" in md and "NO |" not in md
    row = next(b for b in data["bandwidth"] if (b["op"], b["pass"], b["dtype"]) == ("logprobs", "fwd", "bfloat16")
               and b["shape"] == "8192x151936")  # fmt: skip
    assert row["floor_ms_h200"] == pytest.approx(row["bytes"] / 4.8e12 * 1e3)


def test_streaming_kernels_load_16_byte_vectors(table):
    """Every streaming kernel, dtype, vocabulary and target: a 128-bit global load in the main loop (the table's
    reading of the PTX); the other kernels' widest loads are in the table too."""
    data, md = table
    assert tuple(data["streaming"]) == STREAMING and data["vector_load_bits"] == 128
    seen = set()
    for r in data["records"]:
        assert r["loop_load_bits"] > 0 and r["loop_load"].startswith("ld.global"), r
        if r["kernel"] in STREAMING:
            assert r["in_loop"] and r["loop_load_bits"] >= 128, r
            seen.add((r["kernel"], r["dtype"], r["arch"]))
    assert len(seen) == len(STREAMING) * 2 * len(ARCHS), seen
    assert "widest loop load" in md and "ld.global.v4.b32 (128 bit)" in md


def test_widest_load_reads_the_loop_of_the_ptx():
    gs = _load_static()
    ptx = """
    ld.global.b64 %rd1, [%rd0];
    $L__BB0_1:
    @%p1 ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
    @%p2 ld.global.L1::evict_last.v2.b32 { %r1, %r2 }, [ %rd3 + 0 ];
    @%p3 bra $L__BB0_1;
    ld.global.v4.b32 { %r3, %r4, %r5, %r6 }, [ %rd4 + 0 ];
    """
    assert gs.widest_load(ptx) == {"loop_load": "ld.global.L1::evict_last.v2.b32", "loop_load_bits": 64,
                                   "in_loop": True}  # fmt: skip
    no_loop = ptx.replace("bra $L__BB0_1", "bra $L__BB0_9")
    assert gs.widest_load(no_loop) == {"loop_load": "ld.global.v4.b32", "loop_load_bits": 128, "in_loop": False}
