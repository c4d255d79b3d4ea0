"""The kernel tests as a CUDA machine runs them: Triton compiles for the GPU there, so its interpreter is off
(TRITON_INTERPRET=0), and a test that runs a Triton kernel on CPU tensors must be reported skipped, not failed.
Here the tests that pass backend="triton" with CPU tensors by hand (not through a parametrised backend) run in a
subprocess with the interpreter switched off."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Tests that launch a Triton kernel on CPU tensors without a backend="triton" parameter.
HAND_PICKED = [
    "tests/test_ppo_loss.py::test_estimators_and_aggregations_match_float64",
    "tests/test_ppo_loss.py::test_rows_per_program",
    "tests/test_ppo_loss.py::test_new_clip_coefficients_and_temperature_do_not_recompile",
    "tests/test_logprobs.py::test_validation_switch_skips_range_check",
    "tests/test_gae.py::test_value_checks_can_be_switched_off",
    "tests/test_linear_ppo_loss.py::test_default_chunking_and_frozen_weight",
]


def test_triton_on_cpu_tensors_skips_with_the_interpreter_off(tmp_path):
    report = tmp_path / "report.xml"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    # The tests that also run a torch backend first get to it before they skip; keep the whole run short.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "-o", "addopts=", f"--junitxml={report}", *HAND_PICKED],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    cases = ET.parse(report).getroot().iter("testcase")
    outcome = {}
    for case in cases:
        kind = next((child.tag for child in case if child.tag in ("skipped", "failure", "error")), "passed")
        message = next((child.get("message", "") for child in case if child.tag == "skipped"), "")
        outcome[f"{case.get('classname')}::{case.get('name')}"] = (kind, message)
    for test in HAND_PICKED:
        mine = {k: v for k, v in outcome.items() if k.split("::")[1].split("[")[0] == test.split("::")[1]}
        assert mine, f"{test} did not run: {sorted(outcome)}"
        for name, (kind, message) in mine.items():
            assert kind == "skipped" and "TRITON_INTERPRET=1" in message, (name, kind, message)
