"""GELU, in the tanh approximation that GPT-2 uses:

    gelu(x) = 0.5 * x * (1 + tanh(u)),    u = sqrt(2 / pi) * (x + 0.044715 * x^3)

Shapes: x (...), y (...) -- elementwise.

Each direction is a *kernel* that writes its result in place into an output array (the
forward needs no scratch array, the backward two); ``map_row_blocks`` runs it on blocks
of rows in parallel on the CPU cores (see :mod:`minilora.threads`). The kernels are the
whole math.
"""
import math
from typing import NamedTuple

from ..backend import get_array_module
from ..threads import as_rows, map_row_blocks

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_COEFF = 0.044715


class GeluCache(NamedTuple):
    x: object      # (...) the input only: backward recomputes tanh(u) from it, which costs
                   # one tanh but keeps one activation fewer per layer (as PyTorch does)


def _tanh_u(x, out):
    """out = tanh(sqrt(2/pi) (x + 0.044715 x^3)), in place. (x * x * x, never x ** 3: a
    float power is far slower than two multiplies.)"""
    xp = get_array_module(x)
    xp.multiply(x, x, out=out)                      # x^2
    out *= _COEFF                                   # 0.044715 x^2
    out += 1.0                                      # 1 + 0.044715 x^2
    out *= x                                        # x + 0.044715 x^3
    out *= _SQRT_2_OVER_PI                          # u
    xp.tanh(out, out=out)                           # tanh(u)
    return out


def _gelu_kernel(y, x):
    """y = 0.5 x (1 + tanh u), in place in y: the textbook one-liner allocates six
    temporaries and is ~4x slower."""
    _tanh_u(x, out=y)
    y += 1.0
    y *= x
    y *= 0.5                                        # 0.5 x (1 + tanh u)


def _gelu_backward_kernel(dx, dy, x):
    """dx = dy * dy/dx, with the product rule on y = 0.5 x (1 + tanh u):

        dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) du/dx,
        du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)

    dy/dx is built in place in dx, then multiplied by dy.
    """
    xp = get_array_module(x)
    tanh_u = _tanh_u(x, out=xp.empty_like(x))       # the forward's value, bit for bit
    du_dx = xp.multiply(x, x)
    du_dx *= 3.0 * _COEFF
    du_dx += 1.0
    du_dx *= _SQRT_2_OVER_PI                        # du/dx
    xp.multiply(tanh_u, tanh_u, out=dx)
    xp.subtract(1.0, dx, out=dx)                    # 1 - tanh^2 u
    dx *= x
    dx *= du_dx                                     # x (1 - tanh^2 u) du/dx
    dx += tanh_u
    dx += 1.0
    dx *= 0.5                                       # dy/dx
    dx *= dy                                        # dx = dy * dy/dx


def gelu_forward(x):
    """y = gelu(x). Returns y (same shape), cache."""
    xp = get_array_module(x)
    y = xp.empty(x.shape, dtype=x.dtype)            # row-major, so as_rows(y) is a view
    map_row_blocks(_gelu_kernel, as_rows(y), as_rows(x))
    return y, GeluCache(x)


def gelu_backward(dy, cache: GeluCache):
    """dx = dy * gelu'(x) (the kernel above shows the derivative)."""
    x = cache.x
    xp = get_array_module(x)
    dx = xp.empty(x.shape, dtype=x.dtype)
    dy = xp.broadcast_to(dy, x.shape)               # dy may broadcast (a scalar, say)
    map_row_blocks(_gelu_backward_kernel, as_rows(dx), as_rows(dy), as_rows(x))
    return dx
