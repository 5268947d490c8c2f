"""Reading and writing weight files safely, with errors a user can act on.

Weights load through safetensors, or through ``torch.load(weights_only=True)`` for
``.ckpt``/``.pt``/``.bin`` files: a pickle that needs to run code is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from opensd.errors import OpenSDError


class CheckpointError(OpenSDError):
    """A checkpoint cannot be read or does not fit the model."""

    kind = "CheckpointError"


class StateDictMismatch(CheckpointError):
    """A state dict does not fit a model: one line naming the missing, unexpected, wrong-shape
    and wrong-dtype keys (the first few of each; the lists are kept as attributes)."""

    SHOWN = 5

    def __init__(
        self,
        what: str,
        missing: list[str],
        unexpected: list[str],
        wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        wrong_dtype: list[tuple[str, torch.dtype, torch.dtype]] | None = None,
    ):
        self.missing, self.unexpected, self.wrong_shape = missing, unexpected, wrong_shape
        self.wrong_dtype = wrong_dtype or []
        parts = []

        def show(title: str, items: list[str]) -> None:
            if items:
                more = f", ... and {len(items) - self.SHOWN} more" if len(items) > self.SHOWN else ""
                parts.append(f"{len(items)} {title} ({', '.join(items[: self.SHOWN])}{more})")

        show("missing key(s)", missing)
        show("unexpected key(s)", unexpected)
        show("key(s) with the wrong shape, file vs model", [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in wrong_shape])
        show("key(s) with the wrong dtype, file vs model",
             [f"{k}: {str(a).replace('torch.', '')} vs {str(b).replace('torch.', '')}" for k, a, b in self.wrong_dtype])
        super().__init__(f"{what} does not fit the model: {'; '.join(parts)}")


WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
PICKLE_PROTO = 0x80  # the first byte of a pickle of protocol >= 2 (torch's legacy format)
_NEEDS_CODE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat ``name -> tensor`` dict from a safetensors or a torch pickle file.

    Torch files are opened with ``weights_only=True``; an LDM-style ``{"state_dict": ...}``
    wrapper is unwrapped and entries that are not tensors are dropped. Every failure is a
    one-line :class:`CheckpointError` naming the file and telling apart a file that is
    no checkpoint at all, a truncated or corrupt one, and a pickle that needs code to
    load (refused for safety).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"not a file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _check_tensors(_read_safetensors(path), path)
    if suffix in TORCH_SUFFIXES:
        return _check_tensors(_tensors_of(_read_torch(path), path), path)
    raise CheckpointError(
        f"{path}: unknown weight file type {suffix or '(none)'}; use one of {', '.join(WEIGHT_SUFFIXES)}"
    )


def read_torch_object(path: str | Path) -> object:
    """What a ``.pt``/``.bin``/``.ckpt`` file holds, as loaded with ``weights_only=True``
    (nested dicts and lists of str, int, float, None and tensors), with :func:`read_weights`'
    one-line errors. For files that are not flat ``name -> tensor`` dicts (A1111's embeddings)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"not a file: {path}" if path.exists() else f"checkpoint not found: {path}")
    return _read_torch(path)


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(e).__name__)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # the parser of an untrusted file: whatever it raises, the file is at fault
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {_first_line(e)}"
        ) from None


def _read_torch(path: Path) -> object:
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path} is empty: not a checkpoint")
    if head != ZIP_MAGIC and head[0] != PICKLE_PROTO:
        raise CheckpointError(
            f"{path} is not a checkpoint at all: neither a zip archive (as torch.save writes) "
            f"nor a pickle (it starts with {head!r})"
        )
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # the parser of an untrusted file: whatever it raises, the file is at fault
        code = _NEEDS_CODE.search(str(e))
        if code:
            raise CheckpointError(
                f"{path} refused: it is a pickle that needs code to load ({code.group(1)}). "
                "opensd only loads plain tensors (torch.load weights_only=True); "
                "convert it to .safetensors with a tool you trust."
            ) from None
        what = str(e).split("WeightsUnpickler error:")[-1] if isinstance(e, pickle.UnpicklingError) else str(e)
        raise CheckpointError(
            f"{path} is a truncated or corrupt torch checkpoint: {_first_line(RuntimeError(what))}"
        ) from None


def _tensors_of(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded torch file: a dict, or an LDM ``{"state_dict": dict}``."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


# dtypes a weight can have; anything else (complex, quantised, unsigned > 8 bit...) is refused
WEIGHT_DTYPES = frozenset({
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
})


def _check_tensors(state: dict, path: Path) -> dict[str, torch.Tensor]:
    """``state`` if it is a non-empty ``str -> tensor`` dict of plain dense tensors; else a CheckpointError."""
    if not state:
        raise CheckpointError(f"{path} holds no tensors")
    for k, v in state.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{path}: tensor names must be strings, found {type(k).__name__} {k!r:.60}")
        if v.layout != torch.strided or v.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{path}: {k} is a {v.dtype} {str(v.layout).replace('torch.', '')} tensor; "
                                  "weights must be dense float or integer tensors")
    return state


CHUNK_BYTES = 256 << 20  # how much of a safetensors file one opening of it reads (read_cast)


def cast_tensor(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` in ``dtype`` when both are floating point, else a copy (never a view of the file)."""
    if dtype is not None and t.is_floating_point() and dtype.is_floating_point and t.dtype != dtype:
        return t.to(dtype)
    return t.clone()


def read_cast(path: Path, state: dict[str, torch.Tensor], dtype_of: Callable[[str], torch.dtype | None]) -> dict[str, torch.Tensor]:
    """``state`` (what :func:`read_weights` read from ``path``) with each floating-point tensor
    in ``dtype_of(name)`` (None: its own dtype), read and cast one at a time; ``state`` is emptied.

    A safetensors file is memory-mapped as one region, whose pages stay resident while
    any view of it lives: casting its tensors while ``state`` holds them would keep the
    whole file's pages beside the cast weights. So ``state`` is cleared (the caller must
    hold no other reference to its tensors), and the file is opened again for every
    :data:`CHUNK_BYTES`: a file loaded in another dtype peaks near the cast weights, and
    a 16-bit model loaded from a float32 file never holds a float32 copy of itself.
    Torch files (read whole by ``torch.load``) are cast tensor by tensor.
    """
    if path.suffix.lower() != ".safetensors":
        return {k: cast_tensor(v, dtype_of(k)) for k, v in state.items()}
    names, out, i = list(state), {}, 0
    state.clear()
    try:
        while i < len(names):
            with safe_open(str(path), "pt") as f:
                done = 0
                while i < len(names) and done < CHUNK_BYTES:
                    t = f.get_tensor(names[i])
                    done += t.numel() * t.element_size()
                    out[names[i]] = cast_tensor(t, dtype_of(names[i]))
                    del t
                    i += 1
    except Exception as e:  # the file changed or broke between the two readings
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                              f"{' '.join(str(e).split())[:200]}") from None
    return out


def _file_mode() -> int:
    """What ``open()`` would give a new file under the process's umask (read once, at import)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors atomically (temp file in the same folder, then rename), with the
    permissions a newly created file gets (``mkstemp``'s own are owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, FILE_MODE)
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
    """The JSON object in ``path``; a one-line :class:`CheckpointError` naming the file otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing file: {path}") from None
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8, not JSON, nested too deep
        raise CheckpointError(f"{path} is not valid JSON: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}")
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
    common = sorted(set(own) & set(state))
    wrong = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in common
             if tuple(state[k].shape) != tuple(own[k].shape)]
    wrong_dtype = [(k, state[k].dtype, own[k].dtype) for k in common
                   if state[k].is_floating_point() != own[k].is_floating_point()
                   or (not own[k].is_floating_point() and state[k].dtype != own[k].dtype)]
    if missing or unexpected or wrong or wrong_dtype:
        raise StateDictMismatch(what, missing, unexpected, wrong, wrong_dtype)
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
