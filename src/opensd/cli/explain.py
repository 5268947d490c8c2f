"""``opensd explain`` (word attention maps, denoising path, forward noising) and ``opensd interpolate``."""

from __future__ import annotations

from pathlib import Path

import typer

from opensd.cli.common import DEVICE, PRECISION, THREADS, PrecisionChoice, fail_cleanly, load_pipeline, use_threads
from opensd.errors import OpenSDError


def _pipeline(model: Path | None, device, threads: int | None, precision: PrecisionChoice = PrecisionChoice.AUTO):
    """The pipeline for ``model`` on ``device`` (resolved) in ``precision``, torch's threads set for it."""
    from opensd.defaults import resolve_model

    pipe = load_pipeline(resolve_model(model), device, precision)
    use_threads(threads, pipe.model)
    return pipe


def _steps_list(text: str | None) -> list[int] | None:
    if text is None or not text.strip():
        return None
    try:
        return [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise OpenSDError(f"--at must list step numbers separated by commas, e.g. 1,5,10; got {text!r}") from None


def _out_dir(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise OpenSDError(f"--out {out} is a file; give a folder")
    return out


MODEL = typer.Option(None, "--model", "-m", help="Model path (diffusers folder, SD file or opensd folder); default: the bundled model.")
NEG = typer.Option("", "--negative-prompt", "-n", help="What to steer away from.")
SAMPLER = typer.Option("dpmpp_2m", help="Sampler id or A1111 name.")
CFG = typer.Option(7.5, "--cfg-scale", help="Classifier-free guidance scale (1 = off).")
WIDTH = typer.Option(None, help="Width in pixels, a multiple of 8 (default: the model's native size).")
HEIGHT = typer.Option(None, help="Height in pixels, a multiple of 8 (default: the model's native size).")
CLIP_SKIP = typer.Option(1, "--clip-skip", help="Use the output of the n-th last text layer (A1111's Clip skip).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")


def register(app: typer.Typer) -> None:
    @app.command("explain")
    @fail_cleanly
    def explain_command(
        prompt: str = typer.Argument(..., help="What to draw (A1111 syntax allowed)."),
        seed: int = typer.Option(0, help="Seed."),
        steps: int = typer.Option(20, help="Sampling steps."),
        at: str | None = typer.Option(None, help="Steps to show in the denoising path, e.g. 1,5,10,20 (default: all)."),
        noise_image: Path | None = typer.Option(None, "--noise-image", help="Image to noise step by step (default: the generated one)."),
        noise_steps: int = typer.Option(10, "--noise-steps", help="Noise levels of the forward-noising strip."),
        negative_prompt: str = NEG, sampler: str = SAMPLER, cfg_scale: float = CFG,
        width: int | None = WIDTH, height: int | None = HEIGHT, clip_skip: int = CLIP_SKIP,
        model: Path | None = MODEL,
        out: Path = typer.Option(Path("explain"), "--out", "-o", help="Folder for the pictures and raw maps."),
        segmenter: str = typer.Option("auto", "--segmenter", help="A segmenter file (opensd train segment) whose "
                                      "maps are shown beside the shape words' attention; auto: the model folder's "
                                      "segmenter.safetensors if it has one; none: no segmenter."),
        quiet: bool = QUIET,
        device: str | None = DEVICE, threads: int | None = THREADS, precision: PrecisionChoice = PRECISION,
    ) -> None:
        """Generate one image and show how: word attention maps, denoising path, forward noising,
        and a segmenter's shape maps beside the shape words' attention."""
        from opensd.defaults import resolve_model
        from opensd.devices import resolve_device
        from opensd.explain import StepProgress, explain, find_segmenter, load_for_explain, save_explanation
        from opensd.pipelines.images import load_image

        out = _out_dir(out)
        steps_at = _steps_list(at)
        image = load_image(noise_image) if noise_image is not None else None
        seg_path = find_segmenter(segmenter, resolve_model(model))
        seg = load_for_explain(seg_path) if seg_path is not None else None  # before the (slow) model load
        pipe = _pipeline(model, resolve_device(device), threads, precision)
        with StepProgress(desc="explain", enabled=not quiet) as progress:
            ex = explain(
                pipe, prompt, negative_prompt=negative_prompt, seed=seed, steps=steps, sampler=sampler,
                cfg_scale=cfg_scale, width=width, height=height, clip_skip=clip_skip, at=steps_at,
                noise_image=image, noise_steps=noise_steps, progress=progress, segmenter=seg,
            )
        for name, path in save_explanation(ex, out).items():
            typer.echo(f"{name}: {path}")
        if ex.segmentation is not None:
            for a in ex.segmentation.agreements:
                typer.echo(f"{a.word}: {a.inside:.3f} of its attention inside the segmenter's {a.shape} "
                           f"(area {a.area:.3f}, IoU {a.iou:.3f})")

    @app.command("interpolate")
    @fail_cleanly
    def interpolate_command(
        prompt: str = typer.Argument(..., help='Start prompt, or an expression such as \'"a red circle" - "red" + "blue"\'.'),
        to: str | None = typer.Option(None, "--to", help="End prompt (or expression); embeddings are lerped."),
        seed: int = typer.Option(0, help="Start seed."),
        to_seed: int | None = typer.Option(
            None, "--to-seed", help="End seed; initial noises are slerped. Without --to and --to-seed: SEED + 1 (a seed walk)."),
        frames: int = typer.Option(8, help="Images from start to end, 1 to 100 (1: just the start)."),
        cols: int | None = typer.Option(None, help="Grid columns (default: all frames in one row)."),
        steps: int = typer.Option(20, help="Sampling steps."),
        negative_prompt: str = NEG, sampler: str = SAMPLER, cfg_scale: float = CFG,
        width: int | None = WIDTH, height: int | None = HEIGHT, clip_skip: int = CLIP_SKIP,
        model: Path | None = MODEL,
        out: Path = typer.Option(Path("interpolate"), "--out", "-o", help="Folder for grid.png, animation.gif and the frames."),
        quiet: bool = QUIET,
        device: str | None = DEVICE, threads: int | None = THREADS, precision: PrecisionChoice = PRECISION,
    ) -> None:
        """Walk between two prompts and/or two seeds: a grid PNG and an animated GIF.

        With neither --to nor --to-seed it walks from SEED to SEED + 1 on the same prompt."""
        from opensd.devices import resolve_device
        from opensd.explain import StepProgress
        from opensd.explain.render import grid, save_gif
        from opensd.pipelines.infotext import save_png
        from opensd.prompts.arithmetic import check_frames, check_seed, interpolate, parse_expression, walk_end_seed

        # fail on bad input before the (slow) model load
        out = _out_dir(out)
        for p in (prompt, to):
            if p is not None:
                parse_expression(p)
        check_frames(frames)
        check_seed(seed, "--seed")
        if to_seed is not None:
            check_seed(to_seed, "--to-seed")
        if cols is not None and cols < 1:
            raise OpenSDError(f"--cols must be an integer >= 1, got {cols}")
        if to is None and to_seed is None and frames > 1:
            to_seed = walk_end_seed(seed)
            typer.echo(f"no --to or --to-seed: a seed walk on the same prompt, from seed {seed} to {to_seed}", err=True)
        pipe = _pipeline(model, resolve_device(device), threads, precision)
        with StepProgress(frames, desc="interpolate", enabled=not quiet) as progress:
            images = interpolate(
                pipe, prompt, to, seed=seed, to_seed=to_seed, frames=frames, negative_prompt=negative_prompt,
                steps=steps, sampler=sampler, cfg_scale=cfg_scale, width=width, height=height, clip_skip=clip_skip,
                callback=progress,
            )
        out.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            save_png(im, out / f"frame-{i:03d}.png", im.info.get("parameters"))
        grid(images, cols).save(out / "grid.png")
        save_gif(images, out / "animation.gif")
        typer.echo(f"grid: {out / 'grid.png'}")
        typer.echo(f"gif: {out / 'animation.gif'}")
