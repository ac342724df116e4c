"""Softmax cross-entropy over the vocabulary, averaged over the targets that count.

Shapes: logits (..., V), e.g. (B, T, V); targets integer (...), e.g. (B, T).
A target equal to ``ignore_index`` (default -100, as in PyTorch) adds nothing to the
loss or the gradient and is not counted in the mean: that is how prompt tokens are
masked out of an instruction-tuning loss.
"""
from typing import NamedTuple

from ..backend import get_array_module, output_array
from ..threads import map_row_blocks


class CrossEntropyCache(NamedTuple):
    probs: object     # (N, V) softmax of the logits
    targets: object   # (N,) target ids, ignored ones replaced by 0
    keep: object      # (N,) 1.0 where the target counts, 0.0 where it is ignored
    count: int        # how many targets count
    shape: tuple      # the logits' original shape (..., V)


def _softmax_and_log_prob_kernel(probs, log_probs_t, z, t):
    """For a block of rows: probs = softmax(z) and log_probs_t = log softmax(z)[t],
    in place (rows are independent, so blocks run on the CPU cores in parallel)."""
    xp = get_array_module(z)
    xp.subtract(z, z.max(axis=-1, keepdims=True), out=probs)   # stable: the max exponent is 0
    shifted_t = probs[xp.arange(z.shape[0]), t]                 # (n,) the targets' shifted logits
    xp.exp(probs, out=probs)
    sumexp = xp.einsum("ij->i", probs)                          # (n,) row sums (see softmax)
    probs /= sumexp[:, None]                                    # (n, V) softmax
    xp.subtract(shifted_t, xp.log(sumexp), out=log_probs_t)     # (n,) log softmax at the targets


def cross_entropy_forward(logits, targets, ignore_index: int = -100, out=None):
    """loss = mean over counted targets t of  -log softmax(logits)[t]
            = mean of  logsumexp(logits) - logits[t]

    The cache holds the probabilities, an (N, V) array as large as the logits;
    ``out=logits`` computes them in place, over the logits, for a caller that needs the
    logits no more (a training step: backward needs only the gradient).
    Returns: loss (a Python float), cache.
    """
    xp = get_array_module(logits)
    V = logits.shape[-1]
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets of shape {targets.shape} do not match logits "
                         f"of shape {logits.shape} (expected {logits.shape[:-1]})")
    if not xp.issubdtype(targets.dtype, xp.integer):
        raise ValueError(f"cross_entropy: targets must be integers, got dtype {targets.dtype}")
    z = logits.reshape(-1, V)                                   # (N, V)
    t = targets.reshape(-1)                                     # (N,)
    keep = t != ignore_index                                    # (N,)
    count = int(keep.sum())
    if count == 0:
        raise ValueError("cross_entropy: every target equals ignore_index; there is nothing to average")
    bad = keep & ((t < 0) | (t >= V))
    if bool(bad.any()):
        raise ValueError(f"cross_entropy: target ids must lie in [0, {V}) or equal ignore_index "
                         f"({ignore_index}); got {int(t[bad][0])}")
    t = xp.where(keep, t, 0)
    probs = output_array(logits.shape, logits.dtype, xp, out, "cross_entropy").reshape(-1, V)  # (N, V)
    log_probs_t = xp.empty(t.shape, dtype=z.dtype)              # (N,)
    map_row_blocks(_softmax_and_log_prob_kernel, probs, log_probs_t, z, t)
    keep_f = keep.astype(z.dtype)
    loss = -float((log_probs_t * keep_f).sum()) / count
    return loss, CrossEntropyCache(probs, t, keep_f, count, logits.shape)


def cross_entropy_backward(dloss, cache: CrossEntropyCache, reuse_cache: bool = False):
    """d(-log p_t)/dz = p - onehot(t), for each counted row, divided by the count (the
    mean), times the upstream dloss (1.0 when the loss is the final objective).

    ``reuse_cache=True`` writes the gradient into the cached probabilities instead of a
    copy of them -- an (N, V) array, the largest in a small model's step -- which uses
    the cache up: only a caller that owns it (``minilora.cross_entropy``) may ask.
    Returns: dlogits with the logits' shape (..., V).
    """
    xp = get_array_module(cache.probs)
    probs, t, keep, count, shape = cache
    dz = probs if reuse_cache else probs.copy()                 # (N, V)
    dz[xp.arange(dz.shape[0]), t] -= 1.0
    dz *= (keep * (dloss / count))[:, None]                     # ignored rows get zero
    return dz.reshape(shape)
