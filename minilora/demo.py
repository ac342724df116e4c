"""``minilora demo``: the whole story in one run, on built-in data, with no downloads.

1. Build a byte-level BPE tokenizer on the built-in text.
2. Pre-train a small GPT (the *base*) on the built-in stories.
3. LoRA fine-tune it on a different domain, the built-in recipes.
4. Measure what each costs: parameters, file sizes, time per step (full vs LoRA),
   gradient and optimizer memory; and what LoRA buys: the validation loss on recipes,
   base vs adapted.
5. Merge the adapter into the weights and check that nothing changed.
6. Generate from the base and from the adapted model; plot the loss curves.

Every number printed is measured in this run.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, List

import numpy as np

from . import backend, io
from .adapters import save_adapter
from .data import encode_corpus, load_builtin, split_text
from .gpt import GPT, GPTConfig, cross_entropy
from .lora import LoraConfig, add_lora, lora_summary, merge_lora, unmerge_lora
from .nn import no_grad
from .optim import AdamW
from .timing import paired_ratio, paired_timing, time_once
from .tokenizer import BPETokenizer
from .train import TrainConfig, evaluate, text_batches, text_eval_batches, train


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo run. The default takes about two minutes on a 2-core CPU."""
    vocab_size: int = 512
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    batch_size: int = 16
    base_steps: int = 400
    base_lr: float = 3e-3
    finetune_steps: int = 300
    finetune_lr: float = 1e-2     # LoRA takes a larger rate than full training
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    stories_chars: int = 300_000
    recipes_chars: int = 100_000
    eval_interval: int = 50
    eval_batches: int = 8
    timing_steps: int = 8
    sample_tokens: int = 60
    seed: int = 0


QUICK = DemoConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=32, batch_size=8,
                   base_steps=30, finetune_steps=30, lora_r=4, lora_alpha=8.0, stories_chars=20_000,
                   recipes_chars=10_000, eval_interval=10, eval_batches=2, timing_steps=3, sample_tokens=20)


def _dir_bytes(paths: List[str]) -> int:
    return sum(os.path.getsize(p) for p in paths)


def _paired_step_times(full: GPT, lora: GPT, x, y, trials: int):
    """Time training steps (forward, backward, AdamW) on batch x, y of the fully
    trainable model and of the LoRA model in ``trials`` paired trials: one step of each,
    back to back, the order alternating. Two blocks of steps timed one after the other
    would also measure how the machine's load moved between them; within a trial both
    steps see the same moment.

    Returns ((full median seconds, AdamW state bytes, gradient bytes), (the same for
    LoRA), the median over trials of LoRA time / full time). A gradient is as large as
    its parameter, and only trainable parameters have one."""
    def contender(name: str, model: GPT):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = AdamW(params, lr=1e-6)   # a tiny lr: we time the step, not learn from it
        device = model.device

        def step():
            _, dlogits = cross_entropy(model.forward(x), y, overwrite_logits=True)   # as minilora.train
            model.zero_grad()
            model.backward(dlogits)
            opt.step()
        return (name, step, lambda: backend.synchronize(device)), opt, params

    models = {"full": full, "lora": lora}
    measured = {name: contender(name, model) for name, model in models.items()}
    for (_, step, sync), _, _ in measured.values():
        time_once(step, sync)          # the first steps warm caches and allocators up
    times = paired_timing([c for c, _, _ in measured.values()], trials)
    for model in models.values():
        model.zero_grad()
    costs = {name: (float(np.median(times[name])), opt.state_bytes(), sum(p.data.nbytes for p in params))
             for name, (_, opt, params) in measured.items()}
    return costs["full"], costs["lora"], paired_ratio(times, "lora", "full")


def _sample(model: GPT, tokenizer, prompt: str, n: int, seed: int) -> str:
    ids = np.array([tokenizer.encode(prompt)], dtype=np.int64)
    out = model.generate(ids, max_new_tokens=n, temperature=0.8, top_k=40, seed=seed)
    return tokenizer.decode(out[0].tolist())


def _plot(base_run, lora_run, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, run, title in ((axes[0], base_run, "pre-training on stories (full)"),
                           (axes[1], lora_run, "fine-tuning on recipes (LoRA)")):
        ax.plot([r.step for r in run.train_history], [r.loss for r in run.train_history],
                alpha=0.5, label="train")
        ax.plot([r.step for r in run.val_history], [r.loss for r in run.val_history], "o-", label="validation")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out_dir: str = "minilora_demo", config: DemoConfig = DemoConfig(), device: str = "cpu",
             progress: bool = True, log=print) -> Dict[str, object]:
    """Run the demo, write its files into ``out_dir``, and return the measured numbers."""
    backend.check_device(device)
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    c = config

    # 1. data and tokenizer -----------------------------------------------------------
    stories = load_builtin("stories", size=c.stories_chars, seed=c.seed)
    recipes = load_builtin("recipes", size=c.recipes_chars, seed=c.seed)
    tokenizer = BPETokenizer.train([stories, recipes], vocab_size=c.vocab_size)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    stories_train, stories_val = split_text(encode_corpus(tokenizer, stories))
    recipes_train, recipes_val = split_text(encode_corpus(tokenizer, recipes))
    log(f"tokenizer: byte-level BPE, {tokenizer.vocab_size} tokens; stories {len(stories_train):,} "
        f"train / {len(stories_val):,} val tokens, recipes {len(recipes_train):,} / {len(recipes_val):,}")

    gpt_config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=c.block_size, n_layer=c.n_layer,
                           n_head=c.n_head, n_embd=c.n_embd)
    stories_eval = text_eval_batches(stories_val, c.batch_size, c.block_size)
    recipes_eval = text_eval_batches(recipes_val, c.batch_size, c.block_size)

    # 2. pre-train the base -------------------------------------------------------------
    model = GPT(gpt_config, seed=c.seed).to(device)
    log(f"\n[1/3] pre-training a {model.num_parameters():,}-parameter GPT on stories, {c.base_steps} steps")
    base_run = train(model, text_batches(stories_train, c.batch_size, c.block_size), stories_eval,
                     TrainConfig(max_steps=c.base_steps, batch_size=c.batch_size, lr=c.base_lr,
                                 min_lr=c.base_lr / 10, warmup_steps=max(1, c.base_steps // 10),
                                 weight_decay=0.1, eval_interval=c.eval_interval,
                                 eval_batches=c.eval_batches, seed=c.seed, progress=progress))
    base_paths = io.save_model(model, os.path.join(out_dir, "base"))
    checkpoint_bytes = _dir_bytes(list(base_paths.values()))
    base_recipes_loss = evaluate(model, recipes_eval())
    base_stories_loss = evaluate(model, stories_eval())
    base_sample = _sample(model, tokenizer, "Recipe:", c.sample_tokens, c.seed)

    # 3. LoRA on the base; one training step of it and of full fine-tuning (on a copy of
    #    the base), timed side by side on a batch of recipes ------------------------------
    base_parameters = model.num_parameters()
    lora_config = LoraConfig(r=c.lora_r, alpha=c.lora_alpha, target_modules=c.lora_targets)
    add_lora(model, lora_config, seed=c.seed)
    summary = lora_summary(model)
    rng = np.random.default_rng(c.seed)
    x, y = text_batches(recipes_train, c.batch_size, c.block_size)(rng)
    x, y = backend.to_device(x, device), backend.to_device(y, device)
    full_copy = io.load_model(os.path.join(out_dir, "base"), device=device)
    ((full_step, full_optimizer_bytes, full_grad_bytes), (lora_step, lora_optimizer_bytes, lora_grad_bytes),
     lora_over_full_step) = _paired_step_times(full_copy, model, x, y, c.timing_steps)
    del full_copy

    # 4. LoRA fine-tune -----------------------------------------------------------------
    log(f"\n[2/3] LoRA fine-tuning on recipes, {c.finetune_steps} steps: r={c.lora_r}, "
        f"alpha={c.lora_alpha}, {summary.trainable:,} trainable parameters ({summary.percent_trainable:.2f}%)")
    lora_run = train(model, text_batches(recipes_train, c.batch_size, c.block_size), recipes_eval,
                     TrainConfig(max_steps=c.finetune_steps, batch_size=c.batch_size, lr=c.finetune_lr,
                                 min_lr=c.finetune_lr / 10, warmup_steps=max(1, c.finetune_steps // 10),
                                 weight_decay=0.0, eval_interval=c.eval_interval,
                                 eval_batches=c.eval_batches, seed=c.seed + 1, progress=progress),
                     base_reference=os.path.abspath(os.path.join(out_dir, "base")))
    adapter_paths = save_adapter(model, os.path.join(out_dir, "adapter"),
                                 base_reference=os.path.abspath(os.path.join(out_dir, "base")))
    adapter_bytes = _dir_bytes([adapter_paths["weights"]])
    adapted_recipes_loss = evaluate(model, recipes_eval())
    adapted_stories_loss = evaluate(model, stories_eval())
    adapted_sample = _sample(model, tokenizer, "Recipe:", c.sample_tokens, c.seed)

    # 5. merge: the same function, no extra latency ---------------------------------------
    log("\n[3/3] merging the adapter into the weights")
    val_x = backend.to_device(recipes_val[None, :c.block_size], device)
    model.eval()
    with no_grad():
        unmerged_logits = backend.to_numpy(model.forward(val_x)).astype(np.float64)
        merge_lora(model)
        merged_logits = backend.to_numpy(model.forward(val_x)).astype(np.float64)
    merge_max_diff = float(np.abs(merged_logits - unmerged_logits).max())
    merged_recipes_loss = evaluate(model, recipes_eval())
    unmerge_lora(model)

    _plot(base_run, lora_run, os.path.join(out_dir, "loss_curves.png"))
    with open(os.path.join(out_dir, "samples.txt"), "w", encoding="utf-8") as f:
        f.write(f"--- base model ---\n{base_sample}\n\n--- LoRA-adapted model ---\n{adapted_sample}\n")

    results = {
        "base_parameters": base_parameters,
        "trainable_parameters_lora": summary.trainable,
        "trainable_percent_lora": 100.0 * summary.trainable / base_parameters,
        "checkpoint_bytes": checkpoint_bytes,
        "adapter_bytes": adapter_bytes,
        "full_step_seconds": full_step,
        "lora_step_seconds": lora_step,
        "lora_over_full_step": lora_over_full_step,
        "full_grad_plus_optimizer_bytes": full_grad_bytes + full_optimizer_bytes,
        "lora_grad_plus_optimizer_bytes": lora_grad_bytes + lora_optimizer_bytes,
        "base_val_loss_recipes": base_recipes_loss,
        "adapted_val_loss_recipes": adapted_recipes_loss,
        "merged_val_loss_recipes": merged_recipes_loss,
        "base_val_loss_stories": base_stories_loss,
        "adapted_val_loss_stories": adapted_stories_loss,
        "merge_max_abs_logit_diff": merge_max_diff,
        "base_sample": base_sample,
        "adapted_sample": adapted_sample,
        "device": device,
        "config": asdict(c),
        "seconds": time.perf_counter() - t_start,
    }
    io.write_json(os.path.join(out_dir, "results.json"), results)
    log("\n" + format_table(results))
    log(f"\nsample from the base model (prompt 'Recipe:'):\n  {base_sample!r}")
    log(f"sample from the LoRA-adapted model:\n  {adapted_sample!r}")
    log(f"\nwrote {out_dir}/: base/, adapter/, tokenizer.json, loss_curves.png, samples.txt, results.json "
        f"({results['seconds']:.0f} s)")
    return results


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f} KB" if n < 1024 ** 2 else f"{n / 1024 ** 2:,.2f} MB"


def format_table(r: Dict[str, object]) -> str:
    rows = [
        ("", "full fine-tuning", "LoRA"),
        ("trainable parameters", f"{r['base_parameters']:,}",
         f"{r['trainable_parameters_lora']:,} ({r['trainable_percent_lora']:.2f}% of the base)"),
        ("saved file", f"{_kb(r['checkpoint_bytes'])} (checkpoint)", f"{_kb(r['adapter_bytes'])} (adapter)"),
        ("time per training step", f"{1000 * r['full_step_seconds']:.1f} ms",
         f"{1000 * r['lora_step_seconds']:.1f} ms ({r['lora_over_full_step']:.2f}x, paired)"),
        ("gradients + AdamW state", _kb(r["full_grad_plus_optimizer_bytes"]), _kb(r["lora_grad_plus_optimizer_bytes"])),
        ("", "base model", "LoRA-adapted"),
        ("val loss on recipes (target)", f"{r['base_val_loss_recipes']:.3f}", f"{r['adapted_val_loss_recipes']:.3f}"),
        ("val loss on stories (base data)", f"{r['base_val_loss_stories']:.3f}", f"{r['adapted_val_loss_stories']:.3f}"),
        ("", "unmerged", "merged"),
        ("val loss on recipes", f"{r['adapted_val_loss_recipes']:.4f}", f"{r['merged_val_loss_recipes']:.4f}"),
        ("max |logit difference|", "", f"{r['merge_max_abs_logit_diff']:.2e}"),
    ]
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for row in rows:
        line = f"{row[0]:<{width[0]}}   {row[1]:>{width[1]}}   {row[2]:>{width[2]}}"
        if not row[0]:
            lines.append("-" * len(line))
        lines.append(line)
    return "\n".join(lines)
