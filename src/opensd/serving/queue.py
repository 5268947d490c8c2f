"""The generation queue: bounded concurrency, per-request state, progress and stopping.

Requests wait in a FIFO and run on ``workers`` threads (default 1: one generation at a
time, as A1111 runs them). Nothing is shared between requests: each :class:`Job` holds
its own step counters, stop flags, deadline and latest x0 prediction; seeds and random
generators are made per call inside the pipeline, which is stateless.

A request takes its place in the queue *before* anything about it is parsed or checked
(:meth:`GenerationQueue.submit`): a full queue answers 429 with ``Retry-After`` at once,
and at most ``max_pending`` requests are being planned, waiting or running.

How a job stops:

- ``/interrupt`` stops every running job: at the end of its current sampling step (the
  step callback returns ``False``; the partial image is decoded and returned, as A1111
  does), or at the next prompt chunk or VAE tile when it comes while the job encodes or
  decodes (that batch then gives no image). Later batches are cancelled.
- ``/skip`` ends only the current batch's sampling.
- A client that disconnects abandons its job: a queued one leaves the queue at once, a
  running one stops at its next step, prompt chunk or VAE tile, and its slot is free as
  soon as the worker stops. The server notices by polling the connection while it waits.
- ``max_seconds`` (the wall time since the job started running) stops it the same way,
  and the client gets a 422 ``TimeLimitExceeded`` rather than a half-made image.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

import torch
from starlette.concurrency import run_in_threadpool

from opensd.diffusion import Interrupted
from opensd.pipelines.preview import PreviewMode, preview_image
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline, StepInfo
from opensd.serving.errors import ApiError

T = TypeVar("T")
P = TypeVar("P")

# A1111's show_progress_type values that opensd implements (A1111 also has "Approx NN"), and
# its live_previews_image_format values (PIL's format names).
PREVIEW_MODES = tuple(m.value for m in PreviewMode)
PREVIEW_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
DISCONNECT_POLL_S = 0.1  # how often a waiting request checks that its client is still there


class QueueFull(ApiError):
    """429: no room in the queue; ``Retry-After`` says when a slot is likely to be free."""

    def __init__(self, max_pending: int, retry_after: int):
        super().__init__(
            429, f"the generation queue is full ({max_pending} requests); retry in about {retry_after} s",
            kind="QueueFull", headers={"Retry-After": str(retry_after)},
        )


class TimeLimitExceeded(ApiError):
    """422: the job ran past the server's wall-time limit and was stopped; no partial result is sent."""

    def __init__(self, job: Job):
        where = f"batch {job.iteration + 1} of {job.n_iter}, step {job.step} of {job.steps}" if job.steps else "before sampling"
        super().__init__(
            422, f"the generation ran past this server's time limit of {job.max_seconds:g} s per request "
            f"(--max-seconds) and was stopped at {where}; ask for fewer steps, fewer images or a smaller size",
            kind="TimeLimitExceeded",
        )


class ClientDisconnected(ApiError):
    """The client went away; nobody reads this answer (499, as nginx logs it)."""

    def __init__(self) -> None:
        super().__init__(499, "the client closed the connection; its generation was stopped", kind="ClientClosedRequest")


@dataclass
class Job:
    """One request's run, as ``/sdapi/v1/progress`` reports it."""

    kind: str  # "txt2img" | "img2img" | "openai" | "explain"
    n_iter: int = 1
    max_seconds: float | None = None  # wall time once running; None: no limit
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    iteration: int = 0  # 0-based index of the batch being sampled
    step: int = 0  # steps finished in this batch
    steps: int = 0  # steps this batch will take
    pipeline: StableDiffusionPipeline | None = None  # set by the work function; used for previews
    denoised: torch.Tensor | None = None  # (1, C, h, w): the first image's latest x0 prediction
    interrupted: threading.Event = field(default_factory=threading.Event)  # /interrupt (or abandoned)
    skipped: threading.Event = field(default_factory=threading.Event)
    abandoned: threading.Event = field(default_factory=threading.Event)  # the client went away, or the server stops
    timed_out: threading.Event = field(default_factory=threading.Event)
    _deadline: float | None = None  # time.monotonic() after which the job stops
    _sampling_stopped: bool = False  # this batch's sampling already stopped for /interrupt
    _preview: tuple[tuple[int, int, str, str], str] | None = None
    _preview_lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        """Mark the job running (on its worker) and start its wall-time clock."""
        self.started = time.time()
        if self.max_seconds is not None:
            self._deadline = time.monotonic() + self.max_seconds

    def must_stop(self) -> bool:
        """A stop nobody wants the result of: the client went away or the time ran out."""
        if self.abandoned.is_set() or self.timed_out.is_set():
            return True
        if self._deadline is not None and time.monotonic() > self._deadline:
            self.timed_out.set()
            return True
        return False

    def should_stop(self) -> bool:
        """The pipeline's ``should_stop``, polled between prompt chunks and VAE tiles.

        True on :meth:`must_stop`, and on ``/interrupt`` unless this batch's sampling has
        already stopped for it (its partial image is then decoded and returned).
        """
        return self.must_stop() or (self.interrupted.is_set() and not self._sampling_stopped)

    def callback(self, info: StepInfo) -> bool:
        """The pipeline's step callback: record progress; ``False`` stops sampling now."""
        self.step, self.steps = info.step, info.total
        self.denoised = info.denoised[:1].detach().clone()
        if self.must_stop():
            return False
        if self.interrupted.is_set():
            self._sampling_stopped = True
            return False
        return not self.skipped.is_set()

    def next_batch(self, iteration: int) -> None:
        self.iteration, self.step, self.denoised = iteration, 0, None
        self._sampling_stopped = False
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

    def preview_png(self, mode: str = "Full", image_format: str = "png") -> str | None:
        """Base64 image (PNG, or A1111's ``live_previews_image_format``: jpeg, webp) of the
        current x0 prediction.

        ``mode`` is A1111's ``show_progress_type``: ``"Full"`` decodes with the VAE;
        ``"Approx cheap"`` applies a linear latent-to-RGB map fitted once per VAE, upscaled
        to the image size by nearest neighbour; ``"TAESD"`` decodes with the model's tiny
        autoencoder (the VAE when it has none); see :func:`opensd.pipelines.preview.preview_image`.
        Cached per step, mode and format, and one preview at a time: a poll that comes while
        one is made gets the previous preview rather than queueing another pass.
        """
        if mode not in PREVIEW_MODES:
            raise ValueError(f"preview mode must be one of {', '.join(PREVIEW_MODES)}; got {mode!r}")
        if image_format not in PREVIEW_FORMATS:
            raise ValueError(f"preview image format must be one of {', '.join(PREVIEW_FORMATS)}; got {image_format!r}")
        denoised, pipe, key = self.denoised, self.pipeline, (self.iteration, self.step, mode, image_format)
        if denoised is None or pipe is None:
            return None
        cached = self._preview
        if (cached is not None and cached[0] == key) or not self._preview_lock.acquire(blocking=False):
            return cached[1] if cached is not None else None
        try:
            image = preview_image(pipe, denoised, mode)
            buf = io.BytesIO()
            image.save(buf, format=PREVIEW_FORMATS[image_format])
            self._preview = (key, base64.b64encode(buf.getvalue()).decode("ascii"))
            return self._preview[1]
        finally:
            self._preview_lock.release()


class GenerationQueue:
    """Runs jobs on ``workers`` threads; at most ``max_pending`` jobs planned, queued or running."""

    def __init__(self, workers: int = 1, max_pending: int = 32):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if max_pending < workers:
            raise ValueError(f"max_pending ({max_pending}) must be >= workers ({workers})")
        self.workers, self.max_pending = workers, max_pending
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="opensd-generate")
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}  # planned, queued or running, in arrival order

    @overload
    async def submit(
        self, job: Job, work: Callable[[Job, P], T], *, prepare: Callable[[], P],
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> T: ...
    @overload
    async def submit(
        self, job: Job, work: Callable[[Job, None], T], *, disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> T: ...
    async def submit(
        self,
        job: Job,
        work: Callable[[Job, Any], T],
        *,
        prepare: Callable[[], Any] = lambda: None,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> T:
        """Take a place for ``job`` (429 when full), run ``prepare()`` off the event loop, then
        ``work(job, prepared)`` on a worker thread, and return its result.

        ``prepare`` is where a request is parsed and checked: it runs only once the request
        holds a place, and an error there frees the place. ``disconnected`` (e.g.
        Starlette's ``request.is_disconnected``) is polled while the job waits or runs;
        when it answers True the job is abandoned (see the module doc) and
        :class:`ClientDisconnected` is raised at once.
        """
        with self._lock:
            if len(self._jobs) >= self.max_pending:
                raise QueueFull(self.max_pending, self._retry_after())
            self._jobs[job.id] = job
        try:
            prepared = await run_in_threadpool(prepare)
        except BaseException:
            self._drop(job)
            raise
        fut = self._pool.submit(self._run, job, work, prepared)
        waiting = asyncio.wrap_future(fut)
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
                if done:
                    return waiting.result()
                if disconnected is not None and await disconnected():
                    self._abandon(job, fut)
                    waiting.add_done_callback(_consume)  # its ending is nobody's answer now
                    raise ClientDisconnected()
        except asyncio.CancelledError:  # the server cancelled the handler: stop the work it asked for
            self._abandon(job, fut)
            raise

    def _run(self, job: Job, work: Callable[[Job, P], T], prepared: P) -> T:
        """The worker's body: ``work`` with the job's clock running; its stops turned into answers."""
        job.start()
        try:
            if job.abandoned.is_set():  # abandoned in the instant before it started
                raise ClientDisconnected()
            try:
                result = work(job, prepared)
            except Interrupted:  # stopped before it had any image to return
                if job.timed_out.is_set():
                    raise TimeLimitExceeded(job) from None
                raise ApiError(
                    409, "the generation was interrupted before it made an image", kind="Interrupted"
                ) from None
            if job.timed_out.is_set():
                raise TimeLimitExceeded(job)
            return result
        finally:
            job.finished = time.time()
            self._drop(job)

    def _abandon(self, job: Job, fut) -> None:
        job.abandoned.set()
        job.interrupted.set()
        if fut.cancel():  # not started: leave the queue now
            self._drop(job)

    def _drop(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.id, None)

    def _retry_after(self) -> int:
        """Whole seconds until the running job closest to done should finish (at least 1)."""
        etas = [j.eta() for j in self._jobs.values() if j.started is not None and j.finished is None]
        etas = [e for e in etas if e > 0]
        return max(1, math.ceil(min(etas))) if etas else 1

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def current(self) -> Job | None:
        """The job ``/progress`` reports: the oldest running one, else the oldest queued one."""
        jobs = self.jobs()
        running = [j for j in jobs if j.started is not None and j.finished is None]
        return running[0] if running else (jobs[0] if jobs else None)

    def pending(self) -> int:
        """Requests that hold a place but are not running yet (being checked, or waiting)."""
        return sum(1 for j in self.jobs() if j.started is None)

    def interrupt(self) -> int:
        """Stop every running job (module doc); returns how many were told."""
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
            j.abandoned.set()
            j.interrupted.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _consume(fut: asyncio.Future) -> None:
    """Retrieve a finished future's outcome, so that asyncio does not log it as never retrieved."""
    if not fut.cancelled():
        fut.exception()


def run_batches(
    job: Job, pipeline: StableDiffusionPipeline, requests: list, *, init_image=None, mask=None, refiner=None, networks=None,
    hires=None,
) -> list:
    """The worker body of a generation request: batch after batch, stopping when told.

    ``refiner``: a pipeline that takes over sampling at each request's ``refiner_switch_at``
    (passed to ``generate`` only when given). ``networks``: the request's LoRAs and
    embeddings (:class:`~opensd.pipelines.networks.RequestNetworks`), for every batch. ``hires``: a
    :class:`~opensd.serving.hires_api.HiresRequest`: each batch runs the hires fix's two passes.

    Returns one :class:`GenerationResult` per batch that made images: none after an
    interrupt; a batch stopped while it encoded or decoded gives none either.
    """
    job.pipeline = pipeline
    extra = {"refiner": refiner} if refiner is not None else {}
    if networks is not None:
        extra["networks"] = networks
    results = []
    for k, req in enumerate(requests):
        if job.interrupted.is_set() or job.must_stop():
            break
        job.next_batch(k)
        try:
            if hires is not None:
                from opensd.pipelines.hires import hires_fix

                results.append(hires_fix(pipeline, req, hires.hires, networks=networks, hires_networks=hires.networks,
                                         upscalers=hires.upscalers, callback=job.callback, should_stop=job.should_stop))
                continue
            results.append(pipeline.generate(
                req, init_image=init_image, mask=mask, callback=job.callback, should_stop=job.should_stop,
                **extra,
            ))
        except Interrupted:
            if not results:
                raise
            break
    return results
