"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch
from helpers import one_thread_direct_loopback


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after: tiny models run fastest so on a shared 2-core
    machine, and a fixed thread count keeps runs bit-identical. A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread_loopback():
    """One torch thread and no HTTP proxy for loopback traffic for a whole module (server tests),
    restored after (:func:`helpers.one_thread_direct_loopback`)."""
    with one_thread_direct_loopback():
        yield
