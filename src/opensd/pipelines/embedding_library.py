"""A folder of textual-inversion embeddings (A1111's ``embeddings/``), and what a request takes from it.

>>> library = EmbeddingLibrary("embeddings")
>>> networks = library.networks_for(pipe.model, req)      # the embeddings req's prompts name
>>> pipe.generate(req, networks=networks)

Every ``*.pt``, ``*.bin`` and ``*.safetensors`` under the folder (subfolders too) is an
embedding named by its file stem; where two files share a stem, the first in path order
wins. The folder is listed again on every call (a file added or removed counts at once,
as in A1111); a file is read the first time a prompt names it or the folder is listed
with :meth:`EmbeddingLibrary.listing`, and kept until it changes on disk (size or
modification time) or :meth:`refresh` is called. Safe to share between threads.

A prompt that names an embedding which cannot be read or does not fit the model is an
error naming the file (A1111 reads the name as plain words then).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from opensd.checkpoints.embeddings import EMBEDDING_SUFFIXES, EmbeddingFile, TextualInversion, bind_embedding, read_embedding
from opensd.checkpoints.lora import LoRAError
from opensd.models.stable_diffusion import StableDiffusion
from opensd.pipelines.networks import RequestNetworks
from opensd.prompts.embedding_names import EmbeddingNames

TI_HASHES = "TI hashes"  # A1111's infotext field


class Prompted(Protocol):
    """What :meth:`EmbeddingLibrary.networks_for` reads of a request."""

    prompt: str
    negative_prompt: str


@dataclass(frozen=True)
class _Cached:
    stamp: tuple[int, int]  # (size, mtime_ns) when read
    file: EmbeddingFile | None
    error: str | None


class EmbeddingLibrary:
    """The embeddings under ``folder`` (see the module doc)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise LoRAError(f"embeddings folder {self.folder} is not a folder")
        self._lock = threading.Lock()
        self._cache: dict[Path, _Cached] = {}

    # ---------------------------------------------------------------- the folder

    def paths(self) -> dict[str, Path]:
        """Name -> file of every embedding in the folder now."""
        found: dict[str, Path] = {}
        for root, dirs, files in os.walk(self.folder, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                p = Path(root) / f
                if not f.startswith(".") and p.suffix.lower() in EMBEDDING_SUFFIXES:
                    found.setdefault(p.stem, p)
        return found

    def refresh(self) -> None:
        """Forget every file read: the next use reads them again."""
        with self._lock:
            self._cache.clear()

    def _read(self, path: Path) -> _Cached:
        """``path`` read, or its error; from the cache while the file is unchanged."""
        try:
            st = path.stat()
        except OSError as e:
            return _Cached((0, 0), None, f"{path.name}: cannot be read ({e.strerror})")
        stamp = (st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._cache.get(path)
            if hit is not None and hit.stamp == stamp:
                return hit
            try:
                entry = _Cached(stamp, read_embedding(path), None)
            except LoRAError as e:
                entry = _Cached(stamp, None, str(e))
            self._cache[path] = entry
            return entry

    def file(self, name: str, paths: dict[str, Path] | None = None) -> EmbeddingFile:
        """The embedding file called ``name`` (in ``paths``, default :meth:`paths`); a
        :class:`LoRAError` when there is none or it cannot be read."""
        path = (self.paths() if paths is None else paths).get(name)
        if path is None:
            raise LoRAError(f"no embedding {name!r} in {self.folder}")
        entry = self._read(path)
        if entry.file is None:
            raise LoRAError(entry.error or f"{path.name}: cannot be read")
        return entry.file

    # ---------------------------------------------------------------- a model's view

    def listing(self, model: StableDiffusion) -> dict[str, dict[str, dict[str, Any]]]:
        """A1111's ``/sdapi/v1/embeddings``: ``loaded`` (those that fit ``model``) and
        ``skipped`` (those that do not), each name -> step, sd_checkpoint,
        sd_checkpoint_name, shape, vectors. A file that cannot be read is skipped with
        those fields None and ``error`` saying why (A1111 leaves it out)."""
        loaded: dict[str, dict[str, Any]] = {}
        skipped: dict[str, dict[str, Any]] = {}
        for name, path in sorted(self.paths().items(), key=lambda kv: kv[0].lower()):
            entry = self._read(path)
            if entry.file is None:
                skipped[name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                                 "vectors": None, "error": entry.error}
                continue
            try:
                bind_embedding(entry.file, model)
            except LoRAError:
                skipped[name] = entry.file.describe()
            else:
                loaded[name] = entry.file.describe()
        return {"loaded": loaded, "skipped": skipped}

    def embeddings_for(self, model: StableDiffusion, *prompts: str) -> dict[str, TextualInversion]:
        """The embeddings ``prompts`` name (each once, in order of appearance), bound to ``model``."""
        paths = self.paths()
        names = EmbeddingNames(paths)
        found: dict[str, None] = {}
        for prompt in prompts:
            found.update((n, None) for n in names.find(prompt))
        return {name: bind_embedding(self.file(name, paths), model) for name in found}

    def networks_for(self, model: StableDiffusion, req: Prompted) -> RequestNetworks:
        """The embeddings ``req``'s prompt and negative prompt name, with A1111's ``TI hashes`` infotext."""
        return self.networks_for_prompts(model, req.prompt, req.negative_prompt)

    def networks_for_prompts(self, model: StableDiffusion, prompt: str, negative_prompt: str = "") -> RequestNetworks:
        """:meth:`networks_for` of a prompt and a negative prompt."""
        embeddings = self.embeddings_for(model, prompt, negative_prompt)
        return RequestNetworks(embeddings=embeddings, infotext=ti_hashes(embeddings.values()))


def ti_hashes(embeddings: Iterable[TextualInversion]) -> dict[str, str]:
    """``{"TI hashes": "name: hash, ..."}`` as A1111 writes it (``:`` and ``,`` dropped from names;
    embeddings without a hash left out); {} when none has one."""
    parts = [f"{ti.name.replace(':', '').replace(',', '')}: {ti.hash}" for ti in embeddings if ti.hash]
    return {TI_HASHES: ", ".join(parts)} if parts else {}
