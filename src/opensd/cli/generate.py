"""``opensd generate``, ``opensd img2img``, ``opensd inpaint`` and ``opensd png-info``."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import typer

from opensd.cli import control as cn
from opensd.cli import hires as hires_cli
from opensd.cli.common import (
    DEVICE,
    PRECISION,
    PREDICTION,
    THREADS,
    PrecisionChoice,
    PredictionChoice,
    fail_cleanly,
    load_pipeline,
    use_threads,
)
from opensd.cli.few_step import FEW_STEP, apply_few_step
from opensd.errors import OpenSDError

DEFAULT_OUT_DIR = Path("outputs")


def _pipeline(model: Path | None, device, threads: int | None, prediction: str = "auto", precision: str = "auto",
              tiny_vae: Path | None = None):
    """The pipeline for ``model`` on ``device`` (a resolved :class:`torch.device`), threads set for it;
    ``prediction``: --prediction (auto: what the model says; eps or v: load it so); ``precision``:
    --precision; ``tiny_vae``: --tiny-vae (None: the model folder's, if any)."""
    from opensd.defaults import resolve_model

    pipe = load_pipeline(resolve_model(model), device, precision, prediction, tiny_vae=tiny_vae)
    use_threads(threads, pipe.model)
    return pipe


def _seed(seed: int | None) -> tuple[int, bool]:
    """The seed a run uses, and whether it was drawn: ``seed``, or (none, or -1) one drawn here,
    which the caller prints so that the image can be made again."""
    from opensd.pipelines.request import SEED_RANGE

    if seed is not None and seed != -1:
        return seed, False
    return random.randrange(SEED_RANGE), True


def _out_paths(out: str | None, n: int, seed: int) -> list[Path]:
    """Where a run of ``n`` images writes them; the suffix of ``out`` names the format (none: ``.png``)."""
    from opensd.pipelines.infotext import image_format

    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = DEFAULT_OUT_DIR / f"{stamp}-{seed}.png"
    else:
        if not out.strip():
            raise OpenSDError("--out is empty; give a file name such as out.png")
        base = Path(out)
        if base.exists() and base.is_dir():
            raise OpenSDError(f"--out {out} is a folder; give a file name such as {base / 'out.png'}")
        if not base.suffix:
            base = base.with_name(base.name + ".png")
        image_format(base, what="--out")
    if n == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{i}{base.suffix}") for i in range(n)]


# ----------------------------------------------------------------------------- LoRAs (--lora, --lora-dir, <lora:...> tags)


def _lora_target(head: str, library):
    """The LoRA file ``head`` names: a path, else a name in the LoRA folder; None when neither."""
    from opensd.checkpoints.lora import LoRAFile

    if Path(head).is_file():
        return LoRAFile.load(head)
    if head and library.has(head):
        return library.load(library.find(head))
    return None


def lora_use(spec: str, library):
    """``--lora PATH``, ``PATH:WEIGHT`` (text encoder and U-Net) or ``PATH:TE:UNET``; PATH may be a NAME in --lora-dir."""
    from opensd.checkpoints.lora import LoRAUse
    from opensd.prompts.extra_networks import parse_multiplier

    parts = spec.split(":")
    for k in range(min(2, len(parts) - 1) + 1):  # 0, 1 or 2 trailing numbers (a Windows drive's colon stays in the path)
        head, nums = ":".join(parts[: len(parts) - k]), parts[len(parts) - k:]
        if k and not all(_is_number(n) for n in nums):
            break
        target = _lora_target(head, library)
        if target is not None:
            te = parse_multiplier(nums[0], f"--lora {spec}") if nums else 1.0
            unet = parse_multiplier(nums[-1], f"--lora {spec}") if nums else te
            return LoRAUse(target, unet=unet, te=te)
    where = f", and no LoRA of that name in {library.folder}" if library.folder is not None else ""
    raise OpenSDError(f"--lora {spec}: no such file{where}; give PATH[:WEIGHT] or PATH:TE:UNET (a .safetensors, .pt or .ckpt file)")


def cli_budget():
    """No cap on the LoRAs of a run on one's own machine (the server has one: docs/server.md)."""
    from opensd.pipelines.lora_library import LoraBudget

    return LoraBudget(max_count=2**31, max_bytes=2**62)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _loras(specs: list[str] | None, lora_dir: Path | None, prompt: str):
    """(library, --lora uses) with every file read and every prompt tag resolved: before the model loads."""
    from opensd.pipelines.lora_library import LoraLibrary, default_lora_dir

    if lora_dir is not None and not lora_dir.is_dir():
        raise OpenSDError(f"--lora-dir {lora_dir} is not a folder")
    library = LoraLibrary(lora_dir if lora_dir is not None else default_lora_dir())
    extra = [lora_use(spec, library) for spec in specs or []]
    library.uses_for(prompt, cli_budget(), extra)  # tag errors and unknown names now; the files stay cached
    return library, extra


def _run(kind: str, pipe_args: dict, run: dict, refiner: Path | None = None) -> None:
    """Run ``pipe.<kind>(**pipe_args)`` and write the images; ``run``: model, device, threads, out, quiet;
    ``refiner``: a second model's path, loaded after the first (``refiner=`` of the pipeline)."""
    from opensd.devices import resolve_device
    from opensd.explain.progress import StepProgress
    from opensd.pipelines.images import load_image
    from opensd.pipelines.infotext import save_image
    from opensd.pipelines.networks import RequestNetworks
    from opensd.prompts.budget import check_text
    from opensd.prompts.vocabulary import prompt_warnings

    # Read inputs and check the output path and device before the (slow) model load.
    device = resolve_device(run["device"])
    if "image" in pipe_args:
        pipe_args["image"] = load_image(pipe_args["image"])
    if "mask" in pipe_args:
        pipe_args["mask"] = load_image(pipe_args["mask"], what="mask")
    for name in ("prompt", "negative_prompt"):  # before the (slow) model load: a non-UTF-8 byte in argv
        check_text(pipe_args[name], what=name)
    pipe_args["seed"], drawn = _seed(pipe_args.get("seed"))
    paths = _out_paths(run["out"], pipe_args["batch_size"], pipe_args["seed"])
    library, lora_uses = _loras(run.get("lora"), run.get("lora_dir"), pipe_args["prompt"])
    embeddings = _embeddings(run.get("embeddings_dir"))
    pipe = _pipeline(run["model"], device, run["threads"], run.get("prediction", "auto"), run["precision"], run.get("tiny_vae"))
    networks = RequestNetworks.merge([
        library.networks_for(pipe.model, pipe_args["prompt"], lora_uses, cli_budget()),
        embeddings.networks_for_prompts(pipe.model, pipe_args["prompt"], pipe_args["negative_prompt"])
        if embeddings is not None else None,
    ])
    if run.get("merge_loras"):  # --few-step: its LoRAs merged for this run's calls
        networks = networks.with_merged_weights()
    if networks:
        pipe_args["networks"] = networks
    if run.get("control"):  # --controlnet: loaded for the model, after it
        pipe_args["control"] = cn.control_units(pipe, run["control"])
    if refiner is not None:
        pipe_args["refiner"] = _pipeline(refiner, device, run["threads"], precision=run["precision"])
    if drawn:  # once the model has loaded: a bad model is the only line then
        typer.echo(f"seed: {pipe_args['seed']}")
    for line in prompt_warnings(pipe.tokenizer, pipe_args["prompt"], pipe_args["negative_prompt"], networks.embeddings):
        typer.echo(f"warning: {line}", err=True)
    with StepProgress(enabled=not run["quiet"]) as progress:
        if run.get("hires") is not None:  # --hires-*: txt2img's two passes
            images = hires_cli.run_hires(pipe, pipe_args, run["hires"], progress)
        else:
            images = getattr(pipe, kind)(callback=progress, **pipe_args)
    for im, path in zip(images, paths, strict=False):
        save_image(im, path, im.info.get("parameters"))
        typer.echo(str(path))


def _embeddings(folder: Path | None):
    """The :class:`EmbeddingLibrary` of ``--embeddings-dir`` (checked before the model loads), or None."""
    if folder is None:
        return None
    from opensd.pipelines.embedding_library import EmbeddingLibrary

    return EmbeddingLibrary(folder)


# The CLI's inpaint area, measured with scripts/inpaint_success.py (README, Inpainting).
CLI_ONLY_MASKED = True
CLI_ONLY_MASKED_PADDING = 2


def _inpaint_options(mask_blur: int, masked_content: str, only_masked: bool, padding: int) -> dict:
    """``inpaint``'s --mask-blur, --masked-content, --only-masked and its padding, checked before the model loads."""
    from opensd.pipelines.inpaint import MaskedContent, check_mask_blur, check_padding

    return {
        "mask_blur": check_mask_blur(mask_blur), "masked_content": MaskedContent.parse(masked_content),
        "only_masked": only_masked, "only_masked_padding": check_padding(padding),
    }


def _common(
    steps: int, sampler: str, karras: bool | None, cfg_scale: float, width: int | None, height: int | None,
    seed: int | None, batch_size: int, clip_skip: int, negative_prompt: str, tiled_vae: bool | None = None,
) -> dict:
    return dict(
        negative_prompt=negative_prompt, steps=steps, sampler=sampler, karras=karras, cfg_scale=cfg_scale,
        width=width, height=height, seed=seed, batch_size=batch_size, clip_skip=clip_skip, tiled_vae=tiled_vae,
    )


def _original_size(text: str | None) -> tuple[int, int] | None:
    """``--original-size HEIGHTxWIDTH`` as (height, width)."""
    if text is None:
        return None
    parts = text.lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise OpenSDError(f"--original-size must be HEIGHTxWIDTH in pixels, e.g. 1024x1024, got {text!r}")
    return int(parts[0]), int(parts[1])


def _turbo(ctx: typer.Context, args: dict, strength: float = 1.0) -> None:
    """``--turbo``: SD-Turbo/SDXL-Turbo's settings in ``args``, each only where the user gave none:
    1 step (img2img/inpaint: ceil(1 / strength), the fewest that run one), CFG 1, Euler a,
    and the SGM Uniform schedule (first step at t = 999) unless the sampler names a spacing."""
    import math

    from opensd.diffusion.registry import resolve_sampler
    from opensd.diffusion.schedules import SigmaSpacing

    def given(name: str) -> bool:  # typer vendors click: compare the source's name, not click's enum
        source = ctx.get_parameter_source(name)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    if not given("steps"):
        args["steps"] = max(1, math.ceil(1 / strength)) if strength > 0 else 1
    if not given("cfg_scale"):
        args["cfg_scale"] = 1.0
    if not given("sampler"):
        args["sampler"] = "euler_a"
    try:
        _, spacing = resolve_sampler(args["sampler"], args["karras"])
    except OpenSDError:
        return  # the request's validation names the bad sampler
    if spacing is SigmaSpacing.DEFAULT and args["karras"] is None:
        args["sampler"] = f"{args['sampler']} SGM Uniform"


def _sdxl(
    ctx: typer.Context, args: dict, turbo: bool, refiner: Path | None, switch_at: float | None,
    aesthetic: float, negative_aesthetic: float, original_size: str | None, strength: float = 1.0,
) -> dict:
    """The SDXL, refiner and Turbo options into ``args`` (checked before the model loads)."""
    if switch_at is not None and refiner is None:
        raise OpenSDError("--refiner-switch-at needs --refiner (the model that takes over)")
    if turbo:
        _turbo(ctx, args, strength)
    extra: dict[str, object] = {"aesthetic_score": aesthetic, "negative_aesthetic_score": negative_aesthetic}
    if original_size is not None:
        extra["original_size"] = _original_size(original_size)
    if switch_at is not None:
        extra["refiner_switch_at"] = switch_at
    return {**args, **extra}


def _options(
    model: Path | None, device: str | None, threads: int | None, out: str | None, quiet: bool,
    lora: list[str] | None = None, lora_dir: Path | None = None, embeddings_dir: Path | None = None,
    precision: str = "auto", merge_loras: bool = False,
) -> dict:
    return dict(model=model, device=device, threads=threads, out=out, quiet=quiet, lora=lora, lora_dir=lora_dir,
                embeddings_dir=embeddings_dir, precision=getattr(precision, "value", precision), merge_loras=merge_loras)


MODEL = typer.Option(None, "--model", "-m", help="Model path (diffusers folder, SD file or opensd folder); default: the bundled model.")
NEG = typer.Option("", "--negative-prompt", "-n", help="What to steer away from.")
STEPS = typer.Option(20, help="Sampling steps.")
SAMPLER = typer.Option("dpmpp_2m", help="Sampler id or A1111 name, e.g. 'dpmpp_2m', 'Euler a', 'DPM++ 2M Karras'.")
KARRAS = typer.Option(None, "--karras/--no-karras", help="Karras sigmas (default: as the sampler name says).")
CFG = typer.Option(7.5, "--cfg-scale", help="Classifier-free guidance scale (1 = off).")
WIDTH = typer.Option(None, help="Width in pixels, a multiple of 8 (default: the model's native size).")
HEIGHT = typer.Option(None, help="Height in pixels, a multiple of 8 (default: the model's native size).")
# img2img and inpaint keep the input's size (StableDiffusionPipeline._size_for)
IMAGE_WIDTH = typer.Option(None, "--width", help="Width in pixels, a multiple of 8 (default: IMAGE's width, rounded down to a multiple of 8).")
IMAGE_HEIGHT = typer.Option(None, "--height", help="Height in pixels, a multiple of 8 (default: IMAGE's height, rounded down to a multiple of 8).")
SEED = typer.Option(None, help="Seed; the same seed gives the same image. Default (or -1): a random one, printed as 'seed: N'.")
BATCH = typer.Option(1, "--batch-size", "-b", help="Images to make; image i uses seed + i.")
CLIP_SKIP = typer.Option(1, "--clip-skip", help="Use the output of the n-th last text layer (A1111's Clip skip).")
OUT = typer.Option(
    None, "--out", "-o",
    help="Output file: .png, .jpg/.jpeg or .webp, with the parameters inside as A1111 stores them "
    "(a batch adds -0, -1, ...). Default: outputs/<time>-<seed>.png",
)
TILED_VAE = typer.Option(
    None, "--tiled-vae/--no-tiled-vae",
    help="Run the VAE (decode, and the img2img/inpaint encode) in overlapping tiles: less memory for large images. "
    "Default: only above 1.5x the model's native size on a side (SD 1.x: 768 px, SDXL: 1536 px).",
)
DECODER = typer.Option(
    "full", "--decoder",
    help="The final decode: full (the model's VAE) or tiny (its tiny autoencoder, TAESD: many times faster, a little "
    "less exact; the default model has one, others take --tiny-vae). A1111's 'VAE type for decode'.",
)
TINY_VAE = typer.Option(
    None, "--tiny-vae",
    help="The tiny autoencoder for --decoder tiny: taesd_decoder.pth/.safetensors, a folder of TAESD files or a "
    "diffusers AutoencoderTiny folder. Default: the one in the model's folder, if any.",
)
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")
EMBEDDINGS_DIR = typer.Option(
    None, "--embeddings-dir", envvar="OPENSD_EMBEDDINGS_DIR",
    help="Folder of textual-inversion embeddings (.pt, .bin, .safetensors, as A1111's embeddings/): "
    "a prompt or negative prompt uses one by its file name, e.g. '(myemb:1.2)'. Default: none.",
)
REFINER = typer.Option(
    None, "--refiner",
    help="A second model that finishes the run (A1111's Refiner; e.g. SDXL's refiner after the SDXL base): same latent space as --model.",
)
SWITCH_AT = typer.Option(None, "--refiner-switch-at", help="Fraction of the run after which --refiner takes over, 0..1 (default 0.8).")
AESTHETIC = typer.Option(6.0, "--aesthetic-score", help="The SDXL refiner's aesthetic-score conditioning of the prompt.")
NEG_AESTHETIC = typer.Option(2.5, "--negative-aesthetic-score", help="The SDXL refiner's aesthetic score of the negative prompt.")
ORIGINAL_SIZE = typer.Option(
    None, "--original-size", help="SDXL's size conditioning: HEIGHTxWIDTH the model is told the source image had (default: the output size).",
)
LORA = typer.Option(
    None, "--lora",
    help="A LoRA to apply: PATH (.safetensors, .pt or .ckpt) or a NAME in --lora-dir, optionally :WEIGHT "
    "(text encoder and U-Net) or :TE:UNET, e.g. --lora style.safetensors:0.8. Repeatable; the same as "
    "<lora:NAME:WEIGHT> in the prompt.",
)
LORA_DIR = typer.Option(
    None, "--lora-dir",
    help="Folder of LoRAs (subfolders too) that <lora:name:weight> tags in the prompt name, by file name or "
    "metadata alias. Default: $OPENSD_LORA_DIR, else ./models/Lora (A1111's) when it exists.",
)
TURBO = typer.Option(
    False, "--turbo",
    help="SD-Turbo / SDXL-Turbo settings, each unless given: 1 step (img2img: ceil(1/strength)), --cfg-scale 1, "
    "Euler a, SGM Uniform schedule (the first step at t = 999).",
)


def register(app: typer.Typer) -> None:
    @app.command()
    @fail_cleanly
    def generate(
        ctx: typer.Context,
        prompt: str = typer.Argument(..., help="What to draw."),
        negative_prompt: str = NEG, steps: int = STEPS, sampler: str = SAMPLER, karras: bool | None = KARRAS,
        cfg_scale: float = CFG, width: int | None = WIDTH, height: int | None = HEIGHT,
        seed: int | None = SEED, batch_size: int = BATCH, clip_skip: int = CLIP_SKIP,
        tiled_vae: bool | None = TILED_VAE, decoder: str = DECODER, tiny_vae: Path | None = TINY_VAE,
        model: Path | None = MODEL, out: str | None = OUT, quiet: bool = QUIET,
        device: str | None = DEVICE, threads: int | None = THREADS, prediction: PredictionChoice = PREDICTION,
        embeddings_dir: Path | None = EMBEDDINGS_DIR, refiner: Path | None = REFINER, refiner_switch_at: float | None = SWITCH_AT, aesthetic_score: float = AESTHETIC,
        negative_aesthetic_score: float = NEG_AESTHETIC, original_size: str | None = ORIGINAL_SIZE, turbo: bool = TURBO,
        few_step: bool = FEW_STEP,
        lora: list[str] | None = LORA, lora_dir: Path | None = LORA_DIR, precision: PrecisionChoice = PRECISION,
        controlnet: list[str] | None = cn.CONTROLNET, control_image: list[Path] | None = cn.CONTROL_IMAGE,
        control_preprocessor: list[str] | None = cn.CONTROL_PREPROCESSOR, control_start: list[float] | None = cn.CONTROL_START,
        control_end: list[float] | None = cn.CONTROL_END, control_mode: list[str] | None = cn.CONTROL_MODE,
        control_resize: list[str] | None = cn.CONTROL_RESIZE,
        hires_scale: float | None = hires_cli.HIRES_SCALE, hires_upscaler: str = hires_cli.HIRES_UPSCALER,
        hires_steps: int = hires_cli.HIRES_STEPS, hires_denoise: float = hires_cli.HIRES_DENOISE,
        hires_width: int | None = hires_cli.HIRES_WIDTH, hires_height: int | None = hires_cli.HIRES_HEIGHT,
        upscaler_dir: Path | None = hires_cli.UPSCALER_DIR,
    ) -> None:
        """Text to image: write images (PNG, JPEG or WebP) carrying their generation parameters."""
        from opensd.devices import resolve_device

        args = {**_common(steps, sampler, karras, cfg_scale, width, height, seed, batch_size, clip_skip, negative_prompt, tiled_vae),
                "decoder": decoder}
        if few_step:
            lora = apply_few_step(ctx, args, model, lora, turbo)
        args = _sdxl(ctx, args, turbo, refiner, refiner_switch_at, aesthetic_score, negative_aesthetic_score, original_size)
        hires = hires_cli.hires_spec(hires_scale, hires_upscaler, hires_steps, hires_denoise, hires_width, hires_height,
                                     upscaler_dir, resolve_device(device), defaults={"upscaler": "Latent", "steps": 0, "denoise": 0.7})
        if hires is not None and refiner is not None:
            raise OpenSDError("--hires-* and --refiner do not go together yet; give one of them")
        run = {**_options(model, device, threads, out, quiet, lora, lora_dir, embeddings_dir, precision, few_step), "prediction": prediction.value,
               "tiny_vae": tiny_vae, "hires": hires,
               "control": cn.control_specs(controlnet, control_image, control_preprocessor, control_start, control_end, control_mode,
                                           control_resize, has_image=False)}
        _run("txt2img", {"prompt": prompt, **args}, run, refiner)

    @app.command()
    @fail_cleanly
    def img2img(
        ctx: typer.Context,
        image: Path = typer.Argument(..., help="The image to modify."),
        prompt: str = typer.Argument(..., help="What it should become."),
        strength: float = typer.Option(0.75, help="0 keeps the image, 1 replaces it."),
        negative_prompt: str = NEG, steps: int = STEPS, sampler: str = SAMPLER, karras: bool | None = KARRAS,
        cfg_scale: float = CFG, width: int | None = IMAGE_WIDTH, height: int | None = IMAGE_HEIGHT,
        seed: int | None = SEED, batch_size: int = BATCH, clip_skip: int = CLIP_SKIP,
        tiled_vae: bool | None = TILED_VAE, decoder: str = DECODER, tiny_vae: Path | None = TINY_VAE,
        model: Path | None = MODEL, out: str | None = OUT, quiet: bool = QUIET,
        device: str | None = DEVICE, threads: int | None = THREADS, embeddings_dir: Path | None = EMBEDDINGS_DIR,
        refiner: Path | None = REFINER, refiner_switch_at: float | None = SWITCH_AT, aesthetic_score: float = AESTHETIC,
        negative_aesthetic_score: float = NEG_AESTHETIC, original_size: str | None = ORIGINAL_SIZE, turbo: bool = TURBO,
        few_step: bool = FEW_STEP,
        lora: list[str] | None = LORA, lora_dir: Path | None = LORA_DIR, precision: PrecisionChoice = PRECISION,
        controlnet: list[str] | None = cn.CONTROLNET, control_image: list[Path] | None = cn.CONTROL_IMAGE,
        control_preprocessor: list[str] | None = cn.CONTROL_PREPROCESSOR, control_start: list[float] | None = cn.CONTROL_START,
        control_end: list[float] | None = cn.CONTROL_END, control_mode: list[str] | None = cn.CONTROL_MODE,
        control_resize: list[str] | None = cn.CONTROL_RESIZE,
    ) -> None:
        """Image to image: modify IMAGE toward PROMPT."""
        args = {**_common(steps, sampler, karras, cfg_scale, width, height, seed, batch_size, clip_skip, negative_prompt, tiled_vae),
                "decoder": decoder}
        if few_step:
            lora = apply_few_step(ctx, args, model, lora, turbo)
        args = _sdxl(ctx, args, turbo, refiner, refiner_switch_at, aesthetic_score, negative_aesthetic_score, original_size, strength)
        _run("img2img", {"image": image, "prompt": prompt, "strength": strength, **args},
             {**_options(model, device, threads, out, quiet, lora, lora_dir, embeddings_dir, precision, few_step), "tiny_vae": tiny_vae,
              "control": cn.control_specs(controlnet, control_image, control_preprocessor, control_start, control_end, control_mode, control_resize)}, refiner)

    @app.command()
    @fail_cleanly
    def inpaint(
        ctx: typer.Context,
        image: Path = typer.Argument(..., help="The image to repaint."),
        mask: Path = typer.Argument(..., help="Same size as IMAGE; white marks what to repaint."),
        prompt: str = typer.Argument(..., help="What to paint there."),
        strength: float = typer.Option(1.0, help="How much of the masked part to replace."),
        mask_blur: int = typer.Option(0, "--mask-blur", help="Blur the mask's edge by N pixels (A1111's mask blur), so the seam fades."),
        masked_content: str = typer.Option(
            "original", "--masked-content",
            help="What the masked part starts from: fill (the colours around it), original, latent-noise or latent-nothing (A1111's masked content).",
        ),
        only_masked: bool = typer.Option(
            CLI_ONLY_MASKED, "--only-masked/--whole-picture",
            help="Inpaint area (A1111's): only the mask's region plus --only-masked-padding, cut out and generated at "
            "the output size, so PROMPT describes just that region; or the whole picture. The CLI defaults to "
            "--only-masked (the A1111 API to the whole picture): on the default model the README's example draws the "
            "requested object in the mask 0.98 of the time with padding 2, 0.42 with --whole-picture (README, Inpainting).",
        ),
        only_masked_padding: int = typer.Option(
            CLI_ONLY_MASKED_PADDING, "--only-masked-padding",
            help="With --only-masked: pixels of the picture kept around the mask's bounding box as context.",
        ),
        negative_prompt: str = NEG, steps: int = STEPS, sampler: str = SAMPLER, karras: bool | None = KARRAS,
        cfg_scale: float = CFG, width: int | None = IMAGE_WIDTH, height: int | None = IMAGE_HEIGHT,
        seed: int | None = SEED, batch_size: int = BATCH, clip_skip: int = CLIP_SKIP,
        tiled_vae: bool | None = TILED_VAE, decoder: str = DECODER, tiny_vae: Path | None = TINY_VAE,
        model: Path | None = MODEL, out: str | None = OUT, quiet: bool = QUIET,
        device: str | None = DEVICE, threads: int | None = THREADS, embeddings_dir: Path | None = EMBEDDINGS_DIR,
        refiner: Path | None = REFINER, refiner_switch_at: float | None = SWITCH_AT, aesthetic_score: float = AESTHETIC,
        negative_aesthetic_score: float = NEG_AESTHETIC, original_size: str | None = ORIGINAL_SIZE, turbo: bool = TURBO,
        few_step: bool = FEW_STEP,
        lora: list[str] | None = LORA, lora_dir: Path | None = LORA_DIR, precision: PrecisionChoice = PRECISION,
        controlnet: list[str] | None = cn.CONTROLNET, control_image: list[Path] | None = cn.CONTROL_IMAGE,
        control_preprocessor: list[str] | None = cn.CONTROL_PREPROCESSOR, control_start: list[float] | None = cn.CONTROL_START,
        control_end: list[float] | None = cn.CONTROL_END, control_mode: list[str] | None = cn.CONTROL_MODE,
        control_resize: list[str] | None = cn.CONTROL_RESIZE,
    ) -> None:
        """Inpainting: repaint the masked part of IMAGE following PROMPT."""
        args = {**_common(steps, sampler, karras, cfg_scale, width, height, seed, batch_size, clip_skip, negative_prompt, tiled_vae),
                "decoder": decoder}
        if few_step:
            lora = apply_few_step(ctx, args, model, lora, turbo)
        args = _sdxl(ctx, args, turbo, refiner, refiner_switch_at, aesthetic_score, negative_aesthetic_score, original_size, strength)
        inpainting = _inpaint_options(mask_blur, masked_content, only_masked, only_masked_padding)
        _run("inpaint", {"image": image, "mask": mask, "prompt": prompt, "strength": strength, **inpainting, **args},
             {**_options(model, device, threads, out, quiet, lora, lora_dir, embeddings_dir, precision, few_step), "tiny_vae": tiny_vae,
              "control": cn.control_specs(controlnet, control_image, control_preprocessor, control_start, control_end, control_mode, control_resize)}, refiner)

    @app.command("png-info")
    @fail_cleanly
    def png_info(
        file: Path = typer.Argument(..., help="A PNG, JPEG or WebP written by opensd or A1111."),
        as_json: bool = typer.Option(False, "--json", help="Print the fields as JSON."),
    ) -> None:
        """Read the generation parameters stored in an image (its pixels are not decoded)."""
        from opensd.pipelines.infotext import parse_infotext, read_parameters

        text = read_parameters(file)
        if text is None:
            raise OpenSDError(f"{file} carries no generation parameters (no 'parameters' text chunk or EXIF UserComment)")
        fields = parse_infotext(text)
        if as_json:
            typer.echo(json.dumps(fields, indent=2, ensure_ascii=False))
        else:
            for k, v in fields.items():
                typer.echo(f"{k}: {v}")
