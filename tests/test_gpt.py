"""The whole GPT-2 model: gradient check, GPT-2's structure and initialisation, errors
on bad input, state dicts, inference mode, generation with a KV cache, and a smoke
training run that must overfit a tiny text."""
import math

import numpy as np
import pytest

import minilora as ml
from minilora import backend
from minilora.gradcheck import numerical_gradient, relative_error

TINY = ml.GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)


def perturbed_model(config=TINY, seed=0, noise=0.5, device="cpu", dtype="float64"):
    """A float64 model whose weights are far from their initial values, so that every
    parameter (LayerNorm gains included) carries a gradient worth checking."""
    model = ml.GPT(config, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    for _, p in model.named_parameters():
        p.data = (p.data + noise * rng.standard_normal(p.shape)).astype(p.data.dtype)
    return model.to(device)


def test_whole_model_gradient_check(device):
    """Every element of every parameter's gradient matches central differences.

    The key projection's bias is the exception that proves the rule: adding the same
    vector b to every key adds q.b to every score in a row, and softmax ignores a constant
    shift -- so its true gradient is exactly zero. It is checked to be (numerically) zero.
    """
    model = perturbed_model(device=device)
    rng = np.random.default_rng(2)
    idx = rng.integers(0, TINY.vocab_size, size=(2, 5))
    targets = rng.integers(0, TINY.vocab_size, size=(2, 5))
    loss, dlogits = ml.cross_entropy(model.forward(idx), targets)
    model.zero_grad()
    model.backward(dlogits)
    loss_fn = lambda: ml.cross_entropy(model.forward(idx), targets)[0]
    assert abs(loss_fn() - loss) == 0.0
    errors = {}
    for name, p in model.named_parameters():
        numeric = numerical_gradient(loss_fn, p.data)
        if name.endswith("attn.k_proj.bias"):
            assert float(abs(p.grad).max()) < 1e-14 and float(abs(numeric).max()) < 1e-9, name
            continue
        errors[name] = relative_error(p.grad, numeric)
    assert len(errors) == len(list(model.named_parameters())) - TINY.n_layer
    assert max(errors.values()) < 1e-6, errors


def test_parameter_names_and_count():
    model = ml.GPT(TINY)
    names = [n for n, _ in model.named_parameters()]
    assert names[:2] == ["token_embedding.weight", "position_embedding.weight"]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"blocks.0.attn.{proj}.weight" in names
    assert "blocks.1.mlp.up_proj.weight" in names and "blocks.1.mlp.down_proj.bias" in names
    assert not any("head" in n for n in names)  # tied to the token embedding
    V, T, C, L = TINY.vocab_size, TINY.block_size, TINY.n_embd, TINY.n_layer
    per_block = 2 * C + 4 * (C * C + C) + 2 * C + (C * 4 * C + 4 * C) + (4 * C * C + C)
    assert model.num_parameters() == V * C + T * C + L * per_block + 2 * C
    assert model.state_dict()["blocks.0.attn.q_proj.weight"].shape == (C, C)  # (in, out)
    assert model.state_dict()["blocks.0.mlp.up_proj.weight"].shape == (C, 4 * C)


def test_gpt2_initialisation():
    cfg = ml.GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128)
    model = ml.GPT(cfg, seed=3)
    sd = model.state_dict()
    assert abs(sd["token_embedding.weight"].std() - 0.02) < 0.001
    assert abs(sd["blocks.0.attn.q_proj.weight"].std() - 0.02) < 0.001
    residual = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name in ("blocks.0.attn.o_proj.weight", "blocks.3.mlp.down_proj.weight"):
        assert abs(sd[name].std() - residual) < 0.1 * residual
    assert np.all(sd["blocks.0.ln_1.weight"] == 1) and np.all(sd["blocks.0.attn.q_proj.bias"] == 0)
    again = ml.GPT(cfg, seed=3).state_dict()
    assert all(np.array_equal(sd[k], again[k]) for k in sd)        # a seed names one model
    other = ml.GPT(cfg, seed=4).state_dict()
    assert not np.array_equal(sd["token_embedding.weight"], other["token_embedding.weight"])
    assert model.dtype == np.float32


def test_weight_decay_defaults_follow_parameter_kinds():
    model = ml.GPT(TINY)
    decayed = {n for n, p in model.named_parameters() if p.decay}
    assert decayed == {n for n, _ in model.named_parameters() if n.endswith("proj.weight")}


@pytest.mark.parametrize("bad, message", [
    (np.array([[0, 11]]), "out of range"),
    (np.array([[-1, 0]]), "out of range"),
    (np.zeros((1, 7), dtype=np.int64), "block_size"),
    (np.zeros((1, 2), dtype=np.float32), "integer"),
    (np.zeros(3, dtype=np.int64), r"\(B, T\)"),
    (np.zeros((1, 0), dtype=np.int64), "empty"),
])
def test_bad_tokens_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        ml.GPT(TINY).forward(bad)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_embd=10, n_head=3), "divisible"),
    (dict(n_layer=0), "positive"),
    (dict(dropout=1.0), "dropout"),
    (dict(vocab_size=2.5), "vocab_size"),
])
def test_bad_config_raises(kwargs, message):
    base = dict(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)
    with pytest.raises(ValueError, match=message):
        ml.GPTConfig(**{**base, **kwargs})


def test_bad_dtype_raises():
    with pytest.raises(ValueError, match="dtype"):
        ml.GPT(TINY, dtype="float16")


def test_state_dict_round_trip_and_errors():
    a, b = ml.GPT(TINY, seed=0), ml.GPT(TINY, seed=1)
    b.load_state_dict(a.state_dict())
    idx = np.array([[1, 2, 3]])
    assert np.array_equal(a.forward(idx), b.forward(idx))
    sd = dict(a.state_dict())
    sd.pop("ln_f.bias")
    sd["surprise"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys: \['ln_f.bias'\].*unexpected keys: \['surprise'\]"):
        b.load_state_dict(sd)
    sd = dict(a.state_dict())
    sd["ln_f.weight"] = np.zeros(3)
    with pytest.raises(ValueError, match="shape mismatch for 'ln_f.weight'"):
        b.load_state_dict(sd)


def test_frozen_parameters_get_no_gradient():
    model = perturbed_model()
    frozen = [p for n, p in model.named_parameters() if n.startswith("blocks.0.")]
    for p in frozen:
        p.requires_grad = False
    idx = np.array([[1, 2, 3, 4]])
    _, dlogits = ml.cross_entropy(model.forward(idx), np.array([[2, 3, 4, 5]]))
    model.backward(dlogits)
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.num_parameters(trainable_only=True) == model.num_parameters() - sum(p.size for p in frozen)


def test_gradients_are_row_major_like_their_parameters():
    """Every gradient has its parameter's (row-major) layout. The tied head's gradient is
    the transpose of a product; stored as a transposed view, it made AdamW's elementwise
    passes over the embedding stride across memory and ~10x slower (bench/README.md)."""
    model = perturbed_model(dtype="float32")
    idx = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    _, dlogits = ml.cross_entropy(model.forward(idx), np.array([[2, 3, 4, 5], [6, 7, 8, 9]]))
    model.backward(dlogits)
    for name, p in model.named_parameters():
        assert p.grad.flags.c_contiguous, name
    wte = model.token_embedding.weight
    wte.grad = None
    wte.accumulate_grad(np.asfortranarray(np.ones(wte.shape, dtype=np.float32)))
    assert wte.grad.flags.c_contiguous


def test_no_grad_keeps_no_cache():
    model = ml.GPT(TINY)
    with ml.no_grad():
        logits = model.forward(np.array([[1, 2]]))
    with pytest.raises(RuntimeError, match="no_grad"):
        model.backward(np.ones_like(logits))


def test_dropout_only_in_training():
    cfg = ml.GPTConfig(vocab_size=11, block_size=6, n_layer=1, n_head=1, n_embd=8, dropout=0.5)
    model = ml.GPT(cfg, dtype="float64")
    idx = np.array([[1, 2, 3]])
    model.eval()
    assert np.array_equal(model.forward(idx), model.forward(idx))
    model.train()
    assert not np.array_equal(model.forward(idx), model.forward(idx))


def test_kv_cache_logits_equal_full_forward(device):
    model = perturbed_model(device=device).eval()
    idx = np.random.default_rng(0).integers(0, 11, size=(3, 6))
    full = backend.to_numpy(model.forward(idx))
    cache = ml.KVCache(TINY, 3, backend.get_array_module(model.token_embedding.weight.data), np.float64)
    pieces = [model.forward(idx[:, :2], cache)] + [model.forward(idx[:, t:t + 1], cache) for t in range(2, 6)]
    cached = np.concatenate([backend.to_numpy(p) for p in pieces], axis=1)
    assert relative_error(cached, full) < 1e-12
    with pytest.raises(ValueError, match="block_size"):
        model.forward(idx[:, :1], cache)  # the cache is full


def test_generate_greedy_with_and_without_cache(device):
    cfg = ml.GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    model = perturbed_model(cfg, device=device)
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    with_cache = model.generate(prompt, 12, temperature=0)          # runs past block_size: window slides
    without = model.generate(prompt, 12, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 15) and np.array_equal(with_cache, without)
    assert np.array_equal(with_cache[:, :3], prompt)


def test_generate_sampling_is_seeded_and_respects_top_k():
    model = perturbed_model()
    prompt = np.array([[1, 2]])
    a = model.generate(prompt, 5, temperature=1.0, top_k=3, seed=7)
    b = model.generate(prompt, 5, temperature=1.0, top_k=3, seed=7)
    assert np.array_equal(a, b)
    # top_k=1 and a tiny top_p are both greedy
    greedy = model.generate(prompt, 5, temperature=0)
    assert np.array_equal(model.generate(prompt, 5, top_k=1, seed=1), greedy)
    assert np.array_equal(model.generate(prompt, 5, top_p=1e-9, seed=1), greedy)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 1, top_p=0.0)


def test_to_device_round_trip(device):
    model = ml.GPT(TINY)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    model.to(device).to("cpu")
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="unknown device"):
        model.to("tpu")


def test_small_model_overfits_a_tiny_text():
    """The pieces work together: 300 AdamW steps memorise a 60-character text."""
    from minilora.optim import AdamW, clip_grad_norm
    text = "the quick brown fox jumps over the lazy dog. pack my box now."
    chars = sorted(set(text))
    data = np.array([chars.index(c) for c in text])
    cfg = ml.GPTConfig(vocab_size=len(chars), block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = ml.GPT(cfg, seed=0)
    opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    starts = np.arange(len(data) - cfg.block_size)
    x = np.stack([data[s:s + 16] for s in starts])
    y = np.stack([data[s + 1:s + 17] for s in starts])
    first = None
    for step in range(300):
        loss, dlogits = ml.cross_entropy(model.forward(x), y)
        first = loss if first is None else first
        model.zero_grad()
        model.backward(dlogits)
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
    assert first > 2.5 and loss < 0.1, (first, loss)  # measured: 3.37 -> 0.052


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-10), ("float32", 2e-4)])
def test_numpy_and_cupy_agree(dtype, tol):
    """The same seed gives the same model on both backends; forward and backward agree."""
    cpu = perturbed_model(dtype=dtype)
    gpu = perturbed_model(dtype=dtype, device="cuda")
    idx = np.random.default_rng(0).integers(0, 11, size=(2, 6))
    targets = np.random.default_rng(1).integers(0, 11, size=(2, 6))
    results = []
    for model in (cpu, gpu):
        logits = model.forward(idx)
        loss, dlogits = ml.cross_entropy(logits, targets)
        model.zero_grad()
        model.backward(dlogits)
        results.append((backend.to_numpy(logits), {n: backend.to_numpy(p.grad) for n, p in model.named_parameters()}))
    assert relative_error(results[0][0], results[1][0]) < tol
    for name in results[0][1]:
        if not name.endswith("k_proj.bias"):
            assert relative_error(results[0][1][name], results[1][1][name]) < tol, name


def test_backward_checks_the_shape_of_dlogits_and_keeps_the_cache():
    model = ml.GPT(TINY)
    idx = np.array([[1, 2, 3]])
    logits = model.forward(idx)
    with pytest.raises(ValueError, match=r"dlogits has shape \(1, 3, 5\).*logits have shape \(1, 3, 11\)"):
        model.backward(np.ones((1, 3, 5), dtype=logits.dtype))
    model.backward(np.ones_like(logits))              # the refused call left the cache in place
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_backward_casts_dlogits_to_the_model_dtype():
    """A float32 model given float64 dlogits (or the reverse) computes what it would with
    dlogits in its own dtype, as PyTorch's autograd casts a gradient to its tensor's."""
    rng = np.random.default_rng(0)
    idx = np.array([[1, 2, 3], [4, 5, 6]])
    for model_dtype, other in ((np.float32, np.float64), (np.float64, np.float32)):
        model = ml.GPT(TINY, dtype=model_dtype)
        dlogits = rng.standard_normal((2, 3, TINY.vocab_size)).astype(model_dtype)
        model.forward(idx)
        model.backward(dlogits)
        expected = {n: p.grad.copy() for n, p in model.named_parameters()}
        model.zero_grad()
        model.forward(idx)
        model.backward(dlogits.astype(other))
        for n, p in model.named_parameters():
            assert p.grad.dtype == model_dtype
            np.testing.assert_allclose(p.grad, expected[n], rtol=1e-5, atol=1e-6, err_msg=n)
