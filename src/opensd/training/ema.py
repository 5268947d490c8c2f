"""Exponential moving average of a module's weights (Polyak & Juditsky 1992).

Diffusion models sample from EMA weights (Ho et al. 2020 use decay 0.9999; LDM
keeps ``model_ema``). The average warms up as in LDM's ``LitEma``: the decay used at
update ``n`` is ``min(decay, (1 + n) / (10 + n))``, so early weights are not frozen in.
The shadow copy is float32 on the module's device; buffers are copied, not averaged.
An EMA averages the parameters it is given: a whole module's, or (in training) exactly the
ones a stage trains (:meth:`opensd.training.stage.Stage.trainable`), by their names in the
module.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from opensd.errors import OpenSDError

Parameters = Mapping[str, torch.Tensor]


def _named(params: nn.Module | Parameters) -> Parameters:
    return dict(params.named_parameters()) if isinstance(params, nn.Module) else params


class EMA:
    """``update(params)`` after each optimiser step; ``copy_to(module)`` to use the average.

    ``params``: a module (all its parameters) or parameters by name (a module's names)."""

    def __init__(self, params: nn.Module | Parameters, decay: float) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise OpenSDError(f"EMA decay must be a number in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {k: p.detach().float().clone() for k, p in _named(params).items()}

    def current_decay(self) -> float:
        """The decay the next update uses (the warm-up rule above)."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, params: nn.Module | Parameters) -> None:
        """Move the average towards ``params`` (a module or parameters by name) by the current
        decay; each averaged name must be among them (others are not averaged)."""
        d = self.current_decay()
        named = _named(params)
        missing = [k for k in self.shadow if k not in named]
        if missing:
            raise OpenSDError(f"EMA.update: no parameter {missing[0]!r} to average")
        shadows = list(self.shadow.values())
        torch._foreach_lerp_(shadows, [named[k].detach().float() for k in self.shadow], 1.0 - d)  # one fused op
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> nn.Module:
        """Overwrite ``module``'s parameters with the average; returns ``module``."""
        params = dict(module.named_parameters())
        missing = sorted(set(self.shadow) - set(params))
        if missing:
            raise OpenSDError(f"EMA.copy_to: the module lacks parameter(s) {', '.join(missing[:5])}")
        for k, v in self.shadow.items():
            params[k].copy_(v)
        return module

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise OpenSDError("EMA state does not match the module's parameters")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
