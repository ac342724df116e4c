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
# # Lesson 6 — On a GPU with CuPy
#
# Nothing in the math of the earlier lessons knows where its arrays live. CuPy is a
# NumPy look-alike whose arrays sit in GPU memory and whose functions launch GPU
# kernels: `cupy.tanh(x)`, `x @ W`, `x.sum(axis=-1)` mean the same as in NumPy. minilora
# uses this to run **one code path** on both: every operation asks the arrays it was
# given which module they belong to, and calls that module.
#
# This lesson shows how, checks that the two backends compute the same numbers — and
# what "the same" can mean in floating point —, measures what gets faster, and runs a
# LoRA fine-tune on the GPU. Without a CUDA GPU and CuPy (`pip install -e ".[gpu]"`,
# which installs `cupy-cuda12x`), it says so, does the CPU-side parts, and still ends
# successfully: the GPU cells are skipped, not failed.
#
# Letters: B batch, T time, C channels, V vocabulary, L layers.
#
# Run it as a script (`python tutorials/06_gpu_with_cupy.py`, add `--fast` or
# `MINILORA_FAST=1` for the small CI version) or open it as a notebook with jupytext.

# %%
import inspect
import os
import sys
import time

import matplotlib
import matplotlib.patches

if "ipykernel" not in sys.modules:  # a script or CI: draw to files only
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import minilora as ml
from minilora import backend
from minilora.ops.gelu import gelu_forward

FAST = os.environ.get("MINILORA_FAST") == "1" or "--fast" in sys.argv
_HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
FIGURES = os.environ.get("MINILORA_FIGURES", os.path.join(_HERE, "figures"))
os.makedirs(FIGURES, exist_ok=True)
LESSON_START = time.perf_counter()

GPU = ml.cuda_available()            # CuPy installed *and* a CUDA device visible
if GPU:
    import cupy as cp                # only for synchronize() and the device name below
    device_name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    device_name = device_name.decode() if isinstance(device_name, bytes) else str(device_name)
    print(f"GPU found: {device_name} (CuPy {cp.__version__})")
else:
    print("no CUDA GPU / CuPy found: skipping the GPU part "
          "(the CPU-side parts of this lesson still run; install with pip install -e \".[gpu]\")")

# Model sizes. The parity checks use a tiny model; the timings a medium one, where the
# GPU has enough work per kernel to show what it can do.
PARITY = ml.GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
PARITY_BATCH = 4
if FAST:   # small enough for CI
    SPEED = ml.GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=128, dropout=0.0)
    SPEED_BATCH, GEN_TOKENS, REPEATS, LORA_STEPS = 8, 24, 3, 15
else:      # the numbers a reader should see
    SPEED = ml.GPTConfig(vocab_size=4096, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.0)
    SPEED_BATCH, GEN_TOKENS, REPEATS, LORA_STEPS = 8, 128, 3, 60
print(f"mode: {'fast' if FAST else 'full'}; figures go to {FIGURES}")

# %% [markdown]
# ## 1. One code path
#
# `minilora.backend` is the only file of the package that imports CuPy (and it survives
# CuPy's absence). Everything else follows one rule: **never call `np.` on a value that
# may live on the GPU; ask the value instead**,
#
# ```python
# xp = get_array_module(x)     # numpy for a NumPy array, cupy for a CuPy array
# ```
#
# and then call `xp.tanh`, `xp.exp`, ... The operators (`@`, `+`, `*=`, indexing) need
# no `xp` at all: they are methods of the arrays. Here is the start of the GELU forward
# from `minilora/ops/gelu.py` — the line with `xp` is all it takes:

# %%
source = inspect.getsource(gelu_forward).splitlines()
print("\n".join(source[:5] + ["    ..."] + [line for line in source if "xp." in line]))

# %% [markdown]
# The rest of the backend module is small: `to_device(x, "cpu" | "cuda")` moves an
# array, `to_numpy(x)` gives a NumPy copy wherever `x` lives (for printing, saving and
# comparing), `device_of(x)` says where it is. `model.to("cuda")` moves every parameter
# (and the generators that draw dropout masks); inputs given as NumPy arrays are moved
# by the model itself, and `generate` returns NumPy token ids. Files are always written
# from host copies, so a checkpoint saved on a GPU loads on a CPU.
#
# On the CPU, everything is NumPy:

# %%
model = ml.GPT(PARITY, seed=0, dtype="float32")
params = dict(model.named_parameters())
assert all(type(p.data) is np.ndarray for p in params.values()), "a CPU model holds NumPy arrays"
assert all(backend.get_array_module(p.data) is np for p in params.values())
assert model.device == "cpu" and backend.device_of(params["ln_f.weight"].data) == "cpu"
assert backend.to_numpy(params["ln_f.weight"].data) is params["ln_f.weight"].data, "no copy on the CPU"
print(f"{len(params)} parameter arrays, all {type(params['ln_f.weight'].data).__module__}."
      f"{type(params['ln_f.weight'].data).__name__}; get_array_module -> "
      f"{backend.get_array_module(params['ln_f.weight'].data).__name__}; model.device = {model.device!r}")
if GPU:
    model.to("cuda")
    assert all(isinstance(p.data, cp.ndarray) for p in model.parameters())
    assert backend.get_array_module(model.parameters()[0].data) is cp and model.device == "cuda"
    print(f"after model.to('cuda'): get_array_module -> {backend.get_array_module(model.parameters()[0].data).__name__}")
    model.to("cpu")
    assert all(type(p.data) is np.ndarray for p in model.parameters()), "to('cpu') brings NumPy arrays back"

# %% [markdown]
# ## 2. Same seed, same model — on either backend
#
# CuPy has its own random generators, which draw other numbers than NumPy's for the
# same seed. So minilora never draws parameters on the GPU: every weight is drawn by
# NumPy's seeded `Generator`, in float64, on the CPU, in a fixed order, then cast to the
# model's dtype and only then moved. Hence three checks: two models from one seed are
# bitwise equal; the float32 model is exactly the float64 model rounded to float32; and
# a model moved to the GPU holds bitwise the CPU model's numbers. (Dropout masks are the
# exception: they are drawn where the activations live, so the two backends draw
# different, equally valid masks. The parity checks below use dropout 0.)

# %%
a, b = ml.GPT(PARITY, seed=0), ml.GPT(PARITY, seed=0)
other = ml.GPT(PARITY, seed=1)
m64 = ml.GPT(PARITY, seed=0, dtype="float64")
for name, p in a.named_parameters():
    q, q64 = dict(b.named_parameters())[name], dict(m64.named_parameters())[name]
    assert np.array_equal(p.data, q.data), f"{name}: same seed, different weights"
    assert np.array_equal(p.data, q64.data.astype(np.float32)), f"{name}: float32 is not float64 rounded"
assert not np.array_equal(a.token_embedding.weight.data, other.token_embedding.weight.data)
print("same seed -> bitwise the same weights; float32 weights = float64 weights rounded once")
if GPU:
    on_gpu = ml.GPT(PARITY, seed=0).to("cuda")
    for (name, p), q in zip(a.named_parameters(), on_gpu.parameters()):
        assert np.array_equal(p.data, ml.to_numpy(q.data)), f"{name} differs on the GPU"
    print("and on the GPU: bitwise the same weights")

# %% [markdown]
# ## 3. What "the same numbers" can mean
#
# Bitwise equal *weights* do not give bitwise equal *results*. A GPU sums the terms of
# a matrix product in another order than a CPU BLAS (many threads, each with a partial
# sum), and its `exp` and `tanh` may round differently in the last bit. Floating-point
# addition is not associative: each addition rounds to a relative error of at most
# $u = 2^{-24} \approx 6\cdot 10^{-8}$ in float32 ($2^{-53} \approx 1.1\cdot 10^{-16}$ in
# float64), and a sum of $K$ terms accumulates errors that grow like $\sqrt K\,u$
# typically, $K u$ at worst. Through a few layers of a network the results then differ
# in their last few digits: a relative error of about $10^{-6}$ in float32 and
# $10^{-14}$ in float64 is *agreement*, not a bug.
#
# How big is that noise here? We can measure it without a GPU: run the float32 model and
# the float64 model (the same weights, see above) on the same batch and compare the
# logits and every parameter gradient, by the norm-wise relative error
#
# $$
# \text{err}(a, b) = \frac{\lVert a - b\rVert}{\lVert b\rVert}
# $$
#
# (element-wise ratios would blow up on entries that are nearly zero). One gradient needs
# another yardstick: the **key bias**'s is exactly zero. Adding $b$ to every key adds
# $q \cdot b$ to every score of a query — the same for all keys — and softmax ignores a
# constant shift, so $\partial L / \partial b_k = 0$. What either precision computes for
# it is pure rounding noise, and noise divided by noise means nothing; we measure it
# against the median gradient norm instead (and check, in float64, that it is zero up
# to rounding — an identity the hand-written backward must respect). A float32 GPU
# result differs from a float32 CPU result by noise of the same kind and size. So the
# parity checks use the tolerances **$10^{-4}$ in float32** — the measured float32 noise
# must sit well below it — and **$10^{-10}$ in float64**, thousands of times the float64
# noise and a million times below any real bug (a wrong term in a gradient shows up as
# an error of order 1).

# %%
TOL = {"float32": 1e-4, "float64": 1e-10}


def rel_err(a, b):
    a = ml.to_numpy(a).astype(np.float64)
    b = ml.to_numpy(b).astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


ZERO_GRADIENT = ".attn.k_proj.bias"   # exactly zero in exact arithmetic (see above)


def grad_errors(grads, ref):
    """err(grads[n], ref[n]) for every parameter; for the key biases, whose exact gradient
    is zero, the difference is measured against the median gradient norm instead."""
    typical = float(np.median([np.linalg.norm(g) for g in ref.values()]))
    return {n: float(np.linalg.norm(ml.to_numpy(grads[n]) - g) /
                     (typical if n.endswith(ZERO_GRADIENT) else np.linalg.norm(g)))
            for n, g in ref.items()}


def forward_backward(model, x, y):
    """Logits (B, T, V), loss, and every parameter's gradient as NumPy float64 copies."""
    logits = model.forward(x)                              # (B, T, V)
    loss, dlogits = ml.cross_entropy(logits, y)
    model.zero_grad()
    model.backward(dlogits)
    grads = {n: ml.to_numpy(p.grad).astype(np.float64) for n, p in model.named_parameters()}
    return ml.to_numpy(logits).astype(np.float64), loss, grads


rng = np.random.default_rng(0)
x_small = rng.integers(0, PARITY.vocab_size, size=(PARITY_BATCH, PARITY.block_size))   # (B, T)
y_small = rng.integers(0, PARITY.vocab_size, size=(PARITY_BATCH, PARITY.block_size))   # (B, T)
ref = forward_backward(ml.GPT(PARITY, seed=0, dtype="float64"), x_small, y_small)      # the reference
f32 = forward_backward(ml.GPT(PARITY, seed=0, dtype="float32"), x_small, y_small)
typical = float(np.median([np.linalg.norm(g) for g in ref[2].values()]))
for n, g in ref[2].items():
    if n.endswith(ZERO_GRADIENT):
        assert np.linalg.norm(g) < 1e-12 * typical, f"{n}: the key-bias gradient must vanish"
print(f"key-bias gradients in float64: at most {max(np.linalg.norm(g) for n, g in ref[2].items() if n.endswith(ZERO_GRADIENT)) / typical:.0e}"
      " of the median gradient norm (zero up to rounding)")
noise32 = {"logits": rel_err(f32[0], ref[0])}
noise32.update(grad_errors(f32[2], ref[2]))
worst = max(noise32, key=noise32.get)
print(f"float32 vs float64 on the CPU: logits {noise32['logits']:.1e}; gradients median "
      f"{np.median([v for k, v in noise32.items() if k != 'logits']):.1e}, worst {noise32[worst]:.1e} ({worst}); "
      f"loss {abs(f32[1] - ref[1]) / ref[1]:.1e}")
assert max(noise32.values()) < TOL["float32"] / 10, "float32 noise must sit well below the float32 tolerance"

fig, ax = plt.subplots(figsize=(11, 3.8))
names = list(noise32)
colors = ["C1"] + ["C7" if n.endswith(ZERO_GRADIENT) else "C0" for n in names[1:]]
ax.bar(range(len(names)), [noise32[n] for n in names], color=colors)
ax.axhline(TOL["float32"], color="C3", ls="--", label="float32 parity tolerance")
ax.axhline(np.finfo(np.float32).eps / 2, color="gray", ls=":", label="float32 unit roundoff $u$")
ax.set_yscale("log")
ax.set_xticks(range(len(names)))
ax.set_xticklabels([n.replace("blocks.", "b").replace(".weight", ".W").replace(".bias", ".b") for n in names],
                   rotation=90, fontsize=7)
ax.set_ylabel("relative error (norm-wise)")
ax.set_title("float32 vs float64, same weights, same batch: the size of float32 noise (CPU)")
handles, _ = ax.get_legend_handles_labels()
handles.append(matplotlib.patches.Patch(color="C7", label="key biases (exact gradient 0): vs the median gradient norm"))
ax.legend(handles=handles, fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "06_float32_noise.png"), dpi=120)
plt.close(fig)

# %% [markdown]
# ## 4. Parity: NumPy vs CuPy
#
# Now the real comparison (GPU only): the same model (same seed), on the same batch, on
# both backends, in float64 and in float32 — the logits, the loss and the gradient of
# every parameter. And in float64, greedy generation must pick the same tokens on both
# (a near-tie between the two likeliest tokens that $10^{-14}$ could flip is not
# something a random model produces; in float32 it could happen, so we do not ask it).
#
# (A note on float32 matrix products: recent NVIDIA GPUs can multiply float32 matrices
# in TF32, with a 10-bit mantissa, far coarser than float32's 23 bits. CuPy does not do
# this unless the environment variable `CUPY_TF32=1` asks for it; with it, expect
# float32 errors near $10^{-3}$ and this check to fail — as it should.)

# %%
# NOTE: this GPU branch (sections 4 to 6) was written against CuPy's documented API but
# has not yet been run on a GPU: the machine it was written on had none.
parity = {}
if GPU:
    for dtype in ("float64", "float32"):
        cpu_model = ml.GPT(PARITY, seed=0, dtype=dtype)
        gpu_model = ml.GPT(PARITY, seed=0, dtype=dtype).to("cuda")
        c_logits, c_loss, c_grads = forward_backward(cpu_model, x_small, y_small)
        g_logits, g_loss, g_grads = forward_backward(gpu_model, x_small, y_small)  # NumPy ids are moved
        assert isinstance(gpu_model.parameters()[0].grad, cp.ndarray), "gradients stay on the GPU"
        errs = {"logits": rel_err(g_logits, c_logits), "loss": abs(g_loss - c_loss) / abs(c_loss)}
        errs.update(grad_errors(g_grads, c_grads))
        parity[dtype] = errs
        worst = max(c_grads, key=errs.get)
        print(f"{dtype}: CuPy vs NumPy: logits {errs['logits']:.1e}, loss {errs['loss']:.1e}, "
              f"worst of {len(c_grads)} gradients {errs[worst]:.1e} ({worst}); tolerance {TOL[dtype]:.0e}")
        for n, e in errs.items():
            assert e < TOL[dtype], f"{dtype}: {n} differs between NumPy and CuPy by {e:.1e} (tolerance {TOL[dtype]:.0e})"

    cpu64 = ml.GPT(PARITY, seed=0, dtype="float64")
    gpu64 = ml.GPT(PARITY, seed=0, dtype="float64").to("cuda")
    prompt = x_small[:1, :4]                                        # (1, 4)
    n_new = PARITY.block_size - prompt.shape[1]
    tokens_cpu = cpu64.generate(prompt, n_new, temperature=0)
    tokens_gpu = gpu64.generate(prompt, n_new, temperature=0)      # NumPy ids come back
    assert isinstance(tokens_gpu, np.ndarray)
    assert np.array_equal(tokens_cpu, tokens_gpu), "greedy float64 generation differs between backends"
    print(f"greedy generation of {n_new} tokens in float64: identical on both backends")
else:
    print("no GPU: parity NumPy vs CuPy skipped")

# %% [markdown]
# ## 5. What gets faster, and what does not
#
# A GPU has tens of teraFLOPs where a laptop CPU has a fraction of one — for work that
# comes in large pieces. Every CuPy call launches a kernel, and each launch costs some
# microseconds of CPU time before the GPU does anything, so a call is worth it only when
# its array is large. Two consequences:
#
# * A **training step** on a medium model is mostly large matrix products, $B T$ rows
#   at a time: the GPU is many times faster.
# * **Generation** feeds one token per step: every matrix product has one row, the
#   hundreds of kernels per token are nearly all launch overhead, and each step also
#   copies the last logits to the host to sample the next token (which waits for the GPU
#   to finish). The speed-up is much smaller — for a tiny model the CPU can even win.
#
# Timing a GPU needs care: CuPy calls return as soon as the kernel is *queued*, so a
# stopwatch around them measures the queueing. We call
# `cupy.cuda.Device().synchronize()`, which waits until the GPU has finished, before
# reading the clock; we run each thing once before timing it (the first call of a
# CuPy function compiles or loads its kernel, and the memory pool fills up); and we keep
# the fastest of a few repeats, since other programs on the machine can only add time.

# %%
def best_seconds(fn, repeats, sync=None):
    """The fastest of ``repeats`` timed calls (other programs' load only ever adds time)."""
    fn()                                          # warm-up: kernel compilation, memory pool
    if sync is not None:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()                                # wait for the GPU before reading the clock
        times.append(time.perf_counter() - t0)
    return min(times)


def make_step(model, x, y):
    opt = ml.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

    def step():
        _, dlogits = ml.cross_entropy(model.forward(x), y)   # (B, T, V)
        model.zero_grad()
        model.backward(dlogits)
        opt.step()
    return step


rng = np.random.default_rng(1)
x_med = rng.integers(0, SPEED.vocab_size, size=(SPEED_BATCH, SPEED.block_size))   # (B, T)
y_med = rng.integers(0, SPEED.vocab_size, size=(SPEED_BATCH, SPEED.block_size))
prompt_med = x_med[:1, :8]                                                        # (1, 8)
devices = ["cpu"] + (["cuda"] if GPU else [])
step_s, gen_s = {}, {}
for device in devices:
    model = ml.GPT(SPEED, seed=0, dtype="float32").to(device)
    x_dev, y_dev = backend.to_device(x_med, device), backend.to_device(y_med, device)
    sync = cp.cuda.Device().synchronize if device == "cuda" else None
    n_params = model.num_parameters()
    step_s[device] = best_seconds(make_step(model, x_dev, y_dev), REPEATS, sync)
    gen_s[device] = best_seconds(lambda: model.generate(prompt_med, GEN_TOKENS, temperature=0), REPEATS, sync)
    print(f"{device:>4}: training step ({SPEED_BATCH}x{SPEED.block_size} tokens) {1000 * step_s[device]:8.1f} ms; "
          f"generating {GEN_TOKENS} tokens {1000 * gen_s[device]:8.1f} ms "
          f"({1000 * gen_s[device] / GEN_TOKENS:.2f} ms per token)")
if GPU:
    print(f"speed-up on the GPU: training step {step_s['cpu'] / step_s['cuda']:.1f}x, "
          f"generation {gen_s['cpu'] / gen_s['cuda']:.1f}x")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
for ax, (title, secs) in zip(axes, [(f"training step, B={SPEED_BATCH}, T={SPEED.block_size}", step_s),
                                    (f"generating {GEN_TOKENS} tokens (KV cache)", gen_s)]):
    bars = ax.bar(range(len(devices)), [1000 * secs[d] for d in devices], width=0.5,
                  color=["C0", "C2"][:len(devices)])
    ax.set_xticks([0, 1])
    ax.set_xticklabels(["cpu (NumPy)", "cuda (CuPy)"])
    ax.set_xlim(-0.75, 1.75)
    ax.set_ylabel("ms (fastest of %d)" % REPEATS)
    ax.set_title(title, fontsize=10)
    if GPU:  # a log scale: the two bars may differ a hundredfold
        ax.set_yscale("log")
        ax.bar_label(bars, labels=["", f"speed-up {secs['cpu'] / secs['cuda']:.1f}x"])
        ax.set_ylim(1000 * min(secs.values()) / 5, 1000 * max(secs.values()) * 3)
    else:
        ax.text(1, 500 * secs["cpu"], "not measured:\nno CUDA GPU / CuPy", ha="center", va="center", color="gray")
    ax.grid(alpha=0.3, axis="y")
suffix = f"NumPy vs CuPy on {device_name}" if GPU else "NumPy only: no CUDA GPU / CuPy found"
fig.suptitle(f"a {n_params / 1e6:.1f}M-parameter GPT (L={SPEED.n_layer}, C={SPEED.n_embd}), float32 — {suffix}",
             fontsize=10)
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "06_speed.png"), dpi=120)
plt.close(fig)

# %% [markdown]
# ## 6. A LoRA fine-tune on the GPU
#
# Nothing changes for LoRA: `add_lora` creates $A$ and $B$ with NumPy's generator and
# puts them on the device of the weight they adapt, and `ml.train` moves each batch to
# the model's device. Three checks (GPU only):
#
# 1. one LoRA fine-tune, run for a few AdamW steps on one batch on both backends in
#    float64, ends with the same adapter weights (the whole chain — forward, backward,
#    the adapter gradients, AdamW — agrees);
# 2. `ml.train` on the GPU lowers the loss on built-in recipes while the base weights
#    stay bitwise unchanged;
# 3. the adapter saved from the GPU (a host copy is written) loads into a CPU model,
#    which then computes the GPU model's logits.

# %%
if GPU:
    import tempfile

    from minilora.data import encode_corpus, load_builtin, split_text
    from minilora.tokenizer import CharTokenizer
    from minilora.train import text_batches, text_eval_batches

    lora_cfg = ml.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])

    # 1. the same LoRA steps on both backends, float64
    finals = {}
    for device in ("cpu", "cuda"):
        m = ml.GPT(PARITY, seed=0, dtype="float64").to(device)
        ml.add_lora(m, lora_cfg, seed=0)
        trainable = [p for p in m.parameters() if p.requires_grad]
        opt = ml.AdamW(trainable, lr=1e-2, weight_decay=0.0)
        for _ in range(3):
            _, dlogits = ml.cross_entropy(m.forward(x_small), y_small)
            m.zero_grad()
            m.backward(dlogits)
            opt.step()
        finals[device] = {n: ml.to_numpy(p.data) for n, p in m.named_parameters() if p.requires_grad}
    worst = max(rel_err(finals["cuda"][n], finals["cpu"][n]) for n in finals["cpu"])
    print(f"3 LoRA steps in float64: adapter weights on GPU vs CPU differ by at most {worst:.1e}")
    # 1e-8, not 1e-10: AdamW divides by sqrt(v), which amplifies differences where gradients are small
    assert worst < 1e-8, f"LoRA training differs between backends by {worst:.1e}"

    # 2. ml.train on the GPU
    text = load_builtin("recipes", size=30_000 if FAST else 100_000)
    tokenizer = CharTokenizer.train(text)
    train_tokens, val_tokens = split_text(encode_corpus(tokenizer, text))
    cfg = ml.GPTConfig(vocab_size=tokenizer.vocab_size, block_size=SPEED.block_size, n_layer=SPEED.n_layer,
                       n_head=SPEED.n_head, n_embd=SPEED.n_embd, dropout=0.0)
    gpu_model = ml.GPT(cfg, seed=0, dtype="float32").to("cuda")
    ml.add_lora(gpu_model, lora_cfg, seed=0)
    frozen_before = {n: ml.to_numpy(p.data).copy() for n, p in gpu_model.named_parameters() if not p.requires_grad}
    val_batches = text_eval_batches(val_tokens, SPEED_BATCH, cfg.block_size)
    loss_before = ml.evaluate(gpu_model, val_batches(), max_batches=4)
    t0 = time.perf_counter()
    run = ml.train(gpu_model, text_batches(train_tokens, SPEED_BATCH, cfg.block_size), val_batches,
                   ml.TrainConfig(max_steps=LORA_STEPS, batch_size=SPEED_BATCH, lr=1e-2, min_lr=1e-3,
                                  warmup_steps=max(1, LORA_STEPS // 10), weight_decay=0.0,
                                  eval_interval=0, eval_batches=4, progress=False))
    cp.cuda.Device().synchronize()
    seconds = time.perf_counter() - t0
    print(f"LoRA on the GPU: {LORA_STEPS} steps in {seconds:.1f} s; validation loss "
          f"{loss_before:.3f} -> {run.final_val_loss:.3f}")
    assert run.final_val_loss < loss_before, "LoRA training on the GPU should lower the validation loss"
    for n, p in gpu_model.named_parameters():
        assert isinstance(p.data, cp.ndarray), f"{n} left the GPU"
        if n in frozen_before:
            assert np.array_equal(ml.to_numpy(p.data), frozen_before[n]), f"frozen {n} changed"

    # 3. save the adapter from the GPU, use it on the CPU
    with tempfile.TemporaryDirectory() as tmp:
        ml.save_model(ml.GPT(cfg, seed=0, dtype="float32"), os.path.join(tmp, "base"))  # the frozen base
        ml.save_adapter(gpu_model, os.path.join(tmp, "adapter"))
        cpu_model = ml.load_model(os.path.join(tmp, "base"))
        ml.load_adapter(cpu_model, os.path.join(tmp, "adapter"))
    gpu_model.eval()
    cpu_model.eval()
    x_val = val_tokens[None, :cfg.block_size]                       # (1, T)
    with ml.no_grad():
        err = rel_err(gpu_model.forward(x_val), cpu_model.forward(x_val))
    print(f"adapter trained on the GPU, loaded on the CPU: logits agree to {err:.1e}")
    assert err < TOL["float32"], f"the CPU copy computes other logits ({err:.1e})"
else:
    print("no GPU: the LoRA fine-tune on the GPU is skipped")

# %% [markdown]
# ## What to remember
#
# * One code path: `xp = get_array_module(x)`; parameters drawn by NumPy and moved, so a
#   seed names the same model everywhere; `model.to("cuda")` and nothing else changes.
# * "The same" means the same up to rounding noise whose size we can measure: about
#   $10^{-6}$ relative in float32 and $10^{-14}$ in float64 here; the parity checks allow
#   $10^{-4}$ and $10^{-10}$.
# * A GPU speeds up big batched work (training steps) by a large factor, and
#   token-by-token generation of a small model by little or nothing: there, kernel
#   launches and host round trips dominate.

# %%
print(f"lesson 6 done in {time.perf_counter() - LESSON_START:.1f} s"
      + ("" if GPU else " (CPU only: the GPU parts were skipped)"))
