"""LoRA: low-rank adaptation (Hu et al., 2021), with explicit merge and unmerge.

A frozen linear layer ``y = x @ W + b`` (W stored (I, O)) gets a trainable low-rank
update beside it:

    y = x @ W + b + scaling * (dropout(x) @ A^T) @ B^T

    A (R, I)  ``lora_A``: maps the input down to R dimensions
    B (O, R)  ``lora_B``: maps back up; zero at initialisation, so the adapted model
              starts *exactly* equal to the base model
    scaling = alpha / R           (rsLoRA: alpha / sqrt(R))

The update to the weight is therefore ``dW = scaling * (B @ A)^T`` (I, O): a matrix of
rank at most R, stored with R * (I + O) numbers instead of I * O. Only A and B are
trained, so the optimizer keeps state for them alone, and W's gradient -- a full
(I, O) matmul per layer per step -- is never computed.

Merging folds ``dW`` into W (``merge_lora``) so inference costs nothing extra;
unmerging subtracts it again (``unmerge_lora``). Both are explicit calls, never a side
effect of train()/eval(); a merged adapter is remembered per layer, so merging twice
never adds twice.

Several adapters can live on one model under different names; ``set_adapter`` picks
which ones run (and train), ``disable_adapters`` runs the base model, ``delete_adapter``
removes one, and ``add_weighted_adapter`` combines adapters by concatenating their ranks.

Key: B batch, T time, I in_features, O out_features, R rank.
"""
from __future__ import annotations

import contextlib
import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import backend
from .nn import Dropout, Linear, Module, Parameter, _keep, _take_cache
from .ops.dropout import dropout_backward, dropout_forward
from .ops.linear import linear_backward, linear_forward
from .ops.lowrank import lowrank_backward, lowrank_forward
from .validation import check_integer

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("kaiming", "gaussian", "pissa")
ALL_LINEAR = "all-linear"
_ADAPTER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how. The vocabulary is PEFT's.

    r: the rank R of the update.
    alpha: the numerator of the scaling (PEFT calls it ``lora_alpha``); scaling = alpha / r,
        or alpha / sqrt(r) with ``use_rslora``. Keeping alpha fixed while changing r keeps
        the update's size comparable across ranks -- the reason the paper scales at all.
    dropout: dropout on the low-rank path's input only (``lora_dropout``).
    target_modules: module-name suffixes to adapt (``["q_proj", "v_proj"]``, or a full
        dotted name such as ``"blocks.0.attn.q_proj"``), or ``"all-linear"``.
    bias: which biases train: ``"none"``, ``"all"`` (every bias in the model) or
        ``"lora_only"`` (the biases of the adapted layers).
    use_rslora: rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski, 2023).
    init: how A starts (B always starts at zero, except for PiSSA):
        ``"kaiming"``  A ~ U(-1/sqrt(I), 1/sqrt(I)), the reference implementation's
                       kaiming_uniform(a=sqrt(5));
        ``"gaussian"`` A ~ N(0, (1/r)^2), i.e. standard deviation 1/r, as PEFT does;
        ``"pissa"``    A and B from the top-r singular triplets of W, and W replaced by
                       the residual W - scaling * (B A)^T, so the model is unchanged at
                       step 0 but training moves the principal directions (Meng et al., 2024).
    """
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Union[str, Tuple[str, ...]] = ("q_proj", "v_proj")
    bias: str = "none"
    use_rslora: bool = False
    init: str = "kaiming"

    def __post_init__(self):
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        check_integer("LoraConfig.r", self.r, minimum=1)
        if not isinstance(self.alpha, (int, float, np.number)) or not self.alpha > 0 or not math.isfinite(self.alpha):
            raise ValueError(f"LoraConfig.alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init not in INIT_MODES:
            raise ValueError(f"LoraConfig.init must be one of {INIT_MODES}, got {self.init!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != ALL_LINEAR:
                raise ValueError(f"LoraConfig.target_modules must be a list of module names or "
                                 f"{ALL_LINEAR!r}, got the string {targets!r}")
        elif not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"LoraConfig.target_modules must be a non-empty list of module names, "
                             f"got {targets!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["target_modules"] = d["target_modules"] if isinstance(d["target_modules"], str) else list(d["target_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"LoraConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


# --------------------------------------------------------------------------------------
# The adapted layer
# --------------------------------------------------------------------------------------

class LoRALinear(Linear):
    """A frozen ``Linear`` plus any number of named low-rank adapters.

    It keeps the wrapped layer's ``weight`` and ``bias`` Parameters under the same
    names, so the base model's state-dict keys are unchanged; each adapter adds
    ``lora_A.<name>`` (R, I) and ``lora_B.<name>`` (O, R).
    """

    def __init__(self, base: Linear):
        Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A = Module()          # adapter name -> Parameter (R, I)
        self.lora_B = Module()          # adapter name -> Parameter (O, R)
        self.lora_dropout = Module()    # adapter name -> Dropout (no parameters)
        self.lora_configs: Dict[str, LoraConfig] = {}
        self.active_adapters: List[str] = []
        self.merged_adapters: List[str] = []
        self.adapters_disabled = False

    # ---- managing adapters --------------------------------------------------------

    def add_adapter(self, name: str, config: LoraConfig, rng: np.random.Generator, dropout_seed: int) -> None:
        """Create adapter ``name``: A initialised per ``config.init``, B = 0 (or PiSSA).

        The new adapter does not run until it is in ``active_adapters`` (``add_lora``
        and ``set_adapter`` do that for a whole model)."""
        I, O, R = self.in_features, self.out_features, config.r
        if R > min(I, O):
            raise ValueError(f"LoRA rank r={R} is larger than the layer allows: min(in, out) = "
                             f"min({I}, {O}) = {min(I, O)}")
        if config.init == "pissa":
            A, B = self._pissa_factors(config)
        else:
            if config.init == "kaiming":
                bound = 1.0 / math.sqrt(I)
                A = rng.uniform(-bound, bound, size=(R, I))
            else:  # gaussian
                A = rng.standard_normal((R, I)) / R
            B = np.zeros((O, R))
        self.attach(name, config, A, B, dropout_seed)

    def attach(self, name: str, config: LoraConfig, A, B, dropout_seed: int) -> None:
        """Install adapter ``name`` with the given factors A (R, I) and B (O, R), cast to
        this layer's dtype and moved to its device."""
        if A.shape != (config.r, self.in_features) or B.shape != (self.out_features, config.r):
            raise ValueError(f"adapter {name!r}: lora_A {A.shape} and lora_B {B.shape} do not fit a "
                             f"{self.in_features}x{self.out_features} layer at rank {config.r}")
        dtype, device = self.weight.data.dtype, backend.device_of(self.weight.data)
        setattr(self.lora_A, name, Parameter(backend.to_device(A, device).astype(dtype)))
        setattr(self.lora_B, name, Parameter(backend.to_device(B, device).astype(dtype)))
        dropout = Dropout(config.dropout, seed=dropout_seed)
        dropout._on_device(device)
        setattr(self.lora_dropout, name, dropout)
        self.lora_configs[name] = config

    def _pissa_factors(self, config: LoraConfig):
        """PiSSA: take the top-R singular triplets of W^T (O, I) = U S V^T and split them
        between the factors, B = U_R sqrt(S_R / s), A = sqrt(S_R / s) V_R^T, so that
        s * B A is the best rank-R approximation of W^T. W keeps only the residual.
        Computed in float64; returns NumPy arrays."""
        R, s = config.r, config.scaling
        W = backend.to_numpy(self.weight.data).astype(np.float64)      # (I, O)
        U, S, Vt = np.linalg.svd(W.T, full_matrices=False)             # W^T = U diag(S) Vt
        root = np.sqrt(S[:R] / s)                                      # (R,)
        B = U[:, :R] * root                                            # (O, R)
        A = root[:, None] * Vt[:R]                                     # (R, I)
        residual = W - s * (B @ A).T                                   # (I, O)
        self.weight.data = backend.to_device(residual.astype(self.weight.data.dtype),
                                             backend.device_of(self.weight.data))
        return A, B

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into the weight; unmerge it before deleting it")
        delattr(self.lora_A, name)
        delattr(self.lora_B, name)
        delattr(self.lora_dropout, name)
        del self.lora_configs[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def delta_weight(self, name: str):
        """The adapter's weight update ``scaling * (B @ A)^T`` (I, O), in float64."""
        xp = backend.get_array_module(self.weight.data)
        A = getattr(self.lora_A, name).data.astype(xp.float64)   # (R, I)
        B = getattr(self.lora_B, name).data.astype(xp.float64)   # (O, R)
        return self.lora_configs[name].scaling * (B @ A).T       # (I, O)

    def merge(self, name: str) -> bool:
        """W += scaling * (B A)^T, in float64 then rounded once. No-op if already merged."""
        if name in self.merged_adapters:
            return False
        xp = backend.get_array_module(self.weight.data)
        W = self.weight.data
        self.weight.data = (W.astype(xp.float64) + self.delta_weight(name)).astype(W.dtype)
        self.merged_adapters.append(name)
        return True

    def unmerge(self, name: str) -> bool:
        """W -= scaling * (B A)^T, the exact inverse of :meth:`merge` up to one rounding."""
        if name not in self.merged_adapters:
            return False
        xp = backend.get_array_module(self.weight.data)
        W = self.weight.data
        self.weight.data = (W.astype(xp.float64) - self.delta_weight(name)).astype(W.dtype)
        self.merged_adapters.remove(name)
        return True

    def _running_adapters(self) -> List[str]:
        """Adapters whose low-rank path runs: active, and not already inside W."""
        if self.adapters_disabled:
            if self.merged_adapters:
                raise RuntimeError(f"cannot run the base model: adapters {self.merged_adapters} are "
                                   "merged into the weights; unmerge_lora(model) first")
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    # ---- forward / backward -------------------------------------------------------

    def forward(self, x):
        """y = x @ W + b + sum over running adapters of scaling * (dropout(x) A^T) B^T."""
        y, base_cache = linear_forward(x, self.weight.data, self.bias.data if self.bias is not None else None,
                                       keep_input=self.weight.requires_grad)   # frozen W: no dW, no x
        adapter_caches = []
        for name in self._running_adapters():
            dropout = getattr(self.lora_dropout, name)
            x_dropped, dropout_cache = dropout_forward(x, dropout.p if self.training else 0.0, dropout.rng)
            delta, lowrank_cache = lowrank_forward(x_dropped, getattr(self.lora_A, name).data,
                                                   getattr(self.lora_B, name).data,
                                                   self.lora_configs[name].scaling)   # (..., O)
            y += delta
            adapter_caches.append((name, dropout_cache, lowrank_cache))
        _keep(self, (base_cache, adapter_caches))
        return y

    def backward(self, dy):
        """The base path gives dx (and dW only if W is trainable -- normally it is not);
        each adapter adds its own dx and fills dA, dB."""
        for name in self.merged_adapters:
            if getattr(self.lora_A, name).requires_grad or getattr(self.lora_B, name).requires_grad:
                raise RuntimeError(f"adapter {name!r} is merged into the weight and cannot be trained; "
                                   "call unmerge_lora(model) before training")
        base_cache, adapter_caches = _take_cache(self)
        need_db = self.bias is not None and self.bias.requires_grad
        dx, dW, db = linear_backward(dy, base_cache, need_dW=self.weight.requires_grad, need_db=need_db)
        if dW is not None:
            self.weight.accumulate_grad(dW)
        if db is not None:
            self.bias.accumulate_grad(db)
        for name, dropout_cache, lowrank_cache in adapter_caches:
            A, B = getattr(self.lora_A, name), getattr(self.lora_B, name)
            dx_dropped, dA, dB = lowrank_backward(dy, lowrank_cache)
            dx += dropout_backward(dx_dropped, dropout_cache)
            if A.requires_grad:
                A.accumulate_grad(dA)
            if B.requires_grad:
                B.accumulate_grad(dB)
        return dx

    def extra_repr(self) -> str:
        ranks = {n: c.r for n, c in self.lora_configs.items()}
        return (f"in={self.in_features}, out={self.out_features}, adapters={ranks}, "
                f"active={self.active_adapters}, merged={self.merged_adapters}")


# --------------------------------------------------------------------------------------
# Model-level functions
# --------------------------------------------------------------------------------------

def lora_layers(model: Module) -> Iterator[Tuple[str, LoRALinear]]:
    """(dotted name, layer) for every adapted layer of the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def is_lora_model(model: Module) -> bool:
    return any(layer.lora_configs for _, layer in lora_layers(model))


def adapter_names(model: Module) -> List[str]:
    """Every adapter on the model, in the order they were added."""
    names: List[str] = []
    for _, layer in lora_layers(model):
        names += [n for n in layer.lora_configs if n not in names]
    return names


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def find_target_modules(model: Module, target_modules) -> List[str]:
    """The dotted names of the Linear layers that ``target_modules`` selects.

    Every listed target must match at least one Linear layer: a typo ("q_porj") is an
    error that lists the names that exist, not an adapter that silently adapts nothing.
    """
    linear_names = [n for n, m in model.named_modules() if isinstance(m, Linear)]
    if target_modules == ALL_LINEAR:
        return linear_names
    chosen = []
    for target in target_modules:
        hits = [n for n in linear_names if _matches(n, target)]
        if not hits:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
            raise ValueError(f"target module {target!r} matches no linear layer of the model; "
                             f"linear layers are named {suffixes} (or use {ALL_LINEAR!r})")
        chosen += [n for n in hits if n not in chosen]
    return [n for n in linear_names if n in chosen]  # in model order


def ensure_lora_layer(model: Module, name: str) -> LoRALinear:
    """The LoRALinear at ``name``, wrapping the Linear there in place the first time."""
    layer = model.get_submodule(name)
    if isinstance(layer, LoRALinear):
        return layer
    if not isinstance(layer, Linear):
        raise ValueError(f"{name!r} is a {type(layer).__name__}, not a linear layer")
    wrapped = LoRALinear(layer)
    wrapped.training = layer.training
    model.set_submodule(name, wrapped)
    return wrapped


def add_lora(model: Module, config: LoraConfig, adapter_name: str = "default", seed: int = 0) -> List[str]:
    """Add adapter ``adapter_name`` to the layers ``config.target_modules`` selects.

    Targeted ``Linear`` layers are replaced in place by :class:`LoRALinear` (the first
    time). The new adapter becomes the active, trainable one; every other parameter is
    frozen, except biases as ``config.bias`` says. A is drawn from NumPy's
    ``Generator(seed)``, so a seed names one adapter on every backend.

    Returns the dotted names of the adapted layers.
    """
    if not isinstance(config, LoraConfig):
        raise ValueError(f"add_lora needs a LoraConfig, got {type(config).__name__}")
    if not isinstance(adapter_name, str) or not _ADAPTER_NAME.match(adapter_name):
        raise ValueError(f"adapter name {adapter_name!r} must be an identifier (letters, digits, _ and -)")
    if adapter_name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    targets = find_target_modules(model, config.target_modules)
    for name in targets:  # check every layer before changing any
        layer = model.get_submodule(name)
        if config.r > min(layer.in_features, layer.out_features):
            raise ValueError(f"LoRA rank r={config.r} is larger than layer {name!r} allows: "
                             f"min(in, out) = min({layer.in_features}, {layer.out_features}) = "
                             f"{min(layer.in_features, layer.out_features)}")
    rng = np.random.default_rng(seed)
    dropout_seeds = np.random.SeedSequence([seed, len(adapter_names(model))]).generate_state(len(targets))
    for name, dropout_seed in zip(targets, dropout_seeds):
        ensure_lora_layer(model, name).add_adapter(adapter_name, config, rng, int(dropout_seed))
    set_adapter(model, adapter_name)
    return targets


def _mark_trainable(model: Module, trainable_adapters: Sequence[str]) -> None:
    """Freeze everything except the given adapters' A and B, and biases per their configs."""
    bias_modes = set()
    for _, layer in lora_layers(model):
        for name in trainable_adapters:
            if name in layer.lora_configs:
                bias_modes.add(layer.lora_configs[name].bias)
    for _, p in model.named_parameters():
        p.requires_grad = False
    if "all" in bias_modes:
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad = True
    for _, layer in lora_layers(model):
        for name in layer.lora_configs:
            train_it = name in trainable_adapters
            getattr(layer.lora_A, name).requires_grad = train_it
            getattr(layer.lora_B, name).requires_grad = train_it
            if train_it and layer.lora_configs[name].bias == "lora_only" and layer.bias is not None:
                layer.bias.requires_grad = True


def set_adapter(model: Module, names: Union[str, Sequence[str]]) -> None:
    """Make ``names`` the active adapter(s): they run in forward and they train; every
    other adapter is inactive and frozen (as PEFT's ``set_adapter``)."""
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown adapter(s) {unknown or names}; the model has {known}")
    for _, layer in lora_layers(model):
        layer.active_adapters = [n for n in names if n in layer.lora_configs]
    _mark_trainable(model, names)


def active_adapters(model: Module) -> List[str]:
    names: List[str] = []
    for _, layer in lora_layers(model):
        names += [n for n in layer.active_adapters if n not in names]
    return names


@contextlib.contextmanager
def disable_adapters(model: Module):
    """``with disable_adapters(model):`` runs the base model (no adapter path at all)."""
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer.adapters_disabled for layer in layers]
    for layer in layers:
        layer.adapters_disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.adapters_disabled = was


def delete_adapter(model: Module, name: str) -> None:
    """Remove adapter ``name`` everywhere. A layer left without adapters stays a
    LoRALinear with none (it behaves exactly like the Linear it wraps)."""
    if name not in adapter_names(model):
        raise ValueError(f"unknown adapter {name!r}; the model has {adapter_names(model)}")
    for _, layer in lora_layers(model):
        if name in layer.lora_configs:
            layer.delete_adapter(name)
    remaining = active_adapters(model)
    if remaining:
        _mark_trainable(model, remaining)


def merge_lora(model: Module, names: Optional[Sequence[str]] = None) -> List[str]:
    """Fold adapters (default: the active ones) into their layers' weights:
    ``W += scaling * (B @ A)^T``, computed in float64 so a float32 W is rounded once.

    An adapter that is already merged is skipped -- merging twice never adds twice.
    Returns the names of the layers changed, as ``"<layer>:<adapter>"``.
    """
    changed = []
    for layer_name, layer in lora_layers(model):
        chosen = layer.active_adapters if names is None else [n for n in names if n in layer.lora_configs]
        for name in chosen:
            if layer.merge(name):
                changed.append(f"{layer_name}:{name}")
    return changed


def unmerge_lora(model: Module) -> List[str]:
    """Subtract every merged adapter from its weight again (latest merged first)."""
    changed = []
    for layer_name, layer in lora_layers(model):
        for name in reversed(list(layer.merged_adapters)):
            layer.unmerge(name)
            changed.append(f"{layer_name}:{name}")
    return changed


def merged_state(model: Module) -> Dict[str, List[str]]:
    """Layer name -> the adapters merged into its weight (part of the model's state)."""
    return {name: list(layer.merged_adapters) for name, layer in lora_layers(model) if layer.merged_adapters}


def merge_and_unload(model: Module) -> Module:
    """Merge the active adapters and replace every LoRALinear by a plain Linear holding
    the merged weight: a plain GPT, as fast as the base model, with no trace of LoRA.
    Works in place and returns the model; every parameter is trainable again."""
    merge_lora(model)
    for name, layer in list(lora_layers(model)):
        plain = Linear.__new__(Linear)
        Module.__init__(plain)
        plain.in_features, plain.out_features = layer.in_features, layer.out_features
        plain.weight, plain.bias = layer.weight, layer.bias
        plain.training = layer.training
        model.set_submodule(name, plain)
    for p in model.parameters():
        p.requires_grad = True
    return model


def unload(model: Module) -> Module:
    """Drop every adapter without merging: the base model again (W untouched unless an
    adapter was merged, which is an error here -- unmerge first)."""
    if merged_state(model):
        raise RuntimeError("adapters are merged into the weights; unmerge_lora(model) before unload")
    for name in adapter_names(model):
        delete_adapter(model, name)
    return merge_and_unload(model)


def add_weighted_adapter(model: Module, adapters: Sequence[str], weights: Sequence[float],
                         adapter_name: str) -> None:
    """Combine adapters into a new one whose update is exactly ``sum_i w_i dW_i``.

    Concatenation of ranks: stack the A's and put the weighted, scaled B's side by side,

        A_cat = [A_1; A_2; ...]                  (R_1 + R_2 + ..., I)
        B_cat = [w_1 s_1 B_1, w_2 s_2 B_2, ...]  (O, R_1 + R_2 + ...)

    then B_cat A_cat = sum_i w_i s_i B_i A_i, a block product with no cross terms; the
    new adapter has scaling 1 (alpha = r = R_1 + R_2 + ...).

    Why not average A's and B's separately (a rank-R combination)? Because
    (sum_i w_i B_i)(sum_j w_j A_j) = sum_i sum_j w_i w_j B_i A_j contains cross terms
    B_i A_j that neither adapter ever learned -- and w_i^2 instead of w_i on its own term.
    """
    if len(adapters) != len(weights) or not adapters:
        raise ValueError("add_weighted_adapter needs one weight per adapter, and at least one adapter")
    known = adapter_names(model)
    unknown = [a for a in adapters if a not in known]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {known}")
    if adapter_name in known:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    first = next(c for _, l in lora_layers(model) for n, c in l.lora_configs.items() if n in adapters)
    targets = [name for name, layer in lora_layers(model) if any(a in layer.lora_configs for a in adapters)]
    for name, layer in lora_layers(model):
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_configs]
        if not present:
            continue
        xp = backend.get_array_module(layer.weight.data)
        A_cat = xp.concatenate([getattr(layer.lora_A, a).data for a, _ in present], axis=0)
        B_cat = xp.concatenate([w * layer.lora_configs[a].scaling * getattr(layer.lora_B, a).data
                                for a, w in present], axis=1)
        rank = A_cat.shape[0]
        config = LoraConfig(r=rank, alpha=float(rank), dropout=first.dropout, target_modules=tuple(targets),
                            bias=first.bias, use_rslora=False, init="kaiming")
        layer.attach(adapter_name, config, A_cat, B_cat, zlib.crc32(f"{name}:{adapter_name}".encode()))
    _mark_trainable(model, active_adapters(model))  # the new adapter waits for set_adapter


# --------------------------------------------------------------------------------------
# The adapters' layout as saved with a whole model
# --------------------------------------------------------------------------------------

def lora_layout(model: Module) -> dict:
    """Which layers carry which adapters (with their configs), which adapters are active,
    and which are merged into which weights: what ``save_model`` records beside the
    weights so that ``load_model`` rebuilds the very same model, merged state included."""
    return {"layers": {name: {a: c.to_dict() for a, c in layer.lora_configs.items()}
                       for name, layer in lora_layers(model) if layer.lora_configs},
            "active": active_adapters(model),
            "merged": merged_state(model)}


def rebuild_lora_layout(model: Module, layout: dict) -> None:
    """Recreate the adapters of :func:`lora_layout` on a plain model, with zero factors
    for ``load_state_dict`` to fill, and the recorded merged and active state."""
    for layer_name, adapters in layout.get("layers", {}).items():
        layer = ensure_lora_layer(model, layer_name)
        for name, config_dict in adapters.items():
            config = LoraConfig.from_dict(config_dict)
            layer.attach(name, config, np.zeros((config.r, layer.in_features)),
                         np.zeros((layer.out_features, config.r)),
                         zlib.crc32(f"{layer_name}:{name}".encode()))
    for layer_name, names in layout.get("merged", {}).items():
        model.get_submodule(layer_name).merged_adapters = list(names)
    if layout.get("active"):
        set_adapter(model, layout["active"])


# --------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------

@dataclass
class LoraSummary:
    """Per adapted matrix: name, adapter, rank, shape and its r * (I + O) parameters;
    then the trainable and total counts of the whole model."""
    rows: List[Tuple[str, str, int, Tuple[int, int], int]] = field(default_factory=list)
    trainable: int = 0
    total: int = 0

    @property
    def percent_trainable(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [f"{'layer':<28} {'adapter':<10} {'r':>3} {'in x out':>11} {'params':>9}"]
        for layer, adapter, r, (I, O), n in self.rows:
            lines.append(f"{layer:<28} {adapter:<10} {r:>3} {f'{I}x{O}':>11} {n:>9,}")
        lines.append(f"trainable: {self.trainable:,} of {self.total:,} parameters "
                     f"({self.percent_trainable:.3f}%)")
        return "\n".join(lines)


def lora_summary(model: Module) -> LoraSummary:
    summary = LoraSummary(total=model.num_parameters(), trainable=model.num_parameters(trainable_only=True))
    for name, layer in lora_layers(model):
        for adapter, config in layer.lora_configs.items():
            n = config.r * (layer.in_features + layer.out_features)
            summary.rows.append((name, adapter, config.r, (layer.in_features, layer.out_features), n))
    return summary
