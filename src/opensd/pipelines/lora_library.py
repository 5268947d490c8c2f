"""The LoRA folder: what ``<lora:name:0.8>`` names, loaded once and bound per request.

A :class:`LoraLibrary` scans a folder, subfolders included, for ``*.safetensors``,
``*.pt`` and ``*.ckpt`` (A1111's ``models/Lora``; hidden files and folders are skipped).
Each file is a :class:`LoraEntry` named by its stem, as A1111 names it, with an alias:
its kohya metadata's ``ss_output_name`` (A1111's alias; the stem when it has none).
A tag's name is looked up among the names first, then among the aliases; a name or alias
that two files share is an error naming both (A1111 would pick one of them silently).

:meth:`LoraLibrary.networks_for` turns a request's prompt tags (and the CLI's
``--lora`` files, ``extra``) into the :class:`~opensd.pipelines.networks.RequestNetworks`
that :meth:`StableDiffusionPipeline.generate` runs with: the
:func:`~opensd.checkpoints.lora.bind_loras` deltas and A1111's infotext field
``Lora hashes: "name: 0123456789ab, other: ba9876543210"`` (the name as the prompt
mentions it, ``:`` and ``,`` removed; A1111's 12-digit short hash; one entry per tag,
so a LoRA named twice is listed twice, as it is applied twice).

Costs are bounded: parsed files are kept in an LRU of at most ``cache_bytes`` tensor
bytes (a file larger than that is used but not kept); the last ``bound_sets`` bound
:class:`~opensd.models.adapters.AdapterSet` of each model, by (files, multipliers), are
kept too (dropped with their files, and with the model: a model the server unloads is not
held here); and a :class:`LoraBudget` caps the LoRAs of one request and their total file
bytes before anything is read. The library is safe to share between
threads: its caches are locked, and what it returns is immutable.

An unknown name is a :class:`~opensd.pipelines.request.RequestError` naming it, the
folder and the nearest names, after one rescan of the folder (at most every
:data:`RESCAN_INTERVAL_S`): a file dropped in is found without a refresh.
"""

from __future__ import annotations

import difflib
import json
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opensd.checkpoints.io import CheckpointError
from opensd.checkpoints.lora import LoRAError, LoRAFile, LoRAUse, bind_loras
from opensd.checkpoints.parameterization import read_metadata
from opensd.models.adapters import AdapterSet
from opensd.models.stable_diffusion import StableDiffusion
from opensd.pipelines.networks import NO_NETWORKS, RequestNetworks
from opensd.pipelines.request import GenerationRequest, RequestError
from opensd.prompts.extra_networks import LoraTag, lora_tags

SUFFIXES = (".safetensors", ".pt", ".ckpt")
ENV_VAR = "OPENSD_LORA_DIR"
DEFAULT_FOLDER = Path("models") / "Lora"  # A1111's, relative to the working directory
DEFAULT_CACHE_BYTES = 2 * 2**30
DEFAULT_BOUND_SETS = 8
RESCAN_INTERVAL_S = 5.0
SHOW_NAMES = 8  # names listed in an error


def default_lora_dir() -> Path | None:
    """``$OPENSD_LORA_DIR`` if set, else ``models/Lora`` of the working directory if it is a folder, else None."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env)
    return DEFAULT_FOLDER if DEFAULT_FOLDER.is_dir() else None


@dataclass(frozen=True)
class LoraBudget:
    """What one request may load: at most ``max_count`` LoRAs and ``max_bytes`` of their files in all."""

    max_count: int = 16
    max_bytes: int = 4 * 2**30


@dataclass(frozen=True)
class LoraEntry:
    """One file of the folder: ``name`` (its stem), ``alias``, ``path``, its safetensors
    ``metadata`` (A1111's: values that are JSON objects parsed, cover images left out),
    and the ``size`` and ``mtime_ns`` it had when scanned."""

    name: str
    alias: str
    path: Path
    size: int
    mtime_ns: int
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """A1111's ``/sdapi/v1/loras`` item."""
        return {"name": self.name, "alias": self.alias, "path": str(self.path), "metadata": dict(self.metadata)}


def listing_metadata(path: Path) -> dict[str, Any]:
    """A safetensors file's ``__metadata__`` as A1111 lists it; {} for other files and any
    header that cannot be read (the file's error comes when it is used)."""
    try:
        raw = read_metadata(path)
    except (OSError, CheckpointError):
        return {}
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k == "ssmd_cover_images":
            continue
        out[str(k)] = v
        if isinstance(v, str) and v.startswith("{"):
            try:
                out[str(k)] = json.loads(v)
            except (ValueError, RecursionError):
                pass
    return out


def scan_folder(folder: Path) -> list[LoraEntry]:
    """Every LoRA file under ``folder`` (sorted by path; hidden files and folders skipped)."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).parts
        if path.suffix.lower() not in SUFFIXES or any(p.startswith(".") for p in rel):
            continue
        try:
            st = path.stat()
        except OSError:
            continue
        if not path.is_file():
            continue
        meta = listing_metadata(path)
        alias = meta.get("ss_output_name")
        alias = alias if isinstance(alias, str) and alias.strip() else path.stem
        out.append(LoraEntry(path.stem, alias, path, st.st_size, st.st_mtime_ns, meta))
    return out


def infotext_name(name: str) -> str:
    """A name as A1111 writes it in ``Lora hashes`` (``:`` and ``,`` removed)."""
    return name.replace(":", "").replace(",", "")


def _file_bytes(f: LoRAFile) -> int:
    return sum(t.nbytes for layer in f.layers.values() for t in layer.tensors.values())


class LoraLibrary:
    """The LoRA files of ``folder`` (None: an empty library, whose tags are errors). Thread-safe."""

    def __init__(
        self, folder: str | Path | None, *, cache_bytes: int = DEFAULT_CACHE_BYTES, bound_sets: int = DEFAULT_BOUND_SETS,
    ):
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None and not self.folder.is_dir():
            raise LoRAError(f"the LoRA folder {self.folder} is not a folder")
        self.cache_bytes, self.bound_sets = cache_bytes, bound_sets
        self._lock = threading.Lock()  # the indexes and caches
        self._load_lock = threading.Lock()  # one file parsed at a time: two requests never parse one file twice
        self._entries: list[LoraEntry] = []
        self._scanned_at = 0.0
        self._files: OrderedDict[Path, tuple[tuple[int, int], LoRAFile, int]] = OrderedDict()
        # per model (weakly: a model the server unloads takes its sets along), files and multipliers -> bound set
        self._bound: weakref.WeakKeyDictionary[StableDiffusion, OrderedDict[tuple[LoRAUse, ...], AdapterSet | None]] = (
            weakref.WeakKeyDictionary())
        self.refresh()

    # ---------------------------------------------------------------- the folder

    def refresh(self) -> list[LoraEntry]:
        """Rescan the folder; parsed files of paths that are gone (or changed) leave the cache."""
        entries = scan_folder(self.folder) if self.folder is not None else []
        keep = {e.path: (e.mtime_ns, e.size) for e in entries}
        with self._lock:
            self._entries, self._scanned_at = entries, time.monotonic()
            for path in [p for p, (key, _, _) in self._files.items() if keep.get(p) != key]:
                self._evict(path)
        return list(entries)

    def entries(self) -> list[LoraEntry]:
        with self._lock:
            return list(self._entries)

    def _matches(self, name: str) -> list[LoraEntry]:
        entries = self.entries()
        return [e for e in entries if e.name == name] or [e for e in entries if e.alias == name]

    def has(self, name: str) -> bool:
        """Whether ``name`` names a file of the folder (as :meth:`find` looks it up, without rescanning)."""
        return bool(self._matches(name))

    def find(self, name: str) -> LoraEntry:
        """The entry ``name`` names (its stem, else its alias); RequestError when none or several do."""
        hits = self._matches(name)
        if not hits and self.folder is not None and time.monotonic() - self._scanned_at >= RESCAN_INTERVAL_S:
            self.refresh()
            hits = self._matches(name)
        if len(hits) == 1:
            return hits[0]
        if hits:
            paths = ", ".join(str(e.path) for e in hits)
            raise RequestError(f"LoRA name {name!r} is ambiguous: {paths}; rename one of the files")
        raise RequestError(self._unknown(name))

    def _unknown(self, name: str) -> str:
        if self.folder is None:
            return f"no LoRA named {name!r}: no LoRA folder is set (--lora-dir DIR, or ${ENV_VAR})"
        names = sorted({e.name for e in self.entries()})
        if not names:
            return f"no LoRA named {name!r}: the LoRA folder {self.folder} holds no {', '.join(SUFFIXES)} files"
        near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"nearest: {', '.join(near)}" if near else f"it holds: {', '.join(names[:SHOW_NAMES])}" + (
            f" and {len(names) - SHOW_NAMES} more" if len(names) > SHOW_NAMES else "")
        return f"no LoRA named {name!r} in {self.folder}; {hint}"

    # ---------------------------------------------------------------- files

    def load(self, entry: LoraEntry) -> LoRAFile:
        """The parsed file of ``entry``, from the cache when its file has not changed since."""
        try:
            st = entry.path.stat()
        except OSError:
            raise LoRAError(f"{entry.path}: the LoRA file is gone; refresh the LoRA list") from None
        key = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._cached(entry.path, key)
        if hit is not None:
            return hit
        with self._load_lock:
            with self._lock:
                hit = self._cached(entry.path, key)
            if hit is not None:
                return hit
            lora = LoRAFile.load(entry.path)
            size = _file_bytes(lora)
            with self._lock:
                self._evict(entry.path)
                if size <= self.cache_bytes:
                    self._files[entry.path] = (key, lora, size)
                    while self.cached_bytes > self.cache_bytes:
                        self._evict(next(iter(self._files)))
            return lora

    def _cached(self, path: Path, key: tuple[int, int]) -> LoRAFile | None:
        """(with the lock held) the cached file at ``path`` if it has ``key``, marked recently used."""
        got = self._files.get(path)
        if got is None or got[0] != key:
            return None
        self._files.move_to_end(path)
        return got[1]

    def _evict(self, path: Path) -> None:
        """(with the lock held) drop the cached file at ``path`` and the bound sets that use it."""
        got = self._files.pop(path, None)
        if got is None:
            return
        for sets in self._bound.values():
            for k in [k for k in sets if any(u.file is got[1] for u in k)]:
                del sets[k]

    @property
    def cached_bytes(self) -> int:
        """Tensor bytes of the parsed files kept."""
        return sum(size for _, _, size in self._files.values())

    # ---------------------------------------------------------------- a request

    def uses_for(self, prompt: str, budget: LoraBudget | None = None, extra: Sequence[LoRAUse] = ()) -> list[tuple[str, LoRAUse]]:
        """(mentioned name, use) of every ``<lora:...>`` tag of ``prompt``, then of ``extra``
        (named by their file's stem); checked against ``budget`` before any file is read."""
        tags: list[LoraTag] = lora_tags(prompt)
        budget = budget or LoraBudget()
        if len(tags) + len(extra) > budget.max_count:
            raise RequestError(f"this request names {len(tags) + len(extra)} LoRAs; at most {budget.max_count} are allowed")
        entries = [self.find(t.name) for t in tags]
        total = sum(e.size for e in entries) + sum(_size(u.file.path) for u in extra)
        if total > budget.max_bytes:
            raise RequestError(f"this request's LoRA files hold {total / 2**20:.0f} MiB; "
                               f"at most {budget.max_bytes / 2**20:.0f} MiB are allowed per request")
        uses = [(t.name, LoRAUse(self.load(e), unet=t.unet, te=t.te)) for t, e in zip(tags, entries, strict=False)]
        return uses + [(u.file.name, u) for u in extra]

    def bind(self, model: StableDiffusion, uses: Sequence[LoRAUse]) -> AdapterSet | None:
        """:func:`bind_loras` of ``uses`` on ``model``, the last :attr:`bound_sets` results per model kept."""
        key = tuple(uses)
        with self._lock:
            sets = self._bound.get(model)
            if sets is not None and key in sets:
                sets.move_to_end(key)
                return sets[key]
        adapters = bind_loras(model, uses)
        with self._lock:
            kept = all(u.file.path in self._files and self._files[u.file.path][1] is u.file for u in uses)
            if kept and self.bound_sets > 0:  # only sets of files the cache keeps: they leave with their files
                sets = self._bound.setdefault(model, OrderedDict())
                sets[key] = adapters
                while len(sets) > self.bound_sets:
                    sets.popitem(last=False)
        return adapters

    def networks_for(
        self, model: StableDiffusion, req: GenerationRequest | str, extra: Sequence[LoRAUse] = (),
        budget: LoraBudget | None = None,
    ) -> RequestNetworks:
        """The LoRAs of the prompt's tags (``req.prompt``, or ``req`` itself when it is the
        prompt) and of ``extra`` on ``model``, with their ``Lora hashes``.

        Tags in the negative prompt are removed from its text but not applied, as in A1111.
        """
        named = self.uses_for(req if isinstance(req, str) else req.prompt, budget, extra)
        if not named:
            return NO_NETWORKS
        uses = [u for _, u in named]
        hashes = ", ".join(f"{infotext_name(name)}: {u.file.hash}" for name, u in named if u.file.hash)
        return RequestNetworks(self.bind(model, uses), infotext={"Lora hashes": hashes} if hashes else {})


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


__all__ = [
    "DEFAULT_FOLDER",
    "ENV_VAR",
    "LoraBudget",
    "LoraEntry",
    "LoraLibrary",
    "default_lora_dir",
    "infotext_name",
    "listing_metadata",
    "scan_folder",
]
