# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 5 — LoRA vs full fine-tuning: what each costs
#
# LoRA's promise is that adapting a model to a new domain needs only a few trainable
# numbers. This lesson measures what that buys and what it does not, on one small GPT:
#
# 1. pre-train a *base* model on the built-in stories and save it;
# 2. fine-tune copies of it on the built-in recipes with the **same step budget**:
#    once with every weight trainable (full fine-tuning), and once per LoRA rank $r$;
# 3. measure, for each: the trainable parameters, the memory for gradients and AdamW's
#    state, the time of one training step, the size of the file we must keep, and the
#    validation loss reached on recipes (the new domain) and on stories (the old one:
#    how much was forgotten).
#
# Each cost is first *derived* — a count, a byte formula, a FLOP estimate — and then
# checked against what minilora actually allocates and writes. Timings are printed,
# never asserted: a shared CPU is too noisy for that.
#
# Letters: B batch, T time, C channels (`n_embd`), V vocabulary, L layers, r rank,
# and a linear weight $W$ is stored (I, O) = (in, out), applied as $y = xW + b$.
#
# Run it as a script (`python tutorials/05_lora_vs_full_cost.py`, add `--fast` or
# `MINILORA_FAST=1` for the small CI version) or open it as a notebook with jupytext.

# %%
import atexit
import math
import os
import shutil
import sys
import tempfile
import time

import matplotlib

if "ipykernel" not in sys.modules:  # a script or CI: draw to files only
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import minilora as ml
from minilora.data import encode_corpus, load_builtin, split_text
from minilora.tokenizer import BPETokenizer
from minilora.train import text_batches, text_eval_batches

FAST = os.environ.get("MINILORA_FAST") == "1" or "--fast" in sys.argv
_HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
FIGURES = os.environ.get("MINILORA_FIGURES", os.path.join(_HERE, "figures"))
os.makedirs(FIGURES, exist_ok=True)
WORK = tempfile.mkdtemp(prefix="minilora_lesson05_")   # model and adapter files of this run
atexit.register(shutil.rmtree, WORK, ignore_errors=True)   # removed at exit, even after a failed check
LESSON_START = time.perf_counter()

if FAST:   # small enough for CI: a few seconds
    STORIES_CHARS, RECIPES_CHARS, VOCAB = 40_000, 20_000, 320
    N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 2, 2, 32, 32, 8
    BASE_STEPS, FT_STEPS, RANKS, EVAL_EVERY, TIMING_REPEATS = 80, 40, (2, 8), 5, 3
else:      # the numbers a reader should see: a few minutes on a 2-core CPU
    STORIES_CHARS, RECIPES_CHARS, VOCAB = 300_000, 100_000, 512
    N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 4, 4, 128, 64, 16
    BASE_STEPS, FT_STEPS, RANKS, EVAL_EVERY, TIMING_REPEATS = 250, 120, (2, 8, 32), 20, 10
BASE_LR = 3e-3          # pre-training
FULL_LR = 1e-3          # full fine-tuning: a gentler rate than pre-training
LORA_LR = 1e-2          # LoRA: B starts at zero, so its steps can be larger (see section 5)
LORA_ALPHA = 16.0       # scaling = alpha / r
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")  # every linear layer of a block
print(f"mode: {'fast' if FAST else 'full'}; figures go to {FIGURES}; files to {WORK}")

# %% [markdown]
# ## 1. The base model
#
# A byte-level BPE tokenizer is trained on the stories, and the base GPT is pre-trained
# on them — as a real base model's tokenizer and weights are fixed before anyone knows
# the domain it will be adapted to. Recipes are then encoded with that same tokenizer
# (byte-level BPE can encode any text; unfamiliar words just take more tokens). The
# base is saved with `ml.save_model`, and every fine-tune below starts from this file,
# so they all start from the very same weights.

# %%
stories = load_builtin("stories", size=STORIES_CHARS)
recipes = load_builtin("recipes", size=RECIPES_CHARS)
tokenizer = BPETokenizer.train([stories], vocab_size=VOCAB)
stories_train, stories_val = split_text(encode_corpus(tokenizer, stories))
recipes_train, recipes_val = split_text(encode_corpus(tokenizer, recipes))
print(f"tokenizer: {tokenizer.vocab_size} tokens; stories {len(stories_train):,} train / "
      f"{len(stories_val):,} val tokens; recipes {len(recipes_train):,} / {len(recipes_val):,}")

config = ml.GPTConfig(vocab_size=tokenizer.vocab_size, block_size=BLOCK, n_layer=N_LAYER,
                      n_head=N_HEAD, n_embd=N_EMBD, dropout=0.0)
stories_eval = text_eval_batches(stories_val, BATCH, BLOCK)   # fn() -> every validation window
recipes_eval = text_eval_batches(recipes_val, BATCH, BLOCK)

base = ml.GPT(config, seed=0, dtype="float32")
t0 = time.perf_counter()
base_run = ml.train(base, text_batches(stories_train, BATCH, BLOCK), stories_eval,
                    ml.TrainConfig(max_steps=BASE_STEPS, batch_size=BATCH, lr=BASE_LR, min_lr=BASE_LR / 10,
                                   warmup_steps=max(1, BASE_STEPS // 10), weight_decay=0.1,
                                   eval_interval=0, eval_batches=None, seed=0, progress=False))
BASE_DIR = os.path.join(WORK, "base")
ml.save_model(base, BASE_DIR)
base_loss = {"recipes": ml.evaluate(base, recipes_eval()), "stories": ml.evaluate(base, stories_eval())}
print(f"pre-trained {base.num_parameters():,} parameters for {BASE_STEPS} steps in "
      f"{time.perf_counter() - t0:.1f} s")
print(f"base model: validation loss {base_loss['stories']:.3f} on stories, "
      f"{base_loss['recipes']:.3f} on recipes (a domain it has not seen; guessing uniformly "
      f"would score ln V = {math.log(tokenizer.vocab_size):.3f})")
assert base_loss["stories"] < base_loss["recipes"], "the base should know stories better than recipes"

# %% [markdown]
# ## 2. Trainable parameters
#
# Full fine-tuning trains every number of the model. LoRA freezes a weight
# $W \in \mathbb R^{I \times O}$ and trains a low-rank update beside it,
#
# $$
# y = xW + b + \frac{\alpha}{r}\,(x A^\top) B^\top, \qquad A \in \mathbb R^{r \times I},\;
# B \in \mathbb R^{O \times r},
# $$
#
# so one adapted matrix costs $r(I + O)$ trainable numbers instead of $IO$. We adapt
# every linear layer of every block: four (C, C) attention projections, $r \cdot 2C$
# each, and the MLP's (C, 4C) and (4C, C), $r \cdot 5C$ each — in all $18\,rC$ per
# block, against the $12C^2$ numbers of those weights. The trainable fraction of the
# block weights is therefore
#
# $$
# \frac{18\,rC}{12\,C^2} = \frac{3r}{2C},
# $$
#
# and of the whole model a little less (the embeddings, biases and LayerNorms are frozen
# too). It is the rank *relative to the width* that matters: $r = 8$ is 9% of the block
# weights of our $C = 128$ model, but 1.6% of GPT-2 small's ($C = 768$). A rank that
# approaches $C$ is not "low" at all.
#
# The whole GPT-2-shaped model has $VC$ (token embedding, tied to the output head) $+$
# $T_{\max} C$ (positions) $+ L(12C^2 + 13C)$ (weights, biases and two LayerNorms per
# block) $+ 2C$ (final LayerNorm) parameters. We count both from the shapes and compare
# with what `ml.lora_summary` reports for the adapted models.

# %%
def adapted_shapes(cfg):
    """(I, O) of every matrix LoRA adapts in one block."""
    C = cfg.n_embd
    return {"q_proj": (C, C), "k_proj": (C, C), "v_proj": (C, C), "o_proj": (C, C),
            "up_proj": (C, 4 * C), "down_proj": (4 * C, C)}


def lora_param_count(cfg, r):
    """r (I + O) per adapted matrix, summed over the blocks: 18 r C per block."""
    return cfg.n_layer * sum(r * (I + O) for I, O in adapted_shapes(cfg).values())


def gpt_param_count(cfg):
    C = cfg.n_embd
    return cfg.vocab_size * C + cfg.block_size * C + cfg.n_layer * (12 * C * C + 13 * C) + 2 * C


N_FULL = gpt_param_count(config)
assert N_FULL == base.num_parameters(), f"{N_FULL} counted, {base.num_parameters()} in the model"

VARIANTS = ["full"] + [f"LoRA r={r}" for r in RANKS]
models, trainable = {}, {}
models["full"] = ml.load_model(BASE_DIR)                          # every parameter trains
trainable["full"] = models["full"].num_parameters(trainable_only=True)
assert trainable["full"] == N_FULL
for r in RANKS:
    m = ml.load_model(BASE_DIR)
    ml.add_lora(m, ml.LoraConfig(r=r, alpha=LORA_ALPHA, target_modules=TARGETS), seed=0)
    summary = ml.lora_summary(m)
    derived = lora_param_count(config, r)
    for layer, _, rank, shape, n in summary.rows:                # every adapted matrix
        assert shape == adapted_shapes(config)[layer.rsplit(".", 1)[1]] and n == rank * sum(shape), layer
    assert len(summary.rows) == 6 * config.n_layer
    assert summary.trainable == derived, f"r={r}: lora_summary says {summary.trainable}, derived {derived}"
    assert summary.total == N_FULL + derived, "the adapters are added beside the (frozen) base weights"
    models[f"LoRA r={r}"], trainable[f"LoRA r={r}"] = m, summary.trainable

print(f"{'':<12} {'trainable':>10}  {'% of base':>9}  {'bound 3r/(2C)':>13}")
for name in VARIANTS:
    frac = trainable[name] / N_FULL
    bound = "" if name == "full" else f"{100 * 3 * int(name.split('=')[1]) / (2 * N_EMBD):.1f}%"
    print(f"{name:<12} {trainable[name]:>10,}  {100 * frac:>8.2f}%  {bound:>13}")
    if name != "full":
        r = int(name.split("=")[1])
        assert frac < 3 * r / (2 * N_EMBD), "the block-weight fraction bounds the whole-model fraction"
assert trainable[f"LoRA r={RANKS[0]}"] < 0.10 * N_FULL, "the smallest rank trains under 10% of the model"

gpt2_small = ml.GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
assert gpt_param_count(gpt2_small) == 124_439_808, "GPT-2 small has 124,439,808 parameters (tied head)"
print(f"for comparison, GPT-2 small: LoRA r=8 on the same layers trains {lora_param_count(gpt2_small, 8):,} "
      f"of {gpt_param_count(gpt2_small):,} parameters "
      f"({100 * lora_param_count(gpt2_small, 8) / gpt_param_count(gpt2_small):.2f}%)")

# %% [markdown]
# ## 3. Memory for gradients and the optimizer
#
# During training, beside the weights themselves, every *trainable* parameter needs
#
# * its gradient, the same size as the parameter: 4 bytes in float32;
# * AdamW's two running averages $m$ and $v$: $2 \times 4$ bytes.
#
# So the training-only state is $12$ bytes per trainable parameter, of which the
# optimizer's share is $8\,N_{\text{train}}$ bytes — and the LoRA/full ratio of those
# bytes is exactly the ratio of trainable parameters. A frozen parameter gets no
# gradient array at all (`p.grad` stays `None`) and no optimizer state.
#
# What LoRA does *not* shrink: the weights (all of the base is still needed, plus the
# adapters), and the activations kept for the backward pass, which depend on B, T and
# the architecture, not on what is trainable (the backward still has to send gradients
# through every layer to reach the adapters in the layers below). For a big model the
# optimizer state is what breaks the memory budget; for long sequences it is the
# activations, and LoRA does not help there.
#
# We run one training step of each variant on the same batch (learning rate 0, so the
# weights stay as they are for the timing and the fine-tunes that follow) and count.

# %%
rng = np.random.default_rng(0)
x_batch, y_batch = text_batches(recipes_train, BATCH, BLOCK)(rng)   # (B, T), (B, T)
optimizers, grad_bytes, state_bytes = {}, {}, {}


def train_step(model, opt):
    _, dlogits = ml.cross_entropy(model.forward(x_batch), y_batch)  # (B, T, V)
    model.zero_grad()
    model.backward(dlogits)                                         # fills p.grad of trainable p
    opt.step()


for name in VARIANTS:
    model = models[name]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizers[name] = ml.AdamW(params, lr=0.0, weight_decay=0.0)
    train_step(model, optimizers[name])
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen), f"{name}: a frozen parameter got a gradient array"
    grad_bytes[name] = sum(p.grad.nbytes for p in params)
    state_bytes[name] = optimizers[name].state_bytes()
    n = trainable[name]
    assert grad_bytes[name] == 4 * n, f"{name}: gradients take {grad_bytes[name]} bytes, expected 4 x {n}"
    assert state_bytes[name] == 2 * 4 * n, f"{name}: AdamW state is {state_bytes[name]} bytes, expected 2 x 4 x {n}"
    print(f"{name:<12} gradients {grad_bytes[name] / 1024:>8.1f} KiB   AdamW m, v {state_bytes[name] / 1024:>8.1f} KiB"
          f"   ({len(frozen)} frozen arrays without a gradient)")
for name in VARIANTS[1:]:
    # state_lora / state_full == trainable_lora / trainable_full, in integers (no rounding)
    assert state_bytes[name] * trainable["full"] == state_bytes["full"] * trainable[name]
    print(f"{name}: optimizer bytes are {100 * state_bytes[name] / state_bytes['full']:.2f}% of full "
          f"fine-tuning's = its share of trainable parameters")

# %% [markdown]
# ## 4. Time per step: why LoRA is not proportionally cheaper
#
# Count the multiply-adds of the matrix products, the bulk of the work (a product of
# (m, k) and (k, n) costs $2mkn$ FLOPs). With $N = BT$ token positions, one linear layer
# $y = xW$ costs
#
# * forward $\;y = xW$: $2NIO$;
# * backward to the input $\;dx = dy\,W^\top$: $2NIO$;
# * backward to the weight $\;dW = x^\top dy$: $2NIO$.
#
# Full fine-tuning does all three. LoRA freezes $W$ and skips only the last one — the
# forward must still run through $W$, and the backward must still carry $dx$ through
# $W$, because the adapters of the layers *below* need their input gradient. So the
# linear work drops from $3$ to $2$ units: about one third, whatever the rank. The
# adapters add their own small products: forward $2Nr(I+O)$, backward twice that.
# Attention's $QK^\top$ and $PV$ (no weights: $4BT^2C$ FLOPs per layer forward, twice
# that backward) are paid in full by both. Summing over the model (the output head is
# a linear layer with $I = C$, $O = V$, frozen in LoRA):
#
# $$
# F_{\text{full}} = 3F_{\text{lin}} + 3F_{\text{attn}}, \qquad
# F_{\text{LoRA}} = 2F_{\text{lin}} + 3F_{\text{attn}} + 3 \cdot 2N\,N_{\text{LoRA}},
# $$
#
# with $F_{\text{lin}} = 2N(12LC^2 + CV)$ and $F_{\text{attn}} = 4LBT^2C$. Subtracting,
# LoRA saves $F_{\text{lin}} - 6N\,N_{\text{LoRA}}$: the skipped weight gradients minus
# the adapters' own work. As $N_{\text{LoRA}}$ grows with $r$, there is a break-even
# rank beyond which a LoRA step costs *more* FLOPs than a full one — for one (C, C)
# matrix, $2NC^2$ saved against $6N \cdot 2rC$ spent, so $r = C/6$. A low rank is what
# makes LoRA cheaper in time at all. Everything
# else — LayerNorm, GELU, softmax, the loss, AdamW's update — is element-wise, cheap in
# FLOPs but not free in NumPy, and mostly the same for both (AdamW's update is the
# exception: it touches every trainable number, so it is far cheaper for LoRA).
#
# We time whole steps (forward, loss, backward, AdamW), interleaving the variants
# round-robin so that a burst of load on the machine hits them all alike. Load from
# other programs can only ever *add* time, so the fastest of the repeats is the best
# estimate of what a step itself costs; we use it, and print the median beside it to
# show how noisy the machine was.

# %%
def step_flops(cfg, B, T, r=None):
    """Matrix-product FLOPs of one training step: full fine-tuning (r None) or LoRA rank r."""
    N, C, L, V = B * T, cfg.n_embd, cfg.n_layer, cfg.vocab_size
    linear = 2 * N * (L * 12 * C * C + C * V)      # forward of the block linears and the tied head
    attention = 4 * L * B * T * T * C              # q k^T and P v, forward, all heads
    if r is None:
        return 3 * linear + 3 * attention          # forward, dx, dW; attention backward = 2x forward
    return 2 * linear + 3 * attention + 3 * 2 * N * lora_param_count(cfg, r)


times = {name: [] for name in VARIANTS}
for _ in range(TIMING_REPEATS):
    for name in VARIANTS:                          # round-robin: load bursts hit every variant
        t0 = time.perf_counter()
        train_step(models[name], optimizers[name])
        times[name].append(time.perf_counter() - t0)
step_ms = {name: 1000 * min(times[name]) for name in VARIANTS}
median_ms = {name: 1000 * float(np.median(times[name])) for name in VARIANTS}
for m in models.values():
    m.zero_grad()

flops = {"full": step_flops(config, BATCH, BLOCK)}
flops.update({f"LoRA r={r}": step_flops(config, BATCH, BLOCK, r) for r in RANKS})
lin = 2 * BATCH * BLOCK * (N_LAYER * 12 * N_EMBD ** 2 + N_EMBD * config.vocab_size)
print(f"weight gradients are {100 * lin / flops['full']:.0f}% of a full step's matmul FLOPs "
      f"({flops['full'] / 1e9:.2f} GFLOP per step)")
print(f"{'':<12} {'GFLOP':>7} {'predicted':>10} {'ms/step':>9} {'measured':>9}   {'(median ms)':>11}")
for name in VARIANTS:
    print(f"{name:<12} {flops[name] / 1e9:>7.3f} {flops[name] / flops['full']:>10.2f} "
          f"{step_ms[name]:>9.1f} {step_ms[name] / step_ms['full']:>9.2f}   {median_ms[name]:>11.1f}")
print(f"(predicted and measured are ratios to full fine-tuning; ms/step is the fastest of {TIMING_REPEATS})")
r_even = lin / (6 * BATCH * BLOCK * lora_param_count(config, 1))   # F_lin = 6 N N_LoRA(r)
print(f"break-even rank: r = {r_even:.1f} (a LoRA step of higher rank needs more matmul FLOPs than a full one)")
for r in RANKS:  # skipping dW saves at most its third of the linear work, whatever the rank
    assert flops[f"LoRA r={r}"] > 2 / 3 * flops["full"]
    assert (flops[f"LoRA r={r}"] < flops["full"]) == (r < r_even)

# %% [markdown]
# The prediction counts matrix products only. In NumPy on a CPU the element-wise passes
# (LayerNorm, GELU, softmax, the loss: each a trip through memory) and Python's overhead
# take a real share of a step that FLOPs do not see, and that share is the same for full
# fine-tuning and LoRA — so the measured saving is *smaller* than predicted. (On a model
# as tiny as the fast mode's, overhead dominates and the measured ratio says more about
# the machine's load than about LoRA; on a shared machine timings scatter from run to
# run in any case.) The lesson to keep: **LoRA saves memory in
# proportion to $r$, but time only up to about a third, and only at a rank well below
# the break-even**, because the forward and the input-gradient backward still run
# through every frozen weight.
#
# ## 5. Fine-tuning with the same step budget
#
# Now each variant trains for the same number of steps on the same sequence of recipe
# batches (`seed=1` for all), with the same warm-up + cosine schedule, gradient clipping
# at 1 and no weight decay. Only the peak learning rate differs: full fine-tuning
# moves every pre-trained weight and takes a gentler rate ($10^{-3}$ here) than LoRA,
# whose $B$ starts at zero — the update $\frac{\alpha}{r}(BA)^\top$ starts at exactly
# nothing and must grow, and AdamW moves each element of $A$ and $B$ by about the
# learning rate per step, so LoRA is usually run with a rate several times larger
# ($10^{-2}$ here). With $\alpha$ fixed, $\frac{\alpha}{r}$ shrinks as $r$ grows, which
# keeps the size of the update comparable across ranks.
#
# We record the validation loss on recipes during training, and at the end on both
# corpora: a fine-tune should lower the recipes loss; how much the stories loss rises
# measures what was forgotten.

# %%
def finetune_config(lr):
    return ml.TrainConfig(max_steps=FT_STEPS, batch_size=BATCH, lr=lr, min_lr=lr / 10,
                          warmup_steps=max(1, FT_STEPS // 10), weight_decay=0.0, grad_clip=1.0,
                          eval_interval=EVAL_EVERY, eval_batches=None, seed=1, progress=False)


runs, final_loss, train_seconds = {}, {}, {}
for name in VARIANTS:
    lr = FULL_LR if name == "full" else LORA_LR
    t0 = time.perf_counter()
    runs[name] = ml.train(models[name], text_batches(recipes_train, BATCH, BLOCK), recipes_eval,
                          finetune_config(lr))
    train_seconds[name] = time.perf_counter() - t0
    final_loss[name] = {"recipes": ml.evaluate(models[name], recipes_eval()),
                        "stories": ml.evaluate(models[name], stories_eval())}
    tok_s = np.median([s.tokens_per_s for s in runs[name].train_history])
    print(f"{name:<12} lr {lr:.0e}: {FT_STEPS} steps in {train_seconds[name]:5.1f} s "
          f"(median {tok_s:,.0f} tokens/s)   val loss recipes {base_loss['recipes']:.3f} -> "
          f"{final_loss[name]['recipes']:.3f}, stories {base_loss['stories']:.3f} -> "
          f"{final_loss[name]['stories']:.3f}")
    assert final_loss[name]["recipes"] < base_loss["recipes"], f"{name} did not lower the recipes loss"

# %% [markdown]
# ## 6. What has to be kept on disk
#
# A fully fine-tuned model is a whole new copy: `model.safetensors` holds every
# parameter, $4 N$ bytes in float32. A LoRA fine-tune is the base (shared by every task)
# plus `adapter_model.safetensors` with only $A$ and $B$, $4 N_{\text{LoRA}}$ bytes. A
# safetensors file is a small JSON header (names, shapes, offsets) followed by the raw
# arrays, so each file should be its parameter count times four plus a few KiB.

# %%
file_bytes, header_bytes = {}, {}
paths = ml.save_model(models["full"], os.path.join(WORK, "full"))
file_bytes["full"] = os.path.getsize(paths["weights"])
for r in RANKS:
    name = f"LoRA r={r}"
    paths = ml.save_adapter(models[name], os.path.join(WORK, f"adapter_r{r}"), base_reference=BASE_DIR)
    file_bytes[name] = os.path.getsize(paths["weights"])
for name in VARIANTS:
    header_bytes[name] = file_bytes[name] - 4 * trainable[name]
    assert 0 < header_bytes[name] < 64 * 1024, f"{name}: {file_bytes[name]} bytes is not 4 x {trainable[name]} + a header"
    print(f"{name:<12} {'model' if name == 'full' else 'adapter'} file {file_bytes[name] / 1024:>9.1f} KiB "
          f"= 4 x {trainable[name]:,} + {header_bytes[name]:,} header bytes "
          f"({100 * file_bytes[name] / file_bytes['full']:.1f}% of the full model's file)")
assert file_bytes[f"LoRA r={RANKS[0]}"] < 0.10 * file_bytes["full"], "a small-rank adapter is a small file"

# %% [markdown]
# ## 7. No extra latency once merged
#
# An unmerged adapter adds its two small products to every adapted layer's forward.
# After training, `ml.merge_lora` folds $\frac{\alpha}{r}(BA)^\top$ into $W$: the merged
# model has exactly the base model's shape and cost, and computes the same function up
# to float32 rounding.

# %%
name = f"LoRA r={RANKS[len(RANKS) // 2]}"
adapted = models[name]
adapted.eval()
x_eval = recipes_val[:BATCH * BLOCK].reshape(BATCH, BLOCK)        # (B, T) validation tokens


def forward_ms(model, repeats=2 * TIMING_REPEATS):
    with ml.no_grad():
        model.forward(x_eval)                                     # warm-up
        return 1000 * min(_timed(model) for _ in range(repeats))


def _timed(model):
    t0 = time.perf_counter()
    model.forward(x_eval)
    return time.perf_counter() - t0


with ml.no_grad():
    unmerged_logits = adapted.forward(x_eval)                     # (B, T, V)
t_unmerged = forward_ms(adapted)
ml.merge_lora(adapted)
with ml.no_grad():
    merged_logits = adapted.forward(x_eval)
t_merged, t_base = forward_ms(adapted), forward_ms(base)
diff = float(np.abs(merged_logits - unmerged_logits).max())
print(f"{name}: max |merged - unmerged logit| = {diff:.1e} (logits up to {float(np.abs(unmerged_logits).max()):.1f})")
print(f"forward of a ({BATCH}, {BLOCK}) batch: base {t_base:.1f} ms, adapter unmerged {t_unmerged:.1f} ms, "
      f"merged {t_merged:.1f} ms")
assert diff < 1e-3, f"merging changed the logits by {diff:.1e}"
ml.unmerge_lora(adapted)

# %% [markdown]
# ## 8. The whole bill

# %%
def kib(n):
    return f"{n / 1024:,.1f} KiB" if n < 1024 ** 2 else f"{n / 1024 ** 2:,.2f} MiB"


header = ["", "trainable", "% of base", "grads + AdamW", "ms/step", "file", "val recipes", "val stories"]
rows = [["base (no fine-tune)", "", "", "", "", kib(os.path.getsize(os.path.join(BASE_DIR, "model.safetensors"))),
         f"{base_loss['recipes']:.3f}", f"{base_loss['stories']:.3f}"]]
for name in VARIANTS:
    rows.append([name if name != "full" else "full fine-tuning", f"{trainable[name]:,}",
                 f"{100 * trainable[name] / N_FULL:.2f}%", kib(grad_bytes[name] + state_bytes[name]),
                 f"{step_ms[name]:.1f}", kib(file_bytes[name]),
                 f"{final_loss[name]['recipes']:.3f}", f"{final_loss[name]['stories']:.3f}"])
widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
fmt = lambda row: "| " + " | ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                                    for i, (c, w) in enumerate(zip(row, widths))) + " |"
print(fmt(header))
print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
for row in rows:
    print(fmt(row))

best_lora = min(VARIANTS[1:], key=lambda n: final_loss[n]["recipes"])
learned_full = base_loss["recipes"] - final_loss["full"]["recipes"]
forgot_full = final_loss["full"]["stories"] - base_loss["stories"]
print(f"\nafter {FT_STEPS} steps: full fine-tuning reaches {final_loss['full']['recipes']:.3f} on recipes, "
      f"the best LoRA ({best_lora}) {final_loss[best_lora]['recipes']:.3f}")
for name in VARIANTS:
    learned = base_loss["recipes"] - final_loss[name]["recipes"]
    forgot = final_loss[name]["stories"] - base_loss["stories"]
    verdict = "" if name == "full" else (
        f"  -> learned {'less' if learned < learned_full else 'more'} and forgot "
        f"{'less' if forgot < forgot_full else 'more'} than full fine-tuning")
    print(f"{name:<12} recipes loss {-learned:+.3f} (learning), stories loss {forgot:+.3f} (forgetting){verdict}")

# %% [markdown]
# Two plots: the recipes validation loss during each fine-tune (with the base model's
# as the line to beat), and the costs side by side — on log scales where they span
# orders of magnitude.

# %%
fig, (ax, ax_f) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
for i, name in enumerate(VARIANTS):
    hist = runs[name].val_history
    ax.plot([0] + [e.step for e in hist], [base_loss["recipes"]] + [e.loss for e in hist], "o-",
            ms=3, color=f"C{i}", label=name)
ax.axhline(base_loss["recipes"], color="gray", ls="--", lw=1, label="base model")
ax.set_xlabel("fine-tuning step"); ax.set_ylabel("validation loss on recipes")
ax.set_title("fine-tuning on recipes, same step budget")
ax.legend(); ax.grid(alpha=0.3)
labels = ["base"] + VARIANTS
positions = np.arange(len(labels))
recipes_vals = [base_loss["recipes"]] + [final_loss[n]["recipes"] for n in VARIANTS]
stories_vals = [base_loss["stories"]] + [final_loss[n]["stories"] for n in VARIANTS]
ax_f.bar(positions - 0.2, recipes_vals, 0.4, label="recipes (new)")
ax_f.bar(positions + 0.2, stories_vals, 0.4, label="stories (old)")
ax_f.set_xticks(positions); ax_f.set_xticklabels(labels, rotation=20)
ax_f.set_ylim(0.8 * min(recipes_vals + stories_vals), 1.05 * max(recipes_vals + stories_vals))
ax_f.set_ylabel("final validation loss"); ax_f.set_title("learning vs forgetting")
ax_f.legend(); ax_f.grid(alpha=0.3, axis="y")
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "05_validation_loss.png"), dpi=120)
plt.close(fig)

fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
colors = [f"C{i}" for i in range(len(VARIANTS))]
panels = [("trainable parameters", [trainable[n] for n in VARIANTS], True),
          ("gradients + AdamW state (bytes)", [grad_bytes[n] + state_bytes[n] for n in VARIANTS], True),
          ("time per training step (ms, fastest)", [step_ms[n] for n in VARIANTS], False),
          ("file to keep (bytes)", [file_bytes[n] for n in VARIANTS], True)]
for ax, (title, values, log) in zip(axes, panels):
    ax.bar(VARIANTS, values, color=colors)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(min(values) / 3, max(values) * 2)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", rotation=30)
    ax.grid(alpha=0.3, axis="y")
axes[2].plot(VARIANTS, [step_ms["full"] * flops[n] / flops["full"] for n in VARIANTS], "k_", ms=28, mew=2,
             label="FLOP estimate")
axes[2].legend(fontsize=8, loc="lower center")
fig.suptitle(f"full fine-tuning vs LoRA on a {N_FULL:,}-parameter GPT (C = {N_EMBD}, L = {N_LAYER})")
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "05_costs.png"), dpi=120)
plt.close(fig)
print("saved", os.path.join(FIGURES, "05_validation_loss.png"), "and", os.path.join(FIGURES, "05_costs.png"))

# %% [markdown]
# ## What we measured
#
# * **Parameters, optimizer memory, files** shrink in proportion to $r$: $r(I+O)$ per
#   matrix instead of $IO$, $8$ bytes of AdamW state and $4$ of gradient per trainable
#   number, $4$ bytes per number on disk. On a model this narrow, "low" rank has to be
#   read relative to $C$: $r = 32$ on $C = 128$ trains a third as many numbers as the
#   whole model; on GPT-2 small the same rank would train about 4%.
# * **Time** shrinks by at most about a third: the forward and the input-gradient
#   backward run through every frozen weight; only the weight-gradient products are
#   skipped (and the optimizer's update shrinks to the adapters).
# * **Quality** is where the equal step budget shows. Every fine-tune learns the new
#   domain (checked). Full fine-tuning moves every weight — the embeddings and the tied
#   output head included, which LoRA leaves frozen here — and on a model this small it
#   tends to get further in the same number of steps; a larger rank closes part of the
#   gap. How much of the old domain each gives up is in the last column. On
#   billion-parameter models, Biderman et al. (2024, *LoRA Learns Less and Forgets
#   Less*) found LoRA trading some learning for less forgetting; the lines printed
#   above say which half of that this tiny run reproduces — a claim worth checking
#   rather than assuming.
# * Merged, the adapter costs nothing at inference.

# %%
print(f"lesson 5 done in {time.perf_counter() - LESSON_START:.1f} s")
