"""8-bit weight storage: a model file a quarter of float32's size, read back as floats.

Weight-only quantization with one absmax scale per output row (the "LLM.int8()" paper's
vector-wise scheme without its outlier split, Dettmers et al. 2022; per-channel weight
quantization as in Jacob et al. 2018): a weight ``W`` of shape (rows, ...) is stored as

    Q = round(W / s[:, None, ...]),  s = max |W[row]| / 127,   Q in int8, s in float16

so each element is off by at most half a step, ``s / 2``. Only storage changes: loading
multiplies back (:func:`dequantize`) and the model computes in floating point, exactly as it
would on the rounded weights. For a linear layer a row is an output feature, for a convolution
an output channel, for an embedding table a token.

Which tensors: floating-point tensors with at least two dimensions and :data:`MIN_ELEMENTS`
elements, under the given key prefixes (the U-Net and the text encoders by default; the VAE,
whose decoder writes every pixel, stays in float16). Biases, norms and small tensors stay
floating point. In the file, ``name`` holds ``Q`` and ``name + SCALE_SUFFIX`` holds ``s``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from opensd.checkpoints.io import CheckpointError

SCALE_SUFFIX = ".int8_scale"
MIN_ELEMENTS = 4096  # smaller tensors save little and are often the sensitive ends (conv_in, conv_out)
LEVELS = 127  # symmetric int8: -127..127
DEFAULT_PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "conditioner.")


def quantizes(name: str, t: torch.Tensor, prefixes: Iterable[str] = DEFAULT_PREFIXES) -> bool:
    """Whether :func:`quantize` stores ``name`` in int8."""
    return (t.is_floating_point() and t.dim() >= 2 and t.numel() >= MIN_ELEMENTS
            and any(name.startswith(p) for p in prefixes))


def quantize_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q int8 like ``w``, s float16 (rows,)) with ``w ≈ Q * s`` row by row; an all-zero row gets s = 1."""
    rows = w.detach().float().reshape(w.shape[0], -1)  # (rows, rest)
    absmax = rows.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / LEVELS, torch.ones_like(absmax)).half()
    q = torch.round(rows / scale.float()[:, None]).clamp_(-LEVELS, LEVELS).to(torch.int8)
    return q.reshape(w.shape), scale


def quantize(state: Mapping[str, torch.Tensor], prefixes: Iterable[str] = DEFAULT_PREFIXES,
             rest: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """``state`` for an 8-bit file: the tensors :func:`quantizes` picks as int8 plus their
    scales, every other floating-point tensor in ``rest``, integer tensors unchanged."""
    prefixes = tuple(prefixes)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith(SCALE_SUFFIX):
            raise CheckpointError(f"cannot quantize a state that already holds a scale ({name})")
        if quantizes(name, t, prefixes):
            out[name], out[name + SCALE_SUFFIX] = quantize_tensor(t)
        else:
            out[name] = t.to(rest) if t.is_floating_point() else t
    return out


def is_quantized(names: Iterable[str]) -> bool:
    """Whether a file with these tensor names holds int8 weights."""
    return any(n.endswith(SCALE_SUFFIX) for n in names)


def stored_names(names: Iterable[str]) -> list[str]:
    """The model's tensor names in a file's names: the scales left out."""
    return [n for n in names if not n.endswith(SCALE_SUFFIX)]


def dequantize(state: dict[str, torch.Tensor], dtype_of: Callable[[str], torch.dtype | None],
               where: str) -> dict[str, torch.Tensor]:
    """``state`` with every int8 weight multiplied back by its scale, in ``dtype_of(name)``
    (None: float32); ``state`` is emptied. A weight without its scale, a scale without its
    weight, or a scale of the wrong shape or type is a :class:`CheckpointError` naming ``where``."""
    scales = {n[: -len(SCALE_SUFFIX)]: state.pop(n) for n in list(state) if n.endswith(SCALE_SUFFIX)}
    orphans = sorted(set(scales) - set(state))
    if orphans:
        raise CheckpointError(f"{where}: int8 scale(s) without a weight: {', '.join(orphans[:3])}")
    out: dict[str, torch.Tensor] = {}
    for name in list(state):
        t = state.pop(name)
        if t.dtype != torch.int8:
            if name in scales:
                raise CheckpointError(f"{where}: {name} has an int8 scale but is {str(t.dtype).replace('torch.', '')}, not int8")
            out[name] = t
            continue
        s = scales.get(name)
        if s is None:
            raise CheckpointError(f"{where}: {name} is int8 without its scale {name + SCALE_SUFFIX}")
        if not s.is_floating_point() or s.dim() != 1 or t.dim() == 0 or s.shape[0] != t.shape[0]:
            raise CheckpointError(f"{where}: {name + SCALE_SUFFIX} must be a floating-point vector of "
                                  f"{t.shape[0] if t.dim() else 0} scales (one per row), got {str(s.dtype).replace('torch.', '')} "
                                  f"{tuple(s.shape)}")
        w = t.float() * s.float().reshape(-1, *([1] * (t.dim() - 1)))
        out[name] = w.to(dtype_of(name) or torch.float32)
    return out
