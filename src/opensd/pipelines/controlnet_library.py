"""The ControlNet folder: what a request's ``model`` names, loaded once per model and shared.

A :class:`ControlNetLibrary` scans a folder (subfolders too; hidden ones skipped) for
original ControlNet files (``.safetensors``, ``.pth``, ``.pt``, ``.ckpt``, ``.bin``) and
diffusers ``ControlNetModel`` folders. Each is named by its stem (a folder by its name) and
titled as sd-webui-controlnet lists it, ``name [hash]`` (the first 8 hex digits of the
weight file's SHA-256, computed when first needed). A request names one by its name or
its title (a title whose hash is stale still finds the name).

:meth:`ControlNetLibrary.load` loads a file for one pipeline's model (strictly, in its
dtype, on its device: :func:`~opensd.pipelines.control.controlnet_for`); the last
``per_model`` of each model are kept, weakly by model, so a model the server unloads takes
its ControlNets along. Loaded ControlNets are only read by the requests that use them
(their settings travel in each request's own :class:`~opensd.pipelines.control.ControlUnit`),
so any number of requests share one. A file for another family is the loader's one-line error.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opensd.checkpoints.controlnet import DIFFUSERS_WEIGHTS, SUFFIXES, LoadedControlNet, is_diffusers_controlnet
from opensd.checkpoints.io import first_existing, short_hash
from opensd.pipelines.control import controlnet_for
from opensd.pipelines.request import RequestError

if TYPE_CHECKING:
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

ENV_VAR = "OPENSD_CONTROLNET_DIR"
NO_MODEL = ("", "none")  # A1111's "None": the unit is off
SHOW_NAMES = 12


@dataclass(frozen=True)
class ControlNetEntry:
    """A ControlNet of the folder: its ``name`` and ``path`` (a file or a diffusers folder)."""

    name: str
    path: Path

    def weights(self) -> Path | None:
        return first_existing(self.path, DIFFUSERS_WEIGHTS) if self.path.is_dir() else self.path


def scan_folder(folder: Path) -> list[ControlNetEntry]:
    """Every ControlNet under ``folder``: files of :data:`SUFFIXES` and diffusers ControlNet folders."""
    out: list[ControlNetEntry] = []
    folders = [p for p in sorted(folder.rglob("*")) if p.is_dir() and is_diffusers_controlnet(p)]
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).parts
        if any(p.startswith(".") for p in rel) or any(f in path.parents for f in folders):
            continue
        if path in folders:
            out.append(ControlNetEntry(path.name, path))
        elif path.is_file() and path.suffix.lower() in SUFFIXES:
            out.append(ControlNetEntry(path.stem, path))
    return out


class ControlNetLibrary:
    """The ControlNets of ``folder`` (None: none, every name is an error). Thread-safe."""

    def __init__(self, folder: str | Path | None, *, per_model: int = 4):
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None and not self.folder.is_dir():
            raise RequestError(f"the ControlNet folder {self.folder} is not a folder")
        self.per_model = max(1, per_model)
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._entries: list[ControlNetEntry] = []
        self._hashes: dict[tuple[Path, int], str] = {}
        self._loaded: weakref.WeakKeyDictionary[Any, OrderedDict[tuple[Path, int], LoadedControlNet]] = weakref.WeakKeyDictionary()
        self.refresh()

    def refresh(self) -> list[ControlNetEntry]:
        entries = scan_folder(self.folder) if self.folder is not None else []
        with self._lock:
            self._entries = entries
        return list(entries)

    def entries(self) -> list[ControlNetEntry]:
        with self._lock:
            return list(self._entries)

    def title(self, entry: ControlNetEntry) -> str:
        """``name [hash]``, as sd-webui-controlnet lists a model (the bare name when it has no weights)."""
        weights = entry.weights()
        if weights is None:
            return entry.name
        key = (weights, weights.stat().st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = short_hash(weights)
        return f"{entry.name} [{self._hashes[key][:8]}]"

    def titles(self) -> list[str]:
        return [self.title(e) for e in self.entries()]

    def find(self, name: str, what: str = "ControlNet model") -> ControlNetEntry:
        """The entry ``name`` (a name or a title) names; a :class:`RequestError` listing the models when none does."""
        if not isinstance(name, str):
            raise RequestError(f"{what} must be a model name, got {name!r:.60}")
        want = name.strip()
        bare = want.rsplit(" [", 1)[0] if want.endswith("]") else want
        entries = self.entries()
        hits = [e for e in entries if want in (e.name, self.title(e))] or [e for e in entries if e.name == bare] or \
               [e for e in entries if e.name.lower() == bare.lower()]
        if len(hits) > 1:
            raise RequestError(f"{what} {name!r} is ambiguous: {', '.join(str(e.path) for e in hits)}; rename one of them")
        if hits:
            return hits[0]
        if self.folder is None:
            raise RequestError(f"unknown {what} {name!r}: no ControlNet folder is set on this server (opensd serve --controlnet-dir)")
        titles = self.titles()
        more = f" and {len(titles) - SHOW_NAMES} more" if len(titles) > SHOW_NAMES else ""
        raise RequestError(f"unknown {what} {name!r} in {self.folder}; known: {', '.join(titles[:SHOW_NAMES]) or 'none'}{more}")

    def load(self, entry: ControlNetEntry, pipe: StableDiffusionPipeline) -> LoadedControlNet:
        """``entry`` loaded for ``pipe``'s model, once per model and file version (module doc)."""
        key = (entry.path.resolve(), entry.path.stat().st_mtime_ns)
        with self._load_lock:
            with self._lock:
                kept = self._loaded.setdefault(pipe.model, OrderedDict())
                if key in kept:
                    kept.move_to_end(key)
                    return kept[key]
            net = controlnet_for(pipe, entry.path)
            with self._lock:
                kept[key] = net
                while len(kept) > self.per_model:
                    kept.popitem(last=False)
            return net
