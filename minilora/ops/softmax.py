"""Softmax over the last axis, computed stably.

Shapes: x (..., K), p (..., K) with each row summing to one.
"""
from typing import NamedTuple

from ..backend import get_array_module


class SoftmaxCache(NamedTuple):
    p: object  # (..., K) the probabilities: backward needs only them


def softmax_forward(x):
    """p = exp(x - max x) / sum exp(x - max x).

    Subtracting the row maximum changes nothing mathematically (it cancels between the
    numerator and the denominator) but keeps exp() from overflowing: the largest exponent
    is exp(0) = 1. A row of -inf (a fully masked row) is not allowed.
    """
    xp = get_array_module(x)
    p = x - x.max(axis=-1, keepdims=True)     # a new array, so the rest can work in place
    xp.exp(p, out=p)
    p /= p.sum(axis=-1, keepdims=True)
    return p, SoftmaxCache(p)


def softmax_backward(dp, cache: SoftmaxCache):
    """The Jacobian of softmax is dp_i/dx_j = p_i (delta_ij - p_j), so

        dx_j = sum_i dp_i p_i (delta_ij - p_j) = p_j (dp_j - sum_i dp_i p_i)

    -- one elementwise product and one row-sum, never the (K, K) Jacobian itself.
    """
    p = cache.p
    dx = dp * p                                        # dp_j p_j
    dx -= p * dx.sum(axis=-1, keepdims=True)           # - p_j sum_i dp_i p_i
    return dx
