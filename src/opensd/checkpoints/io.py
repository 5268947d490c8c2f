"""Reading and writing weight files safely, with errors a user can act on.

Weights load through safetensors, or through ``torch.load(weights_only=True)`` for
``.ckpt``/``.pt``/``.bin`` files: a pickle that needs to run code is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from opensd.errors import OpenSDError


class CheckpointError(OpenSDError):
    """A checkpoint cannot be read or does not fit the model."""

    kind = "CheckpointError"


class StateDictMismatch(CheckpointError):
    """A state dict does not fit a model: lists missing, unexpected and wrong-shape keys."""

    def __init__(
        self,
        what: str,
        missing: list[str],
        unexpected: list[str],
        wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ):
        self.missing, self.unexpected, self.wrong_shape = missing, unexpected, wrong_shape
        lines = [f"{what} does not fit the model:"]

        def show(title: str, items: list[str]) -> None:
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {k}" for k in items[:20])
                if len(items) > 20:
                    lines.append(f"    ... and {len(items) - 20} more")

        show("missing key(s)", missing)
        show("unexpected key(s)", unexpected)
        show(
            "key(s) with the wrong shape (file vs model)",
            [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in wrong_shape],
        )
        super().__init__("\n".join(lines))


WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat ``name -> tensor`` dict from a safetensors or a torch pickle file.

    Torch files are opened with ``weights_only=True``; an LDM-style ``{"state_dict": ...}``
    wrapper is unwrapped. Raises :class:`CheckpointError` for a missing, truncated,
    corrupt or unsafe file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"not a file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{path} is not a readable safetensors file (truncated or corrupt?): {e}"
            ) from None
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported pickle"
            raise CheckpointError(
                f"{path} refused: it is a pickle that needs code to load ({first}). "
                "opensd only loads plain tensors (torch.load weights_only=True); "
                "convert it to .safetensors with a tool you trust."
            ) from None
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): {e}") from None
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
        out = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if not out:
            raise CheckpointError(f"{path} holds no tensors")
        return out
    raise CheckpointError(
        f"{path}: unknown weight file type {suffix or '(none)'}; use one of {', '.join(WEIGHT_SUFFIXES)}"
    )


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(obj: object, path: str | Path) -> None:
    """Write JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def short_hash(path: str | Path) -> str:
    """The first 10 hex digits of the file's SHA-256, as AUTOMATIC1111 shows a model hash."""
    return full_hash(path)[:10]


def full_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with one clear error listing every problem.

    A module built on the meta device takes the tensors themselves (``assign=True``):
    no random initialisation, no second copy of the weights.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(
        (k, tuple(state[k].shape), tuple(own[k].shape))
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or wrong:
        raise StateDictMismatch(what, missing, unexpected, wrong)
    on_meta = any(p.is_meta for p in module.parameters())
    if on_meta:
        own_dtypes = {k: v.dtype for k, v in own.items()}
        state = {k: v.to(own_dtypes[k]) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(dict(state), strict=True, assign=on_meta)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def add_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def first_existing(folder: Path, names: Iterable[str]) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None
