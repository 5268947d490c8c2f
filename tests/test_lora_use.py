"""Using LoRAs: ``<lora:name:w>`` tags read as A1111 reads them, the LoRA folder, ``Lora hashes``
in the infotext, ``opensd generate --lora``, and one shared model serving many LoRAs at once."""

from __future__ import annotations

import gc
import hashlib
import re
import struct
import threading
import tracemalloc
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_loaded, tiny_word_bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_adapters import _random_kohya_file
from typer.testing import CliRunner

from opensd.checkpoints.io import read_weights, write_safetensors
from opensd.checkpoints.lora import LoRAError, LoRAFile
from opensd.checkpoints.opensd_format import save_opensd
from opensd.cli.main import app as cli_app
from opensd.errors import OpenSDError
from opensd.models.adapters import use_adapters
from opensd.pipelines.infotext import parse_infotext, read_parameters
from opensd.pipelines.lora_library import LoraBudget, LoraLibrary
from opensd.pipelines.request import GenerationRequest, RequestError
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.prompts.extra_networks import (
    ExtraNetworkError,
    LoraTag,
    PromptSyntaxError,
    find_tags,
    lora_tags,
    strip_tags,
)
from opensd.prompts.syntax import tokenize_prompt

A1111_TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra_networks.re_extra_net: the oracle


# ----------------------------------------------------------------------------- tags


@pytest.mark.parametrize("text, want", [
    ("<lora:a>", ("a", 1.0, 1.0)),
    ("<lora:a:0.8>", ("a", 0.8, 0.8)),
    ("<lyco:a:0.8:0.5>", ("a", 0.8, 0.5)),
    ("<lora:a:te=0.3>", ("a", 0.3, 0.3)),  # unet defaults to te
    ("<lora:a:1:unet=0.2>", ("a", 1.0, 0.2)),
    ("<lora:a:0.5:0.7:te=2:unet=-1>", ("a", 2.0, -1.0)),  # named wins over positional
    ("<lora:my style v2:-0.5>", ("my style v2", -0.5, -0.5)),
])
def test_lora_tags_read_as_a1111(text, want):
    got = lora_tags(f"a red circle, {text} on black")
    assert [(t.name, t.te, t.unet) for t in got] == [want]


@pytest.mark.parametrize("text, message", [
    ("<lora:a:1:1:8>", "DyLoRA"), ("<lora:a:dyn=8>", "DyLoRA"), ("<lora:a:foo=1>", "unknown argument 'foo'"),
    ("<lora:a:big>", "must be a number"), ("<lora:a:inf>", "from -10 to 10"), ("<lora: :1>", "names no LoRA"),
    ("<lora:a:x=1=2>", "must be a number"),  # two '=': positional (A1111's split), so the te multiplier
    ("<hypernet:h:1>", "hypernetworks are not supported"), ("<lroa:a:1>", "kind 'lroa' are not supported"),
])
def test_bad_tags_are_one_line_errors(text, message):
    with pytest.raises(ExtraNetworkError, match=message) as e:
        lora_tags(f"x {text} y")
    assert "\n" not in str(e.value) and text in str(e.value)


def test_tags_leave_the_encoded_text_every_kind_and_in_negative_prompts():
    _, tok = tiny_word_bundle()
    plain = tokenize_prompt(tok, "a red  circle")
    tagged = tokenize_prompt(tok, "a red <lora:style:0.8> circle<hypernet:h>")
    assert torch.equal(plain.ids, tagged.ids) and plain.words == tagged.words
    assert strip_tags("(a <lora:x:1>:1.2)") == "(a :1.2)"  # removed before the attention syntax is read
    assert strip_tags("a <x<lora:q>:y> b") == "a  b"  # a tag that forms once the inner one is gone goes too
    assert lora_tags("no tags: a <b> c:d >") == []


TAGGY = st.lists(st.sampled_from(list("<>:=ab_1. (\\)\né") + ["lora", "lyco", "hypernet", "0.5"]), max_size=30).map("".join)


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TAGGY, max_size=4).map("".join))
def test_tag_fuzz_matches_a1111_is_idempotent_and_raises_only_opensd_errors(prompt):
    assert [(t.kind, t.items, t.text) for t in find_tags(prompt)] == [
        (m.group(1), tuple(m.group(2).split(":")), m.group(0)) for m in A1111_TAG.finditer(prompt)
    ]
    try:
        once = strip_tags(prompt)
    except PromptSyntaxError:
        return
    assert strip_tags(once) == once and A1111_TAG.search(once) is None
    try:
        for t in lora_tags(prompt):
            assert isinstance(t, LoraTag) and t.name
    except OpenSDError as e:
        assert "\n" not in str(e)


def test_tag_scan_is_linear_on_hostile_prompts():
    import time

    start = time.perf_counter()
    for hostile in ("<a:" * 20000, "<" * 30000 + "a:b>", "<a:b>" * 6000):
        strip_tags(hostile)
    with pytest.raises(PromptSyntaxError, match="nested more than 32"):
        strip_tags("<a" * 5000 + ":b>" * 5000)
    assert time.perf_counter() - start < 2.0


# ----------------------------------------------------------------------------- the folder


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded()


@pytest.fixture(scope="module")
def pipe(loaded):
    return StableDiffusionPipeline(loaded)


def _write_lora(model, path: Path, seed: int, metadata: dict | None = None, every: int = 2) -> Path:
    _random_kohya_file(model, path, seed=seed, every=every)
    if metadata is not None:
        write_safetensors(read_weights(path), path, metadata=metadata)
    return path


@pytest.fixture(scope="module")
def lora_dir(loaded, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("Lora")
    model = loaded.model
    _write_lora(model, root / "style.safetensors", 1)
    _write_lora(model, root / "chars" / "hero.safetensors", 2, {"ss_output_name": "hero_v2", "ss_tag_frequency": '{"a": {"b": 1}}'})
    torch.save(read_weights(_write_lora(model, root / "tmp.safetensors", 3)), root / "legacy.pt")
    (root / "tmp.safetensors").unlink()
    _write_lora(model, root / ".trash" / "gone.safetensors", 4)
    (root / "notes.txt").write_text("not a LoRA")
    return root


def _addnet_hash(path: Path) -> str:
    """The 12-digit hash A1111 shows: SHA-256 of a safetensors file's bytes after its header."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


def test_folder_lists_names_aliases_metadata(lora_dir):
    lib = LoraLibrary(lora_dir)
    got = {e.name: e for e in lib.entries()}
    assert set(got) == {"style", "hero", "legacy"}  # subfolders yes, hidden folders and other files no
    assert got["hero"].alias == "hero_v2" and got["style"].alias == "style"
    assert got["hero"].metadata["ss_tag_frequency"] == {"a": {"b": 1}}  # JSON objects parsed, as A1111 lists them
    assert got["hero"].describe() == {"name": "hero", "alias": "hero_v2", "path": str(lora_dir / "chars" / "hero.safetensors"),
                                      "metadata": {"ss_output_name": "hero_v2", "ss_tag_frequency": {"a": {"b": 1}}}}
    assert lib.find("hero_v2") is got["hero"] and lib.find("legacy").path.suffix == ".pt"


def test_unknown_ambiguous_and_missing_folder_are_errors(lora_dir, tmp_path, loaded):
    lib = LoraLibrary(lora_dir)
    with pytest.raises(RequestError, match=r"no LoRA named 'stlye' in .*; nearest: style"):
        lib.networks_for(loaded.model, "a red circle <lora:stlye:1>")
    with pytest.raises(RequestError, match=r"no LoRA folder is set"):
        LoraLibrary(None).networks_for(loaded.model, "<lora:style>")
    with pytest.raises(LoRAError, match="is not a folder"):
        LoraLibrary(tmp_path / "nowhere")
    twin = tmp_path / "twin"
    _write_lora(loaded.model, twin / "a" / "x.safetensors", 1)
    _write_lora(loaded.model, twin / "b" / "x.safetensors", 2)
    with pytest.raises(RequestError, match=r"'x' is ambiguous: .*a/x.safetensors, .*b/x.safetensors"):
        LoraLibrary(twin).find("x")
    with pytest.raises(RequestError, match="at most 1 are allowed"):
        lib.networks_for(loaded.model, "<lora:style> <lora:hero>", budget=LoraBudget(max_count=1))
    with pytest.raises(RequestError, match="at most 0 MiB"):
        lib.networks_for(loaded.model, "<lora:style>", budget=LoraBudget(max_bytes=1000))
    other, _ = tiny_word_bundle()
    other_family = tmp_path / "wrong"
    write_safetensors({"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 4),
                       "lora_unet_nowhere.lora_up.weight": torch.zeros(4, 2)}, other_family / "w.safetensors")
    with pytest.raises(LoRAError, match="another model family"):
        LoraLibrary(other_family).networks_for(other, "<lora:w>")


def test_refresh_finds_new_files_and_drops_changed_ones(loaded, tmp_path):
    lib = LoraLibrary(tmp_path)
    assert lib.entries() == []
    path = _write_lora(loaded.model, tmp_path / "new.safetensors", 5)
    lib.refresh()
    first = lib.load(lib.find("new"))
    assert lib.load(lib.find("new")) is first  # cached
    _write_lora(loaded.model, path, 6)  # changed on disk
    lib.refresh()
    second = lib.load(lib.find("new"))
    assert second is not first and second.hash == _addnet_hash(path) != first.hash


def test_file_cache_is_bounded_by_bytes(loaded, lora_dir):
    one = LoRAFile.load(lora_dir / "style.safetensors")
    size = sum(t.nbytes for layer in one.layers.values() for t in layer.tensors.values())
    lib = LoraLibrary(lora_dir, cache_bytes=int(size * 1.5))
    style = lib.load(lib.find("style"))
    assert lib.cached_bytes == size
    lib.load(lib.find("hero"))
    assert lib.cached_bytes <= size * 1.5 and lib.load(lib.find("style")) is not style  # evicted, read again


def test_networks_for_binds_and_writes_a1111_lora_hashes(pipe, lora_dir):
    lib = LoraLibrary(lora_dir)
    nets = lib.networks_for(pipe.model, "a red circle <lora:style:0.8> <lora:hero_v2:0.5:1>")
    want = f"style: {_addnet_hash(lora_dir / 'style.safetensors')}, hero_v2: {_addnet_hash(lora_dir / 'chars' / 'hero.safetensors')}"
    assert dict(nets.infotext) == {"Lora hashes": want} and len(nets.adapters) > 5
    assert lib.networks_for(pipe.model, "a red circle <lora:style:0.8> <lora:hero_v2:0.5:1>").adapters is nets.adapters  # bound once
    assert not lib.networks_for(pipe.model, "a red circle")  # no tags: nothing
    req = GenerationRequest("a red circle <lora:style:0.8> <lora:hero_v2:0.5:1>", steps=2, width=32, height=32, seed=3)
    result = pipe.generate(req, networks=nets)
    text = result.infotexts[0]
    assert f'Lora hashes: "{want}"' in text and text.startswith("a red circle <lora:style:0.8>")  # the prompt as written
    fields = parse_infotext(text)
    assert fields["Lora hashes"] == want and fields["Prompt"] == req.prompt and fields["Seed"] == "3"


def test_same_lora_twice_adds_its_weights(pipe, lora_dir):
    lib = LoraLibrary(lora_dir)
    x = torch.randn(1, 4, 4, 4)
    ctx = torch.randn(1, 5, pipe.cfg.unet.context_dim)
    t = torch.tensor([300.0])

    def unet(prompt):
        with torch.no_grad(), use_adapters(lib.networks_for(pipe.model, prompt).adapters):
            return pipe.model.unet(x, t, ctx)

    twice, double, once = unet("<lora:style:0.5> <lora:style:0.5>"), unet("<lora:style:1>"), unet("<lora:style:0.5>")
    torch.testing.assert_close(twice, double, atol=1e-5, rtol=1e-5)
    assert (twice - once).abs().max() > 1e-4
    assert lib.networks_for(pipe.model, "<lora:style:0.5> <lora:style:0.5>").infotext["Lora hashes"].count("style:") == 2


def test_kept_bound_sets_do_not_hold_a_dropped_model(lora_dir):
    import weakref

    lib = LoraLibrary(lora_dir)
    model, _ = tiny_word_bundle(seed=3)
    adapters = lib.networks_for(model, "<lora:style:0.7>").adapters
    assert lib.networks_for(model, "<lora:style:0.7>").adapters is adapters  # kept
    layer = weakref.ref(next(iter(adapters.deltas)))
    del model, adapters
    gc.collect()
    assert layer() is None  # an unloaded model's layers (and their weights) are not pinned by the library's cache


def _image(pipe, lib, prompt, seed=7):
    req = GenerationRequest(prompt, negative_prompt="blurry <lora:hero:1>", steps=2, width=32, height=32, seed=seed,
                            sampler="euler_a")
    return pipe.generate(req, networks=lib.networks_for(pipe.model, req)).images[0]


def test_pipeline_images_with_tags(pipe, lora_dir):
    lib = LoraLibrary(lora_dir)
    base = np.asarray(_image(pipe, lib, "a red circle"))
    styled = np.asarray(_image(pipe, lib, "a red circle <lora:style:1>"))
    assert np.abs(styled.astype(int) - base).max() > 0
    assert np.array_equal(styled, np.asarray(_image(pipe, lib, "a red circle <lora:style:1>")))
    assert np.array_equal(base, np.asarray(_image(pipe, lib, "a red <lora:style:0> circle")))  # weight 0 + stripping: the base


# ----------------------------------------------------------------------------- sharing one model


def test_16_threads_on_one_model_each_equal_its_sequential_result(pipe, lora_dir):
    lib = LoraLibrary(lora_dir)
    prompts = ["a red circle", "a red circle <lora:style:0.9>", "a blue square <lora:hero:1:0.6>",
               "a red circle <lora:legacy:0.7> <lora:style:0.3>"]
    jobs = [(prompts[i % 4], 100 + i % 3) for i in range(16)]
    alone = {job: np.asarray(_image(pipe, lib, *job)) for job in set(jobs)}
    barrier = threading.Barrier(16)

    def run(job):
        barrier.wait()  # all 16 in flight at once
        return np.asarray(_image(pipe, lib, *job))

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, jobs))
    for job, img in zip(jobs, together, strict=True):
        assert np.array_equal(img, alone[job]), job
    assert len({alone[j].tobytes() for j in alone}) == len(alone)  # the LoRAs made each prompt's image differ


def _tensors() -> int:
    with warnings.catch_warnings():  # isinstance on some torch objects warns of a deprecated name
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_100_apply_remove_cycles_leave_weights_and_memory_as_they_were(pipe, lora_dir):
    lib = LoraLibrary(lora_dir, bound_sets=0)  # every cycle binds its deltas anew
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    x, t = torch.randn(1, 4, 4, 4), torch.tensor([500.0])
    ctx = torch.randn(1, 5, pipe.cfg.unet.context_dim)
    prompts = [f"<lora:style:{w}> <lora:hero:{1 - w}>" for w in (0.2, 0.5, 0.9)] + ["<lora:legacy>"]

    def cycle(i):
        with torch.no_grad(), use_adapters(lib.networks_for(pipe.model, prompts[i % 4]).adapters):
            pipe.model.unet(x, t, ctx)

    with torch.no_grad():
        base = pipe.model.unet(x, t, ctx)
    for i in range(8):  # warm the caches
        cycle(i)
    gc.collect()
    tensors = _tensors()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for i in range(100):
            cycle(i)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert grown < 256 * 1024, grown  # each cycle's adapter set is freed with it
    assert _tensors() == tensors
    with torch.no_grad():
        assert torch.equal(pipe.model.unet(x, t, ctx), base)
    for k, v in pipe.model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- the command

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(loaded, tmp_path_factory) -> Path:
    model, tok = tiny_word_bundle()
    return save_opensd(model, tok, tmp_path_factory.mktemp("m") / "tiny-shapes")


def _generate(model_dir, out, *args):
    res = runner.invoke(cli_app, ["generate", "a red circle", "-m", str(model_dir), "--steps", "2", "--seed", "5",
                                  "--width", "32", "--height", "32", "-q", "-o", str(out), *map(str, args)])
    return res


def test_cli_lora_option_and_prompt_tag(model_dir, lora_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./models/Lora here
    monkeypatch.delenv("OPENSD_LORA_DIR", raising=False)
    pixels = {}
    for name, args in {
        "base": (), "opt": ("--lora", f"{lora_dir / 'style.safetensors'}:0.8"), "opt2": ("--lora", f"{lora_dir / 'style.safetensors'}:0.8"),
        "name": ("--lora-dir", lora_dir, "--lora", "style:0.8"),
    }.items():
        res = _generate(model_dir, tmp_path / f"{name}.png", *args)
        assert res.exit_code == 0, res.output
        pixels[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert np.abs(pixels["opt"].astype(int) - pixels["base"]).max() > 0
    assert np.array_equal(pixels["opt"], pixels["opt2"]) and np.array_equal(pixels["opt"], pixels["name"])
    fields = parse_infotext(read_parameters(tmp_path / "opt.png"))
    assert fields["Lora hashes"] == f"style: {_addnet_hash(lora_dir / 'style.safetensors')}"
    assert "Lora hashes" not in parse_infotext(read_parameters(tmp_path / "base.png"))

    monkeypatch.setenv("OPENSD_LORA_DIR", str(lora_dir))
    res = runner.invoke(cli_app, ["generate", "a red circle <lora:style:0.8>", "-m", str(model_dir), "--steps", "2", "--seed", "5",
                                  "--width", "32", "--height", "32", "-q", "-o", str(tmp_path / "tag.png")])
    assert res.exit_code == 0, res.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "tag.png")), pixels["opt"])  # the tag is the option
    fields = parse_infotext(read_parameters(tmp_path / "tag.png"))
    assert fields["Prompt"] == "a red circle <lora:style:0.8>" and fields["Lora hashes"].startswith("style: ")


@pytest.mark.parametrize("args, message", [
    (("--lora", "missing.safetensors"), "--lora missing.safetensors: no such file"),
    (("--lora", "{dir}/style.safetensors:heavy"), "no such file"),
    (("--lora", "{dir}/style.safetensors:20"), "from -10 to 10"),
    (("--lora-dir", "{dir}/nowhere"), "is not a folder"),
    (("--lora-dir", "{dir}", "--prompt-tag", "<lora:stlye:1>"), "no LoRA named 'stlye'.*nearest: style"),
    (("--lora-dir", "{dir}", "--prompt-tag", "<hypernet:x>"), "hypernetworks are not supported"),
])
def test_cli_bad_lora_input_is_one_line_exit_2(model_dir, lora_dir, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    args = [str(a).format(dir=lora_dir) for a in args]
    prompt = "a red circle"
    if "--prompt-tag" in args:
        prompt += " " + args.pop(args.index("--prompt-tag") + 1)
        args.remove("--prompt-tag")
    res = runner.invoke(cli_app, ["generate", prompt, "-m", str(model_dir), "--steps", "1", "-q", "-o", str(tmp_path / "x.png"), *args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), res.output
    assert not (tmp_path / "x.png").exists()



# ----------------------------------------------------------------------------- without a library


def test_tags_without_networks_warn_and_change_nothing(pipe):
    plain = pipe.generate(pipe.request("a red circle", steps=2, width=16, height=16, seed=3))
    tagged = pipe.generate(pipe.request("a red circle <lora:style:0.8>", steps=2, width=16, height=16, seed=3))
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(tagged.images[0]))
    assert any("names LoRA(s) style but none was applied" in w for w in tagged.warnings), tagged.warnings
    assert not any("LoRA" in w for w in plain.warnings)
    zero = pipe.generate(pipe.request("a red circle <lora:style:0>", steps=2, width=16, height=16, seed=3))
    assert not any("LoRA" in w for w in zero.warnings)  # weight 0 applies nothing on purpose


def test_sdxl_negative_prompt_of_only_tags_is_the_empty_one():
    from helpers import tiny_family_model

    from opensd.checkpoints import LoadedModel
    from opensd.models.stable_diffusion import ModelFamily

    model, tok = tiny_family_model(ModelFamily.SDXL)
    xl = StableDiffusionPipeline(LoadedModel(model, tok, "xl", Path("."), "opensd", "0" * 10))
    empty = xl.request("a red circle", steps=1, width=32, height=32, seed=1)
    tags = xl.request("a red circle", negative_prompt="<lora:style:1>", steps=1, width=32, height=32, seed=1)
    words = xl.request("a red circle", negative_prompt="blurry", steps=1, width=32, height=32, seed=1)
    with torch.inference_mode():
        u_empty = xl.conditioner.for_request(empty)[1]
        u_tags = xl.conditioner.for_request(tags)[1]
        u_words = xl.conditioner.for_request(words)[1]
    assert u_tags["context"].abs().max() == 0 and u_tags["y"][:, : model.cfg.text_2.projection_dim].abs().max() == 0
    assert torch.equal(u_tags["context"], u_empty["context"]) and torch.equal(u_tags["y"], u_empty["y"])
    assert u_words["context"].abs().max() > 0


def test_written_weight_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    path = tmp_path / "w.safetensors"
    write_safetensors({"a": torch.zeros(2)}, path)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
