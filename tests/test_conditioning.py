"""The conditioning path of every family: prompts -> dicts of named tensors -> the U-Net."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import tiny_family_model

from opensd.config import ConfigError
from opensd.models.layers import timestep_embedding
from opensd.models.stable_diffusion import ModelFamily, SDConfig, StableDiffusion
from opensd.models.unet import UNetConfig, UNetModel
from opensd.pipelines.conditioning import OPEN_CLIP_PAD_ID, Conditioner, repad
from opensd.pipelines.request import GenerationRequest, RequestError


def _bundle(family: ModelFamily, seed: int = 0):
    return tiny_family_model(family, seed)


@pytest.fixture(scope="module", params=list(ModelFamily), ids=lambda f: f.value)
def bundle(request):
    return _bundle(request.param)


def test_full_size_presets_have_the_published_parameter_counts() -> None:
    counts = {}
    for name in ("sd15", "sd21", "sdxl", "sdxl_refiner"):
        with torch.device("meta"):
            counts[name] = StableDiffusion(getattr(SDConfig, name)()).parameter_counts()
    assert counts["sd15"]["unet"] == 859_520_964
    assert counts["sd21"]["unet"] == 865_910_724
    assert counts["sdxl"]["unet"] == 2_567_463_684
    assert counts["sdxl"]["text_encoder"] == 123_060_480  # CLIP ViT-L
    assert counts["sdxl"]["text_encoder_2"] == 694_659_841  # OpenCLIP ViT-bigG with its projection
    assert counts["sdxl_refiner"]["text_encoder"] == 694_659_841


def test_module_paths_are_the_original_keys_of_each_family() -> None:
    prefixes = {}
    for name in ("sd15", "sd21", "sdxl", "sdxl_refiner"):
        with torch.device("meta"):
            m = StableDiffusion(getattr(SDConfig, name)())
        keys = set(m.state_dict())
        prefixes[name] = m.text_prefixes
        assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert prefixes["sd15"] == ["cond_stage_model.transformer."]
    assert prefixes["sd21"] == ["cond_stage_model.model."]
    assert prefixes["sdxl"] == ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."]
    assert prefixes["sdxl_refiner"] == ["conditioner.embedders.0.model."]
    with torch.device("meta"):
        xl = set(StableDiffusion(SDConfig.sdxl()).state_dict())
    assert {"model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.weight"} <= xl
    assert "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight" in xl
    assert "conditioner.embedders.1.model.text_projection" in xl
    # SDXL: no attention at the first level, 10 blocks deep at the third
    assert not any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in xl)
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight" in xl
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.10.attn2.to_k.weight" not in xl


def test_family_configs_are_checked() -> None:
    with pytest.raises(ConfigError, match="text_2"):
        SDConfig.tiny().replace(text_2=SDConfig.tiny(ModelFamily.SDXL).text_2)
    with pytest.raises(ConfigError, match="adm_in_channels"):
        xl = SDConfig.tiny(ModelFamily.SDXL)
        xl.replace(unet=dataclasses.replace(xl.unet, adm_in_channels=7))
    with pytest.raises(ConfigError, match="context_dim"):
        xl = SDConfig.tiny(ModelFamily.SDXL)
        xl.replace(unet=dataclasses.replace(xl.unet, context_dim=xl.text.width))
    with pytest.raises(ConfigError, match="transformer_depth"):
        UNetConfig.tiny().__class__(**{**dataclasses.asdict(UNetConfig.tiny()), "transformer_depth": (1, 2, 3)})
    with pytest.raises(ConfigError, match="transformer_depth 0"):
        dataclasses.replace(UNetConfig.tiny(), transformer_depth=(1, 0))


def test_unet_takes_y_only_when_it_has_label_emb() -> None:
    xl = UNetModel(SDConfig.tiny(ModelFamily.SDXL).unet).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0])
    ctx = torch.randn(2, 5, xl.cfg.context_dim)
    y = torch.randn(2, xl.cfg.adm_in_channels)
    with torch.no_grad():
        a, b = xl(x, t, ctx, y), xl(x, t, ctx, y * 2)
    assert a.shape == x.shape and not torch.allclose(a, b)  # y reaches the output
    with pytest.raises(ValueError, match="y must be"):
        xl(x, t, ctx)
    sd1 = UNetModel(UNetConfig.tiny())
    with pytest.raises(ValueError, match="takes no y"):
        sd1(x, t, torch.randn(2, 5, 32), y)


def test_repad_sets_everything_after_the_first_eos() -> None:
    ids = torch.tensor([[1, 5, 9, 9, 9], [1, 9, 9, 9, 9], [1, 4, 4, 4, 9]])
    assert repad(ids, 9, 0).tolist() == [[1, 5, 9, 0, 0], [1, 9, 0, 0, 0], [1, 4, 4, 4, 9]]


def test_each_family_conditions_with_its_keys_and_widths(bundle) -> None:
    model, tok = bundle
    cfg = model.cfg
    cond = Conditioner(model, tok)
    req = GenerationRequest("a red circle", "a blue square", width=48, height=32, batch_size=2)
    with torch.no_grad():
        c, u = cond.for_request(req)
    expect = {"context"} if cfg.adm_channels is None else {"context", "y"}
    assert set(c) == set(u) == expect
    assert c["context"].shape == (2, 77, cfg.context_dim)
    if "y" in c:
        assert c["y"].shape == u["y"].shape == (2, cfg.adm_channels)
        # y = [pooled, Fourier(size numbers)]; the size part is the request's
        p = cfg.pooled_dim
        numbers = [32, 48, 0, 0, 32, 48] if cfg.family is ModelFamily.SDXL else [32, 48, 0, 0, 6.0]
        want = timestep_embedding(torch.tensor(numbers, dtype=torch.float32), cfg.size_embed_dim).reshape(-1)
        torch.testing.assert_close(c["y"][0, p:], want)
        if cfg.family is ModelFamily.SDXL_REFINER:  # the negative branch gets the negative aesthetic score
            assert not torch.equal(c["y"][0, p:], u["y"][0, p:])
    with torch.no_grad():
        c1, none = cond.for_request(dataclasses.replace(req, cfg_scale=1.0))
    assert none is None and torch.equal(c1["context"], c["context"])


def test_sdxl_context_is_both_encoders_penultimate_layers_and_pooled_is_bigg() -> None:
    model, tok = _bundle(ModelFamily.SDXL)
    ids = tok(["a red circle"])  # (1, 77) padded with eos
    te1, te2 = model.text_encoders
    with torch.no_grad():
        text = Conditioner(model, tok).encode(["a red circle"])
        h1 = te1(ids, skip_layers=1, final_norm=False)
        ids2 = repad(ids, tok.eos_id, OPEN_CLIP_PAD_ID)
        h2, pooled = te2.hidden_and_pooled(ids2, 1)
    assert int((ids2 == 0).sum()) == 77 - 5  # bos, 3 tokens, eos, then OpenCLIP's zero padding
    torch.testing.assert_close(text.context, torch.cat([h1, h2], dim=-1))
    torch.testing.assert_close(text.pooled, pooled)


def test_sdxl_empty_negative_prompt_is_zeros_and_a_given_one_is_not() -> None:
    model, tok = _bundle(ModelFamily.SDXL)
    cond = Conditioner(model, tok)
    with torch.no_grad():
        _, u = cond.for_request(GenerationRequest("a red circle"))
        _, u2 = cond.for_request(GenerationRequest("a red circle", "blue"))
    assert not u["context"].any() and not u["y"][:, : model.cfg.pooled_dim].any()
    assert u2["context"].abs().sum() > 0


def test_long_prompts_take_the_first_chunks_pooled_embedding() -> None:
    model, tok = _bundle(ModelFamily.SDXL)
    cond = Conditioner(model, tok)
    with torch.no_grad():
        both = cond.encode(["a red circle BREAK a blue square"])
        first = cond.encode(["a red circle"])
    assert both.context.shape[1] == 2 * 77
    torch.testing.assert_close(both.pooled, first.pooled)
    torch.testing.assert_close(both.context[:, :77], first.context)
    with torch.no_grad():  # chunk by chunk (should_stop) gives the same
        stepwise = cond.encode(["a red circle BREAK a blue square"], should_stop=lambda: False)
    torch.testing.assert_close(stepwise.context, both.context)


def test_given_embeddings_must_fit_the_family() -> None:
    model, tok = _bundle(ModelFamily.SDXL)
    cond = Conditioner(model, tok)
    req = GenerationRequest("x", cfg_scale=1.0)
    ctx = torch.zeros(1, 77, model.cfg.context_dim)
    with pytest.raises(RequestError, match="'context' and 'pooled'"):
        cond.for_request(req, prompt_embeds=ctx)
    c, _ = cond.for_request(req, prompt_embeds={"context": ctx, "pooled": torch.ones(1, model.cfg.pooled_dim)})
    assert c["y"][0, : model.cfg.pooled_dim].eq(1).all()


def test_clip_skip_is_a_warning_outside_sd1(tmp_path) -> None:
    from opensd.checkpoints.opensd_format import save_opensd
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

    model, tok = _bundle(ModelFamily.SD2)
    save_opensd(model, tok, tmp_path / "m")
    pipe = StableDiffusionPipeline.from_path(tmp_path / "m")
    a = pipe.generate(pipe.request("a red circle", steps=2, seed=1, clip_skip=2))
    b = pipe.generate(pipe.request("a red circle", steps=2, seed=1))
    assert any("clip skip has no effect" in w for w in a.warnings) and not b.warnings
    assert a.images[0].tobytes() == b.images[0].tobytes()


@pytest.mark.parametrize("name", ["original_size", "crop_top_left"])
def test_size_conditioning_fields_are_validated(name) -> None:
    from opensd.pipelines.request import validate

    with pytest.raises(RequestError, match=name):
        validate(GenerationRequest("x", **{name: (0, -5)}))
    with pytest.raises(RequestError, match="aesthetic_score"):
        validate(GenerationRequest("x", aesthetic_score=float("nan")))


def test_sd2_conditions_on_zero_padding_whatever_the_tokenizer_pads_with() -> None:
    from opensd.tokenizers.clip_bpe import CLIPTokenizer

    model, eos_padded = _bundle(ModelFamily.SD2)
    zero_padded = CLIPTokenizer.from_open_clip(pad_token="!")
    with torch.no_grad():
        a = Conditioner(model, eos_padded).encode(["a red (circle:1.3)"]).context
        b = Conditioner(model, zero_padded).encode(["a red (circle:1.3)"]).context
        ids = zero_padded(["a red circle"])
        direct = model.text_encoder(ids, skip_layers=1)  # penultimate block through ln_final
    assert int((ids == 0).sum()) == 77 - 5
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(Conditioner(model, eos_padded).encode(["a red circle"]).context, direct)
