"""Where opensd finds a model when none is named."""

from __future__ import annotations

import os
from pathlib import Path

from opensd.errors import OpenSDError

# The default model ships in the repository's models/ folder.
REPO_MODELS = Path(__file__).resolve().parents[2] / "models"
DEFAULT_MODEL_NAME = "opensd-shapes"
ENV_VAR = "OPENSD_MODEL"


def default_model_path() -> Path | None:
    """``$OPENSD_MODEL`` if set, else the bundled model if present."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    candidate = REPO_MODELS / DEFAULT_MODEL_NAME
    return candidate if candidate.exists() else None


def resolve_model(path: str | Path | None) -> Path:
    """The model to load: ``path`` when given, else the default; a clear error if there is none."""
    if path is not None:
        return Path(path)
    found = default_model_path()
    if found is None:
        raise OpenSDError(
            f"no model given and no default model found (looked for ${ENV_VAR} and {REPO_MODELS / DEFAULT_MODEL_NAME}); "
            "pass --model PATH with a diffusers folder, an SD 1.x file or an opensd model folder"
        )
    return found
