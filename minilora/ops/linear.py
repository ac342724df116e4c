"""Linear layer: ``y = x @ W + b``, with ``W`` stored (I, O) = (in_features, out_features).

Shapes: x (..., I) -- any leading axes, typically (B, T, I) -- W (I, O), b (O,), y (..., O).
"""
from typing import NamedTuple


class LinearCache(NamedTuple):
    x: object  # (..., I) the input, needed for dW = x^T dy (None when W is frozen)
    W: object  # (I, O)   the weight, needed for dx = dy W^T
    has_bias: bool
    x_shape: tuple


def linear_forward(x, W, b=None, keep_input: bool = True):
    """y = x @ W + b.

    Args: x (..., I); W (I, O); b (O,) or None. ``keep_input=False`` (a frozen W) keeps
    no reference to x: only dW needs it, so a frozen layer's input can be freed early.
    Returns: y (..., O), cache.
    """
    if x.shape[-1] != W.shape[0]:
        raise ValueError(f"linear: input has {x.shape[-1]} features, weight expects {W.shape[0]}")
    I, O = W.shape
    # One (N, I) @ (I, O) product over all N = B*T rows: a (B, T, I) @ (I, O) matmul
    # would make NumPy call the BLAS once per batch row, which is slower.
    y = (x.reshape(-1, I) @ W).reshape(*x.shape[:-1], O)  # (N, I) @ (I, O) -> (..., O)
    if b is not None:
        y += b
    return y, LinearCache(x if keep_input else None, W, b is not None, x.shape)


def linear_backward(dy, cache: LinearCache, need_dW: bool = True, need_db: bool = True):
    """Differentiate y = x @ W + b.

        dx = dy @ W^T              (..., O) @ (O, I) -> (..., I)
        dW = sum over rows of x^T dy: x2d^T @ dy2d   (I, N) @ (N, O) -> (I, O)
        db = sum over rows of dy                      (O,)

    A frozen weight (``need_dW=False``) skips its matmul entirely: that is the compute a
    LoRA fine-tune saves on every frozen layer.

    Returns: dx, dW (or None), db (or None; None also when there is no bias).
    """
    x, W, has_bias, x_shape = cache
    I, O = W.shape
    if need_dW and x is None:
        raise RuntimeError("linear_backward: dW was asked for, but the forward kept no input")
    dy2d = dy.reshape(-1, O)                                           # (N, O)
    dx = (dy2d @ W.T).reshape(x_shape)                                 # (N, O) @ (O, I) -> (..., I)
    dW = x.reshape(-1, I).T @ dy2d if need_dW else None                # (I, N) @ (N, O) -> (I, O)
    db = dy2d.sum(axis=0) if (has_bias and need_db) else None          # (O,)
    return dx, dW, db
