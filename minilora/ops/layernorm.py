"""Layer normalisation over the last axis (GPT-2 uses eps = 1e-5).

Shapes: x (..., C), weight (C,), bias (C,), y (..., C); mean and rstd (..., 1).
"""
from typing import NamedTuple

from ..backend import get_array_module


class LayerNormCache(NamedTuple):
    xhat: object    # (..., C) normalised input (x - mean) * rstd
    rstd: object    # (..., 1) 1 / sqrt(var + eps)
    weight: object  # (C,)


def layernorm_forward(x, weight, bias, eps: float = 1e-5):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, statistics over the last axis
    (the biased variance, as GPT-2 and PyTorch use)."""
    xp = get_array_module(x)
    mean = x.mean(axis=-1, keepdims=True)            # (..., 1)
    xhat = x - mean                                  # (..., C) centred; normalised below
    var = (xhat * xhat).mean(axis=-1, keepdims=True) # (..., 1)
    rstd = 1.0 / xp.sqrt(var + eps)                  # (..., 1)
    xhat *= rstd                                     # (..., C)
    y = xhat * weight
    y += bias
    return y, LayerNormCache(xhat, rstd, weight)


def layernorm_backward(dy, cache: LayerNormCache, need_dweight: bool = True, need_dbias: bool = True):
    """Differentiate y = xhat * weight + bias with xhat = (x - mean) * rstd.

        dweight = sum over rows of dy * xhat          dbias = sum over rows of dy
        dxhat   = dy * weight
        dx      = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))

    The last line is the chain rule through the mean and the variance, simplified:
    both depend on every element of the row, which is why two row-means appear.
    """
    xhat, rstd, weight = cache
    C = xhat.shape[-1]
    dweight = (dy * xhat).reshape(-1, C).sum(axis=0) if need_dweight else None  # (C,)
    dbias = dy.reshape(-1, C).sum(axis=0) if need_dbias else None               # (C,)
    dxhat = dy * weight                                                          # (..., C)
    dx = dxhat - dxhat.mean(axis=-1, keepdims=True)
    dxhat *= xhat
    dx -= xhat * dxhat.mean(axis=-1, keepdims=True)
    dx *= rstd
    return dx, dweight, dbias
