"""Causal multi-head self-attention (the part after the q, k, v projections).

Shapes: q (B, Tq, C); k, v (B, Tk, C) with Tk >= Tq; y (B, Tq, C).
Inside: heads H, head size D = C // H; scores and probabilities (B, H, Tq, Tk).

Usually Tq == Tk (a whole sequence at once). During generation with a key/value cache
the new queries are the *last* Tq positions of a Tk-long sequence: query i sits at
absolute position (Tk - Tq) + i and may look at keys 0 .. (Tk - Tq) + i.

**Query blocks.** The causal mask zeroes the upper triangle of every (Tq, Tk) score
matrix, so computing all of it wastes nearly half the work: scores that exist only to be
set to -inf, exponentials of -inf, products with zero weights. The op therefore cuts the
queries into blocks of ``query_block`` rows (FlashAttention does the same). The block of
queries a .. b-1 can see keys 0 .. (Tk - Tq) + b - 1 and no further, so its scores are a
(b - a, (Tk - Tq) + b) matrix and only its last (b - a) columns -- the square on the
diagonal -- need the mask. Every row's softmax still runs over all the keys that row
can see, so the result is the full-matrix result; for T = 256 and blocks of 128 a
quarter of the scores (and of the stored probabilities) is never computed, for
T = 1024 almost half. One block (``query_block >= Tq``) is exactly the textbook
full-matrix computation.
"""
import functools
import math
from typing import List, NamedTuple, Optional

import numpy as np

from ..backend import get_array_module
from ..validation import check_integer
from .dropout import DropoutCache, dropout_backward, dropout_forward
from .softmax import SoftmaxCache, softmax_backward, softmax_forward

# Queries per block. 128 keeps every block's products large enough for the BLAS and
# its softmax large enough to split across cores. Measured on the medium benchmark
# config's attention (B=4, H=8, T=256, D=64), forward + backward: 26.6 ms in one block,
# 24.8 ms in blocks of 128, 29.1 ms in blocks of 64.
QUERY_BLOCK = 128


class QueryBlock(NamedTuple):
    """What backward needs from one block of queries ``start .. stop-1``."""
    start: int
    stop: int
    keys: int               # the block sees keys 0 .. keys-1
    softmax: SoftmaxCache   # probabilities before dropout (B, H, stop - start, keys)
    dropout: DropoutCache   # the attention-dropout mask, or None
    probs_used: object      # (B, H, stop - start, keys) probabilities after dropout (they weight v)


class AttentionCache(NamedTuple):
    q: object          # (B, H, Tq, D) the queries, already multiplied by scale
    k: object          # (B, H, Tk, D)
    v: object          # (B, H, Tk, D)
    blocks: List[QueryBlock]
    scale: float

    def probabilities(self):
        """The whole (B, H, Tq, Tk) probability matrix (before dropout), for looking at:
        the blocks' probabilities, and zeros where a block skipped the future keys."""
        xp = get_array_module(self.q)
        B, H, Tq, _ = self.q.shape
        p = xp.zeros((B, H, Tq, self.k.shape[2]), dtype=self.q.dtype)
        for block in self.blocks:
            p[:, :, block.start:block.stop, :block.keys] = block.softmax.p
        return p


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
    return _causal_mask_bias(Tq, Tk, xp, np.dtype(dtype))


@functools.lru_cache(maxsize=32)
def _causal_mask_bias(Tq: int, Tk: int, xp, dtype):
    # Made once per shape: every layer of every step adds the same mask. Read-only,
    # because every caller shares it.
    future = xp.triu(xp.ones((Tq, Tk), dtype=bool), k=Tk - Tq + 1)
    mask = xp.where(future, -xp.inf, 0.0).astype(dtype)
    if isinstance(mask, np.ndarray):
        mask.flags.writeable = False
    return mask


def attention_forward(q, k, v, n_head: int, dropout_p: float = 0.0, rng=None,
                      query_block: Optional[int] = None):
    """y = softmax(q k^T / sqrt(D) + causal mask) v, per head, then heads concatenated.

    Args: q (B, Tq, C), k and v (B, Tk, C); n_head divides C; ``dropout_p`` drops
    attention probabilities (training only; pass 0 in eval mode) using ``rng``;
    ``query_block`` queries are computed together (see the module's docstring; None
    means :data:`QUERY_BLOCK`).
    Returns: y (B, Tq, C), cache.
    """
    xp = get_array_module(q)
    B, Tq, C = q.shape
    Tk = k.shape[1]
    if C % n_head:
        raise ValueError(f"attention: {C} channels do not split into {n_head} heads")
    if Tq == 0 or k.shape != v.shape or k.shape[0] != B or k.shape[2] != C or Tk < Tq:
        raise ValueError(f"attention: incompatible shapes q {q.shape}, k {k.shape}, v {v.shape}")
    if query_block is None:
        query_block = QUERY_BLOCK
    query_block = check_integer("attention: query_block", query_block, minimum=1)
    scale = 1.0 / math.sqrt(C // n_head)
    qh, kh, vh = split_heads(q, n_head), split_heads(k, n_head), split_heads(v, n_head)  # (B, H, T, D)
    qh = qh * scale                                     # scaling q (T*D numbers) is cheaper than
                                                        # scaling the scores (T*T numbers)
    y = xp.empty((B, Tq, C), dtype=xp.result_type(qh, vh))
    yh = split_heads(y, n_head)                         # (B, H, Tq, D) view: blocks write into y
    blocks = []
    for start in range(0, Tq, query_block):
        stop = min(start + query_block, Tq)
        n, keys = stop - start, Tk - Tq + stop          # n queries; they see keys 0 .. keys-1
        scores = qh[:, :, start:stop] @ kh[:, :, :keys].transpose(0, 1, 3, 2)  # (B, H, n, D) @ (B, H, D, keys)
        scores[..., keys - n:] += causal_mask_bias(n, n, xp, scores.dtype)     # the diagonal square:
                                                        # future keys get -inf, so weight exp(-inf) = 0
        probs, softmax_cache = softmax_forward(scores, out=scores)   # in place: (B, H, n, keys)
        probs_used, dropout_cache = dropout_forward(probs, dropout_p, rng)
        yh[:, :, start:stop] = probs_used @ vh[:, :, :keys]         # (B, H, n, keys) @ (B, H, keys, D)
        blocks.append(QueryBlock(start, stop, keys, softmax_cache, dropout_cache, probs_used))
    return y, AttentionCache(qh, kh, vh, blocks, scale)


def attention_backward(dy, cache: AttentionCache):
    """Differentiate, line by line from the bottom of the forward (for each query block;
    P, S, qs are that block's rows, kh and vh the keys it sees):

        yh = P' vh           ->  dP' = dyh vh^T,   dvh = P'^T dyh
        P' = dropout(P)      ->  dP  = dP' * mask
        P  = softmax(S)      ->  dS  = P * (dP - rowsum(dP * P))
        S  = qs kh^T         ->  dqs = dS kh,      dkh = dS^T qs
        qs = qh * scale      ->  dqh = dqs * scale

    A key is seen by several query blocks, so its dkh and dvh are the sums of every
    block's contribution. Masked positions have P = 0, so they pass no gradient: the
    mask needs no backward. Returns: dq (B, Tq, C), dk (B, Tk, C), dv (B, Tk, C).
    """
    q_scaled, kh, vh, blocks, scale = cache
    xp = get_array_module(q_scaled)
    B, H, Tq, D = q_scaled.shape
    Tk = kh.shape[2]
    dtype = xp.result_type(dy, q_scaled)
    dq, dk, dv = (xp.empty((B, T, H * D), dtype=dtype) for T in (Tq, Tk, Tk))
    dqh, dkh, dvh = split_heads(dq, H), split_heads(dk, H), split_heads(dv, H)   # (B, H, T, D) views
    dyh = split_heads(dy, H)                                        # (B, H, Tq, D)
    # The last block sees every key, so going backwards its products *set* dk and dv
    # and the earlier blocks add to them.
    for i, (start, stop, keys, softmax_cache, dropout_cache, probs_used) in enumerate(reversed(blocks)):
        dyh_block, seen_v, seen_k = dyh[:, :, start:stop], vh[:, :, :keys], kh[:, :, :keys]
        dprobs_used = dyh_block @ seen_v.transpose(0, 1, 3, 2)      # (B, H, n, keys)
        dvh_block = probs_used.transpose(0, 1, 3, 2) @ dyh_block    # (B, H, keys, D)
        dprobs = dropout_backward(dprobs_used, dropout_cache)       # (B, H, n, keys)
        dscores = softmax_backward(dprobs, softmax_cache, out=dprobs)   # in place
        dqh[:, :, start:stop] = dscores @ seen_k                    # (B, H, n, D)
        dkh_block = dscores.transpose(0, 1, 3, 2) @ q_scaled[:, :, start:stop]   # (B, H, keys, D)
        if i == 0:
            dkh[...], dvh[...] = dkh_block, dvh_block               # keys == Tk here
        else:
            dkh[:, :, :keys] += dkh_block
            dvh[:, :, :keys] += dvh_block
    dq *= scale
    return dq, dk, dv
