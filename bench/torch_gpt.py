"""GPT-2 (+ LoRA) in idiomatic PyTorch eager: the benchmark's opponent and reference.

This is what someone would write with ``torch.nn`` to train the same model as minilora:
``nn.Embedding``, ``nn.LayerNorm``, ``nn.Linear``, tanh-GELU, causal attention through
``F.scaled_dot_product_attention`` (or, with ``attention="manual"``, the textbook
softmax(q k^T / sqrt(D) + mask) v), the head tied to the token embedding, and autograd
for the backward pass. It is written from the math, not from minilora's code; it never
imports tests/ (the test oracle there is a separate, float64, functional model).

Weights come from a minilora model (:meth:`TorchGPT.from_minilora`), so the benchmark
can check that both give the same loss and gradients before it times either.

    tokens (B, T) -> wte[tokens] + wpe[positions]
                  -> n_layer x Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
                  -> ln_f -> logits = x @ wte^T                               (B, T, V)

Key: B batch, T time, C n_embd, H n_head, D = C // H head size, V vocab_size, R rank.

Layout. minilora stores a linear weight (in, out) and computes ``x @ W + b``; PyTorch's
``nn.Linear`` stores (out, in). The conversion lives in :func:`_to_torch_layout` and
:meth:`TorchGPT.grads_in_minilora_layout` and nowhere else. LoRA factors have the same
layout on both sides (A (R, in), B (out, R), as in the paper and PEFT).

Parameter names are minilora's (``blocks.0.attn.q_proj.weight``), except that a LoRA
factor is ``<layer>.lora_A`` here and ``<layer>.lora_A.<adapter>`` in minilora (one
adapter only: the active one).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION_KINDS = ("sdpa", "manual")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus ``scaling * (x A^T) B^T`` (no dropout: the benchmark
    runs LoRA dropout 0, as the validation needs a deterministic forward)."""

    def __init__(self, base: nn.Linear, r: int, scaling: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.zeros(r, base.in_features, dtype=base.weight.dtype,
                                               device=base.weight.device))    # (R, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype,
                                               device=base.weight.device))    # (out, R)
        self.scaling = scaling

    def forward(self, x):
        # (..., in) -> (..., R) -> (..., out): never forms the (out, in) product B A
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


class CausalSelfAttention(nn.Module):
    def __init__(self, C: int, n_head: int, attention: str):
        super().__init__()
        self.n_head, self.attention = n_head, attention
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(C, C) for _ in range(4))

    def forward(self, x):
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)   # (B, T, C) -> (B, H, T, D)
        k = self.k_proj(x).view(B, T, H, D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H, D).transpose(1, 2)
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # (B, H, T, D)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))      # (B, H, T, T)
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            y = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))            # (B, H, T, D) -> (B, T, C)


class MLP(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))  # (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, C: int, n_head: int, eps: float, attention: str):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(C, eps=eps), nn.LayerNorm(C, eps=eps)
        self.attn, self.mlp = CausalSelfAttention(C, n_head, attention), MLP(C)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    """GPT-2 with the output head tied to the token embedding."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 eps: float = 1e-5, attention: str = "sdpa"):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        self.attention = attention
        self.token_embedding = nn.Embedding(vocab_size, n_embd)
        self.position_embedding = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, eps, attention) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, eps=eps)
        self.decay_names: set = set()   # which parameters AdamW decays (mirrors minilora)
        self.name_map: Dict[str, str] = {}  # minilora name -> own name (from_minilora fills it)

    def forward(self, idx):
        """idx (B, T) int64 -> logits (B, T, V)."""
        B, T = idx.shape
        positions = torch.arange(T, device=idx.device)
        x = self.token_embedding(idx) + self.position_embedding(positions)   # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.token_embedding.weight)           # (B, T, C) @ (C, V)

    # ---- building from a minilora model ------------------------------------------------

    @classmethod
    def from_minilora(cls, model, attention: str = "sdpa", device: str = "cpu") -> "TorchGPT":
        """A TorchGPT holding copies of ``model``'s weights, its active LoRA adapter (if
        any) and its ``requires_grad`` and weight-decay flags, in float32 or float64 as
        ``model`` is."""
        from minilora import backend
        from minilora.lora import lora_layers

        cfg = model.config
        if cfg.dropout:
            raise ValueError(f"TorchGPT has no dropout; the minilora model has dropout {cfg.dropout}")
        tm = cls(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                 eps=cfg.layer_norm_eps, attention=attention)
        dtype = torch.float64 if model.dtype == np.float64 else torch.float32
        tm = tm.to(dtype)
        adapters = {}
        for layer_name, layer in lora_layers(model):
            if layer.merged_adapters:
                raise ValueError(f"{layer_name}: merged adapters; copy the model before merging")
            running = list(layer.active_adapters)
            if len(running) > 1:
                raise ValueError(f"{layer_name}: TorchGPT supports one active adapter, got {running}")
            if running:
                name = running[0]
                if layer.lora_configs[name].dropout:
                    raise ValueError(f"{layer_name}: TorchGPT's LoRA has no dropout; adapter {name!r} has "
                                     f"dropout {layer.lora_configs[name].dropout}")
                adapters[layer_name] = (name, layer.lora_configs[name])
        for layer_name, (name, config) in adapters.items():
            parent_name, _, child = layer_name.rpartition(".")
            parent = tm.get_submodule(parent_name)
            setattr(parent, child, LoRALinear(getattr(parent, child), config.r, config.scaling).to(dtype))

        own = dict(tm.named_parameters())
        for ml_name, p in model.named_parameters():
            t_name = torch_name(ml_name, adapters)
            if t_name is None:
                continue  # an inactive adapter: not part of this model
            tm.name_map[ml_name] = t_name
            if t_name not in own:
                raise KeyError(f"minilora parameter {ml_name!r} has no PyTorch counterpart {t_name!r}")
            array = _to_torch_layout(t_name, backend.to_numpy(p.data))
            with torch.no_grad():
                if tuple(own[t_name].shape) != array.shape:
                    raise ValueError(f"{t_name}: shape {tuple(own[t_name].shape)} vs minilora {array.shape}")
                own[t_name].copy_(torch.from_numpy(np.ascontiguousarray(array)))
            own[t_name].requires_grad_(bool(p.requires_grad))
            if getattr(p, "decay", True):
                tm.decay_names.add(t_name)
        uncovered = sorted(set(own) - set(tm.name_map.values()))
        if uncovered:
            raise KeyError(f"PyTorch parameters with no minilora counterpart: {uncovered}")
        return tm.to(device)

    # ---- training helpers --------------------------------------------------------------

    def adamw(self, lr: float, betas, eps: float, weight_decay: float, **kwargs) -> torch.optim.AdamW:
        """AdamW over the trainable parameters, decaying exactly those minilora decays."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (decay if name in self.decay_names else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs)

    def grads_in_minilora_layout(self, minilora_names: Iterable[str]) -> Dict[str, Optional[np.ndarray]]:
        """``{minilora name: gradient as a NumPy array in minilora's layout, or None}``."""
        own = dict(self.named_parameters())
        out = {}
        for ml_name in minilora_names:
            t_name = self.name_map.get(ml_name)
            p = own.get(t_name)
            g = None if p is None or p.grad is None else p.grad.detach().cpu().numpy()
            out[ml_name] = None if g is None else _to_torch_layout(t_name, g)  # transposing is its own inverse
        return out

    def set_grads_from_minilora(self, grads: Dict[str, np.ndarray]) -> None:
        """Overwrite ``.grad`` with the given minilora-layout gradients (for checking the
        optimizer with identical inputs)."""
        own = dict(self.named_parameters())
        for ml_name, g in grads.items():
            t_name = self.name_map[ml_name]
            array = np.ascontiguousarray(_to_torch_layout(t_name, g))
            own[t_name].grad = torch.from_numpy(array).to(device=own[t_name].device, dtype=own[t_name].dtype)

    def params_in_minilora_layout(self) -> Dict[str, np.ndarray]:
        """``{minilora name: parameter as a NumPy array in minilora's layout}``."""
        own = dict(self.named_parameters())
        return {ml: _to_torch_layout(t, own[t].detach().cpu().numpy()) for ml, t in self.name_map.items()}


# --------------------------------------------------------------------------------------
# The one table of name and layout conversions
# --------------------------------------------------------------------------------------

_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def torch_name(ml_name: str, adapters) -> Optional[str]:
    """minilora name -> TorchGPT name.

    ``blocks.0.attn.q_proj.weight`` is the same on both sides, except in an adapted layer,
    where the frozen ``nn.Linear`` sits under ``.base``; ``<layer>.lora_A.<adapter>``
    becomes ``<layer>.lora_A``. ``adapters`` (layer -> (adapter name, config)) says which
    layers are adapted, and with which adapter. Returns None for an adapter that is not
    the active one.
    """
    parts = ml_name.split(".")
    if len(parts) >= 3 and parts[-2] in ("lora_A", "lora_B"):
        layer = ".".join(parts[:-2])
        if layer not in adapters or adapters[layer][0] != parts[-1]:
            return None
        return f"{layer}.{parts[-2]}"
    layer, _, leaf = ml_name.rpartition(".")
    if layer in adapters:
        return f"{layer}.base.{leaf}"
    return ml_name


def _to_torch_layout(t_name: str, array: np.ndarray) -> np.ndarray:
    """Transpose a linear layer's weight between (in, out) and (out, in); everything else
    (embeddings, LayerNorm, biases, LoRA factors) has the same layout on both sides."""
    parts = t_name.split(".")
    is_linear_weight = (parts[-1] == "weight"
                        and (parts[-2] in _LINEARS or (parts[-2] == "base" and parts[-3] in _LINEARS)))
    return array.T if is_linear_weight else array
