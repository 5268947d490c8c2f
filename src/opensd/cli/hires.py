"""``opensd generate --hires-*`` (A1111's hires fix) and ``opensd upscale``.

The hires fix is on when ``--hires-scale`` or ``--hires-width``/``--hires-height`` is
given; its settings and its upscaler (a name in ``--upscaler-dir``, a file's path, or a
built-in: the latent modes, Lanczos, Nearest) are checked before the model loads
(:func:`hires_spec`). ``opensd upscale`` runs one upscaler on an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from opensd.cli.common import DEVICE, fail_cleanly
from opensd.errors import OpenSDError

HIRES_SCALE = typer.Option(
    None, "--hires-scale",
    help="Hires fix (A1111's): draw at --width x --height, upscale by this factor (1..8), then redraw at the large size "
    "with img2img. Turns the hires fix on.",
)
HIRES_UPSCALER = typer.Option(
    "Latent", "--hires-upscaler",
    help="How the hires fix upscales: Latent, 'Latent (antialiased)', 'Latent (bicubic)', 'Latent (bicubic antialiased)', "
    "'Latent (nearest)', 'Latent (nearest-exact)', Lanczos, Nearest, or an upscaler model (a NAME in --upscaler-dir or a PATH).",
)
HIRES_STEPS = typer.Option(0, "--hires-steps", help="Steps the hires fix's second pass runs (0: --steps).")
HIRES_DENOISE = typer.Option(0.7, "--hires-denoise", help="The second pass's denoising strength, 0..1 (A1111's default 0.7).")
HIRES_WIDTH = typer.Option(None, "--hires-width", help="Hires fix to this width instead of a scale (A1111's 'Resize width to'; turns it on).")
HIRES_HEIGHT = typer.Option(None, "--hires-height", help="Hires fix to this height instead of a scale (A1111's 'Resize height to').")
UPSCALER_DIR = typer.Option(
    None, "--upscaler-dir",
    help="Folder of upscaler models (ESRGAN, Real-ESRGAN, SwinIR... .safetensors/.pth) named by file name. "
    "Default: $OPENSD_UPSCALER_DIR, else ./models/ESRGAN (A1111's) when it exists.",
)


@dataclass(frozen=True)
class HiresSpec:
    """The checked hires fix of a run and the upscalers it looks names up in."""

    hires: Any  # HiresFix
    library: Any  # UpscalerLibrary


def library_for(folder: Path | None, device: Any = "cpu") -> Any:
    """The :class:`~opensd.pipelines.upscalers.UpscalerLibrary` of ``--upscaler-dir`` (or the default folder), paths allowed."""
    from opensd.pipelines.upscalers import UpscalerLibrary, default_upscaler_dir

    if folder is not None and not folder.is_dir():
        raise OpenSDError(f"--upscaler-dir {folder} is not a folder")
    return UpscalerLibrary(folder if folder is not None else default_upscaler_dir(), device=device, allow_paths=True)


def hires_spec(
    scale: float | None, upscaler: str, steps: int, denoise: float, width: int | None, height: int | None,
    upscaler_dir: Path | None, device: Any, *, defaults: dict[str, Any],
) -> HiresSpec | None:
    """The run's hires fix (None when off), every setting checked and the upscaler resolved: before the model loads.
    ``defaults``: the options' defaults, to tell which ones were given without turning it on."""
    from opensd.pipelines.hires import HiresFix

    if scale is None and width is None and height is None:
        given = [f"--hires-{n}" for n, v in (("upscaler", upscaler), ("steps", steps), ("denoise", denoise)) if v != defaults[n]]
        if given:
            raise OpenSDError(f"{', '.join(given)} needs --hires-scale or --hires-width/--hires-height (which turn the hires fix on)")
        return None
    if scale is not None and (width is not None or height is not None):
        raise OpenSDError("give --hires-scale or --hires-width/--hires-height, not both (A1111: a size replaces the scale)")
    hires = HiresFix(scale=2.0 if scale is None else scale, upscaler=upscaler, steps=steps, denoising_strength=denoise,
                     resize_x=width or 0, resize_y=height or 0)
    library = library_for(upscaler_dir, device)
    library.resolve(upscaler, what="--hires-upscaler")  # an unknown name or a bad file: now, not after the first pass
    return HiresSpec(hires, library)


def run_hires(pipe: Any, args: dict[str, Any], spec: HiresSpec, callback: Any) -> list:
    """``pipe.txt2img(**args)`` with the hires fix: the images, each with its infotext."""
    from opensd.pipelines.control import with_control
    from opensd.pipelines.hires import hires_fix

    args = dict(args)
    prompt, negative = args.pop("prompt"), args.pop("negative_prompt", "")
    networks = with_control(args.pop("networks", None), args.pop("control", None))
    req = pipe.request(prompt, negative, **args)
    return hires_fix(pipe, req, spec.hires, networks=networks, upscalers=spec.library, callback=callback).images


def register(app: typer.Typer) -> None:
    @app.command()
    @fail_cleanly
    def upscale(
        image: Path = typer.Argument(..., help="The image to upscale (PNG, JPEG, WebP...)."),
        upscaler: str = typer.Option(
            "Lanczos", "--upscaler", help="Lanczos, Nearest, or an upscaler model: a NAME in --upscaler-dir or a PATH (.safetensors/.pth).",
        ),
        scale: float = typer.Option(2.0, "--scale", help="How much larger, more than 1 and at most 8 (A1111's 'Resize' of Extras)."),
        out: str = typer.Option(..., "--out", "-o", help="Output file: .png, .jpg/.jpeg or .webp (the input's generation parameters are kept)."),
        upscaler_dir: Path | None = UPSCALER_DIR,
        tile: int = typer.Option(192, "--tile", help="Pixels of input an upscaler model sees at once (memory is bounded by it)."),
        device: str | None = DEVICE,
    ) -> None:
        """Upscale IMAGE with a resampling filter or an upscaler model (ESRGAN, Real-ESRGAN, SwinIR...)."""
        from opensd.devices import resolve_device
        from opensd.pipelines.images import load_image
        from opensd.pipelines.infotext import image_format, read_parameters, save_image

        if not (isinstance(scale, (int, float)) and 1.0 < scale <= 8.0):
            raise OpenSDError(f"--scale must be more than 1 and at most 8, got {scale}")
        if tile < 16:
            raise OpenSDError(f"--tile must be at least 16 pixels, got {tile}")
        image_format(out, what="--out")
        source = load_image(image)
        up = library_for(upscaler_dir, resolve_device(device)).resolve(upscaler, latent=False, what="--upscaler")
        width, height = round(source.width * scale), round(source.height * scale)
        result = up.upscale_image(source, width, height, tile=tile)
        save_image(result, out, read_parameters(source))
        typer.echo(str(out))
