"""Few-step generation with a model folder's own LCM-LoRA (``--few-step``).

A model folder may hold ``lcm_lora.safetensors``: an LCM-LoRA distilled from that model
by ``opensd train lcm`` (latent consistency distillation, Luo et al. 2023, "Latent
Consistency Models"; stored as a LoRA, Luo et al. 2023b, "LCM-LoRA"). The default model
has one (models/opensd-shapes/README.md, "Few-step generation"). The few-step mode is
that LoRA at weight 1 with the settings it was distilled for: :data:`FEW_STEP`, 4 steps
of the ``lcm`` sampler at CFG 1 (one U-Net call a step, no guidance pass).

``opensd generate|img2img|inpaint|eval --few-step`` resolve the file here and set those
settings where the user gave none (:func:`few_step_settings`); from Python,
:func:`few_step_kwargs` gives the keyword arguments of one ``txt2img``/``img2img`` call.
Nothing is set on the pipeline: the LoRA is this call's ``networks``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opensd.errors import OpenSDError

LCM_LORA_FILE = "lcm_lora.safetensors"


class FewStepError(OpenSDError):
    """The few-step mode was asked of a model that has no LCM-LoRA beside it."""

    kind = "FewStepError"


@dataclass(frozen=True)
class FewStepSettings:
    """What an LCM-LoRA samples with: ``steps`` of ``sampler`` at ``cfg_scale`` (1: no guidance)."""

    steps: int = 4
    sampler: str = "lcm"
    cfg_scale: float = 1.0


FEW_STEP = FewStepSettings()


def few_step_lora(model_path: str | Path) -> Path:
    """The LCM-LoRA of the model at ``model_path``: ``<folder>/lcm_lora.safetensors`` for a
    model folder; a :class:`FewStepError` naming what is missing and what to give instead."""
    folder = Path(model_path)
    if not folder.is_dir():
        raise FewStepError(
            f"--few-step uses the LCM-LoRA in a model's folder ({LCM_LORA_FILE}); {folder} is not a folder: give "
            f"--lora FILE --sampler lcm --steps {FEW_STEP.steps} --cfg-scale {FEW_STEP.cfg_scale:g} instead")
    path = folder / LCM_LORA_FILE
    if not path.is_file():
        raise FewStepError(
            f"--few-step: the model {folder} has no LCM-LoRA ({path} not found); distil one with opensd train lcm "
            f"(docs/training.md) and put it there, or give --lora FILE --sampler lcm --steps {FEW_STEP.steps} "
            f"--cfg-scale {FEW_STEP.cfg_scale:g}")
    return path


def few_step_settings(given: dict[str, Any]) -> dict[str, Any]:
    """:data:`FEW_STEP`'s ``steps``, ``sampler`` and ``cfg_scale``, each where ``given`` has
    it as None (None: the user did not set it); the given values stay."""
    defaults = {"steps": FEW_STEP.steps, "sampler": FEW_STEP.sampler, "cfg_scale": FEW_STEP.cfg_scale}
    return {k: (defaults[k] if given.get(k) is None else given[k]) for k in defaults}


def few_step_kwargs(pipe: Any, weight: float = 1.0) -> dict[str, Any]:
    """``pipe.txt2img(prompt, **few_step_kwargs(pipe))``: the settings of :data:`FEW_STEP` and
    ``networks`` with the model folder's LCM-LoRA at ``weight`` (this call's only), merged
    into the call's own copy of the adapted weights (``AdapterSet(merge_weights=True)``: one
    op per layer at every step; the shared model is untouched). They are computed at the first
    call that uses them and kept as long as the returned ``networks``: reuse it for many calls."""
    from opensd.checkpoints.lora import LoRAFile, LoRAUse
    from opensd.pipelines.lora_library import LoraBudget, LoraLibrary

    use = LoRAUse(LoRAFile.load(few_step_lora(pipe.loaded.path)), unet=weight, te=weight)
    networks = LoraLibrary(None).networks_for(pipe.model, "", [use], LoraBudget())
    networks = networks.with_merged_weights()  # one op per layer at every step
    return {"steps": FEW_STEP.steps, "sampler": FEW_STEP.sampler, "cfg_scale": FEW_STEP.cfg_scale, "networks": networks}
