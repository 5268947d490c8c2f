"""Checkpoint formats: round trips, diffusers export parity, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_clip_bundle, tiny_word_bundle
from typer.testing import CliRunner

from opensd.checkpoints import CheckpointError, StateDictMismatch, load_model
from opensd.checkpoints.diffusers_folder import save_diffusers
from opensd.checkpoints.io import read_weights, short_hash
from opensd.checkpoints.opensd_format import save_opensd
from opensd.checkpoints.original import load_original, save_original
from opensd.cli.main import app
from opensd.models.stable_diffusion import SDConfig, StableDiffusion


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_opensd_round_trip(tmp_path: Path) -> None:
    model, tok = tiny_word_bundle()
    save_opensd(model, tok, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.format == "opensd"
    assert loaded.model.cfg == model.cfg
    same_state(loaded.model, model)
    assert loaded.tokenizer(["a red circle"]).tolist() == tok(["a red circle"]).tolist()
    assert loaded.hash == short_hash(tmp_path / "m" / "model.safetensors")
    assert len(loaded.hash) == 10


def test_original_single_file_round_trip(tmp_path: Path) -> None:
    model, _ = tiny_clip_bundle()
    save_original(model, tmp_path / "m.safetensors")
    # the file's keys are exactly the module's attribute paths
    assert set(read_weights(tmp_path / "m.safetensors")) == set(model.state_dict())
    again = load_original(tmp_path / "m.safetensors", config=model.cfg)
    same_state(again, model)


def test_original_file_with_ldm_extras_and_ckpt(tmp_path: Path) -> None:
    """An LDM .ckpt: {"state_dict": ...} with schedule buffers and EMA entries beside the weights."""
    model, _ = tiny_clip_bundle()
    state = dict(model.state_dict())
    state["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save({"state_dict": state, "global_step": 10}, tmp_path / "m.ckpt")
    again = load_original(tmp_path / "m.ckpt", config=model.cfg)
    same_state(again, model)


@pytest.mark.parametrize("bundle", [tiny_clip_bundle, tiny_word_bundle], ids=["clip-bpe", "word"])
def test_diffusers_export_loads_in_diffusers_with_identical_outputs(tmp_path: Path, bundle) -> None:
    from diffusers import StableDiffusionPipeline

    model, tok = bundle()
    save_diffusers(model, tok, tmp_path / "d")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "d", local_files_only=True)

    ids = tok(["a red circle above a blue square", ""])
    ref_ids = pipe.tokenizer(
        ["a red circle above a blue square", ""],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    assert ids.tolist() == ref_ids.tolist()

    torch.manual_seed(0)
    with torch.no_grad():
        ctx = model.text_encoder(ids)
        ref_ctx = pipe.text_encoder(ids)[0]
        assert (ctx - ref_ctx).abs().max() < 1e-5

        x = torch.randn(2, 4, 8, 8)
        t = torch.tensor([10.0, 700.0])
        eps = model.unet(x, t, ctx)
        ref_eps = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        assert (eps - ref_eps).abs().max() < 1e-5

        img = model.vae.decode(x)
        ref_img = pipe.vae.decode(x).sample
        assert (img - ref_img).abs().max() < 1e-5
        post = model.vae.encode(img)
        ref_post = pipe.vae.encode(img).latent_dist
        assert (post.mean - ref_post.mean).abs().max() < 1e-5

    # and back into opensd, bit for bit
    back = load_model(tmp_path / "d")
    assert back.format == "diffusers"
    assert back.model.cfg.unet == model.cfg.unet and back.model.cfg.vae == model.cfg.vae
    same_state(back.model, model)


# ----------------------------------------------------------------------------------
# Bad input: one clear error, never a traceback.


def test_missing_file() -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_model("/nonexistent/model.safetensors")


def test_truncated_and_corrupt_safetensors(tmp_path: Path) -> None:
    model, _ = tiny_clip_bundle()
    save_original(model, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(tmp_path / "junk.safetensors")


class Evil:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_pickle_that_needs_code_is_refused(tmp_path: Path, capsys) -> None:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="needs code"):
        load_model(tmp_path / "evil.ckpt")
    assert "this pickle runs code" not in capsys.readouterr().out


def test_corrupt_ckpt(tmp_path: Path) -> None:
    (tmp_path / "bad.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(tmp_path / "bad.ckpt")


def test_config_with_unknown_key(tmp_path: Path) -> None:
    model, tok = tiny_word_bundle()
    save_opensd(model, tok, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model"]["unet"]["channel_multiplier"] = [1, 2]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown key.*channel_multiplier"):
        load_model(tmp_path / "m")


def test_state_dict_from_a_different_architecture(tmp_path: Path) -> None:
    model, _ = tiny_clip_bundle()
    save_original(model, tmp_path / "tiny.safetensors")
    other = SDConfig.tiny().replace(unet=SDConfig.tiny().unet.__class__(**{**SDConfig.tiny().unet.__dict__, "model_channels": 16, "norm_groups": 4}))
    with pytest.raises(StateDictMismatch) as e:
        load_original(tmp_path / "tiny.safetensors", config=other.replace(text=model.cfg.text))
    msg = str(e.value)
    assert "wrong shape" in msg and "input_blocks.0.0.weight" in msg
    # an SD 1.5 load of the tiny file reports missing and wrong-shape keys in one error
    with pytest.raises(StateDictMismatch) as e:
        load_model(tmp_path / "tiny.safetensors")
    assert e.value.wrong_shape and "does not fit" in str(e.value)


def test_not_a_stable_diffusion_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint"):
        load_model(tmp_path / "x.safetensors")


def test_folder_that_is_no_model(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither a diffusers pipeline"):
        load_model(tmp_path)


# ----------------------------------------------------------------------------------
# opensd info


def test_cli_info(tmp_path: Path) -> None:
    model, tok = tiny_word_bundle()
    save_opensd(model, tok, tmp_path / "m")
    res = CliRunner().invoke(app, ["info", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    counts = model.parameter_counts()
    assert f"{counts['unet']:,}" in res.output and f"{counts['total']:,}" in res.output
    assert short_hash(tmp_path / "m" / "model.safetensors") in res.output
    assert "float32" in res.output


def test_cli_info_bad_path_is_one_clean_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["info", str(tmp_path / "nope.safetensors")])
    assert res.exit_code == 2
    assert "error:" in res.output and "not found" in res.output
    assert "Traceback" not in res.output


def test_sd15_is_the_original_layout_on_meta() -> None:
    with torch.device("meta"):
        model = StableDiffusion(SDConfig.sd15())
    counts = model.parameter_counts()
    assert counts["unet"] == 859_520_964
    assert counts["vae"] == 83_653_863
    assert counts["text_encoder"] == 123_060_480
    keys = model.state_dict().keys()
    assert len(keys) == 686 + 248 + 196
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys


def test_sd15_whole_file_is_recognised_and_converted_by_diffusers() -> None:
    """diffusers' own single-file code takes opensd's SD 1.5 state dict for an SD 1.x file,
    and its CLIP conversion yields exactly transformers' ViT-L/14 text model, every key used."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, infer_diffusers_model_type
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFModel

    with torch.device("meta"):
        model = StableDiffusion(SDConfig.sd15())
        state = model.state_dict()
        assert infer_diffusers_model_type(state) == "v1"
        converted = convert_ldm_clip_checkpoint(state)
        hf = HFModel(
            HFConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768)
        )
    def names(sd):  # transformers 5 drops the `text_model.` base prefix from its own state dict
        return {k.removeprefix("text_model."): tuple(v.shape) for k, v in sd.items() if not k.endswith("position_ids")}

    assert names(converted) == names(hf.state_dict())
    text_keys = [k for k in state if k.startswith("cond_stage_model.")]
    assert len(text_keys) == len(converted) == 196


def test_opensd_folder_in_float16_halves_the_file_and_loads_as_float32(tmp_path: Path) -> None:
    model, tok = tiny_word_bundle()
    full = save_opensd(model, tok, tmp_path / "full")
    half = save_opensd(model, tok, tmp_path / "half", dtype=torch.float16)
    assert {v.dtype for v in read_weights(half / "model.safetensors").values()} == {torch.float16}
    size = (half / "model.safetensors").stat().st_size
    assert size < 0.55 * (full / "model.safetensors").stat().st_size
    loaded = load_model(half).model
    for k, v in model.state_dict().items():
        w = loaded.state_dict()[k]
        assert w.dtype == torch.float32 and torch.equal(w, v.half().float())
    with pytest.raises(CheckpointError, match="floating-point"):
        save_opensd(model, tok, tmp_path / "bad", dtype=torch.int8)


# ----------------------------------------------------------------------------------
# Broken files: what is wrong, told apart, in one line naming the file.


def test_junk_truncated_and_code_needing_ckpts_are_told_apart(tmp_path: Path) -> None:
    model, _ = tiny_word_bundle()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "good.ckpt")
    data = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "junk.ckpt").write_bytes(bytes(range(7, 250)) * 20)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "pickle-junk.ckpt").write_bytes(b"\x80\x02" + bytes(range(40, 250)))
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": Evil()}, tmp_path / "evil.ckpt")
    cases = {"junk": "is not a checkpoint at all", "empty": "is empty", "truncated": "truncated or corrupt",
             "pickle-junk": "truncated or corrupt", "evil": "needs code to load (print)"}
    for name, problem in cases.items():
        with pytest.raises(CheckpointError) as e:
            load_original(tmp_path / f"{name}.ckpt", config=model.cfg)
        msg = str(e.value)
        assert problem in msg and str(tmp_path / f"{name}.ckpt") in msg and "\n" not in msg, msg
        assert ("needs code" in msg) == (name == "evil"), msg


def test_wrong_dtypes_and_a_mismatch_are_one_line_naming_the_file(tmp_path: Path) -> None:
    model, _ = tiny_word_bundle()
    state = model.state_dict()
    key = next(iter(state))
    torch.save({**state, key: state[key].to(torch.int32)}, tmp_path / "ints.ckpt")
    with pytest.raises(StateDictMismatch, match=f"wrong dtype.*{key}: int32 vs float32") as e:
        load_original(tmp_path / "ints.ckpt", config=model.cfg)
    assert str(tmp_path / "ints.ckpt") in str(e.value) and "\n" not in str(e.value)
    torch.save({**state, key: state[key].to(torch.complex64)}, tmp_path / "complex.ckpt")
    with pytest.raises(CheckpointError, match=f"complex.ckpt: {key} is a torch.complex64"):
        load_original(tmp_path / "complex.ckpt", config=model.cfg)


def broken_models(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, the problem its error names): the three the issue met, and more."""
    model, tok = tiny_word_bundle()
    out = {}
    (root / "junk.ckpt").write_bytes(bytes(range(7, 250)) * 20)
    out["junk"] = (root / "junk.ckpt", "is not a checkpoint at all")
    save_opensd(model, tok, root / "bad-tokenizer")
    (root / "bad-tokenizer/tokenizer/tokenizer.json").write_text('{"model": {"type"')
    out["bad-tokenizer"] = (root / "bad-tokenizer/tokenizer/tokenizer.json", "is not valid JSON")
    save_opensd(model, tok, root / "no-unk")  # parses, then fails on the first unknown word (found by fuzzing)
    doc = json.loads((root / "no-unk/tokenizer/tokenizer.json").read_text())
    del doc["model"]["vocab"]["<unk>"]
    (root / "no-unk/tokenizer/tokenizer.json").write_text(json.dumps(doc))
    out["no-unk"] = (root / "no-unk/tokenizer/tokenizer.json", "cannot tokenize text")
    save_opensd(model, tok, root / "bad-config")
    cfg = json.loads((root / "bad-config/config.json").read_text())
    cfg["model"]["unet"]["num_heads"] = 0
    (root / "bad-config/config.json").write_text(json.dumps(cfg))
    out["bad-config"] = (root / "bad-config/config.json", "num_heads")
    save_diffusers(model, tok, root / "bad-diffusers")
    unet_cfg = root / "bad-diffusers/unet/config.json"
    unet_cfg.write_text(json.dumps({**json.loads(unet_cfg.read_text()), "sample_size": []}))
    out["bad-diffusers"] = (unet_cfg, "sample_size must be a positive integer")
    save_diffusers(model, tok, root / "deep-diffusers")
    text_cfg = root / "deep-diffusers/text_encoder/config.json"
    text_cfg.write_text(json.dumps({**json.loads(text_cfg.read_text()), "num_hidden_layers": 10**7}))
    out["deep-diffusers"] = (root / "deep-diffusers", "more than the")
    return out


def test_broken_model_files_are_one_line_errors_naming_them(tmp_path: Path) -> None:
    for name, (where, problem) in broken_models(tmp_path).items():
        folder = where if where.suffix == ".ckpt" or where.is_dir() else tmp_path / name
        with pytest.raises(CheckpointError) as e:
            load_model(folder)
        msg = str(e.value)
        assert str(where) in msg and problem in msg and "\n" not in msg, (name, msg)


def test_cli_info_and_generate_on_broken_models_print_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    for name, (where, problem) in broken_models(tmp_path).items():
        target = where if where.suffix == ".ckpt" or where.is_dir() else tmp_path / name
        for args in (["info", str(target)], ["generate", "-m", str(target), "--steps", "1", "-o",
                                             str(tmp_path / "out.png"), "a red circle"]):
            res = runner.invoke(app, args)
            assert res.exit_code == 2, (args, res.output)
            assert res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
            assert problem in res.output and "Traceback" not in res.output, res.output
