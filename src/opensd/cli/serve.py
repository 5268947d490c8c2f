"""``opensd serve``: the HTTP API (A1111 ``/sdapi/v1``, OpenAI ``/v1/images/generations``) and web page."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from opensd.cli.common import DEVICE, PRECISION, THREADS, PrecisionChoice, fail_cleanly, precision_warnings, use_threads
from opensd.errors import OpenSDError

if TYPE_CHECKING:  # the server loads only when `opensd serve` runs
    from opensd.serving.state import ServerState

# --dtype, the older name of --precision: its values and theirs
DTYPES = {"float32": PrecisionChoice.FP32, "float16": PrecisionChoice.FP16, "bfloat16": PrecisionChoice.BF16}

# The model folders' options (their defaults are resolved when the server starts)
LORA_DIR = typer.Option(
    None, "--lora-dir", help="Folder of LoRAs that <lora:name:weight> tags in prompts name (subfolders too); "
    "default: $OPENSD_LORA_DIR, else ./models/Lora (A1111's) when it exists.",
)
UPSCALER_DIR = typer.Option(
    None, "--upscaler-dir", help="Folder of upscaler models (ESRGAN, Real-ESRGAN, SwinIR...) for the hires fix and "
    "/sdapi/v1/extra-single-image, named by file name. Default: $OPENSD_UPSCALER_DIR, else ./models/ESRGAN when it exists.",
)
CONTROLNET_DIR = typer.Option(
    None, "--controlnet-dir", help="Folder of ControlNets (original files, diffusers folders) that "
    "alwayson_scripts.controlnet units name (GET /controlnet/model_list). Default: $OPENSD_CONTROLNET_DIR, if set.",
)


def serve_precision(precision: PrecisionChoice, dtype: str | None) -> PrecisionChoice:
    """--precision, or --dtype (float32, float16, bfloat16) where only that is given."""
    if dtype is None:
        return precision
    if dtype not in DTYPES:
        raise OpenSDError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r} (or use --precision auto|fp32|bf16|fp16)")
    if precision is not PrecisionChoice.AUTO and precision is not DTYPES[dtype]:
        raise OpenSDError(f"--dtype {dtype} and --precision {precision.value} disagree; give one of them")
    return DTYPES[dtype]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_folders(*flags: tuple[str, Path | None]) -> None:
    """Each given folder option names a folder, or fails before the model loads."""
    for flag, folder in flags:
        if folder is not None and not folder.is_dir():
            raise OpenSDError(f"{flag} {folder} is not a folder")


def _announce(state: ServerState, host: str, port: int, *, secured: bool) -> None:
    """What the server prints as it starts: where it listens, the model, its precision, the LoRAs."""
    if not _is_loopback(host) and not secured:
        typer.echo(f"warning: listening on {host} without --api-auth: anyone who can reach it can use it", err=True)
    typer.echo(f"opensd: serving {state.registry.current_title()} on http://{host}:{port} (web page at /, API docs at /docs)")
    typer.echo(f"opensd: precision {state.registry.current.precision.reason}")
    loras = state.loras
    if loras.folder is not None:
        typer.echo(f"opensd: {len(loras.entries())} LoRAs in {loras.folder} (<lora:name:weight> in prompts)")


def register(app: typer.Typer) -> None:
    @app.command()
    @fail_cleanly
    def serve(
        model: Path | None = typer.Option(
            None, "--model", "-m", help="Model to serve first (diffusers folder, SD file or opensd folder); default: the bundled model, or the first one in --models-dir."
        ),
        models_dir: Path | None = typer.Option(None, "--models-dir", help="Folder of models that clients may switch to (option sd_model_checkpoint)."),
        embeddings_dir: Path | None = typer.Option(
            None, "--embeddings-dir", envvar="OPENSD_EMBEDDINGS_DIR",
            help="Folder of textual-inversion embeddings (.pt, .bin, .safetensors) that prompts use by file name (GET /sdapi/v1/embeddings).",
        ),
        host: str = typer.Option("127.0.0.1", help="Address to listen on. The default accepts connections from this machine only."),
        port: int = typer.Option(7860, help="Port, 1 to 65535 (7860 is A1111's default)."),
        api_auth: str | None = typer.Option(
            None, "--api-auth", envvar="OPENSD_API_AUTH", help="'user:password' (several: 'u1:p1,u2:p2') to require HTTP Basic auth on every route."
        ),
        workers: int = typer.Option(1, help="Generations that run at the same time."),
        max_queue: int = typer.Option(32, help="Requests that may wait or run at once; more get 429."),
        max_size: int = typer.Option(2048, help="Largest width or height a request may ask for."),
        max_steps: int = typer.Option(150, help="Most sampling steps a request may ask for."),
        max_batch_size: int = typer.Option(8, help="Largest batch_size (and OpenAI n)."),
        max_n_iter: int = typer.Option(16, help="Most batches (n_iter) per request."),
        max_body_mb: float = typer.Option(32.0, help="Largest request body, in MiB."),
        max_prompt_bytes: int = typer.Option(32 * 1024, help="Largest prompt (and negative prompt), in UTF-8 bytes."),
        max_prompt_tokens: int = typer.Option(1500, help="Most tokens in a prompt (and negative prompt), syntax removed: 20 CLIP chunks of 75."),
        max_work: int = typer.Option(
            2000, help="Most work per request, in native image-steps: (width*height / the model's native size squared) x steps x images."
        ),
        max_seconds: int = typer.Option(600, help="Longest a request may run (wall time, once started); then it is stopped with a 422."),
        lora_dir: Path | None = LORA_DIR,
        upscaler_dir: Path | None = UPSCALER_DIR,
        controlnet_dir: Path | None = CONTROLNET_DIR,
        max_loras: int = typer.Option(16, help="Most <lora:...> tags in one request."),
        max_lora_mb: int = typer.Option(4096, help="Largest total size of the LoRA files one request names, in MiB."),
        device: str | None = DEVICE,
        threads: int | None = THREADS,
        precision: PrecisionChoice = PRECISION,
        dtype: str | None = typer.Option(None, help="float32, float16 or bfloat16: the older name of --precision."),
        log_level: str = typer.Option("info", help="uvicorn's log level."),
    ) -> None:
        """Serve the HTTP API A1111 clients speak, OpenAI's Images API and a web page at /."""
        import uvicorn

        from opensd.defaults import default_model_path
        from opensd.devices import resolve_device
        from opensd.pipelines.controlnet_library import ENV_VAR as CN_ENV
        from opensd.pipelines.lora_library import default_lora_dir
        from opensd.pipelines.upscalers import default_upscaler_dir
        from opensd.serving import Limits, create_app
        from opensd.serving.security import parse_auth

        if not 1 <= port <= 65535:
            raise OpenSDError(f"--port must be from 1 to 65535, got {port}")
        dev = resolve_device(device)  # a missing device fails before the model loads
        precision = serve_precision(precision, dtype)
        _check_folders(("--models-dir", models_dir), ("--embeddings-dir", embeddings_dir))
        parse_auth(api_auth)  # a bad --api-auth fails before the model loads
        controlnet_dir = controlnet_dir or (Path(os.environ[CN_ENV]) if os.environ.get(CN_ENV, "").strip() else None)
        _check_folders(("--lora-dir", lora_dir), ("--upscaler-dir", upscaler_dir), ("--controlnet-dir", controlnet_dir))
        if model is None and models_dir is None:
            model = default_model_path()
            if model is None:
                raise OpenSDError("no model given and no default model found; pass --model PATH or --models-dir DIR")
        limits = Limits(
            max_width=max_size, max_height=max_size, max_steps=max_steps, max_batch_size=max_batch_size,
            max_n_iter=max_n_iter, max_body_bytes=int(max_body_mb * 2**20), max_prompt_bytes=max_prompt_bytes,
            max_prompt_tokens=max_prompt_tokens, max_work=max_work, max_seconds=max_seconds, workers=workers, max_queue=max_queue,
            max_loras=max_loras, max_lora_bytes=max_lora_mb * 2**20,
        )
        with precision_warnings():
            app_ = create_app(
                model, models_dir=models_dir, auth=api_auth, limits=limits, device=dev, precision=precision.value,
                lora_dir=lora_dir if lora_dir is not None else default_lora_dir(), embeddings_dir=embeddings_dir,
                upscaler_dir=upscaler_dir if upscaler_dir is not None else default_upscaler_dir(), controlnet_dir=controlnet_dir,
            )
        use_threads(threads, app_.state.opensd.registry.current.model)
        _announce(app_.state.opensd, host, port, secured=bool(api_auth))
        uvicorn.run(app_, host=host, port=port, log_level=log_level)
