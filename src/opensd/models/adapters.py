"""Adapters: weight deltas added to a network's layers for one call, never written into it.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") adds to a
layer's weight ``W`` (out, in) a low-rank update ``ΔW = s · up @ down`` with ``down``
(r, in), ``up`` (out, r) and a scale ``s`` (kohya: ``multiplier · alpha / r``). LyCORIS
(Yeh et al. 2023, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to
Model Evaluation") adds the same idea for convolutions (LoCon, optionally with a Tucker
core), the Hadamard product of two low-rank products (LoHa) and Kronecker products (LoKr).

How they reach the network: a request's deltas are an :class:`AdapterSet` (module ->
deltas), entered with :func:`use_adapters`. The layers of opensd's networks
(:class:`Linear`, :class:`Conv2d`, and OpenCLIP's fused in-projection through
:func:`adapted`) read the current set from a context variable, which is private to a
thread and to an asyncio task, and add ``Δ(x)`` to their base output ``W x + b``. So:

* the base weights are never modified: removing an adapter is leaving the ``with`` block,
  and 100 apply/remove cycles leave every weight bit-identical;
* two requests on one shared model, in two threads, each see only their own adapters;
* a low-rank delta is applied unmerged, ``up(down(x))``, as PEFT does, so it costs
  ``r/in`` of the layer's work and no copy of ``W``; LoHa and LoKr build ``ΔW`` during
  the call (its memory is freed after);
* or, for a set built with ``merge_weights=True``, each adapted :class:`Linear` and
  :class:`Conv2d` runs once with ``W + ΣΔW``, computed at its first call and kept in the
  set (so for that request only, at the memory of one more copy of the adapted layers'
  weights): one op per layer in place of three, for a set used over many calls (a
  few-step LCM-LoRA: :func:`opensd.pipelines.few_step.few_step_kwargs`).

Deltas may hold trainable parameters (``opensd train lora``): gradients flow through
:func:`adapted` like through any other op.

Inside ``torch.compile`` the context variable cannot be read (TorchDynamo does not trace
``ContextVar.get``), so a compiled graph holds the base layers only: :func:`adapted`
returns the base output there, and callers run requests with adapters eagerly (the
pipeline's ``compile`` option does: :mod:`opensd.pipelines.compiled`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from opensd.conv_kernels import conv2d as kernel_conv2d
from opensd.kernels import linear as kernel_linear

# ----------------------------------------------------------------------------- deltas


class Delta(Protocol):
    """One adapter's update of one layer."""

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The change of ``module``'s output for input ``x`` (same shape as the output)."""
        ...

    def weight(self) -> torch.Tensor:
        """``ΔW`` in the layer's weight shape, scale included (for merging and tests)."""
        ...


def _apply_weight(module: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x`` through ``module``'s op with weight ``w`` and no bias (linear or conv)."""
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, w, None, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(x, w)


@dataclass(frozen=True, eq=False)
class LowRank:
    """LoRA / LoCon: ``ΔW = scale · up @ [mid ∘] down``.

    Linear: ``down`` (r, in), ``up`` (out, r). Conv: ``down`` (r, in, kh, kw) and ``up``
    (out, r, 1, 1); with a Tucker core ``mid`` (r, r, kh, kw), ``down`` is (r, in, 1, 1).
    The first conv of the chain takes the layer's stride, padding and dilation.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    mid: torch.Tensor | None = None

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(module, nn.Conv2d):
            s, p, d = module.stride, module.padding, module.dilation
            if self.mid is None:
                h = F.conv2d(x, self.down, None, s, p, d)
            else:
                h = F.conv2d(F.conv2d(x, self.down), self.mid, None, s, p, d)
            return F.conv2d(h, self.up) * self.scale
        return F.linear(F.linear(x, self.down), self.up) * self.scale

    def weight(self) -> torch.Tensor:
        up, down = self.up.flatten(1), self.down
        if self.mid is None:
            w = up @ down.flatten(1)  # (out, in * kh * kw)
            return (w.view(up.shape[0], *down.shape[1:]) if down.ndim == 4 else w) * self.scale
        # Tucker: ΔW[o, i, y, x] = Σ_ab up[o, a] · mid[a, b, y, x] · down[b, i]
        w = torch.einsum("oa,abyx,bi->oiyx", up, self.mid, down.flatten(1))
        return w * self.scale


@dataclass(frozen=True, eq=False)
class Hadamard:
    """LoHa: ``ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b)``, reshaped to the layer's weight.

    ``w1a``/``w2a`` (out, r), ``w1b``/``w2b`` (r, in·kh·kw). With Tucker cores ``t1``/``t2``
    (r, r, kh, kw) each factor is ``einsum(t, a, b)`` instead (LyCORIS' ``use_tucker``).
    """

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    scale: float
    shape: tuple[int, ...]
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    @staticmethod
    def _factor(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        if t is None:
            return a @ b
        return torch.einsum("ijyx,io,jc->ocyx", t, a, b)  # LyCORIS: t (r, r, kh, kw), a (r, out), b (r, in)

    def weight(self) -> torch.Tensor:
        w = self._factor(self.w1a, self.w1b, self.t1) * self._factor(self.w2a, self.w2b, self.t2)
        return w.reshape(self.shape) * self.scale

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _apply_weight(module, x, self.weight())


@dataclass(frozen=True, eq=False)
class Kronecker:
    """LoKr: ``ΔW = scale · w1 ⊗ w2`` (Kronecker product), reshaped to the layer's weight.

    ``w1`` (a, c) and ``w2`` (b, d) or, for convs, (b, d, kh, kw); either may be given as
    low-rank factors, already multiplied here by whoever builds the delta.
    """

    w1: torch.Tensor
    w2: torch.Tensor
    scale: float
    shape: tuple[int, ...]

    def weight(self) -> torch.Tensor:
        w1 = self.w1
        if self.w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, self.w2.contiguous()).reshape(self.shape) * self.scale  # kron fails on strided views

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _apply_weight(module, x, self.weight())


@dataclass(frozen=True, eq=False)
class Full:
    """A full ``ΔW`` (LyCORIS ``diff``), optionally with a bias change ``bias`` (out,)."""

    w: torch.Tensor
    scale: float
    bias: torch.Tensor | None = None

    def weight(self) -> torch.Tensor:
        return self.w * self.scale

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = _apply_weight(module, x, self.weight())
        if self.bias is None:
            return out
        b = self.bias * self.scale
        return out + (b.view(1, -1, 1, 1) if isinstance(module, nn.Conv2d) else b)


@dataclass(frozen=True, eq=False)
class RowSlice:
    """``delta`` applied to output rows ``[start, start + rows)`` of a fused layer of
    ``total`` outputs (OpenCLIP's ``in_proj``: q, k and v stacked); zero elsewhere."""

    delta: Delta
    start: int
    total: int

    def _pad(self, y: torch.Tensor, dim: int) -> torch.Tensor:
        before = self.start
        after = self.total - self.start - y.shape[dim]
        pad = [0, 0] * (y.ndim - 1 - dim % y.ndim) + [before, after]
        return F.pad(y, pad)

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._pad(self.delta.forward(module, x), -1)

    def weight(self) -> torch.Tensor:
        return self._pad(self.delta.weight(), 0)


# ----------------------------------------------------------------------------- the set


@dataclass(frozen=True, eq=False)
class AdapterSet:
    """Deltas per layer module for one call (one request). Immutable once built, except for
    the merged weights a ``merge_weights`` set keeps (:meth:`merged_weight`)."""

    deltas: Mapping[nn.Module, tuple[Delta, ...]]
    merge_weights: bool = False
    _merged: dict[nn.Module, torch.Tensor | None] = field(default_factory=dict, repr=False)

    def merged_weight(self, module: nn.Module) -> torch.Tensor | None:
        """``W + ΣΔW`` of ``module`` when this set merges and has deltas for it (a delta
        that changes the bias is applied unmerged: None), computed once."""
        if not self.merge_weights:
            return None
        if module in self._merged:
            return self._merged[module]
        deltas = self.deltas.get(module, ())
        w: torch.Tensor | None = None
        if deltas and all(getattr(d, "bias", None) is None for d in deltas):
            base = module.weight
            assert isinstance(base, torch.Tensor)
            w = base
            for d in deltas:  # out of place: the model's weight is never written
                w = w + d.weight().to(base.dtype)
        self._merged[module] = w  # None too: the answer for this layer is kept either way
        return w

    def __len__(self) -> int:
        return len(self.deltas)

    def get(self, module: nn.Module) -> tuple[Delta, ...]:
        return self.deltas.get(module, ())

    @staticmethod
    def merge(sets: Sequence[AdapterSet | None]) -> AdapterSet | None:
        """One set holding every delta of ``sets`` (None entries skipped); None when empty."""
        out: dict[nn.Module, tuple[Delta, ...]] = {}
        merge = False
        for s in sets:
            if s is None:
                continue
            merge = merge or s.merge_weights
            for m, ds in s.deltas.items():
                out[m] = out.get(m, ()) + tuple(ds)
        return AdapterSet(out, merge_weights=merge) if out else None


_ACTIVE: ContextVar[AdapterSet | None] = ContextVar("opensd_adapters", default=None)


@contextmanager
def use_adapters(adapters: AdapterSet | None) -> Iterator[None]:
    """Inside the block, every adapted layer of this thread/task adds its deltas from
    ``adapters`` (None: none; nested blocks replace, not add)."""
    token = _ACTIVE.set(adapters if adapters else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_adapters() -> AdapterSet | None:
    return _ACTIVE.get()


def _current() -> AdapterSet | None:
    """The active set; None inside a compiled graph, which cannot read the context variable
    (see the module docstring)."""
    return None if torch.compiler.is_compiling() else _ACTIVE.get()


def has_deltas(module: nn.Module) -> bool:
    """Whether the active adapters change ``module`` in this call (a kernel that bypasses the
    layer's own forward must not run then)."""
    adapters = _current()
    return adapters is not None and bool(adapters.get(module))


def _plus_deltas(adapters: AdapterSet | None, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if adapters is None:
        return out
    for delta in adapters.get(module):
        out = out + delta.forward(module, x).to(out.dtype)
    return out


def adapted(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` (the base output of ``module`` for ``x``) plus the current set's deltas for ``module``."""
    return _plus_deltas(_current(), module, x, out)


# ----------------------------------------------------------------------------- layers


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same keys) that adds the active adapters' deltas.

    Its base output is :func:`opensd.kernels.linear`'s: ``F.linear``, or oneDNN when the
    model's kernel selection chose it (:mod:`opensd.kernels`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapters = _current()  # read once per call
        w = None if adapters is None else adapters.merged_weight(self)
        if w is not None:
            return F.linear(x, w, self.bias)
        return _plus_deltas(adapters, self, x, kernel_linear(self, x))


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same keys) that adds the active adapters' deltas.

    Its base output is :func:`opensd.conv_kernels.conv2d`'s: ``F.conv2d``, or oneDNN with a
    packed weight when the model's kernel selection chose it (:mod:`opensd.kernels`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapters = _current()  # read once per call
        w = None if adapters is None else adapters.merged_weight(self)
        out = kernel_conv2d(self, x, w)
        return out if w is not None else _plus_deltas(adapters, self, x, out)
