"""bench/bench_policy_variants.py run as a user runs it (a subprocess), at a tiny shape: every variant and provider
comes back measured (Liger only where it has the setting), the providers agree with eager on loss and gradients
(which checks the benchmark's Liger mappings), and the ratios are the ones of the medians in the same file."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAPE = "B=3,T=8,H=16,V=97,dtype=float32"
TOP_LEVEL = ("device", "torch", "triton", "commit", "date", "versions", "shape", "rounds", "base_config", "records")
# The variants of issue 13's benchmark and the providers each is compared with.
VARIANTS = ["dapo", "gspo", "gspo-token", "cispo", "sapo", "delta", "tis", "mis-sequence", "kl-iw"]
PROVIDERS = ["fused", "eager", "liger"]
NO_LIGER = {"gspo-token"}  # Liger 0.8.5 has token and sequence importance sampling only
HAVE_LIGER = importlib.util.find_spec("liger_kernel") is not None


def _run(out, *extra):
    return subprocess.run([sys.executable, "bench/bench_policy_variants.py", "--shape", SHAPE, "--out", str(out),
                           *extra], cwd=REPO, capture_output=True, text=True, timeout=240)  # fmt: skip


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("policy_variants")
    proc = _run(out, "--rounds", "2", "--noise", "50")  # ~1 nat off-policy: every clip and rollout bound binds
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(out.iterdir())
    assert [f.suffix for f in files] == [".json", ".md"], files
    assert files[0].stem.startswith("policy-variants-cpu-"), files
    return json.loads(files[0].read_text()), files[1].read_text()


def test_every_variant_and_provider_is_measured(sweep):
    data, md = sweep
    for key in TOP_LEVEL:
        assert key in data, f"top-level key {key!r} missing; have {sorted(data)}"
    rows = {(r["variant"], r["provider"]): r for r in data["records"]}
    assert set(rows) == {(v, p) for v in VARIANTS for p in PROVIDERS}, sorted(rows)
    for (variant, provider), r in rows.items():
        expect_error = provider == "liger" and (variant in NO_LIGER or not HAVE_LIGER)
        assert ("error" in r) == expect_error, r
        if expect_error:
            continue
        assert r["rounds"] == 2 and 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"], r
        assert r["peak_mem_mb"] > 0, r  # the gradients alone are allocated during the call
        assert f"| {variant} | {provider} |" in md


def test_providers_agree_with_eager(sweep):
    """Loss and both gradients against eager's on the warm-up call: a wrong Liger mapping (normaliser, clip bound,
    rollout weight) or a wrong fused setting shows here."""
    data, _ = sweep
    for r in data["records"]:
        if "error" in r:
            continue
        assert r["loss_rel_err"] < 1e-5, r
        assert r["dh_rel_err"] < 1e-4 and r["dw_rel_err"] < 1e-4, r


def test_ratios_are_those_of_the_medians(sweep):
    data, _ = sweep
    rows = {(r["variant"], r["provider"]): r for r in data["records"] if "error" not in r}
    for (variant, provider), r in rows.items():
        if provider != "fused":
            assert not any(k.startswith("time_vs_") for k in r), r
            continue
        for other in ("eager", "liger"):
            base = rows.get((variant, other))
            assert (f"time_vs_{other}" in r) == (base is not None), r
            if base is not None:
                assert r[f"time_vs_{other}"] == pytest.approx(r["median_ms"] / base["median_ms"])
                assert r[f"mem_vs_{other}"] == pytest.approx(r["peak_mem_mb"] / base["peak_mem_mb"])


def test_unknown_variant_is_refused(tmp_path):
    proc = _run(tmp_path, "--variants", "dapo,ppo2")
    assert proc.returncode != 0 and "--variants" in proc.stderr and "ppo2" in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.iterdir())
