"""Which model family a checkpoint is and its native size, as the server lists them.

A loaded model answers from its own configuration (``pipe.cfg.family``,
``pipe.cfg.image_size``). A model not loaded yet is *probed* without reading its
weights: an opensd folder's ``config.json`` and a diffusers folder's component configs
give its whole :class:`~opensd.models.stable_diffusion.SDConfig`; an original
``.safetensors`` file gives its tensor names (the header only), whose prefixes are the
family (``conditioner.embedders.1.`` SDXL, ``conditioner.embedders.0.model.`` without
``.1`` the SDXL refiner, ``cond_stage_model.model.`` SD 2.x, ``cond_stage_model.transformer.``
SD 1.x). A single file's native size follows from its family (512 SD 1.x, 1024 SDXL and
refiner) except SD 2.x, whose 768-v and 512-base files share their keys: unknown (None)
until loaded. A pickled ``.ckpt`` is not opened to probe it (None until loaded).

The latent space (:func:`latent_space`) is what a refiner must share with the model it
refines: latent channels, the VAE's downsampling and its scale and shift.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from opensd.errors import OpenSDError
from opensd.models.stable_diffusion import ModelFamily, SDConfig

# A single file's native size by family; SD 2.x's is 768 (v) or 512 (base): not known from the keys.
SINGLE_FILE_SIZES = {ModelFamily.SD1: 512, ModelFamily.SDXL: 1024, ModelFamily.SDXL_REFINER: 1024}


@dataclass(frozen=True)
class ModelKind:
    """A checkpoint's family (a :class:`ModelFamily` value) and native size in pixels; None where unknown."""

    family: str | None = None
    image_size: int | None = None

    @classmethod
    def of(cls, cfg: SDConfig) -> ModelKind:
        return cls(cfg.family.value, cfg.image_size)


def family_from_keys(keys: list[str]) -> ModelFamily | None:
    """The family an original checkpoint's tensor names say (module doc); None for none of them."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders.1."):
        return ModelFamily.SDXL
    if has("conditioner.embedders.0.model."):
        return ModelFamily.SDXL_REFINER
    if has("cond_stage_model.model."):
        return ModelFamily.SD2
    if has("cond_stage_model.transformer."):
        return ModelFamily.SD1
    return None


def probe(path: Path, fmt: str) -> ModelKind:
    """The kind of the checkpoint at ``path`` (format ``fmt``), read without its weights; unknown on any problem."""
    try:
        if fmt == "opensd":
            from opensd.checkpoints.opensd_format import read_config

            return ModelKind.of(read_config(path))
        if fmt == "diffusers":
            from opensd.checkpoints.diffusers_folder import read_diffusers_config

            return ModelKind.of(read_diffusers_config(path))
    except (OpenSDError, OSError, ValueError):  # not readable as it claims: listed, kind unknown
        return ModelKind()
    if path.suffix.lower() != ".safetensors":
        return ModelKind()
    try:
        with safe_open(str(path), "pt") as f:
            family = family_from_keys(list(f.keys()))
    except Exception:  # safetensors' own error (a bad header), or an unreadable file: kind unknown
        return ModelKind()
    return ModelKind(family.value, SINGLE_FILE_SIZES.get(family)) if family is not None else ModelKind()


def latent_space(cfg: SDConfig) -> tuple[int, int, float, float]:
    """(latent channels, VAE downsampling, scale, shift): two models refine each other's latents only when equal."""
    vae = cfg.vae
    return vae.embed_dim, vae.downsample_factor, vae.scale_factor, vae.shift_factor


def describe_latent_space(cfg: SDConfig) -> str:
    channels, factor, scale, shift = latent_space(cfg)
    shift_text = f", shift {shift:g}" if shift else ""
    return f"{channels} channels at 1/{factor} of the image size, scale {scale:g}{shift_text}"
