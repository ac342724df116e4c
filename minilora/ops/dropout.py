"""Inverted dropout: keep each element with probability 1 - p and scale it by 1 / (1 - p),
so the expected value is unchanged and evaluation needs no rescaling.

Shapes: x (...), mask (...) (None when dropout is off), y (...).
"""
from typing import NamedTuple


class DropoutCache(NamedTuple):
    mask: object  # (...) 0 or 1/(1-p) per element; None for the identity


def dropout_forward(x, p: float, rng):
    """y = x * mask with mask = (uniform >= p) / (1 - p), drawn from ``rng`` (a seeded
    NumPy or CuPy generator on x's device). ``p = 0`` (or eval mode) is the identity."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if p == 0.0:
        return x, DropoutCache(None)
    keep = rng.random(x.shape, dtype=x.dtype) >= p
    mask = keep.astype(x.dtype) * (1.0 / (1.0 - p))
    return x * mask, DropoutCache(mask)


def dropout_backward(dy, cache: DropoutCache):
    """y = x * mask  =>  dx = dy * mask (dropped elements pass no gradient)."""
    return dy if cache.mask is None else dy * cache.mask
