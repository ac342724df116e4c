"""The ``minilora`` command (also ``python -m minilora``).

    minilora demo                      the whole story on built-in data (about 2 minutes)
    minilora train     --data FILE --out DIR        pre-train a GPT on a text file
    minilora finetune  --base DIR --data FILE --out DIR   LoRA fine-tune (text or JSONL)
    minilora merge     --adapter DIR --out DIR      adapter + base -> one merged model
    minilora generate  --model DIR | --adapter DIR --prompt TEXT
    minilora info      PATH                         describe a model, run or adapter

``--data`` takes a file (``.txt``, or ``.jsonl`` of {"prompt", "response"} lines) or a
built-in set: ``builtin:stories``, ``builtin:recipes``, ``builtin:addition``,
``builtin:reverse``. Every error is one line on stderr and a non-zero exit status.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import List, Optional

import numpy as np

from . import __version__, backend, io
from .adapters import CONFIG_FILE as ADAPTER_CONFIG_FILE
from .adapters import WEIGHTS_FILE as ADAPTER_WEIGHTS_FILE
from .adapters import load_adapter, read_adapter_config, save_adapter
from .allocator import keep_freed_memory
from .data import (BUILTIN_DATASETS, encode_corpus, encode_examples, load_builtin, read_jsonl,
                   read_text_file, split_examples, split_text)
from .gpt import GPT, GPTConfig
from .lora import LoraConfig, add_lora, lora_summary, merge_and_unload
from .tokenizer import BPETokenizer, CharTokenizer, load_tokenizer
from .train import (TrainConfig, example_batches, example_eval_batches, text_batches,
                    text_eval_batches, train)

TOKENIZER_FILE = "tokenizer.json"
CHECKPOINTS = "checkpoints"


class CLIError(Exception):
    """An error to report in one line, without a traceback."""


# --------------------------------------------------------------------------------------
# Data and files
# --------------------------------------------------------------------------------------

def load_data(spec: str):
    """``builtin:<name>``, a ``.jsonl`` file (examples) or any other file (text)."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_DATASETS:
            raise CLIError(f"unknown built-in data set {name!r}; choose from {sorted(BUILTIN_DATASETS)}")
        return load_builtin(name)
    if not os.path.isfile(spec):
        raise CLIError(f"no such data file: {spec}")
    return read_jsonl(spec) if spec.endswith(".jsonl") else read_text_file(spec)


def find_tokenizer(*directories: str):
    for d in directories:
        if d and os.path.isfile(os.path.join(d, TOKENIZER_FILE)):
            return load_tokenizer(os.path.join(d, TOKENIZER_FILE))
    raise CLIError(f"no {TOKENIZER_FILE} found in {[d for d in directories if d]}")


def copy_tokenizer(src_dir: str, dst_dir: str) -> None:
    os.makedirs(dst_dir, exist_ok=True)
    src = os.path.join(src_dir, TOKENIZER_FILE)
    if os.path.abspath(src) != os.path.abspath(os.path.join(dst_dir, TOKENIZER_FILE)):
        shutil.copyfile(src, os.path.join(dst_dir, TOKENIZER_FILE))


def base_of_adapter(adapter_dir: str, base: Optional[str]) -> str:
    """The base model directory: given, or the one the adapter recorded."""
    if base:
        return base
    recorded = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not recorded:
        raise CLIError(f"the adapter in {adapter_dir} names no base model; pass --base DIR")
    return recorded


def train_config_from(args, steps_default: int) -> TrainConfig:
    steps = args.steps or steps_default
    return TrainConfig(max_steps=steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.lr / 10,
                       warmup_steps=max(1, min(100, steps // 10)), weight_decay=args.weight_decay,
                       eval_interval=args.eval_interval, eval_batches=10, checkpoint_interval=args.eval_interval,
                       seed=args.seed, progress=not args.quiet)


def batches_for(data, tokenizer, block_size: int, batch_size: int, seed: int):
    """(train batch sampler, validation batches) for text or prompt/response examples."""
    if isinstance(data, str):
        train_tokens, val_tokens = split_text(encode_corpus(tokenizer, data))
        if len(val_tokens) < block_size + 1:
            raise CLIError(f"the text is too short: its validation part has {len(val_tokens)} tokens, "
                           f"a block needs {block_size + 1}")
        return (text_batches(train_tokens, batch_size, block_size),
                text_eval_batches(val_tokens, batch_size, block_size))
    train_ex, val_ex = split_examples(data, 0.1, seed)
    encode = lambda ex: encode_examples(tokenizer, ex, block_size, truncate=True)
    return (example_batches(encode(train_ex), batch_size, tokenizer.eot_id),
            example_eval_batches(encode(val_ex), batch_size, tokenizer.eot_id))


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------

def cmd_demo(args) -> None:
    from .demo import QUICK, DemoConfig, run_demo
    run_demo(args.out, QUICK if args.quick else DemoConfig(), device=args.device, progress=not args.quiet)


def cmd_train(args) -> None:
    data = load_data(args.data)
    text = data if isinstance(data, str) else "\n".join(e["prompt"] + e["response"] for e in data)
    saved_tokenizer = os.path.join(args.out, TOKENIZER_FILE)
    if args.resume and os.path.isfile(saved_tokenizer):
        tokenizer = load_tokenizer(saved_tokenizer)     # the run's own, saved when it began
    elif args.tokenizer == "char":
        tokenizer = CharTokenizer.train([text])
    else:
        tokenizer = BPETokenizer.train([text], vocab_size=args.vocab_size)
    os.makedirs(args.out, exist_ok=True)
    tokenizer.save(saved_tokenizer)                     # before training: a resumed run needs it
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)
    model = GPT(config, seed=args.seed).to(args.device)
    train_batches, val_batches = batches_for(data, tokenizer, args.block_size, args.batch_size, args.seed)
    print(f"training a {model.num_parameters():,}-parameter GPT on {args.data}")
    result = train(model, train_batches, val_batches, train_config_from(args, 1000),
                   out_dir=os.path.join(args.out, CHECKPOINTS), resume=args.resume)
    io.save_model(model, args.out)
    print(f"final validation loss {result.final_val_loss:.4f}; model saved to {args.out}")


def cmd_finetune(args) -> None:
    model = io.load_model(args.base, device=args.device)
    tokenizer = find_tokenizer(args.base)
    targets = "all-linear" if args.targets == "all-linear" else tuple(args.targets.split(","))
    lora = LoraConfig(r=args.r, alpha=args.alpha, dropout=args.dropout, target_modules=targets)
    add_lora(model, lora, seed=args.seed)
    print(lora_summary(model))
    data = load_data(args.data)
    train_batches, val_batches = batches_for(data, tokenizer, model.config.block_size, args.batch_size, args.seed)
    base_ref = os.path.abspath(args.base)
    result = train(model, train_batches, val_batches, train_config_from(args, 300),
                   out_dir=os.path.join(args.out, CHECKPOINTS), resume=args.resume, base_reference=base_ref)
    save_adapter(model, args.out, base_reference=base_ref)
    copy_tokenizer(args.base, args.out)
    print(f"final validation loss {result.final_val_loss:.4f}; adapter saved to {args.out} "
          f"({os.path.getsize(os.path.join(args.out, ADAPTER_WEIGHTS_FILE)):,} bytes)")


def cmd_merge(args) -> None:
    base = base_of_adapter(args.adapter, args.base)
    model = io.load_model(base)
    load_adapter(model, args.adapter)
    merge_and_unload(model)
    io.save_model(model, args.out)
    copy_tokenizer(base, args.out)
    print(f"merged {args.adapter} into {base}; plain model saved to {args.out}")


def cmd_generate(args) -> None:
    if not args.model and not args.adapter:
        raise CLIError("generate needs --model DIR or --adapter DIR")
    base = args.model or base_of_adapter(args.adapter, None)
    model = io.load_model(base, device=args.device)
    if args.adapter:
        load_adapter(model, args.adapter)
    tokenizer = find_tokenizer(args.adapter, base)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise CLIError("the prompt is empty")
    out = model.generate(np.array([ids], dtype=np.int64), max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(tokenizer.decode(out[0].tolist()))


def cmd_info(args) -> None:
    path = args.path
    if not os.path.exists(path):
        raise CLIError(f"no such file or directory: {path}")
    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG_FILE)):
        cfg = read_adapter_config(path)
        info = cfg["minilora"]
        tensors = io.read_safetensors(os.path.join(path, ADAPTER_WEIGHTS_FILE))
        print(f"LoRA adapter {info.get('adapter_name')!r} in {path}")
        print(f"  r={cfg['r']}  lora_alpha={cfg['lora_alpha']}  dropout={cfg['lora_dropout']}  "
              f"bias={cfg['bias']}  use_rslora={cfg.get('use_rslora')}  init={cfg.get('init_lora_weights')}")
        print(f"  target_modules: {cfg['target_modules']}")
        print(f"  adapted layers: {len(info['adapted_modules'])}; parameters: "
              f"{sum(int(np.prod(t.shape)) for t in tensors.values()):,}; file "
              f"{os.path.getsize(os.path.join(path, ADAPTER_WEIGHTS_FILE)):,} bytes")
        print(f"  base model: {cfg.get('base_model_name_or_path')}  config {info.get('base_config')}")
        print(f"  base weights fingerprint: {info.get('base_fingerprint')}")
        return
    config = io.read_model_config(path)
    where = io.resolve_checkpoint(path)
    weights = os.path.join(where, config.get("weights", io.MODEL_WEIGHTS_FILE))
    n_params = sum(int(np.prod(t.shape)) for t in io.read_safetensors(weights).values())
    print(f"minilora model in {where}")
    print(f"  config: {config['model']}  dtype: {config.get('dtype')}")
    print(f"  parameters: {n_params:,}; weights file {os.path.getsize(weights):,} bytes")
    if config.get("lora"):
        print(f"  LoRA training checkpoint (trainable weights only) on base {config.get('base')}")


# --------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------

def _add_device_flag(p) -> None:
    p.add_argument("--device", choices=backend.DEVICES, default="cpu",
                   help="cpu (NumPy) or cuda (CuPy); default cpu")


def _add_training_flags(p, lr: float, batch_size: int) -> None:
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (warm-up, then cosine)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--eval-interval", type=int, default=100, help="evaluate and checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minilora", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"minilora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="train a base, LoRA fine-tune it, show the costs, merge, generate")
    p.add_argument("--out", default="minilora_demo", help="output directory (default: minilora_demo)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: runs in seconds (for tests)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_device_flag(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="pre-train a GPT on a text file or built-in corpus")
    p.add_argument("--data", required=True, help="a .txt file or builtin:stories")
    p.add_argument("--out", required=True, help="output directory (model, tokenizer, checkpoints)")
    p.add_argument("--tokenizer", choices=("bpe", "char"), default="bpe")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.0)
    _add_training_flags(p, lr=3e-3, batch_size=16)
    _add_device_flag(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="LoRA fine-tune a model on a text or JSONL file")
    p.add_argument("--base", required=True, help="the base model directory (from train or merge)")
    p.add_argument("--data", required=True, help="a .txt or .jsonl file, or builtin:recipes / builtin:addition")
    p.add_argument("--out", required=True, help="output directory for the adapter")
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling = alpha / r)")
    p.add_argument("--targets", default="q_proj,v_proj",
                   help="comma-separated module names, or all-linear (default q_proj,v_proj)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    _add_training_flags(p, lr=3e-3, batch_size=16)
    _add_device_flag(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("merge", help="merge an adapter into its base: one plain model")
    p.add_argument("--adapter", required=True)
    p.add_argument("--base", default=None, help="base model directory (default: the one the adapter names)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("generate", help="continue a prompt")
    p.add_argument("--model", default=None, help="model directory")
    p.add_argument("--adapter", default=None, help="adapter directory (its base is loaded too)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    _add_device_flag(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="describe a model, a training run or an adapter")
    p.add_argument("path")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    # Every command here runs steps that allocate and free the same arrays over and over:
    # keep the freed memory for the next one (minilora/allocator.py says why).
    keep_freed_memory()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if getattr(args, "device", "cpu") == "cuda":
            backend.check_device("cuda")
        args.func(args)
    except (CLIError, ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError) as e:
        print(f"minilora {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"minilora {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
