"""minilora: a GPT-2 transformer and LoRA with hand-written forward and backward passes.

    import minilora as ml
    model = ml.GPT(ml.GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64))
    logits = model.forward(idx)                    # (B, T) -> (B, T, V)
    loss, dlogits = ml.cross_entropy(logits, targets)
    model.zero_grad(); model.backward(dlogits)     # fills p.grad of trainable parameters
"""
from .backend import cuda_available, to_numpy
from .gpt import GPT, GPTConfig, KVCache, cross_entropy
from .nn import Module, Parameter, no_grad

__version__ = "0.1.0"

__all__ = [
    "GPT", "GPTConfig", "KVCache", "cross_entropy",
    "Module", "Parameter", "no_grad",
    "cuda_available", "to_numpy",
]
