"""Stopping work nobody waits for: a client that goes away, the wall-time limit, and stops
during prompt encoding and VAE encode/decode.

The server tests run a real uvicorn on a free 127.0.0.1 port (``serve_in_thread``) and a
raw socket client that sends a request and closes the connection mid-generation. The
model is a tiny random one (32 px); :class:`helpers.SlowPipeline` pauses after each
step so that a test can act while a job runs.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from helpers import SlowPipeline, tiny_loaded, tiny_word_bundle

from opensd.checkpoints import LoadedModel
from opensd.diffusion import Interrupted
from opensd.pipelines.request import GenerationRequest
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.pipelines.vae_tiling import DEFAULT_OVERLAP, DEFAULT_TILE, tile_starts
from opensd.serving import Limits, create_app
from opensd.serving.background import serve_in_thread
from opensd.serving.queue import Job

TIMEOUT = 60.0
PAUSE = 0.1  # seconds per step of the slow pipeline


pytestmark = pytest.mark.usefixtures("one_thread_loopback")


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_loaded(seed=5)


def wait_until(condition, timeout: float = 30.0, what: str = "the condition") -> float:
    """Poll ``condition`` until true; the seconds it took (fails after ``timeout``)."""
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, f"{what} did not happen within {timeout} s"
        time.sleep(0.01)
    return time.monotonic() - t0


def send_and_keep_open(url: str, path: str, body: dict) -> socket.socket:
    """POST ``body`` on a raw socket and return it without reading the answer."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


def hang_up(sock: socket.socket) -> None:
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def test_a_client_that_disconnects_frees_the_worker_and_its_queue_slot(loaded) -> None:
    slow = SlowPipeline(loaded, pause=PAUSE)
    app = create_app(slow, limits=Limits(workers=1, max_queue=2))
    queue = app.state.opensd.queue
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        sock = send_and_keep_open(url, "/sdapi/v1/txt2img", {"prompt": "a red circle", "steps": 150, "seed": 1})
        wait_until(lambda: slow.steps_done >= 3, what="the first steps")
        p = http.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()
        assert p["state"]["job"].startswith("txt2img") and p["state"]["sampling_steps"] == 150
        at_close = slow.steps_done
        hang_up(sock)
        took = wait_until(lambda: not queue.jobs(), timeout=10, what="the abandoned job leaving the queue")
        assert took < 2.0  # about one step (0.1 s) plus the server's 0.1 s poll, on a loaded machine
        stopped_at = slow.steps_done
        assert stopped_at - at_close <= 3  # the step under way, and at most two while the server noticed
        time.sleep(3 * PAUSE)
        assert slow.steps_done == stopped_at  # the worker is idle: no step was taken since
        p = http.get("/sdapi/v1/progress").json()
        assert p["state"]["job_count"] == 0 and p["state"]["queue_pending"] == 0 and p["progress"] == 0
        # the slot and the worker are free: a new request runs at once, not after 150 steps
        t0 = time.monotonic()
        r = http.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "seed": 1})
        assert r.status_code == 200 and json.loads(r.json()["info"])["interrupted"] is False
        assert time.monotonic() - t0 < 5.0


def test_a_queued_request_whose_client_disconnects_leaves_the_queue_at_once(loaded) -> None:
    slow = SlowPipeline(loaded, pause=PAUSE)
    app = create_app(slow, limits=Limits(workers=1, max_queue=2))
    queue = app.state.opensd.queue
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        running: dict = {}
        first = threading.Thread(target=lambda: running.update(r=http.post(
            "/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 150, "seed": 2})))
        first.start()
        wait_until(lambda: slow.steps_done >= 1, what="the first job starting")
        sock = send_and_keep_open(url, "/sdapi/v1/txt2img", {"prompt": "a blue square", "steps": 150, "seed": 3})
        wait_until(lambda: queue.pending() == 1, what="the second request waiting")
        r = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1})
        assert r.status_code == 429  # two places, both taken
        hang_up(sock)
        took = wait_until(lambda: queue.pending() == 0, timeout=10, what="the abandoned request leaving the queue")
        assert took < 2.0 and len(queue.jobs()) == 1  # the running job goes on
        assert http.get("/sdapi/v1/progress").json()["state"]["queue_pending"] == 0
        assert http.post("/sdapi/v1/interrupt").status_code == 200
        first.join(TIMEOUT)
        assert running["r"].status_code == 200 and json.loads(running["r"].json()["info"])["interrupted"] is True
        r = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1})
        assert r.status_code == 200


def test_the_wall_time_limit_stops_the_job_with_a_clear_error(loaded) -> None:
    slow = SlowPipeline(loaded, pause=PAUSE)
    app = create_app(slow, limits=Limits(max_seconds=1))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        t0 = time.monotonic()
        r = http.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 150, "n_iter": 2, "seed": 1})
        took = time.monotonic() - t0
        assert r.status_code == 422 and r.json()["error"] == "TimeLimitExceeded", r.text
        assert "time limit of 1 s" in r.json()["detail"] and "batch 1 of 2" in r.json()["detail"]
        assert took < 1.0 + 5 * PAUSE + 1.0 and slow.steps_done < 150
        assert not app.state.opensd.queue.jobs()
        r = http.post("/v1/images/generations", json={"prompt": "a red circle", "steps": 150})
        assert r.status_code == 400 and r.json()["error"]["code"] == "TimeLimitExceeded"  # OpenAI's shape
        r = http.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2})
        assert r.status_code == 200


# ---------------------------------------------------------------- stops outside sampling, in the pipeline


class Counter:
    """``should_stop`` that answers True from its ``n``-th call on, and counts the calls."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


def test_prompt_encoding_stops_between_chunks_and_gives_the_same_embedding(loaded) -> None:
    pipe = StableDiffusionPipeline(loaded)
    prompt = ", ".join(["a red circle above a blue square"] * 12)  # many chunks of the tiny context
    chunks = pipe.encode_prompt([prompt]).shape[1] // loaded.tokenizer.context_length
    assert chunks >= 4
    assert torch.equal(pipe.encode_prompt([prompt], should_stop=lambda: False), pipe.encode_prompt([prompt]))
    stop = Counter(3)
    with pytest.raises(Interrupted, match="encoding the prompt"):
        pipe.encode_prompt([prompt], should_stop=stop)
    assert stop.calls == 3 < chunks  # stopped before the third chunk, not after all of them
    steps = []
    with pytest.raises(Interrupted):
        pipe.generate(GenerationRequest(prompt, steps=3, width=32, height=32, seed=1), callback=steps.append, should_stop=Counter(2))
    assert steps == []  # sampling never began


class CountingVAE(torch.nn.Module):
    """Wraps a VAE and counts its decode and encode calls (one per tile when tiled)."""

    def __init__(self, vae):
        super().__init__()
        self.inner, self.cfg, self.decodes, self.encodes = vae, vae.cfg, 0, 0

    def decode(self, z):
        self.decodes += 1
        return self.inner.decode(z)

    def encode(self, x):
        self.encodes += 1
        return self.inner.encode(x)

    def from_latent(self, z):
        return self.inner.from_latent(z)


def test_tiled_vae_decode_and_encode_stop_between_tiles() -> None:
    model, tok = tiny_word_bundle(seed=6)  # this test's own model: its VAE is swapped for a counting one
    vae = CountingVAE(model.first_stage_model)
    model.first_stage_model = vae
    pipe = StableDiffusionPipeline(LoadedModel(model, tok, "tiny", Path("."), "opensd", "0" * 10))
    f = vae.cfg.downsample_factor
    cells = DEFAULT_TILE + DEFAULT_TILE // 4  # two tiles a side: four in all
    latents = torch.zeros(1, vae.cfg.embed_dim, cells, cells)
    assert len(tile_starts(cells, DEFAULT_TILE, DEFAULT_OVERLAP)) == 2
    with pytest.raises(Interrupted, match="decoding"):
        pipe.decode_latents(latents, tiled_vae=True, should_stop=Counter(2))
    assert vae.decodes == 1  # the second of four tiles was not decoded
    with pytest.raises(Interrupted, match="encoding the image"):
        pipe.encode_pixels(torch.zeros(1, 3, cells * f, cells * f), tiled_vae=True, should_stop=Counter(3))
    assert vae.encodes == 2


def test_interrupt_semantics_of_a_job() -> None:
    job = Job("txt2img")
    job.start()
    assert not job.should_stop()
    job.interrupted.set()
    assert job.should_stop()  # before sampling (prompt encoding, img2img encode): stop now
    job.next_batch(0)

    class Info:
        step, total, denoised = 1, 10, torch.zeros(1, 4, 2, 2)

    assert job.callback(Info()) is False  # sampling stops at this step ...
    assert not job.should_stop()  # ... and its partial image is decoded, as A1111 returns it
    job.abandoned.set()
    assert job.should_stop()  # a client that went away: the decode stops too
    timed = Job("txt2img", max_seconds=0.05)
    timed.start()
    assert not timed.should_stop()
    time.sleep(0.06)
    assert timed.should_stop() and timed.timed_out.is_set()
