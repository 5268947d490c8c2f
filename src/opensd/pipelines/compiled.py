"""The pipeline's ``compile`` option: the U-Net through ``torch.compile``, where it can run compiled.

``torch.compile`` (TorchDynamo + Inductor; Ansel et al. 2024, "PyTorch 2") captures the
U-Net's forward as one graph and generates fused kernels for it. Options used here:

* ``fullgraph=True``: one graph or an error, never a silent fall-back to many small ones;
* ``dynamic=False``: kernels for the exact shapes; every new shape (batch size, image
  size, prompt length in chunks) compiles again, which takes minutes on a CPU;
* Inductor's ``freezing``: the weights become constants of the graph, so it packs them
  once into the layouts oneDNN and MKL want instead of on every call (the largest part of
  the gain on a CPU); the packed copies take memory beside the module's own weights, and
  a compiled pipeline must not have its weights changed afterwards.

What a graph cannot hold runs eagerly, per call: a request's ControlNet residuals, the per-request LoRA/LyCORIS deltas
(TorchDynamo does not read :mod:`opensd.models.adapters`' context variable, so a compiled
graph holds the base layers only) and cross-attention inspection
(an attention capture of this thread or task, :mod:`opensd.models.capture`: ``opensd explain``
and grounded training). The
compiled outputs differ from the eager ones by float rounding (fused kernels sum in
another order), so they are not bit-identical (the default model's images came out
pixel-identical in docs/benchmarks.md's runs).
Measured compile time and speed: docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from opensd.models.adapters import active_adapters
from opensd.models.capture import active_sink

INDUCTOR_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"freezing": True}


class CompiledUNet:
    """Calls ``unet(x, t, context, y)`` compiled, or eagerly when adapters or attention inspection are
    active or ControlNet residuals come with the call (the graph holds none)."""

    def __init__(self, unet: nn.Module, *, compiler: Any = None) -> None:
        """``compiler``: what compiles the module (default: ``torch.compile`` with the options above);
        tests pass another to check the dispatch without minutes of compilation."""
        self.unet = unet
        if compiler is None:
            compiled = torch.compile(unet, fullgraph=True, dynamic=False, options=INDUCTOR_OPTIONS)
        else:
            compiled = compiler(unet)
        self.compiled = compiled

    def eager_needed(self) -> bool:
        """Whether this call must run eagerly: adapters or an attention capture are active (this thread's)."""
        return active_adapters() is not None or active_sink() is not None

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None, control: Any = None,
    ) -> torch.Tensor:
        if control is not None:
            out: torch.Tensor = self.unet(x, t, context, y, control=control)
        elif self.eager_needed():
            out = self.unet(x, t, context, y)
        else:
            out = self.compiled(x, t, context, y)
        return out
