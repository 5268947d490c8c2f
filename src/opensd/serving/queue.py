"""The generation queue: bounded concurrency, per-request state, progress and interrupt.

Requests wait in a FIFO and run on ``workers`` threads (default 1: one generation at a
time, as A1111 runs them). Nothing is shared between requests: each :class:`Job` holds
its own step counters, stop flags and latest x0 prediction; seeds and random generators
are made per call inside the pipeline, which is stateless. A full queue refuses new work
with 429 instead of growing without bound.

``interrupt`` stops every running job at the end of its current sampling step (the
pipeline's step callback returns ``False``) and cancels its remaining batches; ``skip``
ends only the current batch. A job whose HTTP client went away is interrupted too.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch

from opensd.pipelines.images import to_pil
from opensd.pipelines.preview import linear_preview_for
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline, StepInfo
from opensd.serving.errors import ApiError

T = TypeVar("T")

# A1111's show_progress_type values that opensd implements (A1111 also has "Approx NN" and "TAESD").
PREVIEW_MODES = ("Full", "Approx cheap")


@dataclass
class Job:
    """One request's run, as ``/sdapi/v1/progress`` reports it."""

    kind: str  # "txt2img" | "img2img" | "openai"
    n_iter: int = 1
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    iteration: int = 0  # 0-based index of the batch being sampled
    step: int = 0  # steps finished in this batch
    steps: int = 0  # steps this batch will take
    pipeline: StableDiffusionPipeline | None = None  # set by the work function; used for previews
    denoised: torch.Tensor | None = None  # (1, C, h, w): the first image's latest x0 prediction
    interrupted: threading.Event = field(default_factory=threading.Event)
    skipped: threading.Event = field(default_factory=threading.Event)
    _preview: tuple[tuple[int, int, str], str] | None = None
    _preview_lock: threading.Lock = field(default_factory=threading.Lock)

    def callback(self, info: StepInfo) -> bool:
        """The pipeline's step callback: record progress; ``False`` stops sampling now."""
        self.step, self.steps = info.step, info.total
        self.denoised = info.denoised[:1].detach().clone()
        return not (self.interrupted.is_set() or self.skipped.is_set())

    def next_batch(self, iteration: int) -> None:
        self.iteration, self.step, self.denoised = iteration, 0, None
        self.skipped.clear()

    @property
    def progress(self) -> float:
        if self.finished is not None:
            return 1.0
        frac = self.step / self.steps if self.steps else 0.0
        return min(1.0, (self.iteration + frac) / max(1, self.n_iter))

    def eta(self) -> float:
        """Seconds left, extrapolated from the time spent so far."""
        p = self.progress
        if self.started is None or p <= 0:
            return 0.0
        spent = time.time() - self.started
        return max(0.0, spent / p - spent)

    def timestamp(self) -> str:
        return time.strftime("%Y%m%d%H%M%S", time.localtime(self.started or self.created))

    def preview_png(self, mode: str = "Full") -> str | None:
        """Base64 PNG of the current x0 prediction.

        ``mode`` is A1111's ``show_progress_type``: ``"Full"`` decodes with the VAE;
        ``"Approx cheap"`` applies a linear latent-to-RGB map fitted once per VAE
        (:mod:`opensd.pipelines.preview`), upscaled to the image size by nearest neighbour.
        Cached per step and mode, and one preview at a time: a poll that comes while one
        is made gets the previous preview rather than queueing another pass.
        """
        if mode not in PREVIEW_MODES:
            raise ValueError(f"preview mode must be one of {', '.join(PREVIEW_MODES)}; got {mode!r}")
        denoised, pipe, key = self.denoised, self.pipeline, (self.iteration, self.step, mode)
        if denoised is None or pipe is None:
            return None
        cached = self._preview
        if (cached is not None and cached[0] == key) or not self._preview_lock.acquire(blocking=False):
            return cached[1] if cached is not None else None
        try:
            vae = pipe.model.vae
            with torch.inference_mode():
                if mode == "Approx cheap":
                    image = linear_preview_for(vae).to_pil(vae.from_latent(denoised.float()))[0]
                else:
                    image = to_pil(pipe.decode_latents(denoised.to(pipe.model.device, pipe.model.dtype)))[0]
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            self._preview = (key, base64.b64encode(buf.getvalue()).decode("ascii"))
            return self._preview[1]
        finally:
            self._preview_lock.release()


class GenerationQueue:
    """Runs jobs on ``workers`` threads; at most ``max_pending`` jobs queued or running."""

    def __init__(self, workers: int = 1, max_pending: int = 32):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if max_pending < workers:
            raise ValueError(f"max_pending ({max_pending}) must be >= workers ({workers})")
        self.workers, self.max_pending = workers, max_pending
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="opensd-generate")
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}  # queued or running, in arrival order

    async def submit(self, job: Job, work: Callable[[Job], T]) -> T:
        """Run ``work(job)`` on a worker thread and wait for its result (429 when the queue is full)."""
        with self._lock:
            if len(self._jobs) >= self.max_pending:
                raise ApiError(429, f"the generation queue is full ({self.max_pending} requests); retry later", kind="QueueFull")
            self._jobs[job.id] = job

        def run() -> T:
            job.started = time.time()
            try:
                return work(job)
            finally:
                job.finished = time.time()
                with self._lock:
                    self._jobs.pop(job.id, None)

        fut = self._pool.submit(run)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:  # the client went away: stop the work it asked for
            job.interrupted.set()
            if fut.cancel():
                with self._lock:
                    self._jobs.pop(job.id, None)
            raise

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def current(self) -> Job | None:
        """The job ``/progress`` reports: the oldest running one, else the oldest queued one."""
        jobs = self.jobs()
        running = [j for j in jobs if j.started is not None and j.finished is None]
        return running[0] if running else (jobs[0] if jobs else None)

    def pending(self) -> int:
        return sum(1 for j in self.jobs() if j.started is None)

    def interrupt(self) -> int:
        """Stop every running job at its next step boundary; returns how many were told."""
        running = [j for j in self.jobs() if j.started is not None and j.finished is None]
        for j in running:
            j.interrupted.set()
        return len(running)

    def skip(self) -> int:
        """End the current batch of every running job (later batches still run)."""
        running = [j for j in self.jobs() if j.started is not None and j.finished is None]
        for j in running:
            j.skipped.set()
        return len(running)

    def close(self) -> None:
        for j in self.jobs():
            j.interrupted.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def run_batches(job: Job, pipeline: StableDiffusionPipeline, requests: list, *, init_image=None, mask=None) -> list:
    """The worker body of a generation request: batch after batch, stopping when told.

    Returns one :class:`GenerationResult` per batch that ran (none after an interrupt).
    """
    job.pipeline = pipeline
    results = []
    for k, req in enumerate(requests):
        if job.interrupted.is_set():
            break
        job.next_batch(k)
        results.append(pipeline.generate(req, init_image=init_image, mask=mask, callback=job.callback))
    return results
