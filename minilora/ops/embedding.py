"""Embedding lookup: ``y = table[idx]``.

Shapes: idx integer (...), e.g. (B, T) tokens or (T,) positions; table (V, C); y (..., C).
"""
from typing import NamedTuple

import numpy as np

from ..backend import get_array_module, scatter_add


class EmbeddingCache(NamedTuple):
    idx: object          # (...) the looked-up rows
    table_shape: tuple   # (V, C)


def embedding_forward(idx, table):
    """y = table[idx]: row ``idx[...]`` of the table for every index.

    Raises ValueError for a non-integer index array or an index outside [0, V).
    """
    xp = get_array_module(table)
    idx = xp.asarray(idx)            # ids given on the host go to the table's device
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

    The scatter-add is written one *element* at a time, on the flattened table: element
    (v, c) sits at flat position v * C + c, so row n of dy goes to positions
    idx[n] * C + 0 .. C-1. That is the same additions in the same order as
    ``np.add.at(dtable, idx, dy)`` on whole rows, so the result is identical to the last
    bit (on the CPU: a GPU adds repeated rows in no fixed order, see
    :func:`minilora.backend.scatter_add`); but NumPy runs ``add.at`` with one flat index
    per element in a fast loop and the row form in a general one. Measured on the
    benchmark configs' token embeddings (one thread): 1.2 -> 0.23 ms tiny, 4.9 -> 0.9 ms
    small, 9.8 -> 2.8 ms medium, where zeroing the 16 MiB table is most of what is left.
    """
    xp = get_array_module(dy)
    idx, (V, C) = cache
    dtable = xp.zeros((V, C), dtype=dy.dtype)
    rows = idx.reshape(-1, 1).astype(np.intp)                    # (N, 1): intp, so v * C can't overflow
    positions = (rows * C + xp.arange(C)).reshape(-1)            # (N * C,) flat positions in dtable
    scatter_add(dtable.reshape(-1), positions, dy.reshape(-1))   # (V * C,) += (N * C,)
    return dtable
