"""The installed package exposes only the fusedrl namespace: kernels/ and engine/ never leak as top-level
packages (transformers probes for a package named `kernels`)."""

import subprocess
import sys


def _run(code: str, cwd: str):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_fusedrl_namespace_imports(tmp_path):
    out = _run(
        "import fusedrl, fusedrl.kernels, fusedrl.engine, fusedrl.engine._rollout, fusedrl.kernels._cpu_rows\n"
        "import fusedrl.integrations\n"
        "print(fusedrl.__version__)",
        cwd=str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == fusedrl_version()


def fusedrl_version():
    import fusedrl

    return fusedrl.__version__


def test_no_top_level_kernels_or_engine(tmp_path):
    import pathlib

    repo = str(pathlib.Path(__file__).resolve().parents[1])
    for name in ("kernels", "engine"):
        # Another distribution may legitimately own the name (HF's `kernels`); ours must not.
        code = (
            f"import importlib.util, sys; s = importlib.util.find_spec({name!r}); "
            f"sys.exit(3 if s is not None and (s.origin or '').startswith({repo!r}) else 0)"
        )
        out = _run(code, cwd=str(tmp_path))
        assert out.returncode == 0, f"a top-level `{name}` package from this repo is importable: {out.stderr}"
