"""GPT-2, with a hand-written backward pass.

    tokens (B, T) -> token_embedding + position_embedding -> dropout
                  -> n_layer x Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
                  -> ln_f -> logits = x @ token_embedding.weight^T        (B, T, V)

Exactly GPT-2 (pre-LayerNorm blocks with eps 1e-5, tanh-GELU, a 4x MLP, the output head
tied to the token embedding, GPT-2's initialisation), so that real GPT-2 weights fit.
The attention projections are separate ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``
and the MLP's are ``up_proj``, ``down_proj``: the names LoRA's ``target_modules`` use.

Key: B batch, T time, C n_embd, H n_head, D = C // H, V vocab_size, L n_layer.

Backward runs the forward in reverse. A residual connection ``x + f(x)`` sends its
upstream gradient down both branches and adds what comes back: ``dx = dy + df(dy)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import backend
from .nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleList, _keep, _take_cache, no_grad
from .ops.attention import attention_backward, attention_forward
from .ops.cross_entropy import cross_entropy_backward, cross_entropy_forward
from .ops.gelu import gelu_backward, gelu_forward
from .ops.linear import linear_backward, linear_forward
from .validation import check_integer


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT-2 model. GPT-2 small is (50257, 1024, 12, 12, 768)."""
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_integer(f"GPTConfig.{name}", getattr(self, name), minimum=1)
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be positive, got {self.layer_norm_eps}")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"GPTConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


class KVCache:
    """Keys and values of the positions seen so far, per layer, for generation.

    ``keys[l]`` and ``values[l]`` are (B, block_size, C) buffers; positions
    ``0 .. length-1`` are filled. A forward with a cache computes only the new positions'
    queries, keys and values and attends over everything filled so far -- each new token
    costs one position's work instead of a re-run of the whole sequence.
    """

    def __init__(self, config: GPTConfig, batch_size: int, xp, dtype):
        shape = (batch_size, config.block_size, config.n_embd)
        self.keys = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0
        self.capacity = config.block_size

    def append(self, layer: int, k, v):
        """Store the new positions' k, v (B, Tn, C); return all keys/values so far."""
        start, end = self.length, self.length + k.shape[1]
        self.keys[layer][:, start:end] = k
        self.values[layer][:, start:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]  # (B, end, C)


class CausalSelfAttention(Module):
    """q, k, v projections -> causal multi-head attention -> output projection."""

    def __init__(self, config: GPTConfig, rng: np.random.Generator, dtype, dropout_seed: int):
        super().__init__()
        C = config.n_embd
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2: scale residual projections
        self.n_head = config.n_head
        self.q_proj = Linear(C, C, rng=rng, dtype=dtype)
        self.k_proj = Linear(C, C, rng=rng, dtype=dtype)
        self.v_proj = Linear(C, C, rng=rng, dtype=dtype)
        self.o_proj = Linear(C, C, rng=rng, std=residual_std, dtype=dtype)
        self.dropout_p = config.dropout
        self.attn_dropout_rng = backend.default_rng(dropout_seed, "cpu")
        self._dropout_seed = dropout_seed
        self.resid_dropout = Dropout(config.dropout, seed=dropout_seed + 1)

    def _on_device(self, device: str) -> None:
        self.attn_dropout_rng = backend.default_rng(self._dropout_seed, device)

    def forward(self, x, kv_cache: Optional[KVCache] = None, layer: int = 0):
        q = self.q_proj.forward(x)  # (B, T, C)
        k = self.k_proj.forward(x)  # (B, T, C)
        v = self.v_proj.forward(x)  # (B, T, C)
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)  # (B, T_past + T, C)
        p = self.dropout_p if self.training else 0.0
        y, cache = attention_forward(q, k, v, self.n_head, p, self.attn_dropout_rng)  # (B, T, C)
        _keep(self, cache)
        return self.resid_dropout.forward(self.o_proj.forward(y))

    def backward(self, dy):
        dy = self.o_proj.backward(self.resid_dropout.backward(dy))
        dq, dk, dv = attention_backward(dy, _take_cache(self))
        return self.q_proj.backward(dq) + self.k_proj.backward(dk) + self.v_proj.backward(dv)


class MLP(Module):
    """up_proj (C -> 4C) -> GELU -> down_proj (4C -> C) -> dropout."""

    def __init__(self, config: GPTConfig, rng: np.random.Generator, dtype, dropout_seed: int):
        super().__init__()
        C = config.n_embd
        self.up_proj = Linear(C, 4 * C, rng=rng, dtype=dtype)
        self.down_proj = Linear(4 * C, C, rng=rng, std=0.02 / math.sqrt(2 * config.n_layer), dtype=dtype)
        self.dropout = Dropout(config.dropout, seed=dropout_seed)

    def forward(self, x):
        h, cache = gelu_forward(self.up_proj.forward(x))  # (B, T, 4C)
        _keep(self, cache)
        return self.dropout.forward(self.down_proj.forward(h))  # (B, T, C)

    def backward(self, dy):
        dh = self.down_proj.backward(self.dropout.backward(dy))  # (B, T, 4C), a new array
        dh = gelu_backward(dh, _take_cache(self), out=dh)        # over dh: the step's peak
        return self.up_proj.backward(dh)                         # (B, T, C)


class Block(Module):
    """x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))   (pre-LayerNorm, as GPT-2)."""

    def __init__(self, config: GPTConfig, rng: np.random.Generator, dtype, dropout_seed: int):
        super().__init__()
        C, eps = config.n_embd, config.layer_norm_eps
        self.ln_1 = LayerNorm(C, eps=eps, dtype=dtype)
        self.attn = CausalSelfAttention(config, rng, dtype, dropout_seed)
        self.ln_2 = LayerNorm(C, eps=eps, dtype=dtype)
        self.mlp = MLP(config, rng, dtype, dropout_seed + 2)

    def forward(self, x, kv_cache: Optional[KVCache] = None, layer: int = 0):
        x = x + self.attn.forward(self.ln_1.forward(x), kv_cache, layer)
        return x + self.mlp.forward(self.ln_2.forward(x))

    def backward(self, dy):
        # x2 = x1 + mlp(ln_2(x1))  ->  dx1 = dy + ln_2'(mlp'(dy))
        dx = dy + self.ln_2.backward(self.mlp.backward(dy))
        # x1 = x + attn(ln_1(x))   ->  dx = dx1 + ln_1'(attn'(dx1))
        return dx + self.ln_1.backward(self.attn.backward(dx))


class GPT(Module):
    """GPT-2. ``GPT(config, seed=0, dtype="float32")``; ``.to("cuda")`` moves it.

    Parameters are drawn from NumPy's ``Generator(seed)`` on the CPU in a fixed order, so
    a seed names one model on every backend.
    """

    def __init__(self, config: GPTConfig, seed: int = 0, dtype="float32"):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise ValueError(f"GPT needs a GPTConfig, got {type(config).__name__}")
        dtype = backend.resolve_dtype(dtype)
        rng = np.random.default_rng(seed)
        self.config = config
        self.seed = seed
        self.token_embedding = Embedding(config.vocab_size, config.n_embd, rng=rng, dtype=dtype)
        self.position_embedding = Embedding(config.block_size, config.n_embd, rng=rng, dtype=dtype)
        dropout_seeds = np.random.SeedSequence(seed).generate_state(config.n_layer + 1)
        self.embedding_dropout = Dropout(config.dropout, seed=int(dropout_seeds[0]))
        self.blocks = ModuleList(Block(config, rng, dtype, int(dropout_seeds[i + 1]))
                                 for i in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, eps=config.layer_norm_eps, dtype=dtype)
        # The output head is tied: logits = x @ token_embedding.weight^T. No extra weight.

    # ---- properties -------------------------------------------------------------------

    @property
    def device(self) -> str:
        return backend.device_of(self.token_embedding.weight.data)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.token_embedding.weight.data.dtype.name)

    # ---- forward / backward ------------------------------------------------------------

    def _check_tokens(self, idx, past_length: int = 0):
        """Validate and move token ids to the model's device: int (B, T), 1 <= T."""
        xp = backend.get_array_module(self.token_embedding.weight.data)
        idx = backend.to_device(idx, self.device) if backend.get_array_module(idx) is not xp else idx
        if idx.ndim != 2:
            raise ValueError(f"GPT expects token ids of shape (B, T), got shape {idx.shape}")
        if not xp.issubdtype(idx.dtype, xp.integer):
            raise ValueError(f"GPT expects integer token ids, got dtype {idx.dtype}")
        B, T = idx.shape
        if T == 0 or B == 0:
            raise ValueError(f"GPT got an empty batch of shape {idx.shape}")
        if past_length + T > self.config.block_size:
            raise ValueError(f"sequence of length {past_length + T} is longer than block_size "
                             f"{self.config.block_size}")
        return idx  # ids outside [0, V) are refused by the embedding lookup itself

    def forward(self, idx, kv_cache: Optional[KVCache] = None):
        """idx (B, T) integer token ids -> logits (B, T, V).

        With ``kv_cache``, ``idx`` holds only the *new* tokens, which sit at positions
        ``kv_cache.length ..``; the cache is extended by them.
        """
        past = kv_cache.length if kv_cache is not None else 0
        idx = self._check_tokens(idx, past)
        xp = backend.get_array_module(idx)
        B, T = idx.shape
        positions = xp.arange(past, past + T)                       # (T,)
        x = self.token_embedding.forward(idx) + self.position_embedding.forward(positions)  # (B, T, C)
        x = self.embedding_dropout.forward(x)
        for layer, block in enumerate(self.blocks):
            x = block.forward(x, kv_cache, layer)                   # (B, T, C)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.ln_f.forward(x)                                    # (B, T, C)
        logits, cache = linear_forward(x, self.token_embedding.weight.data.T,   # (B, T, C) @ (C, V)
                                       keep_input=self.token_embedding.weight.requires_grad)
        _keep(self, cache)
        return logits

    def backward(self, dlogits) -> None:
        """Fill ``.grad`` of every trainable parameter from dlogits (B, T, V).

        dlogits must have the shape of the last forward's logits. Another float dtype is
        cast to the model's (as PyTorch's autograd casts a gradient to its tensor's), so
        every op below sees one dtype.
        """
        wte = self.token_embedding.weight
        cache = _take_cache(self)
        expected = tuple(cache.x_shape[:-1]) + (wte.shape[0],)
        if tuple(dlogits.shape) != expected:
            _keep(self, cache)                # refused before any work: the cache stays
            raise ValueError(f"GPT.backward: dlogits has shape {tuple(dlogits.shape)}, but the last "
                             f"forward's logits have shape {expected}")
        dlogits = dlogits.astype(wte.data.dtype, copy=False)
        dx, _, _ = linear_backward(dlogits, cache, need_dW=False)          # (B, T, C)
        if wte.requires_grad:
            # The head weight is wte^T, so wte's gradient is (x^T dlogits)^T = dlogits^T x.
            # Computed as that product, (V, N) @ (N, C), it comes out in wte's own row-major
            # layout; the transposed view (x^T dlogits).T would make every later pass over
            # it (the embedding's scatter-add, AdamW's update) stride across memory, ~10x slower.
            V, C = wte.shape
            wte.accumulate_grad(dlogits.reshape(-1, V).T @ cache.x.reshape(-1, C))  # (V, C)
        del cache                             # the head's input: not needed past here
        dx = self.ln_f.backward(dx)           # (B, T, C)
        for block in reversed(list(self.blocks)):
            dx = block.backward(dx)
        dx = self.embedding_dropout.backward(dx)
        self.token_embedding.backward(dx)            # scatter into the rows that were used
        self.position_embedding.backward(dx.sum(axis=0))  # positions are shared across the batch

    # ---- generation --------------------------------------------------------------------

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 seed: Optional[int] = None, use_cache: bool = True):
        """Continue each row of ``idx`` (B, T) by ``max_new_tokens`` sampled tokens.

        ``temperature = 0`` is greedy decoding. ``top_k`` keeps the k likeliest tokens,
        ``top_p`` the smallest set whose probability reaches p (nucleus sampling).
        With ``use_cache`` a :class:`KVCache` makes each new token cost one position;
        once the sequence fills ``block_size`` the window slides and every step is a
        full forward of the last ``block_size`` tokens (learned absolute positions
        cannot be shifted inside a cache). Returns a NumPy array (B, T + max_new_tokens).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        idx = backend.to_numpy(idx).astype(np.int64)
        if idx.ndim != 2:
            raise ValueError(f"generate expects token ids of shape (B, T), got shape {idx.shape}")
        block = self.config.block_size
        rng = np.random.default_rng(seed)
        xp = backend.get_array_module(self.token_embedding.weight.data)
        kv_cache = KVCache(self.config, idx.shape[0], xp, self.dtype) if use_cache else None
        tokens = idx
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                for _ in range(max_new_tokens):
                    if kv_cache is not None and tokens.shape[1] <= block:
                        # feed only what the cache has not seen: the prompt once, then one token
                        logits = self.forward(tokens[:, kv_cache.length:], kv_cache)
                    else:  # no cache, or the window slides: a full forward of the last block
                        logits = self.forward(tokens[:, -block:])
                    last = backend.to_numpy(logits[:, -1, :]).astype(np.float64)  # (B, V)
                    next_token = _sample(last, temperature, top_k, top_p, rng)    # (B,)
                    tokens = np.concatenate([tokens, next_token[:, None]], axis=1)
        finally:
            self.train(was_training)
        return tokens


def _sample(logits: np.ndarray, temperature: float, top_k, top_p, rng: np.random.Generator) -> np.ndarray:
    """Pick one token per row of logits (B, V)."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]   # (B, 1) k-th largest
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # keep a token if the probability mass *before* it is still below top_p
        keep_sorted = (np.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)


def cross_entropy(logits, targets, ignore_index: int = -100, overwrite_logits: bool = False):
    """Mean softmax cross-entropy and its gradient, in one call.

    Returns ``(loss, dlogits)``: loss a float, dlogits shaped like logits (B, T, V).
    ``overwrite_logits=True`` computes dlogits in the logits' own memory (the returned
    dlogits *is* that array, and the logits are gone): a training step that needs the
    logits no more then never holds two arrays of that size -- in a small model the
    largest of its step (minilora's training loop does this).
    """
    xp = backend.get_array_module(logits)
    if backend.get_array_module(targets) is not xp:
        targets = backend.to_device(targets, backend.device_of(logits))
    loss, cache = cross_entropy_forward(logits, targets, ignore_index,
                                        out=logits if overwrite_logits else None)
    return loss, cross_entropy_backward(1.0, cache, reuse_cache=True)  # the cache is ours alone
