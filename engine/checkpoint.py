"""Atomic training checkpoints: ``<out>/ckpt-<step>/`` directories and a ``latest`` pointer file.

A checkpoint is written into a hidden temporary directory in the same folder, flushed to disk, then
renamed to ``ckpt-<step>`` in one ``os.rename``; only then is ``latest`` replaced (temp file +
``os.replace``). A crash at any point leaves either the previous checkpoint or the new one as the
latest complete one, never a half-written directory: ``find_latest`` trusts a directory only when its
``meta.json`` (written last, inside the temporary directory) is present.

Everything in ``state.pt`` is plain tensors, numbers and strings, so it loads with
``torch.load(weights_only=True)``: resuming never unpickles arbitrary objects.

Integrity: ``meta.json`` records the size and SHA-256 of every file of the checkpoint (hashed while it is
written, so saving reads nothing back). ``load_checkpoint`` verifies them (one hashing pass per process and
file: ``find_latest``'s verification is reused) and names the file and what is wrong; ``find_latest`` skips a
damaged checkpoint with a warning and returns the newest intact one. Checkpoints from before the checksums
(``format`` 1) get the checks their files allow: present, non-empty, a readable zip directory.
A checkpoint is never written from non-finite model weights (``WEIGHT_KEYS``).

``prepare_run_dir`` is what a run calls before it writes anything into its output directory: it refuses to
mix a fresh run into an old one, clears the old one on request, and finds the checkpoint to resume from.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

PREFIX = "ckpt-"
LATEST = "latest"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
FORMAT = 2  # 1: meta.json holds the step only; 2: also {"files": {name: {"size", "sha256"}}}
# Model weights in a trainer's state: a checkpoint is never written when one of their tensors is not finite.
WEIGHT_KEYS = ("policy", "critic")
# What a training run writes into its output directory besides the ckpt-<step> directories.
RUN_FILES = (LATEST, "metrics.jsonl", "metrics.jsonl.tmp", "config.yaml", "tensorboard", "policy", "critic",
             "completions.jsonl", "completions.jsonl.tmp", "trackers.json", "wandb", "report")  # fmt: skip
_TMP_PREFIX = ".tmp-ckpt-"
_CKPT_RE = re.compile(rf"^{PREFIX}(\d+)$")
_HASH_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint directory whose files are damaged: a checksum or size mismatch, an unreadable meta.json
    or state.pt. The message names the file."""


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what goes through it (torch.save only calls write)."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


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


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_meta(path: Path) -> dict:
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(meta_path)!r} is unreadable ({type(e).__name__}: {e}): the checkpoint is damaged")
    if not isinstance(meta, dict) or not isinstance(meta.get("files", {}), dict):
        raise CheckpointError(f"{str(meta_path)!r} does not hold a checkpoint's metadata: {str(meta)[:200]}")
    return meta


def _signature(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


# Checkpoints verified in this process, with their files' signatures then: find_latest followed by
# load_checkpoint hashes each file once, and a file rewritten since is hashed again.
_verified: dict[Path, tuple] = {}


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise ``CheckpointError`` naming the file when the checkpoint at ``path`` is damaged: sizes and SHA-256
    against its meta.json (format 2); for a format-1 checkpoint (no checksums) a non-empty state.pt whose zip
    directory (at its end: a truncated file has none) is readable."""
    p = Path(path)
    if not (p.is_dir() and _is_complete(p)):
        raise FileNotFoundError(
            f"{str(p)!r} is not a complete checkpoint directory (needs {STATE_FILE} and {META_FILE})"
        )
    meta = _read_meta(p)
    files = meta.get("files")
    names = sorted(files) if files else [STATE_FILE]
    if any(not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..") for n in names):
        raise CheckpointError(f"{str(p / META_FILE)!r} lists files outside its checkpoint: {names}")
    try:
        sig = tuple((n, _signature(p / n)) for n in names + [META_FILE])
    except OSError as e:
        raise CheckpointError(f"{str(p)!r}: a file listed in its {META_FILE} is missing ({e})") from e
    key = p.resolve()
    if _verified.get(key) == sig:
        return
    if not files:  # format 1: no checksums recorded
        state = p / STATE_FILE
        if state.stat().st_size == 0:
            raise CheckpointError(f"{str(state)!r} is empty: the checkpoint is damaged")
        if not zipfile.is_zipfile(state):
            raise CheckpointError(f"{str(state)!r} is truncated or damaged (its zip directory is unreadable)")
    else:
        for name in names:  # every size first: a truncated file is found without hashing anything
            rec, size = files[name], (p / name).stat().st_size
            if not isinstance(rec, dict) or size != rec.get("size"):
                raise CheckpointError(f"{str(p / name)!r} is {size} bytes but {META_FILE} records "
                                      f"{rec.get('size') if isinstance(rec, dict) else rec!r}: the file is "
                                      f"truncated or damaged")  # fmt: skip
        for name in names:
            digest = _file_sha256(p / name)
            if digest != files[name].get("sha256"):
                raise CheckpointError(f"{str(p / name)!r} has SHA-256 {digest}, {META_FILE} records "
                                      f"{files[name].get('sha256')}: the file is damaged")  # fmt: skip
    _verified[key] = sig


def find_latest(out_dir: str | os.PathLike) -> Path | None:
    """The newest intact checkpoint: the one ``latest`` points to, or, if the pointer is missing or stale, the
    newest complete one. A damaged checkpoint (see ``verify_checkpoint``) is skipped with a warning naming the
    file, and the next newest is tried; None when there is no intact checkpoint."""
    out = Path(out_dir)
    candidates = []
    pointer = out / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        cand = out / name
        if _CKPT_RE.match(name) and cand.is_dir() and _is_complete(cand):
            candidates.append(cand)
    candidates += [p for _, p in reversed(list_checkpoints(out)) if p not in candidates]
    for cand in candidates:
        try:
            verify_checkpoint(cand)
        except CheckpointError as e:
            warnings.warn(f"skipping a damaged checkpoint: {e}", stacklevel=2)
            continue
        return cand
    return None


def save_checkpoint(out_dir: str | os.PathLike, step: int, state: dict, *, keep_last: int = 0) -> Path:
    """Write ``state`` (tensors, numbers, strings, nested dicts/lists) as ``<out_dir>/ckpt-<step>`` atomically,
    point ``latest`` at it, then delete all but the ``keep_last`` newest checkpoints (0 keeps all).
    Raises ``ValueError`` (and touches nothing) when a floating tensor of ``state[k]`` for k in ``WEIGHT_KEYS``
    holds NaN or Inf: resuming from such a checkpoint could only continue a dead run."""
    if int(step) < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
    _check_finite_weights(state, out_dir, step)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Leftovers of a save that crashed: never referenced by anything, safe to drop.
    for stale in out.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)

    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{step}-", dir=out))
    with open(tmp / STATE_FILE, "wb") as f:
        hashed = _HashingWriter(f)
        torch.save(state, hashed)
        f.flush()
        os.fsync(f.fileno())
        if os.fstat(f.fileno()).st_size != hashed.size:
            raise OSError(f"{str(tmp / STATE_FILE)!r}: {hashed.size} bytes written, the file holds "
                          f"{os.fstat(f.fileno()).st_size}")  # fmt: skip
    files = {STATE_FILE: {"size": hashed.size, "sha256": hashed.sha256.hexdigest()}}
    _write_file(tmp / META_FILE, json.dumps({"step": int(step), "format": FORMAT, "files": files}).encode())
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
    """The state dict saved by ``save_checkpoint`` (``path`` is a ``ckpt-<step>`` directory), verified first
    (``verify_checkpoint``): ``FileNotFoundError`` for an incomplete directory, ``CheckpointError`` naming the
    file for a damaged one."""
    p = Path(path)
    verify_checkpoint(p)
    has_checksums = bool(_read_meta(p).get("files"))
    try:
        return torch.load(p / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as e:  # EOFError, zip/unpickling errors: all say little about which file, or why
        why = ("its checksum matches, so it was written like this: not a fusedrl checkpoint, or one holding "
               "objects other than tensors, numbers and strings" if has_checksums else
               "damaged, truncated, or not a fusedrl checkpoint")  # fmt: skip
        raise CheckpointError(f"{str(p / STATE_FILE)!r} cannot be loaded ({why}): {type(e).__name__}: "
                              f"{str(e)[:500]}") from e  # fmt: skip


def _check_finite_weights(state: dict, out_dir, step: int) -> None:
    for key in WEIGHT_KEYS:
        weights = state.get(key) if isinstance(state, dict) else None
        if not isinstance(weights, dict):
            continue
        by_device: dict[torch.device, list] = {}
        for name, t in weights.items():
            if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
                by_device.setdefault(t.device, []).append((name, t))
        bad = []
        for items in by_device.values():
            ok = torch.stack([torch.isfinite(t).all() for _, t in items]).tolist()  # one host sync per device
            bad += [(name, t) for (name, t), good in zip(items, ok) if not good]
        if bad:
            name, t = bad[0]
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            others = ", ".join(repr(n) for n, _ in bad[1:4]) + (", ..." if len(bad) > 4 else "")
            more = f" (and {len(bad) - 1} more tensors: {others})" if len(bad) > 1 else ""
            raise ValueError(
                f"save_checkpoint: refusing to write step {step} into {str(out_dir)!r}: {key}[{name!r}] holds "
                f"{n_nan} NaN and {n_inf} Inf of its {t.numel()} values{more}. Non-finite weights mean a non-finite "
                f"loss or gradient reached the optimizer; the previous checkpoints are left as they were"
            )


def run_files(out_dir: str | os.PathLike, extra_files: tuple[str, ...] = ()) -> list[Path]:
    """The entries of ``out_dir`` that a training run wrote: ``ckpt-<step>`` directories (complete or not),
    leftovers of a crashed save, ``RUN_FILES`` and ``extra_files`` (names: what a caller such as the demo writes
    beside them). Nothing else in the directory belongs to a run."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    names = set(RUN_FILES) | set(extra_files)
    return sorted(p for p in out.iterdir()
                  if p.name in names or _CKPT_RE.match(p.name) or p.name.startswith(_TMP_PREFIX))  # fmt: skip


def prepare_run_dir(
    out_dir: str | os.PathLike, *, resume: bool, overwrite: bool = False, extra_files: tuple[str, ...] = ()
) -> Path | None:
    """Make ``out_dir`` ready for a run, before the run writes anything into it. Returns the checkpoint to
    resume from, or None when the run starts at step 0.

    - ``resume=True`` (idempotent, as a scheduler restarting a preempted job with the same command needs): the
      newest intact checkpoint (``find_latest``); leftovers of a crashed save (``.tmp-ckpt-*``) are removed. With no
      intact checkpoint (the run was killed before its first one, or never started) the run starts from step 0:
      a warning, the killed run's files (``run_files``) removed, the directory created.
    - ``resume=False`` into a directory that holds a run (``run_files(out_dir, extra_files)``):
      ``FileExistsError`` unless ``overwrite=True``, which deletes those files (and only those) first: two runs
      in one directory would rotate each other's checkpoints, and a later resume could continue either. Then
      the directory is created.

    Idempotent while nothing is written in between (a caller may check early and the trainer again)."""
    if not isinstance(resume, bool) or not isinstance(overwrite, bool):
        raise TypeError(f"resume and overwrite must be bools, got resume={resume!r}, overwrite={overwrite!r}")
    if resume and overwrite:
        raise ValueError("resume=True and overwrite=True exclude each other: resume continues the run in the "
                         "output directory, overwrite deletes it")  # fmt: skip
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output directory {str(out)!r} exists and is not a directory")
    if resume:
        for stale in out.glob(f"{_TMP_PREFIX}*"):  # a crashed save's leftovers: never referenced by anything
            shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
        latest = find_latest(out)
        if latest is not None:
            return latest
        found = run_files(out, extra_files)
        what = ("does not exist" if not out.exists() else
                "holds checkpoints but none is intact (see the warnings)" if list_checkpoints(out) else
                "holds no complete checkpoint")  # fmt: skip
        removed = f"; removing the earlier attempt's {', '.join(p.name for p in found)}" if found else ""
        warnings.warn(f"resume: nothing to resume, output directory {str(out)!r} {what}: starting from step 0"
                      f"{removed}", RuntimeWarning, stacklevel=2)  # fmt: skip
        overwrite = True
    found = run_files(out, extra_files)
    if found and not overwrite:
        names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
        raise FileExistsError(f"output directory {str(out)!r} already holds a run ({names}): pass --resume to "
                              f"continue it or --overwrite to start over")  # fmt: skip
    # The pointer and the checkpoints go first: a removal cut short leaves nothing that resumes into a mixed run.
    for p in sorted(found, key=lambda p: (p.name != LATEST, not _CKPT_RE.match(p.name))):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()  # a file, or a symlink (never followed: what it points to is not ours)
    if found:
        _fsync_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    return None


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
