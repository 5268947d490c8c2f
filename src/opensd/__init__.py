"""opensd: Stable Diffusion, complete, in Python.

>>> import opensd
>>> pipe = opensd.load("path/to/model")   # diffusers folder, SD 1.x file or opensd folder
>>> images = pipe.txt2img("a red circle above a blue square", seed=1)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

__version__ = "0.1.0"


def load(path: str | Path, **kwargs: Any) -> StableDiffusionPipeline:
    """A generation pipeline for the model at ``path`` (any format :func:`opensd.checkpoints.load_model` reads)."""
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline  # here: `import opensd` (the CLI's start-up) loads no torch

    return StableDiffusionPipeline.from_path(path, **kwargs)


__all__ = ["load", "__version__"]
