"""minilora's LoRA against an independent PyTorch autograd implementation.

Two levels, both in float64 on the CPU:

1. ``LoRALinear`` alone: y, dx, dA, dB (and dW, db where the base layer trains) against
   autograd on the formula  y = x W + b + sum_k s_k (x A_k^T) B_k^T.
2. A LoRA-adapted GPT: the loss and the gradient of every trainable parameter (A, B and
   the biases ``LoraConfig.bias`` trains) against tests/torch_reference.py with its
   ``lora`` paths; frozen parameters must get no gradient at all.

Every factor is random and non-zero: at initialisation B = 0, which makes grad(A) exactly
zero on both sides and would hide a wrong dA. LoRA dropout is random in training mode, so
the model-level check runs in eval mode, where it must be the identity.

Agreement is  max|a - b| / max(max|a|, max|b|)  below 1e-8, as in test_torch_oracle.py.
"""
import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is the optional test oracle; install torch==2.13.0 (CPU) to run these")
import torch.nn.functional as F  # noqa: E402

import minilora as ml  # noqa: E402
from minilora.gradcheck import relative_error  # noqa: E402
from minilora.lora import LoRALinear, lora_layers  # noqa: E402
from minilora.nn import Linear  # noqa: E402

try:  # tests/ may or may not be a package
    from . import torch_reference as ref  # noqa: E402
except ImportError:
    import torch_reference as ref  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 1e-8


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def rel_err(a, b) -> float:
    """max|a - b| / max(max|a|, max|b|): the package's own measure, on host arrays."""
    return relative_error(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))


def assert_close(ours, theirs, what):
    err = rel_err(ours, theirs)
    assert err < TOL, f"{what}: relative error {err:.3g}"


def expected_scaling(cfg: ml.LoraConfig) -> float:
    """Written from the papers, not read from minilora: alpha / r, rsLoRA alpha / sqrt(r)."""
    return cfg.alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)


def t64(a, requires_grad=False):
    return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=requires_grad)


# --------------------------------------------------------------------------------------
# 0. the oracle's LoRA path is the paper's merged-weight formula
# --------------------------------------------------------------------------------------

def test_reference_lora_linear_equals_merged_weight():
    """ref.lora_linear computes the update as (x A^T) B^T; it must equal a plain linear
    layer with the merged weight W + s * B A (PyTorch's (out, in) layout)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    W, b = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    A1, B1 = torch.randn(2, 6, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    A2, B2 = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    got = ref.lora_linear(x, W, b, [(A1, B1, 0.7), (A2, B2, -1.3)])
    expected = F.linear(x, W + 0.7 * B1 @ A1 - 1.3 * B2 @ A2, b)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ref.lora_linear(x, W, b), F.linear(x, W, b), rtol=0, atol=0)


def test_reference_rejects_unknown_lora_layer_names():
    cfg = ml.GPTConfig(11, 4, 1, 1, 4)
    params = ref.to_torch_params((n, p.data) for n, p in ml.GPT(cfg, dtype="float64").named_parameters())
    A, B = torch.zeros(1, 4, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="q_porj"):
        ref.gpt_forward(params, np.zeros((1, 1), dtype=np.int64), n_layer=1, n_head=1,
                        lora={"blocks.0.attn.q_porj": (A, B, 1.0)})


# --------------------------------------------------------------------------------------
# 1. LoRALinear alone
# --------------------------------------------------------------------------------------

def make_lora_linear(I, O, adapters, *, bias=True, train_base=False, seed=0):
    """A float64 LoRALinear with random non-zero W, b and, per adapter, A and B.

    ``adapters``: {name: LoraConfig}; all of them active. Returns (layer, {name: (A, B)}).
    """
    rng = np.random.default_rng(seed)
    lin = Linear(I, O, bias=bias, rng=np.random.default_rng(seed + 1), dtype="float64")
    lin.weight.data = rng.standard_normal((I, O))
    if bias:
        lin.bias.data = rng.standard_normal(O)
    layer = LoRALinear(lin)
    factors = {}
    for k, (name, cfg) in enumerate(adapters.items()):
        layer.add_adapter(name, cfg, np.random.default_rng(seed + 10 + k), dropout_seed=k)
        A, B = rng.standard_normal((cfg.r, I)), rng.standard_normal((O, cfg.r))
        getattr(layer.lora_A, name).data = A.copy()
        getattr(layer.lora_B, name).data = B.copy()
        factors[name] = (A, B)
    layer.active_adapters = list(adapters)
    layer.weight.requires_grad = train_base
    if bias:
        layer.bias.requires_grad = train_base
    return layer, factors


def torch_lora_linear(layer, factors, configs, x, dy, masks=None):
    """Autograd on y = x W + b + sum_k s_k (mask_k * x) A_k^T B_k^T.
    Returns y, and the gradients of sum(y * dy) in minilora's layout."""
    xt = t64(x, True)
    Wt = t64(layer.weight.data.T, True)                 # (O, I), PyTorch's layout
    bt = t64(layer.bias.data, True) if layer.bias is not None else None
    ab = {n: (t64(A, True), t64(B, True)) for n, (A, B) in factors.items()}
    y = F.linear(xt, Wt, bt)
    for n, (At, Bt) in ab.items():
        xin = xt if masks is None else xt * t64(masks[n])
        y = y + ref.lora_linear(xin, torch.zeros_like(Wt), None, [(At, Bt, expected_scaling(configs[n]))])
    (y * t64(dy)).sum().backward()
    grads = {"x": xt.grad.numpy(), "weight": Wt.grad.T.numpy()}
    if bt is not None:
        grads["bias"] = bt.grad.numpy()
    for n, (At, Bt) in ab.items():
        grads[f"lora_A.{n}"], grads[f"lora_B.{n}"] = At.grad.numpy(), Bt.grad.numpy()
    return y.detach().numpy(), grads


# (B, T, I, O, r)
SHAPES = {
    "B2-T5-I6-O4-r3": (2, 5, 6, 4, 3),
    "B1-T1-I3-O5-r1": (1, 1, 3, 5, 1),
    "B3-T1-I4-O4-r4": (3, 1, 4, 4, 4),
    "B1-T4-I7-O2-r1": (1, 4, 7, 2, 1),
}


@pytest.mark.parametrize("base", ["frozen-base", "trainable-base", "no-bias"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize("shape", SHAPES)
def test_lora_linear_matches_torch(shape, use_rslora, base):
    Bsz, T, I, O, r = SHAPES[shape]
    cfg = ml.LoraConfig(r=r, alpha=2.5, use_rslora=use_rslora)
    layer, factors = make_lora_linear(I, O, {"default": cfg}, bias=base != "no-bias",
                                      train_base=base == "trainable-base")
    assert layer.lora_configs["default"].scaling == pytest.approx(expected_scaling(cfg), rel=1e-15)
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((Bsz, T, I)), rng.standard_normal((Bsz, T, O))

    y = layer.forward(x)
    dx = layer.backward(dy)
    t_y, t = torch_lora_linear(layer, factors, {"default": cfg}, x, dy)

    assert y.shape == (Bsz, T, O) and dx.shape == (Bsz, T, I)
    assert_close(y, t_y, "y")
    assert_close(dx, t["x"], "dx")
    assert_close(layer.lora_A.default.grad, t["lora_A.default"], "dA")
    assert_close(layer.lora_B.default.grad, t["lora_B.default"], "dB")
    if base == "trainable-base":
        assert_close(layer.weight.grad, t["weight"], "dW")
        assert_close(layer.bias.grad, t["bias"], "db")
    else:
        assert layer.weight.grad is None, "a frozen W received a gradient"
        if layer.bias is not None:
            assert layer.bias.grad is None, "a frozen bias received a gradient"


@pytest.mark.parametrize("train_base", [False, True], ids=["frozen-base", "trainable-base"])
def test_lora_linear_two_active_adapters_match_torch(train_base):
    """Two adapters of different rank and scaling run together: their updates add, and
    each gets its own dA, dB."""
    configs = {"a": ml.LoraConfig(r=2, alpha=3.0), "b": ml.LoraConfig(r=3, alpha=0.5, use_rslora=True)}
    layer, factors = make_lora_linear(5, 6, configs, train_base=train_base, seed=3)
    assert layer.active_adapters == ["a", "b"]
    rng = np.random.default_rng(4)
    x, dy = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 6))

    y = layer.forward(x)
    dx = layer.backward(dy)
    t_y, t = torch_lora_linear(layer, factors, configs, x, dy)

    assert_close(y, t_y, "y")
    assert_close(dx, t["x"], "dx")
    for n in configs:
        assert_close(getattr(layer.lora_A, n).grad, t[f"lora_A.{n}"], f"dA of {n}")
        assert_close(getattr(layer.lora_B, n).grad, t[f"lora_B.{n}"], f"dB of {n}")
    if train_base:
        assert_close(layer.weight.grad, t["weight"], "dW")
        assert_close(layer.bias.grad, t["bias"], "db")
    else:
        assert layer.weight.grad is None and layer.bias.grad is None

    # only one of the two active: the other adapter neither runs nor trains
    layer.zero_grad()
    layer.active_adapters = ["b"]
    y_b = layer.forward(x)
    layer.backward(dy)
    t_y_b, t_b = torch_lora_linear(layer, {"b": factors["b"]}, configs, x, dy)
    assert_close(y_b, t_y_b, "y with adapter b alone")
    assert_close(layer.lora_A.b.grad, t_b["lora_A.b"], "dA of b alone")
    assert layer.lora_A.a.grad is None and layer.lora_B.a.grad is None


def test_lora_linear_training_dropout_matches_torch_with_the_same_mask():
    """In training mode the mask is random; replay the layer's generator to learn it, then
    check that it applies to the low-rank path's input only (y's base part and dx's base
    part see the undropped x) and that dA, dB and dx pass through the same mask."""
    p = 0.4
    cfg = ml.LoraConfig(r=2, alpha=3.0, dropout=p)
    layer, factors = make_lora_linear(6, 5, {"default": cfg}, seed=5)
    assert layer.training
    rng = np.random.default_rng(6)
    x, dy = rng.standard_normal((3, 4, 6)), rng.standard_normal((3, 4, 5))

    replay = copy.deepcopy(layer.lora_dropout.default.rng)
    keep = replay.random(x.shape, dtype=x.dtype) >= p   # as documented in ops/dropout.py
    assert keep.any() and not keep.all()
    mask = keep / (1.0 - p)

    y = layer.forward(x)
    dx = layer.backward(dy)
    t_y, t = torch_lora_linear(layer, factors, {"default": cfg}, x, dy, masks={"default": mask})
    assert_close(y, t_y, "y (training dropout)")
    assert_close(dx, t["x"], "dx (training dropout)")
    assert_close(layer.lora_A.default.grad, t["lora_A.default"], "dA (training dropout)")
    assert_close(layer.lora_B.default.grad, t["lora_B.default"], "dB (training dropout)")
    t_y_nodrop, _ = torch_lora_linear(layer, factors, {"default": cfg}, x, dy)
    assert rel_err(y, t_y_nodrop) > 1e-3  # the mask really did something


# --------------------------------------------------------------------------------------
# 2. a LoRA-adapted GPT
# --------------------------------------------------------------------------------------

# (GPTConfig, batch B, length T, LoraConfig keyword arguments)
MODELS = {
    "V13-L2-H2-C8-B3-T7-r4": (ml.GPTConfig(13, 8, 2, 2, 8), 3, 7, dict(r=4, alpha=8.0)),
    "V11-L1-H1-C4-B1-T1-r1-rslora": (ml.GPTConfig(11, 4, 1, 1, 4), 1, 1, dict(r=1, alpha=2.0, use_rslora=True)),
    "V17-L2-H4-C16-B2-T5-r2": (ml.GPTConfig(17, 6, 2, 4, 16), 2, 5, dict(r=2, alpha=3.0)),
}
TARGETS = {"q,v": ("q_proj", "v_proj"), "all-linear": "all-linear"}
TARGET_LINEARS = {"q,v": ("attn.q_proj", "attn.v_proj"), "all-linear": ref.LINEAR_NAMES}


def make_lora_gpt(cfg, lora_cfg, seed=0, noise=0.3):
    """A float64 GPT with adapter "default", then every parameter -- A and B included --
    moved off its initial value (B = 0 would make grad(A) vanish)."""
    model = ml.GPT(cfg, seed=seed, dtype="float64")
    ml.add_lora(model, lora_cfg, seed=seed)
    rng = np.random.default_rng(2000 + seed)
    for _, p in model.named_parameters():
        p.data = p.data + noise * rng.standard_normal(p.data.shape)
    return model


def expected_trainable(model, adapted, bias_mode):
    """The trainable set LoraConfig promises, derived from names alone."""
    names = [n for n, _ in model.named_parameters()]
    trainable = {f"{layer}.lora_{ab}.default" for layer in adapted for ab in "AB"}
    if bias_mode == "all":
        trainable |= {n for n in names if n.endswith(".bias")}
    elif bias_mode == "lora_only":
        trainable |= {f"{layer}.bias" for layer in adapted}
    return trainable


def random_batch(cfg, B, T, seed, ignore_fraction=0.3):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, size=(B, T))
    targets = rng.integers(0, cfg.vocab_size, size=(B, T))
    ignored = rng.random((B, T)) < ignore_fraction
    ignored.flat[rng.integers(B * T)] = False  # at least one target counts
    return idx, np.where(ignored, -100, targets)


def check_lora_gpt_against_torch(model, cfg, lora_cfg, adapted, idx, targets):
    """Loss, logits and every trainable gradient equal torch's; frozen ones stay None."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    logits = model.forward(idx)
    loss, dlogits = ml.cross_entropy(logits, targets, ignore_index=-100)
    model.zero_grad()
    model.backward(dlogits)
    grads = {n: p.grad for n, p in model.named_parameters()}

    params = ref.to_torch_params((n, p.data) for n, p in model.named_parameters())
    for n, t in params.items():
        t.requires_grad_(n in trainable)
    lora = ref.lora_paths(params, {layer: expected_scaling(lora_cfg) for layer in adapted})
    kw = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, eps=cfg.layer_norm_eps)
    t_loss, t_logits = ref.gpt_loss(params, idx, targets, ignore_index=-100, lora=lora, **kw)
    t_loss.backward()
    t_grads = ref.grads_in_minilora_layout(params)

    # the adapters matter: without them torch's logits are clearly different
    with torch.no_grad():
        base_logits = ref.gpt_forward(params, idx, **kw).numpy()
    assert rel_err(base_logits, t_logits.detach().numpy()) > 1e-3

    assert_close(logits, t_logits.detach().numpy(), "logits")
    assert abs(loss - t_loss.item()) / abs(t_loss.item()) < TOL, f"loss {loss!r} vs torch {t_loss.item()!r}"
    for name, g in grads.items():
        if name not in trainable:
            assert g is None, f"frozen {name} received a gradient"
    assert set(t_grads) == trainable
    for name in sorted(trainable):
        assert grads[name] is not None, f"trainable {name} got no gradient"
        if name.endswith("attn.k_proj.bias"):
            # zero in exact arithmetic (a constant shift of every score in a softmax row,
            # see test_torch_oracle.assert_grads_match): both sides hold rounding noise only
            assert np.abs(grads[name]).max() < 1e-12 and np.abs(t_grads[name]).max() < 1e-12, name
            continue
        assert_close(grads[name], t_grads[name], f"gradient of {name}")


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("name", MODELS)
def test_lora_gpt_loss_and_trainable_gradients_match_torch(name, targets, bias):
    cfg, B, T, lora_kw = MODELS[name]
    lora_cfg = ml.LoraConfig(target_modules=TARGETS[targets], bias=bias, **lora_kw)
    model = make_lora_gpt(cfg, lora_cfg, seed=1)

    adapted = [f"blocks.{i}.{lin}" for i in range(cfg.n_layer) for lin in TARGET_LINEARS[targets]]
    assert sorted(n for n, _ in lora_layers(model)) == sorted(adapted)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(model, adapted, bias)

    idx, tgt = random_batch(cfg, B, T, seed=2)
    check_lora_gpt_against_torch(model, cfg, lora_cfg, adapted, idx, tgt)


# --------------------------------------------------------------------------------------
# 3. LoRA dropout: the identity in eval mode
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets", TARGETS)
def test_lora_dropout_is_identity_in_eval_mode_and_gradients_match_torch(targets):
    cfg, B, T, lora_kw = MODELS["V13-L2-H2-C8-B3-T7-r4"]
    lora_cfg = ml.LoraConfig(target_modules=TARGETS[targets], dropout=0.5, bias="lora_only", **lora_kw)
    model = make_lora_gpt(cfg, lora_cfg, seed=3)
    adapted = [f"blocks.{i}.{lin}" for i in range(cfg.n_layer) for lin in TARGET_LINEARS[targets]]
    idx, tgt = random_batch(cfg, B, T, seed=4)

    # in training mode the dropout is real: two forwards differ, and differ from eval
    train_1, train_2 = model.forward(idx), model.forward(idx)
    model.eval()
    eval_1, eval_2 = model.forward(idx), model.forward(idx)
    assert rel_err(train_1, train_2) > 1e-3 and rel_err(train_1, eval_1) > 1e-3
    np.testing.assert_array_equal(eval_1, eval_2)

    # in eval mode: exactly the model without dropout, gradients included
    check_lora_gpt_against_torch(model, cfg, lora_cfg, adapted, idx, tgt)
