"""GPT-2 in plain PyTorch, differentiated by autograd: the test oracle for minilora.

This file is written from the math, not from minilora: it never imports the package.
The tests copy minilora's weights in, run both models, and compare logits, the loss
and every gradient in float64. Where the two agree to ~1e-12, minilora's hand-written
backward pass is right (or wrong in exactly the same way as PyTorch's autograd, which
we are willing to trust).

    tokens (B, T) -> wte[tokens] + wpe[positions]
                  -> n_layer x Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
                  -> ln_f -> logits = x @ wte^T                                (B, T, V)

LoRA. Given ``lora={layer name: (A, B, scaling)}``, each named linear layer also adds
``scaling * (x A^T) B^T`` (no dropout), written from the paper's formula; the LoRA tests
(tests/test_torch_oracle_lora.py) compare minilora's LoRALinear and LoRA-adapted GPT with it.

Key: B batch, T time, C n_embd, H n_head, D = C // H head size, V vocab_size.

Weight layout. minilora stores a linear weight (in, out) and computes ``x @ W + b``.
This reference uses PyTorch's own convention instead, ``nn.Linear``'s (out, in) with
``F.linear(x, W, b) = x @ W^T + b``, so that a transpose mix-up on either side shows up
as a mismatch rather than cancelling out. The conversion lives in one place:
:func:`to_torch_params` on the way in and :func:`grads_in_minilora_layout` on the way out.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

LINEAR_NAMES = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj")

# LoRA paths for the reference: a linear layer's dotted name ("blocks.0.attn.q_proj") ->
# one (A, B, scaling) triple, or a list of them (several adapters, summed). A is (R, in)
# and B is (out, R), PyTorch's and PEFT's layout (the same as minilora's, so LoRA factors
# are never transposed on the way in or out).
LoraTriple = Tuple[torch.Tensor, torch.Tensor, float]
LoraPaths = Mapping[str, Union[LoraTriple, Sequence[LoraTriple]]]


def is_linear_weight(name: str) -> bool:
    """True for the weights stored (in, out) by minilora and (out, in) by PyTorch."""
    return name.endswith(".weight") and any(f".{lin}." in f".{name}" for lin in LINEAR_NAMES)


def to_torch_params(named_arrays: Iterable[Tuple[str, np.ndarray]]) -> Dict[str, torch.Tensor]:
    """minilora's (name, array) pairs -> float64 leaf tensors that require grad.

    Linear weights are transposed from minilora's (in, out) to PyTorch's (out, in).
    The arrays are copied: nothing the reference does can touch the minilora model.
    """
    params = {}
    for name, array in named_arrays:
        t = torch.tensor(np.asarray(array), dtype=torch.float64)
        if is_linear_weight(name):
            t = t.T.contiguous()  # (in, out) -> (out, in)
        params[name] = t.requires_grad_(True)
    return params


def grads_in_minilora_layout(params: Mapping[str, torch.Tensor]) -> Dict[str, np.ndarray]:
    """Each parameter's autograd ``.grad`` as a NumPy array in minilora's layout."""
    grads = {}
    for name, t in params.items():
        if t.grad is None:
            continue
        g = t.grad.detach()
        grads[name] = (g.T if is_linear_weight(name) else g).numpy().copy()
    return grads


# --------------------------------------------------------------------------------------
# The layers, each one line of math
# --------------------------------------------------------------------------------------

def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                adapters: Sequence[LoraTriple] = ()) -> torch.Tensor:
    """A linear layer with low-rank updates beside it (Hu et al., 2021), no dropout:

        y = x W^T + b + sum_k s_k (x A_k^T) B_k^T      W (out, in), A_k (R_k, in), B_k (out, R_k)

    With no adapters this is exactly ``F.linear(x, weight, bias)``.
    """
    y = F.linear(x, weight, bias)
    for A, B, scaling in adapters:
        y = y + scaling * F.linear(F.linear(x, A), B)   # (..., in) -> (..., R) -> (..., out)
    return y


def _adapters_of(lora: Optional[LoraPaths], name: str) -> Sequence[LoraTriple]:
    """The (A, B, scaling) triples for layer ``name`` (none when it is not adapted)."""
    if not lora or name not in lora:
        return ()
    entry = lora[name]
    if len(entry) == 3 and isinstance(entry[0], torch.Tensor):
        return (entry,)  # one triple
    return tuple(entry)


def _linear(x: torch.Tensor, p: Mapping[str, torch.Tensor], name: str,
            lora: Optional[LoraPaths]) -> torch.Tensor:
    return lora_linear(x, p[f"{name}.weight"], p[f"{name}.bias"], _adapters_of(lora, name))


def lora_paths(params: Mapping[str, torch.Tensor], scalings: Mapping[str, float],
               adapter: str = "default") -> Dict[str, LoraTriple]:
    """Gather ``{layer: (A, B, scaling)}`` from tensors named as minilora names them,
    ``<layer>.lora_A.<adapter>`` (R, in) and ``<layer>.lora_B.<adapter>`` (out, R);
    ``scalings`` gives each adapted layer's scaling (and so which layers are adapted)."""
    return {layer: (params[f"{layer}.lora_A.{adapter}"], params[f"{layer}.lora_B.{adapter}"], float(s))
            for layer, s in scalings.items()}


def _check_lora_names(lora: Optional[LoraPaths], n_layer: int) -> None:
    """A misspelt layer name must be an error, not an adapter the reference ignores."""
    if not lora:
        return
    known = {f"blocks.{i}.{lin}" for i in range(n_layer) for lin in LINEAR_NAMES}
    unknown = sorted(set(lora) - known)
    if unknown:
        raise ValueError(f"lora names no linear layer of the model: {unknown}")

def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis; the *biased*
    variance (divide by C, not C - 1), as GPT-2 uses."""
    mean = x.mean(dim=-1, keepdim=True)                          # (..., 1)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)           # (..., 1)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def causal_self_attention(x: torch.Tensor, p: Mapping[str, torch.Tensor], prefix: str,
                          n_head: int, lora: Optional[LoraPaths] = None) -> torch.Tensor:
    """Multi-head attention where position t sees positions 0..t.   x (B, T, C) -> (B, T, C).

        y_h = softmax(q_h k_h^T / sqrt(D) + mask) v_h      for each head h
        out = concat_h(y_h) W_o^T + b_o

    ``lora`` (optional) adds low-rank paths to any of the four projections, by full name.
    """
    B, T, C = x.shape
    D = C // n_head

    def heads(t):  # (B, T, C) -> (B, H, T, D)
        return t.view(B, T, n_head, D).transpose(1, 2)

    q = heads(_linear(x, p, f"{prefix}.q_proj", lora))
    k = heads(_linear(x, p, f"{prefix}.k_proj", lora))
    v = heads(_linear(x, p, f"{prefix}.v_proj", lora))
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)                  # (B, H, T, T)
    may_see = torch.ones(T, T, dtype=torch.bool).tril()              # key j <= query t
    scores = scores.masked_fill(~may_see, float("-inf"))
    probs = torch.softmax(scores, dim=-1)                            # (B, H, T, T)
    y = (probs @ v).transpose(1, 2).reshape(B, T, C)                 # (B, H, T, D) -> (B, T, C)
    return _linear(y, p, f"{prefix}.o_proj", lora)


def mlp(x: torch.Tensor, p: Mapping[str, torch.Tensor], prefix: str,
        lora: Optional[LoraPaths] = None) -> torch.Tensor:
    """down_proj(gelu_tanh(up_proj(x))):  (B, T, C) -> (B, T, 4C) -> (B, T, C)."""
    h = gelu_tanh(_linear(x, p, f"{prefix}.up_proj", lora))
    return _linear(h, p, f"{prefix}.down_proj", lora)


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------

def gpt_forward(p: Mapping[str, torch.Tensor], idx, *, n_layer: int, n_head: int,
                eps: float = 1e-5, lora: Optional[LoraPaths] = None) -> torch.Tensor:
    """Token ids idx (B, T) -> logits (B, T, V); no dropout (the eval-mode model).

    ``p`` maps minilora's parameter names to tensors in PyTorch layout (see
    :func:`to_torch_params`). ``lora`` (optional) maps linear layers' dotted names to
    low-rank paths added beside them (see :func:`lora_linear`, :func:`lora_paths`).
    """
    _check_lora_names(lora, n_layer)
    idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
    B, T = idx.shape
    wte, wpe = p["token_embedding.weight"], p["position_embedding.weight"]  # (V, C), (block, C)
    x = wte[idx] + wpe[torch.arange(T)]                                     # (B, T, C)
    for i in range(n_layer):
        b = f"blocks.{i}"
        x = x + causal_self_attention(layer_norm(x, p[f"{b}.ln_1.weight"], p[f"{b}.ln_1.bias"], eps),
                                      p, f"{b}.attn", n_head, lora)
        x = x + mlp(layer_norm(x, p[f"{b}.ln_2.weight"], p[f"{b}.ln_2.bias"], eps), p, f"{b}.mlp", lora)
    x = layer_norm(x, p["ln_f.weight"], p["ln_f.bias"], eps)                # (B, T, C)
    return x @ wte.T                                                        # tied head: (B, T, V)


def gpt_loss(p: Mapping[str, torch.Tensor], idx, targets, *, n_layer: int, n_head: int,
             eps: float = 1e-5, ignore_index: int = -100,
             lora: Optional[LoraPaths] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits): mean cross-entropy over the targets not equal to ``ignore_index``."""
    logits = gpt_forward(p, idx, n_layer=n_layer, n_head=n_head, eps=eps, lora=lora)  # (B, T, V)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index)
    return loss, logits


@torch.no_grad()
def greedy_generate(p: Mapping[str, torch.Tensor], idx, max_new_tokens: int, *, n_layer: int,
                    n_head: int, eps: float = 1e-5) -> np.ndarray:
    """Append the argmax token ``max_new_tokens`` times, re-running the full forward
    each step (no cache). The sequence must stay within the position table."""
    tokens = np.asarray(idx, dtype=np.int64)
    for _ in range(max_new_tokens):
        logits = gpt_forward(p, tokens, n_layer=n_layer, n_head=n_head, eps=eps)  # (B, T, V)
        next_token = logits[:, -1, :].argmax(dim=-1).numpy()                       # (B,)
        tokens = np.concatenate([tokens, next_token[:, None]], axis=1)
    return tokens
