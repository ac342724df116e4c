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
# # 02 · Attention forward and backward
#
# Causal self-attention is where a GPT mixes information between positions. For one
# head, with queries $Q$, keys $K$ and values $V$ (one row per position):
#
# $$S = \frac{Q K^\top}{\sqrt D} + M,\qquad P = \text{softmax}_\text{rows}(S),\qquad Y = P\,V,$$
#
# where $D$ is the head size and $M$ is the causal mask. This lesson derives the
# softmax Jacobian, the mask and the max-subtraction that keeps softmax finite, then
# differentiates the whole thing and checks it numerically — first the bare attention
# op (`minilora.ops.attention_forward/_backward`), then a complete self-attention
# layer built from `minilora.nn.Linear` layers around it.
#
# As in lesson 01, `dZ` means $\partial L / \partial Z$ for a scalar loss $L$, and every
# gradient check uses $L = \sum Y \cdot dY$ with a random upstream gradient $dY$, in
# float64, against central differences from `minilora.gradcheck`. The check function
# `check_gradients(output_fn, inputs, analytic, dy)` perturbs each element of each input,
# recomputes `output_fn()`, and returns per input the relative error
# $\max|a - n| / \max(\max|a|, \max|n|)$ between analytic $a$ and numerical $n$.
#
# Key to the letters: B batch, T positions (time), C channels, H heads, D = C / H.

# %%
import os
import sys
import time

import matplotlib

if "ipykernel" not in sys.modules:  # a script or CI: draw to files only
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from minilora.gpt import CausalSelfAttention, GPTConfig
from minilora.gradcheck import check_gradients, numerical_gradient
from minilora.nn import Linear, Module
from minilora.ops import attention_backward, attention_forward, softmax_backward, softmax_forward

FAST = os.environ.get("MINILORA_FAST") == "1" or "--fast" in sys.argv
_HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
FIGURES = os.environ.get("MINILORA_FIGURES", os.path.join(_HERE, "figures"))
os.makedirs(FIGURES, exist_ok=True)

TOL = 1e-6  # the package's bar for a float64 gradient check
START = time.perf_counter()
rng = np.random.default_rng(0)


def randn(*shape, scale=1.0):
    """Standard-normal float64 test data (gradient checks always run in float64)."""
    return rng.standard_normal(shape) * scale


B, T, C, H = (2, 6, 8, 2) if FAST else (2, 10, 16, 4)
D = C // H
print(f"{'fast' if FAST else 'full'} mode: B={B}, T={T}, C={C}, H={H}, D={D}")

# %% [markdown]
# ## 1. The softmax Jacobian
#
# $p_i = e^{x_i} / Z$ with $Z = \sum_k e^{x_k}$. By the quotient rule, using
# $\partial Z / \partial x_j = e^{x_j}$:
#
# $$\frac{\partial p_i}{\partial x_j} = \frac{\delta_{ij} e^{x_i} Z - e^{x_i} e^{x_j}}{Z^2}
#   = p_i(\delta_{ij} - p_j),\qquad\text{i.e.}\qquad J = \text{diag}(p) - p\,p^\top.$$
#
# Backward needs $dx = J^\top dp$. $J$ is symmetric, and
#
# $$dx_j = \sum_i dp_i\, p_i (\delta_{ij} - p_j) = p_j\Big(dp_j - \sum_i dp_i\, p_i\Big),$$
#
# one elementwise product and one dot product per row: $O(K)$ work instead of
# building the $K \times K$ matrix. Three checks on a small vector: the closed-form
# $J$ against central differences; `softmax_backward` applied to each basis vector
# $e_i$ (which returns $J^\top e_i$, the $i$-th row of $J$) against $J$; and the two
# identities $J = J^\top$ and $J\mathbf 1 = 0$. The last one says that adding the same
# constant to every logit changes nothing — and that $\mathbf 1^\top J = 0$ too, which
# is why a `sum()` gradient check of softmax is blind (lesson 01).

# %%
K = 5 if FAST else 7
logits = randn(K)
p, cache = softmax_forward(logits)
J = np.diag(p) - np.outer(p, p)                                   # the derivation, (K, K)

J_numeric = np.stack([numerical_gradient(lambda: float(softmax_forward(logits)[0][i]), logits)
                      for i in range(K)])                          # row i: d p_i / d x
J_backward = softmax_backward(np.eye(K), cache)                   # row i: J^T e_i

err_derivation = np.abs(J - J_numeric).max()
err_backward = np.abs(J - J_backward).max()
print(f"softmax Jacobian: max|J - central differences| = {err_derivation:.1e}, "
      f"max|J - softmax_backward(basis)| = {err_backward:.1e}")
print(f"  symmetry max|J - J^T| = {np.abs(J - J.T).max():.1e}, max|J 1| = {np.abs(J.sum(axis=1)).max():.1e}")
assert err_derivation < 1e-9, f"J = diag(p) - p p^T does not match central differences ({err_derivation:.1e})"
assert err_backward < 1e-15, f"softmax_backward does not apply J^T ({err_backward:.1e})"
assert np.allclose(J, J.T, atol=0) and np.abs(J.sum(axis=1)).max() < 1e-15, "J should be symmetric with J 1 = 0"

fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), gridspec_kw={"width_ratios": [1, 1.3]})
axes[0].bar(range(K), p)
axes[0].set_title("p = softmax(x)")
axes[0].set_xlabel("i")
lim = np.abs(J).max()
im = axes[1].imshow(J, cmap="RdBu_r", vmin=-lim, vmax=lim)
axes[1].set_title(r"$J_{ij} = p_i(\delta_{ij} - p_j)$")
axes[1].set_xlabel("j")
axes[1].set_ylabel("i")
fig.colorbar(im, ax=axes[1])
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "02_softmax_jacobian.png"), dpi=120)
plt.close(fig)

# %% [markdown]
# ## 2. Why the maximum is subtracted
#
# Multiply numerator and denominator by $e^{-c}$: $\text{softmax}(x - c) =
# \text{softmax}(x)$ for any constant $c$. Mathematically nothing changes, but
# numerically a lot does. In float32, $e^x$ overflows to `inf` for $x > 88.7$, and
# underflows to $0$ below about $-103$: then the naive formula computes
# $\infty/\infty$ or $0/0$, both `nan`. With $c = \max_k x_k$ the largest exponent is
# $e^0 = 1$, so the denominator lies in $[1, K]$ — no overflow, and no division by
# zero. `softmax_forward` does exactly this. (Logits that large are not exotic: scores
# grow with $|q|\,|k|$, and a long training run in reduced precision meets them.)

# %%
def naive_softmax(x):
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def reference_softmax(x):
    """float64, shifted: the values the float32 result should round to."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


for x32 in (np.array([80.0, 90.0, 100.0], dtype=np.float32),        # exp(100) overflows float32
            np.array([-200.0, -190.0, -180.0], dtype=np.float32)):  # every exp underflows to 0
    with np.errstate(over="ignore", invalid="ignore"):
        naive = naive_softmax(x32)
    stable = softmax_forward(x32)[0]
    reference = reference_softmax(x32)
    print(f"x = {x32}:  naive {naive}  stable {stable}  (float64 reference {reference.astype(np.float32)})")
    assert not np.isfinite(naive).all(), "the naive float32 softmax was expected to produce inf/nan here"
    assert stable.dtype == np.float32 and np.isfinite(stable).all(), "the stable softmax must stay finite"
    assert np.abs(stable - reference).max() < 1e-6 and abs(stable.sum() - 1) < 1e-6, \
        "the stable float32 softmax should equal the float64 reference to float32 precision"

x_shift = randn(K)
assert np.allclose(softmax_forward(x_shift)[0], softmax_forward(x_shift + 1000.0)[0]), \
    "softmax must not change when a constant is added to every logit"

# %% [markdown]
# ## 3. Scaled dot products
#
# If the entries of $q$ and $k$ are independent with mean 0 and variance 1, then
# $q \cdot k = \sum_{d=1}^{D} q_d k_d$ has variance $D$. Without a correction, larger heads
# would give sharper softmaxes (and smaller gradients through them); dividing by
# $\sqrt D$ brings the scores back to unit variance whatever the head size. Measured:

# %%
n_pairs = 2000 if FAST else 20000
for d in (16, 64):
    qs, ks = randn(n_pairs, d), randn(n_pairs, d)
    dots = (qs * ks).sum(axis=1)
    print(f"D = {d:2d}: std(q.k) = {dots.std():.2f} (sqrt D = {np.sqrt(d):.0f}), "
          f"std(q.k / sqrt D) = {dots.std() / np.sqrt(d):.3f}")
    assert abs(dots.std() / np.sqrt(d) - 1) < 0.1, "scaled scores should have unit standard deviation"

# %% [markdown]
# ## 4. The causal mask
#
# A language model predicts token $t+1$ from tokens $0..t$, so position $i$ must not
# look at any position $j > i$. The mask adds
#
# $$M_{ij} = \begin{cases} 0 & j \le i \\ -\infty & j > i \end{cases}$$
#
# to the scores before the softmax: $e^{-\infty} = 0$, so those probabilities are
# exactly zero, and each row still sums to one over the allowed positions. (Row 0 can
# only look at itself, so its single probability is 1; no row is fully masked.)
#
# `attention_forward(q, k, v, n_head)` takes $q, k, v$ of shape (B, T, C), splits the
# channels into H heads of size D, applies the formula above per head, and joins the
# heads again. Its cache keeps the probabilities, so we can look at them
# (`cache.probabilities()`: for long sequences the op computes them in blocks of query
# rows and skips the blocks above the diagonal, which the mask would zero anyway — see
# `minilora/ops/attention.py`).

# %%
q, k, v = randn(B, T, C), randn(B, T, C), randn(B, T, C)
y, cache = attention_forward(q, k, v, n_head=H)          # (B, T, C)
P = cache.probabilities()                                 # (B, H, T, T) probabilities
np.set_printoptions(precision=2, suppress=True, linewidth=120)
print("attention probabilities, batch 0, head 0:\n", P[0, 0])
upper = np.triu(np.ones((T, T), dtype=bool), k=1)         # the future: j > i
print(f"largest probability on a future position: {P[..., upper].max()}; "
      f"rows sum to one within {np.abs(P.sum(-1) - 1).max():.1e}")
assert (P[..., upper] == 0).all(), "a query gave weight to a future position"
assert np.allclose(P.sum(axis=-1), 1.0), "attention probabilities must sum to one over each row"

# %% [markdown]
# The property we actually want is about outputs: **changing the future must not change
# the past.** Replace $q, k, v$ at positions $t_0..T{-}1$ with new random values; the
# outputs at positions $< t_0$ must be identical (not merely close: each masked weight
# is exactly 0), while the outputs from $t_0$ on do change — otherwise the check could
# not fail. The same fact read backwards: a gradient that arrives only at the early
# outputs sends exactly nothing to the later inputs.

# %%
t0 = T // 2
q2, k2, v2 = q.copy(), k.copy(), v.copy()
for a in (q2, k2, v2):
    a[:, t0:] = randn(B, T - t0, C)
y2, _ = attention_forward(q2, k2, v2, n_head=H)
past_change = np.abs(y2[:, :t0] - y[:, :t0]).max()
future_change = np.abs(y2[:, t0:] - y[:, t0:]).max()
print(f"new inputs at positions >= {t0}: past outputs change by {past_change}, later ones by {future_change:.2f}")
assert past_change == 0.0, f"the future leaked into the past: outputs before t0 changed by {past_change}"
assert future_change > 1e-3, "outputs from t0 on should depend on the new inputs"

dy_past = randn(B, T, C)
dy_past[:, t0:] = 0.0                                     # the loss only sees outputs before t0
dq, dk, dv = attention_backward(dy_past, cache)
leaked = max(np.abs(g[:, t0:]).max() for g in (dq, dk, dv))
print(f"gradient reaching inputs at positions >= {t0} from outputs before {t0}: {leaked}")
assert leaked == 0.0, "outputs before t0 must send no gradient to later positions"

# %% [markdown]
# Causality is also what makes generation with a key/value cache correct: the last
# query attends over all keys exactly as it did inside the full sequence, so it can be
# computed alone (`q` of length 1 against `k`, `v` of length T — the op aligns the query
# to the last position).

# %%
y_last, _ = attention_forward(q[:, -1:], k, v, n_head=H)  # (B, 1, C)
print(f"last position alone vs in the full sequence: max difference {np.abs(y_last - y[:, -1:]).max():.1e}")
assert np.allclose(y_last, y[:, -1:], rtol=0, atol=1e-12), "the last query alone should match the full pass"

# %% [markdown]
# Here are the probabilities for the heads of one sequence (figure `02_attention_probs.png`):
# the mask leaves a lower triangle (the grey cells are exactly zero), and each row is a
# distribution over the past.

# %%
heads_shown = min(H, 3)
fig, axes = plt.subplots(1, heads_shown + 1, figsize=(3.4 * (heads_shown + 1), 3.6))
axes[0].imshow(np.where(upper, 1.0, 0.0), cmap="Greys", vmin=0, vmax=1.6)
axes[0].set_title("mask M: grey = $-\\infty$, white = 0")
cmap = plt.get_cmap("viridis").copy()
cmap.set_bad("0.85")                                       # masked (future) cells in grey
for h in range(heads_shown):
    im = axes[h + 1].imshow(np.ma.masked_where(upper, P[0, h]), cmap=cmap, vmin=0, vmax=1)
    axes[h + 1].set_title(f"probabilities P, head {h}")
    if T <= 10:
        for i in range(T):
            for j in range(i + 1):
                axes[h + 1].text(j, i, f"{P[0, h, i, j]:.2f}".lstrip("0"), ha="center", va="center",
                                 fontsize=6, color="w" if P[0, h, i, j] < 0.6 else "k")
for ax in axes:
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("key position j")
axes[0].set_ylabel("query position i")
fig.colorbar(im, ax=axes[1:].tolist(), shrink=0.8)
fig.savefig(os.path.join(FIGURES, "02_attention_probs.png"), dpi=120, bbox_inches="tight")
plt.close(fig)

# %% [markdown]
# ## 5. Attention backward
#
# Differentiate the forward from its last line to its first, per head (the split into
# heads and the join are reshapes; their backward is the reverse reshape):
#
# | forward | backward |
# |---|---|
# | $Y = P V$ | $dP = dY\, V^\top,\qquad dV = P^\top dY$ |
# | $P = \text{softmax}_\text{rows}(S)$ | $dS = P \odot \big(dP - \text{rowsum}(dP \odot P)\big)$ (section 1, per row) |
# | $S = Q K^\top / \sqrt D + M$ | $dQ = dS\, K / \sqrt D,\qquad dK = dS^\top Q / \sqrt D$ |
#
# The first and last rows are lesson 01's matrix-product rule. The mask is a constant,
# so it has no gradient of its own; and since $P = 0$ wherever $M = -\infty$, $dS$ is
# zero there too: masked positions pass nothing back, which is the gradient side of
# "the future does not change the past". Checked numerically, every element of
# $dQ$, $dK$, $dV$:

# %%
dy = randn(B, T, C)
dq, dk, dv = attention_backward(dy, cache)
errors = check_gradients(lambda: attention_forward(q, k, v, n_head=H)[0],
                         {"q": q, "k": k, "v": v}, {"q": dq, "k": dk, "v": dv}, dy)
print("attention op relative errors:", {n: f"{e:.1e}" for n, e in errors.items()})
assert all(e < TOL for e in errors.values()), f"attention backward disagrees with central differences: {errors}"

# %% [markdown]
# ## 6. A whole self-attention layer
#
# In the model, $q$, $k$ and $v$ are three linear maps of the same input $x$, and an
# output projection follows the op:
#
# $$q = x W_q + b_q,\quad k = x W_k + b_k,\quad v = x W_v + b_v,\quad
#   y = \text{attention}(q, k, v)\, W_o + b_o.$$
#
# The backward runs in reverse: the output projection, the attention op, then the three
# input projections. $x$ feeds three branches, so by the multivariate chain rule its
# gradient is the **sum** of what comes back along each:
# $dx = dq\,W_q^\top + dk\,W_k^\top + dv\,W_v^\top$.
#
# `minilora.nn.Linear` holds $W$ (stored (in, out), $y = xW + b$) and $b$ as
# `Parameter`s; its `forward` keeps the cache and its `backward(dy)` adds $dW$, $db$
# into `.grad` and returns $dx$. Everything in the class below is a call into the package.
# We initialise the weights with standard deviation $C^{-1/2}$ so that $q$ and $k$ have
# unit scale and the probabilities are neither uniform nor one-hot: a check on uniform
# probabilities would exercise little of the softmax.

# %%
class SelfAttention(Module):
    """Causal self-attention: q, k, v projections -> attention op -> output projection."""

    def __init__(self, C, n_head, rng):
        super().__init__()
        self.n_head = n_head
        std = C ** -0.5
        self.q_proj = Linear(C, C, rng=rng, std=std, dtype="float64")
        self.k_proj = Linear(C, C, rng=rng, std=std, dtype="float64")
        self.v_proj = Linear(C, C, rng=rng, std=std, dtype="float64")
        self.o_proj = Linear(C, C, rng=rng, std=std, dtype="float64")

    def forward(self, x):                                 # x (B, T, C)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)   # (B, T, C) each
        y, self.attn_cache = attention_forward(q, k, v, self.n_head)  # (B, T, C)
        return self.o_proj(y)                             # (B, T, C)

    def backward(self, dout):
        dy = self.o_proj.backward(dout)                   # (B, T, C), and o_proj's .grad
        dq, dk, dv = attention_backward(dy, self.attn_cache)
        return self.q_proj.backward(dq) + self.k_proj.backward(dk) + self.v_proj.backward(dv)


layer = SelfAttention(C, H, np.random.default_rng(1))
for _, p in layer.named_parameters():                     # non-zero biases, so they matter too
    p.data[...] = randn(*p.shape, scale=0.1)
x = randn(B, T, C)
dout = randn(B, T, C)

layer.zero_grad()
out = layer.forward(x)
dx = layer.backward(dout)
params = dict(layer.named_parameters())
inputs = {"x": x, **{name: p.data for name, p in params.items()}}
analytic = {"x": dx, **{name: p.grad for name, p in params.items()}}
errors = check_gradients(lambda: layer.forward(x), inputs, analytic, dout)
print(f"self-attention layer: {sum(p.size for p in params.values())} parameters; relative errors:")
for name, e in errors.items():
    print(f"  {name:<14} {e:.1e}   (largest |gradient| {np.abs(analytic[name]).max():.1e})")

# %% [markdown]
# Every input passes — except, apparently, `k_proj.bias`, whose "relative error" is
# about 1. Look at its size, though: the analytic gradient is below $10^{-16}$ and the
# numerical one below $10^{-10}$ — two specks of rounding noise, whose ratio means nothing.
# The key bias truly has a
# zero gradient: adding $b_k$ to every key adds $q_i \cdot b_k$ to every score in row
# $i$ — the same constant across the row — and softmax ignores constants added to a row
# (section 1, $J\mathbf 1 = 0$). A relative error has no scale to measure when the
# true gradient is zero, so there we check the absolute size instead, and that the
# reason is the one just given: shifting all keys by a common vector leaves the output
# unchanged.

# %%
zero_grad_inputs = [name for name in errors if np.abs(analytic[name]).max() < 1e-12]
print(f"inputs whose gradient is zero: {zero_grad_inputs}")
assert zero_grad_inputs == ["k_proj.bias"], f"only the key bias should have a zero gradient: {zero_grad_inputs}"
k_bias_numeric = numerical_gradient(lambda: float((layer.forward(x) * dout).sum()), layer.k_proj.bias.data)
print(f"k_proj.bias: max|analytic| = {np.abs(layer.k_proj.bias.grad).max():.1e}, "
      f"max|numeric| = {np.abs(k_bias_numeric).max():.1e}")
assert np.abs(k_bias_numeric).max() < 1e-8, "the key bias should not change the loss"
k_shift = randn(C)
shifted = attention_forward(q, k + k_shift, v, n_head=H)[0]
print(f"attention with every key shifted by one vector: output changes by {np.abs(shifted - y).max():.1e}")
assert np.allclose(shifted, y, rtol=0, atol=1e-12), "a common shift of all keys must not change attention"
assert all(e < TOL for name, e in errors.items() if name not in zero_grad_inputs), \
    f"self-attention layer gradients disagree with central differences: {errors}"

# %% [markdown]
# This is, line for line, the attention inside minilora's GPT
# (`minilora.gpt.CausalSelfAttention`, which adds only dropout — off here). Load our
# weights into it: outputs and every gradient agree.

# %%
config = GPTConfig(vocab_size=16, block_size=T, n_layer=1, n_head=H, n_embd=C, dropout=0.0)
model_attn = CausalSelfAttention(config, np.random.default_rng(2), "float64", dropout_seed=0)
model_attn.load_state_dict(layer.state_dict())
model_attn.zero_grad()
out_model = model_attn.forward(x)
dx_model = model_attn.backward(dout)
diff = max([np.abs(out_model - out).max(), np.abs(dx_model - dx).max()]
           + [np.abs(p.grad - params[name].grad).max() for name, p in model_attn.named_parameters()])
print(f"GPT's CausalSelfAttention vs ours: largest difference in output and gradients {diff:.1e}")
assert diff < 1e-12, f"our layer and the model's attention should agree, differ by {diff:.1e}"

print(f"lesson 02 done in {time.perf_counter() - START:.1f} s; figures in {FIGURES}")
