"""Tests for minilora.optim: SGD and AdamW against PyTorch, frozen parameters,
gradient clipping, the warm-up + cosine schedule, checkpoint round trips, validation.

Everything runs in float64 on NumPy arrays.
"""
import copy
import math

import numpy as np
import pytest

from minilora.nn import Parameter
from minilora.optim import SGD, AdamW, Optimizer, clip_grad_norm, warmup_cosine_lr

SHAPES = [(4, 3), (3,), (2, 2, 5), (1,)]


def make_params(seed=0, shapes=SHAPES, decay=None):
    """float64 Parameters; ``decay`` is a list of bools (default: all True)."""
    rng = np.random.default_rng(seed)
    params = []
    for k, shape in enumerate(shapes):
        p = Parameter(rng.standard_normal(shape))
        p.decay = True if decay is None else decay[k]
        params.append(p)
    return params


def random_grads(rng, params):
    return [rng.standard_normal(p.data.shape) for p in params]


def assert_close(ours, theirs, rtol=1e-12):
    theirs = np.asarray(theirs)
    scale = max(1.0, float(np.max(np.abs(theirs))))
    np.testing.assert_array_less(np.max(np.abs(np.asarray(ours) - theirs)), rtol * scale + 1e-300)


# --------------------------------------------------------------------------------------
# PyTorch parity
# --------------------------------------------------------------------------------------

def run_against_torch(make_ours, make_theirs, decay, steps=6, grad_none_at=None, lrs=None):
    """Drive our optimizer and torch's with identical gradients; compare every step.

    ``grad_none_at``: {step: param index} gives that parameter no gradient at that step
    (both optimizers must skip it, and its step count must not advance).
    ``lrs``: a learning rate per step (set on both, as a schedule would).
    """
    torch = pytest.importorskip("torch", reason="PyTorch is the optional test oracle")
    params = make_params(seed=1, decay=decay)
    tparams = [torch.tensor(p.data.copy(), dtype=torch.float64, requires_grad=True) for p in params]
    ours = make_ours(params)
    theirs = make_theirs(torch, tparams)
    rng = np.random.default_rng(2)
    grad_none_at = grad_none_at or {}
    for step in range(steps):
        grads = random_grads(rng, params)
        for k, (p, tp, g) in enumerate(zip(params, tparams, grads)):
            if grad_none_at.get(step) == k:
                p.grad, tp.grad = None, None
            else:
                p.grad, tp.grad = g.copy(), torch.from_numpy(g.copy())
        if lrs is not None:
            ours.lr = lrs[step]
            for group in theirs.param_groups:
                group["lr"] = lrs[step]
        ours.step()
        theirs.step()
        for p, tp in zip(params, tparams):
            assert_close(p.data, tp.detach().numpy())
    return params, ours


def torch_groups(tparams, decay, weight_decay):
    return [
        {"params": [tp for tp, d in zip(tparams, decay) if d], "weight_decay": weight_decay},
        {"params": [tp for tp, d in zip(tparams, decay) if not d], "weight_decay": 0.0},
    ]


DECAY = [True, False, True, False]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.9)])
def test_adamw_matches_torch(weight_decay, betas):
    lr, eps = 1e-2, 1e-8
    run_against_torch(
        lambda ps: AdamW(ps, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),
        lambda torch, tps: torch.optim.AdamW(torch_groups(tps, DECAY, weight_decay), lr=lr,
                                             betas=betas, eps=eps),
        DECAY, steps=6)


def test_adamw_matches_torch_with_schedule_and_missing_grads():
    """Changing lr each step and a parameter skipped on some steps (its own step count)."""
    lrs = [warmup_cosine_lr(s, max_lr=3e-2, warmup_steps=2, total_steps=7, min_lr=1e-3)
           for s in range(7)]
    _, opt = run_against_torch(
        lambda ps: AdamW(ps, lr=1.0, weight_decay=0.05),
        lambda torch, tps: torch.optim.AdamW(torch_groups(tps, DECAY, 0.05), lr=1.0),
        DECAY, steps=7, grad_none_at={0: 2, 3: 2, 4: 0}, lrs=lrs)
    assert opt.state[2]["step"] == 5 and opt.state[0]["step"] == 6 and opt.state[1]["step"] == 7


@pytest.mark.parametrize("momentum,nesterov,weight_decay", [
    (0.0, False, 0.0), (0.0, False, 0.1), (0.9, False, 0.0), (0.9, True, 0.0),
    (0.9, True, 0.05), (0.5, False, 0.1)])
def test_sgd_matches_torch(momentum, nesterov, weight_decay):
    lr = 0.05
    run_against_torch(
        lambda ps: SGD(ps, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov),
        lambda torch, tps: torch.optim.SGD(torch_groups(tps, DECAY, weight_decay), lr=lr,
                                           momentum=momentum, nesterov=nesterov),
        DECAY, steps=6, grad_none_at={2: 1})


def test_adamw_first_step_moves_by_lr_against_gradient_sign():
    """At t=1, m_hat = g and v_hat = g^2, so each element moves by lr * g / (|g| + eps)."""
    params = make_params(seed=3)
    before = [p.data.copy() for p in params]
    rng = np.random.default_rng(4)
    for p, g in zip(params, random_grads(rng, params)):
        p.grad = g
    AdamW(params, lr=1e-3, weight_decay=0.0, eps=1e-8).step()
    for p, b in zip(params, before):
        expected = b - 1e-3 * p.grad / (np.abs(p.grad) + 1e-8)
        np.testing.assert_allclose(p.data, expected, rtol=0, atol=1e-15)


def test_adamw_decay_attribute_decides_decay():
    """With a zero gradient, Adam's update is 0: only decoupled decay moves p."""
    params = make_params(seed=5, decay=[True, False, True, False])
    before = [p.data.copy() for p in params]
    for p in params:
        p.grad = np.zeros_like(p.data)
    AdamW(params, lr=0.1, weight_decay=0.5).step()
    for p, b in zip(params, before):
        if p.decay:
            np.testing.assert_array_equal(p.data, b * (1 - 0.1 * 0.5))
        else:
            np.testing.assert_array_equal(p.data, b)


def test_missing_decay_attribute_means_decay():
    p = Parameter(np.ones(3))
    if hasattr(p, "decay"):
        del p.decay  # an instance attribute set by the constructor
    if hasattr(p, "decay"):
        pytest.skip("Parameter.decay is not an instance attribute here")
    p.grad = np.zeros(3)
    AdamW([p], lr=0.1, weight_decay=0.5).step()
    np.testing.assert_array_equal(p.data, np.full(3, 0.95))


# --------------------------------------------------------------------------------------
# Frozen parameters and missing gradients
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_opt", [
    lambda ps: AdamW(ps, lr=0.1, weight_decay=0.5),
    lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.5, nesterov=True),
], ids=["AdamW", "SGD"])
def test_frozen_and_gradless_parameters_are_untouched(make_opt):
    params = make_params(seed=6)
    frozen, gradless, trained = params[0], params[1], params[2:]
    frozen.requires_grad = False
    frozen.grad = np.ones_like(frozen.data)  # a stale gradient must still be ignored
    frozen_grad = frozen.grad.copy()
    before = [p.data.copy() for p in params]
    opt = make_opt(params)
    rng = np.random.default_rng(7)
    for _ in range(4):
        for p in trained:
            p.grad = rng.standard_normal(p.data.shape)
        opt.step()
    assert frozen.data.tobytes() == before[0].tobytes()
    assert frozen.grad.tobytes() == frozen_grad.tobytes()
    assert gradless.data.tobytes() == before[1].tobytes()
    assert gradless.grad is None
    assert 0 not in opt.state and 1 not in opt.state
    for p, b in zip(trained, before[2:]):
        assert not np.array_equal(p.data, b)


def test_step_does_not_modify_grad():
    params = make_params(seed=8)
    rng = np.random.default_rng(9)
    grads = random_grads(rng, params)
    for p, g in zip(params, grads):
        p.grad = g.copy()
    for opt in (SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1), AdamW(params, lr=0.1)):
        opt.step()
        opt.step()
        for p, g in zip(params, grads):
            np.testing.assert_array_equal(p.grad, g)


def test_zero_grad_sets_none():
    params = make_params()
    for p in params:
        p.grad = np.ones_like(p.data)
    AdamW(params).zero_grad()
    assert all(p.grad is None for p in params)


# --------------------------------------------------------------------------------------
# state_bytes
# --------------------------------------------------------------------------------------

def test_state_bytes():
    params = make_params(seed=10)
    params[0].requires_grad = False
    adam = AdamW(params)
    sgd = SGD(params, lr=0.1, momentum=0.9)
    plain = SGD(params, lr=0.1)
    assert adam.state_bytes() == 0
    for p in params[1:]:
        p.grad = np.ones_like(p.data)
    for opt in (adam, sgd, plain):
        opt.step()
    trained_bytes = sum(p.data.nbytes for p in params[1:])
    assert adam.state_bytes() == 2 * trained_bytes
    assert sgd.state_bytes() == trained_bytes
    assert plain.state_bytes() == 0


# --------------------------------------------------------------------------------------
# Gradient clipping
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.25, 0.8, 0.999])
def test_clip_grad_norm_matches_torch(fraction):
    torch = pytest.importorskip("torch", reason="PyTorch is the optional test oracle")
    params = make_params(seed=11)
    params.append(Parameter(np.zeros(2)))  # no grad: ignored
    rng = np.random.default_rng(12)
    grads = random_grads(rng, params[:-1])
    for p, g in zip(params, grads):
        p.grad = g.copy()
    tparams = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
    for tp, g in zip(tparams, grads):
        tp.grad = torch.from_numpy(g.copy())
    expected_norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
    max_norm = fraction * expected_norm
    norm = clip_grad_norm(params, max_norm)
    tnorm = torch.nn.utils.clip_grad_norm_(tparams, max_norm)
    assert isinstance(norm, float)
    assert norm == pytest.approx(float(tnorm), rel=1e-14)
    assert norm == pytest.approx(expected_norm, rel=1e-14)
    for p, tp in zip(params, tparams):
        assert_close(p.grad, tp.grad.numpy())
    clipped = math.sqrt(sum(float(np.sum(p.grad * p.grad)) for p in params[:-1]))
    assert clipped <= max_norm
    assert clipped == pytest.approx(max_norm, rel=1e-5)
    assert params[-1].grad is None


def test_clip_grad_norm_leaves_small_grads_unchanged():
    params = make_params(seed=13)
    rng = np.random.default_rng(14)
    grads = random_grads(rng, params)
    for p, g in zip(params, grads):
        p.grad = g.copy()
    total = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
    norm = clip_grad_norm(params, 2.0 * total)
    assert norm == pytest.approx(total, rel=1e-14)
    for p, g in zip(params, grads):
        assert p.grad.tobytes() == g.tobytes()


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_clip_grad_norm_non_finite_leaves_grads(bad):
    params = make_params(seed=15)
    rng = np.random.default_rng(16)
    for p in params:
        p.grad = rng.standard_normal(p.data.shape)
    params[1].grad[0] = bad
    saved = [p.grad.copy() for p in params]
    norm = clip_grad_norm(params, 1e-3)
    assert not math.isfinite(norm)
    if bad == np.inf:
        assert norm == math.inf
    for p, s in zip(params, saved):
        np.testing.assert_array_equal(p.grad, s)


def test_clip_grad_norm_edge_cases():
    assert clip_grad_norm(make_params(), 1.0) == 0.0  # no gradients at all
    for bad in (0.0, -1.0, math.nan, "1"):
        with pytest.raises(ValueError, match="max_norm"):
            clip_grad_norm(make_params(), bad)


# --------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------

def test_warmup_cosine_lr_values():
    kw = dict(max_lr=1e-3, warmup_steps=10, total_steps=100, min_lr=1e-5)
    assert warmup_cosine_lr(0, **kw) == pytest.approx(1e-4, rel=1e-15)
    assert warmup_cosine_lr(4, **kw) == pytest.approx(5e-4, rel=1e-15)
    assert warmup_cosine_lr(9, **kw) == 1e-3      # last warm-up step
    assert warmup_cosine_lr(10, **kw) == 1e-3     # cosine starts at the top
    mid = warmup_cosine_lr(55, **kw)              # q = 1/2: halfway between
    assert mid == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-14)
    assert warmup_cosine_lr(100, **kw) == 1e-5
    assert warmup_cosine_lr(10_000, **kw) == 1e-5
    warm = [warmup_cosine_lr(s, **kw) for s in range(10)]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    after = [warmup_cosine_lr(s, **kw) for s in range(10, 101)]
    assert all(a > b for a, b in zip(after, after[1:]))
    assert all(1e-5 <= v <= 1e-3 for v in warm + after)


def test_warmup_cosine_lr_no_warmup_and_all_warmup():
    assert warmup_cosine_lr(0, max_lr=1.0, warmup_steps=0, total_steps=4) == 1.0
    assert warmup_cosine_lr(2, max_lr=1.0, warmup_steps=0, total_steps=4) == pytest.approx(0.5)
    assert warmup_cosine_lr(3, max_lr=1.0, warmup_steps=4, total_steps=4) == 1.0
    assert warmup_cosine_lr(4, max_lr=1.0, warmup_steps=4, total_steps=4, min_lr=0.1) == 0.1


@pytest.mark.parametrize("kwargs,match", [
    (dict(step=-1), "step"),
    (dict(step=1.5), "step"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=20), "warmup_steps"),
    (dict(total_steps=0, warmup_steps=0), "total_steps"),
    (dict(max_lr=-1.0), "max_lr"),
    (dict(max_lr=math.inf), "max_lr"),
    (dict(min_lr=-1e-5), "min_lr"),
    (dict(min_lr=1.0), "min_lr"),
])
def test_warmup_cosine_lr_bad_args(kwargs, match):
    args = dict(step=0, max_lr=1e-3, warmup_steps=2, total_steps=10, min_lr=0.0)
    args.update(kwargs)
    step = args.pop("step")
    with pytest.raises(ValueError, match=match):
        warmup_cosine_lr(step, **args)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_opt", [
    lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1, nesterov=True),
], ids=["AdamW", "SGD"])
def test_state_dict_round_trip_is_bit_identical(make_opt):
    params = make_params(seed=17, decay=DECAY)
    params[3].requires_grad = False
    opt = make_opt(params)
    rng = np.random.default_rng(18)
    all_grads = [random_grads(rng, params) for _ in range(5)]

    def step(opt, params, grads):
        for p, g in zip(params, grads):
            p.grad = g.copy() if p.requires_grad else None
        opt.lr = opt.lr * 0.9  # a schedule between steps
        opt.step()

    for grads in all_grads[:3]:
        step(opt, params, grads)
    saved = opt.state_dict()
    # plain python scalars and numpy arrays only
    for i, entry in saved["state"].items():
        assert isinstance(i, int)
        for value in entry.values():
            assert isinstance(value, (int, np.ndarray))
    assert saved["num_params"] == len(params)
    assert 3 not in saved["state"]

    copies = [copy.deepcopy(p) for p in params]
    fresh = make_opt(copies)
    fresh.lr = 123.0  # overwritten by the load
    fresh.load_state_dict(saved)
    assert fresh.hyperparameters() == opt.hyperparameters()
    for grads in all_grads[3:]:
        step(opt, params, grads)
        step(fresh, copies, grads)
    for p, c in zip(params, copies):
        assert p.data.tobytes() == c.data.tobytes()
    # the snapshot does not alias live state: the two steps above moved it on
    resaved = opt.state_dict()
    key = "m" if "m" in resaved["state"][0] else "momentum_buffer"
    assert not np.array_equal(saved["state"][0][key], resaved["state"][0][key])


def test_load_state_dict_validates():
    params = make_params(seed=19)
    for p in params:
        p.grad = np.ones_like(p.data)
    opt = AdamW(params)
    opt.step()
    good = opt.state_dict()

    with pytest.raises(ValueError, match="optimizer"):
        SGD(make_params(), lr=0.1).load_state_dict(good)
    with pytest.raises(ValueError, match="parameters"):
        AdamW(make_params()[:2]).load_state_dict(good)

    bad = copy.deepcopy(good)
    bad["state"][0]["m"] = np.zeros((9, 9))
    fresh = AdamW(make_params())
    with pytest.raises(ValueError, match="shape"):
        fresh.load_state_dict(bad)
    assert fresh.state == {}  # a failed load changes nothing

    bad = copy.deepcopy(good)
    del bad["state"][1]["v"]
    with pytest.raises(ValueError, match="keys"):
        AdamW(make_params()).load_state_dict(bad)

    bad = copy.deepcopy(good)
    bad["state"][len(params)] = bad["state"][0]
    with pytest.raises(ValueError, match="index"):
        AdamW(make_params()).load_state_dict(bad)

    bad = copy.deepcopy(good)
    bad["betas"] = (1.5, 0.999)
    with pytest.raises(ValueError, match="beta1"):
        AdamW(make_params()).load_state_dict(bad)


def test_loaded_state_does_not_alias_the_dict():
    params = make_params(seed=20)
    for p in params:
        p.grad = np.ones_like(p.data)
    opt = AdamW(params)
    opt.step()
    saved = opt.state_dict()
    m0 = saved["state"][0]["m"].copy()
    fresh = AdamW([copy.deepcopy(p) for p in params])
    fresh.load_state_dict(saved)
    fresh.step()
    np.testing.assert_array_equal(saved["state"][0]["m"], m0)


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1e-3), "lr"),
    (dict(lr=math.nan), "lr"),
    (dict(betas=(1.0, 0.999)), "beta1"),
    (dict(betas=(-0.1, 0.999)), "beta1"),
    (dict(betas=(0.9, 1.0)), "beta2"),
    (dict(betas=(0.9,)), "betas"),
    (dict(eps=0.0), "eps"),
    (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.01), "weight_decay"),
])
def test_adamw_validates_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW(make_params(), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-0.1), "lr"),
    (dict(lr=0.1, momentum=-0.5), "momentum"),
    (dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
    (dict(lr=0.1, nesterov=True), "nesterov"),
])
def test_sgd_validates_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGD(make_params(), **kwargs)


def test_lr_setter_validates():
    opt = AdamW(make_params())
    opt.lr = 0.5
    assert opt.lr == 0.5
    for bad in (-1.0, math.inf, None):
        with pytest.raises(ValueError, match="lr"):
            opt.lr = bad


def test_parameter_list_validation():
    with pytest.raises(ValueError, match="empty"):
        AdamW([])
    with pytest.raises(ValueError, match="empty"):
        SGD((p for p in []), lr=0.1)
    with pytest.raises(ValueError, match="Parameter"):
        AdamW([np.zeros(3)])
    p = Parameter(np.zeros(3))
    with pytest.raises(ValueError, match="more than once"):
        AdamW([p, p])
    with pytest.raises(TypeError, match="single Parameter"):
        AdamW(p)
    opt = AdamW(q for q in make_params())  # a generator is materialised
    assert len(opt.params) == len(SHAPES)
    assert isinstance(opt, Optimizer)


def test_gradient_shape_mismatch_raises():
    p = Parameter(np.zeros(3))
    p.grad = np.zeros(4)
    with pytest.raises(ValueError, match="shape"):
        AdamW([p]).step()
