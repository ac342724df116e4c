"""Elementwise work on every CPU core.

NumPy hands a matrix product to its BLAS, which uses all cores; but an elementwise
ufunc -- ``np.tanh``, ``np.exp``, ``*``, ``+=`` -- runs on one core. PyTorch runs both
kinds on all cores, and on a 2-core laptop that alone makes its GELU, softmax and
optimizer step about twice as fast. Nothing about the math has to change to catch up:
a ufunc releases Python's GIL while it loops, so Python threads can run the same code on
different blocks of rows at the same time.

An op that wants this writes its math once, for whole arrays, as a *kernel* that reads
its inputs and writes its outputs in place::

    def _gelu_kernel(y, x):            # y (N, K) output, x (N, K) input
        ...                            # the textbook formula, in place into y

    y = xp.empty_like(x)
    map_row_blocks(_gelu_kernel, y, x) # kernel(y[a:b], x[a:b]) for a few row blocks

:func:`map_row_blocks` only decides where to cut: every array is split along its first
axis into one block per thread, and each row is computed by the same kernel code as it
would be in one whole-array call. A kernel must treat rows independently (elementwise
math, or reductions within a row such as a softmax's sum). Small arrays (below
:data:`MIN_PARALLEL_SIZE` elements, where starting threads costs more than it saves)
and one-thread settings stay on the calling thread. Each thread hands the kernel its
rows a chunk at a time (:data:`CHUNK_SIZE` elements), so that the kernel's passes
over them hit the cache. CuPy arrays (a GPU kernel is already parallel) run the kernel
once, directly.

The thread count is :func:`get_num_threads`: the ``MINILORA_NUM_THREADS`` environment
variable if set, else the CPUs this process may run on. :func:`set_num_threads` changes
it (``bench/run.py --threads`` sets it together with the BLAS's).
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np

from .validation import check_integer

__all__ = ["get_num_threads", "set_num_threads", "map_row_blocks", "as_rows", "MIN_PARALLEL_SIZE", "CHUNK_SIZE"]

# Elements of the first array below which a kernel stays on the calling thread. Handing
# a block to another thread and waiting for it costs a few hundred microseconds on a
# 2-vCPU VM (the sleeping thread must be woken, and the GIL changes hands between the
# two threads' NumPy calls), so on 2^18 elements two threads were slower than one for
# GELU, LayerNorm and softmax alike, and from 2^20 they won (bench/README.md). In the
# model, 2^19 made the small config's training step 6-9% faster than 2^18, and changed
# the tiny and medium ones by less than the noise.
MIN_PARALLEL_SIZE = 1 << 19

# Elements of the first array per kernel call. A kernel makes several passes over its
# arrays (GELU's backward about fifteen); on chunks of 2^19 float32 elements (2 MiB an
# array) its working set stays in the processor's last-level cache between passes, and
# its scratch arrays are no larger than a chunk. Each thread therefore calls the kernel
# on successive chunks of its block's rows. Measured on the medium benchmark config:
# GELU's backward and AdamW ~20% faster than with whole blocks; chunks of 2^16 (the
# per-core cache) were slower overall, as a kernel's dozen NumPy calls per chunk add up.
CHUNK_SIZE = 1 << 19

_num_threads: Optional[int] = None
_pool: Optional[ThreadPoolExecutor] = None
_pool_owner_pid: Optional[int] = None
_pool_lock = threading.Lock()
_inside = threading.local()      # .active is True while this thread runs a block


def _default_num_threads() -> int:
    env = os.environ.get("MINILORA_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"MINILORA_NUM_THREADS must be a whole number, got {env!r}") from None
        if n < 1:
            raise ValueError(f"MINILORA_NUM_THREADS must be >= 1, got {n}")
        return n
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not Linux
        return os.cpu_count() or 1


def get_num_threads() -> int:
    """How many threads elementwise work is split across (1: no splitting)."""
    global _num_threads
    if _num_threads is None:
        _num_threads = _default_num_threads()
    return _num_threads


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (>= 1) for elementwise work from now on."""
    global _num_threads, _pool
    n = check_integer("set_num_threads: n", n, minimum=1)
    with _pool_lock:
        _num_threads = n
        if _pool is not None:           # the old pool's size is wrong now
            _pool.shutdown(wait=True)
            _pool = None


def _get_pool(workers: int) -> ThreadPoolExecutor:
    """The shared pool, made on first use. A process forked from one that had a pool
    inherits the object but not its threads, so a new pool is made there."""
    global _pool, _pool_owner_pid
    with _pool_lock:
        if _pool is None or _pool_owner_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="minilora")
            _pool_owner_pid = os.getpid()
        return _pool


def _run_block(kernel: Callable, block, chunk_rows: int) -> None:
    """The kernel on ``block``, ``chunk_rows`` rows at a time."""
    _inside.active = True
    try:
        for lo in range(0, block[0].shape[0], chunk_rows):
            kernel(*(a[lo:lo + chunk_rows] for a in block))
    finally:
        _inside.active = False


def map_row_blocks(kernel: Callable, *arrays, min_size: Optional[int] = None,
                   chunk_size: Optional[int] = None) -> None:
    """Call ``kernel(*blocks)`` on row blocks of ``arrays``, one block per thread.

    All arrays must have the same length along their first axis; outputs must be arrays
    (not copies) that the kernel writes into. The calling thread computes the first
    block itself while pool threads compute the others, and the call returns when all
    are done (re-raising the first error, after every block has finished). Arrays of
    fewer than ``min_size`` elements (default :data:`MIN_PARALLEL_SIZE`) are not split
    across threads. Every thread calls the kernel on chunks of about ``chunk_size``
    elements of its block (whole rows; default :data:`CHUNK_SIZE`; a kernel with large
    scratch arrays asks for less); CuPy arrays get one call.
    """
    first = arrays[0]
    n_rows = first.shape[0]
    if any(a.shape[0] != n_rows for a in arrays):
        raise ValueError("map_row_blocks: arrays differ in length along the first axis: "
                         f"{[a.shape for a in arrays]}")
    if not isinstance(first, np.ndarray) or n_rows == 0 or getattr(_inside, "active", False):
        kernel(*arrays)          # a GPU kernel is parallel already; never split a block again
        return
    chunk_rows = max(1, (chunk_size or CHUNK_SIZE) // max(1, first.size // n_rows))
    threads = min(get_num_threads(), n_rows)
    if min_size is None:
        min_size = MIN_PARALLEL_SIZE
    if threads <= 1 or first.size < min_size:
        _run_block(kernel, arrays, chunk_rows)
        return
    bounds = [n_rows * i // threads for i in range(threads + 1)]
    blocks = [tuple(a[lo:hi] for a in arrays) for lo, hi in zip(bounds[:-1], bounds[1:])]
    pool = _get_pool(get_num_threads() - 1)
    futures = [pool.submit(_run_block, kernel, block, chunk_rows) for block in blocks[1:]]
    try:
        _run_block(kernel, blocks[0], chunk_rows)
    finally:
        errors = [f.exception() for f in futures]   # waits for every block
    for e in errors:
        if e is not None:
            raise e


def as_rows(a):
    """(..., K) -> (N, K), N the product of the leading axes; a 1-D or 0-D array becomes
    one row. A view when ``a`` is contiguous, so a kernel's writes into it land in ``a``
    (outputs are always made contiguous; an input may be copied, which is harmless)."""
    if a.ndim == 0:
        return a.reshape(1, 1)
    return a.reshape(math.prod(a.shape[:-1]), a.shape[-1])
