"""Loader fuzzing: a mutated model file or folder loads, or fails as one CheckpointError naming it.

The test saves tiny models itself (an original-layout ``.ckpt`` written by ``torch.save``,
a ``.safetensors``, an opensd folder, a diffusers folder), then mutates copies: bit flips,
truncations, junk spans, whole-file junk, deleted files, and JSON mutations of the config
and tokenizer files (hypothesis). Each case must either load, and then run (or fail with
an ``OpenSDError``), or raise a :class:`CheckpointError` whose one-line message names the
file or folder. Any other exception is an escape. The fast suite runs a bounded number of
cases; ``@pytest.mark.slow`` runs 1,500+ byte mutations and 600 JSON mutations.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_word_bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opensd.checkpoints import CheckpointError, load_model
from opensd.checkpoints.diffusers_folder import save_diffusers
from opensd.checkpoints.opensd_format import save_opensd
from opensd.checkpoints.original import load_original, save_original
from opensd.errors import OpenSDError
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

KINDS = ("ckpt", "safetensors", "opensd", "diffusers")
# a flipped bit in a weight can make it NaN: the images are then NaN too, which numpy warns about
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    """The unmutated files: one per kind, all the same tiny model."""
    root = tmp_path_factory.mktemp("originals")
    model, tok = tiny_word_bundle()
    torch.save({"state_dict": model.state_dict(), "global_step": 3}, root / "model.ckpt")
    save_original(model, root / "model.safetensors")
    save_opensd(model, tok, root / "opensd")
    save_diffusers(model, tok, root / "diffusers")
    return {"ckpt": root / "model.ckpt", "safetensors": root / "model.safetensors",
            "opensd": root / "opensd", "diffusers": root / "diffusers", "cfg": model.cfg, "tok": tok}


# ----------------------------------------------------------------------------- mutations


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """One of: flip 1-8 bits, truncate, overwrite a span with junk, insert or delete a span, all junk."""
    if not data:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    op = rng.randrange(6)
    b = bytearray(data)
    if op == 0:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:
        del b[rng.randrange(len(b)):]
    elif op == 2:
        i = rng.randrange(len(b))
        n = rng.randint(1, 256)
        b[i:i + n] = bytes(rng.randrange(256) for _ in range(n))
    elif op == 3:
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif op == 4:
        i = rng.randrange(len(b))
        del b[i:i + rng.randint(1, 256)]
    else:
        b = bytearray(rng.randbytes(rng.randint(0, 4096)))
    return bytes(b)


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def copy_target(originals: dict, kind: str, dest: Path) -> Path:
    src = originals[kind]
    if src.is_dir():
        shutil.copytree(src, dest / src.name)
    else:
        shutil.copy(src, dest / src.name)
    return dest / src.name


def mutate_target(target: Path, rng: random.Random) -> str:
    """Mutate the file, or one file of the folder (sometimes deleting it); returns what was done."""
    f = target if target.is_file() else rng.choice(files_of(target))
    if target.is_dir() and rng.random() < 0.1:
        f.unlink()
        return f"deleted {f.relative_to(target)}"
    f.write_bytes(mutate_bytes(f.read_bytes(), rng))
    return f"mutated bytes of {f.name}"


# ----------------------------------------------------------------------------- the property


def run_briefly(model, tok) -> None:
    """A forward pass through the three networks at the model's own sizes."""
    cfg = model.cfg
    with torch.no_grad():
        ctx = model.text_encoder(tok(["a red circle"]))
        z = torch.randn(1, cfg.vae.embed_dim, cfg.latent_size, cfg.latent_size)
        model.unet(torch.randn(1, cfg.unet.in_channels, cfg.latent_size, cfg.latent_size), torch.tensor([10.0]), ctx)
        model.vae.decode(z)


def check(target: Path, kind: str, originals: dict, what: str) -> str:
    """Load ``target``; returns "loaded" or "refused", or fails the test on an escape."""
    try:
        if kind in ("ckpt", "safetensors"):
            model = load_original(target, config=originals["cfg"])
            tok = originals["tok"]
        else:
            loaded = load_model(target)
            model, tok = loaded.model, loaded.tokenizer
    except CheckpointError as e:
        msg = str(e)
        assert str(target) in msg, f"{what}: the error names no file: {msg}"
        assert "\n" not in msg, f"{what}: the error is not one line: {msg}"
        return "refused"
    except Exception as e:  # noqa: BLE001 - the property under test: nothing else may escape
        pytest.fail(f"{what}: {type(e).__name__} escaped the loader: {' '.join(str(e).split())[:300]}")
    try:
        if kind in ("ckpt", "safetensors"):
            run_briefly(model, tok)
        else:
            StableDiffusionPipeline(loaded).txt2img("a red circle", steps=1, seed=0)
    except OpenSDError:
        pass
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{what}: it loaded, then running it raised {type(e).__name__}: {' '.join(str(e).split())[:300]}")
    return "loaded"


def fuzz_bytes(originals: dict, root: Path, kind: str, seeds: range) -> dict[str, int]:
    tally = {"loaded": 0, "refused": 0}
    for seed in seeds:
        rng = random.Random(f"{kind}:{seed}")
        case = root / f"{kind}-{seed}"
        case.mkdir()
        target = copy_target(originals, kind, case)
        what = f"{kind} seed {seed} ({mutate_target(target, rng)})"
        tally[check(target, kind, originals, what)] += 1
        shutil.rmtree(case)
    return tally


@pytest.mark.parametrize("kind", KINDS)
def test_mutated_model_files_load_or_fail_cleanly(originals, tmp_path: Path, kind: str) -> None:
    tally = fuzz_bytes(originals, tmp_path, kind, range(15))
    assert sum(tally.values()) == 15


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_mutated_model_files_load_or_fail_cleanly_many(originals, tmp_path: Path, kind: str) -> None:
    n = 400  # 1,600 byte mutations over the four kinds
    tally = fuzz_bytes(originals, tmp_path, kind, range(1000, 1000 + n))
    print(f"{kind}: {tally}")
    assert sum(tally.values()) == n


# ----------------------------------------------------------------------------- JSON mutations

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=8)


def json_paths(doc: object, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside ``doc`` (keys and list indices), the root included."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += json_paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += json_paths(v, prefix + (i,))
    return out


def apply_json_mutation(doc: object, path: tuple, op: str, value: object) -> object:
    """Replace the value at ``path``, delete it, or add an unknown key beside it."""
    if not path:
        return value
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    if op == "replace":
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent["fuzz_unknown_key"] = value
    else:
        parent.insert(last, value)
    return doc


def json_files(folder: Path) -> list[Path]:
    return [p for p in files_of(folder) if p.suffix == ".json"]


def json_case(originals: dict, root: Path, kind: str, data) -> None:
    case = root / f"json-{kind}-{data.draw(st.integers(0, 2**62), label='case id')}"
    if case.exists():
        shutil.rmtree(case)
    case.mkdir()
    try:
        target = copy_target(originals, kind, case)
        f = data.draw(st.sampled_from(json_files(target)), label="file")
        doc = json.loads(f.read_text())
        path = data.draw(st.sampled_from(json_paths(doc)), label="path")
        op = data.draw(st.sampled_from(["replace", "delete", "add"]) if path else st.just("replace"), label="op")
        value = data.draw(json_values, label="value")
        f.write_text(json.dumps(apply_json_mutation(doc, path, op, value)))
        check(target, kind, originals, f"{kind}: {op} {path} of {f.relative_to(target)} with {value!r:.80}")
    finally:
        shutil.rmtree(case, ignore_errors=True)


@pytest.mark.parametrize("kind", ["opensd", "diffusers"])
def test_json_mutations_of_model_folders_load_or_fail_cleanly(originals, tmp_path: Path, kind: str) -> None:
    @settings(max_examples=15, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(st.data())
    def prop(data) -> None:
        json_case(originals, tmp_path, kind, data)

    prop()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["opensd", "diffusers"])
def test_json_mutations_of_model_folders_load_or_fail_cleanly_many(originals, tmp_path: Path, kind: str) -> None:
    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(st.data())
    def prop(data) -> None:
        json_case(originals, tmp_path, kind, data)

    prop()
