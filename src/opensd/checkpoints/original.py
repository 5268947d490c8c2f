"""Original single-file checkpoints (``.safetensors`` or ``.ckpt``) of every family.

The file's keys equal :class:`~opensd.models.stable_diffusion.StableDiffusion`'s
attribute paths, so loading is a strict ``load_state_dict``. Only the entries that are
not network weights are set aside first (:func:`network_state`): the training
schedule's buffers, EMA bookkeeping, the text encoders' ``position_ids`` buffers, SGM's
``denoiser.*`` sigmas and ComfyUI's marker tensors (``v_pred``, ``ztsnr``).

:func:`infer_config` reads the family from the keys (:mod:`opensd.checkpoints.families`),
starts from its preset (SD 1.5, SD 2.1, SDXL base or refiner) and fills in what the
shapes and keys tell: the U-Net's input channels (9: an inpainting model), for SD 2.x
and SDXL also the context width, the width of ``y`` and the transformer depth per level.
What the file predicts (eps or v) is found after loading
(:mod:`opensd.checkpoints.parameterization`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from opensd.checkpoints.build import WeightsDtype, build_on_meta, weights_dtype
from opensd.checkpoints.families import FIRST_CONV, UNET_PREFIX, detect_family
from opensd.checkpoints.io import CheckpointError, load_strict, read_cast, read_weights, write_safetensors
from opensd.checkpoints.parameterization import (
    MARKER_KEYS,
    MODELSPEC_PREDICTION,
    Parameterization,
    probe_mean_offset,
    read_metadata,
    resolve_prediction,
)
from opensd.config import ConfigError
from opensd.diffusion.schedules import Prediction
from opensd.models.stable_diffusion import ModelFamily, SDConfig, StableDiffusion

# Buffers of LDM's DDPM class that SD files carry; the schedule lives in SDConfig instead.
SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
    }
)
# Entries that are bookkeeping, not weights of the three networks: EMA copies, the VAE's
# training loss, SGM's denoiser sigmas (a schedule buffer, as the LDM ones above).
IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.", "denoiser.")
IGNORED_KEYS = frozenset({"cond_stage_model.transformer.text_model.embeddings.position_ids"}) | MARKER_KEYS
# Buffers of the text encoders (transformers' position ids, an old OpenCLIP's causal mask).
IGNORED_TEXT_BUFFER = re.compile(r"^(cond_stage_model|conditioner\.embedders\.\d+)\..*(\.position_ids|\battn_mask)$")

NATIVE_SIZE = {ModelFamily.SD1: 512, ModelFamily.SDXL: 1024, ModelFamily.SDXL_REFINER: 1024}
SD2_SIZE = {Prediction.V: 768, Prediction.EPS: 512}  # 768-v and 512-base
PRESETS = {
    ModelFamily.SD1: SDConfig.sd15, ModelFamily.SD2: SDConfig.sd21_base,
    ModelFamily.SDXL: SDConfig.sdxl, ModelFamily.SDXL_REFINER: SDConfig.sdxl_refiner,
}


def network_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of an original checkpoint that belong to the three networks."""
    return {
        k: v
        for k, v in state.items()
        if k not in SCHEDULE_BUFFERS and k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)
        and not IGNORED_TEXT_BUFFER.match(k)
    }


def _dim(state: dict[str, torch.Tensor], key: str, ndim: int, axis: int) -> int:
    """``state[key].shape[axis]``, the tensor checked to have ``ndim`` dimensions."""
    t = state.get(key)
    if t is None:
        raise CheckpointError(f"it has no {key!r}, which every model of its family has")
    if t.ndim != ndim:
        raise CheckpointError(f"{key} has shape {tuple(t.shape)}; a {ndim}-d tensor was expected")
    return int(t.shape[axis])


_BLOCK = re.compile(re.escape(UNET_PREFIX) + r"(input_blocks\.(\d+)|middle_block)\.1\.transformer_blocks\.(\d+)\.")


def transformer_depths(state: dict[str, torch.Tensor], levels: int, res_blocks: int) -> tuple[tuple[int, ...], int]:
    """Transformer blocks per level and in the middle block, counted from the keys.

    Input block ``i >= 1`` is res block ``(i - 1) % (res_blocks + 1)`` of level ``(i - 1)
    // (res_blocks + 1)`` (the last of each group is the downsampler); a level's depth is
    the most ``transformer_blocks.N`` any of its blocks has.
    """
    per_level, middle = [0] * levels, 0
    for k in state:
        m = _BLOCK.match(k)
        if m is None:
            continue
        depth = int(m.group(3)) + 1
        if m.group(2) is None:
            middle = max(middle, depth)
            continue
        level = (int(m.group(2)) - 1) // (res_blocks + 1)
        if 0 <= level < levels:
            per_level[level] = max(per_level[level], depth)
    return tuple(per_level), middle


def _fit_unet(cfg: SDConfig, state: dict[str, torch.Tensor]) -> SDConfig:
    """``cfg`` with the U-Net's context width, ``y`` width and transformer depths the file has."""
    u = cfg.unet
    levels = len(u.channel_mult)
    depths, middle = transformer_depths(state, levels, u.num_res_blocks)
    preset = tuple(u.depth_at(lv) if lv in u.attention_levels else 0 for lv in range(levels))
    changes: dict = {}
    key = next((k for k in state if k.startswith(UNET_PREFIX) and k.endswith(".attn2.to_k.weight")), None)
    if key is not None:
        changes["context_dim"] = _dim(state, key, 2, 1)
    if depths != preset and any(depths):
        changes["transformer_depth"] = depths
        changes["attention_levels"] = tuple(lv for lv in range(levels) if depths[lv])
    if middle and middle != u.middle_depth:
        changes["transformer_depth_middle"] = middle
    if u.adm_in_channels is not None:
        changes["adm_in_channels"] = _dim(state, UNET_PREFIX + "label_emb.0.0.weight", 2, 1)
    return cfg.replace(unet=dataclasses.replace(u, **changes))


def infer_config(state: dict[str, torch.Tensor]) -> SDConfig:
    """The configuration of an original checkpoint: its family's preset, fitted to its shapes.

    SD 1.x keeps SD 1.5's preset but for the input channels. The result is
    eps-prediction at the family's native size; :func:`read_original` sets the
    parameterization (and SD 2.x's 512 or 768 px) once the weights are loaded.
    """
    family = detect_family(state)
    cfg = PRESETS[family]()
    in_ch = _dim(state, FIRST_CONV, 4, 1)
    if in_ch not in (cfg.vae.embed_dim, cfg.inpainting_in_channels):
        raise CheckpointError(
            f"its U-Net takes {in_ch} input channels; opensd runs U-Nets of {cfg.vae.embed_dim} (text to image) "
            f"or {cfg.inpainting_in_channels} (inpainting: latent, mask and masked image) channels"
            + (" (5 is SD 2's depth model, whose depth conditioning opensd does not have)" if in_ch == 5 else "")
        )
    try:
        if in_ch != cfg.unet.in_channels:
            cfg = cfg.replace(unet=dataclasses.replace(cfg.unet, in_channels=in_ch))
        if family is not ModelFamily.SD1:
            cfg = _fit_unet(cfg, state)
    except ConfigError as e:
        raise CheckpointError(f"its shapes describe no {family.value} model: {' '.join(str(e).split())}") from None
    return cfg


def _native_size(cfg: SDConfig, prediction: Prediction, meta: dict[str, str]) -> int:
    """The image size a model was trained at: ModelSpec's ``resolution`` when square, else the family's."""
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", meta.get("modelspec.resolution", ""))
    f = cfg.vae.downsample_factor
    if m and m.group(1) == m.group(2) and 0 < int(m.group(1)) <= 8192 and int(m.group(1)) % f == 0:
        return int(m.group(1))
    return SD2_SIZE[prediction] if cfg.family is ModelFamily.SD2 else NATIVE_SIZE[cfg.family]


def cast_one_by_one(path: Path, state: dict[str, torch.Tensor], model: StableDiffusion) -> dict[str, torch.Tensor]:
    """``state``'s tensors in the dtypes of ``model`` (built on meta), read and cast one at a time
    (:func:`~opensd.checkpoints.io.read_cast`; ``state`` is emptied)."""
    own = {k: v.dtype for k, v in model.state_dict().items()}
    return read_cast(path, state, own.get)


@dataclass
class OriginalFile:
    """A loaded original file: the model (its ``cfg`` carrying the prediction) and how that was found."""

    model: StableDiffusion
    parameterization: Parameterization


def read_original(
    path: str | Path, config: SDConfig | None = None, prediction: Prediction | None = None, dtype: WeightsDtype = None,
) -> OriginalFile:
    """Load an original single file of any family and find its parameterization.

    ``config`` defaults to :func:`infer_config`'s; ``prediction`` overrides what the file
    says. With an inferred config the model's schedule and native size follow the
    parameterization found; with a given one only a parameterization the file (or the
    caller) states replaces the config's. ``dtype``: the floating-point weights'
    (:data:`~opensd.checkpoints.build.WeightsDtype`), cast as the file is read.
    """
    path = Path(path)
    state = read_weights(path)
    meta = read_metadata(path)
    keys = list(state)
    try:
        cfg = config or infer_config(state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model = build_on_meta(cfg, len(state), path, weights_dtype(dtype, cfg))
    net = network_state(state)
    del state  # ``net`` holds the only references now: cast_one_by_one reads the file again, tensor by tensor
    net = cast_one_by_one(path, net, model)
    load_strict(model, net, f"checkpoint {path}")
    del net
    model.eval()
    try:
        par = resolve_prediction(prediction, meta, keys, cfg.family,
                                 lambda: probe_mean_offset(model.unet, cfg.schedule.num_train_timesteps))
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if config is None:
        cfg = cfg.replace(image_size=_native_size(cfg, par.prediction, meta))
    if config is None or par.decided:
        cfg = cfg.replace(schedule=dataclasses.replace(cfg.schedule, prediction=par.prediction))
    model.cfg = cfg
    return OriginalFile(model, par)


def load_original(path: str | Path, config: SDConfig | None = None, prediction: Prediction | None = None) -> StableDiffusion:
    """Load an original single-file checkpoint (see :func:`read_original`)."""
    return read_original(path, config, prediction).model


def save_original(model: StableDiffusion, path: str | Path) -> None:
    """Write the model as an original-layout single ``.safetensors`` file.

    The header's metadata states the prediction (ModelSpec's ``modelspec.prediction_type``),
    so that the file loads back with the parameterization it has.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"save as .safetensors, not {path.suffix or '(no suffix)'}: {path}")
    if model.cfg.has_bert:
        raise CheckpointError("a model with a BERT text encoder has no original single-file format; save it as an opensd folder")
    prediction = "v" if model.cfg.schedule.prediction is Prediction.V else "epsilon"
    write_safetensors(model.state_dict(), path, metadata={"format": "pt", MODELSPEC_PREDICTION: prediction})
