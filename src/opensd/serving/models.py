"""The checkpoints a server can draw with, and the one it draws with now.

Checkpoints are discovered in a models folder (its direct children: diffusers folders,
opensd folders, ``.safetensors``/``.ckpt`` files) plus the model the server was started
with. Each is named as A1111 names them: ``model_name`` is the file's stem or the
folder's name; ``title`` is ``"<file or folder name> [<short hash>]"``, the hash being the
first 10 hex digits of the main weight file's SHA-256 (known for loaded models and files
under 512 MiB; until then the title is the bare name). Setting the option
``sd_model_checkpoint`` to any of title, model_name, file name, hash or path switches
the current model. Each item also says the model's ``family`` (``sd1``, ``sd2``, ``sdxl``,
``sdxl_refiner``) and its native ``image_size`` (:mod:`opensd.serving.model_kind`).

A symlink in the models folder is listed by the link's own name (two links to one
file are two entries, one loaded pipeline): a checkpoint's ``path`` is where it was
found, its ``key`` the file it resolved to then, by which loaded pipelines are cached
(a link pointed elsewhere later is a new checkpoint; the loaded one stays valid).

Loaded pipelines are kept in a small cache (the current one is never evicted); a
pipeline is stateless, so a request keeps the one it started with even if the current
model changes under it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from opensd.checkpoints import detect_format, main_weights_file
from opensd.checkpoints.io import CheckpointError, full_hash
from opensd.errors import OpenSDError
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.serving.errors import ApiError
from opensd.serving.model_kind import ModelKind, probe

log = logging.getLogger("opensd.serving")

MODEL_SUFFIXES = (".safetensors", ".ckpt")
HASH_EAGERLY_BELOW = 512 * 2**20  # larger files are hashed when first loaded, not when listed


class ModelsFolderError(OpenSDError):
    """The models folder cannot be listed (it was removed or is unreadable): 503, naming the folder."""

    status = 503
    kind = "ModelsFolderError"


@dataclass(frozen=True)
class Checkpoint:
    """A model on disk. ``label`` is the file or folder name (with extension), a symlink's own name for a link."""

    path: Path
    label: str
    model_name: str
    key: Path  # the file or folder itself (symlinks resolved when found): what loaded pipelines are cached by

    @classmethod
    def at(cls, path: Path) -> Checkpoint:
        path = path.expanduser().absolute()  # not resolved: a symlink keeps its own name
        return cls(path, path.name, path.stem if path.is_file() else path.name, path.resolve())

    def title(self, short: str | None) -> str:
        return f"{self.label} [{short}]" if short else self.label


def discover(models_dir: Path) -> list[Checkpoint]:
    """Direct children of ``models_dir`` that are models, sorted by name."""
    try:
        children = sorted(models_dir.iterdir(), key=lambda p: p.name.lower())
    except OSError as e:
        raise ModelsFolderError(f"the models folder {models_dir} cannot be listed ({type(e).__name__}: {e.strerror or e})") from None
    found = []
    for child in children:
        if child.name.startswith("."):
            continue
        try:
            if child.is_file() and child.suffix.lower() not in MODEL_SUFFIXES:
                continue
            detect_format(child)
        except CheckpointError:
            continue
        except OSError as e:  # unreadable: not listed, but said
            log.warning("models folder: skipping %s (%s: %s)", child, type(e).__name__, e)
            continue
        found.append(Checkpoint.at(child))
    return found


class ModelRegistry:
    """Lists checkpoints, resolves names, loads pipelines (one load at a time) and holds the current one."""

    def __init__(
        self,
        initial: str | Path | StableDiffusionPipeline | None,
        models_dir: Path | None = None,
        *,
        loader: Callable[[Path], StableDiffusionPipeline] = StableDiffusionPipeline.from_path,
        max_loaded: int = 2,
    ):
        if models_dir is not None and not Path(models_dir).is_dir():
            raise OpenSDError(f"models folder not found: {models_dir}")
        self.models_dir = Path(models_dir).expanduser().absolute() if models_dir is not None else None
        self.loader = loader
        self.max_loaded = max(1, max_loaded)
        self._lock = threading.Lock()  # guards the cache and the current model; held briefly
        self._load_lock = threading.Lock()  # one model load at a time
        self._hashes: dict[tuple[Path, int, float], str] = {}
        self._kinds: dict[tuple[Path, float], ModelKind] = {}  # probed, by (key, mtime)
        self._cache: OrderedDict[Path, StableDiffusionPipeline] = OrderedDict()  # by Checkpoint.key
        self._extra: list[Checkpoint] = []
        if isinstance(initial, StableDiffusionPipeline):
            ckpt = Checkpoint.at(initial.loaded.path)
            self._extra.append(ckpt)
            self._cache[ckpt.key] = initial
            self._current = ckpt
        else:
            if initial is None:
                listed = self.checkpoints()
                if not listed:
                    where = f" in {self.models_dir}" if self.models_dir else ""
                    raise OpenSDError(f"no model to serve: give a model path or a models folder that holds one{where}")
                ckpt = listed[0]
            else:
                ckpt = Checkpoint.at(Path(initial))
                self._extra.append(ckpt)
            self._current = ckpt
            self._cache[ckpt.key] = self.loader(ckpt.path)

    # ---------------------------------------------------------------- listing

    def checkpoints(self) -> list[Checkpoint]:
        found = discover(self.models_dir) if self.models_dir is not None else []
        known = {(c.key, c.label) for c in found}  # the same model under the same name
        return [c for c in self._extra if (c.key, c.label) not in known] + found

    def sha256(self, ckpt: Checkpoint) -> str | None:
        """The main weight file's SHA-256 (cached). Files over 512 MiB are not hashed here: a
        multi-GB checkpoint takes many seconds, so a listing shows ``None`` for them."""
        try:
            f = main_weights_file(ckpt.path, detect_format(ckpt.path)).resolve()
            st = f.stat()
        except (CheckpointError, OSError):
            return None
        key = (f, st.st_size, st.st_mtime)
        if key not in self._hashes:
            if st.st_size > HASH_EAGERLY_BELOW:
                return None
            try:
                self._hashes[key] = full_hash(f)
            except OSError as e:  # removed or unreadable since the listing: no hash, said in the log
                log.warning("cannot hash %s (%s: %s)", f, type(e).__name__, e)
                return None
        return self._hashes[key]

    def short_hash(self, ckpt: Checkpoint) -> str | None:
        """A1111's 10-digit hash: known for every loaded model (the loader computed it) and small files."""
        with self._lock:
            pipe = self._cache.get(ckpt.key)
        if pipe is not None:
            return pipe.loaded.hash
        sha = self.sha256(ckpt)
        return sha[:10] if sha else None

    def kind(self, ckpt: Checkpoint) -> ModelKind:
        """Family and native size: a loaded model's own; else probed without its weights (cached per mtime)."""
        with self._lock:
            pipe = self._cache.get(ckpt.key)
        if pipe is not None:
            return ModelKind.of(pipe.cfg)
        try:
            fmt = detect_format(ckpt.path)
            key = (ckpt.key, ckpt.key.stat().st_mtime)
        except (CheckpointError, OSError):
            return ModelKind()
        if key not in self._kinds:
            self._kinds[key] = probe(ckpt.path, fmt)
        return self._kinds[key]

    def describe(self, ckpt: Checkpoint) -> dict:
        """A1111's ``/sdapi/v1/sd-models`` item, plus opensd's ``family`` and ``image_size``."""
        short = self.short_hash(ckpt)
        kind = self.kind(ckpt)
        return {
            "title": ckpt.title(short),
            "model_name": ckpt.model_name,
            "hash": short,
            "sha256": self.sha256(ckpt),
            "filename": str(ckpt.path),
            "config": None,
            "family": kind.family,
            "image_size": kind.image_size,
        }

    # ---------------------------------------------------------------- lookup and loading

    @property
    def current(self) -> StableDiffusionPipeline:
        with self._lock:
            return self._cache[self._current.key]

    @property
    def current_checkpoint(self) -> Checkpoint:
        return self._current

    def current_pair(self) -> tuple[Checkpoint, StableDiffusionPipeline]:
        """The current checkpoint and its pipeline, read together (a switch cannot come between them)."""
        with self._lock:
            return self._current, self._cache[self._current.key]

    def find(self, name: str, param: str = "sd_model_checkpoint") -> Checkpoint:
        """The checkpoint called ``name`` (title, model_name, file name, hash or path); 404 if none.

        ``param`` is the field that named it, for the error (``refiner_checkpoint``, say)."""
        if not isinstance(name, str) or not name.strip():
            raise ApiError(
                422, f"{param} must be a non-empty model name (see /sdapi/v1/sd-models), got {name!r:.60}", param=param,
            )
        want = name.strip()
        bare = want.rsplit(" [", 1)[0] if want.endswith("]") else want
        listed = self.checkpoints()
        for ckpt in listed:
            if want in (ckpt.label, ckpt.model_name, str(ckpt.path)) or bare in (ckpt.label, ckpt.model_name):
                return ckpt
        for ckpt in listed:
            sha, short = self.sha256(ckpt), self.short_hash(ckpt)
            if want in {sha, short, ckpt.title(short)} - {None}:
                return ckpt
        titles = ", ".join(self.describe(c)["title"] for c in listed) or "none"
        raise ApiError(404, f"{param}: model {name!r} not found; available: {titles}", param=param)

    def get(self, ckpt: Checkpoint, param: str = "sd_model_checkpoint") -> StableDiffusionPipeline:
        """The pipeline for ``ckpt``, loading it (and evicting the least recently used other one) if needed.

        Loads happen one at a time and outside the cache lock, so listings and progress keep answering.
        """
        key = ckpt.key
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        with self._load_lock:
            with self._lock:
                if key in self._cache:  # loaded by another request meanwhile
                    return self._cache[key]
            pipe = self._load(ckpt, param)
            with self._lock:
                self._cache[key] = pipe
                victims = [p for p in self._cache if p not in (self._current.key, key)]
                while len(self._cache) > self.max_loaded and victims:
                    del self._cache[victims.pop(0)]
            return pipe

    def _load(self, ckpt: Checkpoint, param: str) -> StableDiffusionPipeline:
        """``loader(ckpt.path)``; a model that cannot be loaded is a 4xx naming it (the current model stays)."""
        try:
            pipe = self.loader(ckpt.path)
            decision = getattr(pipe, "precision", None)
            if decision is not None:
                log.info("loaded %s: %s", ckpt.label, decision.reason)
            return pipe
        except OpenSDError as e:
            raise ApiError(e.status if 400 <= e.status < 500 else 422,
                           f"model {ckpt.label!r} cannot be loaded: {' '.join(str(e).split())}",
                           kind=e.kind, param=param) from None

    def switch(self, name: str) -> Checkpoint:
        """Make the model called ``name`` the current one (loading it now)."""
        ckpt = self.find(name)
        self.get(ckpt)
        with self._lock:
            self._current = ckpt
        return ckpt

    def current_title(self) -> str:
        return self.describe(self._current)["title"]
