"""One error base: every user-facing error is an OpenSDError; the CLI and the server map it, and anything else is a bug shown as one line."""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil

import pytest
import torch
from fastapi.testclient import TestClient
from helpers import tiny_loaded
from typer.testing import CliRunner

import opensd
from opensd.cli.main import app as cli_app
from opensd.devices import DeviceError, resolve_device
from opensd.errors import OpenSDError


def _all_modules():
    for info in pkgutil.walk_packages(opensd.__path__, "opensd."):
        yield importlib.import_module(info.name)


def test_every_error_class_in_opensd_derives_from_the_one_base() -> None:
    found = set()
    for module in _all_modules():
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == module.__name__ and name.endswith("Error"):
                found.add(obj)
    outside = sorted(c.__qualname__ for c in found if not issubclass(c, OpenSDError) and c.__name__ != "NonFiniteLossError")
    assert len(found) > 20
    assert outside == [], f"error classes outside OpenSDError: {outside}"


def test_resolve_device_names_what_exists() -> None:
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(DeviceError, match="unknown device 'tpu'.*cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available.*available: cpu"):
            resolve_device("cuda:0")


def test_cli_maps_user_errors_to_one_line_and_bugs_to_one_line_with_a_hint(monkeypatch) -> None:
    runner = CliRunner()
    res = runner.invoke(cli_app, ["info", "/no/such/model"])
    assert res.exit_code == 2 and res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1, res.output

    import opensd.checkpoints.info as info_mod

    def boom(path, **kw):
        raise KeyError("a bug")

    monkeypatch.setattr(info_mod, "describe", boom)
    monkeypatch.delenv("OPENSD_DEBUG", raising=False)
    res = runner.invoke(cli_app, ["info", "x"])
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert lines[0] == "internal error: KeyError: 'a bug'" and "--debug" in lines[1] and "Traceback" not in res.output
    res = runner.invoke(cli_app, ["--debug", "info", "x"])
    assert isinstance(res.exception, KeyError)  # --debug lets the traceback through
    monkeypatch.delenv("OPENSD_DEBUG", raising=False)


def test_server_answers_a_bug_with_500_and_a_request_id_that_the_log_repeats(monkeypatch, caplog) -> None:
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
    from opensd.serving import a1111, create_app

    client = TestClient(create_app(StableDiffusionPipeline(tiny_loaded())), raise_server_exceptions=False)

    def boom(*a, **k):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(a1111, "plan_generation", boom)
    with caplog.at_level(logging.ERROR, logger="opensd.serving"):
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 1})
    assert r.status_code == 500
    body = r.json()
    assert body["error"] == "InternalServerError" and "secret" not in r.text
    rid = body["request_id"]
    assert rid in body["detail"] and any(rid in rec.getMessage() for rec in caplog.records)

