"""Causal multi-head self-attention (the part after the q, k, v projections).

Shapes: q (B, Tq, C); k, v (B, Tk, C) with Tk >= Tq; y (B, Tq, C).
Inside: heads H, head size D = C // H; scores and probabilities (B, H, Tq, Tk).

Usually Tq == Tk (a whole sequence at once). During generation with a key/value cache
the new queries are the *last* Tq positions of a Tk-long sequence: query i sits at
absolute position (Tk - Tq) + i and may look at keys 0 .. (Tk - Tq) + i.
"""
import math
from typing import NamedTuple

from ..backend import get_array_module
from .dropout import DropoutCache, dropout_backward, dropout_forward
from .softmax import SoftmaxCache, softmax_backward, softmax_forward


class AttentionCache(NamedTuple):
    q: object          # (B, H, Tq, D) the queries, already multiplied by scale
    k: object          # (B, H, Tk, D)
    v: object          # (B, H, Tk, D)
    softmax: SoftmaxCache   # probabilities before dropout (B, H, Tq, Tk)
    dropout: DropoutCache   # the attention-dropout mask, or None
    probs_used: object      # (B, H, Tq, Tk) probabilities after dropout (they weight v)
    scale: float


def split_heads(x, n_head: int):
    """(B, T, C) -> (B, H, T, D): a view, no copy."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, T, D) -> (B, T, C)."""
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def causal_mask_bias(Tq: int, Tk: int, xp, dtype):
    """(Tq, Tk): 0 where query i may see key j (j <= Tk - Tq + i), -inf where it may not."""
    future = xp.triu(xp.ones((Tq, Tk), dtype=bool), k=Tk - Tq + 1)
    return xp.where(future, -xp.inf, 0.0).astype(dtype)


def attention_forward(q, k, v, n_head: int, dropout_p: float = 0.0, rng=None):
    """y = softmax(q k^T / sqrt(D) + causal mask) v, per head, then heads concatenated.

    Args: q (B, Tq, C), k and v (B, Tk, C); n_head divides C; ``dropout_p`` drops
    attention probabilities (training only; pass 0 in eval mode) using ``rng``.
    Returns: y (B, Tq, C), cache.
    """
    xp = get_array_module(q)
    B, Tq, C = q.shape
    Tk = k.shape[1]
    if C % n_head:
        raise ValueError(f"attention: {C} channels do not split into {n_head} heads")
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != C or Tk < Tq:
        raise ValueError(f"attention: incompatible shapes q {q.shape}, k {k.shape}, v {v.shape}")
    scale = 1.0 / math.sqrt(C // n_head)
    qh, kh, vh = split_heads(q, n_head), split_heads(k, n_head), split_heads(v, n_head)  # (B, H, T, D)
    qh = qh * scale                                     # scaling q (T*D numbers) is cheaper than
                                                        # scaling the scores (T*T numbers)
    scores = qh @ kh.transpose(0, 1, 3, 2)              # (B, H, Tq, D) @ (B, H, D, Tk) -> (B, H, Tq, Tk)
    scores += causal_mask_bias(Tq, Tk, xp, scores.dtype)  # future keys get -inf: weight exp(-inf) = 0
    probs, softmax_cache = softmax_forward(scores, out=scores)  # in place: (B, H, Tq, Tk)
    probs_used, dropout_cache = dropout_forward(probs, dropout_p, rng)
    yh = probs_used @ vh                                  # (B, H, Tq, Tk) @ (B, H, Tk, D) -> (B, H, Tq, D)
    y = merge_heads(yh)                                   # (B, Tq, C)
    return y, AttentionCache(qh, kh, vh, softmax_cache, dropout_cache, probs_used, scale)


def attention_backward(dy, cache: AttentionCache):
    """Differentiate, line by line from the bottom of the forward:

        yh = P' vh           ->  dP' = dyh vh^T,   dvh = P'^T dyh
        P' = dropout(P)      ->  dP  = dP' * mask
        P  = softmax(S)      ->  dS  = P * (dP - rowsum(dP * P))
        S  = qs kh^T         ->  dqs = dS kh,      dkh = dS^T qs
        qs = qh * scale      ->  dqh = dqs * scale

    Masked positions have P = 0, so they pass no gradient: the mask needs no backward.
    Returns: dq (B, Tq, C), dk (B, Tk, C), dv (B, Tk, C).
    """
    q_scaled, kh, vh, softmax_cache, dropout_cache, probs_used, scale = cache
    H = q_scaled.shape[1]
    dyh = split_heads(dy, H)                                        # (B, H, Tq, D)
    dprobs_used = dyh @ vh.transpose(0, 1, 3, 2)                    # (B, H, Tq, Tk)
    dvh = probs_used.transpose(0, 1, 3, 2) @ dyh                    # (B, H, Tk, D)
    dprobs = dropout_backward(dprobs_used, dropout_cache)           # (B, H, Tq, Tk)
    dscores = softmax_backward(dprobs, softmax_cache, out=dprobs)   # in place: (B, H, Tq, Tk)
    dqh = dscores @ kh                                              # (B, H, Tq, D)
    dqh *= scale
    dkh = dscores.transpose(0, 1, 3, 2) @ q_scaled                  # (B, H, Tk, D)
    return merge_heads(dqh), merge_heads(dkh), merge_heads(dvh)
