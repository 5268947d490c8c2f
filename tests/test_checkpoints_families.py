"""Original single files of every family: layouts diffusers agrees with, tiny round trips,
the parameterization (metadata, marker, A1111's probe, override), and clear refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import clip_tokenizer, randomize
from typer.testing import CliRunner

from opensd.checkpoints import CheckpointError, LoadedModel, StateDictMismatch, load_model
from opensd.checkpoints import original as original_mod
from opensd.checkpoints.families import detect_family, original_tokenizer
from opensd.checkpoints.io import write_safetensors
from opensd.checkpoints.original import infer_config, read_original, save_original
from opensd.cli.main import app
from opensd.diffusion.schedules import Prediction
from opensd.models.stable_diffusion import ModelFamily, SDConfig, StableDiffusion
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

FULL = {ModelFamily.SD2: SDConfig.sd21, ModelFamily.SDXL: SDConfig.sdxl, ModelFamily.SDXL_REFINER: SDConfig.sdxl_refiner}
DIFFUSERS_TYPE = {ModelFamily.SD2: "v2", ModelFamily.SDXL: "xl_base", ModelFamily.SDXL_REFINER: "xl_refiner"}
OPEN_CLIP_PREFIX = {ModelFamily.SD2: "cond_stage_model.model.", ModelFamily.SDXL: "conditioner.embedders.1.model.",
                    ModelFamily.SDXL_REFINER: "conditioner.embedders.0.model."}
VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
       "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
# the U-Net params of the released LDM/SGM yaml files (v2-inference-v, sd_xl_base, sd_xl_refiner)
LDM_UNET = {
    ModelFamily.SD2: {"in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
                      "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_head_channels": 64,
                      "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 1024},
    ModelFamily.SDXL: {"adm_in_channels": 2816, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
                       "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 4],
                       "num_head_channels": 64, "use_linear_in_transformer": True, "transformer_depth": [1, 2, 10],
                       "context_dim": 2048},
    ModelFamily.SDXL_REFINER: {"adm_in_channels": 2560, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
                               "model_channels": 384, "attention_resolutions": [4, 2], "num_res_blocks": 2,
                               "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_linear_in_transformer": True,
                               "transformer_depth": 4, "context_dim": [1280, 1280, 1280, 1280]},
}


def names(sd) -> dict[str, tuple[int, ...]]:  # transformers 5 drops the `text_model.` base prefix of its state dict
    return {k.removeprefix("text_model."): tuple(v.shape) for k, v in sd.items() if not k.endswith("position_ids")}


def _hf_text(width: int, layers: int, heads: int, mlp: int, act: str, projection: int | None):
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = HFConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                   max_position_embeddings=77, vocab_size=49408, hidden_act=act, projection_dim=projection or width)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


@pytest.mark.parametrize("family", list(FULL), ids=lambda f: f.value)
def test_full_size_layouts_are_what_diffusers_single_file_code_reads(family: ModelFamily) -> None:
    """diffusers names the family we build, and its own converters map every U-Net, VAE and text
    key of our full-size state dict onto its models (meta device: shapes, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    cfg = FULL[family]()
    original = {"model": {"params": {"unet_config": {"params": LDM_UNET[family]},
                                     "first_stage_config": {"params": {"ddconfig": VAE}}}}}
    with torch.device("meta"):
        state = StableDiffusion(cfg).state_dict()
        assert sfu.infer_diffusers_model_type(state) == DIFFUSERS_TYPE[family]
        assert detect_family(state) is family
        assert infer_config(state).replace(image_size=cfg.image_size, schedule=cfg.schedule) == cfg
        # U-Net: one diffusers tensor per original tensor, the very objects
        unet_cfg = sfu.create_unet_diffusers_config_from_ldm(original, state)
        unet = sfu.convert_ldm_unet_checkpoint(state, unet_cfg)
        assert names(unet) == names(UNet2DConditionModel(**unet_cfg).state_dict())
        ours = [v for k, v in state.items() if k.startswith("model.diffusion_model.")]
        assert {id(v) for v in unet.values()} == {id(v) for v in ours} and len(unet) == len(ours)
        # VAE
        vae_cfg = sfu.create_vae_diffusers_config_from_ldm(original, state, scaling_factor=cfg.vae.scale_factor)
        vae = sfu.convert_ldm_vae_checkpoint(state, vae_cfg)
        assert names(vae) == names(AutoencoderKL(**vae_cfg).state_dict())
        assert len(vae) == sum(k.startswith("first_stage_model.") for k in state)
        # OpenCLIP: q, k, v split out of in_proj; diffusers' SD 2 text model (no projection) drops the
        # unused last block and text_projection, and no diffusers model holds logit_scale
        t = cfg.text_configs[-1]
        prefix = OPEN_CLIP_PREFIX[family]
        sd2 = family is ModelFamily.SD2
        hf = _hf_text(t.width, t.layers - sd2, t.heads, t.mlp_width, "gelu", None if sd2 else t.projection_dim)
        text = sfu.convert_open_clip_checkpoint(hf, state, prefix=prefix)
        assert names(text) == names(hf.state_dict())
        ignored = set(sfu.SD_2_TEXT_ENCODER_KEYS_TO_IGNORE) | {prefix + "logit_scale"}
        own = [k for k in state if k.startswith(prefix)]
        assert ignored <= set(own) if sd2 else ignored & set(own) == {prefix + "logit_scale"}
        assert len(text) == sum(3 if k.endswith(("in_proj_weight", "in_proj_bias")) else 1 for k in own if k not in ignored)
        if family is ModelFamily.SDXL:  # the first encoder: CLIP ViT-L, every key as it is
            clip = sfu.convert_ldm_clip_checkpoint(state)
            hf_l = _hf_text(768, 12, 12, 3072, "quick_gelu", None)
            assert names(clip) == names(hf_l.state_dict())
            first = [v for k, v in state.items() if k.startswith("conditioner.embedders.0.")]
            assert {id(v) for v in clip.values()} == {id(v) for v in first}


def test_inpainting_and_depth_unets_of_sd2() -> None:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    cfg = SDConfig.sd21()
    with torch.device("meta"):
        state = StableDiffusion(cfg.replace(unet=dataclasses.replace(cfg.unet, in_channels=9))).state_dict()
        assert infer_diffusers_model_type(state) == "inpainting_v2"
        assert infer_config(state).unet.in_channels == 9
        state["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(320, 5, 3, 3)
        with pytest.raises(CheckpointError, match="5 input channels.*depth model"):
            infer_config(state)


# ----------------------------------------------------------------------------- tiny files


def tiny(family: ModelFamily, seed: int = 0) -> StableDiffusion:
    """A tiny random model of ``family`` with the real CLIP vocabulary (so its tokenizer fits)."""
    cfg = SDConfig.tiny(family)
    real = {"vocab_size": 49408, "max_length": 77}
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, **real),
                      **({"text_2": dataclasses.replace(cfg.text_2, **real)} if cfg.text_2 else {}))
    torch.manual_seed(seed)
    return randomize(StableDiffusion(cfg), seed).eval()


@pytest.fixture
def tiny_presets(monkeypatch):
    """infer_config's presets replaced by the tiny configs, so that load_model infers tiny files."""
    for family in ModelFamily:
        monkeypatch.setitem(original_mod.PRESETS, family, lambda f=family: tiny(f).cfg)


def _image(model: StableDiffusion, family: ModelFamily):
    loaded = LoadedModel(model, original_tokenizer(family), "m", Path("."), "original", "0" * 10)
    pipe = StableDiffusionPipeline(loaded)
    return pipe.txt2img("a red circle", "a square", steps=2, seed=3, width=32, height=32)[0]


@pytest.mark.parametrize("family", list(ModelFamily), ids=lambda f: f.value)
def test_tiny_original_files_load_back_with_identical_outputs(family: ModelFamily, tmp_path: Path, tiny_presets) -> None:
    model = tiny(family)
    save_original(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.model.cfg.family is family and loaded.format == "original"
    assert loaded.model.cfg.unet == model.cfg.unet and loaded.model.cfg.text_configs == model.cfg.text_configs
    assert loaded.parameterization.prediction is Prediction.EPS  # save_original wrote it in the metadata
    again = loaded.model
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert _image(again, family).tobytes() == _image(model, family).tobytes()


def test_tokenizer_per_family() -> None:
    eos, bang = "<|endoftext|>", "!"
    pads = {f: original_tokenizer(f).pad_token for f in ModelFamily}
    assert pads == {ModelFamily.SD1: eos, ModelFamily.SD2: bang, ModelFamily.SDXL: eos, ModelFamily.SDXL_REFINER: bang}
    assert original_tokenizer(ModelFamily.SD2)(["a"])[0, -1].item() == 0
    assert original_tokenizer(ModelFamily.SD1)(["a"])[0, -1].item() == clip_tokenizer().eos_id


def test_non_network_entries_are_set_aside_and_the_rest_is_strict(tmp_path: Path) -> None:
    for family, extras in (
        (ModelFamily.SD2, {"alphas_cumprod": torch.ones(1000), "model_ema.num_updates": torch.tensor(3),
                           "cond_stage_model.model.attn_mask": torch.zeros(77, 77)}),
        (ModelFamily.SDXL, {"denoiser.sigmas": torch.ones(1000), "model_ema.decay": torch.tensor(0.9),
                            "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}),
    ):
        model = tiny(family)
        write_safetensors({**model.state_dict(), **extras}, tmp_path / "x.safetensors")
        again = read_original(tmp_path / "x.safetensors", config=model.cfg).model
        assert set(again.state_dict()) == set(model.state_dict())
        write_safetensors({**model.state_dict(), "model.diffusion_model.extra.weight": torch.ones(1)}, tmp_path / "y.safetensors")
        with pytest.raises(StateDictMismatch, match="1 unexpected key.*extra.weight"):
            read_original(tmp_path / "y.safetensors", config=model.cfg)


# ----------------------------------------------------------------------------- parameterization


def forced_sd2(bias: float) -> StableDiffusion:
    """A tiny SD 2 model whose U-Net outputs the constant ``bias`` (all other weights 0)."""
    model = tiny(ModelFamily.SD2)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.zero_()
        model.unet.out[2].bias.fill_(bias)
    return model


def write(model: StableDiffusion, path: Path, metadata: dict | None = None, **extra: torch.Tensor) -> Path:
    write_safetensors({**model.state_dict(), **extra}, path, metadata=metadata)
    return path


def test_a1111_probe_tells_v_from_eps_on_sd2(tmp_path: Path, tiny_presets) -> None:
    # out = -2 everywhere: mean(out - x) = -2.5 < -1 -> v;  out = 0: -0.5 -> eps
    v = load_model(write(forced_sd2(-2.0), tmp_path / "v.safetensors"))
    assert v.parameterization.prediction is Prediction.V and "probe" in v.parameterization.source
    assert v.model.cfg.schedule.prediction is Prediction.V and v.model.cfg.image_size == 768
    eps = load_model(write(forced_sd2(0.0), tmp_path / "eps.safetensors"))
    assert eps.parameterization.prediction is Prediction.EPS and "-0.50" in eps.parameterization.source
    assert eps.model.cfg.schedule.prediction is Prediction.EPS and eps.model.cfg.image_size == 512


def test_metadata_marker_and_override_in_their_order(tmp_path: Path, tiny_presets) -> None:
    probe_v = forced_sd2(-2.0)
    cases = [  # (metadata, extra keys, override, expected, words of the source)
        ({"modelspec.prediction_type": "epsilon"}, {}, None, Prediction.EPS, "modelspec.prediction_type"),
        ({"modelspec.architecture": "stable-diffusion-v2-512"}, {}, None, Prediction.EPS, "architecture"),
        ({"ss_v_parameterization": "False"}, {}, None, Prediction.EPS, "ss_v_parameterization"),
        ({"modelspec.prediction_type": "v"}, {"v_pred": torch.tensor([])}, Prediction.EPS, Prediction.EPS, "caller"),
    ]
    for meta, extra, override, want, words in cases:
        got = load_model(write(probe_v, tmp_path / "m.safetensors", meta, **extra), prediction=override)
        assert (got.parameterization.prediction, words in got.parameterization.source) == (want, True), meta
        assert got.model.cfg.schedule.prediction is want
    sdxl = tiny(ModelFamily.SDXL)
    with torch.no_grad():
        sdxl.unet.out[2].bias.fill_(-5.0)  # no probe for SDXL: it stays eps
    plain = load_model(write(sdxl, tmp_path / "x.safetensors"))
    assert plain.parameterization.prediction is Prediction.EPS and not plain.parameterization.decided
    marked = load_model(write(sdxl, tmp_path / "x.safetensors", {}, v_pred=torch.tensor([]), ztsnr=torch.tensor([])))
    assert marked.parameterization.prediction is Prediction.V and "v_pred" in marked.parameterization.source
    assert marked.parameterization.zero_terminal_snr and marked.model.cfg.image_size == 1024
    assert load_model(tmp_path / "x.safetensors", prediction="eps").model.cfg.schedule.prediction is Prediction.EPS
    with pytest.raises(CheckpointError, match="modelspec.prediction_type = 'flow'"):
        load_model(write(sdxl, tmp_path / "f.safetensors", {"modelspec.prediction_type": "flow"}))


def test_cli_info_names_family_prediction_size_and_both_encoders(tmp_path: Path, tiny_presets) -> None:
    model = tiny(ModelFamily.SDXL)
    write(model, tmp_path / "xl.safetensors", {}, v_pred=torch.tensor([]))
    res = CliRunner().invoke(app, ["info", str(tmp_path / "xl.safetensors")])
    assert res.exit_code == 0, res.output
    counts = model.parameter_counts()
    for text in ("family:       SDXL base (sdxl)", "v-prediction (the file's 'v_pred' marker key)",
                 "1024x1024 px (native)", f"text encoder 2:{counts['text_encoder_2']:,} params",
                 f"text encoder: {counts['text_encoder']:,} params", f"{counts['total']:,}"):
        assert text in res.output, text
    res = CliRunner().invoke(app, ["info", str(tmp_path / "xl.safetensors"), "--prediction", "eps"])
    assert "eps-prediction (set by the caller" in res.output and "epsilon-prediction" in res.output
    write(forced_sd2(-2.0), tmp_path / "sd2.safetensors")
    res = CliRunner().invoke(app, ["info", str(tmp_path / "sd2.safetensors")])
    assert "SD 2.x (sd2)" in res.output and "v-prediction (A1111's probe" in res.output and "768x768" in res.output
    assert "pads with '!'" in res.output


# ----------------------------------------------------------------------------- refusals


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    z = torch.zeros(2, 2)
    xl = tmp_path / "xl.safetensors"
    save_original(tiny(ModelFamily.SDXL), xl)
    data = xl.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    files = {
        "truncated": ({}, "truncated or corrupt"),
        "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": z,
                  "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0),
                  "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": z}, "this is a LoRA"),
        "random": ({"foo.weight": z, "bar.bias": z}, "not a Stable Diffusion checkpoint"),
        "controlnet": ({"control_model.input_blocks.0.0.weight": z, "control_model.input_hint_block.0.weight": z},
                       "this is a ControlNet"),
        "sd3": ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": z}, "SD3-family"),
        "flux": ({"double_blocks.0.img_attn.qkv.weight": z, "single_blocks.0.linear1.weight": z}, "Flux-family"),
        "playground": ({"edm_mean": z, "edm_std": z, "model.diffusion_model.input_blocks.0.0.weight": z}, "Playground v2.5"),
        "unet_only": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, "no text encoder"),
    }
    out = {}
    for name, (state, words) in files.items():
        path = tmp_path / f"{name}.safetensors"
        if state:
            write_safetensors({k: v.clone() for k, v in state.items()}, path)
        out[name] = (path, words)
    return out


def test_bad_files_are_one_line_errors_saying_what_they_are(tmp_path: Path) -> None:
    for name, (path, words) in _bad_files(tmp_path).items():
        with pytest.raises(CheckpointError) as e:
            load_model(path)
        msg = str(e.value)
        assert words in msg and "\n" not in msg and str(path) in msg, (name, msg)
        res = CliRunner().invoke(app, ["info", str(path)])
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.output


def test_generate_takes_prediction_through_to_the_loader(tmp_path: Path, tiny_presets) -> None:
    save_original(tiny(ModelFamily.SD1), tmp_path / "m.safetensors")
    outs = {}
    for prediction in ("auto", "eps", "v"):
        out = tmp_path / f"{prediction}.png"
        res = CliRunner().invoke(app, ["generate", "a red circle", "-m", str(tmp_path / "m.safetensors"), "--steps", "2",
                                       "--seed", "1", "--width", "32", "--height", "32", "-q", "-o", str(out),
                                       "--prediction", prediction])
        assert res.exit_code == 0, res.output
        outs[prediction] = out.read_bytes()
    assert outs["auto"] == outs["eps"] != outs["v"]
