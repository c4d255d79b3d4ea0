"""Atomic training checkpoints: ``<out>/ckpt-<step>/`` directories and a ``latest`` pointer file.

A checkpoint is written into a hidden temporary directory in the same folder, flushed to disk, then
renamed to ``ckpt-<step>`` in one ``os.rename``; only then is ``latest`` replaced (temp file +
``os.replace``). A crash at any point leaves either the previous checkpoint or the new one as the
latest complete one, never a half-written directory: ``find_latest`` trusts a directory only when its
``meta.json`` (written last, inside the temporary directory) is present.

Everything in ``state.pt`` is plain tensors, numbers and strings, so it loads with
``torch.load(weights_only=True)``: resuming never unpickles arbitrary objects.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

PREFIX = "ckpt-"
LATEST = "latest"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
_TMP_PREFIX = ".tmp-ckpt-"
_CKPT_RE = re.compile(rf"^{PREFIX}(\d+)$")


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not supported on every platform/filesystem, harmless there.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _is_complete(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / STATE_FILE).is_file()


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / f"{PREFIX}{int(step)}"


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``out_dir`` as ``(step, path)``, oldest first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and _is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` points to, or the newest complete one if the pointer is missing or stale."""
    out = Path(out_dir)
    pointer = out / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        cand = out / name
        if _CKPT_RE.match(name) and cand.is_dir() and _is_complete(cand):
            return cand
    ckpts = list_checkpoints(out)
    return ckpts[-1][1] if ckpts else None


def save_checkpoint(out_dir: str | os.PathLike, step: int, state: dict, *, keep_last: int = 0) -> Path:
    """Write ``state`` (tensors, numbers, strings, nested dicts/lists) as ``<out_dir>/ckpt-<step>`` atomically,
    point ``latest`` at it, then delete all but the ``keep_last`` newest checkpoints (0 keeps all)."""
    if int(step) < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Leftovers of a save that crashed: never referenced by anything, safe to drop.
    for stale in out.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)

    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{step}-", dir=out))
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _write_file(tmp / META_FILE, json.dumps({"step": int(step), "format": 1}).encode())
    _fsync_dir(tmp)

    final = checkpoint_path(out, step)
    if final.exists():  # saving a step again (e.g. after a resume): move the old one out of the way first
        trash = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-", dir=out))
        os.rename(final, trash / final.name)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(out)

    ptr_tmp = out / f"{_TMP_PREFIX}{LATEST}"
    _write_file(ptr_tmp, final.name.encode())
    os.replace(ptr_tmp, out / LATEST)
    _fsync_dir(out)

    if keep_last:
        for _, old in list_checkpoints(out)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, *, map_location="cpu") -> dict:
    """The state dict saved by ``save_checkpoint`` (``path`` is a ``ckpt-<step>`` directory)."""
    p = Path(path)
    if not (p.is_dir() and _is_complete(p)):
        raise FileNotFoundError(
            f"{str(p)!r} is not a complete checkpoint directory (needs {STATE_FILE} and {META_FILE})"
        )
    return torch.load(p / STATE_FILE, map_location=map_location, weights_only=True)


# ----------------------------------------------------------------------------------------------------
# RNG state: python, numpy (legacy global), torch CPU and every CUDA device, as tensors and numbers
# ----------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every global random generator's state, in a form ``torch.load(weights_only=True)`` accepts."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": nps["key"].numpy().astype(np.uint32), "pos": int(nps["pos"])},
            "has_gauss": int(nps["has_gauss"]),
            "gauss": float(nps["gauss"]),
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) != torch.cuda.device_count():
            raise RuntimeError(
                f"checkpoint holds RNG states for {len(cuda_states)} CUDA devices, this process sees "
                f"{torch.cuda.device_count()}"
            )
        torch.cuda.set_rng_state_all(cuda_states)
