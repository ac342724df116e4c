"""A stand-in for CuPy that runs on NumPy but keeps CuPy's one hard rule: host and
device arrays never mix.

Why it exists: minilora has one code path for both backends (``xp =
get_array_module(x)``), and the NumPy test run cannot tell whether that path is kept.
A ``np.`` call where ``xp.`` was meant, a mask built with ``np.arange`` and applied to
a GPU array, a test that hands a GPU array to ``np.testing`` -- all of these pass on
NumPy and fail on a GPU. With this module in CuPy's place they fail here too, the way
CuPy fails them:

- a :class:`ndarray` refuses implicit conversion to NumPy (``np.asarray(x)``,
  ``np.testing.assert_allclose(x, ...)``): ``TypeError``, as CuPy's does;
- an operation that mixes a device array with a NumPy array (``x + host``,
  ``xp.multiply(x, host)``, ``np.exp(host, out=x)``) is a ``TypeError``, as in CuPy;
- reductions and scalar indexing return 0-d device arrays, not NumPy scalars;
- a NumPy function called on a device array runs the array module's version (CuPy's
  ``__array_function__``), with the same rule for its other arguments;
- ``isinstance(x, numpy.ndarray)`` is false, so code that branches on it takes the GPU
  branch;
- ``cupy.broadcast_to`` takes device arrays only (NumPy's also takes scalars);
- a device random generator holds a lock, as CuPy's does, so ``copy.deepcopy`` of a
  model on the device fails unless it leaves the generators out.

The math is NumPy's, so this says nothing about CuPy's numerics, kernels or speed:
it is not a GPU test, only a check of where arrays live. Nor is its API CuPy's: every
NumPy function is there, where CuPy has a subset (random generators are the exception:
they offer CuPy's methods only). NumPy index arrays are accepted in ``x[idx]``, and
NumPy scalars everywhere, as CuPy accepts them; a host array (or a list) as an
operand, or as the value assigned into a device array, is refused -- CuPy does
transfer a host value assigned through an integer-array index, but minilora's rule is
that nothing crosses without ``to_device``.

Use: ``python -m pytest --backend fake-cupy`` runs the whole suite with this module
as ``cupy`` and "cuda" as the device; ``install()`` and ``uninstall()`` do the same
for one test.
"""
from __future__ import annotations

import sys
import threading
import types
import weakref

import numpy as np

__version__ = "0.0-fake (NumPy " + np.__version__ + ")"


def _mixing_error(value) -> TypeError:
    return TypeError(f"Unsupported type {type(value)}: a NumPy array met a device array "
                     "(CuPy refuses to mix them; move it with cupy.asarray or "
                     "minilora.backend.to_device)")


def _to_host_operand(value, allow_host_arrays: bool = False):
    """The NumPy object behind an argument: a device array's data, containers element
    by element; a NumPy array is refused unless ``allow_host_arrays``."""
    if isinstance(value, ndarray):
        return value._data
    if isinstance(value, np.ndarray):
        if allow_host_arrays:
            return value
        raise _mixing_error(value)
    if isinstance(value, (list, tuple)):
        converted = [_to_host_operand(v, allow_host_arrays) for v in value]
        if hasattr(value, "_fields"):                          # a namedtuple
            return type(value)(*converted)
        return type(value)(converted) if isinstance(value, tuple) else converted
    if isinstance(value, dict):
        return {k: _to_host_operand(v, allow_host_arrays) for k, v in value.items()}
    return value


# NumPy array id -> the live device array that wraps it. A wrapper holds its NumPy array,
# so an id here cannot be reused while its entry lives; the entry goes with the wrapper.
_wrappers: "weakref.WeakValueDictionary[int, ndarray]" = weakref.WeakValueDictionary()


def _wrap(data: np.ndarray) -> "ndarray":
    """The device array for ``data``: the same object each time while it lives, so that
    ``xp.add(a, b, out=c) is c`` and ``view.base is x`` hold as they do in CuPy."""
    wrapper = _wrappers.get(id(data))
    if wrapper is None or wrapper._data is not data:
        wrapper = ndarray(data)
        _wrappers[id(data)] = wrapper
    return wrapper


def _to_device_result(value):
    """Wrap NumPy results as device arrays (NumPy scalars as 0-d arrays, as CuPy's
    reductions return them); containers element by element."""
    if isinstance(value, np.ndarray):
        return _wrap(value)
    if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_)):
        return ndarray(np.asarray(value))
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_to_device_result(v) for v in value)
    if isinstance(value, list):
        return [_to_device_result(v) for v in value]
    return value


def _refuse_sequences(operands):
    """CuPy takes arrays and scalars as a ufunc's or an operator's operands, never a list
    or a tuple (NumPy would convert one: an array built on the host)."""
    for value in operands:
        if isinstance(value, (list, tuple)):
            raise TypeError(f"Unsupported type {type(value)}: CuPy does not convert a "
                            "sequence operand; make it an array on the device first")


def _device_call(function, args, kwargs, allow_host_arrays: bool = False):
    args = _to_host_operand(args, allow_host_arrays)
    kwargs = _to_host_operand(kwargs, allow_host_arrays)
    return _to_device_result(function(*args, **kwargs))


class ndarray:
    """A device array: NumPy data behind CuPy's interface rules."""

    __slots__ = ("_data", "__weakref__")
    __hash__ = None                    # == is elementwise, as on any array

    def __init__(self, data):
        if not isinstance(data, np.ndarray):
            raise TypeError(f"fake_cupy.ndarray wraps a numpy.ndarray, got {type(data)}")
        object.__setattr__(self, "_data", data)

    # ---- leaving the device: only explicitly --------------------------------------

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def get(self, stream=None, order="C", out=None):
        """A NumPy copy (CuPy's device-to-host transfer)."""
        return np.array(self._data, order=order, copy=True)

    # ---- NumPy's protocols: run the device version, with the same rule ---------------

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _refuse_sequences(inputs if method == "__call__" else inputs[:1])
        return _device_call(getattr(ufunc, method), inputs, kwargs)

    def __array_function__(self, function, types_, args, kwargs):
        return _device_call(function, args, kwargs)

    # ---- attributes and methods: NumPy's, results on the device ------------------

    def __getattr__(self, name):
        # never NumPy's protocols (__array_interface__ would let NumPy read the data
        # behind the device array's back); never _data before it is set (copy and
        # pickle make the object first)
        if name.startswith("__") or name == "_data":
            raise AttributeError(name)
        value = getattr(self._data, name)
        if callable(value):
            return lambda *args, **kwargs: _device_call(value, args, kwargs)
        return _to_device_result(value)

    def __setattr__(self, name, value):
        if name == "_data":
            object.__setattr__(self, name, value)
        else:
            setattr(self._data, name, _to_host_operand(value))

    def __getitem__(self, key):
        return _to_device_result(self._data[_to_host_operand(key, allow_host_arrays=True)])

    def __setitem__(self, key, value):
        self._data[_to_host_operand(key, allow_host_arrays=True)] = _to_host_operand(value)

    def __len__(self):
        return len(self._data)

    def __iter__(self):
        return (_to_device_result(row) for row in self._data)

    def __repr__(self):
        return "fake_cupy." + repr(self._data)

    # copies are new device arrays; pickling goes through the host, as CuPy's does
    def __copy__(self):
        return _wrap(self._data.copy())

    def __deepcopy__(self, memo):
        return _wrap(self._data.copy())

    def __reduce__(self):
        return asarray, (self.get(),)

    def __str__(self):
        return str(self._data)

    def __format__(self, spec):
        return format(self._data, spec)

    # a size-1 array converts to a Python number (CuPy synchronises to do it)
    def __bool__(self):
        return bool(self._data)

    def __float__(self):
        return float(self._data)

    def __int__(self):
        return int(self._data)

    def __complex__(self):
        return complex(self._data)


def _binary(ufunc, reflected=False):
    def operator(self, other):
        _refuse_sequences([other])
        if reflected:
            return _device_call(ufunc, (other, self), {})
        return _device_call(ufunc, (self, other), {})
    return operator


def _in_place(ufunc):
    def operator(self, other):
        _refuse_sequences([other])
        ufunc(self._data, _to_host_operand(other), out=self._data)
        return self
    return operator


for _name, _ufunc in [("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                      ("truediv", np.true_divide), ("floordiv", np.floor_divide),
                      ("mod", np.remainder), ("pow", np.power), ("matmul", np.matmul),
                      ("and", np.bitwise_and), ("or", np.bitwise_or), ("xor", np.bitwise_xor)]:
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
    setattr(ndarray, f"__r{_name}__", _binary(_ufunc, reflected=True))
    if _name != "matmul":
        setattr(ndarray, f"__i{_name}__", _in_place(_ufunc))
for _name, _ufunc in [("lt", np.less), ("le", np.less_equal), ("gt", np.greater),
                      ("ge", np.greater_equal), ("eq", np.equal), ("ne", np.not_equal)]:
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
for _name, _ufunc in [("neg", np.negative), ("pos", np.positive), ("abs", np.absolute),
                      ("invert", np.invert)]:
    setattr(ndarray, f"__{_name}__", lambda self, _u=_ufunc: _device_call(_u, (self,), {}))


# --------------------------------------------------------------------------------------
# The modules: ``cupy`` and ``cupyx``
# --------------------------------------------------------------------------------------

class _DeviceFunction:
    """A NumPy function or ufunc (with its methods: ``reduce``, ``at``, ...) that takes
    and returns device arrays."""

    def __init__(self, function):
        self._function = function
        self.__name__ = getattr(function, "__name__", repr(function))

    def __call__(self, *args, **kwargs):
        if isinstance(self._function, np.ufunc):
            _refuse_sequences(args)
        return _device_call(self._function, args, kwargs)

    def __getattr__(self, name):
        value = getattr(self._function, name)
        return _DeviceFunction(value) if callable(value) else value


class _DeviceNamespace(types.ModuleType):
    """NumPy's namespace (or a submodule of it) with device arrays in and out. Types,
    dtypes and constants are NumPy's own, as in CuPy (``cupy.float32 is numpy.float32``)."""

    def __init__(self, name, numpy_module):
        super().__init__(name)
        self._numpy_module = numpy_module

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(self._numpy_module, name)
        if isinstance(value, types.ModuleType):
            return _DeviceNamespace(f"{self.__name__}.{name}", value)
        if isinstance(value, type) or not callable(value):
            return value
        return _DeviceFunction(value)


def asarray(a, dtype=None, order=None):
    """Host to device (or a device array as it is)."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    return _wrap(np.array(_to_host_operand(a, allow_host_arrays=True), dtype=dtype,
                          order=order or "K", copy=True))


def array(a, dtype=None, copy=True, order="K", ndmin=0):
    data = _to_host_operand(a, allow_host_arrays=True)
    return _wrap(np.array(data, dtype=dtype, copy=True, order=order, ndmin=ndmin))


def asnumpy(a, stream=None, order="C", out=None):
    """Device to host."""
    if isinstance(a, ndarray):
        return a.get(order=order)
    return np.asarray(a, order=order)


def broadcast_to(array, shape):
    """CuPy's takes a device array only; NumPy's also takes a scalar."""
    if not isinstance(array, ndarray):
        raise TypeError(f"Argument 'array' has incorrect type (expected cupy.ndarray, got "
                        f"{type(array).__name__})")
    return _wrap(np.broadcast_to(array._data, shape))


def get_array_module(*arrays):
    return cupy if any(isinstance(a, ndarray) for a in arrays) else np


def _default_rng(seed=None):
    """A device generator: NumPy's PCG64 behind it, device arrays out."""
    return _DeviceGenerator(np.random.default_rng(seed))


class _DeviceGenerator:
    """CuPy's ``Generator``: its sampling methods only (no ``choice``, ``permutation``
    or ``shuffle``), drawing device arrays."""

    METHODS = ("beta", "binomial", "chisquare", "dirichlet", "exponential", "f", "gamma",
               "geometric", "hypergeometric", "integers", "logseries", "poisson", "power",
               "random", "standard_exponential", "standard_gamma", "standard_normal",
               "uniform")                                  # CuPy 14's, from its dir()

    def __init__(self, generator):
        self._generator = generator
        self.bit_generator = generator.bit_generator
        self.lock = threading.Lock()          # CuPy's BitGenerator keeps one: no deepcopy

    def __getattr__(self, name):
        if name not in self.METHODS:
            raise AttributeError(f"cupy.random.Generator has no attribute {name!r}")
        return _DeviceFunction(getattr(self._generator, name))


class _Device:
    id = 0

    def __init__(self, device=0):
        self.id = device

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_runtime = types.SimpleNamespace(
    getDeviceCount=lambda: 1,
    runtimeGetVersion=lambda: 0,
    getDeviceProperties=lambda device: {"name": b"fake_cupy (NumPy on the CPU)", "totalGlobalMem": 0},
)

cupy = _DeviceNamespace("cupy", np)
cupy.__version__ = __version__
cupy.__file__ = __file__
for _name, _value in {"ndarray": ndarray, "asarray": asarray, "array": array,
                      "asnumpy": asnumpy, "broadcast_to": broadcast_to,
                      "get_array_module": get_array_module}.items():
    setattr(cupy, _name, _value)
cupy.random = _DeviceNamespace("cupy.random", np.random)
cupy.random.default_rng = _default_rng
cupy.random.Generator = _DeviceGenerator
cupy.cuda = types.SimpleNamespace(runtime=_runtime, Device=_Device,
                                  get_current_stream=lambda: types.SimpleNamespace(synchronize=lambda: None))


def _scatter_add(a, slices, value):
    """``a[slices] += value`` with repeated indices added up, in place."""
    if not isinstance(a, ndarray):
        raise TypeError(f"cupyx.scatter_add needs a device array, got {type(a)}")
    if a.dtype not in (np.int32, np.uint32, np.uint64, np.float16, np.float32, np.float64):
        raise TypeError(f"cupyx.scatter_add does not support {a.dtype}")
    np.add.at(a._data, _to_host_operand(slices, allow_host_arrays=True), _to_host_operand(value))


cupyx = types.ModuleType("cupyx")
cupyx.scatter_add = _scatter_add


# --------------------------------------------------------------------------------------
# Putting it in CuPy's place
# --------------------------------------------------------------------------------------

_saved = None


def install() -> None:
    """Make minilora (and ``import cupy``) use this module as CuPy."""
    global _saved
    from minilora import backend
    if _saved is None:
        _saved = (backend._cupy, backend._cupyx, sys.modules.get("cupy"), sys.modules.get("cupyx"))
    backend._cupy, backend._cupyx = cupy, cupyx
    sys.modules["cupy"], sys.modules["cupyx"] = cupy, cupyx


def uninstall() -> None:
    """Put back whatever was there before :func:`install`."""
    global _saved
    if _saved is None:
        return
    from minilora import backend
    backend._cupy, backend._cupyx, old_cupy, old_cupyx = _saved
    for name, module in (("cupy", old_cupy), ("cupyx", old_cupyx)):
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module
    _saved = None
