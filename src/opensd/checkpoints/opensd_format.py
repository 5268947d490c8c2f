"""opensd's own model folder: safetensors weights + a JSON config + the tokenizer.

Layout::

    model/
      config.json          {"format": "opensd", "version": 1, "model": <SDConfig as a dict>}
      model.safetensors    the original SD key layout (see opensd.models.stable_diffusion),
                           optionally with 8-bit weights (opensd.checkpoints.int8)
      tokenizer/           CLIP BPE files or opensd's small word tokenizer

The config is checked key by key: an unknown key is an error, not silently ignored.
"""

from __future__ import annotations

from pathlib import Path

import torch

from opensd.checkpoints import int8
from opensd.checkpoints.build import WeightsDtype, build_on_meta, tokenizer_for, weights_dtype
from opensd.checkpoints.io import CheckpointError, load_strict, read_cast, read_json, read_weights, write_json, write_safetensors
from opensd.config import ConfigError, from_dict, to_dict
from opensd.models.stable_diffusion import SDConfig, StableDiffusion
from opensd.tokenizers import Tokenizer

FORMAT = "opensd"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def is_opensd_folder(path: Path) -> bool:
    if not (path / CONFIG).is_file():
        return False
    try:
        return read_json(path / CONFIG).get("format") == FORMAT
    except CheckpointError:
        return False


def read_config(path: Path) -> SDConfig:
    data = read_json(path / CONFIG)
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{path / CONFIG} is not an opensd config (format={data.get('format')!r})")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path / CONFIG}: unsupported version {data.get('version')!r}; this opensd reads {VERSION}")
    unknown = sorted(set(data) - {"format", "version", "model"})
    if unknown:
        raise CheckpointError(f"{path / CONFIG}: unknown key(s) {', '.join(unknown)}; allowed: format, version, model")
    try:
        return from_dict(SDConfig, data.get("model", {}), _where=f"{path / CONFIG}: model")
    except ConfigError as e:
        raise CheckpointError(" ".join(str(e).split())) from None
    except Exception as e:  # a value the config classes' checks trip over (a zero divisor, say)
        raise CheckpointError(f"{path / CONFIG}: model: invalid configuration: {' '.join(str(e).split())[:200]}") from None


def load_opensd(path: str | Path, dtype: WeightsDtype = None) -> tuple[StableDiffusion, Tokenizer]:
    """The model and tokenizer of an opensd folder; ``dtype``: its floating-point weights'
    (:data:`~opensd.checkpoints.build.WeightsDtype`), cast as the file is read."""
    path = Path(path)
    cfg = read_config(path)
    state = read_weights(path / WEIGHTS)
    quantized = int8.is_quantized(state)
    model = build_on_meta(cfg, len(int8.stored_names(state)), path / CONFIG, weights_dtype(dtype, cfg))
    own = {k: v.dtype for k, v in model.state_dict().items()}
    state = read_cast(path / WEIGHTS, state, own.get)  # one tensor at a time: no second copy of the weights
    if quantized:
        state = int8.dequantize(state, own.get, str(path / WEIGHTS))
    load_strict(model, state, f"{path / WEIGHTS}")
    return model.eval(), tokenizer_for(path / "tokenizer", cfg)


def save_opensd(model: StableDiffusion, tokenizer: Tokenizer, path: str | Path,
                dtype: torch.dtype | None = None, int8_weights: bool = False) -> Path:
    """Write ``model`` and ``tokenizer`` as an opensd folder; returns the folder.

    ``dtype`` (e.g. ``torch.float16``) stores floating-point weights in that type, halving
    the file; :func:`load_opensd` reads them into the dtype it is asked for (float32 by default).
    ``int8_weights`` stores the U-Net's and text encoders' large weights in 8 bits with a
    scale per row (:mod:`opensd.checkpoints.int8`), the rest in ``dtype`` (float16 if None).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot save a model folder over the file {path}")
    if dtype is not None and not dtype.is_floating_point:
        raise CheckpointError(f"save_opensd: dtype must be a floating-point type, got {dtype}")
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if int8_weights:
        state = int8.quantize(state, rest=dtype or torch.float16)
    elif dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    write_safetensors(state, path / WEIGHTS, metadata={"format": "pt"})
    tokenizer.save(path / "tokenizer")
    write_json({"format": FORMAT, "version": VERSION, "model": to_dict(model.cfg)}, path / CONFIG)
    return path
