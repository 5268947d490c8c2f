"""``opensd eval``: generate for a fixed prompt suite and score exactly.

``--suite concept:NAME`` scores a concept's own prompts (:mod:`opensd.shapes.concept`);
``--lora PATH[:W]`` or ``PATH:TE:UNET`` (repeatable, as ``opensd generate`` reads it) scores
the model with LoRA files applied, as the pipeline's ``networks``, to every image;
``--few-step`` with the model folder's LCM-LoRA at its settings (:mod:`opensd.cli.few_step`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from opensd.cli.common import DEVICE, PRECISION, THREADS, PrecisionChoice, fail_cleanly, load_pipeline, use_threads
from opensd.cli.few_step import FEW_STEP, apply_few_step
from opensd.errors import OpenSDError


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @fail_cleanly
    def eval_command(
        ctx: typer.Context,
        model: Path | None = typer.Option(None, "--model", "-m", help="Model to evaluate; default: the bundled model."),
        suite: str = typer.Option("benchmark", help="benchmark, validation (for checkpoint selection), holdout or concept:NAME (e.g. concept:purple-triangle)."),
        world: str = typer.Option("rich", "--world", help="The suite's world: rich (the classic prompts, unchanged and first, then three objects, count pairs, sentence forms and, held out, synonyms) or classic (GenEval's six categories only, as the default model's card reports them)."),
        lora: list[str] | None = typer.Option(None, "--lora", help="PATH[:W] or PATH:TE:UNET: a LoRA file at these multipliers (default 1); repeatable."),
        few_step: bool = FEW_STEP,
        steps: int = typer.Option(20, help="Sampling steps."),
        sampler: str = typer.Option("dpmpp_2m", help="Sampler id or A1111 name."),
        cfg_scale: float = typer.Option(7.5, "--cfg-scale", help="Classifier-free guidance scale."),
        images_per_prompt: int = typer.Option(4, help="Images per prompt (seeds seed+1000*i+j)."),
        per_category: int | None = typer.Option(None, help="Only the first N prompts of each category."),
        seed: int = typer.Option(0, help="Base seed."),
        batch_size: int = typer.Option(16, "--batch-size", "-b", help="Images per network call (prompts share calls; the images do not change)."),
        distribution: bool = typer.Option(False, "--distribution", help="Also Fréchet distance, precision/recall and memorization (in-house features)."),
        autoencoder: bool = typer.Option(False, "--autoencoder", help="Instead of generating, score the suite's true scenes after the model's VAE round trip: the most generation can reach through this decoder."),
        decoder: str = typer.Option("full", "--decoder", help="The final decode: full (the VAE) or tiny (the model's tiny autoencoder, TAESD); with --autoencoder, the decoder of the round trip."),
        out: Path = typer.Option(Path("eval"), "--out", "-o", help="Folder for results.json, report.md and plots."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
        device: str | None = DEVICE, threads: int | None = THREADS, precision: PrecisionChoice = PRECISION,
    ) -> None:
        """Score a model GenEval-style on the shapes world; writes results.json and report.md."""
        from opensd.cli.generate import cli_budget, lora_use
        from opensd.defaults import resolve_model
        from opensd.devices import resolve_device
        from opensd.pipelines.lora_library import LoraLibrary
        from opensd.shapes.concept import parse_suite_name
        from opensd.shapes.run import EvalConfig, Suite, evaluate, write_results
        from opensd.shapes.world import World

        kind, concept = parse_suite_name(suite)
        if world not in tuple(World):
            raise OpenSDError(f"unknown --world {world!r}; choose one of {', '.join(World)}")
        try:
            suite_enum = Suite(kind)
        except ValueError:
            raise OpenSDError(f"unknown suite {suite!r}; choose one of benchmark, validation, holdout, concept:NAME") from None
        if few_step:  # the model's LCM-LoRA, and its steps, sampler and CFG where not given
            knobs: dict[str, Any] = {"steps": steps, "sampler": sampler, "cfg_scale": cfg_scale}
            lora = apply_few_step(ctx, knobs, model, lora)
            steps, sampler, cfg_scale = knobs["steps"], knobs["sampler"], knobs["cfg_scale"]
        library = LoraLibrary(None)
        uses = [lora_use(spec, library) for spec in lora or []]  # every file read before the model loads
        cfg = EvalConfig(suite=suite_enum, concept=concept, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                         images_per_prompt=images_per_prompt, per_category=per_category, seed=seed,
                         batch_size=batch_size, decoder=decoder, world=World(world))
        if out.exists() and not out.is_dir():
            raise OpenSDError(f"--out {out} is a file; give a folder")
        pipe = load_pipeline(resolve_model(model), resolve_device(device), precision)
        use_threads(threads, pipe.model)
        if autoencoder:
            if uses or distribution:
                raise OpenSDError("--autoencoder scores the VAE alone: it takes no --lora and no --distribution")
            _write_ceiling(pipe, cfg, seed, out)
            return
        info = {"name": pipe.loaded.name, "path": str(pipe.loaded.path), "hash": pipe.loaded.hash,
                "precision": pipe.precision.name, "precision_reason": pipe.precision.reason}
        networks = library.networks_for(pipe.model, "", uses, cli_budget()) if uses else None
        if uses:
            info["loras"] = ", ".join(lora or [])  # uses come from lora
        bar = None
        if not quiet:
            from tqdm import tqdm

            bar = tqdm(desc="eval", unit="img")

        def progress(done: int, total: int) -> None:
            if bar is not None:
                bar.total = total
                bar.update(done - bar.n)

        try:
            results, kept = evaluate(pipe, cfg, model_info=info, on_image=progress, distribution=distribution,
                                     networks=networks)
        finally:
            if bar is not None:
                bar.close()
        paths = write_results(results, kept, out)
        _echo_results(results)
        typer.echo(f"wrote {paths['results']} and {paths['report']}")


def _echo_results(results: dict) -> None:
    """Per category accuracy, the overall (and GenEval's six of a rich suite), distribution metrics."""
    for c, v in results["accuracy"].items():
        typer.echo(f"{c:>14}: {v:.3f}")
    typer.echo(f"{'overall':>14}: {results['overall']:.3f}")
    if results["overall_geneval"] is not None and results["overall_geneval"] != results["overall"]:
        typer.echo(f"{'GenEval six':>14}: {results['overall_geneval']:.3f}  (the classic suite's overall)")
    for net, d in results.get("distribution", {}).get("nets", {}).items():
        typer.echo(f"{'FD/' + net:>14}: {d['generated']['fd']:.2f} (real-vs-real {d['real_baseline']['fd']:.2f})")


def _write_ceiling(pipe, cfg, seed: int, out: Path) -> None:
    """``opensd eval --autoencoder``: the suite's true scenes through the VAE, scored (:mod:`opensd.shapes.ceiling`)."""
    import json

    from opensd.shapes.ceiling import autoencoder_ceiling

    results = autoencoder_ceiling(pipe, cfg, seed=seed)
    results["model"] = {"name": pipe.loaded.name, "path": str(pipe.loaded.path), "hash": pipe.loaded.hash}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    for c, v in results["accuracy"].items():
        typer.echo(f"{c:>14}: {v:.3f}")
    typer.echo(f"{'overall':>14}: {results['overall']:.3f}  (true scenes through the autoencoder: the ceiling)")
    typer.echo(f"wrote {path}")
