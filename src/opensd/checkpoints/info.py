"""What a model file or folder holds: family, parameterization, architecture, parameter counts, dtype, hash."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from opensd.checkpoints import detect_format, int8, load_model, main_weights_file
from opensd.checkpoints.io import read_weights, short_hash
from opensd.checkpoints.parameterization import Parameterization
from opensd.config import to_dict
from opensd.diffusion.schedules import Prediction
from opensd.models.bert import BertTextConfig
from opensd.models.clip import CLIPTextConfig
from opensd.models.stable_diffusion import ModelFamily, SDConfig

FAMILY_NAMES = {
    ModelFamily.SD1: "SD 1.x",
    ModelFamily.SD2: "SD 2.x",
    ModelFamily.SDXL: "SDXL base",
    ModelFamily.SDXL_REFINER: "SDXL refiner",
}
ENCODER_NAMES = (
    (CLIPTextConfig.sd15(), "OpenAI CLIP ViT-L/14"),
    (CLIPTextConfig.open_clip_vit_h(), "OpenCLIP ViT-H/14"),
    (CLIPTextConfig.open_clip_vit_bigg(), "OpenCLIP ViT-bigG/14"),
)


def encoder_name(cfg: CLIPTextConfig | BertTextConfig, open_clip: bool) -> str:
    """The released text tower ``cfg`` is, else the kind it is (CLIP, OpenCLIP or BERT)."""
    if isinstance(cfg, BertTextConfig):
        return "MiniLM-L6 (BERT)" if cfg == BertTextConfig.minilm_l6(pooler=False) else "BERT text model"
    for preset, name in ENCODER_NAMES:
        if cfg == preset:
            return name
    return "OpenCLIP text tower" if open_clip else "CLIP text model"


def family_line(cfg: SDConfig) -> str:
    """``SDXL base (sdxl): OpenAI CLIP ViT-L/14 + OpenCLIP ViT-bigG/14``, and a U-Net of unusual inputs."""
    opens = [cfg.family is not ModelFamily.SD1 and (i > 0 or cfg.family is not ModelFamily.SDXL)
             for i in range(len(cfg.text_configs))]
    names = " + ".join(encoder_name(t, o) for t, o in zip(cfg.text_configs, opens, strict=False))
    line = f"{FAMILY_NAMES[cfg.family]} ({cfg.family.value}): {names}"
    if cfg.is_inpainting:
        line += f"; inpainting U-Net ({cfg.unet.in_channels} input channels)"
    return line


@dataclass
class ModelInfo:
    path: Path
    format: str
    hash: str
    dtypes: dict[str, int]  # dtype name -> number of tensors in the main weight file
    parameters: dict[str, int]
    architecture: dict
    tokenizer: str
    family: str = ""
    parameterization: Parameterization | None = None

    def _text_lines(self) -> list[str]:
        p, arch = self.parameters, self.architecture
        lines = []
        for i, key in enumerate(("text", "text_2")):
            t = arch.get(key)
            if t is None:
                continue
            label = "text encoder:" if i == 0 else "text encoder 2:"
            name = "text_encoder" if i == 0 else "text_encoder_2"
            lines.append(
                f"{label:<14}{p[name]:,} params; width {t['width']}, {t['layers']} layers, "
                f"{t['heads']} heads, vocab {t['vocab_size']}, context {t.get('max_length', t.get('max_positions'))}"
            )
        return lines

    def _prediction_lines(self) -> list[str]:
        par = self.parameterization
        if par is None:
            return []
        lines = [f"prediction:   {par.describe()}"]
        if par.zero_terminal_snr:
            lines.append(f"zero SNR:     trained with zero terminal SNR ({par.zero_terminal_snr}); "
                         "opensd samples it with the plain schedule (it does not rescale betas)")
        return lines

    def render(self) -> str:
        p = self.parameters
        arch = self.architecture
        u, v = arch["unet"], arch["vae"]
        lines = [
            f"path:         {self.path}",
            f"format:       {self.format}",
            f"hash:         {self.hash}",
            f"dtype:        {', '.join(f'{k} ({n} tensors)' for k, n in self.dtypes.items())}",
            *([f"family:       {self.family}"] if self.family else []),
            *self._prediction_lines(),
            f"image size:   {arch['image_size']}x{arch['image_size']} px (native), latent "
            f"{v['embed_dim']}x{arch['image_size'] // 2 ** (len(v['ch_mult']) - 1)}^2",
            f"unet:         {p['unet']:,} params; channels {u['model_channels']} x {tuple(u['channel_mult'])}, "
            f"{u['num_res_blocks']} res blocks/level, attention at levels {tuple(u['attention_levels'])}, "
            f"context {u['context_dim']}" + (f", y {u['adm_in_channels']}" if u.get("adm_in_channels") else ""),
            f"vae:          {p['vae']:,} params; ch {v['ch']} x {tuple(v['ch_mult'])}, z {v['z_channels']}, "
            f"scale {v['scale_factor']}",
            *self._text_lines(),
            f"tokenizer:    {self.tokenizer}",
            f"schedule:     {arch['schedule']['beta_schedule']}, {arch['schedule']['prediction']}-prediction, "
            f"{arch['schedule']['num_train_timesteps']} steps",
            f"total:        {p['total']:,} params",
        ]
        return "\n".join(lines)


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32", "I8": "int8"}


def _dtypes(f: Path) -> dict[str, int]:
    """dtype name -> tensor count, read from the file's header without loading tensors (an 8-bit
    weight's scale is part of that weight, not a tensor of its own)."""
    if f.suffix == ".safetensors":
        with safe_open(str(f), "pt") as st:
            names = (str(st.get_slice(k).get_dtype()) for k in int8.stored_names(st.keys()))
            counts = Counter(SAFETENSORS_DTYPES.get(n, n.lower()) for n in names)
        return dict(counts)
    return dict(Counter(str(v.dtype).replace("torch.", "") for v in read_weights(f).values()))


def _tokenizer_name(tok) -> str:
    text = type(tok).__name__ + f" ({tok.vocab_size} tokens"
    pad = getattr(tok, "pad_token", None)
    return text + (f", pads with {pad!r})" if isinstance(pad, str) else ")")


def describe(path: str | Path, prediction: Prediction | str | None = None) -> ModelInfo:
    """What ``path`` holds; ``prediction`` overrides its parameterization as :func:`load_model`'s does."""
    path = Path(path).expanduser()
    fmt = detect_format(path)
    loaded = load_model(path, prediction=prediction)
    weights = main_weights_file(path, fmt)
    cfg = loaded.model.cfg
    return ModelInfo(
        path=path,
        format=fmt,
        hash=short_hash(weights),
        dtypes=_dtypes(weights),
        parameters=loaded.model.parameter_counts(),
        architecture=to_dict(cfg),
        tokenizer=_tokenizer_name(loaded.tokenizer),
        family=family_line(cfg),
        parameterization=loaded.parameterization,
    )
