"""A bounded load test: many clients against a real server on 127.0.0.1.

N clients send M requests each, at the same time, to uvicorn (``serve_in_thread``) with
two workers; every answer must equal the same request run alone, one after another.
Then 100 more requests must leave no trace: the process's RSS stays flat, no job object
survives and the queue is empty. A full queue must answer clean 429s with
``Retry-After``, and clients that wait that long get through. The model is a tiny random
one at its native 32 px, 1-2 steps. ``-m slow`` runs a larger variant.
"""

from __future__ import annotations

import gc
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from helpers import SlowPipeline, tiny_loaded
from helpers import png_pixels as pixels

from opensd.checkpoints import LoadedModel
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.serving import Limits, create_app
from opensd.serving.background import serve_in_thread
from opensd.serving.queue import Job

TIMEOUT = 120.0
PROMPTS = ["a red circle", "a small blue square above a green triangle", "there is a large cyan triangle"]
SAMPLERS = ["Euler a", "DPM++ 2M", "Euler", "DPM++ SDE"]  # the stochastic ones need per-request generators


pytestmark = pytest.mark.usefixtures("one_thread_loopback")


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_loaded(seed=7)


def request(i: int) -> dict:
    return {
        "prompt": PROMPTS[i % 3], "negative_prompt": "blurry" if i % 2 else "", "seed": 100 + 13 * i,
        "sampler_name": SAMPLERS[i % 4], "steps": 1 + i % 2, "batch_size": 1 + (i % 5 == 0), "cfg_scale": 4 + i % 3,
    }


def rss_bytes() -> int:
    """This process's resident set size (Linux: /proc/self/statm)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_jobs() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Job)


def post_all(url: str, requests: list[dict], clients: int) -> list[httpx.Response]:
    """``requests`` split over ``clients`` threads (client c sends requests c, c+clients, ...), answers in order."""

    def client(c: int) -> list[tuple[int, httpx.Response]]:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
            return [(i, http.post("/sdapi/v1/txt2img", json=requests[i])) for i in range(c, len(requests), clients)]

    with ThreadPoolExecutor(clients) as pool:
        answers = dict(pair for part in pool.map(client, range(clients)) for pair in part)
    return [answers[i] for i in range(len(requests))]


def same_images(a: httpx.Response, b: httpx.Response) -> bool:
    ia, ib = json.loads(a.json()["info"]), json.loads(b.json()["info"])
    if ia["all_seeds"] != ib["all_seeds"] or ia["infotexts"] != ib["infotexts"]:
        return False
    xs, ys = a.json()["images"], b.json()["images"]
    return len(xs) == len(ys) and all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(xs, ys, strict=True))


def load_run(loaded: LoadedModel, clients: int, per_client: int, leak_requests: int) -> dict:
    """The load test proper; returns the counts it measured."""
    app = create_app(StableDiffusionPipeline(loaded), limits=Limits(workers=2, max_queue=clients + 2))
    queue = app.state.opensd.queue
    requests = [request(i) for i in range(clients * per_client)]
    with serve_in_thread(app) as url:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
            alone = [http.post("/sdapi/v1/txt2img", json=r) for r in requests]
        assert all(r.status_code == 200 for r in alone), [r.text for r in alone if r.status_code != 200]
        together = post_all(url, requests, clients)
        assert all(r.status_code == 200 for r in together), [r.text for r in together if r.status_code != 200]
        differ = [i for i, (a, b) in enumerate(zip(alone, together, strict=True)) if not same_images(a, b)]
        assert not differ, f"requests {differ} gave other images under load than alone"

        jobs_before, rss_before = live_jobs(), rss_bytes()
        more = [dict(request(i), steps=1, batch_size=1) for i in range(leak_requests)]
        answers = post_all(url, more, clients)
        assert all(r.status_code == 200 for r in answers)
        del answers
        growth = rss_bytes() - rss_before
        jobs_after = live_jobs()
        assert not queue.jobs() and queue.pending() == 0
    assert jobs_after <= jobs_before  # no job outlives its request
    assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over {leak_requests} requests"
    return {"requests": 2 * len(requests) + leak_requests, "rss_growth_mib": round(growth / 2**20, 1), "jobs_left": jobs_after}


def queue_full_run(loaded: LoadedModel, clients: int) -> dict:
    """``clients`` requests at once on a queue of 2: clean 429s with Retry-After, and all get through by waiting it."""
    slow = SlowPipeline(loaded, pause=0.05)
    app = create_app(slow, limits=Limits(workers=1, max_queue=2))
    refusals: list[httpx.Response] = []

    def client(i: int) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
            while True:
                r = http.post("/sdapi/v1/txt2img", json={"prompt": PROMPTS[i % 3], "steps": 4, "seed": i})
                if r.status_code != 429:
                    return r
                refusals.append(r)
                time.sleep(int(r.headers["retry-after"]))

    with serve_in_thread(app) as url:
        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(client, range(clients)))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    assert refusals, "the queue of 2 never filled"
    for r in refusals:
        assert r.json()["error"] == "QueueFull" and "queue is full (2 requests)" in r.json()["detail"]
        assert 1 <= int(r.headers["retry-after"]) <= 60
    return {"clients": clients, "served": len(answers), "refused_429": len(refusals)}


def test_load_clients_get_what_they_would_alone_and_nothing_leaks(loaded) -> None:
    counts = load_run(loaded, clients=4, per_client=2, leak_requests=100)
    print("load:", counts)


def test_a_full_queue_answers_429_with_retry_after(loaded) -> None:
    counts = queue_full_run(loaded, clients=6)
    print("queue full:", counts)


@pytest.mark.slow
def test_load_larger(loaded) -> None:
    print("load:", load_run(loaded, clients=8, per_client=8, leak_requests=500))
    print("queue full:", queue_full_run(loaded, clients=16))
