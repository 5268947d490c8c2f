"""``opensd train vae|clip|unet``: train the whole stack from scratch; ``opensd train taesd``:
distil a tiny autoencoder from a model's VAE; ``opensd train lora`` and ``opensd train
embedding``: fine-tune a frozen model of any family; ``opensd train lcm``: distil one into a
few-step LCM-LoRA; ``opensd train segment``: a U-Net as a semantic segmenter (the network
before the denoiser); ``opensd train controlnet``: a ControlNet that steers a frozen SD 1.x/2.x model.

Mounted by :mod:`opensd.cli.main` with :func:`register`; also runs on its own as
``python -m opensd.cli.train`` (so ``torchrun --nproc_per_node N -m opensd.cli.train
unet ...`` trains data-parallel). A config comes from the stage's defaults, a TOML
file (``--config``), ``--set key=value`` overrides, then the explicit options, in that
order of precedence (later wins), above a run preset (``--preset quick``: minutes on a
CPU, see :mod:`opensd.training.presets`). After the first few steps the run prints how
long it will take at the measured speed (:mod:`opensd.training.estimate`).
``--evaluator MODULE:NAME`` gives the vae, clip, unet, taesd, lcm, segment or controlnet stage a Python callable of its
evaluator protocol (:mod:`opensd.training.evaluation`) in place of the data source's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from opensd.cli.common import fail_cleanly

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _train() -> None:
    """Train the VAE, the text encoder (CLIP) and the U-Net from scratch, or a LoRA or an embedding."""


def register(parent: typer.Typer) -> None:
    """Add the ``train`` sub-app to the main ``opensd`` app."""
    parent.add_typer(app, name="train", help="Train the VAE, the text encoder (CLIP) and the U-Net from scratch, "
                                                      "or fine-tune a model (LoRA, textual inversion).")


CONFIG = typer.Option(None, "--config", "-c", help="TOML config file (see docs/training.md).")
SET = typer.Option(None, "--set", help="Override a config key, e.g. --set train.lr=1e-4 (repeatable).")
OUT = typer.Option(None, "--out", "-o", help="Run folder (train.out_dir).")
STEPS = typer.Option(None, "--steps", help="Optimiser steps (train.steps).")
BATCH = typer.Option(None, "--batch-size", "-b", help="Global batch size (train.batch_size).")
LR = typer.Option(None, "--lr", help="Learning rate (train.lr).")
SEED = typer.Option(None, "--seed", help="Training seed: initial weights, batches, noise (train.seed).")
DATA = typer.Option(None, "--data", help="'shapes' (the generator itself) or an image-caption folder.")
SIZE = typer.Option(None, "--image-size", help="Image side in pixels (data.image_size).")
DATA_SEED = typer.Option(None, "--data-seed", help="Shapes dataset seed (data.seed).")
DEVICE = typer.Option(None, "--device", help="auto (CUDA if available), cpu, cuda or cuda:N (train.device).")
BF16 = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast (train.bf16).")
RESUME = typer.Option(False, "--resume", help="Continue the run folder from its last checkpoint (fresh if none).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")
EVALUATOR = typer.Option(None, "--evaluator", help="MODULE:NAME, a Python callable that evaluates the stage "
                        "(opensd.training.evaluation), or none; default: the data source's (the shapes world's judges "
                        "for --data shapes, none for a folder).")
PRESET = typer.Option(None, "--preset", help="quick: a first run in minutes on a CPU (tiny networks, few steps); "
                                             "--config, --set and the options above still override it.")


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def build_config(cfg_cls: type, config: Path | None, sets: list[str] | None, options: dict[str, Any],
                 preset: dict[str, Any] | None = None):
    """Defaults < ``preset`` (a run preset's table) < TOML file < ``--set`` < explicit options (``None`` = not given)."""
    from opensd.training.config import apply_overrides, merge_tables, read_toml, stage_config_from_dict

    data = read_toml(config) if config is not None else {}
    data = apply_overrides(merge_tables(preset or {}, data), sets or [])
    for key, value in options.items():
        if value is None:
            continue
        if key == "data":
            if value == "shapes":
                _set(data, "data.source", "shapes")
            else:
                _set(data, "data.source", "folder")
                _set(data, "data.path", str(value))
            continue
        _set(data, key, value)
    return stage_config_from_dict(cfg_cls, data)


def load_evaluator(spec: str | None) -> Any:
    """``--evaluator``: ``None`` -> the data source's (``FROM_DATA``), ``none`` -> no evaluator,
    ``MODULE:NAME`` -> that attribute of that importable module, which must be callable."""
    import importlib

    from opensd.errors import OpenSDError
    from opensd.training.evaluation import FROM_DATA

    if spec is None:
        return FROM_DATA
    if spec == "none":
        return None
    module, _, name = spec.partition(":")
    if not module or not name:
        raise OpenSDError(f"--evaluator {spec!r}: give MODULE:NAME (a callable in an importable module) or none")
    try:
        found = getattr(importlib.import_module(module), name)
    except Exception as e:  # the user's module: whatever its import raises is reported in one line
        raise OpenSDError(f"--evaluator {spec!r}: cannot load it ({type(e).__name__}: {e})") from None
    if not callable(found):
        raise OpenSDError(f"--evaluator {spec!r}: {name} is a {type(found).__name__}, not a callable")
    return found


def _common(out, steps, batch_size, lr, seed, data, image_size, data_seed, device, bf16, quiet) -> dict[str, Any]:
    return {
        "train.out_dir": None if out is None else str(out), "train.steps": steps, "train.batch_size": batch_size,
        "train.lr": lr, "train.seed": seed, "data": data, "data.image_size": image_size, "data.seed": data_seed,
        "train.device": device, "train.bf16": bf16, "train.progress": False if quiet else None,
    }


def _config(stage: str, cfg_cls: type, config, sets, options, preset: str | None):
    from opensd.training.presets import run_preset

    return build_config(cfg_cls, config, sets, options, run_preset(stage, preset))


def _run(make_stage: Callable[[Any], Any], cfg: Any, resume: bool, preset: str | None) -> None:
    import time

    from opensd.training.estimate import TimeEstimate, format_duration
    from opensd.training.loop import NonFiniteLossError, run_stage
    from opensd.training.presets import QUICK_SECONDS

    stage = make_stage(cfg)
    estimate = TimeEstimate(stage.name, cfg.train.steps, time_limit=cfg.train.time_limit,
                            quick_seconds=None if preset == "quick" else QUICK_SECONDS.get(stage.name))
    t0 = time.perf_counter()
    try:
        result = run_stage(stage, resume=resume, hooks=[estimate])
    except NonFiniteLossError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if result.export is not None:  # rank 0
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if "loss" in k or k.startswith("eval_"))
        typer.echo(f"{stage.name}: {result.step} steps in {result.run_dir} ({shown}), "
                   f"{format_duration(time.perf_counter() - t0)} wall")
        typer.echo(f"exported {result.export}")


@app.command("vae")
@fail_cleanly
def vae(
    config: Path | None = CONFIG, set_: list[str] | None = SET, out: Path | None = OUT,
    steps: int | None = STEPS, batch_size: int | None = BATCH, lr: float | None = LR,
    seed: int | None = SEED, data: str | None = DATA, image_size: int | None = SIZE,
    data_seed: int | None = DATA_SEED, device: str | None = DEVICE, bf16: bool | None = BF16,
    resume: bool = RESUME, quiet: bool = QUIET, preset: str | None = PRESET, evaluator: str | None = EVALUATOR,
) -> None:
    """Train the KL autoencoder; writes OUT/vae/ for `opensd train unet --vae OUT`."""
    from opensd.training.vae import VAEStage, VAEStageConfig

    opts = _common(out, steps, batch_size, lr, seed, data, image_size, data_seed, device, bf16, quiet)
    judge = load_evaluator(evaluator)
    _run(lambda c: VAEStage(c, evaluator=judge), _config("vae", VAEStageConfig, config, set_, opts, preset), resume, preset)


@app.command("clip")
@fail_cleanly
def clip(
    config: Path | None = CONFIG, set_: list[str] | None = SET, out: Path | None = OUT,
    steps: int | None = STEPS, batch_size: int | None = BATCH, lr: float | None = LR,
    seed: int | None = SEED, data: str | None = DATA, image_size: int | None = SIZE,
    data_seed: int | None = DATA_SEED, device: str | None = DEVICE, bf16: bool | None = BF16,
    resume: bool = RESUME, quiet: bool = QUIET, preset: str | None = PRESET, evaluator: str | None = EVALUATOR,
) -> None:
    """Pre-train the text encoder contrastively; writes OUT/text_encoder/ for `--clip OUT`."""
    from opensd.training.clip import CLIPStage, CLIPStageConfig

    opts = _common(out, steps, batch_size, lr, seed, data, image_size, data_seed, device, bf16, quiet)
    judge = load_evaluator(evaluator)
    _run(lambda c: CLIPStage(c, evaluator=judge), _config("clip", CLIPStageConfig, config, set_, opts, preset), resume, preset)


@app.command("unet")
@fail_cleanly
def unet(
    vae_dir: Path | None = typer.Option(None, "--vae", help="Run folder of `opensd train vae` (vae_dir)."),
    clip_dir: Path | None = typer.Option(None, "--clip", help="Run folder of `opensd train clip` (clip_dir)."),
    config: Path | None = CONFIG, set_: list[str] | None = SET, out: Path | None = OUT,
    steps: int | None = STEPS, batch_size: int | None = BATCH, lr: float | None = LR,
    seed: int | None = SEED, data: str | None = DATA, image_size: int | None = SIZE,
    data_seed: int | None = DATA_SEED, device: str | None = DEVICE, bf16: bool | None = BF16,
    resume: bool = RESUME, quiet: bool = QUIET, preset: str | None = PRESET, evaluator: str | None = EVALUATOR,
) -> None:
    """Train the U-Net on cached latents; exports OUT/model/ for `opensd generate -m OUT/model`."""
    from opensd.training.unet import UNetStage, UNetStageConfig

    opts = _common(out, steps, batch_size, lr, seed, data, image_size, data_seed, device, bf16, quiet)
    opts["vae_dir"] = None if vae_dir is None else str(vae_dir)
    opts["clip_dir"] = None if clip_dir is None else str(clip_dir)
    judge = load_evaluator(evaluator)
    _run(lambda c: UNetStage(c, evaluator=judge), _config("unet", UNetStageConfig, config, set_, opts, preset), resume, preset)


@app.command("taesd")
@fail_cleanly
def taesd(
    teacher: Path | None = typer.Option(None, "--teacher", help="The model whose VAE is distilled (teacher; "
                                                                    "default: the default model)."),
    config: Path | None = CONFIG, set_: list[str] | None = SET, out: Path | None = OUT,
    steps: int | None = STEPS, batch_size: int | None = BATCH, lr: float | None = LR,
    seed: int | None = SEED, data: str | None = DATA, image_size: int | None = SIZE,
    data_seed: int | None = DATA_SEED, device: str | None = DEVICE, bf16: bool | None = BF16,
    resume: bool = RESUME, quiet: bool = QUIET, preset: str | None = PRESET, evaluator: str | None = EVALUATOR,
) -> None:
    """Distil a tiny autoencoder (TAESD) from a model's VAE; writes OUT/taesd/ (copy it into the model's folder)."""
    from opensd.training.taesd import TAESDStage, TAESDStageConfig

    opts = _common(out, steps, batch_size, lr, seed, data, image_size, data_seed, device, bf16, quiet)
    opts["teacher"] = None if teacher is None else str(teacher)
    judge = load_evaluator(evaluator)
    _run(lambda c: TAESDStage(c, evaluator=judge), _config("taesd", TAESDStageConfig, config, set_, opts, preset),
         resume, preset)


@app.command("segment")
@fail_cleanly
def segment(
    config: Path | None = CONFIG, set_: list[str] | None = SET, out: Path | None = OUT,
    steps: int | None = STEPS, batch_size: int | None = BATCH, lr: float | None = LR,
    seed: int | None = SEED, data: str | None = DATA, image_size: int | None = SIZE,
    data_seed: int | None = DATA_SEED, device: str | None = DEVICE, bf16: bool | None = BF16,
    resume: bool = RESUME, quiet: bool = QUIET, evaluator: str | None = EVALUATOR,
) -> None:
    """Train a U-Net as a semantic segmenter (the shapes world's masks); writes OUT/segmenter.safetensors."""
    from opensd.training.segment import SegmentStage, SegmentStageConfig

    opts = _common(out, steps, batch_size, lr, seed, data, image_size, data_seed, device, bf16, quiet)
    judge = load_evaluator(evaluator)
    _run(lambda c: SegmentStage(c, evaluator=judge), build_config(SegmentStageConfig, config, set_, opts), resume, None)


MODEL = typer.Option(None, "--model", "-m", help="The frozen base model: any model opensd loads (default: the default model).")


@app.command("lora")
@fail_cleanly
def lora(
    model: Path | None = MODEL,
    rank: int | None = typer.Option(None, "--rank", help="LoRA rank r (rank; default 4)."),
    alpha: float | None = typer.Option(None, "--alpha", help="LoRA alpha: the update is alpha/r * up @ down (default 4)."),
    text_encoder: bool | None = typer.Option(None, "--text-encoder/--no-text-encoder",
                                                help="Also adapt the text encoder(s) (default: yes)."),
    targets: str | None = typer.Option(None, "--targets", help="attn | attn+ff (default) | all (+ convolutions, LoCon)."),
    instance_prompt: str | None = typer.Option(None, "--instance-prompt",
                                                  help="One caption for every image, e.g. 'a sks dog' (DreamBooth)."),
    prior_data: Path | None = typer.Option(None, "--prior-data", help="Class images for prior preservation."),
    class_prompt: str | None = typer.Option(None, "--class-prompt",
                                               help="Class prompt, e.g. 'a dog': the class images' caption, and what "
                                                    "the base model draws when there is no --prior-data."),
    prior_weight: float | None = typer.Option(None, "--prior-weight", help="Weight of the class loss (default 1)."),
    num_class_images: int | None = typer.Option(None, "--num-class-images",
                                                   help="Class images to draw (default: as many as instance images)."),
    output_name: str | None = typer.Option(None, "--output-name", help="OUT/NAME.safetensors (default: OUT's name)."),
    config: Path | None = CONFIG, set_: list[str] | None = SET, out: Path | None = OUT,
    steps: int | None = STEPS, batch_size: int | None = BATCH, lr: float | None = LR,
    seed: int | None = SEED, data: str | None = DATA, image_size: int | None = SIZE,
    device: str | None = DEVICE, bf16: bool | None = BF16, resume: bool = RESUME, quiet: bool = QUIET,
) -> None:
    """Train a LoRA on a frozen model; writes OUT/NAME.safetensors (kohya format) for `opensd generate --lora`."""
    from opensd.training.lora import LoRAStage, LoRAStageConfig

    opts = _common(out, steps, batch_size, lr, seed, data, image_size, None, device, bf16, quiet)
    opts.update({"model": None if model is None else str(model), "rank": rank, "alpha": alpha,
                 "text_encoder": text_encoder, "targets": targets, "instance_prompt": instance_prompt,
                 "prior_data": None if prior_data is None else str(prior_data), "class_prompt": class_prompt,
                 "prior_weight": prior_weight, "num_class_images": num_class_images, "output_name": output_name})
    _run(LoRAStage, build_config(LoRAStageConfig, config, set_, opts), resume, None)


@app.command("lcm")
@fail_cleanly
def lcm(
    model: Path | None = MODEL,
    rank: int | None = typer.Option(None, "--rank", help="LoRA rank r (rank; default 16)."),
    alpha: float | None = typer.Option(None, "--alpha", help="LoRA alpha (default 16)."),
    targets: str | None = typer.Option(None, "--targets", help="attn | attn+ff | all (default: + convolutions, as LCM-LoRA)."),
    guidance: float | None = typer.Option(None, "--guidance", help="The teacher's CFG scale, fixed (guidance_min = guidance_max; default 5)."),
    output_name: str | None = typer.Option(None, "--output-name", help="OUT/NAME.safetensors (default: OUT's name)."),
    config: Path | None = CONFIG, set_: list[str] | None = SET, out: Path | None = OUT,
    steps: int | None = STEPS, batch_size: int | None = BATCH, lr: float | None = LR,
    seed: int | None = SEED, data: str | None = DATA, image_size: int | None = SIZE,
    data_seed: int | None = DATA_SEED, device: str | None = DEVICE, bf16: bool | None = BF16,
    resume: bool = RESUME, quiet: bool = QUIET, evaluator: str | None = EVALUATOR,
) -> None:
    """Latent consistency distillation into a LoRA (LCM-LoRA); writes OUT/NAME.safetensors for `--sampler lcm`."""
    from opensd.training.lcm import LCMStage, LCMStageConfig

    opts = _common(out, steps, batch_size, lr, seed, data, image_size, data_seed, device, bf16, quiet)
    opts.update({"model": None if model is None else str(model), "rank": rank, "alpha": alpha, "targets": targets,
                 "guidance_min": guidance, "guidance_max": guidance, "output_name": output_name})
    judge = load_evaluator(evaluator)
    _run(lambda c: LCMStage(c, evaluator=judge), build_config(LCMStageConfig, config, set_, opts), resume, None)


@app.command("controlnet")
@fail_cleanly
def controlnet(
    model: Path | None = MODEL,
    control_map: str | None = typer.Option(None, "--control-map", help="image (default) | edges | flat: how the control "
                                              "images are resized (flat: nearest only, for segmentation and layout maps)."),
    output_name: str | None = typer.Option(None, "--output-name", help="OUT/NAME.safetensors (default: OUT's name)."),
    config: Path | None = CONFIG, set_: list[str] | None = SET, out: Path | None = OUT,
    steps: int | None = STEPS, batch_size: int | None = BATCH, lr: float | None = LR,
    seed: int | None = SEED, data: str | None = DATA, image_size: int | None = SIZE,
    data_seed: int | None = DATA_SEED, device: str | None = DEVICE, bf16: bool | None = BF16,
    resume: bool = RESUME, quiet: bool = QUIET, evaluator: str | None = EVALUATOR,
) -> None:
    """Train a ControlNet for a frozen SD 1.x/2.x model on (image, control image, caption) triples (a folder:
    NAME.png, NAME.control.png or control/NAME.png, NAME.txt; or --data shapes: layout maps); writes OUT/NAME.safetensors."""
    from opensd.training.controlnet import ControlNetStage, ControlNetStageConfig

    opts = _common(out, steps, batch_size, lr, seed, data, image_size, data_seed, device, bf16, quiet)
    opts.update({"model": None if model is None else str(model), "control_map": control_map, "output_name": output_name})
    judge = load_evaluator(evaluator)
    _run(lambda c: ControlNetStage(c, evaluator=judge), build_config(ControlNetStageConfig, config, set_, opts), resume,
         None)


@app.command("embedding")
@fail_cleanly
def embedding(
    model: Path | None = MODEL,
    token: str = typer.Option(..., "--token", help="The new word, e.g. sks-style; also the file's name."),
    init_word: str = typer.Option(..., "--init-word", help="The word whose embedding the vectors start from."),
    vectors: int | None = typer.Option(None, "--vectors", help="Vectors per use of the token (default 1)."),
    config: Path | None = CONFIG, set_: list[str] | None = SET, out: Path | None = OUT,
    steps: int | None = STEPS, batch_size: int | None = BATCH, lr: float | None = LR,
    seed: int | None = SEED, data: str | None = DATA, image_size: int | None = SIZE,
    device: str | None = DEVICE, bf16: bool | None = BF16, resume: bool = RESUME, quiet: bool = QUIET,
) -> None:
    """Textual inversion on a frozen model; writes OUT/TOKEN.safetensors (A1111's embedding format)."""
    from opensd.training.embedding import EmbeddingStage, EmbeddingStageConfig

    opts = _common(out, steps, batch_size, lr, seed, data, image_size, None, device, bf16, quiet)
    opts.update({"model": None if model is None else str(model), "token": token, "init_word": init_word,
                 "vectors": vectors})
    _run(EmbeddingStage, build_config(EmbeddingStageConfig, config, set_, opts), resume, None)


if __name__ == "__main__":  # pragma: no cover
    app()
