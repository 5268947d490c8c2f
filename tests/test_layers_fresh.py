"""The in-place helpers of opensd.models.layers: same numbers as the out-of-place ops, in place only when safe."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opensd.models.layers import add_fresh, mul_fresh, silu_fresh


def test_add_fresh_writes_into_the_fresh_tensor_without_gradients() -> None:
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    want = b + a
    with torch.no_grad():
        got = add_fresh(a, b)
    assert got is a and torch.equal(got, want)


def test_add_fresh_broadcasts_a_smaller_operand_in_place() -> None:
    h, e = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 1, 1)
    want = h + e
    with torch.inference_mode():
        h = h.clone()
        got = add_fresh(h, e)
    assert got is h and torch.equal(got, want)


def test_add_fresh_keeps_out_of_place_where_in_place_would_change_the_answer() -> None:
    small, big = torch.randn(2, 3, 1, 1), torch.randn(2, 3, 4, 4)
    got = add_fresh(small, big)  # the sum is larger than the "fresh" operand
    assert got.shape == big.shape and small.shape == (2, 3, 1, 1)
    half, full = torch.randn(4).bfloat16(), torch.randn(4)
    got = add_fresh(half, full)  # promotion to float32
    assert got.dtype == torch.float32 and got is not half


def test_add_fresh_leaves_autograd_alone() -> None:
    x = torch.randn(3, requires_grad=True)
    h = x * 2
    out = add_fresh(h, x)
    assert out is not h
    out.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 3.0))


def test_silu_fresh_matches_silu() -> None:
    x = torch.randn(5)
    want = F.silu(x)
    with torch.no_grad():
        y = x.clone()
        assert silu_fresh(y) is y and torch.equal(y, want)


def test_mul_fresh_multiplies_in_place_only_without_gradients() -> None:
    a, b = torch.randn(2, 5), torch.randn(2, 5)
    want = b * a
    with torch.no_grad():
        fresh = a.clone()
        assert mul_fresh(fresh, b) is fresh and torch.equal(fresh, want)
    x = torch.randn(2, 5, requires_grad=True)
    g = F.gelu(x)
    out = mul_fresh(g, b)
    assert out is not g
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
