"""What a model file or folder holds: architecture, parameter counts, dtype, hash."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from opensd.checkpoints import detect_format, load_model, main_weights_file
from opensd.checkpoints.io import short_hash
from opensd.config import to_dict


@dataclass
class ModelInfo:
    path: Path
    format: str
    hash: str
    dtypes: dict[str, int]  # dtype name -> number of tensors in the main weight file
    parameters: dict[str, int]
    architecture: dict
    tokenizer: str

    def render(self) -> str:
        p = self.parameters
        arch = self.architecture
        u, v, t = arch["unet"], arch["vae"], arch["text"]
        lines = [
            f"path:         {self.path}",
            f"format:       {self.format}",
            f"hash:         {self.hash}",
            f"dtype:        {', '.join(f'{k} ({n} tensors)' for k, n in self.dtypes.items())}",
            f"image size:   {arch['image_size']}x{arch['image_size']} px, latent "
            f"{v['embed_dim']}x{arch['image_size'] // 2 ** (len(v['ch_mult']) - 1)}^2",
            f"unet:         {p['unet']:,} params; channels {u['model_channels']} x {tuple(u['channel_mult'])}, "
            f"{u['num_res_blocks']} res blocks/level, attention at levels {tuple(u['attention_levels'])}, "
            f"context {u['context_dim']}",
            f"vae:          {p['vae']:,} params; ch {v['ch']} x {tuple(v['ch_mult'])}, z {v['z_channels']}, "
            f"scale {v['scale_factor']}",
            f"text encoder: {p['text_encoder']:,} params; width {t['width']}, {t['layers']} layers, "
            f"{t['heads']} heads, vocab {t['vocab_size']}, context {t['max_length']}",
            f"tokenizer:    {self.tokenizer}",
            f"schedule:     {arch['schedule']['beta_schedule']}, {arch['schedule']['prediction']}-prediction, "
            f"{arch['schedule']['num_train_timesteps']} steps",
            f"total:        {p['total']:,} params",
        ]
        return "\n".join(lines)


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32"}


def _dtypes(f: Path) -> dict[str, int]:
    """dtype name -> tensor count, read from the file's header without loading tensors."""
    if f.suffix == ".safetensors":
        with safe_open(str(f), "pt") as st:
            names = (str(st.get_slice(k).get_dtype()) for k in st.keys())
            counts = Counter(SAFETENSORS_DTYPES.get(n, n.lower()) for n in names)
        return dict(counts)
    from opensd.checkpoints.io import read_weights

    return dict(Counter(str(v.dtype).replace("torch.", "") for v in read_weights(f).values()))


def describe(path: str | Path) -> ModelInfo:
    path = Path(path).expanduser()
    fmt = detect_format(path)
    loaded = load_model(path)
    weights = main_weights_file(path, fmt)
    return ModelInfo(
        path=path,
        format=fmt,
        hash=short_hash(weights),
        dtypes=_dtypes(weights),
        parameters=loaded.model.parameter_counts(),
        architecture=to_dict(loaded.model.cfg),
        tokenizer=type(loaded.tokenizer).__name__ + f" ({loaded.tokenizer.vocab_size} tokens)",
    )
