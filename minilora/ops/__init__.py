"""The math: one file per operation, each a pair of pure functions on arrays.

    y, cache = op_forward(x, params...)      # cache holds exactly what backward needs
    dx, dparams... = op_backward(dy, cache)  # gradients of the loss w.r.t. each input

Key to the letters in shape comments:
    B batch, T time (sequence length), C channels (n_embd), H heads, D head size (C // H),
    V vocabulary size, R LoRA rank, N = B * T rows, I / O in / out features.

The array module is taken from the inputs (numpy or cupy), so every op runs on both.
"""
from .attention import attention_backward, attention_forward
from .cross_entropy import cross_entropy_backward, cross_entropy_forward
from .dropout import dropout_backward, dropout_forward
from .embedding import embedding_backward, embedding_forward
from .gelu import gelu_backward, gelu_forward
from .layernorm import layernorm_backward, layernorm_forward
from .linear import linear_backward, linear_forward
from .lowrank import lowrank_backward, lowrank_forward
from .softmax import softmax_backward, softmax_forward

__all__ = [
    "attention_forward", "attention_backward",
    "cross_entropy_forward", "cross_entropy_backward",
    "dropout_forward", "dropout_backward",
    "embedding_forward", "embedding_backward",
    "gelu_forward", "gelu_backward",
    "layernorm_forward", "layernorm_backward",
    "linear_forward", "linear_backward",
    "lowrank_forward", "lowrank_backward",
    "softmax_forward", "softmax_backward",
]
