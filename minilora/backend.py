"""Which array module runs the math: NumPy on the CPU, CuPy on a GPU.

This is the only file in minilora that imports CuPy. Everything else follows one rule:

    xp = get_array_module(x)     # numpy or cupy, taken from the array itself

so a single code path serves both backends. Parameters are always created on the CPU
with NumPy's seeded ``Generator`` and then moved with :func:`to_device`, which is why the
same seed gives the same model on both backends.
"""
from __future__ import annotations

import numpy as np

try:  # CuPy is the optional ``gpu`` extra; without it, everything runs on NumPy.
    import cupy as _cupy
    import cupyx as _cupyx
except Exception:  # ImportError, or a CuPy build that finds no CUDA driver
    _cupy = None
    _cupyx = None

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float64")


def cuda_available() -> bool:
    """True when CuPy is installed and can see at least one CUDA device."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def get_array_module(*arrays):
    """Return ``cupy`` if any of ``arrays`` lives on the GPU, else ``numpy``."""
    if _cupy is not None:
        return _cupy.get_array_module(*arrays)
    return np


def device_of(x) -> str:
    """'cuda' for a CuPy array, 'cpu' for anything else."""
    return "cuda" if get_array_module(x) is not np else "cpu"


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")
    if device == "cuda" and not cuda_available():
        raise ValueError("device 'cuda' needs CuPy and a CUDA GPU (pip install 'minilora[gpu]'); "
                         "none was found")
    return device


def to_device(x, device: str):
    """Move an array to 'cpu' (a NumPy array) or 'cuda' (a CuPy array)."""
    check_device(device)
    if device == "cpu":
        return _cupy.asnumpy(x) if (_cupy is not None and isinstance(x, _cupy.ndarray)) else np.asarray(x)
    return _cupy.asarray(x)


def synchronize(device: str) -> None:
    """Wait until ``device`` has finished the work queued on it. A GPU runs CuPy's calls
    asynchronously -- a call returns once its kernel is queued -- so a clock read right
    after them stops early; read it after this. A no-op on the CPU."""
    if device == "cuda" and _cupy is not None:
        _cupy.cuda.Device().synchronize()
    elif device != "cpu":
        check_device(device)              # unknown, or "cuda" without CuPy: the error names it


def to_numpy(x) -> np.ndarray:
    """A NumPy copy (or view) of ``x`` wherever it lives: for printing, saving and tests."""
    return to_device(x, "cpu")


def resolve_dtype(dtype) -> np.dtype:
    """Accept 'float32' / 'float64' (or the NumPy dtypes) and return a NumPy dtype."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {DTYPES}")
    return np.dtype(name)


def default_rng(seed, device: str = "cpu"):
    """A seeded random generator that draws on ``device`` (used for dropout masks).

    Parameters are never drawn from this: they come from NumPy's generator on the CPU
    and are moved, so both backends start from the same weights. Dropout masks are drawn
    where the activations live, so the two backends draw different (equally valid) masks.
    """
    check_device(device)
    if device == "cpu":
        return np.random.default_rng(seed)
    return _cupy.random.default_rng(seed)


def scatter_add(target, indices, values) -> None:
    """``target[indices] += values``, adding repeated indices up (unbuffered), in place.

    NumPy spells this ``np.add.at``; CuPy spells it ``cupyx.scatter_add``. NumPy adds in
    index order, so its result is the same to the last bit on every run; CuPy's kernel
    adds with atomic operations in whatever order the GPU's threads arrive, so where
    several values land on one element, the rounding -- the last bits -- may differ from
    run to run.
    """
    if get_array_module(target) is np:
        np.add.at(target, indices, values)
    else:
        _cupyx.scatter_add(target, indices, values)


def broadcast_to(x, shape, xp):
    """A read-only view of ``x`` broadcast to ``shape``, where ``x`` may also be a Python
    or NumPy scalar (an upstream gradient of 1.0, say): NumPy's ``broadcast_to`` takes
    one, CuPy's takes arrays only, so a scalar first becomes a 0-d array of ``xp``."""
    if np.isscalar(x):
        x = xp.asarray(x)
    return xp.broadcast_to(x, shape)


def output_array(shape, dtype, xp, out, op: str):
    """A fresh row-major array of this shape and dtype, or ``out`` after checking that it
    is one (an op's ``out=`` argument, which it writes in place); ``op`` names the op in
    the error."""
    if out is None:
        return xp.empty(shape, dtype=dtype)
    if out.shape != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"{op}: out must be a row-major {dtype} array of shape "
                         f"{tuple(shape)}, got {out.dtype} {out.shape}")
    return out
