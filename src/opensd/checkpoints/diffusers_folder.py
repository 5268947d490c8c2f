"""diffusers pipeline folders: load one into opensd, or export opensd as one, for every family.

A folder holds ``model_index.json`` and one sub-folder per component. Which components,
and which diffusers pipeline reads them, depends on the family (:class:`ModelFamily`)::

    family        pipeline (model_index _class_name)   text encoders (transformers class)
    sd1           StableDiffusionPipeline              text_encoder   CLIPTextModel (CLIP ViT-L)
    sd2           StableDiffusionPipeline              text_encoder   CLIPTextModel (OpenCLIP ViT-H, 23 of 24 blocks)
    sdxl          StableDiffusionXLPipeline            text_encoder   CLIPTextModel (CLIP ViT-L)
                                                       text_encoder_2 CLIPTextModelWithProjection (OpenCLIP bigG)
    sdxl_refiner  StableDiffusionXLImg2ImgPipeline     text_encoder_2 CLIPTextModelWithProjection (OpenCLIP bigG)

each with ``unet/``, ``vae/``, ``scheduler/`` and a tokenizer per text encoder
(``tokenizer``, ``tokenizer_2``). Weight names differ from the original layout; the key
tables in ``keymap_unet``, ``keymap_vae``, ``keymap_clip`` and ``keymap_open_clip``
translate them, and are the only renaming code in opensd.

Reading, the family is found from the folder: ``text_encoder_2`` present makes it SDXL
(with ``text_encoder``) or the refiner (without); otherwise a text encoder with
OpenCLIP's exact GELU and a tokenizer padding with ``!`` (OpenCLIP's id 0) make it SD 2.x,
anything else SD 1.x. The model's ``_class_name`` and the U-Net's
``addition_embed_type`` must agree. ``prediction_type`` comes from
``scheduler/scheduler_config.json`` (SD 2.x 768-v: ``v_prediction``).

SDXL and the refiner are exported with ``force_zeros_for_empty_prompt`` true: opensd
(as A1111) conditions an empty negative prompt on zeros, as diffusers then does.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from tokenizers import Tokenizer as Backend
from tokenizers.processors import TemplateProcessing

from opensd.checkpoints.build import WeightsDtype, build_on_meta, tokenizer_for, weights_dtype
from opensd.checkpoints.io import (
    CheckpointError,
    StateDictMismatch,
    first_existing,
    load_strict,
    read_cast,
    read_json,
    read_weights,
    strip_prefix,
    write_json,
    write_safetensors,
)
from opensd.checkpoints.keymap_clip import (
    clip_key_names,
    from_transformers_clip_config,
    from_transformers_clip_state_dict,
    to_transformers_clip_config,
)
from opensd.checkpoints.keymap_open_clip import (
    from_transformers,
    from_transformers_open_clip_config,
    to_transformers,
    to_transformers_open_clip_config,
)
from opensd.checkpoints.keymap_unet import (
    diffusers_size_embed_dim,
    from_diffusers_unet_config,
    to_diffusers_unet_config,
    unet_key_map,
)
from opensd.checkpoints.keymap_vae import from_diffusers_vae_config, needs_reshape, to_diffusers_vae_config, vae_key_map
from opensd.diffusion.schedules import NoiseScheduleConfig
from opensd.models.clip import Activation, CLIPTextConfig
from opensd.models.stable_diffusion import ModelFamily, SDConfig, StableDiffusion
from opensd.tokenizers import Tokenizer
from opensd.tokenizers.clip_bpe import CLIPTokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")

DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
# (component folder, prefix of its network's keys in the original layout)
NETWORKS = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}
EXPORTED_DIFFUSERS_VERSION = "0.30.0"
OPEN_CLIP_PAD = "!"  # OpenCLIP's tokenizer pads with id 0, the token "!"


@dataclass(frozen=True)
class TextSlot:
    """One text encoder of a family in a diffusers folder.

    ``prefix``: where its keys start in opensd's (the original) layout. ``open_clip``:
    an OpenCLIP tower (converted by ``keymap_open_clip``), else OpenAI's CLIP (same keys as
    transformers). ``projection``: stored as ``CLIPTextModelWithProjection``.
    ``dropped``: blocks diffusers leaves out (SD 2.x: the last; loading fills it with zeros).
    """

    folder: str
    tokenizer: str
    prefix: str
    open_clip: bool = False
    projection: bool = False
    dropped: int = 0

    @property
    def hf_class(self) -> str:
        return "CLIPTextModelWithProjection" if self.projection else "CLIPTextModel"


TEXT_SLOTS: dict[ModelFamily, tuple[TextSlot, ...]] = {
    ModelFamily.SD1: (TextSlot("text_encoder", "tokenizer", "cond_stage_model.transformer."),),
    ModelFamily.SD2: (TextSlot("text_encoder", "tokenizer", "cond_stage_model.model.", open_clip=True, dropped=1),),
    ModelFamily.SDXL: (
        TextSlot("text_encoder", "tokenizer", "conditioner.embedders.0.transformer."),
        TextSlot("text_encoder_2", "tokenizer_2", "conditioner.embedders.1.model.", open_clip=True, projection=True),
    ),
    ModelFamily.SDXL_REFINER: (
        TextSlot("text_encoder_2", "tokenizer_2", "conditioner.embedders.0.model.", open_clip=True, projection=True),
    ),
}
PIPELINES = {
    ModelFamily.SD1: "StableDiffusionPipeline",
    ModelFamily.SD2: "StableDiffusionPipeline",
    ModelFamily.SDXL: "StableDiffusionXLPipeline",
    ModelFamily.SDXL_REFINER: "StableDiffusionXLImg2ImgPipeline",
}
_XL_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")


def is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


# ---------------------------------------------------------------------------------------
# Renaming: one table per network, applied in either direction.


def _fit(value: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Reshape between a 1x1 conv (o, i, 1, 1) and a linear (o, i) weight; else unchanged."""
    if tuple(value.shape) != tuple(shape) and value.numel() == int(torch.Size(shape).numel()):
        return value.reshape(shape)
    return value


def _clip_text_configs(cfg: SDConfig) -> tuple[CLIPTextConfig, ...]:
    """The model's text encoder configs, all CLIP or OpenCLIP: diffusers has no layout for
    opensd's BERT-conditioned models (a one-line :class:`CheckpointError`)."""
    configs = tuple(t for t in cfg.text_configs if isinstance(t, CLIPTextConfig))
    if len(configs) != len(cfg.text_configs):
        raise CheckpointError("a model with a BERT text encoder has no diffusers layout; save it as an opensd folder")
    return configs


def _text_to_original(slot: TextSlot, cfg: CLIPTextConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One text encoder's diffusers state dict -> its keys in the original layout (prefixed)."""
    if slot.open_clip:
        try:
            ours, notes = from_transformers(state, cfg)
        except (RuntimeError, ValueError, TypeError) as e:  # tensors that do not split or stack: a broken file
            raise CheckpointError(f"{slot.folder}: cannot convert the weights: {' '.join(str(e).split())[:200]}") from None
        for note in notes:
            log.info("%s: %s", slot.folder, note)
    else:
        known = set(clip_key_names(cfg))
        ours = {k if k in known else f"<diffusers {slot.folder}>.{k}": v
                for k, v in from_transformers_clip_state_dict(dict(state)).items()}
    return {slot.prefix + k: v for k, v in ours.items()}


def to_original_layout(cfg: SDConfig, component_states: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """diffusers component state dicts -> one original-layout state dict.

    Keys the tables do not know are kept under their diffusers names, so that the
    strict load reports them as unexpected. SD 2.x's missing last text block, and an
    OpenCLIP tower's ``text_projection`` or ``logit_scale`` that the folder lacks, are
    filled with values that change no output (``keymap_open_clip.from_transformers``).
    """
    out: dict[str, torch.Tensor] = {}
    maps = {"unet": unet_key_map(cfg.unet), "vae": vae_key_map(cfg.vae)}
    for comp, prefix in NETWORKS.items():
        inverse = {d: o for o, d in maps[comp].items()}
        for k, v in component_states[comp].items():
            out[prefix + inverse.get(k, f"<diffusers {comp}>.{k}")] = v
    for slot, text_cfg in zip(TEXT_SLOTS[cfg.family], _clip_text_configs(cfg), strict=False):
        out |= _text_to_original(slot, text_cfg, component_states[slot.folder])
    return out


def from_original_layout(model: StableDiffusion) -> dict[str, dict[str, torch.Tensor]]:
    """opensd's state dict -> diffusers component state dicts (VAE attention as Linear,
    OpenCLIP towers as transformers models, SD 2.x's without its last block)."""
    state = model.state_dict()
    cfg = model.cfg
    out: dict[str, dict[str, torch.Tensor]] = {}
    maps = {"unet": unet_key_map(cfg.unet), "vae": vae_key_map(cfg.vae)}
    for comp, prefix in NETWORKS.items():
        comp_state = {}
        for o, d in maps[comp].items():
            v = state[prefix + o]
            if comp == "vae" and needs_reshape(o):
                v = v[:, :, 0, 0]  # (out, in, 1, 1) conv -> (out, in) linear
            comp_state[d] = v
        out[comp] = comp_state
    for slot, text_cfg in zip(TEXT_SLOTS[cfg.family], _clip_text_configs(cfg), strict=False):
        own = strip_prefix(state, slot.prefix)
        if slot.open_clip:
            out[slot.folder] = to_transformers(own, text_cfg, layers=text_cfg.layers - slot.dropped,
                                               projection=slot.projection)
        else:
            out[slot.folder] = {k: own[k] for k in clip_key_names(text_cfg)}
    return out


# ---------------------------------------------------------------------------------------
# Loading.


def _read_component_weights(folder: Path, comp: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One component's weights, floating-point tensors in ``dtype`` (cast as they are read)."""
    sub = folder / comp
    if not sub.is_dir():
        raise CheckpointError(f"{folder} has no {comp}/ folder (a Stable Diffusion pipeline folder needs it)")
    f = first_existing(sub, DIFFUSERS_WEIGHTS)
    if f is None:
        raise CheckpointError(f"{sub} has no weights file; expected one of {', '.join(DIFFUSERS_WEIGHTS)}")
    return read_cast(f, read_weights(f), lambda _: dtype)


def _sample_size(value: object, where: Path) -> int:
    """diffusers' ``sample_size``: a positive integer, or a list of equal positive integers (height, width)."""
    items = value if isinstance(value, list) else [value]
    sizes = [v for v in items if type(v) is int and v >= 1]
    if not items or len(sizes) != len(items) or len(set(sizes)) != 1:
        raise CheckpointError(
            f"{where}: sample_size must be a positive integer or a list of equal ones, got {value!r:.60}"
        )
    return sizes[0]


def _component_config(file: Path, convert: Callable[[dict], T]) -> T:
    """``convert(<the JSON object in file>)``; whatever the converter refuses is an error naming the file."""
    data = read_json(file)
    try:
        return convert(data)
    except CheckpointError:
        raise
    except Exception as e:  # any value of the untrusted config file that the converter trips over
        text = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(f"{file}: unsupported configuration: {text}") from None


def _present(index: dict, name: str) -> bool:
    """A component listed in model_index.json as ``[library, class]`` (``[null, null]``: absent)."""
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def _pad_token(tok_dir: Path) -> str | None:
    """The pad token a transformers tokenizer folder names (special_tokens_map.json wins)."""
    pad = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tok_dir / name).is_file():
            value = read_json(tok_dir / name).get("pad_token", pad)
            pad = value.get("content") if isinstance(value, dict) else value
    return pad if isinstance(pad, str) else None


def detect_family(folder: Path, index: dict) -> ModelFamily:
    """The family of a diffusers folder (see the module docstring); a contradiction is a CheckpointError."""
    where = folder / "model_index.json"
    cls = index.get("_class_name")
    unet_cfg = read_json(folder / "unet" / "config.json") if (folder / "unet" / "config.json").is_file() else {}
    xl_unet = unet_cfg.get("addition_embed_type") == "text_time"
    if _present(index, "text_encoder_2"):
        family = ModelFamily.SDXL if _present(index, "text_encoder") else ModelFamily.SDXL_REFINER
        if not xl_unet:
            raise CheckpointError(f"{where}: has text_encoder_2 (SDXL), but unet/config.json has no "
                                  "addition_embed_type 'text_time' (SDXL's size conditioning)")
        return family
    if isinstance(cls, str) and cls in _XL_CLASSES or xl_unet:
        raise CheckpointError(f"{where}: an SDXL pipeline ({cls}) needs text_encoder_2 (OpenCLIP bigG); it lists none")
    text_file = folder / "text_encoder" / "config.json"
    gelu = text_file.is_file() and read_json(text_file).get("hidden_act") == Activation.GELU.value
    return ModelFamily.SD2 if gelu and _pad_token(folder / "tokenizer") == OPEN_CLIP_PAD else ModelFamily.SD1


def _text_config(slot: TextSlot) -> Callable[[dict], CLIPTextConfig]:
    if slot.open_clip:
        return lambda d: from_transformers_open_clip_config(d, extra_layers=slot.dropped)
    return from_transformers_clip_config


def read_diffusers_config(folder: Path) -> SDConfig:
    """The SDConfig of a diffusers folder, from its components' config files.

    Every problem is a one-line :class:`CheckpointError` naming the file at fault.
    """
    index = read_json(folder / "model_index.json")
    family = detect_family(folder, index)
    slots = TEXT_SLOTS[family]
    needed = ["unet", "vae", *(s.folder for s in slots), *(s.tokenizer for s in slots)]
    missing = [c for c in needed if not _present(index, c)]
    if missing:
        raise CheckpointError(f"{folder / 'model_index.json'} lacks component(s) of a {family.value} model: {', '.join(missing)}")
    unet_file = folder / "unet" / "config.json"
    unet = _component_config(unet_file, from_diffusers_unet_config)
    size_dim = _component_config(unet_file, diffusers_size_embed_dim)
    sample = _sample_size(read_json(unet_file).get("sample_size", 64), unet_file)
    vae = _component_config(folder / "vae" / "config.json", from_diffusers_vae_config)
    texts = [_component_config(folder / s.folder / "config.json", _text_config(s)) for s in slots]
    sched_file = folder / "scheduler" / "scheduler_config.json"
    schedule = (_component_config(sched_file, NoiseScheduleConfig.from_diffusers) if sched_file.is_file()
                else NoiseScheduleConfig())
    try:
        return SDConfig(unet=unet, vae=vae, text=texts[0], text_2=texts[1] if len(texts) > 1 else None,
                        schedule=schedule, image_size=sample * vae.downsample_factor, family=family,
                        size_embed_dim=size_dim or SDConfig.size_embed_dim)
    except Exception as e:  # the components disagree (the U-Net's context width and the text encoder's, say)
        text = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(f"{folder}: the components' configurations do not fit together: {text}") from None


def _tokenizer(folder: Path, cfg: SDConfig) -> Tokenizer:
    """The tokenizer opensd frames prompts with: the first text encoder's (the refiner:
    ``tokenizer_2``). SDXL's ``tokenizer_2`` must hold the same vocabulary: opensd frames
    both encoders' input with the first and re-pads bigG's with 0 (OpenCLIP's ``!``)."""
    slots = TEXT_SLOTS[cfg.family]
    tok = tokenizer_for(folder / slots[0].tokenizer, cfg)
    if len(slots) > 1:
        tok_2 = tokenizer_for(folder / slots[1].tokenizer, cfg)
        if getattr(tok_2, "vocab", None) != getattr(tok, "vocab", None) or tok_2.vocab_size != tok.vocab_size:
            raise CheckpointError(f"{folder / slots[1].tokenizer}: its vocabulary differs from {folder / slots[0].tokenizer}'s; "
                                  "opensd needs SDXL's two tokenizers to share one (CLIP's)")
        assert cfg.text_2 is not None
        if tok_2.vocab_size > cfg.text_2.vocab_size:
            raise CheckpointError(f"{folder / slots[1].tokenizer}: {tok_2.vocab_size} tokens, text_encoder_2 only "
                                  f"{cfg.text_2.vocab_size}")
    return tok


def load_diffusers(folder: str | Path, dtype: WeightsDtype = None) -> tuple[StableDiffusion, Tokenizer]:
    """A diffusers folder of any family as an opensd model and its (first) tokenizer;
    ``dtype``: its floating-point weights' (:data:`~opensd.checkpoints.build.WeightsDtype`)."""
    folder = Path(folder)
    cfg = read_diffusers_config(folder)
    dt = weights_dtype(dtype, cfg)
    comps = [*NETWORKS, *(s.folder for s in TEXT_SLOTS[cfg.family])]
    states = {comp: _read_component_weights(folder, comp, dt) for comp in comps}
    model = build_on_meta(cfg, sum(len(s) for s in states.values()), folder, dt)
    own = model.state_dict()
    state = to_original_layout(cfg, states)
    state = {k: _fit(v, own[k].shape) if k in own else v for k, v in state.items()}
    load_strict(model, state, f"diffusers folder {folder}")
    return model.eval(), _tokenizer(folder, cfg)


# ---------------------------------------------------------------------------------------
# Export.


def _save_tokenizer_for_transformers(tokenizer: Tokenizer, folder: Path) -> str:
    """Save the tokenizer so transformers reads it; returns the transformers class name.

    CLIP's BPE is saved as CLIPTokenizer files. opensd's word tokenizer is saved as a
    ``tokenizer.json`` with a bos/eos template, read by ``PreTrainedTokenizerFast``.
    """
    tokenizer.save(folder)
    if isinstance(tokenizer, CLIPTokenizer):
        return "CLIPTokenizer"
    backend = Backend.from_file(str(folder / "tokenizer.json"))
    bos, eos = backend.id_to_token(tokenizer.bos_id), backend.id_to_token(tokenizer.eos_id)
    backend.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tokenizer.bos_id), (eos, tokenizer.eos_id)]
    )
    backend.save(str(folder / "tokenizer.json"))
    write_json(
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": tokenizer.context_length,
            "bos_token": bos,
            "eos_token": eos,
            "pad_token": backend.id_to_token(tokenizer.pad_id),
            "unk_token": backend.id_to_token(getattr(tokenizer, "unk_id", tokenizer.pad_id)),
        },
        folder / "tokenizer_config.json",
    )
    return "PreTrainedTokenizerFast"


def _open_clip_tokenizer(tokenizer: Tokenizer, family: ModelFamily) -> CLIPTokenizer:
    """``tokenizer`` padding with ``!`` (id 0), as OpenCLIP's and diffusers' SD 2.x/SDXL
    ``tokenizer``/``tokenizer_2`` do (opensd re-pads SDXL's bigG input the same way)."""
    if not isinstance(tokenizer, CLIPTokenizer) or OPEN_CLIP_PAD not in tokenizer.vocab:
        raise CheckpointError(
            f"save_diffusers: a {family.value} model needs CLIP's BPE tokenizer (its OpenCLIP encoder's input is "
            f"padded with {OPEN_CLIP_PAD!r}), got {type(tokenizer).__name__}"
        )
    if tokenizer.pad_token == OPEN_CLIP_PAD:
        return tokenizer
    return CLIPTokenizer(tokenizer.vocab, tokenizer.merges, pad_token=OPEN_CLIP_PAD, bos_token=tokenizer.bos_token,
                         eos_token=tokenizer.eos_token, unk_token=tokenizer.unk_token,
                         context_length=tokenizer.context_length)


def _text_encoder_config(slot: TextSlot, cfg: CLIPTextConfig, tok: Tokenizer) -> dict:
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    if slot.open_clip:
        return to_transformers_open_clip_config(cfg, layers=cfg.layers - slot.dropped, projection=slot.projection, **ids)
    return to_transformers_clip_config(cfg, **ids)


def _model_index(family: ModelFamily, tokenizer_classes: dict[str, str], scheduler: str) -> dict:
    """model_index.json: the pipeline class and its components (``[null, null]``: none)."""
    index: dict = {"_class_name": PIPELINES[family], "_diffusers_version": EXPORTED_DIFFUSERS_VERSION}
    slots = TEXT_SLOTS[family]
    if family in (ModelFamily.SD1, ModelFamily.SD2):
        index |= {"feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False}
    else:
        index |= {"feature_extractor": [None, None], "image_encoder": [None, None], "force_zeros_for_empty_prompt": True}
        for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
            index[name] = [None, None]
        if family is ModelFamily.SDXL_REFINER:
            index["requires_aesthetics_score"] = True
    for slot in slots:
        index[slot.folder] = ["transformers", slot.hf_class]
        index[slot.tokenizer] = ["transformers", tokenizer_classes[slot.tokenizer]]
    index |= {"scheduler": ["diffusers", scheduler], "unet": ["diffusers", "UNet2DConditionModel"],
              "vae": ["diffusers", "AutoencoderKL"]}
    return index


def save_diffusers(model: StableDiffusion, tokenizer: Tokenizer, folder: str | Path) -> Path:
    """Write a folder that diffusers' pipeline of the model's family loads offline
    (``from_pretrained(folder, local_files_only=True)``); :func:`load_diffusers` reads it back.

    ``tokenizer`` is the one opensd frames prompts with. SD 2.x writes it padding with
    ``!``; SDXL writes it as ``tokenizer`` and its ``!``-padding copy as ``tokenizer_2``;
    the refiner only the copy, as ``tokenizer_2``. SD 2.x's text encoder is written
    without its last block, as diffusers does (SD 2 never uses it).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"cannot export a folder over the file {folder}")
    cfg = model.cfg
    _clip_text_configs(cfg)  # before anything is written
    family = cfg.family
    slots = TEXT_SLOTS[family]
    tokenizers = {slot.tokenizer: tokenizer if slot.tokenizer == "tokenizer" and family is not ModelFamily.SD2
                  else _open_clip_tokenizer(tokenizer, family) for slot in slots}
    states = from_original_layout(model)
    size_dim = cfg.size_embed_dim if cfg.unet.adm_in_channels is not None else None
    writers: dict[str, tuple[dict, str]] = {
        "unet": (to_diffusers_unet_config(cfg.unet, sample_size=cfg.latent_size, size_embed_dim=size_dim),
                 "diffusion_pytorch_model.safetensors"),
        "vae": (to_diffusers_vae_config(cfg.vae, sample_size=cfg.image_size), "diffusion_pytorch_model.safetensors"),
    }
    for slot, text_cfg in zip(slots, _clip_text_configs(cfg), strict=False):
        writers[slot.folder] = (_text_encoder_config(slot, text_cfg, tokenizers[slot.tokenizer]), "model.safetensors")
    for comp, (comp_cfg, weights_name) in writers.items():
        write_safetensors(states[comp], folder / comp / weights_name, metadata={"format": "pt"})
        write_json(comp_cfg, folder / comp / "config.json")
    classes = {}
    for name, tok in tokenizers.items():
        if (folder / name).exists():
            shutil.rmtree(folder / name)
        classes[name] = _save_tokenizer_for_transformers(tok, folder / name)
    scheduler = "PNDMScheduler" if family in (ModelFamily.SD1, ModelFamily.SD2) else "EulerDiscreteScheduler"
    sched: dict[str, object] = {"_class_name": scheduler, "_diffusers_version": EXPORTED_DIFFUSERS_VERSION}
    if scheduler == "PNDMScheduler":
        sched["skip_prk_steps"] = True
    sched.update(cfg.schedule.to_diffusers())
    write_json(sched, folder / "scheduler" / "scheduler_config.json")
    write_json(_model_index(family, classes, scheduler), folder / "model_index.json")
    return folder


__all__ = [
    "is_diffusers_folder",
    "load_diffusers",
    "save_diffusers",
    "read_diffusers_config",
    "detect_family",
    "TEXT_SLOTS",
    "to_original_layout",
    "from_original_layout",
    "StateDictMismatch",
]
