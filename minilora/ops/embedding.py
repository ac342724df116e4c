"""Embedding lookup: ``y = table[idx]``.

Shapes: idx integer (...), e.g. (B, T) tokens or (T,) positions; table (V, C); y (..., C).
"""
from typing import NamedTuple

from ..backend import get_array_module, scatter_add


class EmbeddingCache(NamedTuple):
    idx: object          # (...) the looked-up rows
    table_shape: tuple   # (V, C)


def embedding_forward(idx, table):
    """y = table[idx]: row ``idx[...]`` of the table for every index.

    Raises ValueError for a non-integer index array or an index outside [0, V).
    """
    xp = get_array_module(table)
    if not xp.issubdtype(idx.dtype, xp.integer):
        raise ValueError(f"embedding indices must be integers, got dtype {idx.dtype}")
    V = table.shape[0]
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= V):
        raise ValueError(f"embedding index out of range: values must lie in [0, {V}), "
                         f"got min {int(idx.min())}, max {int(idx.max())}")
    return table[idx], EmbeddingCache(idx, table.shape)  # (..., C)


def embedding_backward(dy, cache: EmbeddingCache):
    """Differentiate y = table[idx]: each row of dy flows back to the table row it came
    from, and rows looked up several times add up (a scatter-add):

        dtable[v] = sum of dy[...] over all positions where idx[...] == v     (V, C)
    """
    xp = get_array_module(dy)
    idx, (V, C) = cache
    dtable = xp.zeros((V, C), dtype=dy.dtype)
    scatter_add(dtable, idx.reshape(-1), dy.reshape(-1, C))  # (N,), (N, C) -> (V, C)
    return dtable
