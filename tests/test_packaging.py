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
    """Outside the repository neither name resolves to its folders (from the root: tests/test_launch.py)."""
    import pathlib

    repo = pathlib.Path(__file__).resolve().parents[1]
    for name in ("kernels", "engine"):
        # Another distribution may legitimately own the name (HF's `kernels`); ours must not.
        code = (
            f"import importlib.util; s = importlib.util.find_spec({name!r}); "
            "print(s.origin if s else None, *(s.submodule_search_locations or []) if s else [])"
        )
        out = _run(code, cwd=str(tmp_path))
        assert out.returncode == 0, out.stderr[-2000:]
        for where in out.stdout.split():
            assert not where.startswith(str(repo / name)), f"top-level `{name}` resolves to this repository: {where}"


def test_engine_modules_stay_readable():
    """The trainer reads top to bottom like a recipe: at most 450 lines, and no engine module above 500."""
    import pathlib

    engine = pathlib.Path(__file__).resolve().parents[1] / "engine"
    sizes = {p.name: len(p.read_text().splitlines()) for p in engine.glob("*.py")}
    assert sizes["trainer.py"] <= 450, sizes["trainer.py"]
    assert max(sizes.values()) <= 500, {k: v for k, v in sizes.items() if v > 500}
