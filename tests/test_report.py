"""``fusedrl report``: the plots of a real (tiny) run and of two runs overlaid, the self-contained page opened in
headless Chromium (every image decodes, the console stays silent), and one-line errors for bad input."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from fusedrl.engine import cli
from fusedrl.engine.metrics import read_metrics
from fusedrl.engine.report import group_metrics

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# What a GRPO run on the hf backend writes, by plot; rollout mismatch needs an engine's own log-probs.
EXPECTED_PLOTS = {"reward", "kl", "entropy", "clipping", "length", "advantages", "losses", "throughput",
                  "phase_times", "memory"}  # fmt: skip


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _report(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fusedrl.engine.cli", "report", *map(str, args)], capture_output=True,
                          text=True, env=_env(), cwd=cwd, timeout=300, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 3-step GRPO run of the tiny preset that logs its completions at every step."""
    tmp = tmp_path_factory.mktemp("report")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hi", "ok", "<b>&", "go:"]))
    out = tmp / "grpo"
    cmd = [
        sys.executable, "-m", "fusedrl.engine.cli", "train", "--prompts", str(prompts), "--reward-fn", "count_token",
        "--advantage-estimator", "grpo", "--prompts-per-step", "2", "--samples-per-prompt", "4",
        "--max-new-tokens", "6", "--total-steps", "3", "--learning-rate", "1e-2", "--threads", "1", "--no-progress",
        "--log-completions", "1", "--output-dir", str(out),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def report_dir(run_dir):
    """``fusedrl report`` of the run and of a copy of it with other rewards (a second curve on the same axes)."""
    other = run_dir.parent / "other"
    other.mkdir()
    rows = read_metrics(run_dir / "metrics.jsonl")
    for r in rows:
        r["rollout/reward_mean"] += 1.0
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = _report(run_dir, other, "--out", run_dir.parent / "cmp")
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir.parent / "cmp"


@pytest.mark.slow
def test_report_of_two_runs_writes_every_plot_and_a_self_contained_page(run_dir, report_dir):
    pngs = {p.stem for p in report_dir.glob("*.png")}
    assert pngs == EXPECTED_PLOTS, pngs  # only plots whose metrics exist: no rollout mismatch, no "other"
    page = (report_dir / "report.html").read_text()
    # Every PNG is in the page, as bytes, and the page reaches for nothing outside itself.
    embedded = [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]
    assert sorted(embedded) == sorted((report_dir / f"{n}.png").read_bytes() for n in pngs)
    assert not re.search(r"(src|href)=\"(?!data:|#)", page) and "<script" not in page
    assert "</span> grpo</td>" in page and "</span> other</td>" in page
    # The completions table of the last step, its text escaped.
    last = [c for c in read_metrics(run_dir / "completions.jsonl") if c["step"] == 3]
    assert len(last) == 8 and "<h3>grpo: step 3</h3>" in page
    for c in last:
        assert f'<td class="text">{html.escape(c["prompt"])}</td>' in page
    assert "&lt;b&gt;&amp;" in page and "<b>&" not in page.split('id="completions"')[1]
    # One run alone: the default output directory is inside it.
    r = _report(run_dir)
    assert r.returncode == 0 and (run_dir / "report" / "report.html").is_file(), r.stderr[-2000:]


@pytest.mark.slow
def test_report_page_renders_in_headless_chromium(report_dir, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    page = (report_dir / "report.html").read_text()
    n_plots = len(list(report_dir.glob("*.png")))
    result = _open_in_chromium(page, tmp_path / "probe.html", tmp_path)
    assert result["console"] == [] and result["errors"] == [], result
    assert len(result["images"]) == n_plots == len(EXPECTED_PLOTS)
    for img in result["images"]:
        assert img["complete"] and img["w"] > 0 and img["shown"] > 100, img  # decoded and laid out
    # The same check on a page with a broken image and a console error must see both.
    broken = page.replace("<h1>", '<script>console.error("boom")</script><img src="data:image/png;base64,AAAA" '
                          'alt="broken"><h1>', 1)  # fmt: skip
    result = _open_in_chromium(broken, tmp_path / "broken.html", tmp_path)
    assert any("boom" in line for line in result["console"]) and "boom" in result["errors"]
    assert [i["alt"] for i in result["images"] if i["w"] == 0] == ["broken"]


# Injected into a copy of the page: records errors and console.error calls from the start, and at load each image's
# state, into an attribute of <body> that --dump-dom prints.
_PROBE_HEAD = ('<script>window.__errors=[];window.addEventListener("error",function(e){__errors.push(String('
               'e.message||(e.target&&e.target.src)||e))},true);var __ce=console.error;console.error=function(){'
               '__errors.push(Array.prototype.join.call(arguments," "));__ce.apply(console,arguments)};</script>')  # fmt: skip
_PROBE_TAIL = ('<script>window.addEventListener("load",function(){var r=Array.prototype.map.call(document.images,'
               'function(i){return {alt:i.alt,complete:i.complete,w:i.naturalWidth,shown:i.getBoundingClientRect()'
               '.width}});document.body.setAttribute("data-probe",JSON.stringify({images:r,errors:window.__errors}))'
               '});</script>')  # fmt: skip


def _open_in_chromium(page: str, path, tmp_path) -> dict:

    path.write_text(page.replace("<head>", "<head>" + _PROBE_HEAD, 1).replace("</body>", _PROBE_TAIL + "</body>", 1))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=10000", "--dump-dom", path.as_uri()]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r'data-probe="([^"]*)"', r.stdout)
    assert m, "the page's load event never ran: " + r.stdout[:500]
    probe = json.loads(html.unescape(m.group(1)))
    # Console messages reach Chromium's log as ":CONSOLE" lines; the probe logs nothing itself.
    probe["console"] = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
    return probe


def test_bad_input_is_one_line(tmp_path):
    good = json.dumps({"step": 1, "loss": 0.5})
    cases = []
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "metrics.jsonl").write_text(good + "\n{not json\n" + json.dumps({"step": 2}) + "\n")
    cases.append((tmp_path / "corrupt", r"metrics file '.*corrupt/metrics.jsonl': line 2 is not a JSON object"))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", r"'.*empty' is not a run directory \(no metrics.jsonl in it\)"))
    cases.append((tmp_path / "missing", r"'.*missing' does not exist"))
    (tmp_path / "nostep").mkdir()
    (tmp_path / "nostep" / "metrics.jsonl").write_text(good + "\n" + json.dumps({"loss": 1.0}) + "\n")
    cases.append((tmp_path / "nostep", r"JSON row 2 has no integer 'step' \(got None\)"))
    (tmp_path / "badcomp").mkdir()
    (tmp_path / "badcomp" / "metrics.jsonl").write_text(good + "\n")
    (tmp_path / "badcomp" / "completions.jsonl").write_text("[1]\n" + good + "\n")
    cases.append((tmp_path / "badcomp", r"completions.jsonl': line 1 is not a JSON object"))
    for run, match in cases:  # in-process: SystemExit carries the one line the command prints
        with pytest.raises(SystemExit) as e:
            cli.main(["report", str(run), "--out", str(tmp_path / "out")])
        err = str(e.value.code)
        assert "\n" not in err and err.startswith("fusedrl report: ") and re.search(match, err), (match, err)
    # A torn last line (a crash mid-write) is dropped, and the page says so.
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "metrics.jsonl").write_text(good + '\n{"step": 2, "lo')
    assert cli.main(["report", str(tmp_path / "torn"), "--out", str(tmp_path / "torn-report")]) == 0
    assert "dropping its torn last line 2" in (tmp_path / "torn-report" / "report.html").read_text()
    assert {p.stem for p in (tmp_path / "torn-report").glob("*.png")} == {"losses"}


def test_metrics_go_to_the_first_plot_that_matches():
    keys = ["rollout/reward_mean", "rollout/reward/math_answer", "objective/kl", "policy/clipfrac_low",
            "value/clipfrac", "value/explained_variance", "value/grad_norm", "perf/rollout_s", "perf/tokens_per_s",
            "perf/peak_mem_update_gb", "rollout/logp_mismatch_k3", "rollout/staleness_mean", "epoch", "loss"]  # fmt: skip
    groups = {name: ks for name, _, ks in group_metrics(keys)}
    assert groups == {
        "reward": ["rollout/reward_mean", "rollout/reward/math_answer"], "kl": ["objective/kl"],
        "clipping": ["policy/clipfrac_low", "value/clipfrac"], "advantages": ["value/explained_variance"],
        "losses": ["value/grad_norm", "loss"], "throughput": ["perf/tokens_per_s"], "phase_times": ["perf/rollout_s"],
        "memory": ["perf/peak_mem_update_gb"], "rollout": ["rollout/logp_mismatch_k3", "rollout/staleness_mean"],
        "other": ["epoch"],
    }  # fmt: skip
