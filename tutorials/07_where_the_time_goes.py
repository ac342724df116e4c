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
# # Lesson 7 — Where a training step's time goes
#
# A teaching implementation that is ten times slower than the real thing teaches the
# wrong lesson: that hand-written backward passes are a toy. They are not. A GPT's
# training step is mostly matrix products, NumPy hands those to the same kind of BLAS
# that PyTorch uses, and the rest is a matter of not wasting work. This lesson measures
# where a minilora step spends its time and shows, each with a number, the habits that
# keep NumPy fast:
#
# 1. count a step's work in FLOPs, measure the machine's matrix-product rate, and get
#    the **model FLOP utilisation** (MFU) of a real step;
# 2. profile a step, op by op;
# 3. three pitfalls: `x ** 3` (tens of times slower), `einsum` without BLAS (several
#    times), float64 (twice);
# 4. temporaries: the textbook GELU allocates three arrays where one is needed;
# 5. elementwise work on every core, with bit-identical results;
# 6. skipping the work a causal mask throws away;
# 7. how to time anything on a shared machine.
#
# Timings are printed, never asserted: they depend on the machine and its load. What is
# asserted is what must hold anywhere — a FLOP count, a result, a number of bytes.
#
# Letters: B batch, T time, C channels, V vocabulary, L layers, H heads.
#
# Run it as a script (`python tutorials/07_where_the_time_goes.py`, add `--fast` or
# `MINILORA_FAST=1` for the small CI version) or open it as a notebook with jupytext.

# %%
import cProfile
import math
import os
import pstats
import statistics
import sys
import time
import tracemalloc

import matplotlib

if "ipykernel" not in sys.modules:  # a script or CI: draw to files only
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import minilora as ml
from minilora.ops.attention import QUERY_BLOCK, attention_forward
from minilora.ops.gelu import gelu_forward
from minilora.ops.softmax import softmax_forward
from minilora.timing import paired_ratio, paired_timing, time_once

FAST = os.environ.get("MINILORA_FAST") == "1" or "--fast" in sys.argv
_HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
FIGURES = os.environ.get("MINILORA_FIGURES", os.path.join(_HERE, "figures"))
os.makedirs(FIGURES, exist_ok=True)
LESSON_START = time.perf_counter()
ml.keep_freed_memory()      # reuse freed memory instead of asking the OS for fresh pages

if FAST:   # small enough for CI: seconds
    CONFIG = ml.GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64)
    BATCH, STEPS, PEAK_N, ARRAY_SHAPE = 8, 3, 512, (512, 512)
else:      # the benchmark's "small" config: the numbers a reader should see
    CONFIG = ml.GPTConfig(vocab_size=2048, block_size=128, n_layer=4, n_head=4, n_embd=256)
    BATCH, STEPS, PEAK_N, ARRAY_SHAPE = 8, 5, 2048, (1024, 1024)
print(f"mode: {'fast' if FAST else 'full'}; figures go to {FIGURES}; "
      f"{ml.threads.get_num_threads()} threads for elementwise work")


def no_sync():
    """Nothing to wait for on the CPU (on a GPU: its queue, minilora.backend.synchronize)."""


def best_of(fn, repeats: int = 5) -> float:
    """The fastest of a few calls, in seconds: the least disturbed by the rest of the
    machine (good for a single operation; a whole step is better summarised by a median)."""
    fn()                                       # warm up: caches, allocator, thread pools
    return min(time_once(fn, no_sync) for _ in range(repeats))


# %% [markdown]
# ## 1. A step's work, and how much of the machine it uses
#
# Almost all of a GPT's arithmetic is in its linear layers. A linear layer with weight
# $W$ (I, O) applied to n rows costs $2nIO$ floating-point operations forward (a
# multiply and an add per weight per row); its backward costs twice that, $dx = dy\,W^\top$
# and $dW = x^\top dy$, one product each. So a training step costs
#
# $$6 \cdot N_\text{matmul} \cdot \text{tokens} \;+\; \text{attention},$$
#
# where $N_\text{matmul}$ counts the weights that take part in products: per block
# $q, k, v, o$ ($C^2$ each) and the MLP ($C \cdot 4C$ twice), $12C^2$; plus the output
# head, the token embedding used as a $C \times V$ matrix. Attention's own products,
# $q k^\top$ and $p\,v$, cost $2 \cdot 2 B T^2 C$ per layer forward, three times that with
# the backward (counted over the whole $T \times T$ matrix, as the benchmark counts it,
# although section 6 shows minilora skipping part of it). (Embedding lookups, LayerNorm, GELU and softmax are linear in the
# number of elements: negligible in FLOPs, not in time, as section 2 shows.)

# %%
model = ml.GPT(CONFIG, seed=0, dtype="float32")
B, T, L, C, V = BATCH, CONFIG.block_size, CONFIG.n_layer, CONFIG.n_embd, CONFIG.vocab_size
linear_weights = sum(m.weight.size for _, m in model.named_modules() if isinstance(m, ml.nn.Linear))
matmul_params = linear_weights + model.token_embedding.weight.size          # + the tied head
assert matmul_params == 12 * L * C * C + V * C, \
    f"the model's product weights ({matmul_params:,}) should be 12 L C^2 + V C"
step_flops = 6 * matmul_params * B * T + 3 * 2 * 2 * B * L * T * T * C
print(f"{model.num_parameters():,} parameters, {matmul_params:,} of them in matrix products")
print(f"one training step on {B}x{T} tokens: {step_flops / 1e9:.2f} GFLOP")

# The machine's rate for one large float32 product: the ceiling for every step.
a = np.random.default_rng(0).standard_normal((PEAK_N, PEAK_N), dtype=np.float32)
peak = 2 * PEAK_N ** 3 / best_of(lambda: a @ a)
print(f"peak float32 matrix product ({PEAK_N}^3): {peak / 1e9:.0f} GFLOP/s")

# One real training step, timed several times (its median).
rng = np.random.default_rng(1)
idx = rng.integers(0, V, size=(B, T))
targets = rng.integers(0, V, size=(B, T))
optimizer = ml.AdamW(model.parameters(), lr=1e-4)


def train_step():
    loss, dlogits = ml.cross_entropy(model.forward(idx), targets, overwrite_logits=True)
    model.zero_grad()
    model.backward(dlogits)
    optimizer.step()
    return loss


train_step()
step_s = statistics.median(time_once(train_step, no_sync) for _ in range(STEPS))
mfu = step_flops / step_s / peak
print(f"training step: {step_s * 1e3:.1f} ms, {B * T / step_s:,.0f} tokens/s, MFU {100 * mfu:.0f}%")

# %% [markdown]
# MFU says how close a step comes to spending all its time in large, efficient
# products. On the benchmark's medium config minilora reached 59–72% on a 2-core CPU
# over three recorded runs, PyTorch 63–75% (README.md, "Performance"); on tiny models much less, for both — many
# small operations, each with a fixed cost.
#
# ## 2. Where the time goes
#
# `cProfile` times every Python function; grouping its "own time" by minilora's file
# gives the time of each op. An operator (`@`, `*`) or a ufunc (`np.exp`) is charged to
# the function that calls it; NumPy's methods and builtins (`.max()`, `.sum()`,
# `np.einsum`) are listed on their own, and land in "NumPy reductions, Python, other".
# The linear layers' products sit in `ops/linear.py`, attention's own products in
# `ops/attention.py`, and the output head's weight gradient is one product written in
# `gpt.py`. Two caveats: cProfile's clock is wall time, and it sees only the main
# thread -- what the worker threads of section 5 compute shows up only as the main
# thread "waiting for worker threads".

# %%
profiler = cProfile.Profile()
profiler.enable()
for _ in range(STEPS):
    train_step()
profiler.disable()

PACKAGE = os.path.dirname(ml.__file__) + os.sep
by_file, linear_calls = {}, 0
for (filename, _, function), (_, calls, own, _, _) in pstats.Stats(profiler).stats.items():
    if function == "linear_forward" and filename.startswith(PACKAGE):
        linear_calls += calls
    if filename.startswith(PACKAGE):
        where = filename[len(PACKAGE):]
    elif function.startswith("<method 'acquire'"):
        where = "waiting for worker threads"
    else:
        where = "NumPy reductions, Python, other"
    by_file[where] = by_file.get(where, 0.0) + own / STEPS
labels = {"ops/linear.py": "ops/linear.py (the matrix products)",
          "gpt.py": "gpt.py (the head's weight gradient)",
          "optim.py": "optim.py (AdamW's update)",
          "threads.py": "threads.py (handing out row blocks)"}
by_file = {labels.get(where, where): seconds for where, seconds in by_file.items()}
total = sum(by_file.values())
ranking = sorted(by_file.items(), key=lambda kv: kv[1], reverse=True)
for where, seconds in ranking[:9]:
    print(f"  {where:<38} {seconds * 1e3:8.2f} ms  {100 * seconds / total:5.1f}%")
assert linear_calls == (6 * L + 1) * STEPS, \
    f"the profile should see 6 linear layers per block and the head per step, got {linear_calls} calls"

top = ranking[:9][::-1]
fig, ax = plt.subplots(figsize=(8.5, 4))
ax.barh([w for w, _ in top], [1e3 * s for _, s in top], color="tab:blue")
ax.set_xlabel("ms per training step (own time, cProfile)")
ax.set_title(f"One training step, {B}x{T} tokens, L={L}, C={C}, V={V}")
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "07_step_profile.png"), dpi=120)
plt.close(fig)

# %% [markdown]
# The products take most of the step; everything else is elementwise passes over
# activations (GELU, LayerNorm, softmax, AdamW's update), each a few NumPy calls. Those
# are where the habits below matter.
#
# ## 3. Three pitfalls
#
# * `x ** 3` on a float array calls the general power function (logarithm and
#   exponential per element); `x * x * x` is two multiplications. (NumPy special-cases
#   `x ** 2` as a square; other exponents pay.)
# * `np.einsum` contracts with its own loops unless told `optimize=True`, which lets it
#   hand a *matrix product* to the BLAS; `@` on float32 or float64 arrays always does.
#   For a sum along an axis -- minilora's row sums -- plain `einsum` is the fast way.
# * float64 moves twice the bytes and does half the arithmetic per instruction.

# %%
x = np.random.default_rng(2).standard_normal(ARRAY_SHAPE, dtype=np.float32)
power, repeated = best_of(lambda: x ** 3), best_of(lambda: x * x * x)
np.testing.assert_allclose(x ** 3, x * x * x, rtol=1e-6)
print(f"x ** 3: {power * 1e3:.2f} ms, x * x * x: {repeated * 1e3:.2f} ms ({power / repeated:.0f}x)")

half = ARRAY_SHAPE[0] // 2
left, right = x[:half, :half].copy(), x[:half, :].copy()
plain, blas = best_of(lambda: np.einsum("ij,jk->ik", left, right), 3), best_of(lambda: left @ right)
np.testing.assert_allclose(np.einsum("ij,jk->ik", left, right), left @ right, rtol=1e-4, atol=1e-4)
print(f"einsum 'ij,jk->ik': {plain * 1e3:.2f} ms, left @ right: {blas * 1e3:.2f} ms ({plain / blas:.0f}x)")

a64 = a.astype(np.float64)
f32, f64 = best_of(lambda: a @ a, 3), best_of(lambda: a64 @ a64, 3)     # side by side
print(f"{PEAK_N}^3 product in float64: {f64 * 1e3:.1f} ms, in float32: {f32 * 1e3:.1f} ms ({f64 / f32:.1f}x)")
np.testing.assert_allclose(a @ a, a64 @ a64, rtol=1e-3, atol=1e-2 * math.sqrt(PEAK_N))

# %% [markdown]
# ## 4. Temporaries
#
# The textbook GELU, `0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))`, makes
# NumPy create temporary arrays as it goes: it frees each as soon as it is used (and,
# for large arrays, reuses a temporary in place where it can), but several are alive at
# once, and each is memory the process must find, write and read again.
# minilora's kernel (`minilora/ops/gelu.py`) writes every step into the output array
# with `out=` and in-place operators, and uses the identity
# $\tfrac12(1 + \tanh u) = \sigma(2u)$ to need one `exp` and no `tanh`. `tracemalloc` counts
# the bytes NumPy allocates, so the difference is a number we can assert.

# %%
def textbook_gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def peak_allocation(fn) -> int:
    """Bytes allocated at the peak while ``fn`` runs (its result included)."""
    started_here = not tracemalloc.is_tracing()
    if started_here:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    result = fn()
    peak_bytes = tracemalloc.get_traced_memory()[1] - before
    if started_here:
        tracemalloc.stop()
    del result
    return peak_bytes


textbook_peak = peak_allocation(lambda: textbook_gelu(x))
kernel_peak = peak_allocation(lambda: gelu_forward(x)[0])
np.testing.assert_allclose(gelu_forward(x)[0], textbook_gelu(x), rtol=1e-5, atol=1e-6)
print(f"GELU of {x.nbytes / 2**20:.0f} MiB: the textbook formula peaks at {textbook_peak / x.nbytes:.1f} "
      f"arrays, minilora's kernel at {kernel_peak / x.nbytes:.1f}; time "
      f"{best_of(lambda: textbook_gelu(x)) * 1e3:.2f} ms vs {best_of(lambda: gelu_forward(x)) * 1e3:.2f} ms")
assert textbook_peak >= 2.5 * x.nbytes, "the textbook formula should hold several temporaries at once"
assert kernel_peak <= 1.1 * x.nbytes, "the in-place kernel should allocate only its output"

# %% [markdown]
# ## 5. Elementwise work on every core
#
# A matrix product uses every core (the BLAS has its own threads); a NumPy ufunc uses
# one. But a ufunc releases Python's lock while it loops, so Python threads can run the
# same kernel on different blocks of rows at once. `minilora.threads.map_row_blocks`
# does that for GELU, LayerNorm, softmax, cross-entropy and AdamW: each row is computed
# by the same code as in one whole-array call, so the result is the same to the last
# bit, whatever the number of threads -- also for softmax, whose row sums are
# reductions, because a row is never split between threads. (Handing work to a thread
# costs tens to hundreds of microseconds, so small arrays stay on one.)

# %%
big = np.random.default_rng(3).standard_normal((2048, 1024), dtype=np.float32)
threads = ml.threads.get_num_threads()
counts = sorted({1, max(2, threads)})
for name, op in (("GELU", lambda: gelu_forward(big)[0]), ("softmax", lambda: softmax_forward(big)[0])):
    results, seconds = {}, {}
    for n in counts:
        ml.threads.set_num_threads(n)
        results[n] = op()
        seconds[n] = best_of(op)
    ml.threads.set_num_threads(threads)
    assert all(np.array_equal(results[counts[0]], results[n]) for n in counts), f"threads changed {name}"
    print(f"{name} of (2048, 1024): " + ", ".join(f"{n} thread{'s' * (n > 1)} {seconds[n] * 1e3:.2f} ms"
                                                for n in counts) + "; results bit-identical")

# %% [markdown]
# ## 6. Skipping what the mask throws away
#
# Causal attention computes a $(T, T)$ score matrix and then sets its upper triangle to
# $-\infty$: nearly half the scores, exponentials and products are computed only to be
# discarded. minilora's attention takes the queries in blocks of `QUERY_BLOCK` = 128; the block of queries $a..b-1$ can see keys $0..b-1$ only, so it
# computes a $(b - a) \times b$ matrix. For $T = m \cdot 128$ that is
# $128^2 (1 + 2 + \dots + m) = 128^2\, m(m+1)/2$ scores instead of $T^2$ — three quarters
# at $T = 256$, $9/16$ at $T = 1024$ — and every row's softmax still runs over all the keys
# it may see, so the output is the same.

# %%
assert QUERY_BLOCK == 128, "the prose above assumes blocks of 128 queries"
ATT_BATCH, ATT_T, ATT_HEADS, ATT_C = 2, 256, 4, 64
q_in, k_in, v_in = (np.random.default_rng(4 + i).standard_normal((ATT_BATCH, ATT_T, ATT_C)) for i in range(3))
y_blocks, cache_blocks = attention_forward(q_in, k_in, v_in, ATT_HEADS)               # blocks of 128
y_full, cache_full = attention_forward(q_in, k_in, v_in, ATT_HEADS, query_block=ATT_T)  # one block
np.testing.assert_allclose(y_blocks, y_full, rtol=1e-12, atol=1e-12)
stored = sum(block.softmax.p.size for block in cache_blocks.blocks) // (ATT_BATCH * ATT_HEADS)
m_blocks = ATT_T // QUERY_BLOCK
assert stored == QUERY_BLOCK ** 2 * m_blocks * (m_blocks + 1) // 2, "each block should hold (b - a) x b scores"
print(f"T = {ATT_T}: {stored:,} scores per head in blocks of {QUERY_BLOCK}, {ATT_T ** 2:,} in one block "
      f"({stored / ATT_T ** 2:.0%}); outputs differ by {np.abs(y_blocks - y_full).max():.0e}")
for T_long in (512, 1024, 2048):
    mb = T_long // QUERY_BLOCK
    print(f"  T = {T_long}: {QUERY_BLOCK ** 2 * mb * (mb + 1) // 2 / T_long ** 2:.0%} of the scores")

# %% [markdown]
# ## 7. Timing on a shared machine
#
# On a laptop or a cloud VM other programs — or other virtual machines on the same
# host — take the CPU at random moments, so one timing means little. Two rules make
# comparisons honest:
#
# * repeat and take the **median** (or, for one small operation, the minimum);
# * when comparing A with B, **interleave** them: ABAB... or, better, in *paired
#   trials* — one call of A and one of B back to back, the order alternating — and
#   take the median of the per-trial ratios. Two blocks timed seconds apart measure
#   the machine's load as much as A and B.
#
# The experiment: A and B are the *same* function, so the true ratio is exactly 1. We
# estimate it both ways, many times, the two ways taking turns. The two blocks are only
# about 50 ms apart, and that is enough for the machine's load to move between them; on
# a quiet machine the two histograms can look alike.

# %%
work_input = np.random.default_rng(5).standard_normal(ARRAY_SHAPE, dtype=np.float32)


def same_work():
    return gelu_forward(work_input)[0].sum()


def block_median(calls: int) -> float:
    return statistics.median(time_once(same_work, no_sync) for _ in range(calls))


def blocks_ratio(calls: int = 11) -> float:
    a_s = block_median(calls)
    time.sleep(0.05)                       # apart in time, as two separate runs would be
    return block_median(calls) / a_s


def paired_trials_ratio(trials: int = 12) -> float:
    """One call of A and one of B per trial, the order alternating, then the median over
    trials of B's time / A's time: ``minilora.timing``, which the demo and the benchmark
    use too."""
    times = paired_timing([("A", same_work, no_sync), ("B", same_work, no_sync)], trials)
    return paired_ratio(times, "B", "A")


estimates = 12 if FAST else 40
blocks, paired = [], []
for _ in range(estimates):                 # the two methods take turns, too
    blocks.append(blocks_ratio())
    paired.append(paired_trials_ratio())
for name, values in (("blocks", blocks), ("paired", paired)):
    print(f"{name}: ratio of identical work {min(values):.3f} .. {max(values):.3f} "
          f"(median {statistics.median(values):.3f})")
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.hist([blocks, paired], bins=15, label=["two blocks of calls, one after the other", "paired trials"])
ax.axvline(1.0, color="black", lw=1)
ax.set_xlabel("estimated time ratio B / A (the true ratio is 1)")
ax.set_ylabel("estimates")
ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "07_timing_noise.png"), dpi=120)
plt.close(fig)

# %% [markdown]
# Paired trials suit two variants of the *same* program (merged against unmerged LoRA,
# LoRA against full fine-tuning: the benchmark measures both this way). Between two
# programs with their own thread pools — minilora and PyTorch — a single step right
# after the other program's pays for taking the cores back, so there the benchmark
# times blocks of several steps in turns (bench/README.md, "Timing").
#
# ## What to remember
#
# * Count FLOPs, measure the peak, compute MFU: it tells you whether the products or
#   everything around them is the problem.
# * Products go to the BLAS (`@`, or `einsum(..., optimize=True)`); `x * x * x`, not
#   `x ** 3`; float32 unless you are checking gradients.
# * Write into arrays you already have (`out=`, in-place operators): fewer bytes
#   allocated, written and read.
# * Elementwise kernels can use every core without changing a bit of the result.
# * Do not compute what a mask discards.
# * Time with medians, interleave what you compare, and pair trials when the two sides
#   share the machine's threads.

# %%
print(f"lesson 7 done in {time.perf_counter() - LESSON_START:.1f} s")
