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
    x: object      # (...)
    tanh_u: object  # (...) tanh(u), reused by backward instead of recomputed


def gelu_forward(x):
    xp = get_array_module(x)
    # x * x * x, not x ** 3: a float power is far slower than two multiplications.
    u = _SQRT_2_OVER_PI * (x + _COEFF * (x * x * x))
    tanh_u = xp.tanh(u)
    y = 0.5 * x * (1.0 + tanh_u)
    return y, GeluCache(x, tanh_u)


def gelu_backward(dy, cache: GeluCache):
    """Differentiate y = 0.5 x (1 + tanh u) by the product rule:

        dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) du/dx,
        du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    """
    x, tanh_u = cache
    du_dx = _SQRT_2_OVER_PI * (1.0 + 3.0 * _COEFF * (x * x))
    dy_dx = 0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u * tanh_u) * du_dx
    return dy * dy_dx
