"""The ControlNet options of ``opensd generate``, ``img2img`` and ``inpaint``.

``--controlnet PATH[:WEIGHT]`` adds a unit (repeatable, several ControlNets at once). The
per-unit options (``--control-image``, ``--control-preprocessor``, ``--control-start``,
``--control-end``, ``--control-mode``, ``--control-resize``) are given once for every
unit, or once per ``--controlnet`` in the same order. Everything is read and checked
before the model loads (:func:`control_specs`); the ControlNets load after it, for it
(:func:`control_units`). A unit without ``--control-image`` takes img2img's or
inpaint's IMAGE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from opensd.errors import OpenSDError

CONTROLNET = typer.Option(
    None, "--controlnet",
    help="A ControlNet: PATH (original .safetensors/.pth, or a diffusers ControlNetModel folder), optionally :WEIGHT "
    "(0..2, default 1), e.g. --controlnet canny.safetensors:0.8. Repeatable: all apply at once.",
)
CONTROL_IMAGE = typer.Option(
    None, "--control-image",
    help="Its control image (one for all --controlnet, or one each in order). Default for img2img/inpaint: IMAGE.",
)
CONTROL_PREPROCESSOR = typer.Option(
    None, "--control-preprocessor",
    help="What turns the control image into the map: none (a ready map; default), canny, scribble, lineart, invert, "
    "segmentation (also layout: flat colours, resized without blending).",
)
CONTROL_START = typer.Option(None, "--control-start", help="Guidance start: the fraction of the steps where the ControlNet begins (default 0).")
CONTROL_END = typer.Option(None, "--control-end", help="Guidance end: the fraction of the steps after which it stops (default 1).")
CONTROL_MODE = typer.Option(
    None, "--control-mode",
    help="balanced (default), prompt (My prompt is more important), control (ControlNet is more important), "
    "or guess (diffusers' guess mode).",
)
CONTROL_RESIZE = typer.Option(
    None, "--control-resize",
    help="A control image of another size: crop (Crop and Resize, default), resize (Just Resize) or fill (Resize and Fill).",
)


@dataclass(frozen=True)
class ControlSpec:
    """One ``--controlnet`` unit as read from the command line, checked, its image loaded."""

    path: Path
    weight: float
    settings: dict[str, Any]


def _path_and_weight(spec: str) -> tuple[Path, float]:
    """``PATH`` or ``PATH:WEIGHT`` (a path that exists as given wins over a trailing number)."""
    if Path(spec).expanduser().exists():
        return Path(spec).expanduser(), 1.0
    head, _, tail = spec.rpartition(":")
    if head and Path(head).expanduser().exists():
        try:
            return Path(head).expanduser(), float(tail)
        except ValueError:
            pass
    raise OpenSDError(f"--controlnet {spec}: no such file or folder; give PATH[:WEIGHT] (a ControlNet .safetensors/.pth "
                      "file or a diffusers ControlNetModel folder)")


def _per_unit(name: str, values: Sequence[Any] | None, n: int) -> list[Any]:
    """``values`` spread over ``n`` units: none (None each), one (for all) or one each."""
    values = list(values or [])
    if not values:
        return [None] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise OpenSDError(f"{name} is given {len(values)} times for {n} --controlnet; give it once (for all) or once each")
    return values


def control_specs(
    controlnet: list[str] | None, image: list[Path] | None, preprocessor: list[str] | None,
    start: list[float] | None, end: list[float] | None, mode: list[str] | None, resize: list[str] | None,
    *, has_image: bool = True,
) -> list[ControlSpec]:
    """The units of these options, every setting checked and every image read (no model needed);
    ``has_image``: the command has an IMAGE that units without ``--control-image`` take."""
    from opensd.pipelines.control import check_settings
    from opensd.pipelines.images import load_image

    nets = list(controlnet or [])
    if not nets:
        given = [n for n, v in (("--control-image", image), ("--control-preprocessor", preprocessor), ("--control-start", start),
                                ("--control-end", end), ("--control-mode", mode), ("--control-resize", resize)) if v]
        if given:
            raise OpenSDError(f"{', '.join(given)} needs --controlnet PATH (the ControlNet it is for)")
        return []
    n, parsed = len(nets), [_path_and_weight(net) for net in nets]
    if not has_image and len(image or []) == 0:
        raise OpenSDError("--controlnet needs --control-image IMG here (img2img and inpaint take their IMAGE when it is left out)")
    columns = zip(_per_unit("--control-image", image, n), _per_unit("--control-preprocessor", preprocessor, n),
                  _per_unit("--control-start", start, n), _per_unit("--control-end", end, n),
                  _per_unit("--control-mode", mode, n), _per_unit("--control-resize", resize, n), strict=False)
    specs = []
    for (path, weight), (img, pre, s, e, m, r) in zip(parsed, columns, strict=False):
        settings: dict[str, Any] = {"image": None if img is None else load_image(img, what="control image"), "preprocessor": pre or "none",
                    "start": 0.0 if s is None else s, "end": 1.0 if e is None else e, "mode": m or "balanced", "resize": r or "crop"}
        check_settings(settings["preprocessor"], weight, settings["start"], settings["end"], settings["mode"], settings["resize"])
        specs.append(ControlSpec(path, weight, settings))
    return specs


def control_units(pipe: Any, specs: Sequence[ControlSpec]) -> list[Any]:
    """The :class:`~opensd.pipelines.control.ControlUnit` of each spec, its ControlNet loaded for ``pipe``."""
    from opensd.pipelines.control import ControlUnit, controlnet_for

    return [ControlUnit(controlnet_for(pipe, s.path), weight=s.weight, **s.settings) for s in specs]
