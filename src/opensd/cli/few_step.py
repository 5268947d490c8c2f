"""``--few-step`` of ``opensd generate``, ``img2img``, ``inpaint`` and ``eval``: the model's LCM-LoRA.

The model folder's ``lcm_lora.safetensors`` is added to ``--lora`` and ``--steps``,
``--sampler`` and ``--cfg-scale`` default to what it was distilled for (4, ``lcm``, 1),
each only where the user gave none (:mod:`opensd.pipelines.few_step`). Checked before the
model loads: a model without the file is one line naming it.
"""

from __future__ import annotations

from pathlib import Path

import typer

from opensd.errors import OpenSDError

FEW_STEP = typer.Option(
    False, "--few-step",
    help="Few-step generation with the model folder's LCM-LoRA (lcm_lora.safetensors; the default model has one): "
    "the LoRA, and unless given --steps 4, --sampler lcm, --cfg-scale 1.",
)


def given(ctx: typer.Context, name: str) -> bool:
    """Whether the user set the option ``name`` (typer vendors click: compare the source's name, not click's enum)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def apply_few_step(ctx: typer.Context, args: dict, model: Path | None, lora: list[str] | None,
                   turbo: bool = False) -> list[str] | None:
    """``--few-step``: the settings of :data:`opensd.pipelines.few_step.FEW_STEP` into ``args``
    (``steps``, ``sampler``, ``cfg_scale``) where not given, and ``lora`` with the model's
    LCM-LoRA added (returned)."""
    from opensd.defaults import resolve_model
    from opensd.pipelines.few_step import few_step_lora, few_step_settings

    if turbo:
        raise OpenSDError("--few-step and --turbo are two different few-step modes (an LCM-LoRA, a Turbo model); give one")
    path = few_step_lora(resolve_model(model))
    args.update(few_step_settings({k: args[k] if given(ctx, k) else None for k in ("steps", "sampler", "cfg_scale")}))
    return [*(lora or []), str(path)]
