"""Training checkpoints that verify themselves.

A run keeps its checkpoints in ``<run>/checkpoints/``::

    step_00000400.pt          torch.save of the training state (plain tensors and containers)
    step_00000400.pt.sha256   "<sha256 hex>  step_00000400.pt": ``sha256sum -c`` checks it too

:func:`write_checkpoint` writes the data to a temporary file and flushes it to disk,
then writes the hash file (atomically, after the data), and only then renames the data
to its final name: a checkpoint that can be seen has its hash beside it. A checkpoint
without a hash file was written before opensd checked checkpoints: it still resumes,
with a note that it is unverified.

:func:`find_resumable` takes the newest checkpoint that verifies (its hash matches and
it loads). One that fails is set aside, renamed ``step_XXXXXXXX.pt.corrupt`` (kept, so
no data is lost), and the one before it is tried, with a message naming both.
:func:`check_structure` turns a checkpoint of another stage, or with missing parts, into
a one-line :class:`ResumeError` naming the file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from opensd.errors import OpenSDError

CHECKPOINTS = "checkpoints"
HASH_SUFFIX = ".sha256"
SET_ASIDE_SUFFIX = ".corrupt"
PARTS = ("step", "stage", "config", "modules", "optimizers", "ema", "rng")


class ResumeError(OpenSDError):
    """A run folder cannot be started or resumed as asked."""


class CorruptCheckpoint(ResumeError):
    """A checkpoint's bytes do not match its hash, or it cannot be read."""


# ----------------------------------------------------------------------------- writing


def _publish(tmp: Path, path: Path) -> None:
    """Make a fully written temporary file visible under its final name (atomic rename)."""
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_path(path: Path) -> Path:
    return path.with_name(path.name + HASH_SUFFIX)


def _write_text_atomically(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save(obj: Any, path: Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, its hash file
    written, then renamed to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    _write_text_atomically(f"{file_sha256(tmp)}  {path.name}\n", hash_path(path))
    _publish(tmp, path)
    return path


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the finished checkpoints in ``run_dir``, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    out = []
    for p in folder.glob("step_*.pt"):
        digits = p.stem[len("step_"):]
        if digits.isdigit():
            out.append((int(digits), p))
    return sorted(out)


def write_checkpoint(state: dict[str, Any], run_dir: Path, step: int, keep: int) -> Path:
    """Save ``state`` as step ``step``'s checkpoint and delete all but the newest ``keep``."""
    path = atomic_save(state, Path(run_dir) / CHECKPOINTS / f"step_{step:08d}.pt")
    for _, old in list_checkpoints(run_dir)[:-keep]:
        old.unlink()
        hash_path(old).unlink(missing_ok=True)
    return path


def remove_leftovers(run_dir: Path) -> None:
    """Delete temporary files of interrupted saves, and hash files whose checkpoint was never published."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return
    for stale in folder.glob(".*.tmp"):
        stale.unlink()
    for h in folder.glob(f"step_*.pt{HASH_SUFFIX}"):
        if not h.with_name(h.name[: -len(HASH_SUFFIX)]).exists():
            h.unlink()


# ----------------------------------------------------------------------------- checking


def verify(path: Path) -> bool:
    """True when ``path`` matches its hash file, False when it has none (written before hashes).

    Raises :class:`CorruptCheckpoint` when the bytes differ from the recorded hash, or the
    hash file is unreadable.
    """
    record = hash_path(path)
    if not record.exists():
        return False
    try:
        expected = record.read_text().split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        raise CorruptCheckpoint(f"{path}: its hash file {record.name} is unreadable") from None
    actual = file_sha256(path)
    if actual != expected:
        raise CorruptCheckpoint(f"{path} is corrupt: its SHA-256 is {actual[:12]}..., "
                                f"{record.name} records {expected[:12]}...")
    return True


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint written by the loop (plain tensors and containers only); one line naming it if unreadable."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # the parser of a file on disk: whatever it raises, the file is at fault
        raise CorruptCheckpoint(f"cannot read checkpoint {path}: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(state, dict):
        raise ResumeError(f"{path} is not a training checkpoint: it holds a {type(state).__name__}, not a dict")
    return state


def set_aside(path: Path) -> Path:
    """Rename a bad checkpoint (and its hash file) to ``*.corrupt`` (``.corrupt.1``... if taken); returns the new name."""
    new = path.with_name(path.name + SET_ASIDE_SUFFIX)
    n = 0
    while new.exists():
        n += 1
        new = path.with_name(f"{path.name}{SET_ASIDE_SUFFIX}.{n}")
    os.replace(path, new)
    if hash_path(path).exists():
        os.replace(hash_path(path), new.with_name(new.name + HASH_SUFFIX))
    return new


def find_resumable(run_dir: Path, device: torch.device | str, say: Callable[[str], None],
                   set_bad_aside: bool = True) -> tuple[int, Path, dict[str, Any]] | None:
    """(step, path, state) of the newest checkpoint that verifies and loads; ``None`` when there is none.

    Each newer one that fails is renamed aside (when ``set_bad_aside``; other ranks only skip
    it) and ``say`` is told which failed, why, and which one is used instead. Raises a
    :class:`ResumeError` when checkpoints exist but none is good.
    """
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return None
    failed: list[str] = []
    for step, path in reversed(ckpts):
        try:
            verified = verify(path)
            state = load_checkpoint(path, device)
        except CorruptCheckpoint as e:
            where = set_aside(path) if set_bad_aside else path
            failed.append(f"{e} (kept as {where.name})")
            continue
        if failed:
            say(f"warning: {'; '.join(failed)}: falling back to {path} (step {step}), the newest good checkpoint")
        if not verified:
            say(f"note: {path} has no {HASH_SUFFIX} file (written before opensd checked checkpoints): "
                "resuming from it unverified")
        return step, path, state
    raise ResumeError(f"no good checkpoint to resume in {Path(run_dir) / CHECKPOINTS}: {'; '.join(failed)}; "
                      "rerun to start afresh, or restore a checkpoint")


def last_good(run_dir: Path) -> str:
    """Words naming the newest checkpoint that verifies, for the message of a stopped run."""
    notes = []
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            verified = verify(path)
        except CorruptCheckpoint as e:
            notes.append(str(e))
            continue
        found = f"the last good checkpoint is {path} (step {step}{'' if verified else ', unverified: no hash file'})"
        return "; ".join([*notes, found])
    return "; ".join([*notes, "no good checkpoint was written yet" if notes else "no checkpoint was written yet"])


def check_structure(state: dict[str, Any], path: Path, stage: str, groups: list[str], emas: list[str]) -> None:
    """A one-line :class:`ResumeError` naming ``path`` unless ``state`` is a checkpoint of ``stage``
    holding every part the run restores (``groups``' modules and optimisers, ``emas``' averages)."""
    missing = [k for k in PARTS if k not in state]
    if missing:
        raise ResumeError(f"{path} is not a training checkpoint of this opensd: it lacks {', '.join(missing)}")
    if state["stage"] != stage:
        raise ResumeError(f"{path} is a checkpoint of the {state['stage']!r} stage, not of {stage!r}")
    if not isinstance(state["config"], dict) or not isinstance(state["step"], int):
        raise ResumeError(f"{path}: its config is not a dict or its step not an integer")
    for part, names in (("modules", groups), ("optimizers", groups), ("ema", emas)):
        held = state[part] if isinstance(state[part], dict) else {}
        lacking = [n for n in names if n not in held]
        if lacking:
            raise ResumeError(f"{path} lacks the {part} state of {', '.join(lacking)}; "
                              f"it holds {', '.join(map(str, held)) or 'none'}")
    if not isinstance(state["rng"], list):
        raise ResumeError(f"{path}: its RNG states are not a list")


def restore(what: str, path: Path, load: Callable[[], Any]) -> None:
    """Run ``load()`` (a ``load_state_dict``); a mismatch becomes a one-line :class:`ResumeError` naming ``path``."""
    try:
        load()
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        text = " ".join(str(e).split())
        raise ResumeError(f"{path} does not fit this run's {what}: {text[:300]}") from None
