"""Parameters, modules, and the layers that hold parameters and call the ops.

A layer's life in one training step:

    y = layer.forward(x)     # calls an op's *_forward, keeps the cache of this call
    dx = layer.backward(dy)  # calls the op's *_backward with that cache, adds the weight
                             # gradients into .grad -- only where requires_grad is True

A frozen weight (``requires_grad = False``) costs no weight-gradient matmul at all: the
layer tells the op not to compute it. This is where LoRA saves compute.

Under ``with no_grad():`` layers keep no caches, so a forward pass stores no activations
for a backward that will never come (inference, evaluation, generation).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from . import backend
from .ops.dropout import dropout_backward, dropout_forward
from .ops.embedding import embedding_backward, embedding_forward
from .ops.layernorm import layernorm_backward, layernorm_forward
from .ops.linear import linear_backward, linear_forward

# --------------------------------------------------------------------------------------
# Gradient mode
# --------------------------------------------------------------------------------------

_GRAD_ENABLED = True


def is_grad_enabled() -> bool:
    return _GRAD_ENABLED


@contextlib.contextmanager
def no_grad():
    """Run forward passes without keeping caches for backward (inference mode)."""
    global _GRAD_ENABLED
    previous, _GRAD_ENABLED = _GRAD_ENABLED, False
    try:
        yield
    finally:
        _GRAD_ENABLED = previous


# --------------------------------------------------------------------------------------
# Parameter
# --------------------------------------------------------------------------------------

class Parameter:
    """A trainable array: ``data``, its gradient ``grad`` (None until a backward writes
    one), and ``requires_grad``, which decides whether backward computes ``grad`` at all.

    ``decay`` says whether optimizers apply weight decay to it by default: True for the
    weights of linear maps, False for biases, LayerNorm weights and embedding tables
    (decaying a LayerNorm gain towards zero, or rare tokens' embeddings, only hurts).
    """

    def __init__(self, data, requires_grad: bool = True, decay: bool = True):
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self.decay = decay

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self) -> int:
        return int(self.data.size)

    def accumulate_grad(self, grad) -> None:
        """``self.grad += grad`` (the first call stores it). Never called when frozen.

        The first gradient is stored without a copy: every op's backward returns a
        freshly computed weight gradient that nothing else refers to.
        """
        if not self.requires_grad:
            raise RuntimeError("a frozen parameter must receive no gradient")
        if grad.shape != self.data.shape:
            raise ValueError(f"gradient of shape {grad.shape} for a parameter of shape {self.data.shape}")
        if self.grad is None:   # row-major like the parameter: elementwise updates stream
            self.grad = grad.astype(self.data.dtype, order="C", copy=False)
        else:
            self.grad += grad

    def __repr__(self) -> str:
        return f"Parameter(shape={tuple(self.shape)}, dtype={self.dtype}, requires_grad={self.requires_grad})"


# --------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------

class Module:
    """A container of Parameters and sub-Modules, registered by attribute assignment
    (as in PyTorch): ``self.weight = Parameter(...)``, ``self.attn = Attention(...)``.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        params, modules = self.__dict__.get("_parameters"), self.__dict__.get("_modules")
        if params is None:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        params.pop(name, None)
        modules.pop(name, None)
        if isinstance(value, Parameter):
            params[name] = value
        elif isinstance(value, Module):
            modules[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    # ---- walking the tree ----------------------------------------------------------

    def named_modules(self, prefix: str = "") -> Iterator[Tuple[str, "Module"]]:
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix: str = "") -> Iterator[Tuple[str, Parameter]]:
        """Dotted names, e.g. ``blocks.0.attn.q_proj.weight``; a shared (tied) parameter
        is listed once, under the first name that reaches it."""
        seen = set()
        for module_name, module in self.named_modules(prefix):
            for name, p in module._parameters.items():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{module_name}.{name}" if module_name else name), p

    def parameters(self) -> List[Parameter]:
        return [p for _, p in self.named_parameters()]

    def get_submodule(self, dotted: str) -> "Module":
        module = self
        for part in dotted.split(".") if dotted else []:
            if part not in module._modules:
                raise KeyError(f"no submodule {dotted!r} ({part!r} not found)")
            module = module._modules[part]
        return module

    def set_submodule(self, dotted: str, new: "Module") -> None:
        parent_name, _, child = dotted.rpartition(".")
        parent = self.get_submodule(parent_name)
        if child not in parent._modules:
            raise KeyError(f"no submodule {dotted!r}")
        setattr(parent, child, new)

    # ---- modes and gradients -------------------------------------------------------

    def train(self, mode: bool = True) -> "Module":
        for _, m in self.named_modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only)

    # ---- state ---------------------------------------------------------------------

    def state_dict(self) -> Dict[str, object]:
        """Name -> array (the live arrays, not copies). Tied parameters appear once."""
        return OrderedDict((name, p.data) for name, p in self.named_parameters())

    def load_state_dict(self, state: Dict[str, object], strict: bool = True) -> None:
        """Copy arrays into the parameters (moving them to this model's device and dtype).

        Missing or unexpected keys (with ``strict``) and shape mismatches raise a
        ``ValueError`` naming every offending key; nothing is changed in that case.
        """
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        problems = []
        if strict and missing:
            problems.append(f"missing keys: {missing}")
        if strict and unexpected:
            problems.append(f"unexpected keys: {unexpected}")
        for name in sorted(set(own) & set(state)):
            if tuple(state[name].shape) != tuple(own[name].shape):
                problems.append(f"shape mismatch for {name!r}: checkpoint {tuple(state[name].shape)}, "
                                f"model {tuple(own[name].shape)}")
        if problems:
            raise ValueError("cannot load state dict: " + "; ".join(problems))
        for name in set(own) & set(state):
            p = own[name]
            value = backend.to_device(state[name], backend.device_of(p.data))
            p.data = value.astype(p.data.dtype, copy=True)

    def to(self, device: str) -> "Module":
        """Move every parameter (and its gradient) to 'cpu' or 'cuda', in place."""
        backend.check_device(device)
        for p in self.parameters():
            p.data = backend.to_device(p.data, device)
            if p.grad is not None:
                p.grad = backend.to_device(p.grad, device)
        for _, m in self.named_modules():
            m._on_device(device)
        return self

    def _on_device(self, device: str) -> None:
        """Hook for modules holding non-parameter state on a device (e.g. an RNG)."""

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            child_lines = repr(child).splitlines()
            lines.append(f"  ({name}): " + child_lines[0])
            lines += ["  " + line for line in child_lines[1:]]
        return "\n".join(lines) + ")" if len(lines) > 1 else lines[0] + ")"


class ModuleList(Module):
    """Modules named '0', '1', ... (so parameters read ``blocks.0.attn...``)."""

    def __init__(self, modules=()):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, i: int) -> Module:
        return self._modules[str(i)]


def _keep(module: Module, cache) -> None:
    """Store a forward's cache for backward -- unless gradients are off (inference)."""
    object.__setattr__(module, "_cache", cache if _GRAD_ENABLED else None)


def _take_cache(module: Module):
    cache = module.__dict__.get("_cache")
    if cache is None:
        raise RuntimeError(f"{type(module).__name__}.backward called without a forward "
                           "that kept its cache (was the forward run under no_grad()?)")
    object.__setattr__(module, "_cache", None)  # a cache serves exactly one backward
    return cache


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------

class Linear(Module):
    """``y = x @ W + b`` with ``W`` stored (in_features, out_features).

    Initialised as GPT-2 does: ``W ~ N(0, std^2)``, ``b = 0``.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 rng: Optional[np.random.Generator] = None, std: float = 0.02, dtype="float32"):
        super().__init__()
        dtype = backend.resolve_dtype(dtype)
        rng = rng if rng is not None else np.random.default_rng(0)
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter((rng.standard_normal((in_features, out_features)) * std).astype(dtype))
        self.bias = Parameter(np.zeros(out_features, dtype=dtype), decay=False) if bias else None

    def forward(self, x):
        y, cache = linear_forward(x, self.weight.data, self.bias.data if self.bias is not None else None,
                                  keep_input=self.weight.requires_grad)
        _keep(self, cache)
        return y

    def backward(self, dy):
        need_db = self.bias is not None and self.bias.requires_grad
        dx, dW, db = linear_backward(dy, _take_cache(self), need_dW=self.weight.requires_grad, need_db=need_db)
        if dW is not None:
            self.weight.accumulate_grad(dW)
        if db is not None:
            self.bias.accumulate_grad(db)
        return dx

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """A lookup table (num_embeddings, embedding_dim): ``y = table[idx]``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *,
                 rng: Optional[np.random.Generator] = None, std: float = 0.02, dtype="float32"):
        super().__init__()
        dtype = backend.resolve_dtype(dtype)
        rng = rng if rng is not None else np.random.default_rng(0)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter((rng.standard_normal((num_embeddings, embedding_dim)) * std).astype(dtype),
                                decay=False)

    def forward(self, idx):
        y, cache = embedding_forward(idx, self.weight.data)
        _keep(self, cache)
        return y

    def backward(self, dy) -> None:
        cache = _take_cache(self)
        if self.weight.requires_grad:
            self.weight.accumulate_grad(embedding_backward(dy, cache))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias`` over the last axis."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype="float32"):
        super().__init__()
        dtype = backend.resolve_dtype(dtype)
        self.dim, self.eps = dim, eps
        self.weight = Parameter(np.ones(dim, dtype=dtype), decay=False)
        self.bias = Parameter(np.zeros(dim, dtype=dtype), decay=False)

    def forward(self, x):
        y, cache = layernorm_forward(x, self.weight.data, self.bias.data, self.eps)
        _keep(self, cache)
        return y

    def backward(self, dy):
        dx, dweight, dbias = layernorm_backward(dy, _take_cache(self),
                                                need_dweight=self.weight.requires_grad,
                                                need_dbias=self.bias.requires_grad)
        if dweight is not None:
            self.weight.accumulate_grad(dweight)
        if dbias is not None:
            self.bias.accumulate_grad(dbias)
        return dx

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class Dropout(Module):
    """Inverted dropout: in training, zero each element with probability ``p`` and scale
    the survivors by ``1 / (1 - p)``; in eval mode (or with p = 0), the identity.

    The mask comes from a seeded generator owned by the layer, on the activations' device.
    """

    def __init__(self, p: float, *, seed: int = 0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.seed = p, seed
        self.rng = backend.default_rng(seed, "cpu")

    def _on_device(self, device: str) -> None:
        self.rng = backend.default_rng(self.seed, device)

    def forward(self, x):
        y, cache = dropout_forward(x, self.p if self.training else 0.0, self.rng)
        _keep(self, cache)
        return y

    def backward(self, dy):
        return dropout_backward(dy, _take_cache(self))

    def extra_repr(self) -> str:
        return f"p={self.p}"
