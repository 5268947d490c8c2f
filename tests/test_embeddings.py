"""Textual-inversion embeddings: every file format and error, names found in prompts,
placeholders that keep to one chunk, the vectors reaching every text encoder (emphasis,
re-padding and pooling as for words), the embeddings folder, and the CLI and server end
to end on tiny random models."""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from fastapi.testclient import TestClient
from helpers import clip_tokenizer, decode_png, tiny_family_model, tiny_word_bundle
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

import opensd
from opensd.checkpoints.embeddings import (
    TextualInversion,
    bind_embedding,
    read_embedding,
    write_embedding,
)
from opensd.checkpoints.lora import LoRAError
from opensd.checkpoints.opensd_format import save_opensd
from opensd.cli.main import app as cli_app
from opensd.models.stable_diffusion import ModelFamily
from opensd.pipelines import embedding_library
from opensd.pipelines.conditioning import Conditioner, token_embedding
from opensd.pipelines.embedding_library import EmbeddingLibrary
from opensd.pipelines.infotext import parse_infotext, read_png_parameters
from opensd.pipelines.networks import RequestNetworks
from opensd.pipelines.request import GenerationRequest
from opensd.prompts.budget import PromptBudget, PromptBudgetError, tokenize_within_budget
from opensd.prompts.embedding_names import EmbeddingNames
from opensd.prompts.syntax import PLACEHOLDER_ID, PromptSyntaxError, tokenize_prompt
from opensd.serving import create_app

W = 32  # the tiny text encoders' width (SDXL's second: 48)


pytestmark = pytest.mark.usefixtures("one_thread_loopback")


def _vec(n: int, width: int = W, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def a1111_pt(path: Path, vec: torch.Tensor, **meta) -> Path:
    """A file as A1111's Embedding.save writes it."""
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "inside-name", "step": 1500,
            "sd_checkpoint": "a1b2c3d4", "sd_checkpoint_name": "some-model", **meta}
    torch.save(data, path)
    return path


def _sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _one_line(e: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, msg


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["a1111.pt", "a1111.bin", "a1111.safetensors", "diffusers.safetensors",
                                 "diffusers.bin", "diffusers-1d.bin", "bare.pt"])
def test_every_single_encoder_format_reads_and_binds(fmt: str, tmp_path: Path) -> None:
    kind, suffix = fmt.split(".")
    vec = _vec(3)
    path = tmp_path / f"myemb.{suffix}"
    if kind == "a1111" and suffix != "safetensors":
        a1111_pt(path, vec.clone().requires_grad_(True))
    elif kind == "a1111":
        save_file({"emb_params": vec}, str(path))
    elif kind == "diffusers" and suffix == "safetensors":
        save_file({"<cat-toy>": vec}, str(path))
    elif kind == "diffusers":
        torch.save({"<cat-toy>": vec}, path)
    elif kind == "diffusers-1d":
        vec = vec[:1]
        torch.save({"<cat-toy>": vec[0]}, path)  # (D,): one vector
    else:
        torch.save(vec, path)
    f = read_embedding(path)
    assert f.name == "myemb"  # the file's stem, as A1111 (not the name inside)
    assert (f.vectors, f.shape) == (vec.shape[0], W)
    assert f.hash == _sha12(path)
    if kind == "a1111" and suffix != "safetensors":
        assert (f.step, f.sd_checkpoint, f.sd_checkpoint_name) == (1500, "a1b2c3d4", "some-model")
    else:
        assert (f.step, f.sd_checkpoint, f.sd_checkpoint_name) == (None, None, None)
    model, _ = tiny_family_model(ModelFamily.SD1)
    ti = bind_embedding(f, model)
    assert len(ti.vectors) == 1 and torch.equal(ti.vectors[0], vec) and ti.count == vec.shape[0]
    assert not ti.vectors[0].requires_grad


@pytest.mark.parametrize("family", list(ModelFamily))
def test_each_family_takes_its_tensors(family: ModelFamily, tmp_path: Path) -> None:
    model, _ = tiny_family_model(family)
    widths = [e.cfg.width for e in model.text_encoders]
    if family in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER):
        l, g = _vec(2, W, 1), _vec(2, 48 if family is ModelFamily.SDXL else W, 2)
        save_file({"clip_l": l, "clip_g": g}, str(tmp_path / "xl.safetensors"))
        f = read_embedding(tmp_path / "xl.safetensors")
        assert f.layout == "sdxl" and f.shape == l.shape[1] + g.shape[1]  # A1111's shape: clip_l + clip_g
        want = (l, g) if family is ModelFamily.SDXL else (g,)  # the refiner: clip_g alone
    else:
        want = (_vec(2, widths[0], 3),)
        f = read_embedding(a1111_pt(tmp_path / "one.pt", want[0]))
    ti = bind_embedding(f, model)
    assert [tuple(v.shape) for v in ti.vectors] == [(2, w) for w in widths]
    assert all(torch.equal(a, b) for a, b in zip(ti.vectors, want, strict=True))


def test_write_embedding_round_trips_as_a1111_writes(tmp_path: Path) -> None:
    model, _ = tiny_family_model(ModelFamily.SD1)
    ti = TextualInversion("x", (torch.nn.Parameter(_vec(4)),), step=7)
    for suffix, layout in ((".pt", "a1111"), (".safetensors", "a1111-safetensors")):
        f = read_embedding(write_embedding(ti, tmp_path / f"mine{suffix}", model))
        assert f.layout == layout and torch.equal(f.tensors["*"], ti.vectors[0].detach())
        assert f.step == 7  # .pt: a key; .safetensors: header metadata
    raw = torch.load(tmp_path / "mine.pt", weights_only=True)
    assert raw["string_to_token"] == {"*": 265} and raw["step"] == 7 and raw["name"] == "x"
    xl, _ = tiny_family_model(ModelFamily.SDXL)
    two = TextualInversion("y", (_vec(2, W), _vec(2, 48)))
    f = read_embedding(write_embedding(two, tmp_path / "xl.safetensors", xl))
    assert f.layout == "sdxl" and torch.equal(f.tensors["clip_g"], two.vectors[1])


def test_format_errors_are_one_line_naming_the_file(tmp_path: Path) -> None:
    def err(name: str, write, *parts: str) -> None:
        path = tmp_path / name
        write(path)
        with pytest.raises(LoRAError) as e:
            read_embedding(path)
        _one_line(e, name, *parts)

    err("empty.pt", lambda p: p.write_bytes(b""), "empty")
    err("zero.safetensors", lambda p: save_file({"emb_params": torch.zeros(0, W)}, str(p)), "empty", "at least one vector")
    err("many.pt", lambda p: a1111_pt(p, _vec(76)), "76 vectors", "at most 75")
    err("keys.safetensors", lambda p: save_file({"a": _vec(1), "b": _vec(1)}, str(p)), "unknown embedding layout", "'a'")
    err("two.pt", lambda p: torch.save({"string_to_param": {"*": _vec(1), "+": _vec(1)}}, p), "one term", "2")
    err("nan.pt", lambda p: a1111_pt(p, torch.full((1, W), float("nan"))), "NaN")
    err("ints.bin", lambda p: torch.save({"tok": torch.ones(2, W, dtype=torch.int64)}, p), "float tensor")
    err("cube.bin", lambda p: torch.save({"tok": torch.ones(2, 2, W)}, p), "(n, width)")
    err("mixed.safetensors", lambda p: save_file({"clip_l": _vec(2), "clip_g": _vec(3, 48)}, str(p)), "same number")
    err("garbage.pt", lambda p: p.write_bytes(b"hello, not a pickle"), "not a checkpoint")
    # an old file whose string_to_param is a pickled ParameterDict needs code to load: refused
    err("old.pt", lambda p: torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(_vec(1))})}, p),
        "refused", "ParameterDict")
    err("model.txt", lambda p: p.write_text("x"), "not an embedding file")


def test_bind_errors_say_what_the_embedding_and_the_model_are(tmp_path: Path) -> None:
    sd1, _ = tiny_family_model(ModelFamily.SD1)
    xl, _ = tiny_family_model(ModelFamily.SDXL)
    refiner, _ = tiny_family_model(ModelFamily.SDXL_REFINER)
    cases = [
        (sd1, lambda p: a1111_pt(p, _vec(2, 768)), "this embedding is 768 wide, for SD 1.x; the model's text encoder is 32 wide (SD 1.x)"),
        (sd1, lambda p: a1111_pt(p, _vec(2, 1024)), "1024 wide, for SD 2.x"),
        (sd1, lambda p: torch.save({"clip_l": _vec(1), "clip_g": _vec(1, 48)}, p), "an SDXL embedding (clip_l, clip_g); the model is SD 1.x"),
        (xl, lambda p: torch.save({"clip_l": _vec(1)}, p), "needs clip_l and clip_g", "has no clip_g"),
        (xl, lambda p: a1111_pt(p, _vec(1)), "an SDXL model needs an embedding with clip_l and clip_g", "32 wide"),
        (xl, lambda p: torch.save({"clip_l": _vec(1), "clip_g": _vec(1, 64)}, p), "its clip_g is 64 wide", "48 wide"),
        (refiner, lambda p: torch.save({"clip_l": _vec(1)}, p), "needs clip_g", "has no clip_g"),
    ]
    for i, (model, write, *parts) in enumerate(cases):
        path = tmp_path / f"case{i}.pt"
        write(path)
        with pytest.raises(LoRAError) as e:
            bind_embedding(read_embedding(path), model)
        _one_line(e, path.name, *parts)


def test_textual_inversion_is_checked() -> None:
    with pytest.raises(LoRAError, match="same number"):
        TextualInversion("x", (_vec(2), _vec(3, 48)))
    with pytest.raises(LoRAError, match="tuple of"):
        TextualInversion("x", [_vec(2)])  # type: ignore[arg-type]
    model, tok = tiny_word_bundle()  # 16 positions: 14 per chunk
    cond = Conditioner(model, tok)
    with pytest.raises(LoRAError, match="15 vectors; at most 14"):
        cond.encode(["a red circle"], embeddings={"big": TextualInversion("big", (_vec(15),))})
    with pytest.raises(LoRAError, match=r"\[48\] wide"):
        cond.encode(["a red circle"], embeddings={"w": TextualInversion("w", (_vec(1, 48),))})


# ----------------------------------------------------------------------------- names in prompts


def test_names_match_as_whole_words_ignoring_case_longest_first() -> None:
    names = EmbeddingNames(["myemb", "style", "style-2", "my style", "MyEmb"])
    assert names.find("a photo of myemb, (style-2:1.2) and [style]") == ["myemb", "style-2", "style"]
    assert names.find("myemb and MyEmb") == ["myemb", "MyEmb"]  # the exact spelling wins
    assert names.find("MYEMB") == ["MyEmb"]  # else the first in order
    assert names.find("myembs x_myemb myemb2 stylex") == []  # whole words only
    assert names.find("in  my\tstyle") == ["my style"]  # any whitespace where the name has a space
    assert names.find("(my) style") == ["style"]  # a name cannot span brackets
    assert EmbeddingNames(["a.b"]).find("axb a.b") == ["a.b"]  # names are text, not patterns
    assert EmbeddingNames([]).find("anything") == []


def test_placeholders_weights_and_budget() -> None:
    tok = clip_tokenizer()
    t = tokenize_prompt(tok, "a (myemb:1.2), cat", embeddings={"myemb": 3})
    (chunk,) = t.chunks
    a, comma, cat = tok.encode("a")[0], tok.encode(",")[0], tok.encode("cat")[0]
    assert chunk.ids[:8] == [tok.bos_id, a, PLACEHOLDER_ID, PLACEHOLDER_ID, PLACEHOLDER_ID, comma, cat, tok.eos_id]
    assert chunk.weights[:7] == [1.0, 1.0, 1.2, 1.2, 1.2, 1.0, 1.0]
    assert chunk.embeddings == [(2, "myemb")] and t.token_count == 6
    assert t.words == ["a", "myemb,", "cat"] and chunk.word_index[2:5] == [1, 1, 1]
    # without the name in the mapping the prompt tokenizes as before
    plain = tokenize_prompt(tok, "a (myemb:1.2), cat")
    assert plain.chunks[0].embeddings == [] and plain.chunks[0].ids == tokenize_prompt(tok, "a (myemb:1.2), cat", embeddings={}).chunks[0].ids
    # the budget counts the vectors, not the name's tokens
    budget = PromptBudget(max_tokens=5)
    assert tokenize_within_budget("a myemb", tok, budget, embeddings={"myemb": 4}).token_count == 5
    with pytest.raises(PromptBudgetError, match="more than 5 tokens"):
        tokenize_within_budget("a myemb", tok, budget, embeddings={"myemb": 5})
    with pytest.raises(PromptSyntaxError, match="76 vectors"):
        tokenize_prompt(tok, "myemb", embeddings={"myemb": 76})


@pytest.mark.parametrize("n, moves", [(2, False), (3, True)])
def test_an_embedding_that_does_not_fit_starts_the_next_chunk(n: int, moves: bool) -> None:
    """A1111's rule: 73 tokens, then n vectors; 73 + n > 75 ends the chunk first."""
    tok = clip_tokenizer()
    t = tokenize_prompt(tok, " ".join(["cat"] * 73) + " myemb dog", embeddings={"myemb": n})
    assert t.token_count == 73 + n + 1
    first, second = t.chunks
    if moves:
        assert first.embeddings == [] and first.ids[74] == tok.eos_id  # 73 cats, then eos and padding
        assert second.embeddings == [(1, "myemb")] and second.ids[1: 1 + n] == [PLACEHOLDER_ID] * n
    else:
        assert first.embeddings == [(74, "myemb")] and first.ids[74:76] == [PLACEHOLDER_ID] * 2
        assert second.ids[1] == tok.encode("dog")[0]


def test_the_comma_rule_moves_an_embedding_with_its_placeholders() -> None:
    """70 tokens, a comma, 4 vectors fill the chunk; the next word moves what follows the
    comma on: the vectors go with their placeholders (A1111 leaves them behind)."""
    tok = clip_tokenizer()
    t = tokenize_prompt(tok, " ".join(["cat"] * 70) + ", myemb dog", embeddings={"myemb": 4})
    first, second = t.chunks
    assert first.embeddings == [] and first.ids[71] == tok.encode(",")[0] and first.ids[72] == tok.eos_id
    assert second.embeddings == [(1, "myemb")] and second.ids[5] == tok.encode("dog")[0]


# ----------------------------------------------------------------------------- conditioning


def _as_words(model, tok, words: str) -> TextualInversion:
    """An embedding whose vectors are the token embeddings of ``words`` in every encoder."""
    ids = torch.tensor([i for w in words.split() for i in tok.encode(w)])
    with torch.no_grad():
        vecs = tuple(token_embedding(enc)(ids).clone() for enc in model.text_encoders)
    return TextualInversion("myemb", vecs)


@pytest.mark.parametrize("family", list(ModelFamily))
def test_vectors_encode_as_the_words_they_copy_with_emphasis_and_pooling(family: ModelFamily) -> None:
    """An embedding holding the token embeddings of "red circle" conditions exactly as the
    words: the same emphasis, SD 2.x / SDXL re-padding, and SDXL's pooled output (OpenCLIP
    pools at the highest id: the placeholders are 0)."""
    model, tok = tiny_family_model(family)
    cond = Conditioner(model, tok)
    emb = {"myemb": _as_words(model, tok, "red circle")}
    for with_name, with_words in [("a myemb square", "a red circle square"),
                                  ("a (myemb:1.3) square, [dog]", "a (red circle:1.3) square, [dog]")]:
        with torch.no_grad():
            got = cond.encode([with_name], embeddings=emb)
            want = cond.encode([with_words])
            plain = cond.encode([with_name])
        torch.testing.assert_close(got.context, want.context, atol=1e-6, rtol=0)
        assert (got.context - plain.context).abs().max() > 1e-2  # the name alone is other words
        if want.pooled is not None:
            torch.testing.assert_close(got.pooled, want.pooled, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", list(ModelFamily))
def test_without_a_named_embedding_conditioning_is_bit_identical(family: ModelFamily) -> None:
    model, tok = tiny_family_model(family)
    cond = Conditioner(model, tok)
    unused = {"zebra": TextualInversion("zebra", tuple(_vec(2, e.cfg.width) for e in model.text_encoders))}
    req = GenerationRequest("a red (circle:1.2) above a blue square", "a green triangle", width=32, height=32)
    with torch.inference_mode():
        base = cond.for_request(req)
        for embeddings in ({}, None, unused):
            got = cond.for_request(req, embeddings=embeddings)
            for a, b in zip(got, base, strict=True):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_encoding_is_differentiable_in_the_vectors() -> None:
    """A textual-inversion trainer passes nn.Parameters: the loss reaches them, the base weights stay."""
    model, tok = tiny_family_model(ModelFamily.SDXL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = tuple(torch.nn.Parameter(_vec(2, e.cfg.width, i)) for i, e in enumerate(model.text_encoders))
    text = Conditioner(model, tok).encode(["a (myemb:1.1) photo"], embeddings={"myemb": TextualInversion("myemb", params)})
    (text.context.square().mean() + text.pooled.square().mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_negative_prompt_and_chunks_of_a_request() -> None:
    """The conditioner puts the vectors in the negative prompt too, and in a second chunk."""
    model, tok = tiny_family_model(ModelFamily.SD1)
    cond = Conditioner(model, tok)
    emb = {"myemb": _as_words(model, tok, "red circle")}
    long = " ".join(["cat"] * 74)
    req = GenerationRequest(f"{long} myemb", "blurry myemb", width=32, height=32)
    ref = GenerationRequest(f"{long} BREAK red circle", "blurry red circle", width=32, height=32)
    with torch.inference_mode():
        (c, u), (rc, ru) = cond.for_request(req, embeddings=emb), cond.for_request(ref)
    assert c["context"].shape[1] == 154  # moved whole into a second chunk
    torch.testing.assert_close(c["context"], rc["context"], atol=1e-6, rtol=0)
    torch.testing.assert_close(u["context"], ru["context"], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- the folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "embeddings"
    (root / "sub").mkdir(parents=True)
    a1111_pt(root / "sub" / "myemb.pt", _vec(2, W, 1))
    save_file({"emb_params": _vec(3, W, 2)}, str(root / "Other.safetensors"))
    save_file({"clip_l": _vec(1, 768), "clip_g": _vec(1, 1280)}, str(root / "xlemb.safetensors"))
    (root / "broken.bin").write_bytes(b"\x80\x02not really a pickle")
    (root / "notes.txt").write_text("not an embedding")
    return root


def test_library_lists_as_a1111_with_skipped(folder: Path) -> None:
    model, _ = tiny_word_bundle()
    lib = EmbeddingLibrary(folder)
    assert sorted(lib.paths()) == ["Other", "broken", "myemb", "xlemb"]
    got = lib.listing(model)
    assert got["loaded"] == {
        "myemb": {"step": 1500, "sd_checkpoint": "a1b2c3d4", "sd_checkpoint_name": "some-model", "shape": W, "vectors": 2},
        "Other": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": W, "vectors": 3},
    }
    assert list(got["loaded"]) == ["myemb", "Other"]  # A1111's order: by name, ignoring case
    assert got["skipped"]["xlemb"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                       "shape": 2048, "vectors": 1}
    assert "broken.bin" in got["skipped"]["broken"]["error"]
    with pytest.raises(LoRAError, match="is not a folder"):
        EmbeddingLibrary(folder / "notes.txt")


def test_networks_for_a_request_and_ti_hashes(folder: Path) -> None:
    model, _ = tiny_word_bundle()
    lib = EmbeddingLibrary(folder)
    req = GenerationRequest("a (myemb:1.2) circle", "other, blurry, MyEmb")
    nets = lib.networks_for(model, req)
    assert list(nets.embeddings) == ["myemb", "Other"]
    h1, h2 = _sha12(folder / "sub" / "myemb.pt"), _sha12(folder / "Other.safetensors")
    assert nets.infotext == {"TI hashes": f"myemb: {h1}, Other: {h2}"}
    assert lib.networks_for(model, GenerationRequest("a red circle")) == RequestNetworks(embeddings={}, infotext={})
    for prompt, parts in (("an xlemb", ("xlemb.safetensors", "an SDXL embedding")), ("broken", ("broken.bin",))):
        with pytest.raises(LoRAError) as e:
            lib.networks_for(model, GenerationRequest(prompt))
        _one_line(e, *parts)
    assert embedding_library.ti_hashes([TextualInversion("a:b,c", (_vec(1),), hash="0123456789ab"),
                                        TextualInversion("nohash", (_vec(1),))]) == {"TI hashes": "abc: 0123456789ab"}


def test_library_reads_each_file_once_across_threads_until_it_changes(folder: Path, monkeypatch) -> None:
    reads: list[Path] = []
    lock = threading.Lock()
    real = embedding_library.read_embedding

    def counting(path):
        with lock:
            reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(embedding_library, "read_embedding", counting)
    model, _ = tiny_word_bundle()
    lib = EmbeddingLibrary(folder)
    req = GenerationRequest("myemb and other")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: lib.networks_for(model, req), range(16)))
    assert len(reads) == 2 and all(list(r.embeddings) == ["myemb", "Other"] for r in results)
    a1111_pt(folder / "sub" / "myemb.pt", _vec(5, W, 9))  # changed on disk: read again
    assert lib.networks_for(model, req).embeddings["myemb"].count == 5 and len(reads) == 3
    lib.refresh()
    lib.networks_for(model, req)
    assert len(reads) == 5


# ----------------------------------------------------------------------------- generation, CLI, server


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    model, tok = tiny_word_bundle()
    return save_opensd(model, tok, tmp_path_factory.mktemp("m") / "tiny-shapes")


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("embeddings")
    a1111_pt(root / "myemb.pt", _vec(2, W, 5) * 3)
    save_file({"clip_l": _vec(1, W), "clip_g": _vec(1, 48)}, str(root / "xlemb.safetensors"))
    return root


def _pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_pipeline_uses_the_embedding_and_writes_ti_hashes(tiny_dir: Path, emb_dir: Path) -> None:
    pipe = opensd.load(tiny_dir)
    lib = EmbeddingLibrary(emb_dir)
    kw = dict(steps=2, seed=3, width=32, height=32, cfg_scale=5.0)
    req = GenerationRequest("a red myemb circle", "", **kw)
    with_emb = pipe.generate(req, networks=lib.networks_for(pipe.model, req))
    without = pipe.generate(req)
    fields = parse_infotext(with_emb.infotexts[0])
    assert fields["TI hashes"] == f"myemb: {_sha12(emb_dir / 'myemb.pt')}"
    assert 'TI hashes: "myemb: ' in with_emb.infotexts[0]  # quoted, as A1111 writes it
    assert "TI hashes" not in without.infotexts[0]
    assert np.abs(_pixels(with_emb.images[0]) - _pixels(without.images[0])).max() > 2
    other = pipe.txt2img("a red circle", **kw, networks=lib.networks_for_prompts(pipe.model, "a red circle"))
    assert np.array_equal(_pixels(other[0]), _pixels(pipe.txt2img("a red circle", **kw)[0]))


def test_cli_generate_with_embeddings_dir(tiny_dir: Path, emb_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["generate", "a red circle", "-n", "(myemb:0.9)", "-m", str(tiny_dir), "--steps", "2", "--seed", "1", "-q"]
    res = runner.invoke(cli_app, [*args, "--embeddings-dir", str(emb_dir), "-o", str(tmp_path / "a.png")])
    assert res.exit_code == 0, res.output
    assert parse_infotext(read_png_parameters(tmp_path / "a.png"))["TI hashes"] == f"myemb: {_sha12(emb_dir / 'myemb.pt')}"
    res = runner.invoke(cli_app, [*args, "-o", str(tmp_path / "b.png")], env={"OPENSD_EMBEDDINGS_DIR": str(emb_dir)})
    assert res.exit_code == 0, res.output
    assert np.array_equal(_pixels(Image.open(tmp_path / "a.png")), _pixels(Image.open(tmp_path / "b.png")))
    res = runner.invoke(cli_app, [*args, "-o", str(tmp_path / "c.png")])
    assert "TI hashes" not in read_png_parameters(tmp_path / "c.png")
    assert not np.array_equal(_pixels(Image.open(tmp_path / "a.png")), _pixels(Image.open(tmp_path / "c.png")))
    for extra, want in ((["--embeddings-dir", str(tmp_path / "none")], "is not a folder"),
                        (["--embeddings-dir", str(emb_dir), "-n", "xlemb"], "xlemb.safetensors: this is an SDXL embedding")):
        res = runner.invoke(cli_app, [*args, *extra, "-o", str(tmp_path / "d.png")])
        assert res.exit_code == 2 and want in res.output and "Traceback" not in res.output, res.output


def test_server_lists_refreshes_and_uses_embeddings(tiny_dir: Path, emb_dir: Path, monkeypatch) -> None:
    pipe = opensd.load(tiny_dir)
    with TestClient(create_app(pipe, embeddings_dir=emb_dir)) as c:
        r = c.get("/sdapi/v1/embeddings")
        assert r.status_code == 200, r.text
        assert r.json() == {
            "loaded": {"myemb": {"step": 1500, "sd_checkpoint": "a1b2c3d4", "sd_checkpoint_name": "some-model",
                                 "shape": W, "vectors": 2}},
            "skipped": {"xlemb": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": W + 48,
                                  "vectors": 1}},
        }
        assert c.post("/sdapi/v1/refresh-embeddings").status_code == 200
        body = {"prompt": "a myemb circle", "steps": 2, "seed": 4, "width": 32, "height": 32}
        r = c.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        want = f"myemb: {_sha12(emb_dir / 'myemb.pt')}"
        assert parse_infotext(info["infotexts"][0])["TI hashes"] == want
        plain = c.post("/sdapi/v1/txt2img", json={**body, "prompt": "a circle"}).json()["images"][0]
        assert not np.array_equal(_pixels(decode_png(r.json()["images"][0])), _pixels(decode_png(plain)))
        r = c.post("/v1/images/generations", json={"prompt": "a myemb circle", "size": "32x32", "steps": 2})
        assert r.status_code == 200, r.text
        assert parse_infotext(decode_png(r.json()["data"][0]["b64_json"]).info["parameters"])["TI hashes"] == want
        r = c.post("/sdapi/v1/txt2img", json={**body, "negative_prompt": "xlemb"})
        assert r.status_code == 422 and "xlemb.safetensors" in r.json()["detail"], r.text
    with TestClient(create_app(pipe)) as c:  # no folder: nothing listed
        assert c.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}


def test_serve_command_takes_embeddings_dir(tiny_dir: Path, emb_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import uvicorn

    from opensd.cli.serve import register

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(app))
    cli = typer.Typer()
    register(cli)
    cli.command("noop", hidden=True)(lambda: None)
    runner = CliRunner()
    res = runner.invoke(cli, ["serve", "--model", str(tiny_dir), "--device", "cpu", "--embeddings-dir", str(emb_dir)])
    assert res.exit_code == 0, res.output
    assert calls[-1].state.opensd.embeddings.folder == emb_dir
    res = runner.invoke(cli, ["serve", "--model", str(tiny_dir), "--embeddings-dir", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "is not a folder" in res.output and "Traceback" not in res.output


def test_server_prompt_budget_counts_the_vectors(tiny_dir: Path, emb_dir: Path) -> None:
    from opensd.serving import Limits

    pipe = opensd.load(tiny_dir)
    with TestClient(create_app(pipe, embeddings_dir=emb_dir, limits=Limits(max_prompt_tokens=5))) as c:
        body = {"steps": 1, "seed": 1, "width": 32, "height": 32, "send_images": False}
        assert c.post("/sdapi/v1/txt2img", json={**body, "prompt": "myemb myemb"}).status_code == 200  # 4 tokens
        r = c.post("/sdapi/v1/txt2img", json={**body, "prompt": "myemb myemb myemb"})  # 3 words, 6 tokens
        assert r.status_code == 422 and r.json()["error"] == "PromptTooLong" and "more than 5 tokens" in r.json()["detail"]
