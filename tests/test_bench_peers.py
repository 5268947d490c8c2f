"""benchmarks/peers.py without the peers: missing peers are skipped with a line, the weight
writer's files load in opensd, and a real opensd worker answers the protocol. No timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import peer_weights  # noqa: E402
import peers  # noqa: E402


def test_missing_peer_is_skipped_with_a_line(tmp_path, capsys):
    python, why = peers.peer_python(str(tmp_path / "no-such-python"), "sdcpp")
    assert python is None and "skipped" in why and "sdcpp" in why
    # an interpreter without the package (this one has no stable_diffusion_cpp / optimum.intel)
    for engine, package in peers.PEER_PACKAGES.items():
        try:
            __import__(package)
        except ImportError:
            python, why = peers.peer_python(sys.executable, engine)
            assert python is None and package in why


def test_main_with_no_peers_runs_nothing_heavy(tmp_path, capsys):
    code = peers.main(["--models", "tiny", "--peers", "sdcpp,openvino", "--sdcpp-python", str(tmp_path / "none"),
                       "--openvino-python", str(tmp_path / "none"), "--weights", str(tmp_path / "w"),
                       "--repeats", "1", "--steps", "1", "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "sdcpp: skipped" in out and "openvino: skipped" in out
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["skipped"] == ["sdcpp", "openvino"]
    assert report["results"][0]["blocks"] == [] and report["results"][0]["opensd_errors"] == {}


def test_weight_files_load_in_opensd_with_equal_tensors(tmp_path):
    from opensd.checkpoints import load_model
    from opensd.checkpoints.original import load_original

    files = peer_weights.write(tmp_path, "tiny")
    model = load_model(files.diffusers).model
    folder = model.state_dict()
    # the single file holds no config and the tiny shapes are no known family's: read with the folder's
    single = load_original(files.single_file, config=model.cfg).state_dict()
    assert single.keys() == folder.keys()
    for k in single:
        torch.testing.assert_close(single[k], folder[k], rtol=0, atol=0, msg=k)
    # written once: a second call reuses the files
    mtime = files.single_file.stat().st_mtime_ns
    assert peer_weights.write(tmp_path, "tiny").single_file.stat().st_mtime_ns == mtime


def test_opensd_worker_answers_the_protocol(tmp_path):
    files = peer_weights.write(tmp_path, "tiny")
    job = peers.Job("tiny", 32, 32, steps=1, cfg=7.5, seed=1, threads=1)
    w = peers.Worker(sys.executable, "opensd", "fp32", str(files.diffusers), job, tmp_path, peers.opensd_env())
    try:
        assert w.error is None and w.load_s > 0
        assert w.info["dtype"] == "float32" and "fp32" in w.info["reason"]
        block = peers.Block("opensd", "fp32")
        peers.timed_block(block, [w], repeats=2)
        assert len(block.times["opensd fp32"]) == 2 and all(t > 0 for t in block.times["opensd fp32"])
    finally:
        w.close()


def test_a_worker_that_cannot_load_reports_its_error(tmp_path):
    job = peers.Job("tiny", 32, 32, steps=1, cfg=7.5, seed=1, threads=1)
    w = peers.Worker(sys.executable, "opensd", "fp32", str(tmp_path / "missing"), job, tmp_path, peers.opensd_env())
    try:
        assert w.error and "\n" not in w.error
        with pytest.raises(RuntimeError):
            w.run()
    finally:
        w.close()


def test_table_reports_errors_and_verdicts():
    result = {"model": "sd15", "size": 256, "steps": 4, "cfg": 7.5, "blocks": [
        {"peer": "sdcpp", "variant": "f32", "error": None, "median_s": {"sdcpp f32": 4.0, "opensd auto": 1.0, "opensd fp32": 3.0},
         "ratio_opensd_over_peer": {"auto": 0.25, "fp32": 0.75}},
        {"peer": "sdcpp", "variant": "q8_0", "error": None, "median_s": {"sdcpp q8_0": 2.0, "opensd auto": 1.2, "opensd fp32": 3.0},
         "ratio_opensd_over_peer": {"auto": 0.6, "fp32": 1.5}},
        {"peer": "openvino", "variant": "f32", "error": "ValueError: no", "median_s": {}},
    ]}
    text = peers.table(result)
    assert "cannot run: ValueError: no" in text
    assert "fastest (q8_0" in text and "0.60" in text and "not met" in text


def test_fp32_column_is_auto_only_where_auto_is_fp32():
    block = peers.Block("sdcpp", "f32", times={"opensd auto": [1.0, 3.0, 2.0], "sdcpp f32": [4.0, 4.0, 4.0]},
                        info={"opensd auto": {"dtype": "float32"}})
    assert block.median("opensd fp32") == 2.0
    out = block.to_json()
    assert out["median_s"]["opensd fp32"] == 2.0 and out["ratio_opensd_over_peer"] == {"auto": 0.5, "fp32": 0.5}
    block.info["opensd auto"] = {"dtype": "bfloat16"}  # then fp32 is its own worker, and here it has no timing
    assert block.median("opensd fp32") is None
    assert "opensd fp32" not in block.to_json()["median_s"]


def test_openvino_bf16_skipped_without_native_bf16(monkeypatch):
    monkeypatch.setattr(peers, "cpu_flags", lambda: {"avx2": True, "avx512_bf16": False, "amx_bf16": False})
    assert "not run" in peers.skip_variant("openvino", "bf16")
    assert peers.skip_variant("openvino", "f32") == "" and peers.skip_variant("sdcpp", "f16") == ""
    monkeypatch.setattr(peers, "cpu_flags", lambda: {"avx2": True, "avx512_bf16": True, "amx_bf16": False})
    assert peers.skip_variant("openvino", "bf16") == ""


def test_table_lists_notes():
    result = {"model": "tiny", "size": 32, "steps": 4, "cfg": 7.5, "blocks": [], "notes": ["opensd fp32 is opensd auto here"]}
    assert "Note: opensd fp32 is opensd auto here." in peers.table(result)


def test_plan_runs_each_peers_first_variant_first():
    args = peers.parse(["--sdcpp-types", "q8_0,f16,f32", "--openvino-types", "f32"])
    both = {"sdcpp": "py", "openvino": "py"}
    assert peers.plan(args, both) == [("sdcpp", "q8_0"), ("openvino", "f32"), ("sdcpp", "f16"), ("sdcpp", "f32")]
    assert peers.plan(args, {"openvino": "py"}) == [("openvino", "f32")]
    with pytest.raises(SystemExit):
        peers.parse(["--sdcpp-types", "q4_k"])
