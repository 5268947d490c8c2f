"""What one request may ask of the server, checked before it is queued."""

from __future__ import annotations

from dataclasses import dataclass

from opensd.errors import OpenSDError
from opensd.serving.errors import ApiError


@dataclass(frozen=True)
class Limits:
    """Bounds on a request; anything outside them is answered 4xx before any work is done.

    ``max_images`` bounds ``batch_size * n_iter``; ``max_body_bytes`` the raw request body
    (base64 images included); ``max_input_pixels`` each uploaded image. ``workers`` is how
    many generations run at once and ``max_queue`` how many may wait or run in total.
    """

    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_batch_size: int = 8
    max_n_iter: int = 16
    max_images: int = 64
    max_body_bytes: int = 32 * 2**20
    max_input_pixels: int = 4096 * 4096
    workers: int = 1
    max_queue: int = 32

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OpenSDError(f"Limits.{name} must be a positive integer, got {value!r}")
        if self.max_queue < self.workers:
            raise OpenSDError(f"Limits.max_queue ({self.max_queue}) must be >= workers ({self.workers})")

    def check(self, *, width: int, height: int, steps: int, batch_size: int, n_iter: int = 1) -> None:
        """422 naming the first value out of bounds (types were checked by the schema)."""
        _bound("width", width, 1, self.max_width)
        _bound("height", height, 1, self.max_height)
        _bound("steps", steps, 1, self.max_steps)
        _bound("batch_size", batch_size, 1, self.max_batch_size)
        _bound("n_iter", n_iter, 1, self.max_n_iter)
        if batch_size * n_iter > self.max_images:
            raise ApiError(
                422, f"batch_size * n_iter must be at most {self.max_images}, got {batch_size} * {n_iter}", param="n_iter"
            )


def _bound(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ApiError(422, f"{name} must be from {low} to {high} on this server, got {value}", param=name)
