"""LoRA files: read one, check it against a model, and bind it into an :class:`AdapterSet`.

A :class:`LoRAFile` is a file's layers, grouped by the layer name the file uses
(``lora_unet_..._to_q``), each with its tensors under format-independent names
(:class:`LayerWeights`). :func:`bind_loras` resolves those names on a model through
:func:`opensd.checkpoints.lora_names.lora_targets`, turns each layer into a
:mod:`opensd.models.adapters` delta in the model's dtype and device, and returns one
:class:`~opensd.models.adapters.AdapterSet` for all the files of a request. Nothing
is written to the model.

The formats (kohya, LyCORIS LoCon/LoHa/LoKr/full, PEFT, older diffusers) are read by
:mod:`opensd.checkpoints.lora_formats`. Scale (kohya / A1111): ``ΔW = multiplier ·
(alpha / rank) · up @ down``; a file without ``alpha`` means ``alpha = rank``. The
U-Net's and the text encoders' multipliers are separate (A1111's ``<lora:name:te:unet>``).

Every mismatch is a one-line :class:`LoRAError` naming the file and the key: a key no
format knows, a layer this model does not have (often: a LoRA made for another family),
a rank that differs between ``down`` and ``up``, a shape that does not fit the layer, a
file mixing formats, an empty file, a torch file holding more than tensors, or one that
needs code to load. A file is bound whole or not at all.
"""

from __future__ import annotations

import hashlib
import struct
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import torch
from torch import nn

from opensd.checkpoints.io import TORCH_SUFFIXES, CheckpointError, _check_tensors, _read_torch, read_weights
from opensd.checkpoints.lora_formats import FormatError, LayerWeights, LoRAError, guess_family, read_layers
from opensd.checkpoints.lora_names import Target, lora_targets
from opensd.checkpoints.parameterization import read_metadata as read_header_metadata
from opensd.models.adapters import AdapterSet, Delta, Full, Hadamard, Kronecker, LowRank, RowSlice
from opensd.models.stable_diffusion import StableDiffusion


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
    def load(cls, path: str | Path) -> LoRAFile:
        """Read and group a file (``.safetensors``, or ``.pt``/``.ckpt`` with ``weights_only``)."""
        path = Path(path)
        try:
            state = read_state(path)
        except CheckpointError as e:
            raise LoRAError(str(e)) from None
        metadata = read_metadata(path)
        return cls(path, group_layers(state, path, metadata), metadata, a1111_hash(path))


# ----------------------------------------------------------------------------- reading


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors, through :func:`read_weights` (safetensors, or a torch pickle
    with ``weights_only``). A torch file holding anything but tensors is refused: a
    dropped entry would be a partial load."""
    if path.suffix.lower() in TORCH_SUFFIXES and path.is_file():
        obj = _read_torch(path)
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if isinstance(obj, Mapping):
            junk = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
            if junk is not None:
                raise CheckpointError(f"{path}: entry {str(junk)!r:.80} is a {type(obj[junk]).__name__}, not a tensor; "
                                      "a LoRA file holds tensors only")
            return _check_tensors(dict(obj), path)
    return read_weights(path)


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file ({} for other files or none), as a :class:`LoRAError`
    when its header cannot be read."""
    try:
        return read_header_metadata(path)
    except CheckpointError as e:
        raise LoRAError(str(e)) from None


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


def group_layers(state: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> dict[str, LayerWeights]:
    """``state``'s keys grouped by layer in any format :mod:`opensd.checkpoints.lora_formats` reads."""
    try:
        return read_layers(state, metadata or {})
    except FormatError as e:
        raise LoRAError(f"{path.name}: {e}") from None


# ----------------------------------------------------------------------------- binding


@dataclass(frozen=True)
class LoRAUse:
    """One file of a request with its multipliers (A1111: ``<lora:name:te:unet>``)."""

    file: LoRAFile
    unet: float = 1.0
    te: float = 1.0


_TARGETS: weakref.WeakKeyDictionary[StableDiffusion, dict[str, Target]] = weakref.WeakKeyDictionary()


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


def _check_fits(got: tuple[int, ...], target: Target, where: str) -> None:
    """``got`` (a ΔW's shape, or (out, in·kh·kw) for a flat one) must be the layer's weight shape."""
    want = target.weight_shape
    if got != want and got != (want[0], prod(want[1:])):
        raise LoRAError(f"{where}: gives a {got} update to a {want} layer ({target.path}); "
                        "is the LoRA for another model family?")


def _rank_check(where: str, ok: bool, **shapes: torch.Tensor | None) -> None:
    if not ok:
        told = ", ".join(f"{k} {tuple(v.shape)}" for k, v in shapes.items() if v is not None)
        raise LoRAError(f"{where}: rank mismatch: {told}")


def loha_delta(layer: LayerWeights, target: Target, scale: float, where: str) -> Hadamard:
    """LyCORIS LoHa: ``(w1a @ w1b) ⊙ (w2a @ w2b) · alpha / rank``, rank = ``w1b.shape[0]``. With
    Tucker cores ``t1``/``t2`` (r, r, kh, kw), ``w?a`` is (r, out) and ``w?b`` (r, in)."""
    t = layer.tensors
    w1a, w1b, w2a, w2b = (t[k] for k in ("w1a", "w1b", "w2a", "w2b"))  # all there (read_layers checks)
    t1, t2 = t.get("t1"), t.get("t2")  # both or neither (read_layers checks)
    rank = w1b.shape[0]
    if t1 is None or t2 is None:
        w1b, w2b = w1b.flatten(1), w2b.flatten(1)  # (r, in·kh·kw)
        _rank_check(where, w1a.ndim == 2 and w1a.shape[1] == rank and tuple(w2a.shape[1:]) == (w2b.shape[0],),
                    w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b)
        got = (w1a.shape[0], w1b.shape[1])
        _check_fits(got, target, where)
        _check_fits((w2a.shape[0], w2b.shape[1]), target, where)
    else:
        ok = all(x.ndim == 2 for x in (w1a, w1b, w2a, w2b)) and w1a.shape[0] == rank and \
            tuple(t1.shape[:2]) == (rank, rank) and tuple(t2.shape[:2]) == (w2a.shape[0], w2b.shape[0])
        _rank_check(where, ok, w1a=w1a, w1b=w1b, t1=t1, w2a=w2a, w2b=w2b, t2=t2)
        _check_fits((w1a.shape[1], w1b.shape[1], *t1.shape[2:]), target, where)
        _check_fits((w2a.shape[1], w2b.shape[1], *t2.shape[2:]), target, where)
    p = next(target.module.parameters())
    alpha = rank if layer.alpha is None else layer.alpha
    w1a, w1b, w2a, w2b = (x.to(p) for x in (w1a, w1b, w2a, w2b))
    return Hadamard(w1a, w1b, w2a, w2b, scale * alpha / rank, target.weight_shape,
                    None if t1 is None else t1.to(p), None if t2 is None else t2.to(p))


def lokr_delta(layer: LayerWeights, target: Target, scale: float, where: str) -> Kronecker:
    """LyCORIS LoKr: ``w1 ⊗ w2``, each half whole or low-rank (``w?a @ w?b``; ``w2`` also as a
    Tucker ``t2``). Scale ``alpha / rank`` with the rank of the decomposed half (``w1a``'s first),
    1 when both halves are whole (LyCORIS' own rule)."""
    t = {k: v.to(next(target.module.parameters())) for k, v in layer.tensors.items()}
    if "w1" in t:
        w1 = t["w1"]
    else:
        w1a, w1b = t["w1a"], t["w1b"]  # both there without w1 (read_layers checks)
        _rank_check(where, w1a.ndim == 2 and w1b.ndim == 2 and w1a.shape[1] == w1b.shape[0], w1a=w1a, w1b=w1b)
        w1 = w1a @ w1b  # (a, c)
    t2 = t.get("t2")
    if "w2" in t:
        w2 = t["w2"]
    elif t2 is not None:
        w2a, w2b = t["w2a"], t["w2b"]  # both there without w2 (read_layers checks)
        _rank_check(where, w2a.ndim == 2 and w2b.ndim == 2 and tuple(t2.shape[:2]) == (w2a.shape[0], w2b.shape[0]),
                    w2a=w2a, w2b=w2b, t2=t2)
        w2 = torch.einsum("ijyx,ib,jd->bdyx", t2, w2a, w2b)  # t2 (r, r, kh, kw), w2a (r, b), w2b (r, d)
    else:
        w2a, w2b = t["w2a"], t["w2b"]
        _rank_check(where, w2a.ndim == 2 and w2a.shape[1] == w2b.shape[0], w2a=w2a, w2b=w2b)
        w2 = w2a @ w2b.flatten(1)  # (b, d·kh·kw)
    if w1.ndim != 2:
        raise LoRAError(f"{where}: lokr_w1 must be a matrix, got shape {tuple(w1.shape)}")
    got = (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:])
    _check_fits(got if w2.ndim == 4 else got[:2], target, where)
    b = t.get("w1b", t.get("w2b"))  # the b matrix of the decomposed half (the first, when both are)
    rank = None if b is None else b.shape[0]
    factor = 1.0 if rank is None else (rank if layer.alpha is None else layer.alpha) / rank
    return Kronecker(w1, w2, scale * factor, target.weight_shape)


def full_delta(layer: LayerWeights, target: Target, scale: float, where: str) -> Full:
    """LyCORIS full: ``diff`` is ΔW itself (and ``diff_b`` a bias change); only the multiplier scales it."""
    p = next(target.module.parameters())
    diff, bias = layer.tensors["diff"], layer.tensors.get("diff_b")
    want = target.weight_shape
    if diff.numel() != prod(want) or diff.shape[0] != want[0]:
        raise LoRAError(f"{where}: gives a {tuple(diff.shape)} update to a {want} layer ({target.path}); "
                        "is the LoRA for another model family?")
    if bias is not None and tuple(bias.shape) != want[:1]:
        raise LoRAError(f"{where}: diff_b has shape {tuple(bias.shape)}, the layer has {want[0]} outputs")
    return Full(diff.reshape(want).to(p), scale, None if bias is None else bias.to(p))


_BUILDERS: dict[str, Callable[[LayerWeights, Target, float, str], Delta]] = {"lora": low_rank_delta, "loha": loha_delta, "lokr": lokr_delta, "full": full_delta}


def layer_delta(layer: LayerWeights, target: Target, scale: float, where: str) -> Delta:
    """The delta of one file layer on its target (by the layer's kind)."""
    build = _BUILDERS.get(layer.kind)
    if build is None:
        raise LoRAError(f"{where}: layers of kind {layer.kind!r} are not supported")
    delta: Delta = build(layer, target, scale, where)
    if target.rows is not None:
        delta = RowSlice(delta, *target.rows)
    return delta


def _missing_layer(file: LoRAFile, name: str, model: StableDiffusion) -> LoRAError:
    """The error for a layer ``model`` lacks, naming the family the file looks made for."""
    family = model.cfg.family.value
    guess = guess_family(file.layers)
    hint = "is the LoRA for another model family?"
    if guess is not None:
        hint = f"the file looks made for {guess[0]} ({guess[1]})"
    return LoRAError(f"{file.path.name}: {name}: no such layer in this {family} model; {hint}")


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
                raise _missing_layer(use.file, name, model)
            scale = use.unet if target.network == "unet" else use.te
            if scale == 0:
                continue
            found.setdefault(target.module, []).append(layer_delta(layer, target, scale, where))
        for m, ds in found.items():
            deltas[m] = deltas.get(m, ()) + tuple(ds)
    return AdapterSet(deltas) if deltas else None
