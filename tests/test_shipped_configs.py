"""Every training config shipped in configs/shapes/ loads with its stage's typed config (unknown keys refused)."""

from __future__ import annotations

from pathlib import Path

import pytest

from opensd.training.clip import CLIPStageConfig
from opensd.training.config import ShapesWorld, load_stage_config
from opensd.training.controlnet import ControlNetStageConfig
from opensd.training.lcm import LCMStageConfig
from opensd.training.segment import SegmentStageConfig
from opensd.training.taesd import TAESDStageConfig
from opensd.training.unet import UNetStageConfig
from opensd.training.vae import VAEStageConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "shapes"
STAGES = {"vae": VAEStageConfig, "clip": CLIPStageConfig, "unet": UNetStageConfig, "lcm": LCMStageConfig,
          "segment": SegmentStageConfig, "taesd": TAESDStageConfig, "controlnet": ControlNetStageConfig}


def _stage(path: Path) -> type:
    return STAGES[path.stem.split("_")[0]]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_each_shipped_config_loads(path: Path) -> None:
    cfg = load_stage_config(_stage(path), path)
    assert cfg.train.out_dir, path


def test_every_config_has_a_stage() -> None:
    names = {p.stem.split("_")[0] for p in CONFIGS.glob("*.toml")}
    assert names <= set(STAGES) and {"vae", "clip", "unet"} <= names


def test_the_rich_fine_tune_starts_from_the_default_model_on_the_rich_world() -> None:
    cfg = load_stage_config(UNetStageConfig, CONFIGS / "unet_rich.toml")
    assert cfg.data.world is ShapesWorld.RICH and cfg.init_from == "models/opensd-shapes"
    assert cfg.grounding_weight > 0 and cfg.grounding_pixel_weight > 0
