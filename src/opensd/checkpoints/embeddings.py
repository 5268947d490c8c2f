"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word"): the file
formats, and binding a file to a model's text encoders.

An embedding is ``n`` learned token vectors per text encoder; a prompt that names it gets
those vectors where the name stands (:mod:`opensd.prompts.embedding_names`,
:mod:`opensd.pipelines.conditioning`). The layouts read here, each safely (safetensors,
or ``torch.load(weights_only=True)``, :func:`opensd.checkpoints.io.read_torch_object`)::

    A1111 .pt / .bin          {"string_to_param": {"*": (n, D)}, "string_to_token": {"*": 265},
                               "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    A1111 .safetensors        {"emb_params": (n, D)}
    SDXL (.safetensors, .pt)  {"clip_l": (n, 768), "clip_g": (n, 1280)}
    diffusers learned_embeds  {"<token>": (D,) or (n, D)}  (.safetensors or .bin)

D is the text encoder's width: 768 for SD 1.x (CLIP ViT-L), 1024 for SD 2.x (OpenCLIP
ViT-H), 1280 for SDXL's second encoder and the refiner's (OpenCLIP bigG). Old files whose
``string_to_param`` is a pickled ``torch.nn.ParameterDict`` need code to load and are
refused (convert them with a tool you trust).

As in A1111: the name is the file's stem (whatever the file says inside), the hash is
the first 12 hex digits of the whole file's SHA-256 (the infotext's ``TI hashes``), and
``shape`` is the width (an SDXL file's: 768 + 1280 = 2048).

:func:`bind_embedding` gives a :class:`TextualInversion` whose ``vectors`` are aligned with
``model.text_encoders``: SD 1.x and SD 2.x take the one tensor, SDXL ``clip_l`` (encoder
0) and ``clip_g`` (encoder 1), the refiner ``clip_g`` (or a single 1280-wide tensor).
Everything that does not fit is a one-line :class:`~opensd.checkpoints.lora.LoRAError`
naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opensd.checkpoints.info import FAMILY_NAMES
from opensd.checkpoints.io import CheckpointError, full_hash, read_torch_object, read_weights, write_safetensors
from opensd.checkpoints.lora import LoRAError
from opensd.checkpoints.parameterization import read_metadata
from opensd.models.stable_diffusion import ModelFamily, StableDiffusion

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
MAX_EMBEDDING_BYTES = 32 * 2**20  # 75 vectors of 2048 float32 are 0.6 MB; a larger file is a model or a LoRA
MAX_VECTORS = 75  # one CLIP chunk (77 positions less bos and eos)
SINGLE = "*"  # the key of a one-encoder embedding's tensor
# What an embedding of each width was made for (a single tensor's D).
WIDTH_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 1280: "the SDXL refiner"}
# The tensor each text encoder of a family takes, in model.text_encoders' order.
ENCODER_KEYS: dict[ModelFamily, tuple[str, ...]] = {
    ModelFamily.SD1: (SINGLE,),
    ModelFamily.SD2: (SINGLE,),
    ModelFamily.SDXL: ("clip_l", "clip_g"),
    ModelFamily.SDXL_REFINER: ("clip_g",),
}


@dataclass(frozen=True, eq=False)
class TextualInversion:
    """An embedding bound to a model: ``vectors[i]`` (n, width_i) for ``model.text_encoders[i]``.

    The vectors may be trainable ``nn.Parameter``\\ s: encoding a prompt that names the
    embedding is differentiable in them (outside ``torch.inference_mode``). ``hash``:
    A1111's short hash ("" for one that has no file; it is then left out of ``TI hashes``).
    """

    name: str
    vectors: tuple[torch.Tensor, ...]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    hash: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise LoRAError(f"a textual inversion needs a name, got {self.name!r}")
        vecs = self.vectors
        if not isinstance(vecs, tuple) or not vecs or not all(isinstance(v, torch.Tensor) and v.ndim == 2 for v in vecs):
            raise LoRAError(f"embedding {self.name!r}: vectors must be a tuple of (n, width) tensors, one per text encoder")
        counts = {v.shape[0] for v in vecs}
        if len(counts) != 1 or 0 in counts:
            raise LoRAError(f"embedding {self.name!r}: every text encoder needs the same number (>= 1) of vectors, "
                            f"got {[tuple(v.shape) for v in vecs]}")

    @property
    def count(self) -> int:
        """n: the tokens the embedding takes in a prompt."""
        return int(self.vectors[0].shape[0])


@dataclass(frozen=True, eq=False)
class EmbeddingFile:
    """An embedding file as read, before it meets a model. ``tensors``: float32 (n, D) by key,
    :data:`SINGLE` for a one-encoder embedding, ``clip_l``/``clip_g`` for SDXL's."""

    path: Path
    layout: str  # "a1111", "a1111-safetensors", "sdxl" or "diffusers"
    tensors: Mapping[str, torch.Tensor]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    hash: str = ""

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def vectors(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    @property
    def shape(self) -> int:
        """A1111's ``shape``: the width (an SDXL file's clip_l + clip_g)."""
        return sum(int(t.shape[1]) for t in self.tensors.values())

    def describe(self) -> dict[str, Any]:
        """A1111's ``/sdapi/v1/embeddings`` entry."""
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint, "sd_checkpoint_name": self.sd_checkpoint_name,
                "shape": self.shape, "vectors": self.vectors}


# ----------------------------------------------------------------------------- reading


def read_embedding(path: str | Path) -> EmbeddingFile:
    """Read any layout of the module doc; a :class:`LoRAError` naming the file otherwise."""
    path = Path(path)
    if path.suffix.lower() not in EMBEDDING_SUFFIXES:
        raise LoRAError(f"{path.name}: not an embedding file; use one of {', '.join(EMBEDDING_SUFFIXES)}")
    if path.is_file() and path.stat().st_size > MAX_EMBEDDING_BYTES:
        raise LoRAError(f"{path.name}: {path.stat().st_size / 2**20:.0f} MiB is too large for an embedding "
                        f"(at most {MAX_EMBEDDING_BYTES // 2**20} MiB); is it a model or a LoRA?")
    try:
        data = read_weights(path) if path.suffix.lower() == ".safetensors" else read_torch_object(path)
    except CheckpointError as e:
        raise LoRAError(str(e)) from None
    layout, tensors, meta = _layout(data, path)
    if path.suffix.lower() == ".safetensors":  # A1111's .pt fields travel as header metadata
        try:
            meta = {**read_metadata(path), **meta}
        except CheckpointError as e:
            raise LoRAError(str(e)) from None
    tensors = {k: _vectors(v, path, k) for k, v in tensors.items()}
    if layout == "sdxl" and len({t.shape[0] for t in tensors.values()}) != 1:
        shapes = ", ".join(f"{k} {tuple(t.shape)}" for k, t in tensors.items())
        raise LoRAError(f"{path.name}: clip_l and clip_g must hold the same number of vectors, got {shapes}")
    return EmbeddingFile(path, layout, tensors, _int_or_none(meta.get("step")), _str_or_none(meta.get("sd_checkpoint")),
                         _str_or_none(meta.get("sd_checkpoint_name")), full_hash(path)[:12])


def _layout(data: object, path: Path) -> tuple[str, dict[str, Any], Mapping[str, Any]]:
    """``(layout, tensors by key, metadata)`` of a loaded file, tried in A1111's order."""
    if isinstance(data, torch.Tensor):  # a bare (n, D) tensor
        return "diffusers", {SINGLE: data}, {}
    if not isinstance(data, Mapping) or not data:
        what = "nothing" if isinstance(data, Mapping) else f"a {type(data).__name__}"
        raise LoRAError(f"{path.name}: holds {what}, not an embedding")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            n = len(params) if isinstance(params, Mapping) else type(params).__name__
            raise LoRAError(f"{path.name}: string_to_param must hold one term, it holds {n}")
        return "a1111", {SINGLE: next(iter(params.values()))}, data
    if "clip_l" in data or "clip_g" in data:
        return "sdxl", {k: data[k] for k in ("clip_l", "clip_g") if k in data}, data
    if "emb_params" in data:
        return "a1111-safetensors", {SINGLE: data["emb_params"]}, data
    if len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):  # diffusers: {token: vectors}
        return "diffusers", {SINGLE: next(iter(data.values()))}, {}
    keys = ", ".join(repr(str(k)) for k in list(data)[:6])
    raise LoRAError(f"{path.name}: unknown embedding layout (keys {keys}); opensd reads A1111's string_to_param or "
                    "emb_params, SDXL's clip_l/clip_g, or diffusers' one {token: vectors}")


def _vectors(t: Any, path: Path, key: str) -> torch.Tensor:
    """``t`` as float32 (n, D): a (D,) vector is one vector; empty, non-float or non-finite is an error."""
    where = f"{path.name}: {key if key != SINGLE else 'the embedding'}"
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise LoRAError(f"{where} must be a float tensor (n, width), got {got}")
    t = t.detach().to("cpu", torch.float32)
    if t.ndim == 1:
        t = t[None]  # (D,) -> (1, D)
    if t.ndim != 2:
        raise LoRAError(f"{where} must be (n, width), got {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise LoRAError(f"{where} is empty {tuple(t.shape)}: an embedding needs at least one vector")
    if t.shape[0] > MAX_VECTORS:
        raise LoRAError(f"{where} holds {t.shape[0]} vectors; at most {MAX_VECTORS} fit in one prompt chunk")
    if not bool(torch.isfinite(t).all()):
        raise LoRAError(f"{where} holds NaN or infinite values")
    return t


def _int_or_none(v: Any) -> int | None:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():  # safetensors metadata holds strings
        return int(v)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _str_or_none(v: Any) -> str | None:
    return v if isinstance(v, str) else None


# ----------------------------------------------------------------------------- binding


def _width_note(width: int, what: str) -> str:
    family = WIDTH_FAMILIES.get(width)
    return f"{what} {width} wide" + (f", for {family}" if family else "")


def bind_embedding(file: EmbeddingFile, model: StableDiffusion) -> TextualInversion:
    """``file`` as a :class:`TextualInversion` of ``model``, on its device and in its dtype."""
    family = model.cfg.family
    encoders = model.text_encoders
    label = FAMILY_NAMES.get(family, family.value)
    if file.layout == "sdxl" and family not in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER):
        raise LoRAError(f"{file.path.name}: this is an SDXL embedding (clip_l, clip_g); the model is {label}")
    keys = ENCODER_KEYS[family]
    if file.layout != "sdxl":
        if family is ModelFamily.SDXL:
            (width,) = (t.shape[1] for t in file.tensors.values())
            raise LoRAError(f"{file.path.name}: an SDXL model needs an embedding with clip_l and clip_g; this file holds "
                            f"one {_width_note(width, 'tensor')}")
        keys = (SINGLE,)
    missing = [k for k in keys if k not in file.tensors]
    if missing:
        raise LoRAError(f"{file.path.name}: an {label} model needs {' and '.join(keys)}; this SDXL embedding has no "
                        f"{', '.join(missing)}")
    vectors = []
    for key, enc in zip(keys, encoders, strict=False):
        t = file.tensors[key]
        if t.shape[1] != enc.cfg.width:
            what = "this embedding" if key == SINGLE else f"its {key}"
            raise LoRAError(f"{file.path.name}: {_width_note(int(t.shape[1]), what + ' is')}; the model's text encoder "
                            f"is {enc.cfg.width} wide ({label})")
        p = next(enc.parameters())
        vectors.append(t.to(p.device, p.dtype))
    ti = TextualInversion(file.name, tuple(vectors), file.step, file.sd_checkpoint, file.sd_checkpoint_name, file.hash)
    check_fits(ti, model)
    return ti


def check_fits(ti: TextualInversion, model: StableDiffusion) -> None:
    """A :class:`LoRAError` unless ``ti`` has one (n, width) tensor per text encoder of
    ``model`` and n fits in one chunk (a model with a BERT text encoder takes none)."""
    if model.cfg.has_bert:
        raise LoRAError(f"embedding {ti.name!r}: textual-inversion embeddings need a CLIP text encoder; this model's is a BERT")
    encoders = model.text_encoders
    widths = [e.cfg.width for e in encoders]
    got = [int(v.shape[1]) for v in ti.vectors]
    if got != widths:
        raise LoRAError(f"embedding {ti.name!r} has vectors {got} wide; this model's text encoders are {widths} wide")
    chunk = min(e.cfg.max_length for e in encoders) - 2
    if ti.count > chunk:
        raise LoRAError(f"embedding {ti.name!r} holds {ti.count} vectors; at most {chunk} fit in one prompt chunk")


# ----------------------------------------------------------------------------- writing


def write_embedding(ti: TextualInversion, path: str | Path, model: StableDiffusion) -> Path:
    """Write ``ti`` as A1111 writes it: ``.pt`` ``string_to_param`` (SDXL: ``clip_l``/``clip_g``
    in either suffix), ``.safetensors`` ``emb_params``."""
    path = Path(path)
    check_fits(ti, model)
    vecs = [v.detach().to("cpu", torch.float32).contiguous() for v in ti.vectors]
    keys = ENCODER_KEYS[model.cfg.family]
    suffix = path.suffix.lower()
    if suffix not in (".pt", ".safetensors"):
        raise LoRAError(f"{path.name}: write an embedding as .pt or .safetensors")
    per_encoder = dict(zip(keys, vecs, strict=False)) if keys != (SINGLE,) else None
    if suffix == ".safetensors":  # A1111's fields as metadata (its .pt keys)
        fields = {"name": ti.name, "step": ti.step, "sd_checkpoint": ti.sd_checkpoint,
                  "sd_checkpoint_name": ti.sd_checkpoint_name}
        tensors = per_encoder if per_encoder is not None else {"emb_params": vecs[0]}
        write_safetensors(tensors, path, metadata={k: str(v) for k, v in fields.items() if v is not None})
    else:
        data: Mapping[str, object] = per_encoder if per_encoder is not None else {
            "string_to_token": {SINGLE: 265}, "string_to_param": {SINGLE: vecs[0]}, "name": ti.name,
            "step": ti.step, "sd_checkpoint": ti.sd_checkpoint, "sd_checkpoint_name": ti.sd_checkpoint_name}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)
    return path
