"""Run presets: named sets of config values for a whole training run (``opensd train STAGE --preset NAME``).

A run preset is a partial stage config (the same tables and keys as a TOML file)
applied on top of the stage's defaults and below everything the user gives:
defaults < ``--preset`` < ``--config`` file < ``--set`` < explicit options. (It is
not ``model_preset``, which names only the network's size; a run preset may set it.)

``quick``: a first run of the whole stack in minutes on a CPU. Tiny networks (the
VAE downsamples by 2, so a 32 px image is a 16x16x4 latent), 400 / 400 / 600 steps,
a 2,000-scene latent cache, small evaluations, no periodic checkpoints. It produces
a model that ``opensd generate`` loads and that draws rough blobs; the default
model's recipe (``configs/shapes/``) is what draws clean shapes.
:data:`QUICK_SECONDS` are its measured wall times (docs/training.md says how).
"""

from __future__ import annotations

import copy
from typing import Any

from opensd.config import ConfigError

STAGES = ("vae", "clip", "unet", "taesd")

_QUICK_TRAIN = {"warmup_steps": 50, "lr": 1e-3, "log_every": 20, "sample_every": 0, "checkpoint_every": 0}

RUN_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "vae": {
            "model_preset": "tiny", "eval_per_category": 2, "grid_images": 8, "scale_images": 64,
            "train": {**_QUICK_TRAIN, "steps": 400, "batch_size": 16},
        },
        "clip": {
            "model_preset": "tiny", "eval_per_category": 2, "tokenizer_corpus": 2000, "hard_negatives": 2,
            "train": {**_QUICK_TRAIN, "steps": 400, "batch_size": 64},
        },
        "unet": {
            "model_preset": "tiny", "eval_per_category": 1, "sample_steps": 10, "cache_size": 2000,
            "cache_batch": 128, "min_snr_gamma": 5.0,
            "train": {**_QUICK_TRAIN, "steps": 600, "batch_size": 32, "warmup_steps": 60, "ema_decay": 0.99},
        },
        "taesd": {
            "eval_per_category": 2, "grid_images": 8, "data": {"pool_size": 2000},
            "train": {**_QUICK_TRAIN, "steps": 400, "batch_size": 16, "ema_decay": 0.99},
        },
    },
}

# Wall seconds of each quick stage (setup, steps, evaluation and export), measured with
# scripts/time_quick_preset.sh (OMP_NUM_THREADS=1) on the project's 2-core AMD EPYC on 2026-12-02
# while seven other jobs shared it (load average 10-15): an upper bound; an idle machine is
# several times faster (docs/training.md, "A quick first run"). The time estimate quotes them.
QUICK_SECONDS = {"vae": 345, "clip": 320, "unet": 803}


def run_preset(stage: str, name: str | None) -> dict[str, Any]:
    """The config table preset ``name`` sets for ``stage`` (``{}`` for ``None``); unknown names are an error."""
    if name is None:
        return {}
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if name not in RUN_PRESETS:
        raise ConfigError(f"unknown --preset {name!r}; choose one of {', '.join(RUN_PRESETS)}")
    return copy.deepcopy(RUN_PRESETS[name][stage])


__all__ = ["QUICK_SECONDS", "RUN_PRESETS", "STAGES", "run_preset"]
