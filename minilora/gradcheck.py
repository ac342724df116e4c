"""Numerical gradients by central differences, and how to compare them honestly.

To check ``dx = op_backward(dy, cache)`` we need a scalar loss whose gradient w.r.t. the
op's output is ``dy``. The honest choice is ``L = sum(f(x) * dy)`` with a *random* ``dy``:

    dL/dx_i = sum_j dy_j * df_j/dx_i      -- exactly what backward computes.

Using ``L = sum(f(x))`` (dy = all ones) instead can hide bugs: softmax's rows always
sum to one, so ``sum(softmax(x))`` is constant, its gradient is zero, and a broken
softmax backward that returns zeros would pass. A random dy makes every Jacobian entry
count.

The numerical gradient perturbs one element at a time:

    dL/dx_i ~ (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)      error O(eps^2)

Run checks in float64. The step eps trades two errors: truncation (~eps^2 times the
third derivative) and rounding (~1e-16 * |L| / eps). eps = 1e-5 keeps both near 1e-10
to 1e-11, far below the 1e-6 relative error we demand; in float32 no eps works.
"""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np

from .backend import get_array_module


def numerical_gradient(loss_fn: Callable[[], float], x, eps: float = 1e-5):
    """Central-difference gradient of the scalar ``loss_fn()`` w.r.t. every element of
    ``x``, which is perturbed *in place* (and restored) -- so ``loss_fn`` must read ``x``.

    Returns an array shaped like ``x``.
    """
    xp = get_array_module(x)
    grad = xp.zeros(x.shape, dtype=np.float64)
    if not x.flags.c_contiguous:
        raise ValueError("numerical_gradient needs a C-contiguous array it can perturb in place")
    flat = x.reshape(-1)  # a view, since x is contiguous: writing flat[i] writes x
    grad_flat = grad.reshape(-1)
    for i in range(flat.size):
        original = flat[i].item()
        flat[i] = original + eps
        loss_plus = loss_fn()
        flat[i] = original - eps
        loss_minus = loss_fn()
        flat[i] = original
        grad_flat[i] = (loss_plus - loss_minus) / (2.0 * eps)
    return grad


def weighted_sum_loss(output_fn: Callable[[], object], dout) -> Callable[[], float]:
    """Wrap a function returning an array ``y`` into the scalar ``L = sum(y * dout)``,
    whose gradient w.r.t. ``y`` is exactly ``dout``."""
    def loss() -> float:
        return float((output_fn() * dout).sum())
    return loss


def relative_error(analytic, numeric) -> float:
    """max_i |a_i - n_i| / max(max|a|, max|n|, 1e-30).

    Every element is compared, measured against the scale of the whole gradient: an
    element-wise ratio would explode on entries that are (correctly) almost zero, and a
    norm-based one could let a single wrong element hide among many right ones.
    """
    xp = get_array_module(analytic)
    a = xp.asarray(analytic, dtype=np.float64)
    n = xp.asarray(numeric, dtype=np.float64)
    if a.shape != n.shape:
        raise ValueError(f"relative_error: shapes differ, {a.shape} vs {n.shape}")
    if a.size == 0:
        return 0.0
    scale = max(float(xp.abs(a).max()), float(xp.abs(n).max()), 1e-30)
    return float(xp.abs(a - n).max()) / scale


def check_gradients(output_fn: Callable[[], object], inputs: Dict[str, object],
                    analytic: Dict[str, object], dout, eps: float = 1e-5) -> Dict[str, float]:
    """Compare analytic gradients with central differences for several inputs at once.

    Args:
        output_fn: recomputes the op's output from the (perturbed-in-place) ``inputs``.
        inputs: name -> float64 array that ``output_fn`` reads.
        analytic: name -> the gradient backward returned for that input.
        dout: the upstream gradient used for ``analytic`` (random, please).
    Returns: name -> relative error (see :func:`relative_error`).
    """
    loss = weighted_sum_loss(output_fn, dout)
    errors = {}
    for name, x in inputs.items():
        if x.dtype != np.float64:
            raise ValueError(f"gradient checks need float64 inputs; {name!r} is {x.dtype}")
        errors[name] = relative_error(analytic[name], numerical_gradient(loss, x, eps))
    return errors
