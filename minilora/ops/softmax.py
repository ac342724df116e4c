"""Softmax over the last axis, computed stably.

Shapes: x (..., K), p (..., K) with each row summing to one.

Rows are independent, so each direction is a kernel over a block of rows that
``map_row_blocks`` runs on the CPU cores in parallel (see :mod:`minilora.threads`).
"""
from typing import NamedTuple

import numpy as np

from ..backend import get_array_module, output_array
from ..threads import as_rows, map_row_blocks


class SoftmaxCache(NamedTuple):
    p: object  # (..., K) the probabilities: backward needs only them


def _softmax_kernel(p, x):
    """p = exp(x - max x) / sum exp(x - max x), row by row, in place in p.

    Row sums here (and in the other row-wise kernels) are ``einsum("ij->i")``: NumPy's
    ``sum(axis=-1)`` reduces each row in a separate small loop and was 1.4-3x slower on
    the shapes of the benchmark configs."""
    xp = get_array_module(x)
    xp.subtract(x, x.max(axis=-1, keepdims=True), out=p)
    xp.exp(p, out=p)
    p /= xp.einsum("ij->i", p)[:, None]


def _softmax_backward_kernel(dx, dp, p):
    """dx = p * (dp - rowsum(dp * p)), in place in dx (which may be dp itself)."""
    xp = get_array_module(p)
    dp_dot_p = xp.einsum("ij,ij->i", dp, p)[:, None]   # sum_i dp_i p_i, no (n, K) product
    xp.subtract(dp, dp_dot_p, out=dx)
    dx *= p                                            # p_j (dp_j - sum_i dp_i p_i)


def softmax_forward(x, out=None):
    """p = softmax(x) over the last axis; ``out=x`` computes it in place, over x.

    Subtracting the row maximum changes nothing mathematically (it cancels between the
    numerator and the denominator) but keeps exp() from overflowing: the largest exponent
    is exp(0) = 1. A row of -inf (a fully masked row) is not allowed.
    """
    p = output_array(x.shape, x.dtype, get_array_module(x), out, "softmax")
    map_row_blocks(_softmax_kernel, as_rows(p), as_rows(x))
    return p, SoftmaxCache(p)


def softmax_backward(dp, cache: SoftmaxCache, out=None):
    """The Jacobian of softmax is dp_i/dx_j = p_i (delta_ij - p_j), so

        dx_j = sum_i dp_i p_i (delta_ij - p_j) = p_j (dp_j - sum_i dp_i p_i)

    -- one elementwise product and one row-sum, never the (K, K) Jacobian itself.
    ``out=dp`` computes dx in place, over dp. dp may also broadcast against p: with p of
    shape (K,) and dp the (K, K) identity, row i of dx is row i of the Jacobian's
    transpose.
    """
    p = cache.p
    xp = get_array_module(p)
    shape = np.broadcast_shapes(dp.shape, p.shape)
    dx = output_array(shape, p.dtype, xp, out, "softmax")
    map_row_blocks(_softmax_backward_kernel, as_rows(dx),
                   as_rows(xp.broadcast_to(dp, shape)), as_rows(xp.broadcast_to(p, shape)))
    return dx

