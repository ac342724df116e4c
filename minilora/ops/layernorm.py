"""Layer normalisation over the last axis (GPT-2 uses eps = 1e-5).

Shapes: x (..., C), weight (C,), bias (C,), y (..., C); mean and rstd (..., 1).

Every row is normalised on its own, so the per-row math is a kernel over a block of
rows that ``map_row_blocks`` runs on the CPU cores in parallel (see
:mod:`minilora.threads`); only the parameter gradients, sums over all rows, are taken
outside it.
"""
import functools
from typing import NamedTuple

from ..backend import broadcast_to, get_array_module
from ..threads import as_rows, map_row_blocks


class LayerNormCache(NamedTuple):
    xhat: object    # (..., C) normalised input (x - mean) * rstd
    rstd: object    # (..., 1) 1 / sqrt(var + eps)
    weight: object  # (C,)


def _layernorm_kernel(y, xhat, rstd, x, *, weight, bias, eps):
    """For a block of rows, in place: xhat = (x - mean) * rstd, y = xhat * weight + bias."""
    xp = get_array_module(x)
    C = x.shape[-1]
    mean = xp.einsum("ij->i", x)[:, None]                      # (n, 1) row sums (see softmax)
    mean *= 1.0 / C
    xp.subtract(x, mean, out=xhat)                             # (n, C) centred
    # The biased variance mean(xhat^2), as row-wise dot products: einsum multiplies and
    # sums in one pass and never writes the (n, C) squares to memory.
    var = xp.einsum("ij,ij->i", xhat, xhat)[:, None]           # (n, 1)
    var *= 1.0 / C
    var += eps
    xp.divide(1.0, xp.sqrt(var, out=var), out=rstd)            # (n, 1)
    xhat *= rstd                                               # (n, C) normalised
    xp.multiply(xhat, weight, out=y)
    y += bias


def _layernorm_backward_kernel(dx, dy, xhat, rstd, *, weight):
    """For a block of rows, in place:
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dy * weight."""
    xp = get_array_module(xhat)
    C = xhat.shape[-1]
    dxhat = dy * weight                                        # (n, C) the one scratch array
    mean_dxhat = xp.einsum("ij->i", dxhat)[:, None]            # (n, 1)
    mean_dxhat *= 1.0 / C
    mean_dxhat_xhat = xp.einsum("ij,ij->i", dxhat, xhat)[:, None]   # (n, 1), no (n, C) product
    mean_dxhat_xhat *= 1.0 / C
    xp.multiply(xhat, mean_dxhat_xhat, out=dx)                 # xhat * mean(dxhat * xhat)
    xp.subtract(dxhat, dx, out=dx)
    dx -= mean_dxhat
    dx *= rstd


def layernorm_forward(x, weight, bias, eps: float = 1e-5):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, statistics over the last axis
    (the biased variance, as GPT-2 and PyTorch use)."""
    xp = get_array_module(x)
    y = xp.empty(x.shape, dtype=xp.result_type(x, weight, bias))   # (..., C)
    xhat = xp.empty(x.shape, dtype=x.dtype)                         # (..., C)
    rstd = xp.empty(x.shape[:-1] + (1,), dtype=x.dtype)             # (..., 1)
    kernel = functools.partial(_layernorm_kernel, weight=weight, bias=bias, eps=eps)
    map_row_blocks(kernel, as_rows(y), as_rows(xhat), as_rows(rstd), as_rows(x))
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
    xp = get_array_module(xhat)
    dy = broadcast_to(dy, xhat.shape, xp)               # dy may broadcast (a scalar, say)
    dy_rows, xhat_rows = as_rows(dy), as_rows(xhat)      # (N, C)
    # sum over rows of dy * xhat, without the (N, C) product as a temporary
    dweight = xp.einsum("nc,nc->c", dy_rows, xhat_rows) if need_dweight else None  # (C,)
    dbias = dy_rows.sum(axis=0) if need_dbias else None                           # (C,)
    dx = xp.empty(xhat.shape, dtype=xp.result_type(dy, weight))                    # (..., C)
    kernel = functools.partial(_layernorm_backward_kernel, weight=weight)
    map_row_blocks(kernel, as_rows(dx), dy_rows, xhat_rows, as_rows(rstd))
    return dx, dweight, dbias
