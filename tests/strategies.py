"""Hypothesis strategies and array helpers shared by the tests.

Shapes are drawn small (every element is checked numerically) and always include the
edge cases B=1, T=1, one head, rank 1. Values come from a NumPy generator seeded by a
drawn integer: hypothesis shrinks the seed and the shape, and float64 arrays stay cheap.
"""
import numpy as np
from hypothesis import strategies as st

from minilora import backend

seeds = st.integers(min_value=0, max_value=2**32 - 1)
batch = st.integers(min_value=1, max_value=3)
time = st.integers(min_value=1, max_value=5)
features = st.integers(min_value=1, max_value=6)
heads = st.integers(min_value=1, max_value=3)
head_size = st.integers(min_value=1, max_value=3)
rank = st.integers(min_value=1, max_value=4)


def randn(rng: np.random.Generator, *shape, device: str = "cpu", scale: float = 1.0):
    """A float64 standard-normal array on ``device`` (drawn on the CPU, then moved)."""
    return backend.to_device(np.ascontiguousarray(rng.standard_normal(shape) * scale), device)


def assert_gradients_match(errors: dict, tol: float = 1e-6):
    """Fail with every input's relative error listed if any exceeds ``tol``."""
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"gradient check failed (tolerance {tol}): {errors}"
