"""Every ops pair: the analytic backward equals central differences (float64, random
upstream gradient, every element, relative error below 1e-6), on shapes that hypothesis
draws -- B=1, T=1, one head and rank 1 included.
"""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora import backend
from minilora.gradcheck import check_gradients, numerical_gradient, relative_error
from minilora.ops import (attention_backward, attention_forward, cross_entropy_backward,
                          cross_entropy_forward, dropout_backward, dropout_forward,
                          embedding_backward, embedding_forward, gelu_backward, gelu_forward,
                          layernorm_backward, layernorm_forward, linear_backward, linear_forward,
                          lowrank_backward, lowrank_forward, softmax_backward, softmax_forward)

from strategies import assert_gradients_match, batch, features, head_size, heads, randn, rank, seeds, time


@given(seeds, batch, time, features, features, st.booleans())
def test_linear(device, seed, B, T, I, O, with_bias):
    rng = np.random.default_rng(seed)
    x, W = randn(rng, B, T, I, device=device), randn(rng, I, O, device=device)
    b = randn(rng, O, device=device) if with_bias else None
    y, cache = linear_forward(x, W, b)
    dy = randn(rng, *y.shape, device=device)
    dx, dW, db = linear_backward(dy, cache)
    inputs, analytic = {"x": x, "W": W}, {"x": dx, "W": dW}
    if with_bias:
        inputs["b"], analytic["b"] = b, db
    else:
        assert db is None
    assert_gradients_match(check_gradients(lambda: linear_forward(x, W, b)[0], inputs, analytic, dy))


def test_linear_frozen_weight_keeps_no_input(device):
    """A frozen layer needs W for dx but never x: its cache must not keep x alive."""
    rng = np.random.default_rng(0)
    x, W = randn(rng, 2, 3, 4, device=device), randn(rng, 4, 5, device=device)
    y, cache = linear_forward(x, W, None, keep_input=False)
    assert cache.x is None
    dy = randn(rng, *y.shape, device=device)
    dx, dW, _ = linear_backward(dy, cache, need_dW=False)
    assert dW is None and relative_error(dx, linear_backward(dy, linear_forward(x, W)[1])[0]) == 0.0
    with pytest.raises(RuntimeError, match="kept no input"):
        linear_backward(dy, cache, need_dW=True)


def test_linear_frozen_weight_skips_its_gradient(device):
    rng = np.random.default_rng(0)
    x, W, b = randn(rng, 2, 3, 4, device=device), randn(rng, 4, 5, device=device), randn(rng, 5, device=device)
    y, cache = linear_forward(x, W, b)
    dx, dW, db = linear_backward(randn(rng, *y.shape, device=device), cache, need_dW=False, need_db=False)
    assert dW is None and db is None and dx.shape == x.shape


@given(seeds, batch, time, features, st.integers(1, 7))
def test_embedding(device, seed, B, T, C, V):
    rng = np.random.default_rng(seed)
    table = randn(rng, V, C, device=device)
    idx = backend.to_device(rng.integers(0, V, size=(B, T)), device)  # repeats are likely: they must add up
    y, cache = embedding_forward(idx, table)
    dy = randn(rng, *y.shape, device=device)
    dtable = embedding_backward(dy, cache)
    assert_gradients_match(check_gradients(lambda: embedding_forward(idx, table)[0],
                                           {"table": table}, {"table": dtable}, dy))


@pytest.mark.parametrize("index_dtype", [np.uint8, np.int16, np.int32, np.int64])
def test_embedding_backward_is_the_row_scatter_add_exactly(device, index_dtype):
    """The backward scatters element by element on the flat table (NumPy's fast add.at
    loop); it must give exactly the textbook row-by-row ``np.add.at(dtable, idx, dy)``,
    whatever the index dtype (v * C must not overflow a narrow integer type)."""
    rng = np.random.default_rng(0)
    V, C = 200, 300                                   # 199 * 300 overflows uint8 and int16
    idx = rng.integers(0, V, size=(3, 50)).astype(index_dtype)
    idx[0, :10] = V - 1                               # the last row, repeated
    dy = rng.standard_normal((3, 50, C)).astype(np.float32)
    _, cache = embedding_forward(backend.to_device(idx, device), backend.to_device(np.zeros((V, C), np.float32), device))
    dtable = backend.to_numpy(embedding_backward(backend.to_device(dy, device), cache))
    expected = np.zeros((V, C), np.float32)
    np.add.at(expected, idx.reshape(-1), dy.reshape(-1, C))
    if device == "cpu":
        assert np.array_equal(dtable, expected)
    else:                                             # the GPU adds repeats in any order
        np.testing.assert_allclose(dtable, expected, rtol=1e-5, atol=1e-5)


def test_embedding_rejects_bad_indices(device):
    table = backend.to_device(np.zeros((4, 2)), device)
    with pytest.raises(ValueError, match="out of range"):
        embedding_forward(backend.to_device(np.array([[0, 4]]), device), table)
    with pytest.raises(ValueError, match="out of range"):
        embedding_forward(backend.to_device(np.array([[-1]]), device), table)
    with pytest.raises(ValueError, match="integers"):
        embedding_forward(backend.to_device(np.array([[0.0]]), device), table)


@given(seeds, batch, time, st.integers(3, 6))
def test_layernorm(device, seed, B, T, C):
    """C >= 3: with two channels the normalised row is always (-1, +1) up to eps, so
    the true dx is ~eps-small and a relative error would only measure rounding noise."""
    rng = np.random.default_rng(seed)
    x = randn(rng, B, T, C, device=device, scale=2.0)
    weight, bias = randn(rng, C, device=device), randn(rng, C, device=device)
    y, cache = layernorm_forward(x, weight, bias, 1e-5)
    dy = randn(rng, *y.shape, device=device)
    dx, dweight, dbias = layernorm_backward(dy, cache)
    assert_gradients_match(check_gradients(lambda: layernorm_forward(x, weight, bias, 1e-5)[0],
                                           {"x": x, "weight": weight, "bias": bias},
                                           {"x": dx, "weight": dweight, "bias": dbias}, dy))


def test_layernorm_normalises(device):
    rng = np.random.default_rng(0)
    x = randn(rng, 3, 4, 8, device=device, scale=5.0) + 3.0
    xp = backend.get_array_module(x)
    y, _ = layernorm_forward(x, xp.ones(8), xp.zeros(8), 1e-5)
    assert float(xp.abs(y.mean(-1)).max()) < 1e-12
    assert float(xp.abs(y.var(-1) - 1.0).max()) < 1e-5  # eps shifts the variance slightly


@pytest.mark.parametrize("dy_shape", [(), (5,), (1, 4, 5)])
def test_layernorm_backward_with_a_broadcasting_dy_matches_the_full_one(device, dy_shape):
    """A dy that broadcasts against the output (a scalar, one row) must give the same
    three gradients as that dy written out in full: dbias sums it over every row."""
    rng = np.random.default_rng(1)
    x = randn(rng, 3, 4, 5, device=device)
    weight, bias = randn(rng, 5, device=device), randn(rng, 5, device=device)
    _, cache = layernorm_forward(x, weight, bias, 1e-5)
    xp = backend.get_array_module(x)
    dy = randn(rng, *dy_shape, device=device) if dy_shape else xp.asarray(0.7)
    small = layernorm_backward(dy, cache)
    full = layernorm_backward(xp.broadcast_to(dy, x.shape).copy(), cache)
    for name, a, b in zip(("dx", "dweight", "dbias"), small, full):
        np.testing.assert_allclose(backend.to_numpy(a), backend.to_numpy(b), rtol=1e-12, atol=1e-14,
                                   err_msg=name)

@given(seeds, batch, time, features)
def test_gelu(device, seed, B, T, C):
    """Inputs in [-9, 9]. The sigmoid form x / (1 + exp(-2u)) keeps its digits for
    negative x; the textbook ``0.5 x (1 + tanh u)`` cancels below about -4 and fails
    this check there (central differences then measure its rounding, not the backward)."""
    rng = np.random.default_rng(seed)
    x = backend.to_device(np.clip(rng.standard_normal((B, T, C)) * 4.0, -9.0, 9.0), device)
    y, cache = gelu_forward(x)
    dy = randn(rng, *y.shape, device=device)
    assert_gradients_match(check_gradients(lambda: gelu_forward(x)[0], {"x": x},
                                           {"x": gelu_backward(dy, cache)}, dy))


def test_gelu_is_gpt2s_tanh_approximation(device):
    x = np.linspace(-4, 4, 41)
    y, _ = gelu_forward(backend.to_device(x, device))
    expected = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(backend.to_numpy(y), expected, rtol=0, atol=1e-15)


@given(seeds, batch, time, st.integers(1, 6))
def test_softmax(device, seed, B, T, K):
    rng = np.random.default_rng(seed)
    x = randn(rng, B, T, K, device=device, scale=3.0)
    p, cache = softmax_forward(x)
    dp = randn(rng, *p.shape, device=device)
    assert_gradients_match(check_gradients(lambda: softmax_forward(x)[0], {"x": x},
                                           {"x": softmax_backward(dp, cache)}, dp))


def test_softmax_sum_loss_proves_nothing(device):
    """Why the checks use a random upstream gradient: with dy = ones the loss is
    sum(softmax(x)) = const, so even a backward that returns zeros 'passes'."""
    rng = np.random.default_rng(0)
    x = randn(rng, 2, 5, device=device)
    ones = backend.get_array_module(x).ones((2, 5))
    numeric = numerical_gradient(lambda: float(softmax_forward(x)[0].sum()), x)
    assert float(abs(numeric).max()) < 1e-9                  # the "check" sees nothing
    p, cache = softmax_forward(x)
    assert float(abs(softmax_backward(ones, cache)).max()) < 1e-15
    dy = randn(rng, 2, 5, device=device)                     # a random dy does see it
    numeric = numerical_gradient(lambda: float((softmax_forward(x)[0] * dy).sum()), x)
    assert float(abs(numeric).max()) > 1e-3


def test_softmax_is_stable_for_huge_logits(device):
    x = backend.to_device(np.array([[1000.0, 1000.0, -1000.0]]), device)
    p, _ = softmax_forward(x)
    np.testing.assert_allclose(backend.to_numpy(p), [[0.5, 0.5, 0.0]], atol=1e-15)


@given(seeds, batch, time, st.integers(0, 3), heads, head_size)
def test_attention(device, seed, B, Tq, extra_keys, H, D):
    """Tk = Tq + extra_keys covers both the usual square case and a KV-cache step."""
    rng = np.random.default_rng(seed)
    Tk, C = Tq + extra_keys, H * D
    q, k, v = randn(rng, B, Tq, C, device=device), randn(rng, B, Tk, C, device=device), randn(rng, B, Tk, C, device=device)
    y, cache = attention_forward(q, k, v, H)
    dy = randn(rng, *y.shape, device=device)
    dq, dk, dv = attention_backward(dy, cache)
    assert_gradients_match(check_gradients(lambda: attention_forward(q, k, v, H)[0],
                                           {"q": q, "k": k, "v": v}, {"q": dq, "k": dk, "v": dv}, dy))


@given(seeds, batch, st.integers(1, 9), st.integers(0, 3), heads, head_size, st.integers(1, 4))
def test_attention_in_query_blocks(device, seed, B, Tq, extra_keys, H, D, query_block):
    """Cut into blocks of query rows, attention gives the one-block (full-matrix) result
    and its gradients, and passes a gradient check itself."""
    rng = np.random.default_rng(seed)
    Tk, C = Tq + extra_keys, H * D
    q, k, v = randn(rng, B, Tq, C, device=device), randn(rng, B, Tk, C, device=device), randn(rng, B, Tk, C, device=device)
    y, cache = attention_forward(q, k, v, H, query_block=query_block)
    y_full, cache_full = attention_forward(q, k, v, H, query_block=Tq)
    assert len(cache.blocks) == -(-Tq // query_block) and len(cache_full.blocks) == 1
    dy = randn(rng, *y.shape, device=device)
    grads, grads_full = attention_backward(dy, cache), attention_backward(dy, cache_full)
    for name, a, b in zip(("y", "dq", "dk", "dv"), (y, *grads), (y_full, *grads_full)):
        np.testing.assert_allclose(backend.to_numpy(a), backend.to_numpy(b), rtol=0, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(backend.to_numpy(cache.probabilities()),
                               backend.to_numpy(cache_full.probabilities()), rtol=0, atol=1e-14)
    assert_gradients_match(check_gradients(lambda: attention_forward(q, k, v, H, query_block=query_block)[0],
                                           {"q": q, "k": k, "v": v}, dict(zip("qkv", grads)), dy))


def test_attention_blocks_skip_the_future_keys(device):
    """Blocks of 2 queries over 5 keys (2 cached, 3 new): each block's scores stop at the
    last key its last query may see."""
    rng = np.random.default_rng(0)
    q, k, v = randn(rng, 1, 3, 4, device=device), randn(rng, 1, 5, 4, device=device), randn(rng, 1, 5, 4, device=device)
    _, cache = attention_forward(q, k, v, 2, query_block=2)
    assert [(b.start, b.stop, b.keys) for b in cache.blocks] == [(0, 2, 4), (2, 3, 5)]
    assert [b.softmax.p.shape for b in cache.blocks] == [(1, 2, 2, 4), (1, 2, 1, 5)]
    P = backend.to_numpy(cache.probabilities())                 # (1, 2, 3, 5)
    np.testing.assert_allclose(P.sum(-1), 1.0, rtol=0, atol=1e-14)
    assert (P[..., 0, 3:] == 0).all() and (P[..., 1, 4:] == 0).all() and (P[..., 2, :] > 0).all()


def test_attention_refuses_bad_blocks_and_empty_queries(device):
    rng = np.random.default_rng(0)
    x = randn(rng, 1, 3, 4, device=device)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="query_block"):
            attention_forward(x, x, x, 2, query_block=bad)
    with pytest.raises(ValueError, match="incompatible shapes"):
        attention_forward(x[:, :0], x, x, 2)


def test_attention_is_causal(device):
    """Changing a future token's key or value changes no earlier output."""
    rng = np.random.default_rng(0)
    q, k, v = (randn(rng, 1, 5, 4, device=device) for _ in range(3))
    y, _ = attention_forward(q, k, v, 2)
    k2, v2 = k.copy(), v.copy()
    k2[:, 3:] += 10.0
    v2[:, 3:] -= 10.0
    y2, _ = attention_forward(q, k2, v2, 2)
    assert float(abs(y2[:, :3] - y[:, :3]).max()) == 0.0
    assert float(abs(y2[:, 3:] - y[:, 3:]).max()) > 1e-3


@given(seeds, batch, time, st.integers(2, 7), st.integers(0, 100))
def test_attention_with_dropout(device, seed, B, T, C, p_percent):
    """With a fixed mask, dropout is linear: gradient-check the op with dropout on."""
    p = min(p_percent, 90) / 100.0
    rng = np.random.default_rng(seed)
    q, k, v = (randn(rng, B, T, C, device=device) for _ in range(3))
    y, cache = attention_forward(q, k, v, 1, p, backend.default_rng(seed, device))
    replay = lambda: attention_forward(q, k, v, 1, p, backend.default_rng(seed, device))[0]  # same mask
    dy = randn(rng, *y.shape, device=device)
    dq, dk, dv = attention_backward(dy, cache)
    assert_gradients_match(check_gradients(replay, {"q": q, "k": k, "v": v},
                                           {"q": dq, "k": dk, "v": dv}, dy))


@given(seeds, batch, time, st.integers(1, 6), st.booleans())
def test_cross_entropy(device, seed, B, T, V, with_ignored):
    rng = np.random.default_rng(seed)
    logits = randn(rng, B, T, V, device=device, scale=2.0)
    targets = rng.integers(0, V, size=(B, T))
    if with_ignored and B * T > 1:
        targets[0, 0] = -100
    targets = backend.to_device(targets, device)
    loss, cache = cross_entropy_forward(logits, targets)
    dloss = float(rng.standard_normal())  # a random upstream gradient for a scalar output
    dlogits = cross_entropy_backward(dloss, cache)
    numeric = numerical_gradient(lambda: dloss * cross_entropy_forward(logits, targets)[0], logits)
    assert relative_error(dlogits, numeric) < 1e-6


def test_cross_entropy_value_and_ignore_index(device):
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    targets = np.array([[0, -100]])
    loss, cache = cross_entropy_forward(backend.to_device(logits, device), backend.to_device(targets, device))
    assert abs(loss - (-math.log(0.5))) < 1e-12            # the ignored position is not averaged in
    dlogits = backend.to_numpy(cross_entropy_backward(1.0, cache))
    assert np.all(dlogits[0, 1] == 0.0)
    with pytest.raises(ValueError, match="ignore_index"):
        cross_entropy_forward(backend.to_device(logits, device), backend.to_device(np.full((1, 2), -100), device))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cross_entropy_forward(backend.to_device(logits, device), backend.to_device(np.array([[0, 3]]), device))
    with pytest.raises(ValueError, match="shape"):
        cross_entropy_forward(backend.to_device(logits, device), backend.to_device(np.array([0, 1]), device))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cross_entropy_over_the_logits_equals_a_fresh_one(device, dtype):
    """``overwrite_logits=True`` gives the same loss and dlogits, bit for bit, in the
    logits' own memory; an ``out`` of the wrong shape, dtype or layout is refused."""
    rng = np.random.default_rng(3)
    logits = randn(rng, 2, 3, 7, device=device).astype(dtype)
    targets = backend.to_device(np.array([[0, 6, -100], [3, 3, 1]]), device)
    kept = logits.copy()
    loss, dlogits = ml.cross_entropy(logits, targets)
    np.testing.assert_array_equal(backend.to_numpy(logits), backend.to_numpy(kept))   # untouched
    loss_in_place, dlogits_in_place = ml.cross_entropy(logits, targets, overwrite_logits=True)
    assert dlogits_in_place is logits or dlogits_in_place.base is logits
    assert loss_in_place == loss
    np.testing.assert_array_equal(backend.to_numpy(dlogits_in_place), backend.to_numpy(dlogits))
    xp = backend.get_array_module(kept)
    for bad in (xp.empty((2, 3, 6), dtype=dtype), xp.empty((2, 3, 7), dtype="float16"),
                xp.empty((7, 3, 2), dtype=dtype).transpose(2, 1, 0)):
        with pytest.raises(ValueError, match="out must be"):
            cross_entropy_forward(kept, targets, out=bad)


@given(seeds, batch, time, features, st.integers(0, 90))
def test_dropout(device, seed, B, T, C, p_percent):
    p = p_percent / 100.0
    rng = np.random.default_rng(seed)
    x = randn(rng, B, T, C, device=device)
    y, cache = dropout_forward(x, p, backend.default_rng(seed, device))
    dy = randn(rng, *y.shape, device=device)
    replay = lambda: dropout_forward(x, p, backend.default_rng(seed, device))[0]
    assert_gradients_match(check_gradients(replay, {"x": x}, {"x": dropout_backward(dy, cache)}, dy))
    y_np, x_np = backend.to_numpy(y), backend.to_numpy(x)
    kept = y_np != 0
    np.testing.assert_allclose(y_np[kept], x_np[kept] / (1 - p), rtol=1e-12)  # inverted scaling


def test_dropout_statistics_and_identity(device):
    xp = backend.get_array_module(backend.to_device(np.zeros(1), device))
    x = xp.ones((200, 500))
    y, _ = dropout_forward(x, 0.3, backend.default_rng(0, device))
    dropped = float((y == 0).mean())
    assert abs(dropped - 0.3) < 0.01                # 100k draws: 4 sigma is ~0.006
    assert abs(float(y.mean()) - 1.0) < 0.02        # expectation preserved
    y0, cache = dropout_forward(x, 0.0, None)
    assert y0 is x and cache.mask is None
    with pytest.raises(ValueError):
        dropout_forward(x, 1.0, None)


@given(seeds, batch, time, features, features, rank)
def test_lowrank(device, seed, B, T, I, O, R):
    rng = np.random.default_rng(seed)
    x, A, Bm = randn(rng, B, T, I, device=device), randn(rng, R, I, device=device), randn(rng, O, R, device=device)
    scaling = float(rng.uniform(0.1, 4.0))
    delta, cache = lowrank_forward(x, A, Bm, scaling)
    ddelta = randn(rng, *delta.shape, device=device)
    dx, dA, dB = lowrank_backward(ddelta, cache)
    assert_gradients_match(check_gradients(lambda: lowrank_forward(x, A, Bm, scaling)[0],
                                           {"x": x, "A": A, "B": Bm}, {"x": dx, "A": dA, "B": dB}, ddelta))
    # the same update as the dense matrix scaling * (B A)^T applied to x
    dense = x @ (scaling * (Bm @ A)).T
    assert relative_error(delta, dense) < 1e-12


def test_lowrank_grad_A_is_zero_while_B_is_zero(device):
    rng = np.random.default_rng(0)
    x, A = randn(rng, 2, 3, 5, device=device), randn(rng, 2, 5, device=device)
    Bm = backend.get_array_module(x).zeros((4, 2))
    delta, cache = lowrank_forward(x, A, Bm, 2.0)
    _, dA, dB = lowrank_backward(randn(rng, *delta.shape, device=device), cache)
    assert float(abs(delta).max()) == 0.0 and float(abs(dA).max()) == 0.0
    assert float(abs(dB).max()) > 0.0
