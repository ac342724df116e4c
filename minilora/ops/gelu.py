"""GELU, in the tanh approximation that GPT-2 uses:

    gelu(x) = 0.5 * x * (1 + tanh(u)),    u = sqrt(2 / pi) * (x + 0.044715 * x^3)

Shapes: x (...), y (...) -- elementwise.
"""
import math
from typing import NamedTuple

from ..backend import get_array_module

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_COEFF = 0.044715


class GeluCache(NamedTuple):
    x: object      # (...) the input only: backward recomputes tanh(u) from it, which costs
                   # one tanh but keeps one activation fewer per layer (as PyTorch does)


def _tanh_u(x):
    """tanh(sqrt(2/pi) (x + 0.044715 x^3)), in place in one new array. (x * x * x, never
    x ** 3: a float power is far slower than two multiplies.)"""
    xp = get_array_module(x)
    tanh_u = x * x                                  # x^2
    tanh_u *= _COEFF                                # 0.044715 x^2
    tanh_u += 1.0                                   # 1 + 0.044715 x^2
    tanh_u *= x                                     # x + 0.044715 x^3
    tanh_u *= _SQRT_2_OVER_PI                       # u
    xp.tanh(tanh_u, out=tanh_u)                     # tanh(u)
    return tanh_u


def gelu_forward(x):
    """y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), computed in place in one
    scratch array: the textbook one-liner allocates six temporaries and is ~4x slower."""
    y = _tanh_u(x)
    y += 1.0
    y *= x
    y *= 0.5                                        # 0.5 x (1 + tanh u)
    return y, GeluCache(x)


def gelu_backward(dy, cache: GeluCache):
    """Differentiate y = 0.5 x (1 + tanh u) by the product rule:

        dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) du/dx,
        du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)

    (evaluated in place, like the forward).
    """
    x = cache.x
    tanh_u = _tanh_u(x)                             # the forward's value, bit for bit
    xp = get_array_module(x)
    du_dx = x * x
    du_dx *= 3.0 * _COEFF
    du_dx += 1.0
    du_dx *= _SQRT_2_OVER_PI                        # du/dx
    dy_dx = tanh_u * tanh_u
    xp.subtract(1.0, dy_dx, out=dy_dx)              # 1 - tanh^2 u
    dy_dx *= x
    dy_dx *= du_dx                                  # x (1 - tanh^2 u) du/dx
    dy_dx += tanh_u
    dy_dx += 1.0
    dy_dx *= 0.5                                    # dy/dx
    dy_dx *= dy
    return dy_dx                                    # dx = dy * dy/dx
