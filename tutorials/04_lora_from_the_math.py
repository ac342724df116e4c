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
# # Lesson 4 — LoRA from the math
#
# Fine-tuning a pretrained model changes each weight matrix $W$ by some $\Delta W$. Full
# fine-tuning learns every entry of $\Delta W$: for a $768 \times 768$ attention
# projection that is 589,824 numbers, with an optimizer state twice that size, per
# matrix. LoRA (Hu et al., 2021) bets that the update a fine-tune needs has *low rank*
# and writes it as a product of two thin matrices,
#
# $$
# \Delta W = s\,(BA)^\top, \qquad A \in \mathbb R^{r \times I},\; B \in \mathbb R^{O \times r},
# \qquad s = \alpha / r ,
# $$
#
# training only $A$ and $B$ — $r(I + O)$ numbers — while $W$ stays frozen.
#
# This lesson derives the forward and backward of a LoRA layer and checks, with
# minilora, every claim that follows from them:
#
# 1. why a fresh adapter changes nothing and why $\partial L/\partial A$ is exactly zero
#    at step 0 (and why that is fine);
# 2. that the hand-written backward is right (a float64 gradient check);
# 3. that merging the adapter into $W$ and unmerging it are exact inverses;
# 4. the parameter count $r(I+O)$ against $IO$;
# 5. that rank $\min(I, O)$ expresses *any* update, and rank $r$ gives exactly the
#    best rank-$r$ approximation (Eckart–Young);
# 6. and, on a real fine-tune, what the learned update's singular values look like.
#
# A word on orientation. minilora stores a linear layer's weight as $W \in \mathbb
# R^{I \times O}$ (in, out) and applies it to *rows*: $y = xW + b$. The paper writes
# $h = W_0 x + BAx$ for a column vector $x$ with $W_0$ (out, in). Transposing the
# paper's update into our layout is where the $(\cdot)^\top$ in $\Delta W = s(BA)^\top$
# comes from; $A$ and $B$ themselves have the paper's (and PEFT's) shapes.
#
# Run it as a script (`python tutorials/04_lora_from_the_math.py`, add `--fast` or
# `MINILORA_FAST=1` for the small CI version) or open it as a notebook with jupytext.

# %%
import math
import os
import sys
import time

import matplotlib

if "ipykernel" not in sys.modules:  # a script or CI: draw to files only
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import minilora as ml
from minilora.data import encode_corpus, get_batch, iter_text_batches, load_builtin, split_text
from minilora.gradcheck import check_gradients
from minilora.lora import LoRALinear
from minilora.nn import Linear
from minilora.tokenizer import CharTokenizer

FAST = os.environ.get("MINILORA_FAST") == "1" or "--fast" in sys.argv
_HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
FIGURES = os.environ.get("MINILORA_FIGURES", os.path.join(_HERE, "figures"))
os.makedirs(FIGURES, exist_ok=True)
LESSON_START = time.perf_counter()
print(f"mode: {'fast' if FAST else 'full'}; figures go to {FIGURES}")

# %% [markdown]
# ## 1. Forward and backward of a LoRA layer
#
# Stack the $N$ input rows (all batch elements and positions) into $X \in \mathbb
# R^{N \times I}$. The adapted layer computes
#
# $$
# Y = XW + b + s\,(XA^\top)B^\top, \qquad H = XA^\top \in \mathbb R^{N \times r} .
# $$
#
# It never forms the $I \times O$ matrix $BA$: going through the $r$-dimensional
# bottleneck $H$ costs $N r (I + O)$ multiply-adds instead of $N I O$.
#
# **Backward.** Let $G = \partial L / \partial Y \in \mathbb R^{N \times O}$. In indices,
# $Y_{no} = \dots + s \sum_k H_{nk} B_{ok}$ and $H_{nk} = \sum_i X_{ni} A_{ki}$, so the
# chain rule gives
#
# $$
# \frac{\partial L}{\partial B} = s\, G^\top H \;(O \times r), \qquad
# \frac{\partial L}{\partial H} = s\, G B \;(N \times r), \qquad
# \frac{\partial L}{\partial A} = \Big(\frac{\partial L}{\partial H}\Big)^{\!\top} X
#   = s\, B^\top G^\top X \;(r \times I),
# $$
#
# $$
# \frac{\partial L}{\partial X} = G W^\top + \frac{\partial L}{\partial H} A .
# $$
#
# Compare with the gradient full fine-tuning would use, $\partial L/\partial W = X^\top
# G$ ($I \times O$). The LoRA gradients are that same matrix, squeezed through the other
# factor:
#
# $$
# \frac{\partial L}{\partial A} = s\, B^\top \Big(\frac{\partial L}{\partial W}\Big)^{\!\top},
# \qquad
# \frac{\partial L}{\partial B} = s\, \Big(\frac{\partial L}{\partial W}\Big)^{\!\top} A^\top .
# $$
#
# **The consequence.** $\partial L / \partial A$ is *linear in $B$*. LoRA initialises
# $B = 0$ and $A$ at random, so at step 0
#
# * $\Delta W = s(BA)^\top = 0$: the adapted model *is* the pretrained model, bit for bit;
# * $\partial L / \partial A = 0$ exactly, whatever the data; only $B$ gets a gradient
#   ($\partial L/\partial B = s (\partial L/\partial W)^\top A^\top \ne 0$ because $A$ is
#   random). After the first update $B \ne 0$, and $A$ starts learning too.
#
# Why not $A = B = 0$? Then both gradients vanish forever (each is proportional to the
# other factor): a saddle point training never leaves. Why not both random? Then the
# model is changed before it has seen any fine-tuning data. One zero factor and one
# random factor gives both: an unchanged start and a non-zero gradient.

# %% [markdown]
# ## 2. Checking it on a GPT: B = 0 changes nothing, and grad(A) = 0
#
# We build a small GPT in float64, record its logits, add LoRA adapters of rank 4 to
# all six linear layers of every block, and compare. `ml.add_lora` wraps each targeted
# `Linear` in a `LoRALinear` and freezes everything except the adapters' `lora_A` and
# `lora_B`.

# %%
rng = np.random.default_rng(0)
small = ml.GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16)
gpt = ml.GPT(small, seed=0, dtype="float64")
idx = rng.integers(0, small.vocab_size, size=(3, 16))          # (B, T) token ids
targets = rng.integers(0, small.vocab_size, size=(3, 16))      # (B, T) next tokens
logits_base = gpt.forward(idx)                                 # (B, T, V)

lora_cfg = ml.LoraConfig(r=4, alpha=8.0, dropout=0.0,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
adapted = ml.add_lora(gpt, lora_cfg)
print(f"adapted {len(adapted)} layers, e.g. {adapted[:3]}")
logits_lora = gpt.forward(idx)
assert np.array_equal(logits_lora, logits_base), "a fresh adapter (B = 0) must leave the logits bitwise unchanged"
print("fresh adapter: logits bitwise equal to the base model's")

loss, dlogits = ml.cross_entropy(logits_lora, targets)
gpt.zero_grad()
gpt.backward(dlogits)
named = dict(gpt.named_parameters())
a_grads = {n: p.grad for n, p in named.items() if ".lora_A." in n}
b_grads = {n: p.grad for n, p in named.items() if ".lora_B." in n}
frozen = [n for n, p in named.items() if not p.requires_grad]
assert len(a_grads) == len(b_grads) == len(adapted)
assert all(np.all(g == 0.0) for g in a_grads.values()), "grad(A) must be exactly zero while B = 0"
assert all(float(np.abs(g).max()) > 0 for g in b_grads.values()), "grad(B) must be non-zero"
assert all(named[n].grad is None for n in frozen), "frozen parameters must receive no gradient"
print(f"step 0: all {len(a_grads)} grad(lora_A) exactly zero; "
      f"smallest max|grad(lora_B)| = {min(float(np.abs(g).max()) for g in b_grads.values()):.2e}; "
      f"{len(frozen)} frozen parameters got no gradient")

# One AdamW step moves only B (A's gradient was zero) ...
opt = ml.AdamW([p for p in gpt.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
A_before = {n: named[n].data.copy() for n in a_grads}
opt.step()
assert all(np.array_equal(named[n].data, A_before[n]) for n in a_grads), "A must not move at step 0"
# ... and from then on A has a gradient too.
loss1, dlogits1 = ml.cross_entropy(gpt.forward(idx), targets)
gpt.zero_grad()
gpt.backward(dlogits1)
smallest_a = min(float(np.abs(named[n].grad).max()) for n in a_grads)
assert smallest_a > 0, "after one step B != 0, so grad(A) must be non-zero"
print(f"step 1: loss {loss:.4f} -> {loss1:.4f}; every grad(lora_A) is now non-zero "
      f"(smallest max-abs {smallest_a:.2e})")

# %% [markdown]
# ## 3. A gradient check of `LoRALinear`
#
# Now the backward formulas themselves, against central differences. The loss is
# $L = \sum_{no} Y_{no}\, G_{no}$ with a *random* upstream gradient $G$ (so that
# $\partial L/\partial Y = G$ and every entry of the Jacobian counts), everything in
# float64. `B` is set to random values first: with $B = 0$ the check of
# $\partial L/\partial A$ would compare zero with zero and prove nothing. The base
# weight is left trainable here so we can also check the "squeezed" identities
# $\partial L/\partial A = s B^\top (\partial L/\partial W)^\top$ and
# $\partial L/\partial B = s (\partial L/\partial W)^\top A^\top$.

# %%
I, O, R = 7, 5, 3
layer = LoRALinear(Linear(I, O, rng=rng, dtype="float64"))
cfg3 = ml.LoraConfig(r=R, alpha=6.0, target_modules=["any"])
layer.add_adapter("default", cfg3, rng, dropout_seed=0)
layer.active_adapters = ["default"]
layer.lora_B.default.data = rng.standard_normal((O, R))        # pretend it has been trained
layer.bias.data = rng.standard_normal(O)
A, B, s = layer.lora_A.default, layer.lora_B.default, cfg3.scaling

x = rng.standard_normal((2, 4, I))                             # (B, T, I)
G = rng.standard_normal((2, 4, O))                             # (B, T, O) random upstream gradient
layer.forward(x)
layer.zero_grad()
dx = layer.backward(G)
inputs = {"x": x, "W": layer.weight.data, "b": layer.bias.data, "A": A.data, "B": B.data}
analytic = {"x": dx, "W": layer.weight.grad, "b": layer.bias.grad, "A": A.grad, "B": B.grad}
errors = check_gradients(lambda: layer.forward(x), inputs, analytic, G)
print("relative errors, analytic vs central differences:",
      {k: f"{v:.1e}" for k, v in errors.items()})
assert all(e < 1e-8 for e in errors.values()), f"LoRALinear gradient check failed: {errors}"

dW = layer.weight.grad                                          # (I, O) = X^T G
err_A = float(np.abs(A.grad - s * B.data.T @ dW.T).max())
err_B = float(np.abs(B.grad - s * dW.T @ A.data.T).max())
print(f"grad(A) vs s B^T (dL/dW)^T: {err_A:.1e};  grad(B) vs s (dL/dW)^T A^T: {err_B:.1e}")
assert err_A < 1e-12 and err_B < 1e-12, "the LoRA gradients must be the full gradient squeezed through A, B"

# %% [markdown]
# ## 4. Merge and unmerge are identities
#
# At inference time the low-rank path is an extra pair of matmuls per layer. But
# $XW + s(XA^\top)B^\top = X\big(W + s(BA)^\top\big)$, so we can fold the update into the
# weight once, $W \leftarrow W + \Delta W$ (`ml.merge_lora`), and run a plain linear
# layer: *no added latency*. `ml.unmerge_lora` subtracts $\Delta W$ again, returning
# to the frozen base weight (to switch adapters, or to keep training). Both are exact
# up to floating-point rounding; in float64 that means ~1e-16 relative. Merging twice
# must not add twice.

# %%
for n, p in named.items():                                     # give every adapter a non-zero B
    if ".lora_B." in n:
        p.data = 0.05 * rng.standard_normal(p.shape)
W_before = {n: p.data.copy() for n, p in named.items() if n.endswith("weight") and "lora_" not in n}
with ml.no_grad():
    logits_unmerged = gpt.forward(idx)
    changed = ml.merge_lora(gpt)
    logits_merged = gpt.forward(idx)
assert len(changed) == len(adapted)
assert ml.merge_lora(gpt) == [], "merging twice must be a no-op"
merge_err = float(np.abs(logits_merged - logits_unmerged).max())
print(f"merged {len(changed)} layers; max |merged - unmerged| logit = {merge_err:.1e} "
      f"(logits up to {float(np.abs(logits_unmerged).max()):.2f}, changed from the base by up to "
      f"{float(np.abs(logits_unmerged - logits_base).max()):.2f})")
assert merge_err < 1e-12, "merged forward must equal unmerged forward"

ml.unmerge_lora(gpt)
restore_err = max(float(np.abs(named[n].data - W_before[n]).max()) for n in W_before)
print(f"unmerged: max |W - W_before| over all weights = {restore_err:.1e}")
assert restore_err < 1e-12, "unmerge must restore W"
with ml.no_grad():
    assert float(np.abs(gpt.forward(idx) - logits_unmerged).max()) < 1e-12

# %% [markdown]
# ## 5. What it costs: r(I + O) against I·O
#
# An adapter on an $I \times O$ matrix holds $r \times I$ numbers in $A$ and $O \times r$ in
# $B$: $r(I + O)$ in all, a fraction $r(I + O)/(IO) = r(1/I + 1/O)$ of the matrix. The
# fraction shrinks as the model grows: for GPT-2 small's $768 \times 768$ projections at
# $r = 8$ it is 2.1%, and the optimizer keeps state (AdamW: two numbers per parameter)
# for the adapters alone. `ml.lora_summary` counts it on the model.

# %%
summary = ml.lora_summary(gpt)
print(summary)
for layer_name, adapter, r, (I_, O_), n in summary.rows:
    assert n == r * (I_ + O_), f"{layer_name}: {n} != r(I+O)"
assert summary.trainable == sum(n for *_, n in summary.rows), "only the adapters should train"
assert summary.trainable == gpt.num_parameters(trainable_only=True)
full_counts = sum(I_ * O_ for *_, (I_, O_), _ in summary.rows)
print(f"adapters: {summary.trainable:,} trainable numbers vs {full_counts:,} in the adapted matrices "
      f"({100 * summary.trainable / full_counts:.1f}%)")
for name, (I_, O_), r in [("GPT-2 small attention", (768, 768), 8), ("GPT-2 small MLP up", (768, 3072), 8),
                          ("GPT-3 175B attention", (12288, 12288), 4)]:
    print(f"  {name:<22} {I_}x{O_}, r={r}: {r * (I_ + O_):>9,} vs {I_ * O_:>12,} "
          f"({100 * r * (I_ + O_) / (I_ * O_):.3f}%)")

# %% [markdown]
# ## 6. What a rank-r update can express
#
# Write the target update (in the paper's orientation) through its singular value
# decomposition, $\Delta W^\top = U \Sigma V^\top = \sum_i \sigma_i u_i v_i^\top$, with
# $\sigma_1 \ge \sigma_2 \ge \dots \ge 0$. Choose
#
# $$
# B = U_r \,\mathrm{diag}\big(\sqrt{\sigma_{1..r}/s}\big), \qquad
# A = \mathrm{diag}\big(\sqrt{\sigma_{1..r}/s}\big)\, V_r^\top ,
# $$
#
# so that $s\,BA = \sum_{i \le r} \sigma_i u_i v_i^\top$, the SVD truncated to $r$ terms.
#
# * With $r = \min(I, O)$ nothing is truncated: LoRA reproduces *any* $\Delta W$ exactly.
# * With a smaller $r$, the Eckart–Young theorem says the truncated SVD is the best
#   rank-$r$ approximation in Frobenius norm, and its error is exactly the energy left
#   out:
#   $$
#   \min_{\operatorname{rank} M \le r} \lVert \Delta W - M \rVert_F
#   = \Big(\sum_{i > r} \sigma_i^2\Big)^{1/2} .
#   $$
#
# We check both with `LoRALinear.attach` (install given factors) and
# `LoRALinear.delta_weight` (returns $s(BA)^\top$), on two kinds of target: a random
# Gaussian matrix, whose singular values are all of similar size, and a matrix of
# *low intrinsic rank* (rank 4 plus a little noise) — LoRA's hypothesis is that
# fine-tuning updates look like the second kind.

# %%
I, O = 48, 32
r_max = min(I, O)
layer = LoRALinear(Linear(I, O, rng=rng, dtype="float64"))
targets_dw = {
    "random Gaussian": rng.standard_normal((I, O)) / math.sqrt(I),
    "rank 4 + small noise": (rng.standard_normal((I, 4)) @ rng.standard_normal((4, O)) / math.sqrt(I)
                          + 0.01 * rng.standard_normal((I, O))),
}


def lora_factors(delta_w, r, scaling):
    """A (r, I), B (O, r) with scaling * (B @ A).T the best rank-r approximation of delta_w (I, O)."""
    U, S, Vt = np.linalg.svd(delta_w.T, full_matrices=False)   # (O, k), (k,), (k, I)
    root = np.sqrt(S[:r] / scaling)                            # (r,)
    return root[:, None] * Vt[:r], U[:, :r] * root             # A (r, I), B (O, r)


curves = {}
for label, dw in targets_dw.items():
    sigma = np.linalg.svd(dw, compute_uv=False)                # (min(I, O),)
    norm = float(np.linalg.norm(dw))
    errs = []
    for r in range(1, r_max + 1):
        cfg_r = ml.LoraConfig(r=r, alpha=16.0, target_modules=["any"])
        A_r, B_r = lora_factors(dw, r, cfg_r.scaling)
        name = f"r{r}"
        layer.attach(name, cfg_r, A_r, B_r, dropout_seed=0)
        err = float(np.linalg.norm(layer.delta_weight(name) - dw))       # Frobenius
        bound = float(np.sqrt(np.sum(sigma[r:] ** 2)))
        assert abs(err - bound) <= 1e-10 * norm, f"{label}, r={r}: error {err} != Eckart-Young {bound}"
        errs.append(err / norm)
        if r == r_max:   # full rank: any update, exactly
            exact = float(np.abs(layer.delta_weight(name) - dw).max())
            layer.active_adapters = [name]
            xin = rng.standard_normal((5, I))
            y_lora = layer.forward(xin)
            y_direct = xin @ (layer.weight.data + dw) + layer.bias.data
            forward_err = float(np.abs(y_lora - y_direct).max())
            print(f"{label}: rank {r_max} LoRA reproduces dW to {exact:.1e} (max abs); "
                  f"forward matches x(W + dW) + b to {forward_err:.1e}")
            assert exact < 1e-12 and forward_err < 1e-12
            layer.active_adapters = []
        layer.delete_adapter(name)
    curves[label] = (np.array(errs), sigma)
    print(f"{label}: relative error at r = 1, 4, 8, 16: "
          + ", ".join(f"{errs[r - 1]:.3f}" for r in (1, 4, 8, 16)))

# %% [markdown]
# ### Can training find the best rank-r update?
#
# The SVD gives the optimum in closed form. LoRA is *trained*, by gradients through the
# backward of Section 1, so let us fit a rank-$r$ adapter by gradient descent and see
# how close it gets. Feeding the identity matrix $X = I_I$ through the layer gives
# $Y = W + b + s(BA)^\top$ row by row, so minimising
# $L = \tfrac12 \lVert Y - (W + b + \Delta W)\rVert_F^2$ with $\partial L / \partial Y =
# Y - (W + b + \Delta W)$ fits $s(BA)^\top$ to $\Delta W$ — using only `LoRALinear`'s
# forward and backward, with $W$ and $b$ frozen, from the usual start ($B = 0$, $A$
# random). No rank-$r$ adapter can beat the Eckart–Young error, so the trained error
# must land on or above it; we check that it also comes within 1% of
# $\lVert \Delta W \rVert_F$ of it.

# %%
dw = targets_dw["rank 4 + small noise"]
sigma = curves["rank 4 + small noise"][1]
layer.weight.requires_grad = False
layer.bias.requires_grad = False
X_id = np.eye(I)                                               # (I, I): row i picks row i of W
fit_steps = 300 if FAST else 1500
trained = {}
for r in (1, 2, 4, 8):
    cfg_r = ml.LoraConfig(r=r, alpha=float(r), target_modules=["any"])
    name = f"fit{r}"
    layer.add_adapter(name, cfg_r, np.random.default_rng(r), dropout_seed=0)
    layer.active_adapters = [name]
    fit_params = [getattr(layer.lora_A, name), getattr(layer.lora_B, name)]
    fit_opt = ml.AdamW(fit_params, lr=2e-2, weight_decay=0.0)
    goal = layer.weight.data + layer.bias.data + dw            # (I, O)
    for step in range(fit_steps):
        fit_opt.lr = ml.warmup_cosine_lr(step, max_lr=2e-2, warmup_steps=20, total_steps=fit_steps, min_lr=1e-4)
        Y = layer.forward(X_id)                                # (I, O)
        layer.zero_grad()
        layer.backward(Y - goal)                               # dL/dY for L = 0.5 ||Y - goal||^2
        fit_opt.step()
    err = float(np.linalg.norm(layer.delta_weight(name) - dw))
    bound = float(np.sqrt(np.sum(sigma[r:] ** 2)))
    trained[r] = err / float(np.linalg.norm(dw))
    print(f"r = {r}: trained error {err:.5f}, Eckart-Young optimum {bound:.5f} (ratio {err / bound:.4f})")
    assert err >= bound * (1 - 1e-9), "no rank-r matrix can beat the truncated SVD"
    assert err - bound <= 0.01 * float(np.linalg.norm(dw)), f"training should come close to the optimum at r={r}"
    layer.active_adapters = []
    layer.delete_adapter(name)

fig, (ax_err, ax_sv) = plt.subplots(1, 2, figsize=(11, 4))
ranks = np.arange(1, r_max + 1)
for (label, (errs, sig)), color in zip(curves.items(), ("C0", "C1")):
    ax_err.plot(ranks, errs, "o-", ms=3, color=color, label=f"{label}: truncated SVD (Eckart-Young)")
    ax_sv.semilogy(ranks, sig / sig[0], "o-", ms=3, color=color, label=label)
ax_err.plot(list(trained), list(trained.values()), "kx", ms=9, mew=2, label="rank-r LoRA trained by AdamW")
ax_err.set_xlabel("LoRA rank r"); ax_err.set_ylabel(r"$\|\Delta W - s(BA)^\top\|_F \,/\, \|\Delta W\|_F$")
ax_err.set_title(f"Best rank-r error for a {I}x{O} update"); ax_err.grid(alpha=0.3); ax_err.legend(fontsize=8)
ax_sv.set_xlabel("i"); ax_sv.set_ylabel(r"$\sigma_i / \sigma_1$")
ax_sv.set_title(r"Singular values of $\Delta W$"); ax_sv.grid(alpha=0.3); ax_sv.legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "04_rank_error.png"), dpi=120)
plt.close(fig)
print("saved", os.path.join(FIGURES, "04_rank_error.png"))

# %% [markdown]
# ## 7. A real fine-tune: what does the learned update look like?
#
# Finally the whole thing on a language model. We pre-train a tiny character-level GPT
# on the built-in stories (briefly — lesson 3 does this properly), then LoRA fine-tune
# it on the built-in recipes, a different vocabulary and layout, with rank $r = 8$ on
# the attention projections `q_proj`, `v_proj` (the paper's choice) and the MLP. We
# check that the frozen weights did not move a single bit, that the recipes validation
# loss fell, and that merging gives the same model, and then look at the singular
# values of each learned $\Delta W = s(BA)^\top$. By construction at most $r$ are
# non-zero. How the $r$ share the update tells how much of the rank was used: we
# compare each update's spectrum with that of a random product $BA$ of the same shapes,
# which spreads its energy over all $r$ directions. The paper found that the updates
# of large fine-tuned models are dominated by very few directions (a low "intrinsic
# rank"); even this toy shows the tendency.

# %%
stories = load_builtin("stories", size=60_000 if FAST else 150_000)
recipes = load_builtin("recipes", size=30_000 if FAST else 60_000)
tok = CharTokenizer.train([stories, recipes])
story_train, _ = split_text(encode_corpus(tok, stories), 0.1)
recipe_train, recipe_val = split_text(encode_corpus(tok, recipes), 0.1)
ft_cfg = ml.GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64)
base_model = ml.GPT(ft_cfg, seed=0, dtype="float32")
PRE_STEPS, FT_STEPS, RANK = (100, 100, 8) if FAST else (300, 300, 8)
data_rng = np.random.default_rng(1)


def run_steps(model, stream, steps, max_lr):
    """The training step of lesson 3: forward, loss, backward, clip, schedule, AdamW."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = ml.AdamW(trainable, lr=max_lr, weight_decay=0.0)
    for step in range(steps):
        xb, yb = get_batch(stream, 16, ft_cfg.block_size, data_rng)
        loss, dlogits = ml.cross_entropy(model.forward(xb), yb)
        model.zero_grad()
        model.backward(dlogits)
        ml.clip_grad_norm(trainable, 1.0)
        opt.lr = ml.warmup_cosine_lr(step, max_lr=max_lr, warmup_steps=steps // 10,
                                     total_steps=steps, min_lr=max_lr / 10)
        opt.step()
    return loss


def recipe_val_loss(model):
    return ml.evaluate(model, iter_text_batches(recipe_val, 16, ft_cfg.block_size))


t0 = time.perf_counter()
run_steps(base_model, story_train, PRE_STEPS, 1e-2)
val_before = recipe_val_loss(base_model)
frozen_copy = {n: p.data.copy() for n, p in base_model.named_parameters()}

ft_targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
ml.add_lora(base_model, ml.LoraConfig(r=RANK, alpha=2.0 * RANK, target_modules=ft_targets), seed=0)
summary = ml.lora_summary(base_model)
print(f"LoRA r={RANK} on {ft_targets}: {summary.trainable:,} trainable of {summary.total:,} "
      f"({summary.percent_trainable:.1f}%)")
run_steps(base_model, recipe_train, FT_STEPS, 1e-2)
val_after = recipe_val_loss(base_model)
print(f"recipes validation loss: base {val_before:.3f} -> LoRA {val_after:.3f} "
      f"({PRE_STEPS} + {FT_STEPS} steps in {time.perf_counter() - t0:.1f} s)")
assert val_after < val_before - 0.2, "the LoRA fine-tune should lower the recipes loss clearly"
moved = [n for n, p in base_model.named_parameters() if n in frozen_copy and not np.array_equal(p.data, frozen_copy[n])]
assert not moved, f"frozen base weights changed: {moved}"
print("every base weight is bitwise unchanged: only lora_A and lora_B moved")

# The learned updates, and their singular values (in float64).
layers = {n: m for n, m in base_model.named_modules() if isinstance(m, LoRALinear)}
spectra = {n: np.linalg.svd(m.delta_weight("default"), compute_uv=False) for n, m in layers.items()}
for n, sv in spectra.items():
    assert np.all(sv[RANK:] <= 1e-6 * sv[0]), f"{n}: the update must have rank <= {RANK}"
top1 = {n: float(sv[0] ** 2 / np.sum(sv ** 2)) for n, sv in spectra.items()}

# For comparison: the same shapes filled with random numbers, B (O, r) @ A (r, I) Gaussian.
ref_rng = np.random.default_rng(7)
reference, ref_shares = [], []
for n, m in layers.items():
    for _ in range(20):
        sv = np.linalg.svd(ref_rng.standard_normal((m.out_features, RANK))
                           @ ref_rng.standard_normal((RANK, m.in_features)), compute_uv=False)[:RANK]
        reference.append(sv / sv[0])
        ref_shares.append(sv[0] ** 2 / np.sum(sv ** 2))
reference = np.mean(reference, axis=0)                         # (r,) mean sigma_i / sigma_1
ref_share = float(np.mean(ref_shares))                         # mean share of the top direction
print("share of each learned update's energy (sum of sigma^2) in its top direction:")
for n, share in top1.items():
    print(f"  {n:<26} {100 * share:5.1f}%   sigma_1..{RANK} / sigma_1 = "
          + " ".join(f"{v:.2f}" for v in spectra[n][:RANK] / spectra[n][0]))
print(f"  a random rank-{RANK} product of the same shapes: about {100 * ref_share:.0f}%")
mean_share = float(np.mean(list(top1.values())))
assert mean_share > ref_share, "the learned updates should be more concentrated than random ones"

# Merging gives the same model (float32 weights: equal to float32 rounding).
x_check, _ = get_batch(recipe_val, 4, ft_cfg.block_size, data_rng)
with ml.no_grad():
    logits_adapter = base_model.forward(x_check)
    ml.merge_and_unload(base_model)                            # a plain GPT, no LoRA layers left
    logits_plain = base_model.forward(x_check)
merged_err = float(np.abs(logits_plain - logits_adapter).max())
print(f"merge_and_unload: max |plain - adapted| logit = {merged_err:.1e} (float32)")
assert not any(isinstance(m, LoRALinear) for _, m in base_model.named_modules())
assert merged_err < 1e-3

fig, ax = plt.subplots(figsize=(7, 4))
ranks = np.arange(1, RANK + 1)
for k, (n, sv) in enumerate(spectra.items()):
    ax.plot(ranks, sv[:RANK] / sv[0], "o-", ms=4, color=f"C{k}",
            label=n.replace("blocks.", "").replace(".attn", "").replace(".mlp", ""))
ax.plot(ranks, reference, "k--", lw=2, label=f"random rank-{RANK} product")
ax.set_xlabel("i"); ax.set_ylabel(r"$\sigma_i / \sigma_1$ of the learned $\Delta W$")
ax.set_title(f"Singular values of the LoRA updates (r = {RANK}) after {FT_STEPS} steps on recipes\n"
             f"(all beyond i = {RANK} are zero to rounding)", fontsize=10)
ax.set_ylim(0, 1.05); ax.grid(alpha=0.3); ax.legend(fontsize=7, ncol=2)
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "04_learned_update_spectrum.png"), dpi=120)
plt.close(fig)
print("saved", os.path.join(FIGURES, "04_learned_update_spectrum.png"))
print(f"lesson 4 done in {time.perf_counter() - LESSON_START:.1f} s")
