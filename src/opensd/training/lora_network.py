"""A trainable LoRA network: low-rank factors for chosen layers of a frozen model, as parameters.

LoRA (Hu et al. 2021) learns, for a layer of weight ``W`` (out, in), ``ΔW = (alpha / r) ·
up @ down`` with ``down`` (r, in) and ``up`` (out, r); for a convolution (LoCon) ``down`` is
(r, in, kh, kw) and ``up`` (out, r, 1, 1). Initialised as sd-scripts does (``down``
Kaiming-uniform with ``a = sqrt(5)``, ``up`` zeros), ``ΔW = 0`` at step 0: the network
starts as the base model.

:class:`LoRANetwork` holds one :class:`LoRALayer` per adapted layer, under the layer's kohya
name (:func:`opensd.checkpoints.lora_names.kohya_names`: ``lora_unet_...``, ``lora_te_...``,
``lora_te1_``/``lora_te2_`` for SDXL). Its parameters are all it owns: the base model is
referenced, never registered, so ``state_dict()`` and ``parameters()`` are the LoRA alone.
:meth:`LoRANetwork.adapters` gives the :class:`~opensd.models.adapters.AdapterSet` whose
deltas *are* those parameters (gradients flow through ``use_adapters``); OpenCLIP's fused
q/k/v projection gets one factor pair per row block (:class:`Target.rows`), as kohya writes
them under the transformers names (``..._self_attn_q_proj``).

Which layers (``targets``):

* ``attn``: attention projections (U-Net ``attn1``/``attn2`` ``to_q/to_k/to_v/to_out.0``,
  text ``q/k/v/out_proj``);
* ``attn+ff``: also the feed-forward layers and the transformer's ``proj_in``/``proj_out``
  (text: ``mlp.fc1/fc2``): every layer sd-scripts' ``networks.lora`` adapts by default;
* ``all``: also the ResNet blocks' convolutions and time projections and the down/up
  samplers (LoCon, sd-scripts' ``conv_dim = rank``, ``conv_alpha = alpha``).

:meth:`LoRANetwork.kohya_state` is the file's tensors (``<name>.lora_down.weight``,
``<name>.lora_up.weight``, ``<name>.alpha``), which :class:`opensd.checkpoints.lora.LoRAFile`
and diffusers' ``load_lora_weights`` read; :func:`kohya_metadata` its sd-scripts ``ss_*``
metadata.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping

import torch
from torch import nn

from opensd.checkpoints.lora_names import Target, kohya_names, lora_targets
from opensd.models.adapters import AdapterSet, Delta, LowRank, RowSlice
from opensd.models.stable_diffusion import ModelFamily, StableDiffusion


class LoRATargets(enum.Enum):
    """Which layers a LoRA adapts (see the module doc)."""

    ATTN = "attn"
    ATTN_FF = "attn+ff"
    ALL = "all"


# Layer kinds by their diffusers / transformers path (the PEFT spelling of lora_names).
_ATTN = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$|\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
_FF = re.compile(r"\.ff\.net\.(0\.proj|2)$|\.attentions\.\d+\.(proj_in|proj_out)$|\.mlp\.(fc1|fc2)$")
_CONV = re.compile(r"\.(resnets\.\d+|downsamplers\.\d+|upsamplers\.\d+)\.")


def layer_kind(peft_name: str) -> str | None:
    """``"attn"``, ``"ff"``, ``"conv"`` or None (never adapted: conv_in/out, time/label embeddings)."""
    if _ATTN.search(peft_name):
        return "attn"
    if _FF.search(peft_name):
        return "ff"
    if _CONV.search(peft_name):
        return "conv"
    return None


_KINDS = {LoRATargets.ATTN: {"attn"}, LoRATargets.ATTN_FF: {"attn", "ff"}, LoRATargets.ALL: {"attn", "ff", "conv"}}


def select_targets(model: StableDiffusion, targets: LoRATargets, text_encoder: bool) -> dict[str, Target]:
    """kohya name -> :class:`Target` of every layer ``targets`` adapts (the text encoders' only
    with ``text_encoder``), in the model's module order."""
    table = lora_targets(model)
    peft = {(id(t.module), t.rows): name for name, t in table.items() if not name.startswith("lora_")}
    out = {}
    for name, t in kohya_names(model).items():
        if t.network != "unet" and not text_encoder:
            continue
        if layer_kind(peft[(id(t.module), t.rows)]) in _KINDS[targets]:
            out[name] = t
    return out


class Shared(dict):
    """A dict that copies as itself: the base model's layers a network refers to stay shared
    when the network is deep-copied (an EMA copy holds new factors on the same base)."""

    def __deepcopy__(self, memo: dict) -> Shared:
        return self


class LoRALayer(nn.Module):
    """``down`` (r, in[, kh, kw]) and ``up`` (out, r[, 1, 1]) of one layer; ``scale = alpha / r``."""

    def __init__(self, shape: tuple[int, ...], rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        out_f, in_f, *kernel = shape
        tail = (1, 1) if kernel else ()
        self.down = nn.Parameter(torch.empty(rank, in_f, *kernel))
        self.up = nn.Parameter(torch.zeros(out_f, rank, *tail))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5), generator=generator)  # sd-scripts' LoRAModule init
        self.scale = alpha / rank

    def delta(self, target: Target) -> Delta:
        d: Delta = LowRank(self.down, self.up, self.scale)
        return d if target.rows is None else RowSlice(d, *target.rows)


class LoRANetwork(nn.Module):
    """The trainable LoRA of ``model``'s chosen layers (``model`` stays frozen and unregistered)."""

    def __init__(self, model: StableDiffusion, *, rank: int = 4, alpha: float = 4.0,
                 targets: LoRATargets = LoRATargets.ATTN_FF, text_encoder: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.rank = rank
        # alpha as the file stores it (float32), so the scale read back is this one, bit for bit
        self.alpha = float(torch.tensor(float(alpha), dtype=torch.float32))
        self.targets_kind, self.text_encoder = targets, text_encoder
        self.family = model.cfg.family
        chosen = select_targets(model, targets, text_encoder)
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleDict({name: LoRALayer(t.weight_shape, rank, self.alpha, g) for name, t in chosen.items()})
        self._targets = Shared(chosen)  # not child modules: the base is neither in the state nor copied

    def adapters(self) -> AdapterSet:
        """The deltas of every layer, live on this network's parameters."""
        deltas: dict[nn.Module, tuple[Delta, ...]] = {}
        for name, layer in self.layers.items():
            assert isinstance(layer, LoRALayer)
            t = self._targets[name]
            deltas[t.module] = deltas.get(t.module, ()) + (layer.delta(t),)
        return AdapterSet(deltas)

    def networks(self) -> set[str]:
        """Which networks it adapts: ``"unet"``, ``"te1"``, ``"te2"``."""
        return {self._targets[n].network for n in self.layers}

    def kohya_state(self) -> dict[str, torch.Tensor]:
        """The kohya file's tensors (float32, on the CPU)."""
        out = {}
        for name, layer in self.layers.items():
            assert isinstance(layer, LoRALayer)
            out[f"{name}.lora_down.weight"] = layer.down.detach().float().cpu()
            out[f"{name}.lora_up.weight"] = layer.up.detach().float().cpu()
            out[f"{name}.alpha"] = torch.tensor(self.alpha, dtype=torch.float32)
        return out


# sd-scripts' ss_base_model_version per family (model_util / sdxl_train_util)
BASE_MODEL_VERSION = {ModelFamily.SD1: "sd_v1", ModelFamily.SD2: "sd_v2", ModelFamily.SDXL: "sdxl_base_v1-0",
                      ModelFamily.SDXL_REFINER: "sdxl_refiner_v1-0"}


def kohya_metadata(network: LoRANetwork, info: Mapping[str, object]) -> dict[str, str]:
    """sd-scripts' ``ss_*`` metadata of ``network`` plus ``info`` (``ss_`` keys, values as str).

    The network keys are written here: ``ss_network_module`` (``networks.lora``),
    ``ss_network_dim``/``ss_network_alpha``, ``ss_network_args`` (``conv_dim``/``conv_alpha``
    for LoCon), ``ss_base_model_version``, ``ss_v2`` and which parts trained.
    """
    args = {"conv_dim": str(network.rank), "conv_alpha": f"{network.alpha:g}"} \
        if network.targets_kind is LoRATargets.ALL else {}
    nets = network.networks()
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(network.rank),
        "ss_network_alpha": f"{network.alpha:g}",
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": BASE_MODEL_VERSION[network.family],
        "ss_v2": str(network.family is ModelFamily.SD2),
        "ss_network_train_unet_only": str(nets == {"unet"}),
        "ss_network_train_text_encoder_only": str("unet" not in nets),
        "opensd_lora_targets": network.targets_kind.value,
    }
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()})
    return meta
