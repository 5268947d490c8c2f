"""What the server trusts: its credentials (a blank one never turns auth off) and its models folder
(symlinks keep their own names; a broken folder or model is an error that names it, never a 500)."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import tiny_word_bundle
from typer.testing import CliRunner

from opensd.checkpoints.opensd_format import save_opensd
from opensd.cli.main import app as cli_app
from opensd.errors import OpenSDError
from opensd.serving import create_app
from opensd.serving.security import parse_auth

BLANK_SPECS = [
    "", " ", "\t", "alice:", ":hunter2", " : ", "alice: ", "  :hunter2", "alice:hunter2,", "alice:hunter2, ,bob:pw2",
    "alice:hunter2,:", "alice:hunter2,bob:\t", "hunter2",
]


@pytest.mark.parametrize("spec", BLANK_SPECS)
def test_a_blank_credential_is_an_error_and_never_means_no_auth(spec: str) -> None:
    with pytest.raises(OpenSDError) as e:
        create_app(object(), auth=spec)  # refused before the model is looked at
    message = str(e.value)
    assert "--api-auth" in message and "user:password" in message, message
    assert "hunter2" not in message and "pw2" not in message  # never repeated: it may be a password


@pytest.mark.parametrize("pairs", [[], [("", "p")], [("u", "")], [("u", " ")], [("u", "p"), ("\t", "q")], [("u",)]])
def test_blank_credential_pairs_are_refused_too(pairs) -> None:
    with pytest.raises(OpenSDError, match="auth"):
        create_app(object(), auth=pairs)


def test_good_credentials_still_parse() -> None:
    assert parse_auth(None) is None
    assert parse_auth("me:secret") == [("me", "secret")]
    assert parse_auth(" a:b , c:d:e ") == [("a", "b"), ("c", "d:e")]  # a password may hold ':'


@pytest.mark.parametrize("spec", [" ", "user:", ":pass"])
def test_cli_refuses_a_blank_api_auth_in_one_line_before_loading_a_model(spec: str, monkeypatch) -> None:
    monkeypatch.delenv("OPENSD_API_AUTH", raising=False)
    res = CliRunner().invoke(cli_app, ["serve", "--api-auth", spec, "--host", "0.0.0.0"])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: --api-auth"), res.output
    res = CliRunner().invoke(cli_app, ["serve", "--host", "0.0.0.0"], env={"OPENSD_API_AUTH": spec})
    assert res.exit_code == 2 and res.output.startswith("error: --api-auth"), res.output


# ---------------------------------------------------------------- the models folder


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("real-model", 0), ("other", 1)):
        model, tok = tiny_word_bundle(seed)
        save_opensd(model, tok, root / name)
    os.symlink(root / "real-model", root / "my-alias")
    os.symlink(root / "nowhere", root / "broken.safetensors")
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    shutil.copytree(root / "other", root / "no-tokenizer")
    shutil.rmtree(root / "no-tokenizer" / "tokenizer")
    return root


def test_a_symlinked_model_is_listed_by_the_links_name_and_switched_to_by_it(models_dir: Path) -> None:
    c = TestClient(create_app(models_dir / "other", models_dir=models_dir))
    listed = {m["model_name"]: m for m in c.get("/sdapi/v1/sd-models").json()}
    assert {"my-alias", "real-model", "other"} <= set(listed), listed
    alias = listed["my-alias"]
    assert alias["title"].startswith("my-alias [") and alias["filename"] == str(models_dir / "my-alias")
    assert alias["hash"] == listed["real-model"]["hash"]  # the same weights
    assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "my-alias"}).status_code == 200
    assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == alias["title"]
    r = c.post("/sdapi/v1/txt2img", json={"steps": 1, "override_settings": {"sd_model_checkpoint": "my-alias"}})
    assert r.status_code == 200, r.text


def test_a_bad_model_in_the_folder_is_an_error_naming_its_file_and_the_current_model_stays(models_dir: Path) -> None:
    c = TestClient(create_app(models_dir / "other", models_dir=models_dir), raise_server_exceptions=False)
    before = c.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    for name, names in [
        ("corrupt", str(models_dir / "corrupt.safetensors")),
        ("no-tokenizer", str(models_dir / "no-tokenizer" / "tokenizer")),
        ("broken", "'broken' not found"),  # a dangling link is not listed
    ]:
        for r in (
            c.post("/sdapi/v1/options", json={"sd_model_checkpoint": name}),
            c.post("/sdapi/v1/txt2img", json={"steps": 1, "override_settings": {"sd_model_checkpoint": name}}),
        ):
            assert 400 <= r.status_code < 500 and names in r.json()["detail"], (name, r.status_code, r.text)
    r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": 7})
    assert r.status_code == 422 and "got 7" in r.json()["detail"], r.text
    assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == before


def test_a_models_folder_that_vanished_is_a_503_naming_it_not_a_500(tmp_path: Path, models_dir: Path) -> None:
    folder = tmp_path / "models"
    shutil.copytree(models_dir / "other", folder / "other")
    c = TestClient(create_app(folder / "other", models_dir=folder), raise_server_exceptions=False)
    shutil.rmtree(folder)
    for r in (c.get("/sdapi/v1/sd-models"), c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "x"})):
        assert r.status_code == 503 and str(folder) in r.json()["detail"], r.text
    assert c.post("/sdapi/v1/txt2img", json={"steps": 1}).status_code == 200  # the loaded model still draws


def test_auth_answers_401_in_the_json_shape_and_lets_the_right_credentials_through(models_dir: Path) -> None:
    c = TestClient(create_app(models_dir / "other", auth="me:s3cret"))
    assert c.get("/sdapi/v1/samplers").status_code == 401
    wrong = {"Authorization": "Basic " + base64.b64encode(b"me: s3cret").decode()}
    r = c.get("/openapi.json", headers=wrong)
    assert r.status_code == 401 and r.json()["error"] == "Unauthorized" and r.headers["www-authenticate"].startswith("Basic")
    right = {"Authorization": "Basic " + base64.b64encode(b"me:s3cret").decode()}
    assert c.get("/openapi.json", headers=right).json()["security"] == [{"basic": []}]


def test_a_link_pointed_elsewhere_while_serving_switches_to_the_new_target(tmp_path: Path, models_dir: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    os.symlink(models_dir / "real-model", folder / "current")
    c = TestClient(create_app(models_dir=folder), raise_server_exceptions=False)
    first = c.get("/sdapi/v1/sd-models").json()[0]
    (folder / "current").unlink()
    os.symlink(models_dir / "other", folder / "current")  # the operator repoints the link
    assert c.post("/sdapi/v1/txt2img", json={"steps": 1}).status_code == 200  # the loaded model still draws
    assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "current"}).status_code == 200
    now = c.get("/sdapi/v1/sd-models").json()[0]
    assert now["model_name"] == "current" and now["hash"] != first["hash"]
    assert c.post("/sdapi/v1/txt2img", json={"steps": 1}).status_code == 200
