"""CLIP text transformer: parity with transformers' CLIPTextModel, presets, configs, errors."""

from __future__ import annotations

import pytest
import torch
import transformers

from opensd.checkpoints.keymap_clip import (
    SD1_PREFIX,
    clip_key_map,
    clip_key_names,
    from_transformers_clip_config,
    from_transformers_clip_state_dict,
    to_transformers_clip_config,
)
from opensd.config import ConfigError, from_dict, to_dict
from opensd.models.clip import Activation, CLIPTextConfig, CLIPTextModel

GELU_CFG = CLIPTextConfig(
    vocab_size=120, max_length=20, width=48, layers=3, heads=3, mlp_width=96,
    activation=Activation.GELU, layer_norm_eps=1e-6,
)  # fmt: skip
CONFIGS = [pytest.param(CLIPTextConfig.tiny(), id="tiny-quick_gelu"), pytest.param(GELU_CFG, id="gelu")]


def make_pair(cfg: CLIPTextConfig, *, eos_token_id: int | None = None, seed: int = 0):
    """Ours and transformers' CLIPTextModel with the same random weights (LayerNorms perturbed)."""
    torch.manual_seed(seed)
    ours = CLIPTextModel(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    hf_cfg = to_transformers_clip_config(cfg, eos_token_id=eos_token_id)
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(**hf_cfg)).eval()
    hf_sd = hf.state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in hf_sd) else ""
    mapped = {prefix + k.removeprefix("text_model."): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    return ours, hf


def random_ids(cfg: CLIPTextConfig, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=g)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("length_of", [lambda c: c.max_length, lambda c: c.max_length // 2 + 1], ids=["full", "short"])
def test_last_hidden_state_matches_transformers(cfg: CLIPTextConfig, length_of) -> None:
    ours, hf = make_pair(cfg)
    ids = random_ids(cfg, 3, length_of(cfg))
    with torch.no_grad():
        got = ours(ids)
        ref = hf(input_ids=ids).last_hidden_state
    assert got.shape == (3, ids.shape[1], cfg.width)
    assert (got - ref).abs().max().item() <= 1e-4
    assert ref.abs().mean().item() > 0.1  # the comparison is not between near-zero tensors


@pytest.mark.parametrize("cfg", CONFIGS)
def test_clip_skip_matches_penultimate_hidden_state(cfg: CLIPTextConfig) -> None:
    ours, hf = make_pair(cfg)
    ids = random_ids(cfg, 2, cfg.max_length, seed=2)
    with torch.no_grad():
        got = ours(ids, skip_layers=1)
        out = hf(input_ids=ids, output_hidden_states=True)
        final_ln = hf.text_model.final_layer_norm if hasattr(hf, "text_model") else hf.final_layer_norm
        ref = final_ln(out.hidden_states[-2])
        last = ours(ids)
    assert len(out.hidden_states) == cfg.layers + 1
    assert (got - ref).abs().max().item() <= 1e-4
    assert (got - last).abs().max().item() > 1e-2  # skipping a layer changes the output


def _ids_with_eos(cfg: CLIPTextConfig, eos: int, positions: list[int]) -> torch.Tensor:
    """Rows of random non-eos ids, eos at ``positions[b]`` and as padding after it."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size - 2, (len(positions), cfg.max_length), generator=g)
    ids[ids == eos] = eos + 1
    for b, pos in enumerate(positions):
        ids[b, pos:] = eos
    return ids


@pytest.mark.parametrize("cfg", CONFIGS)
def test_pooled_matches_transformers_legacy_argmax(cfg: CLIPTextConfig) -> None:
    # eos_token_id == 2 in config.json (SD1.5's text_encoder): transformers pools at argmax(input_ids),
    # which is the first eos when eos is the largest id.
    ours, hf = make_pair(cfg, eos_token_id=2)
    eos = cfg.vocab_size - 1
    ids = _ids_with_eos(cfg, eos, [3, cfg.max_length - 1, 1])
    with torch.no_grad():
        hidden = ours(ids)
        ref = hf(input_ids=ids).pooler_output
    got = CLIPTextModel.pooled(hidden, ids, eos)
    assert got.shape == (3, cfg.width)
    assert (got - ref).abs().max().item() <= 1e-4
    assert (got - hidden[:, -1]).abs().max().item() > 1e-2  # not simply the last position


@pytest.mark.parametrize("cfg", CONFIGS)
def test_pooled_matches_transformers_eos_token_id(cfg: CLIPTextConfig) -> None:
    eos = 5  # not the largest id: transformers looks for the first eos_token_id
    ours, hf = make_pair(cfg, eos_token_id=eos)
    ids = _ids_with_eos(cfg, eos, [2, 7, cfg.max_length - 1])
    ids[:, 0] = cfg.vocab_size - 1  # a larger id before eos: argmax pooling would be wrong
    with torch.no_grad():
        hidden = ours(ids)
        ref = hf(input_ids=ids).pooler_output
    got = CLIPTextModel.pooled(hidden, ids, eos)
    assert (got - ref).abs().max().item() <= 1e-4
    assert (got - hidden[:, 0]).abs().max().item() > 1e-2


def test_pooled_errors() -> None:
    hidden = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="no eos"):
        CLIPTextModel.pooled(hidden, torch.tensor([[1, 2, 9, 9], [1, 2, 3, 4]]), 9)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        CLIPTextModel.pooled(hidden, torch.zeros(2, 5, dtype=torch.long), 9)


def test_sd15_preset_matches_vit_l14_text_keys_and_shapes() -> None:
    cfg = CLIPTextConfig.sd15()
    hf_cfg = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, projection_dim=768,
    )  # fmt: skip
    with torch.device("meta"):
        ours = CLIPTextModel(cfg)
        hf = transformers.CLIPTextModel(hf_cfg)
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480
    sd = ours.state_dict()
    assert len(sd) == 196
    assert not any("position_ids" in k for k in sd)
    ref = {k: tuple(v.shape) for k, v in from_transformers_clip_state_dict(hf.state_dict()).items()}
    assert {k: tuple(v.shape) for k, v in sd.items()} == ref
    assert list(sd) == clip_key_names(cfg)
    sd1_keys = clip_key_map(cfg, prefix=SD1_PREFIX)
    key = "text_model.final_layer_norm.weight"
    assert sd1_keys[key] == "cond_stage_model.transformer." + key
    assert len(set(sd1_keys.values())) == 196


def test_small_preset_size() -> None:
    with torch.device("meta"):
        n = sum(p.numel() for p in CLIPTextModel(CLIPTextConfig.small()).parameters())
    assert 1_000_000 <= n <= 4_000_000


def test_state_dict_from_transformers_both_key_spellings() -> None:
    cfg = CLIPTextConfig.tiny()
    sd = CLIPTextModel(cfg).state_dict()
    unprefixed = {k.removeprefix("text_model."): v for k, v in sd.items()}
    unprefixed["embeddings.position_ids"] = torch.arange(cfg.max_length)[None]
    for source in (sd, unprefixed):
        converted = from_transformers_clip_state_dict(source)
        assert list(converted) == list(sd)
        CLIPTextModel(cfg).load_state_dict(converted, strict=True)


@pytest.mark.parametrize("cfg", [CLIPTextConfig.sd15(), CLIPTextConfig.small(), GELU_CFG])
def test_transformers_config_round_trip(cfg: CLIPTextConfig) -> None:
    d = to_transformers_clip_config(cfg)
    hf_cfg = transformers.CLIPTextConfig(**d)
    assert hf_cfg.hidden_size == cfg.width and hf_cfg.hidden_act == cfg.activation.value
    assert (hf_cfg.bos_token_id, hf_cfg.eos_token_id) == (cfg.vocab_size - 2, cfg.vocab_size - 1)
    assert from_transformers_clip_config(hf_cfg.to_dict()) == cfg
    assert from_transformers_clip_config({"model_type": "clip", "text_config": d}) == cfg
    assert from_dict(CLIPTextConfig, to_dict(cfg)) == cfg


def test_sd15_text_encoder_config_json() -> None:
    # The text_encoder/config.json of SD1.5 (legacy token ids, "dropout" keys and all).
    d = {
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
        "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
        "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
    }  # fmt: skip
    assert from_transformers_clip_config(d) == CLIPTextConfig.sd15()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 30, "heads": 4}, "divisible by heads"),
        ({"layers": 0}, "layers must be a positive integer"),
        ({"vocab_size": 1.5}, "vocab_size must be a positive integer"),
        ({"activation": "gelu"}, "activation must be an Activation"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
    ],
)
def test_bad_config_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CLIPTextConfig(**kwargs)


def test_bad_config_dicts_raise() -> None:
    with pytest.raises(ConfigError, match="'gelu_new' is not allowed"):
        from_dict(CLIPTextConfig, {"activation": "gelu_new"})
    with pytest.raises(ConfigError, match="unsupported hidden_act 'gelu_new'"):
        from_transformers_clip_config({"model_type": "clip_text_model", "hidden_act": "gelu_new"})
    with pytest.raises(ConfigError, match="unsupported text encoder model_type 't5'"):
        from_transformers_clip_config({"model_type": "t5"})
    with pytest.raises(ConfigError, match="eos_token_id must be an integer in 0..98"):
        to_transformers_clip_config(CLIPTextConfig.tiny(), eos_token_id=99)


def test_bad_forward_input_raises() -> None:
    cfg = CLIPTextConfig.tiny()
    model = CLIPTextModel(cfg)
    with pytest.raises(ValueError, match=r"\(B, L\) tensor"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="length 17 must be in 1..16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="skip_layers must be an integer in 0..1"):
        model(torch.zeros(1, 4, dtype=torch.long), skip_layers=2)
