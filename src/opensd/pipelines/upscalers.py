"""Upscalers by name, as A1111 names them: latent modes, resampling filters, model files.

Three kinds (:class:`UpscalerKind`):

- **latent** (the hires fix only): the latent itself is interpolated, A1111's
  ``latent_upscale_modes``: ``Latent`` (bilinear), ``Latent (antialiased)``,
  ``Latent (bicubic)``, ``Latent (bicubic antialiased)``, ``Latent (nearest)``,
  ``Latent (nearest-exact)`` (:func:`upscale_latent`, ``torch.nn.functional.interpolate``);
- **resampling** of the decoded image: ``Lanczos``, ``Nearest``, and A1111's ``None``
  (no upscaler: the image resized to the target with Lanczos, as A1111's ``resize_image``
  does; the extras routes return the image as it is);
- **model**: an upscaler network file (ESRGAN, Real-ESRGAN, SwinIR...:
  :mod:`opensd.pipelines.upscale_models`) from an :class:`UpscalerLibrary`'s folder, named
  by its file's stem as A1111 names ESRGAN models, or by its path where paths are allowed
  (the CLI). As A1111's ``Upscaler.upscale``: the model runs up to three times until the
  image covers the target size, then Lanczos gives the exact size.

A name is matched exactly, then ignoring case; an unknown one is an :class:`UpscalerError`
listing the names there are. The library loads each file once and keeps the last
``max_loaded`` models (they are stateless: requests share them safely).
"""

from __future__ import annotations

import enum
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from opensd.pipelines.upscale_models import DEFAULT_TILE, SUFFIXES, UpscalerError, UpscalerModel, load_upscaler_model, run_tiled

# A1111's latent_upscale_modes: name -> (interpolate mode, antialias)
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
DEFAULT_LATENT = "Latent"  # A1111's latent_upscale_default_mode
RESAMPLERS: dict[str, Image.Resampling] = {
    "None": Image.Resampling.LANCZOS,
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}
MAX_MODEL_PASSES = 3  # A1111's Upscaler.upscale
ENV_VAR = "OPENSD_UPSCALER_DIR"
DEFAULT_FOLDER = Path("models") / "ESRGAN"  # A1111's, relative to the working directory
SHOW_NAMES = 12
_SCALE_IN_NAME = re.compile(r"(?:^|[^a-z0-9])(?:(\d)x|x(\d))(?:[^a-z0-9]|$)", re.IGNORECASE)


def default_upscaler_dir() -> Path | None:
    """``$OPENSD_UPSCALER_DIR`` if set, else ``models/ESRGAN`` of the working directory if it is a folder, else None."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env)
    return DEFAULT_FOLDER if DEFAULT_FOLDER.is_dir() else None


class UpscalerKind(enum.Enum):
    LATENT = "latent"
    RESAMPLE = "resample"
    MODEL = "model"


@dataclass(frozen=True, eq=False)
class Upscaler:
    """A resolved upscaler: its canonical ``name`` and what it runs."""

    name: str
    kind: UpscalerKind
    model: UpscalerModel | None = None

    @property
    def latent(self) -> bool:
        return self.kind is UpscalerKind.LATENT

    def upscale_image(self, image: Image.Image, width: int, height: int, *, tile: int = DEFAULT_TILE) -> Image.Image:
        """``image`` at ``width`` x ``height`` (module doc; a model runs on ``tile`` px tiles); a latent upscaler cannot."""
        if self.kind is UpscalerKind.LATENT:
            raise UpscalerError(f"{self.name!r} upscales latents (the hires fix), not images; "
                                f"give {', '.join(RESAMPLERS)} or an upscaler model")
        image = image.convert("RGB")
        if self.kind is UpscalerKind.RESAMPLE or self.model is None:
            return image.resize((width, height), RESAMPLERS[self.name])
        if width > image.width or height > image.height:
            for _ in range(MAX_MODEL_PASSES):
                image = run_tiled(self.model, image, tile=tile)
                if image.width >= width and image.height >= height:
                    break
        return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


def upscale_latent(latent: torch.Tensor, height: int, width: int, name: str) -> torch.Tensor:
    """``latent`` (B, C, h, w) interpolated to (B, C, height, width) as the latent mode ``name`` does."""
    mode, antialias = LATENT_MODES[name]
    return F.interpolate(latent, size=(height, width), mode=mode, antialias=antialias)


def _match(name: str, names: list[str]) -> str | None:
    if name in names:
        return name
    low = name.lower()
    hits = [n for n in names if n.lower() == low]
    return hits[0] if len(hits) == 1 else None


@dataclass(frozen=True)
class UpscalerEntry:
    """A model file of the folder: its ``name`` (the stem) and ``path``."""

    name: str
    path: Path

    def scale_hint(self) -> int:
        """The scale the file's name says (``4x-UltraSharp``, ``RealESRGAN_x2plus``), else 4 (A1111's default)."""
        m = _SCALE_IN_NAME.search(self.name)
        return int(m.group(1) or m.group(2)) if m else 4


def scan_folder(folder: Path) -> list[UpscalerEntry]:
    """Every upscaler file under ``folder`` (subfolders too; hidden ones skipped), sorted by path."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).parts
        if path.suffix.lower() in SUFFIXES and not any(p.startswith(".") for p in rel) and path.is_file():
            out.append(UpscalerEntry(path.stem, path))
    return out


class UpscalerLibrary:
    """The built-in upscalers and the model files of ``folder`` (None: none). Thread-safe.

    ``device``/``dtype``: where loaded models run; ``allow_paths``: a name may also be a
    file's path (the CLI; never the server, whose clients name only what it lists)."""

    def __init__(
        self, folder: str | Path | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
        max_loaded: int = 2, allow_paths: bool = False,
    ):
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None and not self.folder.is_dir():
            raise UpscalerError(f"the upscaler folder {self.folder} is not a folder")
        self.device, self.dtype, self.max_loaded, self.allow_paths = torch.device(device), dtype, max(1, max_loaded), allow_paths
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._models: OrderedDict[tuple[Path, int], UpscalerModel] = OrderedDict()
        self._entries: list[UpscalerEntry] = []
        self.refresh()

    def refresh(self) -> list[UpscalerEntry]:
        entries = scan_folder(self.folder) if self.folder is not None else []
        with self._lock:
            self._entries = entries
        return list(entries)

    def entries(self) -> list[UpscalerEntry]:
        with self._lock:
            return list(self._entries)

    def names(self) -> list[str]:
        """Every name :meth:`resolve` takes: the latent modes, the resamplers, then the files."""
        return [*LATENT_MODES, *RESAMPLERS, *(e.name for e in self.entries())]

    def listing(self) -> list[dict[str, Any]]:
        """A1111's ``/sdapi/v1/upscalers``: the resamplers and the files (latent modes are listed apart)."""
        items = [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4} for n in RESAMPLERS]
        for e in self.entries():
            loaded = self._cached(e.path)
            items.append({"name": e.name, "model_name": loaded.architecture if loaded else None, "model_path": str(e.path),
                          "model_url": None, "scale": loaded.scale if loaded else e.scale_hint()})
        return items

    def resolve(self, name: Any, *, latent: bool = True, what: str = "upscaler") -> Upscaler:
        """The upscaler ``name`` names (module doc); ``latent=False``: the latent modes are refused
        (they upscale latents, not images). ``what`` names the field in errors."""
        if not isinstance(name, str) or not name.strip():
            raise UpscalerError(f"{what} must be an upscaler name, got {name!r:.60}; known: {self._known(latent)}")
        name = name.strip()
        hit = _match(name, list(LATENT_MODES))
        if hit is not None:
            if not latent:
                raise UpscalerError(f"{what} {hit!r} upscales latents (only the hires fix can use it); "
                                    f"known here: {self._known(False)}")
            return Upscaler(hit, UpscalerKind.LATENT)
        hit = _match(name, list(RESAMPLERS))
        if hit is not None:
            return Upscaler(hit, UpscalerKind.RESAMPLE)
        entries = self.entries()
        found = [e for e in entries if e.name == name or e.path.name == name] or \
                [e for e in entries if name.lower() in (e.name.lower(), e.path.name.lower())]
        if len(found) > 1:
            raise UpscalerError(f"{what} {name!r} is ambiguous: {', '.join(str(e.path) for e in found)}; rename one of the files")
        if found:
            return Upscaler(found[0].name, UpscalerKind.MODEL, self.model(found[0].path))
        if self.allow_paths and Path(name).expanduser().is_file():
            model = self.model(Path(name).expanduser())
            return Upscaler(model.name, UpscalerKind.MODEL, model)
        where = f" (folder {self.folder})" if self.folder is not None else " (no upscaler folder is set: --upscaler-dir)"
        raise UpscalerError(f"unknown {what} {name!r}{where}; known: {self._known(latent)}")

    def _known(self, latent: bool) -> str:
        names = [n for n in self.names() if latent or n not in LATENT_MODES]
        more = f" and {len(names) - SHOW_NAMES} more" if len(names) > SHOW_NAMES else ""
        return ", ".join(names[:SHOW_NAMES]) + more + (", or a model file's path" if self.allow_paths else "")

    def _cached(self, path: Path) -> UpscalerModel | None:
        try:
            key = (path.resolve(), path.stat().st_mtime_ns)
        except OSError:
            return None
        with self._lock:
            return self._models.get(key)

    def model(self, path: Path) -> UpscalerModel:
        """The model in ``path``, loaded once (again when the file changes), the last ``max_loaded`` kept."""
        try:
            key = (path.resolve(), path.stat().st_mtime_ns)
        except OSError as e:
            raise UpscalerError(f"upscaler model {path} cannot be read ({e.strerror or e})") from None
        with self._load_lock:
            with self._lock:
                if key in self._models:
                    self._models.move_to_end(key)
                    return self._models[key]
            model = load_upscaler_model(path, device=self.device, dtype=self.dtype)
            with self._lock:
                self._models[key] = model
                while len(self._models) > self.max_loaded:
                    self._models.popitem(last=False)
            return model
