"""Tests for minilora.threads: the row-block splitting of elementwise kernels.

The promise is that splitting changes nothing: each row is computed by the same kernel
code either way, so every threaded op must give *bit-identical* results with one thread
and with several. The ops' own gradient checks (tests/test_ops_gradients.py) run on
arrays too small to split; here every op is run on a split and compared to unsplit.
"""
import os
import sys

import numpy as np
import pytest

import minilora as ml
from minilora import threads
from minilora.nn import Parameter
from minilora.ops import (cross_entropy_backward, cross_entropy_forward, gelu_backward, gelu_forward,
                          layernorm_backward, layernorm_forward, softmax_backward, softmax_forward)
from minilora.optim import AdamW


@pytest.fixture(autouse=True)
def tiny_threshold(monkeypatch):
    """Every test here splits even tiny arrays."""
    monkeypatch.setattr(threads, "MIN_PARALLEL_SIZE", 1)


@pytest.fixture
def split_everything():
    """Three threads: an odd count, so blocks differ in length."""
    old = threads.get_num_threads()
    threads.set_num_threads(3)
    yield
    threads.set_num_threads(old)


def one_thread_then_three(fn):
    """fn() with one thread and whole blocks, then with three threads that each call
    their kernel on chunks of a few rows: two results."""
    old, old_chunk = threads.get_num_threads(), threads.CHUNK_SIZE
    try:
        threads.set_num_threads(1)
        threads.CHUNK_SIZE = 1 << 40
        single = fn()
        threads.set_num_threads(3)
        threads.CHUNK_SIZE = 24
        split = fn()
    finally:
        threads.set_num_threads(old)
        threads.CHUNK_SIZE = old_chunk
    return single, split


def test_map_row_blocks_covers_every_row_once(split_everything):
    seen = []

    def kernel(out, x):
        seen.append(x.shape[0])
        out[...] = 2 * x

    x = np.arange(7 * 5, dtype=np.float32).reshape(7, 5)
    out = np.zeros_like(x)
    threads.map_row_blocks(kernel, out, x)
    assert sorted(seen) == [2, 2, 3]               # 7 rows in three blocks
    np.testing.assert_array_equal(out, 2 * x)


def test_each_thread_calls_the_kernel_on_chunks_of_whole_rows(split_everything, monkeypatch):
    monkeypatch.setattr(threads, "CHUNK_SIZE", 10)     # two rows of 5
    seen = []

    def kernel(out, x):
        seen.append(x.shape)
        out[...] = 2 * x

    x = np.arange(7 * 5, dtype=np.float32).reshape(7, 5)
    out = np.zeros_like(x)
    threads.map_row_blocks(kernel, out, x)             # blocks of 2, 2, 3 rows
    assert sorted(seen) == [(1, 5)] + [(2, 5)] * 3
    np.testing.assert_array_equal(out, 2 * x)
    seen.clear()
    monkeypatch.setattr(threads, "CHUNK_SIZE", 3)      # shorter than a row: one row a call
    threads.map_row_blocks(kernel, out, x)
    assert seen == [(1, 5)] * 7


def test_map_row_blocks_does_not_split_small_arrays_or_one_thread(monkeypatch):
    calls = []
    kernel = lambda x: calls.append(x.shape)
    monkeypatch.setattr(threads, "MIN_PARALLEL_SIZE", 100)
    old = threads.get_num_threads()
    threads.set_num_threads(2)
    try:
        threads.map_row_blocks(kernel, np.zeros((10, 5)))            # 50 < 100 elements
        threads.map_row_blocks(kernel, np.zeros((10, 50)), min_size=1000)
        threads.set_num_threads(1)
        threads.map_row_blocks(kernel, np.zeros((10, 50)))
    finally:
        threads.set_num_threads(old)
    assert calls == [(10, 5), (10, 50), (10, 50)]


def test_map_row_blocks_reraises_a_blocks_error_after_all_finish(split_everything):
    done = []

    def kernel(x):
        if x[0, 0] > 0:            # not the first block: raised in a pool thread
            raise FloatingPointError(f"block starting at row {int(x[0, 0])}")
        done.append(True)

    x = np.repeat(np.arange(9.0)[:, None], 2, axis=1)
    with pytest.raises(FloatingPointError, match="block starting at row"):
        threads.map_row_blocks(kernel, x)
    assert done == [True]


def test_map_row_blocks_rejects_arrays_of_different_lengths():
    with pytest.raises(ValueError, match="first axis"):
        threads.map_row_blocks(lambda a, b: None, np.zeros((4, 2)), np.zeros((5, 2)))


def test_kernels_do_not_split_again_inside_a_block(split_everything):
    inner = []

    def outer(x):
        threads.map_row_blocks(lambda y: inner.append(y.shape[0]), x)

    threads.map_row_blocks(outer, np.zeros((9, 4)))
    assert sorted(inner) == [3, 3, 3]              # each block ran its inner call whole


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_set_num_threads_validates(bad):
    with pytest.raises(ValueError, match="set_num_threads: n must be a positive integer"):
        threads.set_num_threads(bad)


@pytest.mark.parametrize("value, message", [("zero", "whole number"), ("0", ">= 1")])
def test_bad_environment_variable_is_named(monkeypatch, value, message):
    monkeypatch.setenv("MINILORA_NUM_THREADS", value)
    with pytest.raises(ValueError, match=f"MINILORA_NUM_THREADS must be.*{message}"):
        threads._default_num_threads()


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("MINILORA_NUM_THREADS", "5")
    assert threads._default_num_threads() == 5


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs os.fork")
def test_a_forked_child_makes_its_own_pool(split_everything):
    threads.map_row_blocks(lambda x: None, np.zeros((6, 2)))      # the parent has a pool now
    pid = os.fork()
    if pid == 0:                                                  # the child: must not hang
        try:
            out = np.zeros((6, 2))
            threads.map_row_blocks(lambda o: o.fill(1.0), out)
            os._exit(0 if out.sum() == 12 else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


# --------------------------------------------------------------------------------------
# Every threaded op: split == unsplit, bit for bit
# --------------------------------------------------------------------------------------

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 7, 13), (5, 16), (11,)])
def test_gelu_split_equals_unsplit_and_in_place_equals_fresh(dtype, shape):
    x = (RNG.standard_normal(shape) * 3).astype(dtype)
    dy = RNG.standard_normal(shape).astype(dtype)

    def run():
        y, cache = gelu_forward(x)
        dy_scratch = dy.copy()
        dx_in_place = gelu_backward(dy_scratch, cache, out=dy_scratch)   # dx written over dy
        assert dx_in_place is dy_scratch
        return y, gelu_backward(dy, cache), dx_in_place

    (y1, dx1, in_place1), (y3, dx3, in_place3) = one_thread_then_three(run)
    np.testing.assert_array_equal(y1, y3)
    np.testing.assert_array_equal(dx1, dx3)
    np.testing.assert_array_equal(in_place1, dx1)
    np.testing.assert_array_equal(in_place3, dx1)


@pytest.mark.parametrize("out", [np.zeros((5, 15)), np.zeros((5, 16), dtype=np.float32),
                                 np.zeros((16, 5)).T])
def test_gelu_backward_out_is_checked(out):
    _, cache = gelu_forward(np.zeros((5, 16)))
    with pytest.raises(ValueError, match="gelu_backward: out must be"):
        gelu_backward(np.ones((5, 16)), cache, out=out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_split_equals_unsplit_and_in_place_equals_fresh(dtype):
    x = (RNG.standard_normal((2, 3, 5, 9)) * 4).astype(dtype)
    dp = RNG.standard_normal(x.shape).astype(dtype)

    def run():
        p, cache = softmax_forward(x)
        return p, softmax_backward(dp, cache)

    (p1, dx1), (p3, dx3) = one_thread_then_three(run)
    np.testing.assert_array_equal(p1, p3)
    np.testing.assert_array_equal(dx1, dx3)
    scratch, dp_scratch = x.copy(), dp.copy()
    p_in_place, cache = softmax_forward(scratch, out=scratch)
    assert p_in_place is scratch
    np.testing.assert_array_equal(p_in_place, p1)
    dx_in_place = softmax_backward(dp_scratch, cache, out=dp_scratch)
    assert dx_in_place is dp_scratch
    np.testing.assert_array_equal(dx_in_place, dx1)


@pytest.mark.parametrize("out", [np.zeros((2, 9)), np.zeros((2, 3, 5, 9), dtype=np.float32),
                                 np.zeros((2, 3, 9, 5)).transpose(0, 1, 3, 2)])
def test_softmax_out_is_checked(out):
    x = np.zeros((2, 3, 5, 9))
    with pytest.raises(ValueError, match="softmax: out must be"):
        softmax_forward(x, out=out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layernorm_split_equals_unsplit(dtype):
    x = (RNG.standard_normal((3, 7, 10)) * 2 + 1).astype(dtype)
    weight, bias = RNG.standard_normal(10).astype(dtype), RNG.standard_normal(10).astype(dtype)
    dy = RNG.standard_normal(x.shape).astype(dtype)

    def run():
        y, cache = layernorm_forward(x, weight, bias)
        return (y, cache.xhat, cache.rstd) + layernorm_backward(dy, cache)

    for single, split in zip(*one_thread_then_three(run)):
        np.testing.assert_array_equal(single, split)


def test_cross_entropy_split_equals_unsplit():
    logits = (RNG.standard_normal((4, 5, 33)) * 3).astype(np.float32)
    targets = RNG.integers(0, 33, size=(4, 5))
    targets[1, 2] = -100

    def run():
        loss, cache = cross_entropy_forward(logits, targets)
        return loss, cross_entropy_backward(1.0, cache)

    (loss1, d1), (loss3, d3) = one_thread_then_three(run)
    assert loss1 == loss3
    np.testing.assert_array_equal(d1, d3)


@pytest.mark.parametrize("order", ["C", "F"])
def test_adamw_split_equals_unsplit(order):
    """Three steps of AdamW on row-major and on column-major parameters (which cannot be
    flattened without a copy and are split by rows instead)."""
    shapes = [(7, 6), (13,), (3, 4, 5)]
    data = [RNG.standard_normal(s) for s in shapes]
    grads = [[RNG.standard_normal(s) for s in shapes] for _ in range(3)]

    def run():
        params = [Parameter(np.array(d, order=order)) for d in data]
        opt = AdamW(params, lr=0.1, weight_decay=0.1)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = np.array(g, order=order)
            opt.step()
        return [p.data.copy() for p in params]

    single, split = one_thread_then_three(run)
    for a, b in zip(single, split):
        np.testing.assert_array_equal(a, b)
    moved = [not np.allclose(a, d) for a, d in zip(single, data)]
    assert all(moved)


def test_a_training_step_is_bit_identical_with_one_and_three_threads():
    config = ml.GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=16)
    idx = RNG.integers(0, 37, size=(3, 16))
    targets = RNG.integers(0, 37, size=(3, 16))

    def run():
        model = ml.GPT(config, seed=1)
        opt = ml.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(2):
            model.zero_grad()
            loss, dlogits = ml.cross_entropy(model.forward(idx), targets)
            model.backward(dlogits)
            opt.step()
            losses.append(loss)
        return losses, [p.data.copy() for p in model.parameters()]

    (losses1, params1), (losses3, params3) = one_thread_then_three(run)
    assert losses1 == losses3
    for a, b in zip(params1, params3):
        np.testing.assert_array_equal(a, b)


def test_softmax_backward_still_broadcasts():
    """dp of shape (K, K) against p of shape (K,): row i is the Jacobian's row i (J is
    symmetric), the way tutorial 02 builds the whole Jacobian in one call."""
    p, cache = softmax_forward(RNG.standard_normal(6))
    jacobian = np.diag(p) - np.outer(p, p)
    np.testing.assert_allclose(softmax_backward(np.eye(6), cache), jacobian, atol=1e-15)
    out = np.empty((6, 6))
    assert softmax_backward(np.eye(6), cache, out=out) is out
    np.testing.assert_allclose(out, jacobian, atol=1e-15)
    with pytest.raises(ValueError, match="softmax: out must be"):
        softmax_backward(np.eye(6), cache, out=np.empty(6))
