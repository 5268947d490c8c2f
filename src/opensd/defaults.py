"""Where opensd finds a model when none is named.

The default model, ``opensd-shapes``, lives in the repository's ``models/`` folder.
A wheel (``pip install .``, not editable) carries a copy inside the package, in
``opensd/default_models/`` (the build copies it there: see ``setup.py``). The search
order is ``$OPENSD_MODEL``, then the package's copy (an installed opensd), then the
repository's ``models/`` (a source checkout or an editable install).
"""

from __future__ import annotations

import os
from pathlib import Path

from opensd.errors import OpenSDError

DEFAULT_MODEL_NAME = "opensd-shapes"
ENV_VAR = "OPENSD_MODEL"
# Inside the installed package (a wheel's copy of the default model).
PACKAGE_MODELS = Path(__file__).resolve().parent / "default_models"
# The repository's models/ folder (a source checkout or an editable install).
REPO_MODELS = Path(__file__).resolve().parents[2] / "models"


def model_candidates() -> list[Path]:
    """The folders that may hold the default model, in the order they are tried."""
    return [PACKAGE_MODELS / DEFAULT_MODEL_NAME, REPO_MODELS / DEFAULT_MODEL_NAME]


def _is_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def default_model_path() -> Path | None:
    """``$OPENSD_MODEL`` if set, else the first of :func:`model_candidates` that holds a model."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return next((c for c in model_candidates() if _is_model(c)), None)


def resolve_model(path: str | Path | None) -> Path:
    """The model to load: ``path`` when given, else the default; a clear error if there is none."""
    if path is not None:
        return Path(path)
    found = default_model_path()
    if found is None:
        looked = " and ".join(str(c) for c in model_candidates())
        raise OpenSDError(
            f"no model given and no default model found (looked for ${ENV_VAR}, {looked}); "
            f"pass --model PATH (a diffusers folder, an SD 1.x file or an opensd model folder), "
            f"or set {ENV_VAR}=PATH, e.g. to the models/{DEFAULT_MODEL_NAME} folder of an opensd checkout"
        )
    return found
