"""prepare_run_dir: a fresh run never mixes into an old one, --overwrite removes only the old run's files,
and a --resume with nothing to resume starts the run over (idempotent: the same command after every preemption)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fusedrl.engine import checkpoint as ckpt


def _tree(root: Path) -> dict:
    """Every path under root with its bytes (None for directories): what "left exactly as it was" compares."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _old_run(out: Path) -> None:
    """What a training run leaves in its output directory, as the trainer and the CLI write it."""
    for step in (2, 4):
        ckpt.save_checkpoint(out, step, {"step": step, "policy": {"w": torch.randn(3)}})
    (out / "ckpt-6").mkdir()  # a checkpoint directory that never got its meta.json
    (out / ".tmp-ckpt-8-abc").mkdir()  # a crashed save's leftovers
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "config.yaml").write_text("seed: 0\n")
    for d in ("policy", "critic", "tensorboard"):
        (out / d).mkdir()
        (out / d / "model.safetensors").write_bytes(b"weights")


def _not_a_run(out: Path, outside: Path) -> None:
    """Files of the user's that happen to share the directory: never touched."""
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    (out / "data" / "prompts.jsonl").write_text('{"prompt": "x"}\n')
    (out / "ckpt-old-backup").mkdir()  # looks like a checkpoint name, is not one
    outside.mkdir()
    (outside / "keep.bin").write_bytes(b"elsewhere")


def test_fresh_run_into_new_or_unrelated_directory(tmp_path):
    out = tmp_path / "a" / "b"
    assert ckpt.prepare_run_dir(out, resume=False, overwrite=False) is None
    assert out.is_dir() and not any(out.iterdir())
    # Idempotent while nothing was written: a caller may check early and the trainer again.
    assert ckpt.prepare_run_dir(out, resume=False) is None
    _not_a_run(out, tmp_path / "outside")
    before = _tree(out)
    assert ckpt.prepare_run_dir(out, resume=False) is None
    assert _tree(out) == before


@pytest.mark.parametrize("marker", ["ckpt-3", "latest", "metrics.jsonl", "config.yaml", "policy", "critic",
                                    "tensorboard", ".tmp-ckpt-1-x"])  # fmt: skip
def test_fresh_run_into_a_run_is_refused_and_changes_nothing(tmp_path, marker):
    out = tmp_path / "run"
    out.mkdir()
    if marker in ("latest", "metrics.jsonl", "config.yaml"):
        (out / marker).write_text("x")
    else:
        (out / marker).mkdir()
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    with pytest.raises(FileExistsError, match=rf"'{out}' already holds a run \({marker}\): pass --resume to "
                                              r"continue it or --overwrite to start over"):  # fmt: skip
        ckpt.prepare_run_dir(out, resume=False, overwrite=False)
    assert _tree(out) == before


def test_overwrite_removes_only_the_old_runs_files(tmp_path):
    out = tmp_path / "run"
    _old_run(out)
    _not_a_run(out, tmp_path / "outside")
    (out / "metrics.jsonl.tmp").write_text("")
    with pytest.raises(FileExistsError, match=r"already holds a run \(.tmp-ckpt-8-abc, ckpt-2, ckpt-4, ckpt-6, "
                                              r"config.yaml, critic, ...\)"):  # fmt: skip
        ckpt.prepare_run_dir(out, resume=False)
    user_files = {k: v for k, v in _tree(out).items() if k.split("/")[0] in ("notes.txt", "data", "ckpt-old-backup")}
    assert ckpt.prepare_run_dir(out, resume=False, overwrite=True) is None
    assert _tree(out) == user_files
    assert ckpt.find_latest(out) is None and ckpt.run_files(out) == []


def test_extra_files_of_a_caller_count_as_the_run(tmp_path):
    # The demo's own outputs beside its trainer's: part of the run, refused and removed the same way.
    out = tmp_path / "demo"
    out.mkdir()
    (out / "stages.json").write_text("{}")
    (out / "sft").mkdir()
    (out / "notes.txt").write_text("mine")
    extra = ("stages.json", "sft", "ppo")
    assert ckpt.prepare_run_dir(out, resume=False) is None  # not a training run's files: no objection
    with pytest.raises(FileExistsError, match=r"already holds a run \(sft, stages.json\)"):
        ckpt.prepare_run_dir(out, resume=False, extra_files=extra)
    ckpt.prepare_run_dir(out, resume=False, overwrite=True, extra_files=extra)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_overwrite_never_follows_a_symlink(tmp_path):
    out, outside = tmp_path / "run", tmp_path / "outside"
    _old_run(out)
    _not_a_run(out, outside)
    (out / "policy").rename(tmp_path / "gone")
    (out / "policy").symlink_to(outside, target_is_directory=True)
    ckpt.prepare_run_dir(out, resume=False, overwrite=True)
    assert not (out / "policy").exists() and (outside / "keep.bin").read_bytes() == b"elsewhere"


def test_resume_with_nothing_to_resume_starts_over(tmp_path):
    """The same --resume command that a scheduler repeats after a preemption: with no intact checkpoint the run
    starts from step 0 (a warning), the earlier attempt's files removed, the user's files kept; idempotent."""
    missing = tmp_path / "missing"
    with pytest.warns(RuntimeWarning, match=r"nothing to resume, output directory '.*missing' does not exist: "
                                            r"starting from step 0"):  # fmt: skip
        assert ckpt.prepare_run_dir(missing, resume=True) is None
    assert missing.is_dir() and not any(missing.iterdir())
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # a run killed before its first checkpoint
    (out / "config.yaml").write_text("seed: 0\n")
    (out / "ckpt-6").mkdir()  # incomplete: not a checkpoint
    (out / ".tmp-ckpt-2-abc").mkdir()  # the save the kill cut short
    _not_a_run(out, tmp_path / "outside")
    user_files = {k: v for k, v in _tree(out).items() if k.split("/")[0] in ("notes.txt", "data", "ckpt-old-backup")}
    with pytest.warns(RuntimeWarning, match="holds no complete checkpoint: starting from step 0; removing the "
                                            "earlier attempt's ckpt-6, config.yaml, metrics.jsonl"):  # fmt: skip
        assert ckpt.prepare_run_dir(out, resume=True, overwrite=False) is None
    assert _tree(out) == user_files
    with pytest.warns(RuntimeWarning, match="starting from step 0$"):
        assert ckpt.prepare_run_dir(out, resume=True) is None
    assert _tree(out) == user_files


def test_resume_returns_the_newest_intact_checkpoint(tmp_path):
    out = tmp_path / "run"
    _old_run(out)
    _not_a_run(out, tmp_path / "outside")
    before = _tree(out)
    assert ckpt.prepare_run_dir(out, resume=True) == out / "ckpt-4"
    # Only the crashed save's leftovers are gone.
    assert _tree(out) == {k: v for k, v in before.items() if not k.startswith(".tmp-ckpt-")}
    (out / "ckpt-4" / "state.pt").write_bytes(b"")
    with pytest.warns(UserWarning, match="ckpt-4/state.pt' is 0 bytes"):
        assert ckpt.prepare_run_dir(out, resume=True) == out / "ckpt-2"
    (out / "ckpt-2" / "state.pt").write_bytes(b"")
    with (
        pytest.warns(UserWarning, match="skipping a damaged checkpoint"),
        pytest.warns(RuntimeWarning, match="none is intact .*: starting from step 0"),
    ):
        assert ckpt.prepare_run_dir(out, resume=True) is None
    assert ckpt.run_files(out) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="exclude each other"):
        ckpt.prepare_run_dir(tmp_path, resume=True, overwrite=True)
    with pytest.raises(TypeError, match="resume and overwrite must be bools, got resume='yes'"):
        ckpt.prepare_run_dir(tmp_path, resume="yes")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        ckpt.prepare_run_dir(tmp_path / "file", resume=False, overwrite=True)
    assert (tmp_path / "file").read_text() == "x"
