"""LoRA files: read one, check it against a model, and bind it into an :class:`AdapterSet`.

A :class:`LoRAFile` is a file's layers, grouped by the layer name the file uses
(``lora_unet_..._to_q``), each with its tensors under format-independent names
(:class:`LayerWeights`). :func:`bind_loras` resolves those names on a model through
:func:`opensd.checkpoints.lora_names.lora_targets`, turns each layer into a
:mod:`opensd.models.adapters` delta in the model's dtype and device, and returns one
:class:`~opensd.models.adapters.AdapterSet` for all the files of a request. Nothing
is written to the model.

Scale (kohya / A1111): ``ΔW = multiplier · (alpha / rank) · up @ down``; a file without
``alpha`` means ``alpha = rank``. The U-Net's and the text encoders' multipliers are
separate (A1111's ``<lora:name:te:unet>``).

Every mismatch is a one-line :class:`LoRAError` naming the file and the key: a key no
format knows, a layer this model does not have (often: a LoRA made for another family),
a rank that differs between ``down`` and ``up``, or a shape that does not fit the layer.
A file is bound whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import struct
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from opensd.checkpoints.io import CheckpointError, read_weights
from opensd.checkpoints.lora_names import Target, lora_targets
from opensd.models.adapters import AdapterSet, Delta, LowRank, RowSlice
from opensd.models.stable_diffusion import StableDiffusion


class LoRAError(CheckpointError):
    """A LoRA or embedding file cannot be read, or does not fit the model."""

    kind = "LoRAError"


@dataclass(frozen=True, eq=False)
class LayerWeights:
    """One layer of a LoRA file. ``kind``: ``"lora"`` (down/up, optional mid), and the
    LyCORIS kinds the format readers add. ``tensors`` by format-independent name;
    ``alpha`` None when the file has none (alpha = rank)."""

    kind: str
    tensors: Mapping[str, torch.Tensor]
    alpha: float | None = None


@dataclass(frozen=True, eq=False)
class LoRAFile:
    """A LoRA file's layers by the name the file uses, with what identifies it."""

    path: Path
    layers: Mapping[str, LayerWeights]
    metadata: Mapping[str, str] = field(default_factory=dict)
    hash: str = ""  # A1111's short hash: 12 hex digits of the safetensors payload's SHA-256

    @property
    def name(self) -> str:
        return self.path.stem

    @classmethod
    def load(cls, path: str | Path) -> "LoRAFile":
        """Read and group a file (``.safetensors``, or ``.pt``/``.ckpt`` with ``weights_only``)."""
        path = Path(path)
        try:
            state = read_weights(path)
        except CheckpointError as e:
            raise LoRAError(str(e)) from None
        layers = group_layers(state, path)
        return cls(path, layers, read_metadata(path), a1111_hash(path))


# ----------------------------------------------------------------------------- reading


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file ({} for other files or none)."""
    if path.suffix.lower() != ".safetensors":
        return {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {str(k): str(v) for k, v in header.get("__metadata__", {}).items()}


def a1111_hash(path: Path) -> str:
    """A1111's LoRA short hash (kohya's "addnet" hash): SHA-256 of a safetensors file after
    its header (the tensor bytes only, so editing metadata keeps it), else of the whole
    file; the first 12 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix.lower() == ".safetensors":
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


_KOHYA = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha"}


def group_layers(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, LayerWeights]:
    """``state``'s keys grouped by layer: ``<layer>.<part>`` for the parts each format has."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        for suffix, part in _KOHYA.items():
            if key.endswith("." + suffix):
                parts.setdefault(key[: -len(suffix) - 1], {})[part] = tensor
                break
        else:
            raise LoRAError(f"{path.name}: key {key!r} is not a LoRA weight opensd knows (kohya lora_down/lora_up/alpha)")
    out = {}
    for layer, p in parts.items():
        alpha = p.pop("alpha", None)
        for need in ("down", "up"):
            if need not in p:
                raise LoRAError(f"{path.name}: layer {layer!r} has no lora_{need}.weight")
        out[layer] = LayerWeights("lora", p, None if alpha is None else float(alpha))
    if not out:
        raise LoRAError(f"{path.name}: holds no LoRA layers")
    return out


# ----------------------------------------------------------------------------- binding


@dataclass(frozen=True)
class LoRAUse:
    """One file of a request with its multipliers (A1111: ``<lora:name:te:unet>``)."""

    file: LoRAFile
    unet: float = 1.0
    te: float = 1.0


_TARGETS: "weakref.WeakKeyDictionary[StableDiffusion, dict[str, Target]]" = weakref.WeakKeyDictionary()


def targets_of(model: StableDiffusion) -> dict[str, Target]:
    """:func:`lora_targets` of ``model``, built once per model."""
    table = _TARGETS.get(model)
    if table is None:
        table = _TARGETS[model] = lora_targets(model)
    return table


def _fit(w: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A (r, in) factor for a 1x1 conv becomes (r, in, 1, 1), and back for a linear layer."""
    if isinstance(module, nn.Conv2d) and w.ndim == 2:
        return w[:, :, None, None]
    if not isinstance(module, nn.Conv2d) and w.ndim == 4 and w.shape[2:] == (1, 1):
        return w[:, :, 0, 0]
    return w


def low_rank_delta(layer: LayerWeights, target: Target, scale: float, where: str) -> LowRank:
    """A kohya/PEFT ``down``/``up`` (and LoCon ``mid``) layer as a :class:`LowRank` on ``target``."""
    down, up, mid = layer.tensors["down"], layer.tensors["up"], layer.tensors.get("mid")
    rank = down.shape[0]
    if up.shape[1] != rank or (mid is not None and tuple(mid.shape[:2]) != (rank, rank)):
        mid_shape = "" if mid is None else f", mid {tuple(mid.shape)}"
        raise LoRAError(f"{where}: rank mismatch: down {tuple(down.shape)}, up {tuple(up.shape)}{mid_shape}")
    module = target.module
    p = next(module.parameters())
    alpha = rank if layer.alpha is None else layer.alpha
    down, up = _fit(down, module), _fit(up, module)
    delta = LowRank(down.to(p), up.to(p), scale * alpha / rank, None if mid is None else mid.to(p))
    want = target.weight_shape
    got = tuple(up.shape[:1]) + (tuple(down.shape[1:]) if mid is None else (down.shape[1],) + tuple(mid.shape[2:]))
    if got != want:
        raise LoRAError(f"{where}: gives a {got} update to a {want} layer ({target.path}); "
                        "is the LoRA for another model family?")
    return delta


def layer_delta(layer: LayerWeights, target: Target, scale: float, where: str) -> Delta:
    """The delta of one file layer on its target (the format readers' kinds dispatch here)."""
    if layer.kind == "lora":
        delta: Delta = low_rank_delta(layer, target, scale, where)
    else:
        raise LoRAError(f"{where}: layers of kind {layer.kind!r} are not supported")
    if target.rows is not None:
        delta = RowSlice(delta, *target.rows)
    return delta


def bind_loras(model: StableDiffusion, uses: Sequence[LoRAUse]) -> AdapterSet | None:
    """One :class:`AdapterSet` of every file in ``uses`` on ``model`` (None when empty).

    Raises :class:`LoRAError` naming the file and key of the first layer that does not fit.
    """
    table = targets_of(model)
    deltas: dict[nn.Module, tuple[Delta, ...]] = {}
    for use in uses:
        found: dict[nn.Module, list[Delta]] = {}
        for name, layer in use.file.layers.items():
            where = f"{use.file.path.name}: {name}"
            target = table.get(name)
            if target is None:
                raise LoRAError(f"{where}: no such layer in this {model.cfg.family.value} model; "
                                "is the LoRA for another model family?")
            scale = use.unet if target.network == "unet" else use.te
            if scale == 0:
                continue
            found.setdefault(target.module, []).append(layer_delta(layer, target, scale, where))
        for m, ds in found.items():
            deltas[m] = deltas.get(m, ()) + tuple(ds)
    return AdapterSet(deltas) if deltas else None
