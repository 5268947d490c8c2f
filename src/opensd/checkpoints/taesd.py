"""Reading and writing tiny autoencoders (TAESD): the original files and diffusers folders.

:func:`load_tiny_autoencoder` takes

- one original file, ``taesd_decoder.pth`` / ``.safetensors`` (or ``*_encoder``): the
  state dict of one ``nn.Sequential`` (``1.conv.0.weight`` ...); whether it is an
  encoder or a decoder, and its width, stages and blocks, come from its keys and shapes;
- a folder holding such files (an encoder, a decoder, or both: ``*encoder*`` and
  ``*decoder*`` files, safetensors preferred);
- a diffusers ``AutoencoderTiny`` folder (``config.json`` with ``"_class_name":
  "AutoencoderTiny"``, ``diffusion_pytorch_model.safetensors`` or ``.bin``), whose config
  also carries the latent scale and shift.

Every file loads strictly (:func:`opensd.checkpoints.io.load_strict`): safetensors, or
``torch.load(weights_only=True)`` for ``.pth``/``.pt``/``.bin``. A file that is no TAESD
half is a one-line :class:`TinyAutoencoderError`. :func:`save_tiny_autoencoder` writes the
original layout as ``taesd_encoder.safetensors`` / ``taesd_decoder.safetensors``;
:func:`tiny_autoencoder_beside` finds such files in a model's own folder (the default
model keeps its distilled one there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch

from opensd.checkpoints.io import CheckpointError, load_strict, read_json, read_weights, strip_prefix, write_safetensors
from opensd.checkpoints.keymap_taesd import diffusers_to_taesd, from_diffusers_tiny_config
from opensd.models.taesd import TinyAutoencoder, TinyAutoencoderConfig

PARTS = ("encoder", "decoder")
FILE_NAMES = {"encoder": "taesd_encoder.safetensors", "decoder": "taesd_decoder.safetensors"}
SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")  # in order of preference
DIFFUSERS_CLASS = "AutoencoderTiny"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class TinyAutoencoderError(CheckpointError):
    """A path holds no tiny autoencoder opensd can read; the message says what it expected."""


# ----------------------------------------------------------------------------- one half


def _layers(state: Mapping[str, torch.Tensor]) -> dict[int, set[str]]:
    """Sequential index -> the parameter names under it (``{3: {"conv.0.weight", ...}}``)."""
    out: dict[int, set[str]] = {}
    for k in state:
        head, _, rest = k.partition(".")
        if not head.isdigit() or not rest:
            raise TinyAutoencoderError(f"key {k!r} is not a TAESD layer (expected 'N.weight', 'N.conv.0.weight', ...)")
        out.setdefault(int(head), set()).add(rest)
    return out


def part_config(state: Mapping[str, torch.Tensor], what: str) -> tuple[str, TinyAutoencoderConfig]:
    """("encoder" | "decoder", its config) from one half's state dict (original keys).

    An encoder starts with its input conv at index 0; a decoder's index 0 is the clamp
    (no weights), its first conv is index 1. With s stages of b blocks the last index
    is ``2 + s (b + 1)`` in an encoder and ``4 + s (b + 2)`` in a decoder, and there are
    ``s b + 1`` blocks.
    """
    layers = _layers(state)
    if not layers:
        raise TinyAutoencoderError(f"{what} holds no TAESD layers")
    part = "encoder" if 0 in layers else "decoder"
    first_key, last = f"{min(layers)}.weight", max(layers)
    in_blocks = sum(1 for names in layers.values() if "conv.0.weight" in names) - 1  # s * b
    if part == "encoder":
        s = last - 2 - in_blocks
    else:
        s = (last - 4 - in_blocks) // 2 if (last - 4 - in_blocks) % 2 == 0 else 0
    first = state.get(first_key)
    if first is None or first.ndim != 4 or s < 1 or in_blocks < s or in_blocks % s or f"{last}.weight" not in state:
        raise TinyAutoencoderError(f"{what} is not a TAESD encoder or decoder: its layers do not follow TAESD's pattern")
    width, c_in = first.shape[0], first.shape[1]
    c_out = state[f"{last}.weight"].shape[0]
    io = {"in_channels": c_in, "latent_channels": c_out} if part == "encoder" else {"latent_channels": c_in, "out_channels": c_out}
    try:
        cfg = TinyAutoencoderConfig(stages=s, width=width, blocks=in_blocks // s,
                                    encoder=part == "encoder", decoder=part == "decoder", **io)
    except ValueError as e:
        raise TinyAutoencoderError(f"{what}: {e}") from None
    return part, cfg


def _merge(parts: dict[str, TinyAutoencoderConfig], where: str) -> TinyAutoencoderConfig:
    """One config for the halves found; they must agree on the latent and the network's shape."""
    cfgs = list(parts.values())
    shape = {(c.latent_channels, c.stages, c.width, c.blocks) for c in cfgs}
    if len(shape) > 1:
        desc = "; ".join(f"{p}: {c.latent_channels} latent channels, {c.stages} stages, width {c.width}, {c.blocks} blocks"
                         for p, c in parts.items())
        raise TinyAutoencoderError(f"{where}: the encoder and decoder do not fit together ({desc})")
    enc, dec = parts.get("encoder"), parts.get("decoder")
    base = dec or enc
    assert base is not None
    return dataclasses.replace(
        base, in_channels=enc.in_channels if enc else 3, out_channels=dec.out_channels if dec else 3,
        encoder=enc is not None, decoder=dec is not None,
    )


def _build(cfg: TinyAutoencoderConfig, state: Mapping[str, torch.Tensor], what: str) -> TinyAutoencoder:
    with torch.device("meta"):
        tiny = TinyAutoencoder(cfg)
    load_strict(tiny, state, what)
    return tiny.eval()


# ----------------------------------------------------------------------------- paths


def _is_diffusers(folder: Path) -> bool:
    if not (folder / "config.json").is_file():
        return False
    try:
        return read_json(folder / "config.json").get("_class_name") == DIFFUSERS_CLASS
    except CheckpointError:
        return False


def _load_diffusers(folder: Path) -> TinyAutoencoder:
    cfg = from_diffusers_tiny_config(read_json(folder / "config.json"), str(folder / "config.json"))
    weights = next((folder / n for n in DIFFUSERS_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise TinyAutoencoderError(f"{folder} is an AutoencoderTiny folder without weights ({' or '.join(DIFFUSERS_WEIGHTS)})")
    return _build(cfg, diffusers_to_taesd(read_weights(weights)), f"AutoencoderTiny weights {weights}")


def _half_files(folder: Path) -> dict[str, Path]:
    """The folder's ``*encoder*`` / ``*decoder*`` weight files, one of each at most."""
    found: dict[str, Path] = {}
    for part in PARTS:
        files = sorted(p for p in folder.iterdir() if p.is_file() and part in p.stem.lower() and p.suffix.lower() in SUFFIXES)
        stems = sorted({p.stem for p in files})
        if len(stems) > 1:
            raise TinyAutoencoderError(f"{folder} holds several TAESD {part}s ({', '.join(stems)}); give the file itself")
        if files:
            found[part] = min(files, key=lambda p: SUFFIXES.index(p.suffix.lower()))
    return found


def _read_half(path: Path) -> tuple[str, TinyAutoencoderConfig, dict[str, torch.Tensor]]:
    state = read_weights(path)
    part, cfg = part_config(state, str(path))
    return part, cfg, {f"{part}.{k}": v for k, v in state.items()}


def _load_whole_file(path: Path, state: dict[str, torch.Tensor]) -> TinyAutoencoder:
    """A file with both halves under ``encoder.`` / ``decoder.`` (opensd's or diffusers' keys)."""
    state = diffusers_to_taesd(state)
    parts = {}
    for part in PARTS:
        sub = strip_prefix(state, f"{part}.")
        if sub:
            found, cfg = part_config(sub, f"{path} ({part})")
            if found != part:
                raise TinyAutoencoderError(f"{path}: its {part} weights are laid out as a TAESD {found}")
            parts[part] = cfg
    return _build(_merge(parts, str(path)), state, str(path))


def load_tiny_autoencoder(path: str | Path) -> TinyAutoencoder:
    """A :class:`TinyAutoencoder` (float32, eval mode) from any layout in the module doc."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TinyAutoencoderError(f"tiny autoencoder not found: {path}")
    if path.is_dir():
        if _is_diffusers(path):
            return _load_diffusers(path)
        files = _half_files(path)
        if not files:
            raise TinyAutoencoderError(
                f"{path} holds no tiny autoencoder: expected TAESD files (taesd_decoder.pth / .safetensors, "
                f"taesd_encoder...) or a diffusers AutoencoderTiny folder (config.json with \"_class_name\": \"{DIFFUSERS_CLASS}\")"
            )
        halves = {name: _read_half(p) for name, p in files.items()}
        for name, (part, _, _) in halves.items():
            if part != name:
                raise TinyAutoencoderError(f"{files[name]} is named a TAESD {name} but holds a {part}")
        cfg = _merge({name: c for name, (_, c, _) in halves.items()}, str(path))
        state = {k: v for _, _, s in halves.values() for k, v in s.items()}
        return _build(cfg, state, ", ".join(str(p) for p in files.values()))
    if path.suffix.lower() not in SUFFIXES:
        raise TinyAutoencoderError(f"{path}: not a TAESD file; give a {', '.join(SUFFIXES)} file, a folder of them "
                                   "or a diffusers AutoencoderTiny folder")
    state = read_weights(path)
    if all(k.split(".", 1)[0] in PARTS for k in state):
        return _load_whole_file(path, state)
    part, cfg = part_config(state, str(path))
    return _build(cfg, {f"{part}.{k}": v for k, v in state.items()}, str(path))


def save_tiny_autoencoder(tiny: TinyAutoencoder, folder: str | Path, dtype: torch.dtype | None = None) -> list[Path]:
    """Write each half as an original TAESD file (``taesd_encoder.safetensors``,
    ``taesd_decoder.safetensors``) in ``folder``; ``dtype`` (e.g. float16) stores the
    weights in that type. Returns the files written."""
    folder = Path(folder)
    if tiny.cfg.scaling_factor != 1.0 or tiny.cfg.shift_factor != 0.0:
        raise TinyAutoencoderError("the original TAESD files carry no latent scale or shift; "
                                   "this tiny autoencoder has scaling_factor != 1 or shift_factor != 0")
    out = []
    for part in PARTS:
        module = getattr(tiny, part)
        if module is None:
            continue
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in module.state_dict().items()}
        write_safetensors(state, folder / FILE_NAMES[part])
        out.append(folder / FILE_NAMES[part])
    return out


def tiny_autoencoder_beside(model_path: str | Path) -> TinyAutoencoder | None:
    """The tiny autoencoder saved in a model's folder (``taesd_decoder.safetensors``, with or
    without the encoder), or None when there is none (or the model is a single file)."""
    folder = Path(model_path)
    if not folder.is_dir() or not (folder / FILE_NAMES["decoder"]).is_file():
        return None
    encoder = folder / FILE_NAMES["encoder"]
    halves = [_read_half(folder / FILE_NAMES["decoder"])] + ([_read_half(encoder)] if encoder.is_file() else [])
    cfg = _merge({part: c for part, c, _ in halves}, str(folder))
    return _build(cfg, {k: v for _, _, s in halves for k, v in s.items()}, f"the tiny autoencoder in {folder}")
