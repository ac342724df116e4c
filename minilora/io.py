"""Files: safetensors weights and JSON configs, written atomically, read with clear errors.

Every write goes to a temporary file in the same folder and is then renamed over the
target (``os.replace`` is atomic on POSIX and Windows): a crash mid-write leaves the old
file intact, never a half-written one. Every read turns a library's low-level complaint
(a truncated header, bad JSON) into a ``ValueError`` that names the file.

File formats come from libraries, not from here: weights are safetensors (a JSON header
plus raw little-endian arrays), configs are JSON.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable, Dict, NamedTuple, Optional

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load as _st_load_bytes
from safetensors.numpy import save as _st_save_bytes

from . import backend
from .validation import check_integer


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, then rename the temporary file onto ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(path: str, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def write_json(path: str, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def read_json(path: str) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (corrupt or truncated?): {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return obj


def write_safetensors(path: str, tensors: Dict[str, object], metadata: Optional[Dict[str, str]] = None) -> None:
    """Save name -> array (NumPy or CuPy; copied to the host) as a safetensors file."""
    host = {name: np.ascontiguousarray(backend.to_numpy(a)) for name, a in tensors.items()}
    write_bytes(path, _st_save_bytes(host, metadata=metadata))


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Load a safetensors file into NumPy arrays; a truncated or corrupt file is a
    ``ValueError`` naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return dict(_st_load_bytes(data))
    except (SafetensorError, ValueError, OverflowError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None


def read_safetensors_metadata(path: str) -> Dict[str, str]:
    """The free-form string metadata stored in a safetensors header."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(path, framework="np") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, ValueError, OverflowError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None


# ======================================================================================
# Models and training checkpoints
# ======================================================================================
#
# A saved model is a directory:
#
#     config.json          {"format": "minilora", "format_version": 1,
#                           "model": GPTConfig.to_dict(), "dtype": "float32", "seed": 0, ...}
#     model.safetensors    every parameter by its dotted name (blocks.0.attn.q_proj.weight)
#
# A training run writes checkpoints into its output directory, one folder per step,
# and a pointer to the newest complete one:
#
#     out_dir/
#       latest.json                {"checkpoint": "step-00000200", "step": 200}
#       step-00000200/
#         config.json              as above, plus "weights" (which file holds them),
#                                  "lora" and "base" (for a LoRA run: what to load it on)
#         model.safetensors        all parameters (full training), or instead
#         trainable.safetensors    only the trainable ones (LoRA: the adapters)
#         optimizer.safetensors    the optimizer's arrays: "state.<i>.m", "state.<i>.v"
#         trainer_state.json       step, optimizer hyper-parameters and step counts,
#                                  random-generator states, loss history, ...
#         adapter_config.json,     (LoRA runs) the adapter in PEFT's layout, so the
#         adapter_model.safetensors  checkpoint can be loaded with load_adapter as is
#
# How a save stays all-or-nothing: every file of a checkpoint is written into a
# temporary folder ``out_dir/.tmp-step-...``; the folder is renamed to ``step-<n>``
# only when it is complete, and only then is ``latest.json`` replaced (itself
# atomically: a temporary file, then a rename). ``latest.json`` is the commit point: at
# every instant it names a complete checkpoint, so a crash at any moment of a save
# leaves the previous checkpoint in place and in use. Older step folders are deleted
# after the pointer has moved (``keep`` of them stay). Leftovers of a crashed save (a
# temporary folder, or a step folder the pointer never reached) are removed by the next
# save. One writer per output directory is assumed.

FORMAT = "minilora"
FORMAT_VERSION = 1
MODEL_CONFIG_FILE = "config.json"
MODEL_WEIGHTS_FILE = "model.safetensors"
TRAINABLE_WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest.json"
_STEP_DIR_PREFIX = "step-"
_TMP_DIR_PREFIX = ".tmp-step-"


def model_config_dict(model) -> dict:
    """What ``config.json`` says about a GPT: its config, dtype and seed."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(f"cannot describe a {type(model).__name__}: it has no .config with to_dict()")
    first = next(iter(model.parameters()))
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict(),
            "dtype": np.dtype(first.data.dtype.name).name, "seed": int(getattr(model, "seed", 0))}


def save_model(model, directory: str) -> Dict[str, str]:
    """Save a GPT as ``directory/model.safetensors`` + ``directory/config.json``.

    A model with LoRA adapters is saved whole: every weight (adapters included) and, in
    the config, the adapters' layout -- which layers, which configs, which adapters are
    active and which are *merged* into their weights -- so :func:`load_model` rebuilds
    exactly this model. (To save only an adapter, use ``save_adapter``.)

    Each file is replaced atomically; the weights are written first and the config last,
    so a directory with a config has its weights. Returns the paths written.
    """
    from .lora import is_lora_model, lora_layout

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    config = model_config_dict(model)
    config["weights"] = MODEL_WEIGHTS_FILE
    if is_lora_model(model):
        config["lora_layout"] = lora_layout(model)
    weights_path = os.path.join(directory, MODEL_WEIGHTS_FILE)
    config_path = os.path.join(directory, MODEL_CONFIG_FILE)
    write_safetensors(weights_path, model.state_dict(), metadata={"format": "np", "producer": FORMAT})
    write_json(config_path, config)
    return {"config": config_path, "weights": weights_path}


def read_model_config(directory: str) -> dict:
    """Read ``config.json`` of a model or checkpoint directory (following ``latest.json``)."""
    directory = resolve_checkpoint(directory)
    path = os.path.join(directory, MODEL_CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: a minilora model directory holds "
                                f"{MODEL_CONFIG_FILE} and {MODEL_WEIGHTS_FILE}")
    config = read_json(path)
    if not isinstance(config.get("model"), dict):
        raise ValueError(f"{path}: not a minilora model config (no 'model' object)")
    return config


def load_model(directory: str, device: str = "cpu", dtype=None):
    """Load a GPT saved by :func:`save_model`, or the model of a training checkpoint
    (``directory`` may be a run's output directory: its ``latest.json`` is followed).

    ``dtype`` (default: the saved one) converts the weights on loading. A missing file is
    a ``FileNotFoundError``; a corrupt one, or weights that do not fit the config, a
    ``ValueError`` naming the file.
    """
    from .gpt import GPT, GPTConfig  # imported here: io is imported by modules gpt does not know

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no model directory at {directory}")
    directory = resolve_checkpoint(directory)
    config_path = os.path.join(directory, MODEL_CONFIG_FILE)
    saved = read_model_config(directory)
    weights_name = saved.get("weights", MODEL_WEIGHTS_FILE)
    if weights_name != MODEL_WEIGHTS_FILE:
        raise ValueError(f"{directory} holds only the trainable weights of a LoRA run "
                         f"({weights_name}), not a whole model: load its base model "
                         f"({saved.get('base')!r}), then minilora.adapters.load_adapter(model, "
                         f"{directory!r})")
    try:
        config = GPTConfig.from_dict(saved["model"])
        saved_dtype = backend.resolve_dtype(saved.get("dtype", "float32"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: invalid model config: {e}") from None
    dtype = backend.resolve_dtype(dtype) if dtype is not None else saved_dtype
    weights_path = os.path.join(directory, MODEL_WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{weights_path} is missing: {config_path} has no weights beside it")
    weights = read_safetensors(weights_path)
    model = GPT(config, seed=int(saved.get("seed", 0)), dtype=dtype)
    try:
        if saved.get("lora_layout"):
            from .lora import rebuild_lora_layout
            rebuild_lora_layout(model, saved["lora_layout"])
        model.load_state_dict(weights)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{weights_path} does not fit the model in {config_path}: {e}") from None
    if device != "cpu":
        model.to(device)
    return model


# --------------------------------------------------------------------------------------
# Optimizer state <-> (safetensors arrays, JSON scalars)
# --------------------------------------------------------------------------------------

def flatten_optimizer_state(state_dict: dict):
    """Split ``Optimizer.state_dict()`` into arrays for safetensors and the rest for JSON.

    ``{"optimizer", "num_params", <hyper>, "state": {i: {"step": 3, "m": arr, "v": arr}}}``
    becomes ``({"state.<i>.m": arr, "state.<i>.v": arr}, {..., "state": {"<i>": {"step": 3}}})``.
    """
    tensors: Dict[str, np.ndarray] = {}
    scalars: Dict[str, dict] = {}
    for i, entry in state_dict["state"].items():
        scalars[str(int(i))] = {}
        for name, value in entry.items():
            if isinstance(value, np.ndarray):
                tensors[f"state.{int(i)}.{name}"] = value
            else:
                scalars[str(int(i))][name] = value
    meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in state_dict.items() if k != "state"}
    meta["state"] = scalars
    return tensors, meta


def unflatten_optimizer_state(tensors: Dict[str, np.ndarray], meta: dict, where: str = "optimizer state") -> dict:
    """The inverse of :func:`flatten_optimizer_state` (integer parameter indices restored)."""
    if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
        raise ValueError(f"{where}: no 'state' object")
    try:
        state = {int(i): dict(entry) for i, entry in meta["state"].items()}
    except (TypeError, ValueError):
        raise ValueError(f"{where}: parameter indices must be integers, got {sorted(meta['state'])}") from None
    for key, array in tensors.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) not in state:
            raise ValueError(f"{where}: unexpected array {key!r} (expected 'state.<i>.<name>' for a "
                             f"parameter index listed in the JSON state)")
        state[int(parts[1])][parts[2]] = array
    out = dict(meta)
    out["state"] = state
    return out


# --------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------

class TrainingCheckpoint(NamedTuple):
    """One training checkpoint, read back (arrays are NumPy)."""
    directory: str                  # the step folder it was read from
    step: int                       # optimizer updates done when it was saved
    config: dict                    # config.json
    params: Dict[str, np.ndarray]   # name -> array: all parameters, or the trainable ones
    trainable_only: bool            # True for a LoRA run (params holds the trainable ones)
    optimizer_state: dict           # ready for Optimizer.load_state_dict
    trainer_state: dict             # trainer_state.json (with the optimizer scalars removed)


def _step_dir_name(step: int) -> str:
    return f"{_STEP_DIR_PREFIX}{int(step):08d}"


def _fsync_dir(directory: str) -> None:
    """Make a rename inside ``directory`` durable (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def resolve_checkpoint(directory: str) -> str:
    """The folder that holds the files: ``directory`` itself, or, for a training run's
    output directory, the step folder its ``latest.json`` names."""
    directory = os.fspath(directory)
    pointer = os.path.join(directory, LATEST_FILE)
    if not os.path.isfile(pointer):
        return directory
    latest = read_json(pointer)
    name = latest.get("checkpoint")
    if not isinstance(name, str) or not name.startswith(_STEP_DIR_PREFIX) or os.sep in name or "/" in name:
        raise ValueError(f"{pointer}: 'checkpoint' must name a step folder, got {name!r}")
    path = os.path.join(directory, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{pointer} names {name}, but {path} does not exist")
    return path


def latest_checkpoint(out_dir: str) -> Optional[str]:
    """The newest complete checkpoint folder of a training run, or None if there is none."""
    out_dir = os.fspath(out_dir)
    if not os.path.isfile(os.path.join(out_dir, LATEST_FILE)):
        return None
    return resolve_checkpoint(out_dir)


def _step_dirs(out_dir: str) -> Dict[int, str]:
    """step -> folder name, for every ``step-<n>`` folder in ``out_dir``."""
    found = {}
    for entry in os.listdir(out_dir):
        rest = entry[len(_STEP_DIR_PREFIX):]
        if entry.startswith(_STEP_DIR_PREFIX) and rest.isdigit() and os.path.isdir(os.path.join(out_dir, entry)):
            found[int(rest)] = entry
    return found


def save_checkpoint(out_dir: str, step: int, model, optimizer, trainer_state: dict, *,
                    trainable_only: bool = False, config_extra: Optional[dict] = None,
                    write_extra: Optional[Callable[[str], None]] = None, keep: int = 1) -> str:
    """Write a training checkpoint for ``step`` and make it the latest; return its folder.

    trainable_only: save only the parameters with ``requires_grad`` (a LoRA run), in
        ``trainable.safetensors``; otherwise all of them, in ``model.safetensors``.
    trainer_state: JSON-ready dict saved as ``trainer_state.json`` (``step`` and the
        optimizer's scalars are added here).
    config_extra: more entries for ``config.json`` (e.g. ``{"lora": True, "base": ...}``).
    write_extra: ``write_extra(folder)`` writes further files into the checkpoint before
        it is committed (e.g. the adapter files).
    keep: how many checkpoints (this one included) to keep; older ones are deleted.

    All-or-nothing: see the comment at the top of this section.
    """
    out_dir = os.fspath(out_dir)
    step = int(step)
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    os.makedirs(out_dir, exist_ok=True)
    name = _step_dir_name(step)
    final = os.path.join(out_dir, name)
    current = latest_checkpoint(out_dir)
    if current is not None and os.path.basename(current) == name:
        raise ValueError(f"{final} is already the latest checkpoint; a step is saved only once")
    for entry in os.listdir(out_dir):  # leftovers of saves that crashed
        if entry.startswith(_TMP_DIR_PREFIX):
            shutil.rmtree(os.path.join(out_dir, entry), ignore_errors=True)

    tmp = tempfile.mkdtemp(prefix=f"{_TMP_DIR_PREFIX}{step:08d}-", dir=out_dir)
    try:
        if trainable_only:
            params = {n: p.data for n, p in model.named_parameters() if p.requires_grad}
            weights_file = TRAINABLE_WEIGHTS_FILE
        else:
            params = model.state_dict()
            weights_file = MODEL_WEIGHTS_FILE
        write_safetensors(os.path.join(tmp, weights_file), params, metadata={"format": "np", "producer": FORMAT})
        opt_tensors, opt_scalars = flatten_optimizer_state(optimizer.state_dict())
        write_safetensors(os.path.join(tmp, OPTIMIZER_FILE), opt_tensors)
        write_json(os.path.join(tmp, TRAINER_STATE_FILE), dict(trainer_state, step=step, optimizer=opt_scalars))
        if write_extra is not None:
            write_extra(tmp)
        config = model_config_dict(model)
        config.update(config_extra or {})
        config["weights"] = weights_file
        write_json(os.path.join(tmp, MODEL_CONFIG_FILE), config)
        if os.path.exists(final):  # a complete save the pointer never reached: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The commit point: from here on, this checkpoint is the one a resume finds.
    write_json(os.path.join(out_dir, LATEST_FILE), {"checkpoint": name, "step": step})
    _fsync_dir(out_dir)

    # Prune: keep the newest `keep` checkpoints up to this step; anything after it
    # belongs to an abandoned run (saved, then resumed from an earlier checkpoint).
    older = sorted((s for s in _step_dirs(out_dir) if s <= step), reverse=True)
    doomed = older[keep:] + [s for s in _step_dirs(out_dir) if s > step]
    for s in doomed:
        shutil.rmtree(os.path.join(out_dir, _step_dir_name(s)), ignore_errors=True)
    return final


def load_checkpoint(path: str) -> TrainingCheckpoint:
    """Read a training checkpoint: a step folder, or a run's output directory (its
    ``latest.json`` is followed). Missing files raise ``FileNotFoundError``, corrupt ones
    ``ValueError`` naming the file."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    directory = resolve_checkpoint(path)
    config = read_model_config(directory)
    state_path = os.path.join(directory, TRAINER_STATE_FILE)
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"{state_path} is missing: {directory} is a saved model, not a "
                                "training checkpoint")
    trainer_state = read_json(state_path)
    step = trainer_state.get("step")
    step = check_integer(f"{state_path}: 'step'", step, minimum=0)
    weights_file = config.get("weights", MODEL_WEIGHTS_FILE)
    if weights_file not in (MODEL_WEIGHTS_FILE, TRAINABLE_WEIGHTS_FILE):
        raise ValueError(f"{os.path.join(directory, MODEL_CONFIG_FILE)}: unknown weights file {weights_file!r}")
    params = read_safetensors(os.path.join(directory, weights_file))
    opt_path = os.path.join(directory, OPTIMIZER_FILE)
    opt_tensors = read_safetensors(opt_path)
    trainer_state = dict(trainer_state)
    opt_meta = trainer_state.pop("optimizer", None)
    optimizer_state = unflatten_optimizer_state(opt_tensors, opt_meta, where=f"{opt_path} + {state_path}")
    return TrainingCheckpoint(directory, step, config, params, weights_file == TRAINABLE_WEIGHTS_FILE,
                              optimizer_state, trainer_state)
