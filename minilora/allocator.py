"""Where NumPy's arrays get their memory, and why a forward pass can spend a third of its
time asking the operating system for it.

A NumPy array's data comes from the C library's ``malloc``. glibc's malloc (Linux) gives
memory back to the operating system when it is freed in two cases: a large block
(>= 128 KiB at first, a limit that rises as large blocks are freed, up to 32 MiB) was
a separate ``mmap`` and is unmapped at once, and the top of the heap is trimmed when
more than a threshold (twice that limit) lies free there. The next array of that size
then gets *fresh* pages, and the kernel maps and zeroes each 4 KiB page at its first
write: a page fault.

A training step is exactly that pattern. Every step allocates the same activations,
gradients and temporaries, and frees them before the next step; so does every forward
pass of inference or generation. Measured on a 2-core VM (``bench/run.py``'s "keeping
freed memory" table, each side in a fresh process, three runs): the tiny benchmark
model's forward pass took ~2,400 page faults and 18-19 ms under glibc's defaults, none
and 11-12 ms with the settings below; its training step ~2,400 faults and 41-43 ms
against none and 31-36 ms; the medium model's forward pass ~24,000 faults and 560-700 ms
against 430-480 ms. (The medium training step lost ~33,000 faults too, but its time
moved less than that VM's noise.) Peak memory is unchanged: what is kept is memory the
process's own peak had already used.

:func:`keep_freed_memory` makes malloc keep freed memory for the next step:

- ``M_MMAP_THRESHOLD``: blocks below ``mmap_threshold`` come from the heap, so freeing
  them returns them to malloc, not to the kernel;
- ``M_TRIM_THRESHOLD``: the heap's top is given back only when more than
  ``trim_threshold`` is free there.

The cost is that memory freed after a peak stays with the process (up to
``trim_threshold`` of it at the heap's top) instead of going back to the system.
PyTorch leaves this to its users (its CPU tuning guide suggests jemalloc or tcmalloc
for the same reason); minilora's command line calls :func:`keep_freed_memory` at
start-up, and a script can call it once itself. Elsewhere than glibc (macOS, Windows,
musl) it does nothing and says so; a ``MALLOC_*_`` or ``GLIBC_TUNABLES`` setting in the
environment is the user's choice and is left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Optional

from .validation import check_integer

# mallopt's parameter numbers, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 64 << 20    # above the medium benchmark model's 32 MiB logits
TRIM_THRESHOLD = 256 << 20

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def _glibc() -> Optional[ctypes.CDLL]:
    """The running glibc, or None where the C library is another one."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD,
                      trim_threshold: int = TRIM_THRESHOLD) -> str:
    """Make glibc's malloc keep freed memory for reuse (see the module's docstring).

    Call it once, early; it affects the whole process. Returns what it did, in words:
    ``"applied: ..."``, or why it did not (not glibc; the environment already sets
    malloc's thresholds; this glibc refuses the value). A speed setting never stops a
    program, so only a threshold that is not a positive integer raises (ValueError).
    """
    mmap_threshold = check_integer("keep_freed_memory: mmap_threshold (bytes)", mmap_threshold, 1, 2**31 - 1)
    trim_threshold = check_integer("keep_freed_memory: trim_threshold (bytes)", trim_threshold, 1, 2**31 - 1)
    user = [v for v in _USER_SETTINGS if v in os.environ]
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES")
    if user:
        return f"left alone: the environment sets {', '.join(user)}"
    libc = _glibc()
    if libc is None:
        return f"not applied: the C library is not glibc ({platform.system()})"
    # The mmap threshold first: setting either one freezes the other's automatic
    # adjustment, and a trim threshold alone would leave every block over 128 KiB mmap'ed.
    for param, value, name in ((M_MMAP_THRESHOLD, mmap_threshold, "M_MMAP_THRESHOLD"),
                               (M_TRIM_THRESHOLD, trim_threshold, "M_TRIM_THRESHOLD")):
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            done = "" if param == M_MMAP_THRESHOLD else " (M_MMAP_THRESHOLD was set)"
            return f"not applied: glibc refused {name} = {value} bytes{done}"
    return (f"applied: glibc's malloc serves blocks below {_mib(mmap_threshold)} from its heap "
            f"and keeps up to {_mib(trim_threshold)} free at the heap's top")


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"
