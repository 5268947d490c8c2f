"""Training data: image sources, deterministic batches, and the U-Net stage's latent cache.

A *source* maps an index to an :class:`Example` (image in [-1, 1], caption, and whatever
structured description of the item its data source keeps, opaque here). This module
knows the image-caption folder (:class:`FolderSource`); :func:`opensd.training.sources.open_source`
picks the source a :class:`DataConfig` names. A source may know more of its captions
than their words: :class:`HardNegativeSource` writes captions false for an item, and
:class:`GroundedSource` says where each caption word's object is, and :class:`SegmentedSource`
gives each pixel's class (the shapes world does all three). :func:`batch_indices` says which indices
rank ``r`` of ``W`` uses at step ``s``: global positions ``s * B + r * B/W + i`` in one
stream, which is either the endless shapes stream itself or a pool of N items read
in a fresh shuffle per epoch. The positions depend only on (seed, step), so batches
are the same whatever the world size, and a resumed run sees the batches an
uninterrupted run does.

The latent cache (Rombach et al. 2022 train the U-Net on latents of a frozen
autoencoder) encodes a pool of N examples once: VAE latents (posterior mode,
scaled by ``to_latent``) and the frozen text conditioning of each caption as named
tensors (``context``, and SDXL's ``pooled`` text embedding), plus the empty
caption's (for caption dropout). It is a safetensors file whose name holds hashes
of the VAE weights, the text encoders' weights and tokenizer, and the data
settings, so a changed input never reuses a stale cache. Its tensors are
``latents``, ``cond.<name>`` and ``empty.<name>`` (version 2, in the file's
metadata); a version-1 file (``context``, ``empty_context``) is still read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from opensd.config import to_dict
from opensd.errors import OpenSDError
from opensd.pipelines.images import from_uint8
from opensd.pipelines.images import pil_to_tensor as pil_to_tensor  # the old names, re-exported
from opensd.pipelines.images import tensor_to_pil as tensor_to_pil
from opensd.training.config import DataConfig

if TYPE_CHECKING:
    from opensd.models.vae import AutoencoderKL


class TrainingDataError(OpenSDError):
    """Training data cannot be read or cached as configured."""


@dataclass(frozen=True)
class Example:
    """One training item: ``image`` (3, H, W) float32 in [-1, 1], its caption, and what its source
    knows of it beyond the words (the shapes world: the caption's spec and the exact scene; None
    elsewhere). Training passes ``spec`` and ``scene`` back to the source, never reads them."""

    image: torch.Tensor
    caption: str
    spec: Any = None
    scene: Any = None


class Source(Protocol):
    """Indexable training items; ``pool`` is the number of items, or None for an endless stream."""

    @property
    def pool(self) -> int | None: ...

    def __getitem__(self, index: int) -> Example: ...

    def captions(self, n: int) -> list[str]: ...

    def prefill(self, n: int, workers: int) -> None: ...


@runtime_checkable
class HardNegativeSource(Protocol):
    """A source that can write captions *false* for its items in nearly their words (NegCLIP's
    hard negatives; the CLIP stage adds them as extra text candidates)."""

    def hard_negative_captions(self, batch: Batch, rng: random.Random, k: int) -> list[list[str]]:
        """``k`` false captions per item of ``batch``, drawn with ``rng``, each worded like the item's caption."""
        ...


@runtime_checkable
class GroundedSource(Protocol):
    """A source that knows which caption words name which object, and where the object is
    (TokenCompose's grounding targets, :mod:`opensd.training.grounding`)."""

    def grounding_targets(self, batch: Batch, tokenizer: Any,
                          latent_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Context positions (B, G, K) long (-1: none) of each object group's grounded words
        in ``tokenizer``'s framing of each caption, and the groups' masks (B, G, h, w) in [0, 1]."""
        ...


@runtime_checkable
class ControlMapSource(Protocol):
    """A source that can draw each item's control map: the image a ControlNet is trained to
    follow (the shapes world draws its layout maps, :mod:`opensd.shapes.layout`)."""

    def control_maps(self, examples: Sequence[Example], size: int) -> torch.Tensor:
        """The control map of each example (N, 3, size, size) uint8."""
        ...


@runtime_checkable
class SegmentedSource(Protocol):
    """A source that knows each pixel's class (the segment stage's targets): ``segment_classes``
    names the classes, class id = position, background first."""

    segment_classes: tuple[str, ...]

    def label_maps(self, batch: Batch) -> torch.Tensor:
        """(B, H, W) int64 class ids of ``batch``'s images, exact."""
        ...


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square, then resize to ``size`` (Lanczos) when needed."""
    w, h = image.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s))
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.LANCZOS)


class FolderSource:
    """An image-caption folder, read once into memory (8-bit) at ``image_size``."""

    def __init__(self, cfg: DataConfig) -> None:
        from opensd.data.imagefolder import read_imagefolder

        items = [(square_resize(im, cfg.image_size), text) for im, text in read_imagefolder(cfg.path)]
        arrays = [np.asarray(im.convert("RGB")) for im, _ in items]
        self.images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8
        self.texts = [t for _, t in items]
        self.pool = len(items)

    def __getitem__(self, index: int) -> Example:
        return Example(from_uint8(self.images[index]), self.texts[index])

    def captions(self, n: int) -> list[str]:
        return self.texts[:n]

    def prefill(self, n: int, workers: int) -> None:
        """Nothing to do: the folder is read into memory when opened."""


# ----------------------------------------------------------------------------- batches


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, pool: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, pool]).permutation(pool)


def batch_indices(seed: int, step: int, rank: int, world: int, local_batch: int, pool: int | None) -> list[int]:
    """Source indices of rank ``rank``'s share of the global batch at ``step`` (0-based)."""
    start = (step * world + rank) * local_batch
    positions = range(start, start + local_batch)
    if pool is None:
        return list(positions)
    out = []
    for p in positions:
        epoch, k = divmod(p, pool)
        out.append(int(_epoch_order(seed, epoch, pool)[k]))
    return out


@dataclass
class Batch:
    """Images (B, 3, H, W) in [-1, 1], captions, the items' specs and scenes (see :class:`Example`), source indices."""

    images: torch.Tensor
    captions: list[str]
    specs: list[Any]
    indices: list[int]
    scenes: list[Any] = field(default_factory=list)


def load_batch(source: Source, indices: Sequence[int]) -> Batch:
    items = [source[i] for i in indices]
    return Batch(torch.stack([e.image for e in items]), [e.caption for e in items], [e.spec for e in items],
                 list(indices), [e.scene for e in items])


# ----------------------------------------------------------------------------- the latent cache

CACHE_VERSION = 2  # 1: "context" / "empty_context" (no metadata); 2: "cond.<key>" / "empty.<key>"
_VERSION_KEY = "opensd_cache_version"
TextConditioning = dict[str, torch.Tensor]  # {"context": (B, L, D)} (+ "pooled": (B, P) for SDXL families)
CaptionEncoder = Callable[[list[str]], TextConditioning]


def state_hash(*modules: torch.nn.Module, extra: bytes = b"") -> str:
    """SHA-256 (hex) of the modules' state dicts (names, dtypes, shapes, bytes) and ``extra``."""
    h = hashlib.sha256()
    for m in modules:
        for k, v in sorted(m.state_dict().items()):
            t = v.detach().cpu().contiguous()
            h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(extra)
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """SHA-256 (hex) of the files ``tokenizer.save`` writes."""
    import tempfile

    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                h.update(f.relative_to(d).as_posix().encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def cache_path(
    folder: Path, vae_hash: str, text_hash: str, data: DataConfig, n: int, text_dtype: str, grounding: bool = False
) -> Path:
    settings = {k: v for k, v in to_dict(data).items() if k != "workers"}  # workers change speed, not data
    if settings.get("world") == "classic":
        del settings["world"]  # the classic world's caches keep the names they had before there was a choice
    fields = {"data": settings, "n": n, "text_dtype": text_dtype}
    if grounding:
        fields["grounding"] = True
    key = json.dumps(fields, sort_keys=True)
    data_hash = hashlib.sha256(key.encode()).hexdigest()
    return folder / f"latents-vae{vae_hash[:12]}-text{text_hash[:12]}-data{data_hash[:12]}.safetensors"


@torch.no_grad()
def build_latent_cache(
    source: Source,
    n: int,
    vae: AutoencoderKL,
    encode: CaptionEncoder,
    tokenizer,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    text_dtype: torch.dtype = torch.float16,
    progress: bool = False,
    grounding: bool = False,
) -> dict[str, torch.Tensor]:
    """Encode items ``0 .. n-1`` of ``source`` into the tensors of a version-2 cache file.

    ``encode(captions)`` gives the frozen text conditioning of a batch of captions as
    named tensors (``context`` (B, L, D), and ``pooled`` (B, P) for SDXL families).
    Returns ``latents`` (n, C, h, w) float32 (``vae.to_latent`` of the posterior mode),
    ``cond.<key>`` (n, ...) in ``text_dtype`` and ``empty.<key>`` (1, ...) float32 (the
    empty caption). With ``grounding`` (a :class:`GroundedSource` only) also
    ``ground_tokens`` (n, G, K) int64 and ``ground_masks`` (n, G, h, w) float16, the
    source's :meth:`~GroundedSource.grounding_targets`.
    """
    if source.pool is not None and n > source.pool:
        raise TrainingDataError(f"the latent cache wants {n} items but the data holds only {source.pool}")
    if grounding and not isinstance(source, GroundedSource):
        raise TrainingDataError("grounding needs object masks, which only the shapes world (data.source = "
                                "'shapes') has; set grounding_weight = 0 for other data")
    from tqdm import tqdm

    latents, conds, tokens, masks = [], [], [], []
    bar = tqdm(total=n, desc="caching latents", unit="img", disable=not progress)
    for start in range(0, n, batch_size):
        b = load_batch(source, range(start, min(start + batch_size, n)))
        z = vae.encode(b.images.to(device)).mode()
        latents.append(vae.to_latent(z).float().cpu())
        conds.append({k: v.to(text_dtype).cpu() for k, v in encode(b.captions).items()})
        if grounding:
            assert isinstance(source, GroundedSource)  # checked above
            h, w = latents[-1].shape[-2:]
            ground_tokens, ground_masks = source.grounding_targets(b, tokenizer, (h, w))
            tokens.append(ground_tokens)
            masks.append(ground_masks.half())
        bar.update(len(b.indices))
    bar.close()
    out = {"latents": torch.cat(latents)}
    out.update({f"cond.{k}": torch.cat([c[k] for c in conds]) for k in conds[0]})
    out.update({f"empty.{k}": v.float().cpu() for k, v in encode([""]).items()})
    if grounding:
        out.update(ground_tokens=torch.cat(tokens), ground_masks=torch.cat(masks))
    return out


def write_latent_cache(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a cache file (atomically), stamped with :data:`CACHE_VERSION`."""
    from opensd.checkpoints.io import write_safetensors

    write_safetensors(tensors, path, metadata={**metadata, _VERSION_KEY: str(CACHE_VERSION)})


@dataclass
class LatentCache:
    """A cache file's contents: latents (N, C, h, w), the captions' text conditioning
    (``cond``: name -> (N, ...)) and the empty caption's (``empty``: name -> (1, ...)),
    and the other tensors (grounding targets) by name."""

    latents: torch.Tensor
    cond: TextConditioning
    empty: TextConditioning
    extra: dict[str, torch.Tensor]


def read_latent_cache(path: Path, text_keys: Sequence[str]) -> LatentCache:
    """Read the cache at ``path``; ``text_keys`` are the text tensors the stage needs
    (``context``, and ``pooled`` for SDXL families).

    A version-1 file (opensd before the conditioning dicts: ``context`` and
    ``empty_context``) is read as ``{"context": ...}``; a file of another version, or one
    lacking a needed tensor, is refused with a :class:`TrainingDataError` saying to rebuild it.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    rebuild = f"delete {path} (or the run's cache/ folder) and run again to rebuild it"
    with safe_open(str(path), "pt") as f:
        version = (f.metadata() or {}).get(_VERSION_KEY, "1")
    tensors = load_file(str(path))
    if version == "1":
        renamed = {"context": "cond.context", "empty_context": "empty.context"}
        tensors = {renamed.get(k, k): v for k, v in tensors.items()}
    elif version != str(CACHE_VERSION):
        raise TrainingDataError(f"the latent cache {path} has version {version!r}; this opensd reads versions 1 "
                                f"and {CACHE_VERSION}: {rebuild}")
    wanted = ["latents"] + [f"{part}.{k}" for part in ("cond", "empty") for k in text_keys]
    missing = [k for k in wanted if k not in tensors]
    if missing:
        raise TrainingDataError(f"the latent cache {path} (version {version}) lacks {', '.join(missing)}, which this "
                                f"model needs: {rebuild}")
    cond = {k: tensors.pop(f"cond.{k}") for k in text_keys}
    empty = {k: tensors.pop(f"empty.{k}") for k in text_keys}
    return LatentCache(tensors.pop("latents"), cond, empty, tensors)


# ----------------------------------------------------------------------------- frozen parts from earlier stages

VAE_FOLDER = "vae"
TEXT_FOLDER = "text_encoder"
_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"


def _stage_folder(path: str | Path, sub: str, what: str, flag: str) -> Path:
    """``path / sub`` when ``path`` is a run folder holding it, else ``path`` itself."""
    if not str(path):
        raise TrainingDataError(f"no {what} given: pass {flag} RUN_DIR (the output folder of that stage)")
    p = Path(path)
    if not p.exists():
        raise TrainingDataError(f"{what} not found: {p} does not exist")
    folder = p / sub if (p / sub / _CONFIG).is_file() else p
    if not (folder / _CONFIG).is_file() or not (folder / _WEIGHTS).is_file():
        raise TrainingDataError(
            f"{p} holds no exported {what} (expected {folder / _CONFIG} and {folder / _WEIGHTS}); "
            f"give the run folder of a finished stage"
        )
    return folder


def save_vae(vae: torch.nn.Module, folder: str | Path) -> Path:
    """Write an autoencoder as ``config.json`` (``{"format": "opensd-vae", "vae": VAEConfig}``) + safetensors."""
    from opensd.checkpoints.io import write_json, write_safetensors

    folder = Path(folder)
    write_safetensors(vae.state_dict(), folder / _WEIGHTS)
    write_json({"format": "opensd-vae", "version": 1, "vae": to_dict(vae.cfg)}, folder / _CONFIG)
    return folder


def load_vae(path: str | Path):
    """The autoencoder exported by the VAE stage: ``path`` is its run folder or its ``vae/`` folder."""
    from opensd.checkpoints.io import load_strict, read_json, read_weights
    from opensd.config import from_dict
    from opensd.models.vae import AutoencoderKL, VAEConfig

    folder = _stage_folder(path, VAE_FOLDER, "VAE", "--vae")
    meta = read_json(folder / _CONFIG)
    if meta.get("format") != "opensd-vae":
        raise TrainingDataError(f"{folder / _CONFIG} is not an exported VAE (format {meta.get('format')!r})")
    vae = AutoencoderKL(from_dict(VAEConfig, meta["vae"], _where=str(folder / _CONFIG)))
    load_strict(vae, read_weights(folder / _WEIGHTS), str(folder / _WEIGHTS))
    return vae.eval()


def save_text_encoder(text_encoder: torch.nn.Module, tokenizer, folder: str | Path) -> Path:
    """Write a CLIP text encoder + its tokenizer (``config.json``, safetensors, ``tokenizer/``)."""
    from opensd.checkpoints.io import write_json, write_safetensors

    folder = Path(folder)
    write_safetensors(text_encoder.state_dict(), folder / _WEIGHTS)
    tokenizer.save(folder / "tokenizer")
    write_json({"format": "opensd-text-encoder", "version": 1, "text": to_dict(text_encoder.cfg)}, folder / _CONFIG)
    return folder


def load_text_encoder(path: str | Path):
    """(CLIPTextModel, tokenizer) exported by the CLIP stage: its run folder or ``text_encoder/`` folder."""
    from opensd.checkpoints.io import load_strict, read_json, read_weights
    from opensd.config import from_dict
    from opensd.models.clip import CLIPTextConfig, CLIPTextModel
    from opensd.tokenizers import load_tokenizer

    folder = _stage_folder(path, TEXT_FOLDER, "text encoder", "--clip")
    meta = read_json(folder / _CONFIG)
    if meta.get("format") != "opensd-text-encoder":
        raise TrainingDataError(f"{folder / _CONFIG} is not an exported text encoder (format {meta.get('format')!r})")
    model = CLIPTextModel(from_dict(CLIPTextConfig, meta["text"], _where=str(folder / _CONFIG)))
    load_strict(model, read_weights(folder / _WEIGHTS), str(folder / _WEIGHTS))
    return model.eval(), load_tokenizer(folder / "tokenizer")
