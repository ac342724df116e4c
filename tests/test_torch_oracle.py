"""minilora's GPT against an independent PyTorch autograd implementation (tests/torch_reference.py).

Everything runs in float64 on the CPU. The model's weights are perturbed with noise of
standard deviation 0.3 before each check: at GPT-2's initialisation (std 0.02, zero
biases, unit LayerNorm gains) many terms are tiny or exactly zero and a wrong gradient
could hide among them.

Agreement is measured as  max|a - b| / max(max|a|, max|b|)  over every element, and must
be below 1e-8 (float64 rounding through a few layers gives ~1e-14; a real bug gives ~1).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is the optional test oracle; install torch==2.13.0 (CPU) to run these")
import torch.nn.functional as F  # noqa: E402

import minilora as ml  # noqa: E402
from minilora.gradcheck import relative_error  # noqa: E402

try:  # tests/ may or may not be a package
    from . import torch_reference as ref  # noqa: E402
except ImportError:
    import torch_reference as ref  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 1e-8

# (vocab_size, block_size, n_layer, n_head, n_embd), batch B, sequence length T
CONFIGS = {
    "V13-L2-H2-C8-B3-T7": (ml.GPTConfig(13, 8, 2, 2, 8), 3, 7),
    "V11-L1-H1-C4-B1-T1": (ml.GPTConfig(11, 4, 1, 1, 4), 1, 1),
    "V17-L3-H4-C16-B2-T6=block": (ml.GPTConfig(17, 6, 3, 4, 16), 2, 6),
}


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def rel_err(a, b) -> float:
    """max|a - b| / max(max|a|, max|b|): the package's own measure, on host arrays."""
    return relative_error(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))


def make_model(cfg, seed=0, noise=0.3):
    """A float64 minilora GPT whose every parameter is moved off its initial value."""
    model = ml.GPT(cfg, seed=seed, dtype="float64")
    rng = np.random.default_rng(1000 + seed)
    for _, p in model.named_parameters():
        p.data = p.data + noise * rng.standard_normal(p.data.shape)
    return model


def ref_kwargs(cfg):
    return dict(n_layer=cfg.n_layer, n_head=cfg.n_head, eps=cfg.layer_norm_eps)


def torch_params(model):
    return ref.to_torch_params((name, p.data) for name, p in model.named_parameters())


def random_batch(cfg, B, T, seed, ignore_fraction=0.0):
    """Token ids (B, T) and targets (B, T); a fraction of targets set to -100 (at least
    one target always counts, or the mean would be empty)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, size=(B, T))
    targets = rng.integers(0, cfg.vocab_size, size=(B, T))
    if ignore_fraction:
        ignored = rng.random((B, T)) < ignore_fraction
        ignored.flat[rng.integers(B * T)] = False
        targets = np.where(ignored, -100, targets)
    return idx, targets


def minilora_loss_and_grads(model, idx, targets):
    logits = model.forward(idx)
    loss, dlogits = ml.cross_entropy(logits, targets, ignore_index=-100)
    model.zero_grad()
    model.backward(dlogits)
    return loss, logits, {name: p.grad for name, p in model.named_parameters()}


def torch_loss_and_grads(params, cfg, idx, targets):
    loss, logits = ref.gpt_loss(params, idx, targets, ignore_index=-100, **ref_kwargs(cfg))
    loss.backward()
    return loss.item(), logits.detach().numpy(), ref.grads_in_minilora_layout(params)


def assert_grads_match(ours, theirs):
    """Every gradient equal, name by name.

    The key projection's bias is compared by absolute size instead: its gradient is zero
    in exact arithmetic. It adds the same vector b_k to every key, so it shifts each
    query's scores q . (k_j + b_k) by q . b_k, the same amount for every key j, and a
    softmax row is unchanged by a constant shift. Both sides therefore hold only rounding
    noise (~1e-16), whose relative error would be meaningless.
    """
    assert set(ours) == set(theirs), f"parameters differ: {sorted(set(ours) ^ set(theirs))}"
    for name in sorted(ours):
        if name.endswith("attn.k_proj.bias"):
            assert np.abs(ours[name]).max() < 1e-12, f"{name}: minilora's gradient is not ~0"
            assert np.abs(theirs[name]).max() < 1e-12, f"{name}: torch's gradient is not ~0"
            continue
        err = rel_err(ours[name], theirs[name])
        assert err < TOL, f"gradient of {name}: relative error {err:.3g}"


# --------------------------------------------------------------------------------------
# the oracle itself: its hand-written pieces equal PyTorch's built-in ones
# --------------------------------------------------------------------------------------

def test_reference_building_blocks_match_torch_builtins():
    """If the oracle were wrong, everything below would test nothing. Its layer norm,
    GELU and attention are written from the formulas; check them against torch's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64) * 3
    w, b = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ref.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (8,), w, b, 1e-5),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(ref.gelu_tanh(x), F.gelu(x, approximate="tanh"), rtol=0, atol=1e-12)

    names = ["q_proj", "k_proj", "v_proj", "o_proj"]
    p = {f"a.{n}.{kind}": torch.randn(*((8, 8) if kind == "weight" else (8,)), generator=g,
                                      dtype=torch.float64)
         for n in names for kind in ("weight", "bias")}
    q, k, v = (F.linear(x, p[f"a.{n}.weight"], p[f"a.{n}.bias"]).view(2, 5, 2, 4).transpose(1, 2)
               for n in names[:3])
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 5, 8)
    expected = F.linear(y, p["a.o_proj.weight"], p["a.o_proj.bias"])
    torch.testing.assert_close(ref.causal_self_attention(x, p, "a", n_head=2), expected,
                               rtol=0, atol=1e-12)


def test_weight_layout_conversion_round_trips():
    cfg = CONFIGS["V13-L2-H2-C8-B3-T7"][0]
    model = make_model(cfg)
    params = torch_params(model)
    for name, p in model.named_parameters():
        t = params[name].detach()
        if ref.is_linear_weight(name):
            assert tuple(t.shape) == tuple(p.data.shape[::-1]), name  # (out, in)
            t = t.T
        np.testing.assert_array_equal(t.numpy(), p.data, err_msg=name)
    linear = [n for n in params if ref.is_linear_weight(n)]
    assert len(linear) == 6 * cfg.n_layer  # q, k, v, o, up, down in every block


# --------------------------------------------------------------------------------------
# 1. logits
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_torch(name):
    cfg, B, T = CONFIGS[name]
    model = make_model(cfg)
    idx, _ = random_batch(cfg, B, T, seed=1)
    ours = model.forward(idx)
    with torch.no_grad():
        theirs = ref.gpt_forward(torch_params(model), idx, **ref_kwargs(cfg)).numpy()
    assert ours.shape == (B, T, cfg.vocab_size)
    assert np.abs(theirs).max() > 1.0  # the perturbed model gives logits of real size
    err = rel_err(ours, theirs)
    assert err < TOL, f"logits: relative error {err:.3g}"


# --------------------------------------------------------------------------------------
# 2. loss and every parameter gradient
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("ignore_fraction", [0.0, 0.4], ids=["all-targets", "some-ignored"])
@pytest.mark.parametrize("name", CONFIGS)
def test_loss_and_every_gradient_match_torch(name, ignore_fraction):
    cfg, B, T = CONFIGS[name]
    model = make_model(cfg, seed=2)
    idx, targets = random_batch(cfg, B, T, seed=3, ignore_fraction=ignore_fraction)
    if ignore_fraction and B * T > 1:
        assert (targets == -100).any() and (targets != -100).any()

    loss, logits, grads = minilora_loss_and_grads(model, idx, targets)
    t_loss, t_logits, t_grads = torch_loss_and_grads(torch_params(model), cfg, idx, targets)

    assert rel_err(logits, t_logits) < TOL
    assert abs(loss - t_loss) / abs(t_loss) < TOL, f"loss {loss!r} vs torch {t_loss!r}"
    assert all(g is not None for g in grads.values()), "a trainable parameter got no gradient"
    assert_grads_match(grads, t_grads)


def test_gradients_accumulate_over_two_backwards():
    """Without zero_grad, a second backward adds: the result is the gradient of the sum
    of both losses (here two different batches)."""
    cfg, B, T = CONFIGS["V13-L2-H2-C8-B3-T7"]
    model = make_model(cfg, seed=4)
    batches = [random_batch(cfg, B, T, seed=s) for s in (5, 6)]
    model.zero_grad()
    for idx, targets in batches:
        _, dlogits = ml.cross_entropy(model.forward(idx), targets)
        model.backward(dlogits)
    ours = {name: p.grad for name, p in model.named_parameters()}

    params = torch_params(model)
    total = sum(ref.gpt_loss(params, idx, targets, **ref_kwargs(cfg))[0] for idx, targets in batches)
    total.backward()
    assert_grads_match(ours, ref.grads_in_minilora_layout(params))


# --------------------------------------------------------------------------------------
# 3. the gradient w.r.t. the logits
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("ignore_fraction", [0.0, 0.5], ids=["all-targets", "some-ignored"])
def test_cross_entropy_loss_and_dlogits_match_torch(ignore_fraction):
    rng = np.random.default_rng(7)
    B, T, V = 3, 5, 11
    logits = 4.0 * rng.standard_normal((B, T, V))
    cfg = ml.GPTConfig(V, T, 1, 1, 4)
    _, targets = random_batch(cfg, B, T, seed=8, ignore_fraction=ignore_fraction)

    loss, dlogits = ml.cross_entropy(logits, targets, ignore_index=-100)

    t_logits = torch.tensor(logits, requires_grad=True)
    t_loss = F.cross_entropy(t_logits.reshape(-1, V), torch.tensor(targets).reshape(-1), ignore_index=-100)
    t_loss.backward()
    assert abs(loss - t_loss.item()) / abs(t_loss.item()) < TOL
    assert dlogits.shape == (B, T, V)
    err = rel_err(dlogits, t_logits.grad.numpy())
    assert err < TOL, f"dlogits: relative error {err:.3g}"
    ignored = targets == -100
    assert np.all(dlogits[ignored] == 0.0)  # ignored positions pass back exactly nothing


def test_dlogits_from_the_model_match_torch():
    """The same check on logits that come out of the model (an end-to-end dloss/dlogits)."""
    cfg, B, T = CONFIGS["V13-L2-H2-C8-B3-T7"]
    model = make_model(cfg, seed=9)
    idx, targets = random_batch(cfg, B, T, seed=10, ignore_fraction=0.3)
    _, dlogits = ml.cross_entropy(model.forward(idx), targets)

    loss, logits = ref.gpt_loss(torch_params(model), idx, targets, **ref_kwargs(cfg))
    logits.retain_grad()
    loss.backward()
    err = rel_err(dlogits, logits.grad.numpy())
    assert err < TOL, f"dlogits: relative error {err:.3g}"


# --------------------------------------------------------------------------------------
# 4. the KV cache
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunks", [[3, 1, 2, 1, 1], [1] * 8, [8], [5, 3]],
                         ids=["3-1-2-1-1", "one-by-one", "all-at-once", "5-3"])
def test_kv_cache_logits_match_torch_full_forward(chunks):
    cfg, B, _ = CONFIGS["V13-L2-H2-C8-B3-T7"]
    T = sum(chunks)
    assert T == cfg.block_size  # fill the cache to capacity
    model = make_model(cfg, seed=11).eval()
    idx, _ = random_batch(cfg, B, T, seed=12)
    with torch.no_grad():
        expected = ref.gpt_forward(torch_params(model), idx, **ref_kwargs(cfg)).numpy()  # (B, T, V)

    cache = ml.KVCache(cfg, B, np, np.float64)
    start = 0
    with ml.no_grad():
        for n in chunks:
            assert cache.length == start
            logits = model.forward(idx[:, start:start + n], cache)  # (B, n, V)
            err = rel_err(logits, expected[:, start:start + n])
            assert err < TOL, f"positions {start}..{start + n - 1}: relative error {err:.3g}"
            start += n
    assert cache.length == T


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_matches_torch(use_cache):
    cfg, B, _ = CONFIGS["V13-L2-H2-C8-B3-T7"]
    model = make_model(cfg, seed=13)
    prompt, _ = random_batch(cfg, B, 3, seed=14)
    new = cfg.block_size - 3  # stays inside the position table, so the cache is used throughout
    ours = model.generate(prompt, new, temperature=0, use_cache=use_cache)
    theirs = ref.greedy_generate(torch_params(model), prompt, new, **ref_kwargs(cfg))
    np.testing.assert_array_equal(ours, theirs)
    assert model.training  # generate restores the mode it found


# --------------------------------------------------------------------------------------
# 5. frozen parameters
# --------------------------------------------------------------------------------------

FREEZE = {
    "block0-linear-weights": lambda n: n.startswith("blocks.0.") and ref.is_linear_weight(n),
    "tied-embedding-and-biases": lambda n: n == "token_embedding.weight" or n.endswith(".bias"),
    "all-but-ln_f": lambda n: not n.startswith("ln_f."),
}


@pytest.mark.parametrize("which", FREEZE)
def test_frozen_parameters_get_no_gradient_and_others_match_torch(which):
    cfg, B, T = CONFIGS["V13-L2-H2-C8-B3-T7"]
    model = make_model(cfg, seed=15)
    frozen = {name for name, _ in model.named_parameters() if FREEZE[which](name)}
    assert frozen and len(frozen) < len(list(model.named_parameters()))
    for name, p in model.named_parameters():
        p.requires_grad = name not in frozen
    params = torch_params(model)
    for name in frozen:
        params[name].requires_grad_(False)
    idx, targets = random_batch(cfg, B, T, seed=16, ignore_fraction=0.2)

    loss, _, grads = minilora_loss_and_grads(model, idx, targets)
    t_loss, _, t_grads = torch_loss_and_grads(params, cfg, idx, targets)

    for name in frozen:
        assert grads[name] is None, f"frozen {name} received a gradient"
    assert abs(loss - t_loss) / abs(t_loss) < TOL
    assert_grads_match({n: g for n, g in grads.items() if n not in frozen}, t_grads)
