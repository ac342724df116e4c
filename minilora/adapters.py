"""Adapter files: a LoRA adapter on its own, a few KB to MB, in PEFT's layout.

    my_adapter/
      adapter_config.json          r, lora_alpha, target_modules, ... (PEFT's field names)
                                   + a "minilora" section: the base model's config and a
                                   fingerprint of its weights
      adapter_model.safetensors    base_model.model.<layer>.lora_A.weight   (R, I)
                                   base_model.model.<layer>.lora_B.weight   (O, R)
                                   base_model.model.<layer>.bias            (if bias trained)

An adapter only means something on the base it was trained on. ``load_adapter``
therefore refuses, with a clear error, a file made for another base: a different model
config, missing layers, wrong shapes, or base weights whose fingerprint differs (the
fingerprint is a SHA-256 over every base parameter the file does not carry, rounded to
float32 so a float64 copy of the same model matches).
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Optional

import numpy as np

from . import backend, io
from .lora import (ALL_LINEAR, LoraConfig, adapter_names, ensure_lora_layer, find_target_modules,
                   lora_layers, merged_state, set_adapter, _ADAPTER_NAME)
from .nn import Module

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
FORMAT_VERSION = 1
_PEFT_INIT = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa"}


def _bias_names(model: Module, config: LoraConfig, layers: List[str]) -> List[str]:
    """The bias parameters an adapter with ``config`` trains, hence carries in its file."""
    if config.bias == "all":
        return [n for n, _ in model.named_parameters() if n.endswith("bias") and ".lora_" not in n]
    if config.bias == "lora_only":
        return [f"{layer}.bias" for layer in layers if model.get_submodule(layer).bias is not None]
    return []


def base_fingerprint(model: Module, carried: List[str]) -> str:
    """SHA-256 over the model config and every non-LoRA parameter not in ``carried``."""
    if merged_state(model):
        raise RuntimeError("adapters are merged into the weights, so the base weights cannot be "
                           "fingerprinted; unmerge_lora(model) first")
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update(repr(sorted(config.to_dict().items())).encode() if config is not None else b"")
    for name, p in sorted(model.named_parameters()):
        if ".lora_A." in name or ".lora_B." in name or name in carried:
            continue
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(np.ascontiguousarray(backend.to_numpy(p.data).astype(np.float32)).tobytes())
    return h.hexdigest()


def save_adapter(model: Module, directory: str, adapter_name: str = "default",
                 base_reference: Optional[str] = None) -> Dict[str, str]:
    """Write one adapter's weights and config into ``directory`` (created if needed).

    ``base_reference`` (e.g. the base checkpoint's path) is recorded as PEFT's
    ``base_model_name_or_path``. Returns the paths written.
    """
    if adapter_name not in adapter_names(model):
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has {adapter_names(model)}")
    layers = [(name, layer) for name, layer in lora_layers(model) if adapter_name in layer.lora_configs]
    configs = [layer.lora_configs[adapter_name] for _, layer in layers]
    first = configs[0]
    layer_names = [name for name, _ in layers]
    tensors = {}
    for name, layer in layers:
        tensors[f"{PREFIX}{name}.lora_A.weight"] = getattr(layer.lora_A, adapter_name).data
        tensors[f"{PREFIX}{name}.lora_B.weight"] = getattr(layer.lora_B, adapter_name).data
    bias_names = _bias_names(model, first, layer_names)
    params = dict(model.named_parameters())
    for name in bias_names:
        tensors[f"{PREFIX}{name}"] = params[name].data
    rank_pattern = {n: c.r for n, c in zip(layer_names, configs) if c.r != first.r}
    alpha_pattern = {n: c.alpha for n, c in zip(layer_names, configs) if c.alpha != first.alpha}
    config_json = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout,
        "target_modules": first.target_modules if isinstance(first.target_modules, str) else list(first.target_modules),
        "bias": first.bias,
        "use_rslora": first.use_rslora,
        "init_lora_weights": _PEFT_INIT[first.init],
        "fan_in_fan_out": False,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": base_reference,
        "minilora": {
            "format_version": FORMAT_VERSION,
            "adapter_name": adapter_name,
            "adapted_modules": layer_names,
            "base_config": model.config.to_dict() if hasattr(model, "config") else None,
            "base_fingerprint": base_fingerprint(model, bias_names),
            "dtype": str(model.parameters()[0].data.dtype),
        },
    }
    os.makedirs(directory, exist_ok=True)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    config_path = os.path.join(directory, CONFIG_FILE)
    io.write_safetensors(weights_path, tensors, metadata={"format": "pt", "producer": "minilora"})
    io.write_json(config_path, config_json)  # written last: a directory with a config is complete
    return {"config": config_path, "weights": weights_path}


def read_adapter_config(directory: str) -> dict:
    """Read and validate ``adapter_config.json``; a clear ValueError when it is not ours."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no adapter directory at {directory}")
    cfg = io.read_json(path)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: not a LoRA adapter (peft_type is {cfg.get('peft_type')!r})")
    info = cfg.get("minilora")
    if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a minilora adapter of format version {FORMAT_VERSION}")
    for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias"):
        if key not in cfg:
            raise ValueError(f"{path}: missing field {key!r}")
    return cfg


def lora_config_from_json(cfg: dict) -> LoraConfig:
    init = {True: "kaiming", "gaussian": "gaussian", "pissa": "pissa"}.get(cfg.get("init_lora_weights", True), "kaiming")
    targets = cfg["target_modules"]
    return LoraConfig(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg["lora_dropout"]),
                      target_modules=targets if isinstance(targets, str) else tuple(targets),
                      bias=cfg["bias"], use_rslora=bool(cfg.get("use_rslora", False)), init=init)


def load_adapter(model: Module, directory: str, adapter_name: Optional[str] = None,
                 check_base_weights: bool = True) -> str:
    """Add the adapter stored in ``directory`` to ``model`` and make it the active one.

    Everything is checked before the model is touched: the base config, every adapted
    layer's existence and shape, the exact set of tensors, and (unless
    ``check_base_weights=False``) the fingerprint of the base weights. Returns the
    adapter's name (``adapter_name``, or the name it was saved under).
    """
    cfg = read_adapter_config(directory)
    info = cfg["minilora"]
    name = adapter_name or info.get("adapter_name") or "default"
    if not _ADAPTER_NAME.match(name):
        raise ValueError(f"adapter name {name!r} must be an identifier")
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}")
    config = lora_config_from_json(cfg)

    # 1. the base model's architecture
    own = model.config.to_dict() if hasattr(model, "config") else None
    saved = info.get("base_config")
    if own != saved:
        diffs = {k: (saved.get(k) if saved else None, own.get(k) if own else None)
                 for k in set(saved or {}) | set(own or {})
                 if (saved or {}).get(k) != (own or {}).get(k)}
        raise ValueError(f"adapter in {directory} was made for a different base model: config differs "
                         f"(adapter's vs this model's): {diffs}")

    # 2. the layers and tensors
    tensors = io.read_safetensors(os.path.join(directory, WEIGHTS_FILE))
    layer_names = info.get("adapted_modules") or []
    linear_names = set(find_target_modules(model, ALL_LINEAR))
    missing_layers = [n for n in layer_names if n not in linear_names]
    if missing_layers:
        raise ValueError(f"adapter in {directory} was made for a different base model: it adapts "
                         f"layers {missing_layers} that this model does not have as linear layers")
    bias_names = _bias_names(model, config, layer_names)
    expected = {f"{PREFIX}{n}.lora_{ab}.weight" for n in layer_names for ab in "AB"}
    expected |= {f"{PREFIX}{b}" for b in bias_names}
    if set(tensors) != expected:
        raise ValueError(f"{os.path.join(directory, WEIGHTS_FILE)} does not match its config: "
                         f"missing {sorted(expected - set(tensors))}, unexpected {sorted(set(tensors) - expected)}")
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    params = dict(model.named_parameters())
    per_layer = {}
    for n in layer_names:
        layer = model.get_submodule(n)
        r = int(rank_pattern.get(n, config.r))
        A, B = tensors[f"{PREFIX}{n}.lora_A.weight"], tensors[f"{PREFIX}{n}.lora_B.weight"]
        if A.shape != (r, layer.in_features) or B.shape != (layer.out_features, r):
            raise ValueError(f"adapter in {directory} was made for a different base model: layer {n!r} "
                             f"is {layer.in_features}x{layer.out_features} here, but the adapter has "
                             f"lora_A {A.shape} and lora_B {B.shape} (rank {r})")
        per_layer[n] = LoraConfig(r=r, alpha=float(alpha_pattern.get(n, config.alpha)), dropout=config.dropout,
                                  target_modules=config.target_modules, bias=config.bias,
                                  use_rslora=config.use_rslora, init=config.init)
    for b in bias_names:
        if tuple(tensors[f"{PREFIX}{b}"].shape) != tuple(params[b].shape):
            raise ValueError(f"adapter in {directory}: bias {b!r} has shape {tensors[f'{PREFIX}{b}'].shape}, "
                             f"the model's is {params[b].shape}")

    # 3. the base weights themselves
    if check_base_weights:
        fingerprint = base_fingerprint(model, bias_names)
        if fingerprint != info.get("base_fingerprint"):
            raise ValueError(f"adapter in {directory} was made for a different base model: the base "
                             "weights' fingerprint differs (same architecture, other weights). Pass "
                             "check_base_weights=False to load it anyway.")

    # 4. only now change the model
    device = backend.device_of(model.parameters()[0].data)
    for i, n in enumerate(layer_names):
        ensure_lora_layer(model, n).attach(name, per_layer[n], tensors[f"{PREFIX}{n}.lora_A.weight"],
                                           tensors[f"{PREFIX}{n}.lora_B.weight"], dropout_seed=i)
    for b in bias_names:
        params[b].data = backend.to_device(tensors[f"{PREFIX}{b}"].astype(params[b].data.dtype), device)
    set_adapter(model, name)
    return name
