"""The server's model switch with broken models: a 4xx naming the model, and the current one keeps serving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import one_thread_direct_loopback, tiny_word_bundle

from opensd.checkpoints.diffusers_folder import save_diffusers
from opensd.checkpoints.opensd_format import save_opensd
from opensd.serving import create_app


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """A good opensd model beside a random-bytes .ckpt, an opensd folder with a broken
    tokenizer.json and a diffusers folder whose U-Net config says ``"sample_size": []``."""
    root = tmp_path_factory.mktemp("models")
    model, tok = tiny_word_bundle()
    save_opensd(model, tok, root / "good")
    (root / "corrupt.ckpt").write_bytes(bytes(range(7, 250)) * 40)
    save_opensd(model, tok, root / "broken-tokenizer")
    (root / "broken-tokenizer" / "tokenizer" / "tokenizer.json").write_text('{"model": {"type": "WordLev')
    save_diffusers(model, tok, root / "bad-diffusers")
    cfg_file = root / "bad-diffusers" / "unet" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "sample_size": []}))
    return root


@pytest.fixture(scope="module")
def client(models_dir: Path):
    with one_thread_direct_loopback(), TestClient(create_app(models_dir / "good", models_dir=models_dir)) as c:
        yield c


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("corrupt.ckpt", "is not a checkpoint at all"),
        ("broken-tokenizer", "tokenizer.json is not valid JSON"),
        ("bad-diffusers", "sample_size must be a positive integer"),
    ],
)
def test_switching_to_a_broken_model_is_a_4xx_and_the_current_model_stays(client, name: str, problem: str) -> None:
    before = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    assert before.startswith("good")
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert f"model {name!r} cannot be loaded" in detail and problem in detail and "\n" not in detail
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == before
    # a request that asks for the broken model in its override_settings is refused the same way
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 1, "width": 32, "height": 32,
                                                "override_settings": {"sd_model_checkpoint": name}})
    assert r.status_code == 422 and problem in r.json()["detail"], r.text
    # and the current model still draws
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 1, "width": 32, "height": 32})
    assert r.status_code == 200 and len(r.json()["images"]) == 1, r.text


def test_broken_models_are_listed(client) -> None:
    """They are models in the folder: listed (so a client can name them), refused when loaded."""
    names = {m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()}
    assert {"good", "corrupt", "broken-tokenizer", "bad-diffusers"} <= names


def test_the_servers_precision_holds_for_models_switched_to_later(tmp_path: Path) -> None:
    import torch

    model, tok = tiny_word_bundle()
    save_opensd(model, tok, tmp_path / "first")
    save_diffusers(model, tok, tmp_path / "second")
    app = create_app(tmp_path / "first", models_dir=tmp_path, precision="bf16")  # bf16 works on any CPU (slowly without native support)
    registry = app.state.opensd.registry
    assert registry.current.model.dtype == torch.bfloat16 and registry.current.precision.reason == "bf16, as asked"
    with one_thread_direct_loopback(), TestClient(app) as c:
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "second"})
        assert r.status_code == 200, r.text
        assert {t.dtype for t in registry.current.model.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 1, "width": 32, "height": 32})
        assert r.status_code == 200 and len(r.json()["images"]) == 1, r.text
    with pytest.warns(UserWarning, match="fp16 on a CPU is slow"):  # the older keyword is still read
        old = create_app(tmp_path / "first", dtype=torch.float16)
    assert old.state.opensd.registry.current.model.dtype == torch.float16
