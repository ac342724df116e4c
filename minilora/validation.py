"""Argument checks shared across the package.

A count -- layers, heads, a rank, a step, a thread count, a block size -- must be a
whole number, and Python makes that easy to get subtly wrong: ``True`` is an ``int``
(``isinstance(True, int)`` holds), ``3.0`` is not one but compares equal to one, and a
NumPy integer is not a Python ``int``. :func:`check_integer` is the one place that gets
it right, so that every count in minilora is refused in the same words.
"""
import operator
from typing import Optional

__all__ = ["check_integer"]


def check_integer(name: str, value, minimum: int = 0, maximum: Optional[int] = None) -> int:
    """``value`` as a Python ``int``, if it is a whole number in [minimum, maximum].

    Python and NumPy integers pass (anything with ``__index__``); ``bool``, floats
    (``2.0`` too) and strings raise ValueError, as does a number out of range. The
    message starts with ``name``, so a caller names the argument the way its user wrote
    it (``"GPTConfig.n_head"``, ``"attention: query_block"``).
    """
    if maximum is not None:
        wanted = f"an integer in [{minimum}, {maximum}]"
    elif minimum == 1:
        wanted = "a positive integer"
    elif minimum == 0:
        wanted = "a non-negative integer"
    else:
        wanted = f"an integer >= {minimum}"
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be {wanted}, got {value!r}") from None
    if number < minimum or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return number
