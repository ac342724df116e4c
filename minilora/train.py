"""The training loop: batches in, a better model out, with evaluation, checkpoints and
a resume that continues exactly where a run stopped.

One step, as it is written below:

    x, y   = train_batches(rng)                     # (B, T) token ids, (B, T) targets
    loss, dlogits = cross_entropy(model.forward(x), y, overwrite_logits=True)  # a float, (B, T, V)
    model.zero_grad(); model.backward(dlogits)      # fills .grad of trainable parameters
    clip_grad_norm(params, grad_clip)               # bound the length of the step
    optimizer.lr = warmup_cosine_lr(step, ...)      # the schedule sets the rate
    optimizer.step()                                # AdamW updates trainable parameters

Full training and LoRA fine-tuning are the same loop: the optimizer gets the
parameters with ``requires_grad`` (after ``add_lora``, only the adapters), and a
checkpoint saves those parameters -- all of them for full training, only the trainable
ones for a LoRA run (whose base is named by ``base_reference``).

Resume is bit-identical: a checkpoint holds every number the next step depends on --
the saved parameters, AdamW's m, v and step counts, the step counter (which drives the
schedule), and the state of every random generator (the one that samples batches and
the dropout generators inside the model). Resuming restores the saved parameters by
name into the model (strictly: the names must match), then the rest, and the losses
that follow are the very floats an uninterrupted run computes.

Limitations on CuPy: the dropout generators live on the GPU and their state is not
saved, so a resumed GPU run with dropout draws other (equally valid) masks; a warning
says so. And the embedding's gradient adds repeated tokens' rows with the GPU's atomic
additions, in no fixed order (:func:`minilora.backend.scatter_add`), so its last bits
-- and from them a GPU run's later losses -- may differ from one run to the next,
resumed or not. Everything else, the batch sampler included, resumes exactly on both
backends, and on the CPU every float of a resumed run equals the uninterrupted one's.

Letters: B batch, T time (sequence length), V vocabulary size.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from . import backend, io
from .data import IGNORE_INDEX, example_batch, get_batch, iter_example_batches, iter_text_batches
from .gpt import cross_entropy
from .lora import is_lora_model
from .nn import Module, no_grad
from .ops.cross_entropy import cross_entropy_forward
from .optim import AdamW, clip_grad_norm, warmup_cosine_lr
from .optim import grad_norm as global_grad_norm
from .validation import check_integer

__all__ = [
    "TrainConfig", "TrainResult", "StepRecord", "EvalRecord", "StepInfo", "TrainingDiverged",
    "train", "evaluate",
    "text_batches", "text_eval_batches", "example_batches", "example_eval_batches",
    "rng_states", "set_rng_states",
]

TRAINER_STATE_VERSION = 1

Batch = Tuple[object, object]   # (x, y): int (B, T) inputs and targets


# --------------------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """How to train. Steps count optimizer updates; ``step`` k means "after k updates".

    max_steps: updates to run in total (a resumed run continues up to it).
    batch_size: rows per training batch; the batches ``train`` receives must have it.
    lr, min_lr, warmup_steps: the schedule (:func:`minilora.optim.warmup_cosine_lr`):
        linear warm-up to ``lr`` over ``warmup_steps`` updates, then a cosine down to
        ``min_lr`` at ``max_steps``.
    weight_decay, betas, eps: AdamW's (decay applies to parameters with ``decay``
        True: the matrices, not biases, norms or embeddings).
    grad_clip: the largest global gradient norm (None: no clipping).
    eval_interval: evaluate on the validation batches every this many steps, and at
        the end (0: only at the end).
    eval_batches: how many validation batches one evaluation reads (None: all).
    checkpoint_interval: with an ``out_dir``, save every this many steps (0: only at
        the end, or when ``on_step`` stops the run); ``keep_checkpoints`` are kept.
    seed: seeds the generator that samples training batches.
    progress: show a tqdm progress bar (loss and tokens/s).
    """
    max_steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: Optional[float] = 1.0
    eval_interval: int = 100
    eval_batches: Optional[int] = 20
    checkpoint_interval: int = 0
    keep_checkpoints: int = 1
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.betas, list):   # from JSON
            object.__setattr__(self, "betas", tuple(self.betas))
        for name, minimum in (("max_steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("eval_interval", 0),
                              ("checkpoint_interval", 0), ("keep_checkpoints", 1), ("seed", 0)):
            check_integer(f"TrainConfig.{name}", getattr(self, name), minimum)
        if self.eval_batches is not None:
            check_integer("TrainConfig.eval_batches", self.eval_batches, 1)
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"TrainConfig.warmup_steps ({self.warmup_steps}) must be <= max_steps "
                             f"({self.max_steps})")
        for name in ("lr", "min_lr", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.min_lr > self.lr:
            raise ValueError(f"TrainConfig.min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip!r}")
        AdamW._validate_hyper(lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


class StepRecord(NamedTuple):
    """One training step: the loss of its batch (before the update) and its rate."""
    step: int              # the update's number: 1 for the first
    loss: float
    lr: float
    tokens_per_s: float    # input tokens of the batch / wall time of the whole step


class EvalRecord(NamedTuple):
    step: int              # evaluated after this many updates
    loss: float            # validation loss, weighted by counted target tokens


class StepInfo(NamedTuple):
    """What ``on_step`` receives after each step (after its evaluation and checkpoint)."""
    step: int
    loss: float
    lr: float
    grad_norm: float                 # before clipping
    tokens_per_s: float
    val_loss: Optional[float]        # when this step evaluated, else None
    checkpoint: Optional[str]        # when this step saved one, else None


@dataclass
class TrainResult:
    step: int                         # updates done (after a resume: in total)
    train_history: List[StepRecord]   # every step since the start of the run
    val_history: List[EvalRecord]
    elapsed: float                    # wall seconds of this call
    checkpoint: Optional[str] = None  # the latest checkpoint folder, if any

    @property
    def final_train_loss(self) -> Optional[float]:
        return self.train_history[-1].loss if self.train_history else None

    @property
    def final_val_loss(self) -> Optional[float]:
        return self.val_history[-1].loss if self.val_history else None


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became inf or nan; nothing was updated or saved
    for that step. ``checkpoint`` is the last good checkpoint (None if there is none)."""

    def __init__(self, message: str, step: int, value: float,
                 checkpoint: Optional[str], checkpoint_step: Optional[int]):
        super().__init__(message)
        self.step, self.value = step, value
        self.checkpoint, self.checkpoint_step = checkpoint, checkpoint_step


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------

def text_batches(tokens, batch_size: int, block_size: int) -> Callable[[np.random.Generator], Batch]:
    """Training batches from one token stream: ``fn(rng)`` -> random windows (B, T)
    (:func:`minilora.data.get_batch`)."""
    tokens = np.asarray(tokens)
    get_batch(tokens[:block_size + 1], 1, block_size, np.random.default_rng(0))  # fail early if too short

    def sample(rng: np.random.Generator) -> Batch:
        return get_batch(tokens, batch_size, block_size, rng)
    return sample


def text_eval_batches(tokens, batch_size: int, block_size: int) -> Callable[[], Iterable[Batch]]:
    """Validation batches from one token stream: ``fn()`` -> every window in order."""
    tokens = np.asarray(tokens)

    def batches() -> Iterable[Batch]:
        return iter_text_batches(tokens, batch_size, block_size)
    return batches


def example_batches(encoded, batch_size: int, pad_id: int) -> Callable[[np.random.Generator], Batch]:
    """Training batches of prompt/response examples (targets -100 on the prompt):
    ``fn(rng)`` -> a random padded batch (:func:`minilora.data.example_batch`)."""
    encoded = list(encoded)
    if not encoded:
        raise ValueError("example_batches: no examples")

    def sample(rng: np.random.Generator) -> Batch:
        return example_batch(encoded, batch_size, rng, pad_id)
    return sample


def example_eval_batches(encoded, batch_size: int, pad_id: int) -> Callable[[], Iterable[Batch]]:
    """Validation batches of examples: ``fn()`` -> every example once, in order."""
    encoded = list(encoded)

    def batches() -> Iterable[Batch]:
        return iter_example_batches(encoded, batch_size, pad_id)
    return batches


def _device(model: Module) -> str:
    return backend.device_of(next(iter(model.parameters())).data)


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------

def evaluate(model: Module, batches: Iterable[Batch], max_batches: Optional[int] = None,
             ignore_index: int = IGNORE_INDEX) -> float:
    """Mean cross-entropy over the batches, every counted target token weighing the same:

        loss = sum over batches of (batch mean loss * counted targets) / all counted targets

    (a plain mean of batch means would overweight a short last batch or a batch of
    mostly-prompt examples). Targets equal to ``ignore_index`` do not count. Runs in
    eval mode (no dropout) under ``no_grad()``, then restores the model's mode.
    """
    device = _device(model)
    was_training = model.training
    total, count = 0.0, 0
    model.eval()
    try:
        with no_grad():
            for i, (x, y) in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = backend.to_device(x, device), backend.to_device(y, device)
                n = int((y != ignore_index).sum())
                if n == 0:
                    continue  # nothing counts in this batch (all prompt or padding)
                loss, _ = cross_entropy_forward(model.forward(x), y, ignore_index)  # mean over n
                total += loss * n
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate: the batches hold no target that counts (all equal ignore_index, "
                         "or there were no batches)")
    return total / count


# --------------------------------------------------------------------------------------
# Random-generator state
# --------------------------------------------------------------------------------------

def _jsonable(value):
    """A bit generator's state with NumPy arrays and integers made JSON-ready (big Python
    ints are fine: JSON has arbitrary-precision integers)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": value.dtype.name}
    if isinstance(value, np.integer):
        return int(value)
    return value


def _from_jsonable(value):
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.asarray(value["__ndarray__"], dtype=value["dtype"])
        return {k: _from_jsonable(v) for k, v in value.items()}
    return value


def model_generators(model: Module):
    """(name, generator) for every random generator held by a module of the model, e.g.
    ``blocks.0.mlp.dropout.rng`` or ``blocks.0.attn.attn_dropout_rng``."""
    for module_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, np.random.Generator) or hasattr(value, "bit_generator"):
                yield (f"{module_name}.{attr}" if module_name else attr), value


def rng_states(model: Module) -> Tuple[Dict[str, dict], List[str]]:
    """The state of every NumPy generator in the model, by name (JSON-ready), and the
    names of generators whose state cannot be saved (CuPy's, on the GPU)."""
    saved, unsaved = {}, []
    for name, gen in model_generators(model):
        if isinstance(gen, np.random.Generator):
            saved[name] = _jsonable(gen.bit_generator.state)
        else:
            unsaved.append(name)
    return saved, unsaved


def set_rng_states(model: Module, states: Dict[str, dict], unsaved: Sequence[str] = ()) -> List[str]:
    """Restore :func:`rng_states` (``states``, and the ``unsaved`` names it listed).

    The names must be exactly the model's generators (another set means another model
    structure). A generator that cannot be restored -- its state was not saved, or it now
    lives on the GPU -- keeps its current state; their names are returned.
    """
    own = dict(model_generators(model))
    if set(own) != set(states) | set(unsaved):
        raise ValueError(f"random generators differ from the checkpoint's: missing in the "
                         f"checkpoint {sorted(set(own) - set(states) - set(unsaved))}, not in the "
                         f"model {sorted(set(states) - set(own))}")
    not_restored = []
    for name, gen in own.items():
        if name in states and isinstance(gen, np.random.Generator):
            gen.bit_generator.state = _from_jsonable(states[name])
        else:
            not_restored.append(name)
    return not_restored


# --------------------------------------------------------------------------------------
# Checkpoints: what a training run saves and restores
# --------------------------------------------------------------------------------------

def _base_fingerprint(model: Module, trainable: Sequence[str]) -> str:
    """A hash of the frozen base weights, so a LoRA run resumes only on the same base."""
    from .adapters import base_fingerprint
    return base_fingerprint(model, [n for n in trainable if ".lora_" not in n])


def _write_adapters(model: Module, base_reference: Optional[str]) -> Callable[[str], None]:
    """Also save the active adapters in PEFT's layout, so a LoRA checkpoint folder can be
    passed to ``load_adapter`` as is ("default" in the folder itself, others in
    sub-folders named after them)."""
    from .adapters import save_adapter
    from .lora import active_adapters

    def write(folder: str) -> None:
        for name in active_adapters(model):
            save_adapter(model, folder if name == "default" else os.path.join(folder, name),
                         name, base_reference=base_reference)
    return write


class _Run:
    """The state a checkpoint carries besides parameters and optimizer."""

    def __init__(self):
        self.step = 0
        self.train_history: List[StepRecord] = []
        self.val_history: List[EvalRecord] = []
        self.checkpoint: Optional[str] = None
        self.checkpoint_step: Optional[int] = None


def _save(out_dir, run: _Run, model, optimizer, batch_rng, config: TrainConfig, names: List[str],
          lora: bool, base_reference, fingerprint) -> str:
    model_rngs, unsaved = rng_states(model)
    trainer_state = {
        "format_version": TRAINER_STATE_VERSION,
        "train_config": config.to_dict(),
        "param_names": names,   # the optimizer's parameters, in its order (state indices)
        "rng": {"batches": _jsonable(batch_rng.bit_generator.state), "model": model_rngs},
        "rng_unsaved": unsaved,
        "history": {"train": [list(r) for r in run.train_history],
                    "val": [list(r) for r in run.val_history]},
        "lora": lora,
        "base": base_reference,
        "base_fingerprint": fingerprint,
    }
    extra = {"lora": lora, "base": base_reference}
    path = io.save_checkpoint(out_dir, run.step, model, optimizer, trainer_state,
                              trainable_only=lora, config_extra=extra,
                              write_extra=_write_adapters(model, base_reference) if lora else None,
                              keep=config.keep_checkpoints)
    run.checkpoint, run.checkpoint_step = path, run.step
    return path


# TrainConfig fields that change the numbers a step computes (max_steps does too, through
# the cosine, but extending a finished run is what resume is for).
_MATH_FIELDS = ("batch_size", "lr", "min_lr", "warmup_steps", "weight_decay", "betas", "eps",
                "grad_clip", "seed")


def _restore(out_dir, run: _Run, model, optimizer, batch_rng, config: TrainConfig, names: List[str],
             lora: bool, fingerprint) -> None:
    """Load the latest checkpoint of ``out_dir`` into model, optimizer, generators and run.
    Everything is read and checked before anything is changed."""
    path = io.latest_checkpoint(out_dir)
    if path is None:
        raise FileNotFoundError(f"resume=True, but {out_dir} holds no checkpoint ({io.LATEST_FILE} is missing)")
    ckpt = io.load_checkpoint(path)
    state = ckpt.trainer_state
    where = f"checkpoint {ckpt.directory}"
    if state.get("format_version") != TRAINER_STATE_VERSION:
        raise ValueError(f"{where}: {io.TRAINER_STATE_FILE} has format_version "
                         f"{state.get('format_version')!r}; this minilora reads {TRAINER_STATE_VERSION}")

    # The model must be the one the checkpoint was made from.
    own = io.model_config_dict(model)
    for key in ("model", "dtype"):
        if ckpt.config.get(key) != own[key]:
            raise ValueError(f"{where} was saved from another model: {key} is {ckpt.config.get(key)!r} "
                             f"there, {own[key]!r} here")
    if bool(state.get("lora")) != lora or ckpt.trainable_only != lora:
        raise ValueError(f"{where} is a {'LoRA' if state.get('lora') else 'full'} training run, but the "
                         f"model {'has' if lora else 'has no'} LoRA adapters"
                         + ("; rebuild the base and call add_lora with the same config first" if not lora else ""))
    if state.get("param_names") != names:
        saved = state.get("param_names") or []
        raise ValueError(f"{where}: the trainable parameters differ: missing here "
                         f"{sorted(set(saved) - set(names))}, not in the checkpoint "
                         f"{sorted(set(names) - set(saved))}" + (" (or their order)" if set(saved) == set(names) else ""))
    if lora and state.get("base_fingerprint") != fingerprint:
        raise ValueError(f"{where} was trained on other base weights than this model's "
                         f"(base: {state.get('base')!r}); load that base before add_lora")

    try:
        batch_rng_state = _from_jsonable(state["rng"]["batches"])
        model_rng_states, rng_unsaved = state["rng"]["model"], state.get("rng_unsaved", [])
        train_history = [StepRecord(int(s), float(l), float(lr), float(t)) for s, l, lr, t in state["history"]["train"]]
        val_history = [EvalRecord(int(s), float(l)) for s, l in state["history"]["val"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: {io.TRAINER_STATE_FILE} is incomplete or malformed ({e!r})") from None
    saved_config = state.get("train_config") or {}
    changed = [k for k in _MATH_FIELDS if k in saved_config and saved_config[k] != config.to_dict()[k]]
    if changed:
        warnings.warn(f"{where}: resuming with other {', '.join(changed)} than the checkpoint's; the "
                      "run continues with the new values, so it will not match an uninterrupted one",
                      stacklevel=3)

    # Restore the saved parameters by name: all of them, or (LoRA) exactly the trainable ones.
    if lora:
        if set(ckpt.params) != set(names):
            raise ValueError(f"{where}: {io.TRAINABLE_WEIGHTS_FILE} holds {sorted(ckpt.params)}, "
                             f"the model trains {names}")
        model.load_state_dict(ckpt.params, strict=False)   # strict on names: checked just above
    else:
        model.load_state_dict(ckpt.params)                 # strict: every parameter, no extra
    # AdamW's m, v and step counts from the checkpoint; its hyper-parameters from config.
    optimizer.load_state_dict(dict(ckpt.optimizer_state, betas=config.betas, eps=config.eps,
                                   weight_decay=config.weight_decay))
    batch_rng.bit_generator.state = batch_rng_state
    not_restored = set_rng_states(model, model_rng_states, rng_unsaved)
    if not_restored:
        warnings.warn(f"{where}: the states of {len(not_restored)} random generators (on the GPU, "
                      "with CuPy) were not saved or cannot be restored here; with dropout, the resumed "
                      "run draws other dropout masks and is not bit-identical to an uninterrupted one",
                      stacklevel=3)
    run.step = ckpt.step
    run.train_history, run.val_history = train_history, val_history
    run.checkpoint, run.checkpoint_step = ckpt.directory, ckpt.step


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------

def train(model: Module, train_batches: Callable[[np.random.Generator], Batch],
          val_batches: Optional[Callable[[], Iterable[Batch]]] = None,
          config: Optional[TrainConfig] = None, out_dir: Optional[str] = None,
          resume: bool = False, on_step: Optional[Callable[[StepInfo], Optional[bool]]] = None,
          base_reference: Optional[str] = None) -> TrainResult:
    """Train the parameters of ``model`` that have ``requires_grad``.

    train_batches: ``fn(rng) -> (x, y)``, int (B, T) inputs and targets (-100 = ignore),
        drawn from the NumPy generator it is given (seeded by ``config.seed``, saved in
        checkpoints). See :func:`text_batches`, :func:`example_batches`.
    val_batches: ``fn() -> iterable of (x, y)``, a fresh pass over the validation data
        (:func:`text_eval_batches`, :func:`example_eval_batches`); None: no evaluation.
    out_dir: where checkpoints go (None: nowhere). Without ``resume`` it must not hold a
        checkpoint already (so a finished run is never overwritten by accident).
    resume: continue from the latest checkpoint in ``out_dir``, bit-identically. Build
        the same model first (for LoRA: the same base, then the same ``add_lora``).
    on_step: ``fn(StepInfo)`` after every step; returning True stops the run (after a
        checkpoint, if there is an ``out_dir``, so it can be resumed).
    base_reference: for a LoRA run, what its base model is (e.g. a path), recorded in
        the checkpoints.

    A non-finite loss or gradient norm raises :class:`TrainingDiverged` before anything
    is updated or saved for that step. The model is left in train mode.
    """
    config = config if config is not None else TrainConfig()
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs the out_dir holding the checkpoint")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    names, params = [n for n, _ in named], [p for _, p in named]
    optimizer = AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                      weight_decay=config.weight_decay)
    batch_rng = np.random.default_rng(config.seed)
    lora = is_lora_model(model)
    fingerprint = _base_fingerprint(model, names) if lora else None
    device = _device(model)
    run = _Run()

    if resume:
        _restore(out_dir, run, model, optimizer, batch_rng, config, names, lora, fingerprint)
    elif out_dir is not None and io.latest_checkpoint(out_dir) is not None:
        raise FileExistsError(f"{out_dir} already holds a checkpoint ({io.latest_checkpoint(out_dir)}); "
                              "pass resume=True to continue it, or choose another out_dir")

    def save() -> str:
        return _save(out_dir, run, model, optimizer, batch_rng, config, names, lora, base_reference, fingerprint)

    def diverged(what: str, value: float, step: int) -> TrainingDiverged:
        if run.checkpoint is not None:
            last = f"the last good checkpoint is {run.checkpoint} (step {run.checkpoint_step})"
        elif out_dir is not None:
            last = f"no checkpoint had been written to {out_dir} yet"
        else:
            last = "no checkpoints were being written (out_dir=None)"
        return TrainingDiverged(
            f"training diverged at step {step}: the {what} is {value} (not finite); nothing was "
            f"updated or saved for this step, and {last}. Try a lower lr, a longer warm-up or "
            f"gradient clipping.", step, value, run.checkpoint, run.checkpoint_step)

    start = time.perf_counter()
    model.train()
    bar = tqdm(total=config.max_steps, initial=run.step, disable=not config.progress,
               desc="train", unit="step", dynamic_ncols=True)
    try:
        while run.step < config.max_steps:
            step = run.step + 1                  # the number of the update being made
            t0 = time.perf_counter()

            x, y = train_batches(batch_rng)      # (B, T), (B, T)
            if x.shape[0] != config.batch_size:
                raise ValueError(f"train_batches gave a batch of {x.shape[0]} rows; "
                                 f"TrainConfig.batch_size is {config.batch_size}")
            x, y = backend.to_device(x, device), backend.to_device(y, device)
            # dlogits is computed over the logits, which nothing needs afterwards:
            # (B, T, V) arrays are a small model's largest, and one is enough.
            loss, dlogits = cross_entropy(model.forward(x), y, overwrite_logits=True)  # float, (B, T, V)
            if not math.isfinite(loss):
                raise diverged("loss", loss, step)
            model.zero_grad()
            model.backward(dlogits)                            # fills p.grad
            if config.grad_clip is not None:
                grad_norm = clip_grad_norm(params, config.grad_clip)   # the norm before clipping
            else:
                grad_norm = global_grad_norm(p.grad for p in params if p.grad is not None)
            if not math.isfinite(grad_norm):
                raise diverged("gradient norm", grad_norm, step)
            lr = warmup_cosine_lr(step - 1, max_lr=config.lr, warmup_steps=config.warmup_steps,
                                  total_steps=config.max_steps, min_lr=config.min_lr)
            optimizer.lr = lr
            optimizer.step()
            run.step = step

            backend.synchronize(device)          # a GPU may still be running the step
            tokens_per_s = int(x.size) / max(time.perf_counter() - t0, 1e-9)
            run.train_history.append(StepRecord(step, loss, lr, tokens_per_s))
            val_loss = None
            if val_batches is not None and (step == config.max_steps or
                                            (config.eval_interval and step % config.eval_interval == 0)):
                batches = val_batches() if callable(val_batches) else val_batches
                val_loss = evaluate(model, batches, config.eval_batches)
                run.val_history.append(EvalRecord(step, val_loss))
            saved = None
            if out_dir is not None and (step == config.max_steps or
                                        (config.checkpoint_interval and step % config.checkpoint_interval == 0)):
                saved = save()

            bar.update(1)
            postfix = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
            if run.val_history:
                postfix["val"] = f"{run.val_history[-1].loss:.4f}"
            bar.set_postfix(postfix, refresh=False)

            if on_step is not None and on_step(StepInfo(step, loss, lr, grad_norm, tokens_per_s, val_loss, saved)):
                if out_dir is not None and saved is None:
                    save()
                break
    finally:
        bar.close()

    return TrainResult(run.step, run.train_history, run.val_history,
                       time.perf_counter() - start, run.checkpoint)
