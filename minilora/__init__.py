"""minilora: a GPT-2 transformer and LoRA with hand-written forward and backward passes.

    import minilora as ml
    model = ml.GPT(ml.GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64))
    logits = model.forward(idx)                    # (B, T) -> (B, T, V)
    loss, dlogits = ml.cross_entropy(logits, targets)
    model.zero_grad(); model.backward(dlogits)     # fills p.grad of trainable parameters
"""
import os as _os

# minilora runs elementwise kernels on threads between matrix products (threads.py), but
# OpenBLAS's idle workers spin for ~0.1 s (2^28 cycles) after each product, on the very
# cores those threads need. 2^20 cycles (~0.4 ms) still bridges back-to-back products,
# then lets them sleep. It takes effect only when NumPy is first imported after this line
# (as with the `minilora` command), and a value already set wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

from . import threads
from .allocator import keep_freed_memory
from .backend import cuda_available, to_numpy
from .gpt import GPT, GPTConfig, KVCache, cross_entropy
from .nn import Module, Parameter, no_grad
from .optim import SGD, AdamW, clip_grad_norm, warmup_cosine_lr
from .lora import (LoraConfig, LoRALinear, active_adapters, add_lora, add_weighted_adapter,
                   adapter_names, delete_adapter, disable_adapters, is_lora_model, lora_summary,
                   merge_and_unload, merge_lora, set_adapter, unload, unmerge_lora)
from .adapters import load_adapter, save_adapter
from .io import load_model, save_model
from .train import TrainConfig, TrainingDiverged, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "GPT", "GPTConfig", "KVCache", "cross_entropy",
    "Module", "Parameter", "no_grad",
    "SGD", "AdamW", "clip_grad_norm", "warmup_cosine_lr",
    "LoraConfig", "LoRALinear", "add_lora", "merge_lora", "unmerge_lora", "merge_and_unload", "unload",
    "set_adapter", "active_adapters", "adapter_names", "disable_adapters", "delete_adapter",
    "add_weighted_adapter", "is_lora_model", "lora_summary", "save_adapter", "load_adapter",
    "save_model", "load_model", "TrainConfig", "TrainingDiverged", "train", "evaluate",
    "cuda_available", "to_numpy", "keep_freed_memory",
]
