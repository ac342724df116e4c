"""The LoRA low-rank update (Hu et al., 2021), on its own:

    delta = scaling * (x @ A^T) @ B^T,    A (R, I), B (O, R), scaling = alpha / R

Shapes: x (..., I) -- already dropped out, if LoRA dropout is on --; h = x A^T (..., R);
delta (..., O). A and B follow the paper's and PEFT's orientation (``lora_A`` maps the
input down to the rank, ``lora_B`` maps back up), so the update to a weight stored
(I, O) is ``scaling * (B @ A)^T``.

The product is taken as (x A^T) B^T -- never by forming the (I, O) matrix B A -- so it
costs N * R * (I + O) multiply-adds instead of N * I * O. The scaling multiplies the
small (O, R) matrix, not the large (N, O) result. Products run on 2-D views (N = B*T
rows), which lets NumPy hand each one to the BLAS in a single call.
"""
from typing import NamedTuple


class LowRankCache(NamedTuple):
    x: object    # (..., I) input of the low-rank path
    h: object    # (..., R) x @ A^T, the rank-R bottleneck
    A: object    # (R, I)
    B: object    # (O, R)
    scaling: float


def lowrank_forward(x, A, B, scaling: float):
    """delta = scaling * (x @ A^T) @ B^T. Returns delta (..., O), cache."""
    R, I = A.shape
    O = B.shape[0]
    if x.shape[-1] != I or B.shape[1] != R:
        raise ValueError(f"lowrank: x {x.shape}, A {A.shape} and B {B.shape} do not fit "
                         "(expected x (..., I), A (R, I), B (O, R))")
    h = (x.reshape(-1, I) @ A.T).reshape(*x.shape[:-1], R)        # (N, I) @ (I, R) -> (..., R)
    delta = (h.reshape(-1, R) @ (scaling * B).T).reshape(*x.shape[:-1], O)  # (N, R) @ (R, O) -> (..., O)
    return delta, LowRankCache(x, h, A, B, scaling)


def lowrank_backward(ddelta, cache: LowRankCache, need_dx: bool = True):
    """Differentiate delta = s * h B^T with h = x A^T:

        dh = s * ddelta @ B                   (..., O) @ (O, R) -> (..., R)
        dB = s * ddelta2d^T @ h2d             (O, N) @ (N, R)   -> (O, R)
        dA = dh2d^T @ x2d                     (R, N) @ (N, I)   -> (R, I)
        dx = dh @ A                           (..., R) @ (R, I) -> (..., I)

    Note dA is proportional to B: while B is zero (a fresh adapter), grad(A) is exactly
    zero and only B learns in the first step.
    Returns: dx (or None), dA, dB.
    """
    x, h, A, B, s = cache
    R, I = A.shape
    O = B.shape[0]
    ddelta2d, h2d = ddelta.reshape(-1, O), h.reshape(-1, R)       # (N, O), (N, R)
    dh2d = ddelta2d @ (s * B)                                     # (N, O) @ (O, R) -> (N, R)
    dB = (ddelta2d.T @ h2d) * s                                   # (O, N) @ (N, R) -> (O, R)
    dA = dh2d.T @ x.reshape(-1, I)                                # (R, N) @ (N, I) -> (R, I)
    dx = (dh2d @ A).reshape(x.shape) if need_dx else None         # (N, R) @ (R, I) -> (..., I)
    return dx, dA, dB
