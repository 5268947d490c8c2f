"""Building the model a file's configuration describes, before its weights are loaded.

A configuration read from disk is untrusted: its values may be of the right types and
still describe no network (channels not divisible by the norm groups, a zero width), or
one so deep that only building it would take minutes. :func:`build_on_meta` builds the
:class:`~opensd.models.stable_diffusion.StableDiffusion` on the meta device (no memory
for weights) and turns every such problem into a one-line :class:`CheckpointError`
naming the file. :func:`tokenizer_for` reads the tokenizer beside it and checks that it
fits the text encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from opensd.checkpoints.io import CheckpointError
from opensd.models.stable_diffusion import SDConfig, StableDiffusion
from opensd.tokenizers import Tokenizer, TokenizerError, WordPieceTokenizer, load_tokenizer


def _depths(cfg: SDConfig) -> dict[str, int]:
    """How many repeated blocks each network of ``cfg`` has (each holds at least one tensor)."""
    u, v = cfg.unet, cfg.vae
    return {
        "unet": sum((u.num_res_blocks + 1) * max(u.depth_at(lv), 1) for lv in range(len(u.channel_mult))),
        "vae": len(v.ch_mult) * (v.num_res_blocks + 1),
        "text encoder": sum(t.layers for t in cfg.text_configs),
    }


# The dtype a model's floating-point weights load in: a dtype, or a function of the model's
# configuration that picks one (how precision "auto" sees the model before a weight is read); None: float32.
WeightsDtype = torch.dtype | Callable[[SDConfig], torch.dtype] | None


def weights_dtype(dtype: WeightsDtype, cfg: SDConfig) -> torch.dtype:
    """The floating-point dtype ``dtype`` names for a model of ``cfg``."""
    chosen = dtype(cfg) if callable(dtype) else dtype
    if chosen is None:
        return torch.float32
    if not isinstance(chosen, torch.dtype) or not chosen.is_floating_point:
        raise TypeError(f"a model's weights need a floating-point torch dtype, got {chosen!r}")
    return chosen


def build_on_meta(cfg: SDConfig, n_tensors: int, where: str | Path, dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """``StableDiffusion(cfg)`` on the meta device, its floating-point tensors in ``dtype``,
    for a weight file of ``n_tensors`` tensors.

    A network with more blocks than the file has tensors cannot fit it, and is refused
    before it is built. Any error the model's constructors raise for ``cfg`` is the
    configuration's fault, and reported as such.
    """
    for net, blocks in _depths(cfg).items():
        if blocks > n_tensors:
            raise CheckpointError(
                f"{where}: the configuration's {net} has {blocks} blocks, more than the {n_tensors} "
                "tensors of its weights: the configuration does not describe these weights"
            )
    try:
        with torch.device("meta"):
            model = StableDiffusion(cfg)
        return model if dtype == torch.float32 else model.to(dtype)  # no memory: only the tensors' metadata
    except CheckpointError:
        raise
    except Exception as e:  # the values of an untrusted config: whatever the constructors refuse
        text = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(f"{where}: the configuration describes no valid model: {text}") from None


def tokenizer_for(folder: Path, cfg: SDConfig) -> Tokenizer:
    """The tokenizer in ``folder``, checked against the text encoder it feeds.

    Its ids must index the encoder's embedding and its context fit the encoder's
    positions; a broken tokenizer file is a :class:`CheckpointError` naming the file.
    """
    try:
        tok = load_tokenizer(folder)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    if cfg.has_bert and not isinstance(tok, WordPieceTokenizer):
        raise CheckpointError(f"{folder}: the text encoder is a BERT, which needs a WordPiece tokenizer (vocab.txt), "
                              f"got {type(tok).__name__}")
    if tok.vocab_size > cfg.text.vocab_size:
        raise CheckpointError(
            f"{folder}: the tokenizer has {tok.vocab_size} tokens, the text encoder only {cfg.text.vocab_size}"
        )
    if tok.context_length > cfg.text.max_length:
        raise CheckpointError(
            f"{folder}: the tokenizer's context of {tok.context_length} tokens exceeds the text encoder's "
            f"{cfg.text.max_length} positions"
        )
    return tok
