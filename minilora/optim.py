"""Optimizers, gradient clipping and learning-rate schedules.

After ``backward`` has filled ``.grad`` of the trainable parameters, one training step is

    clip_grad_norm(params, max_norm)                  # optional: bound the step size
    optimizer.lr = warmup_cosine_lr(step, ...)        # optional: a schedule sets lr
    optimizer.step()                                  # p.data <- p.data - (an update)
    optimizer.zero_grad()                             # p.grad <- None

Every update here is elementwise, so there are no shapes to track: ``p``, ``g`` (the
gradient), and the state arrays ``m``, ``v`` and ``buf`` all have the shape of
``p.data``. Indices: ``t`` counts the updates a parameter has received (1 for the first).

Which parameters move
---------------------
An optimizer only ever reads or writes a parameter with ``requires_grad`` True *and* a
gradient (``grad is not None``). A frozen parameter is never touched -- not even by
weight decay, which would otherwise shrink a frozen base weight under LoRA. A trainable
parameter that received no gradient this step is skipped too, and (as in PyTorch) its
step count ``t`` does not advance.

Every update is done in place on ``p.data`` (and on the state arrays), with at most one
scratch array the size of the parameter alive at a time, and the array module comes from
the arrays themselves, so the same code runs on NumPy and CuPy.

Checkpoints
-----------
``state_dict()`` returns a plain dict of Python scalars and NumPy arrays (copies), with
per-parameter state keyed by the parameter's index in the optimizer's list;
``load_state_dict()`` puts it back on each parameter's device. Saving after step ``k``
and loading into a fresh optimizer over the same parameters continues bit-identically.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, Iterable, List, Tuple

import numpy as np

from . import backend
from .backend import get_array_module
from .nn import Parameter
from .threads import map_row_blocks
from .validation import check_integer

__all__ = [
    "Optimizer",
    "SGD",
    "AdamW",
    "grad_norm",
    "clip_grad_norm",
    "warmup_cosine_lr",
]


# --------------------------------------------------------------------------------------
# Small validators (each raises a ValueError that names the argument)
# --------------------------------------------------------------------------------------

def _check_real(name: str, value) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _check_nonneg(name: str, value) -> float:
    value = _check_real(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def _as_param_list(params) -> List[Parameter]:
    """Materialise ``params`` (any iterable, e.g. a generator) into a checked list."""
    if isinstance(params, Parameter):
        raise TypeError("params must be an iterable of Parameters (e.g. model.parameters()), "
                        "not a single Parameter; wrap it in a list")
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    seen = set()
    for i, p in enumerate(params):
        if not isinstance(p, Parameter):
            raise ValueError(f"params[{i}] is a {type(p).__name__}, not a minilora Parameter")
        if id(p) in seen:
            raise ValueError(f"params[{i}] appears more than once; it would be updated twice per step")
        seen.add(id(p))
    return params


# --------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------

class Optimizer:
    """What every optimizer shares: the parameter list, ``lr``, ``zero_grad``, ``step``,
    and checkpointing of hyper-parameters and per-parameter state.

    A subclass names its hyper-parameters in ``_hyper_names``, its per-parameter state in
    ``_state_arrays`` (arrays shaped like the parameter) and ``_state_scalars`` (Python
    numbers), validates hyper-parameters in ``_validate_hyper`` and writes the update of
    one parameter in ``_update(i, p)``.

    ``lr`` may be changed between steps (a schedule sets it every step); it is checked to
    be a finite number >= 0 whenever it is set.
    """

    _hyper_names: Tuple[str, ...] = ("lr",)
    _state_arrays: Tuple[str, ...] = ()
    _state_scalars: Tuple[str, ...] = ()

    def __init__(self, params: Iterable[Parameter], **hyper):
        self.params: List[Parameter] = _as_param_list(params)
        self._set_hyper(self._validate_hyper(**hyper))
        # state[i] holds the state of self.params[i], created on its first update.
        self.state: Dict[int, Dict[str, Any]] = {}

    # --- hyper-parameters -------------------------------------------------------------

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value) -> None:
        self._lr = _check_nonneg("lr", value)

    @classmethod
    def _validate_hyper(cls, *, lr) -> Dict[str, Any]:
        return {"lr": _check_nonneg("lr", lr)}

    def _set_hyper(self, hyper: Dict[str, Any]) -> None:
        for name, value in hyper.items():
            setattr(self, name, value)

    def hyperparameters(self) -> Dict[str, Any]:
        """The current hyper-parameters as a dict of Python values."""
        return {name: getattr(self, name) for name in self._hyper_names}

    # --- the training-loop interface --------------------------------------------------

    def zero_grad(self) -> None:
        """Forget all gradients (``p.grad = None``), so the next backward starts afresh."""
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """Update, in place, every parameter with ``requires_grad`` and a gradient."""
        for i, p in enumerate(self.params):
            if not p.requires_grad or p.grad is None:
                continue  # frozen, or no gradient this step: never read, never written
            if p.grad.shape != p.data.shape:
                raise ValueError(f"params[{i}] has a gradient of shape {p.grad.shape} "
                                 f"but data of shape {p.data.shape}")
            self._update(i, p)

    def _update(self, i: int, p: Parameter) -> None:
        raise NotImplementedError

    # --- accounting -------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Total bytes held by the optimizer's state arrays (m, v, momentum buffers).

        AdamW keeps two arrays per trained parameter, so its state costs twice the
        trainable parameters' bytes -- the memory LoRA saves by training few parameters.
        """
        return sum(int(s[name].nbytes) for s in self.state.values() for name in self._state_arrays
                   if name in s)

    # --- checkpoints ------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """A snapshot: ``{"optimizer", "num_params", <hyper-parameters>, "state"}``.

        ``state`` maps a parameter's index in ``self.params`` to its state, with arrays
        copied to NumPy (later steps do not change the snapshot).
        """
        state = {}
        for i, s in self.state.items():
            entry = {name: int(s[name]) for name in self._state_scalars}
            entry.update({name: np.array(backend.to_numpy(s[name]), copy=True)
                          for name in self._state_arrays})
            state[i] = entry
        out = {"optimizer": type(self).__name__, "num_params": len(self.params)}
        out.update(self.hyperparameters())
        out["state"] = state
        return out

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (hyper-parameters, ``lr`` included, and state).

        Arrays go to the device of their parameter and take its dtype. Everything is
        checked before anything changes, so a failed load leaves the optimizer as it was.
        """
        name = type(self).__name__
        if not isinstance(state_dict, dict):
            raise ValueError(f"expected a dict from {name}.state_dict(), got {type(state_dict).__name__}")
        if state_dict.get("optimizer") != name:
            raise ValueError(f"state dict is for optimizer {state_dict.get('optimizer')!r}, not {name!r}")
        if state_dict.get("num_params") != len(self.params):
            raise ValueError(f"state dict holds {state_dict.get('num_params')!r} parameters, "
                             f"this optimizer has {len(self.params)}")
        missing = [h for h in self._hyper_names if h not in state_dict]
        if missing:
            raise ValueError(f"state dict lacks hyper-parameters {missing}")
        hyper = self._validate_hyper(**{h: state_dict[h] for h in self._hyper_names})

        saved = state_dict.get("state")
        if not isinstance(saved, dict):
            raise ValueError("state dict lacks a 'state' dict")
        new_state: Dict[int, Dict[str, Any]] = {}
        expected_keys = set(self._state_arrays) | set(self._state_scalars)
        for key, entry in saved.items():
            i = check_integer("state index", key)
            if i >= len(self.params):
                raise ValueError(f"state for parameter index {i}, but there are only {len(self.params)}")
            if not isinstance(entry, dict) or set(entry) != expected_keys:
                got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                raise ValueError(f"state of parameter {i} has keys {got}, expected {sorted(expected_keys)}")
            p = self.params[i]
            restored = {s: check_integer(f"state[{i}][{s!r}]", entry[s]) for s in self._state_scalars}
            device = backend.device_of(p.data)
            for a in self._state_arrays:
                arr = entry[a]
                if tuple(np.shape(arr)) != tuple(p.data.shape):
                    raise ValueError(f"state[{i}][{a!r}] has shape {tuple(np.shape(arr))}, "
                                     f"parameter {i} has shape {tuple(p.data.shape)}")
                # astype(copy=True): the optimizer must own its arrays, never alias the dict's.
                restored[a] = backend.to_device(arr, device).astype(p.data.dtype, copy=True)
            new_state[i] = restored

        self._set_hyper(hyper)
        self.state = new_state

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({len(self.params)} parameters, {hyper})"


# --------------------------------------------------------------------------------------
# SGD
# --------------------------------------------------------------------------------------

class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum and L2
    weight decay -- the same rule as ``torch.optim.SGD`` (dampening 0).

    For each trainable parameter ``p`` with gradient ``g``, at its update ``t``:

        d   = g + weight_decay * p                (L2 penalty: d/dp of wd/2 * |p|^2)
        buf = d                         if t == 1
        buf = momentum * buf + d        otherwise
        d   = d + momentum * buf        if nesterov  (look ahead along the velocity)
        d   = buf                       otherwise
        p   = p - lr * d

    With ``momentum = 0`` there is no buffer: ``p = p - lr * (g + weight_decay * p)``.
    Weight decay here is *coupled*: it is added to the gradient and so goes through the
    momentum. ``p.grad`` itself is left unchanged.

    Weight decay applies only to parameters whose ``decay`` attribute is True (the
    default), for the same reason as in :class:`AdamW`.
    """

    _hyper_names = ("lr", "momentum", "weight_decay", "nesterov")
    _state_arrays = ("momentum_buffer",)

    def __init__(self, params: Iterable[Parameter], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         nesterov=nesterov)

    @classmethod
    def _validate_hyper(cls, *, lr, momentum, weight_decay, nesterov) -> Dict[str, Any]:
        momentum = _check_nonneg("momentum", momentum)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise ValueError(f"nesterov must be True or False, got {nesterov!r}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        return {"lr": _check_nonneg("lr", lr), "momentum": momentum,
                "weight_decay": _check_nonneg("weight_decay", weight_decay),
                "nesterov": bool(nesterov)}

    def _update(self, i: int, p: Parameter) -> None:
        xp = get_array_module(p.data)
        g = p.grad
        if self.weight_decay != 0 and getattr(p, "decay", True):
            d = p.data * self.weight_decay                       # scratch
            d += g                                               # d = g + wd * p
        else:
            d = g                                                # read only below
        if self.momentum != 0:
            s = self.state.get(i)
            if s is None:
                buf = xp.array(d, copy=True)                     # t == 1: buf = d
                self.state[i] = {"momentum_buffer": buf}
            else:
                buf = s["momentum_buffer"]
                buf *= self.momentum
                buf += d                                         # buf = momentum * buf + d
            if self.nesterov:
                step = buf * self.momentum
                step += d                                        # d + momentum * buf
            else:
                step = buf
        else:
            step = d
        # p -= lr * step, with the product in a scratch array (never in buf or p.grad)
        p.data -= step * self.lr


# --------------------------------------------------------------------------------------
# AdamW
# --------------------------------------------------------------------------------------

class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), exactly the rule of
    ``torch.optim.AdamW``.

    For each trainable parameter ``p`` with gradient ``g``, at its update ``t`` (m and v
    start at zero):

        p     = p * (1 - lr * weight_decay)            decoupled decay (if p.decay)
        m     = beta1 * m + (1 - beta1) * g            running mean of g
        v     = beta2 * v + (1 - beta2) * g * g        running mean of g^2
        m_hat = m / (1 - beta1^t)                      bias corrections: m and v start
        v_hat = v / (1 - beta2^t)                      at 0, so early means are too small
        p     = p - lr * m_hat / (sqrt(v_hat) + eps)

    At ``t = 1`` (without decay) ``m_hat = g`` and ``v_hat = g^2``, so every element moves
    by ``lr * g / (|g| + eps)``, about ``lr`` against the sign of its gradient.

    *Decoupled* means the decay shrinks ``p`` directly, instead of being added to ``g``
    (which is L2 regularisation, as in :class:`SGD`): added to ``g`` it would be divided
    by ``sqrt(v_hat)`` and so decay parameters with small gradients much more than others.

    Weight decay applies only to parameters whose ``decay`` attribute is True. Layers set
    it False for biases, LayerNorm weights and embedding tables: a bias or a norm's gain
    has few entries and does not make the model more complex by growing, and pulling a
    LayerNorm gain towards 0 (rather than its natural 1) or shrinking the rows of rare
    tokens' embeddings (which get few gradient updates to push back) only hurts. Decaying
    only the matrices of linear layers is the convention of GPT-2 / nanoGPT training.
    """

    _hyper_names = ("lr", "betas", "eps", "weight_decay")
    _state_arrays = ("m", "v")
    _state_scalars = ("step",)

    def __init__(self, params: Iterable[Parameter], lr: float = 3e-4,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @classmethod
    def _validate_hyper(cls, *, lr, betas, eps, weight_decay) -> Dict[str, Any]:
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        beta1, beta2 = _check_real("beta1", beta1), _check_real("beta2", beta2)
        for name, b in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {b!r}")
        eps = _check_real("eps", eps)
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        return {"lr": _check_nonneg("lr", lr), "betas": (beta1, beta2), "eps": eps,
                "weight_decay": _check_nonneg("weight_decay", weight_decay)}

    def _update(self, i: int, p: Parameter) -> None:
        xp = get_array_module(p.data)
        s = self.state.get(i)
        if s is None:  # lazily: a parameter that never trains never costs state memory
            s = self.state[i] = {"step": 0, "m": xp.zeros_like(p.data), "v": xp.zeros_like(p.data)}
        s["step"] += 1
        decay = self.weight_decay if getattr(p, "decay", True) else 0.0
        kernel = functools.partial(_adamw_kernel, t=s["step"], lr=self.lr, betas=self.betas,
                                   eps=self.eps, weight_decay=decay)
        # Every element's update is independent: blocks of it run on the CPU cores at once.
        map_row_blocks(kernel, *_flat_if_possible(p.data, p.grad, s["m"], s["v"]))


def _adamw_kernel(p, g, m, v, *, t: int, lr: float, betas: Tuple[float, float], eps: float,
                  weight_decay: float) -> None:
    """One AdamW update of (a block of) one parameter, in place in p, m and v."""
    xp = get_array_module(p)
    beta1, beta2 = betas
    if weight_decay != 0:
        p *= 1.0 - lr * weight_decay                             # p = p * (1 - lr * wd)

    scratch = xp.multiply(g, 1.0 - beta1)                        # the one scratch array
    m *= beta1
    m += scratch                                                 # m = b1 m + (1 - b1) g
    xp.multiply(g, g, out=scratch)
    scratch *= 1.0 - beta2
    v *= beta2
    v += scratch                                                 # v = b2 v + (1 - b2) g^2

    step_size = lr / (1.0 - beta1 ** t)                          # lr / bias correction 1
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** t)
    xp.sqrt(v, out=scratch)
    scratch /= bias_correction2_sqrt
    scratch += eps                                               # sqrt(v_hat) + eps
    xp.divide(m, scratch, out=scratch)
    scratch *= step_size                                         # lr m_hat / (sqrt(v_hat) + eps)
    p -= scratch


def _flat_if_possible(*arrays):
    """1-D views of same-shaped row-major arrays (any shape splits into equal blocks), or
    the arrays themselves when one is not row-major: reshaping it would copy, and an
    update written into a copy would be lost."""
    if all(a.flags.c_contiguous for a in arrays):
        return tuple(a.reshape(-1) for a in arrays)
    return arrays


# --------------------------------------------------------------------------------------
# Gradient clipping
# --------------------------------------------------------------------------------------

def grad_norm(grads) -> float:
    """The global L2 norm of several gradient arrays, as if they were one long vector:
    ``sqrt(sum over arrays of sum(g * g))``, accumulated in float64 (0.0 for none)."""
    total_sq = 0.0
    for g in grads:   # squared per-array norms stay on the device; one transfer at the end
        xp = get_array_module(g)
        n = xp.linalg.norm(g.ravel()).astype(xp.float64)
        total_sq = total_sq + n * n
    return float(math.sqrt(float(total_sq)))


def clip_grad_norm(params: Iterable[Parameter], max_norm: float) -> float:
    """Scale all gradients together so their global L2 norm is at most ``max_norm``.

    The norm is taken over every gradient at once, as if they were one long vector:

        norm = sqrt( sum over parameters of sum(g * g) )
        coef = max_norm / (norm + 1e-6)
        g    = g * coef          for every gradient, if coef < 1

    so the direction of the full gradient is kept and only its length is bounded (the
    1e-6 guards against dividing by zero). This is ``torch.nn.utils.clip_grad_norm_``;
    like it, the test is ``coef < 1``, so a norm within ~1e-6 below ``max_norm`` is scaled
    by a factor just under 1 and the clipped norm never exceeds ``max_norm``.

    Parameters without a gradient are ignored. Returns the norm *before* clipping as a
    Python float. If it is not finite (inf or nan), the gradients are left as they are
    and the value is returned: the caller decides (for example, to skip the step).
    """
    max_norm = _check_real("max_norm", max_norm)
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    grads = [p.grad for p in params if p.grad is not None]
    norm = grad_norm(grads)
    if not math.isfinite(norm):
        return norm
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads:
            g *= coef
    return norm


# --------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------

def warmup_cosine_lr(step: int, *, max_lr: float, warmup_steps: int, total_steps: int,
                     min_lr: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then cosine decay.

        lr = max_lr * (step + 1) / warmup_steps                       step < warmup_steps
        lr = min_lr + (max_lr - min_lr) * (1 + cos(pi * q)) / 2       warmup_steps <= step < total_steps
             with q = (step - warmup_steps) / (total_steps - warmup_steps)
        lr = min_lr                                                   step >= total_steps

    Warm-up reaches ``max_lr`` at its last step (``warmup_steps - 1``), so the very first
    update already has a non-zero rate ``max_lr / warmup_steps``; the cosine then starts at
    ``max_lr`` (``q = 0``) and falls smoothly to ``min_lr`` at ``total_steps``. Why warm
    up: early on, Adam's second-moment estimate rests on few gradients and the weights are
    far from a good region, so full-size steps can diverge. ``warmup_steps = 0`` skips it.

    Arguments are checked: ``step >= 0``; ``0 <= warmup_steps <= total_steps``;
    ``total_steps >= 1``; ``0 <= min_lr <= max_lr``.
    """
    step = check_integer("step", step)
    warmup_steps = check_integer("warmup_steps", warmup_steps)
    total_steps = check_integer("total_steps", total_steps, minimum=1)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be <= total_steps ({total_steps})")
    max_lr = _check_nonneg("max_lr", max_lr)
    min_lr = _check_nonneg("min_lr", min_lr)
    if min_lr > max_lr:
        raise ValueError(f"min_lr ({min_lr}) must be <= max_lr ({max_lr})")

    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    q = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * q))
