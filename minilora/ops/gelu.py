"""GELU, in the tanh approximation that GPT-2 uses:

    gelu(x) = 0.5 * x * (1 + tanh(u)),    u = sqrt(2 / pi) * (x + 0.044715 * x^3)

Shapes: x (...), y (...) -- elementwise.

Computed as ``x * sigmoid(2u)``, which is the same function: tanh(u) = 2 sigmoid(2u) - 1,
so 0.5 (1 + tanh u) = sigmoid(2u). The sigmoid costs one ``exp`` where the textbook form
costs one ``tanh`` -- cheaper in NumPy, and with two elementwise passes fewer -- and for
negative x it does not cancel: ``1 + tanh(u)`` loses digits as tanh(u) nears -1, while
``1 / (1 + exp(-2u))`` keeps them. ``tests/test_ops_gradients.py`` checks it against the
tanh formula.

Each direction is a *kernel* that writes its result in place into an output array (the
forward needs no scratch array, the backward three); ``map_row_blocks`` runs it on blocks
of rows in parallel on the CPU cores (see :mod:`minilora.threads`). The kernels are the
whole math.
"""
import math
from typing import NamedTuple

import numpy as np

from .. import threads
from ..backend import broadcast_to, get_array_module, output_array
from ..threads import as_rows, map_row_blocks

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_COEFF = 0.044715


class GeluCache(NamedTuple):
    x: object      # (...) the input only: backward recomputes sigmoid(2u) from it, which
                   # costs one exp but keeps one activation fewer per layer (as PyTorch does)


def _sigmoid_2u(x, out):
    """out = sigmoid(2u) = 1 / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3), in place.
    (x * x * x, never x ** 3: a float power is far slower than two multiplies.)"""
    xp = get_array_module(x)
    xp.multiply(x, x, out=out)                      # x^2
    out *= _COEFF                                   # 0.044715 x^2
    out += 1.0                                      # 1 + 0.044715 x^2
    out *= x                                        # x + 0.044715 x^3
    out *= -2.0 * _SQRT_2_OVER_PI                   # -2u
    with np.errstate(over="ignore"):                # x below about -10: exp(-2u) = inf,
        xp.exp(out, out=out)                        # and 1 / (1 + inf) = 0, the right limit
    out += 1.0
    xp.reciprocal(out, out=out)                     # sigmoid(2u)
    return out


def _gelu_kernel(y, x):
    """y = x sigmoid(2u), in place in y: the textbook one-liner holds three arrays at
    its peak where this allocates only y, and is several times slower (lesson 7
    measures both)."""
    _sigmoid_2u(x, out=y)
    y *= x


def _gelu_backward_kernel(dx, dy, x):
    """dx = dy * dy/dx, with the product rule on y = x s, s = sigmoid(2u):

        dy/dx = s + x s (1 - s) 2 du/dx,     du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)

    (a sigmoid's derivative is s (1 - s)). dy/dx is built in a scratch array and only
    the last pass writes dx, so dx may be dy itself: that pass reads each element of dy
    before it writes the same element of dx.
    """
    xp = get_array_module(x)
    s = _sigmoid_2u(x, out=xp.empty_like(x))        # the forward's value, bit for bit
    two_du_dx = xp.multiply(x, x)
    two_du_dx *= 3.0 * _COEFF
    two_du_dx += 1.0
    two_du_dx *= 2.0 * _SQRT_2_OVER_PI              # 2 du/dx
    slope = xp.subtract(1.0, s)                     # 1 - s
    slope *= s
    slope *= x
    slope *= two_du_dx                              # x s (1 - s) 2 du/dx
    slope += s                                      # dy/dx
    xp.multiply(dy, slope, out=dx)                  # dx = dy * dy/dx


def gelu_forward(x):
    """y = gelu(x). Returns y (same shape), cache."""
    xp = get_array_module(x)
    y = xp.empty(x.shape, dtype=x.dtype)            # row-major, so as_rows(y) is a view
    map_row_blocks(_gelu_kernel, as_rows(y), as_rows(x))
    return y, GeluCache(x)


def gelu_backward(dy, cache: GeluCache, out=None):
    """dx = dy * gelu'(x) (the kernel above shows the derivative).

    ``out=dy`` computes dx in place, over dy, for a caller that needs dy no more: the
    MLP's backward does, because this is the moment of a training step when memory use
    peaks (the last MLP's backward, every activation still held), and writing dx over dy
    keeps one (B, T, 4C) array fewer alive there.
    """
    x = cache.x
    xp = get_array_module(x)
    dx = output_array(x.shape, x.dtype, xp, out, "gelu_backward")
    dy = broadcast_to(dy, x.shape, xp)              # dy may broadcast (a scalar, say)
    # Chunks of a quarter of the usual size (2^17 elements): the kernel's three scratch
    # arrays then take 1.5 MiB per thread, where the usual chunk would make them 12 MiB
    # in all (medium config) at the step's peak. Measured on 2 threads, it is also the
    # fastest: 7.5 ms on (1024, 2048) against 14.7 ms with 2^19 and 9.1 ms with 2^16
    # (the same on smaller arrays).
    map_row_blocks(_gelu_backward_kernel, as_rows(dx), as_rows(dy), as_rows(x),
                   chunk_size=max(1, threads.CHUNK_SIZE // 4))
    return dx
