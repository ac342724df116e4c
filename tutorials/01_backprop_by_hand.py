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
# # 01 · Backpropagation by hand: linear, GELU, layer norm
#
# A GPT-2 block is built from a handful of operations. minilora writes each one as
# two plain functions on arrays:
#
# ```python
# y, cache = op_forward(x, params...)      # the cache holds what backward needs
# dx, dparams... = op_backward(dy, cache)  # gradients of the loss w.r.t. each input
# ```
#
# Throughout, $L$ is a scalar loss somewhere downstream, and `dy` means
# $\partial L / \partial y$, an array shaped like $y$. Backward's job is the chain
# rule: given `dy`, return $\partial L/\partial x_j = \sum_i dy_i\, \partial y_i / \partial x_j$,
# that is $J^\top dy$ with $J$ the Jacobian $\partial y / \partial x$. It never builds
# $J$ itself: each backward is a closed form worked out on paper, and that is what
# this lesson does for three operations.
#
# Every closed form is then **checked** against numbers: perturb one input element by
# $\pm\varepsilon$, recompute the loss, and take the central difference
#
# $$\frac{\partial L}{\partial x_i} \approx \frac{L(x + \varepsilon e_i) - L(x - \varepsilon e_i)}{2\varepsilon}.$$
#
# The loss we differentiate is $L = \sum_i y_i\, dy_i$ with a **random** `dy`: its
# gradient with respect to $y$ is exactly `dy`, so the numbers test precisely what
# backward computes. The end of the lesson shows why a random `dy`, and not
# $L = \sum_i y_i$, is the honest choice, and how to pick $\varepsilon$.
#
# Run it as a script (`python tutorials/01_backprop_by_hand.py`, add `--fast` for the
# quick version) or open it as a notebook with jupytext.

# %%
import os
import sys
import time

import matplotlib

if "ipykernel" not in sys.modules:  # a script or CI: draw to files only
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from minilora.gradcheck import check_gradients, numerical_gradient, relative_error, weighted_sum_loss
from minilora.ops import (gelu_backward, gelu_forward, layernorm_backward, layernorm_forward,
                          linear_backward, linear_forward, softmax_forward)

FAST = os.environ.get("MINILORA_FAST") == "1" or "--fast" in sys.argv
_HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
FIGURES = os.environ.get("MINILORA_FIGURES", os.path.join(_HERE, "figures"))
os.makedirs(FIGURES, exist_ok=True)

TOL = 1e-6  # the package's bar: relative error of an analytic gradient in float64
START = time.perf_counter()
rng = np.random.default_rng(0)


def randn(*shape):
    """Standard-normal float64 test data (gradient checks always run in float64)."""
    return rng.standard_normal(shape)


# Shapes: B batch, T time (positions), C channels, O output features.
B, T, C, O = (2, 3, 4, 5) if FAST else (4, 8, 16, 24)
print(f"{'fast' if FAST else 'full'} mode: B={B}, T={T}, C={C}, O={O}")

# %% [markdown]
# ## The checking tool
#
# `minilora.gradcheck` does the numerical side. `check_gradients(output_fn, inputs,
# analytic, dy)` builds $L = \sum y \cdot dy$ around `output_fn` (which recomputes $y$
# from the inputs), perturbs every element of every input in place, and returns, per
# input, the relative error
#
# $$\text{err} = \frac{\max_i |a_i - n_i|}{\max(\max_i |a_i|,\ \max_i |n_i|)}$$
#
# between the analytic gradient $a$ and the numerical one $n$: every element compared,
# against the scale of the whole gradient. In float64 a correct backward lands near
# $10^{-10}$; we demand less than $10^{-6}$.
#
# ## 1. Linear: $y = xW + b$
#
# With $x$ of shape $(N, C)$ (the $B \cdot T$ positions as rows), $W$ of shape $(C, O)$,
# $y_{no} = \sum_c x_{nc} W_{co} + b_o$. Each partial derivative is a single term:
#
# $$\frac{\partial y_{no}}{\partial x_{nc}} = W_{co},\qquad
#   \frac{\partial y_{no}}{\partial W_{co}} = x_{nc},\qquad
#   \frac{\partial y_{no}}{\partial b_o} = 1.$$
#
# Summing over every output that each input touches:
#
# $$dx_{nc} = \sum_o dy_{no} W_{co} \;\Rightarrow\; dx = dy\, W^\top,\qquad
#   dW_{co} = \sum_n x_{nc}\, dy_{no} \;\Rightarrow\; dW = x^\top dy,\qquad
#   db_o = \sum_n dy_{no}.$$
#
# A useful habit: every gradient has its input's shape, and there is only one way to
# multiply the available arrays into that shape. $dW$ sums over the rows — every
# position used the same weight. Leading axes such as $(B, T)$ are flattened into rows.

# %%
x, W, b = randn(B, T, C), randn(C, O), randn(O)
y, cache = linear_forward(x, W, b)            # (B, T, C) @ (C, O) + (O,) -> (B, T, O)
dy = randn(*y.shape)                          # a random upstream gradient
dx, dW, db = linear_backward(dy, cache)
errors = check_gradients(lambda: linear_forward(x, W, b)[0],
                         {"x": x, "W": W, "b": b}, {"x": dx, "W": dW, "b": db}, dy)
print("linear    relative errors:", {k: f"{v:.1e}" for k, v in errors.items()})
assert all(e < TOL for e in errors.values()), f"linear backward disagrees with central differences: {errors}"

# The closed forms, written out once more with plain NumPy: the same numbers.
assert np.allclose(dx, dy @ W.T) and np.allclose(dW, x.reshape(-1, C).T @ dy.reshape(-1, O)) \
    and np.allclose(db, dy.sum(axis=(0, 1))), "linear backward is not dx = dy W^T, dW = x^T dy, db = sum dy"

# %% [markdown]
# ## 2. GELU
#
# GPT-2's activation, in its tanh approximation, acts on each element separately:
#
# $$\text{gelu}(x) = \tfrac12 x\,(1 + \tanh u),\qquad u = \sqrt{2/\pi}\,(x + 0.044715\,x^3).$$
#
# An elementwise op has a diagonal Jacobian, so backward is just $dx = dy \cdot
# \text{gelu}'(x)$. The product rule, with $\tanh' = 1 - \tanh^2$:
#
# $$\text{gelu}'(x) = \tfrac12 (1 + \tanh u) + \tfrac12 x\,(1 - \tanh^2 u)\,\frac{du}{dx},
#   \qquad \frac{du}{dx} = \sqrt{2/\pi}\,(1 + 3 \cdot 0.044715\, x^2).$$
#
# minilora computes the same function in another form: $\tanh u = 2\sigma(2u) - 1$, so
# $\tfrac12(1 + \tanh u) = \sigma(2u)$ and $\text{gelu}(x) = x\,\sigma(2u)$, with
# $\sigma(z) = 1/(1 + e^{-z})$. One `exp` replaces one `tanh` (cheaper in NumPy), and for
# negative $x$ nothing cancels. With $s = \sigma(2u)$ and $\sigma' = \sigma(1 - \sigma)$ the
# derivative reads $s + x\,s(1 - s)\,2\,du/dx$ — the formula above, rewritten. The cache
# keeps only $x$: backward recomputes $s$ (one `exp`) instead of storing another
# activation the size of the MLP's hidden layer.

# %%
x = randn(B, T, 4 * C)                        # GELU sits inside the MLP, on 4C features
y, cache = gelu_forward(x)
dy = randn(*y.shape)
dx = gelu_backward(dy, cache)
errors = check_gradients(lambda: gelu_forward(x)[0], {"x": x}, {"x": dx}, dy)
print("gelu      relative error: ", f"{errors['x']:.1e}")
assert errors["x"] < TOL, f"gelu backward disagrees with central differences: {errors}"

# %% [markdown]
# For an elementwise op, `dy = 1` returns $\text{gelu}'(x)$ itself, which lets us draw
# the derivative next to the function (and put a few central differences on it).

# %%
grid = np.linspace(-4, 4, 401)
g, cache = gelu_forward(grid)
dgelu = gelu_backward(np.ones_like(grid), cache)
pts = np.linspace(-3.5, 3.5, 15)
num = numerical_gradient(lambda: float(gelu_forward(pts)[0].sum()), pts)
fig, ax = plt.subplots(figsize=(6, 3.6))
ax.plot(grid, g, label="gelu(x)")
ax.plot(grid, dgelu, label="gelu'(x) from gelu_backward")
ax.plot(pts, num, "o", ms=4, label="central differences")
ax.axhline(0, color="0.8", lw=0.8)
ax.set_xlabel("x")
ax.legend()
ax.set_title("GELU (tanh approximation) and its derivative")
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "01_gelu.png"), dpi=120)
plt.close(fig)
assert np.abs(num - gelu_backward(np.ones_like(pts), gelu_forward(pts)[1])).max() < 1e-8, \
    "gelu' from backward does not match central differences on the plotted points"

# %% [markdown]
# ## 3. Layer norm
#
# Layer norm normalises each row of $C$ features, then scales and shifts it:
#
# $$\mu = \frac1C \sum_k x_k,\quad \sigma^2 = \frac1C \sum_k (x_k - \mu)^2,\quad
#   r = (\sigma^2 + \epsilon)^{-1/2},\quad \hat x_k = (x_k - \mu)\, r,\quad
#   y_k = w_k \hat x_k + b_k.$$
#
# The parameters are easy: $dw = \sum_{\text{rows}} dy \cdot \hat x$ and $db =
# \sum_{\text{rows}} dy$. For $x$, write $g_k = dy_k\, w_k$ (the gradient reaching
# $\hat x_k$). The difficulty is that $\mu$ and $r$ depend on **every** element of
# the row, so each $\hat x_k$ depends on each $x_j$:
#
# $$\frac{\partial \hat x_k}{\partial x_j} = r\Big(\delta_{kj} - \frac1C\Big)
#   + (x_k - \mu)\,\frac{\partial r}{\partial x_j}.$$
#
# For the variance, $\partial\sigma^2/\partial x_j = \frac2C (x_j - \mu)$ (the term through
# $\mu$ vanishes because $\sum_k (x_k - \mu) = 0$), so
# $\partial r / \partial x_j = -\tfrac12 (\sigma^2+\epsilon)^{-3/2}\, \tfrac2C (x_j-\mu) = -\frac{r^2 \hat x_j}{C}$, and
#
# $$\frac{\partial \hat x_k}{\partial x_j} = r\Big(\delta_{kj} - \frac1C - \frac{\hat x_k \hat x_j}{C}\Big)
#   \quad\Rightarrow\quad
#   dx_j = \sum_k g_k \frac{\partial \hat x_k}{\partial x_j}
#        = r\Big(g_j - \overline{g} - \hat x_j\, \overline{g \hat x}\Big),$$
#
# where the bars are means over the row. Two row-means, one for each statistic that
# couples the row: $\overline g$ comes from the mean, $\hat x_j \overline{g\hat x}$
# from the variance. `layernorm_backward` computes exactly this line.

# %%
x, w, b = randn(B, T, C), randn(C), randn(C)
y, cache = layernorm_forward(x, w, b)
dy = randn(*y.shape)
dx, dw, db = layernorm_backward(dy, cache)
errors = check_gradients(lambda: layernorm_forward(x, w, b)[0],
                         {"x": x, "weight": w, "bias": b}, {"x": dx, "weight": dw, "bias": db}, dy)
print("layernorm relative errors:", {k: f"{v:.1e}" for k, v in errors.items()})
assert all(e < TOL for e in errors.values()), f"layernorm backward disagrees with central differences: {errors}"

# %% [markdown]
# ## 4. Why a random `dy`: two bugs a `sum()` check cannot see
#
# A common shortcut checks gradients of $L = \sum_i y_i$, i.e. `dy = ones`. Then the
# check only ever sees $J^\top \mathbf 1$ — the column sums of the Jacobian — and any
# bug that leaves those sums alone goes unnoticed. A random `dy` weighs every entry of
# $J$ differently, so an error anywhere shows.
#
# **Bug 1: forgetting to multiply by `dy`.** An elementwise backward that returns
# $\text{gelu}'(x)$ instead of $dy \cdot \text{gelu}'(x)$ is exactly right when `dy = 1`.
#
# **Bug 2: treating the variance as a constant.** A layer-norm backward that forgets
# $\partial r / \partial x$ returns $r(g - \overline g)$ and drops the $\hat x\,
# \overline{g\hat x}$ term. With `dy = 1` and $w = 1$ — which is how every `LayerNorm`
# starts training — $g = 1$ and $\overline{g\hat x} = \overline{\hat x} = 0$: the dropped
# term is zero. Worse, each output row then sums to the constant $\sum_k b_k$, so
# $\sum y$ does not depend on $x$ at all: the true gradient is zero, and the sum check
# can only ask "is your gradient zero?".
#
# When the true gradient is zero a *relative* error has no scale to measure against,
# so `sum()`-style checks compare absolutely: the gradients agree when
# $\max_i |a_i - n_i| < 10^{-6}$. We use the same test for both kinds of `dy`.

# %%
def agrees(analytic, numeric, tol=TOL):
    """Every element within tol of the numbers, measured against the gradient's scale
    (and never against a scale below 1, so that two zero gradients agree)."""
    return np.abs(analytic - numeric).max() / max(1.0, np.abs(numeric).max()) < tol


def gelu_backward_forgets_dy(dy, cache):
    return gelu_backward(np.ones_like(dy), cache)          # gelu'(x), whatever dy says


def layernorm_backward_constant_variance(dy, cache):
    g = dy * cache.weight                                  # the gradient reaching xhat
    return cache.rstd * (g - g.mean(axis=-1, keepdims=True))  # missing: - xhat * mean(g * xhat)


def check_both_ways(name, forward, backward, x):
    """Run a correct or broken backward against central differences, with dy = ones
    (the sum() check) and with a random dy. Returns (passes_sum, passes_random)."""
    y, cache = forward(x)
    result = []
    for kind, dy in (("dy = ones ", np.ones_like(y)), ("dy random ", randn(*y.shape))):
        analytic = backward(dy, cache)
        numeric = numerical_gradient(weighted_sum_loss(lambda: forward(x)[0], dy), x)
        ok = agrees(analytic, numeric)
        print(f"  {name:<38} {kind} max|a - n| = {np.abs(analytic - numeric).max():.1e}   "
              f"{'passes' if ok else 'FAILS'}")
        result.append(ok)
    return tuple(result)


x = randn(B, T, C)
ones, zeros = np.ones(C), np.zeros(C)                      # LayerNorm's initial weight and bias
ln = lambda x: layernorm_forward(x, ones, zeros)           # noqa: E731
ln_backward = lambda dy, cache: layernorm_backward(dy, cache)[0]  # noqa: E731

print("sum() check vs random-dy check:")
good_gelu = check_both_ways("gelu, correct backward", gelu_forward, gelu_backward, x)
bad_gelu = check_both_ways("gelu, backward ignores dy", gelu_forward, gelu_backward_forgets_dy, x)
good_ln = check_both_ways("layernorm, correct backward", ln, ln_backward, x)
bad_ln = check_both_ways("layernorm, variance taken as constant", ln, layernorm_backward_constant_variance, x)

assert good_gelu == (True, True) and good_ln == (True, True), "a correct backward must pass both checks"
assert bad_gelu == (True, False), f"expected the dy-ignoring GELU to pass sum() and fail random dy: {bad_gelu}"
assert bad_ln == (True, False), f"expected the constant-variance layer norm to pass sum() and fail random dy: {bad_ln}"

# %% [markdown]
# The same blindness is built into softmax, for every input: its outputs sum to one,
# so $\sum_i \text{softmax}(x)_i$ is constant and its gradient is zero. A softmax
# backward that returned zeros would pass any `sum()` check (lesson 02 derives the real
# one). The numbers confirm the flat loss:

# %%
s = randn(B, T, C)
flat = numerical_gradient(lambda: float(softmax_forward(s)[0].sum()), s)
print(f"softmax: max |d sum(softmax(s)) / ds| = {np.abs(flat).max():.1e}")
assert np.abs(flat).max() < 1e-9, "sum(softmax(s)) should not depend on s"

# %% [markdown]
# ## 5. Choosing $\varepsilon$: truncation against rounding
#
# The central difference makes two errors that pull in opposite directions.
#
# * **Truncation.** Taylor expansion gives
#   $\frac{L(x+\varepsilon) - L(x-\varepsilon)}{2\varepsilon} = L'(x) + \frac{\varepsilon^2}{6} L'''(x) + O(\varepsilon^4)$:
#   an error that shrinks like $\varepsilon^2$.
# * **Rounding.** Each $L$ is computed with a relative error of about the machine
#   epsilon $u$ ($2.2\times10^{-16}$ in float64, $1.2\times10^{-7}$ in float32), and the
#   difference is divided by $2\varepsilon$: an error that grows like $u\,|L|/\varepsilon$.
#
# Their sum is smallest where both are equal, near
# $\varepsilon^\ast \approx (3u\,|L| / |L'''|)^{1/3}$ — about $10^{-5}$ in float64 for
# values of order one. The measured error against $\varepsilon$ is a V on log axes:
# slope $+2$ on the right, $-1$ on the left. Here is the V for layer norm's input
# gradient, in float64 and in float32.

# %%
n_eps = 25 if FAST else 49                                 # half- or quarter-decade steps
eps_grid = np.logspace(-13, -1, n_eps)
xs = randn(2, C)
dys = randn(2, C)
curves = {}
for dtype in (np.float64, np.float32):
    x_d, dy_d = xs.astype(dtype), dys.astype(dtype)
    w_d, b_d = ones.astype(dtype), zeros.astype(dtype)
    # The reference gradient: the analytic backward, in float64 (checked above).
    reference = layernorm_backward(dys, layernorm_forward(xs, ones, zeros)[1])[0]
    loss = weighted_sum_loss(lambda: layernorm_forward(x_d, w_d, b_d)[0], dy_d)
    curves[dtype.__name__] = np.array([relative_error(reference, numerical_gradient(loss, x_d, eps))
                                       for eps in eps_grid])

best = {name: (eps_grid[int(np.argmin(err))], err.min()) for name, err in curves.items()}
for name, (eps, err) in best.items():
    print(f"{name}: best eps = {eps:.1e}, relative error there = {err:.1e}")

fig, ax = plt.subplots(figsize=(6.4, 4))
for name, err in curves.items():
    ax.loglog(eps_grid, err, "o-", ms=3, label=name)
eps64, err64 = best["float64"]
right, left = eps_grid[eps_grid >= eps64], eps_grid[eps_grid <= eps64]
ax.loglog(right, err64 * (right / eps64) ** 2, "k--", lw=0.8, label=r"truncation $\propto \varepsilon^2$")
ax.loglog(left, err64 * (eps64 / left), "k:", lw=0.8, label=r"rounding $\propto 1/\varepsilon$")
ax.axhline(TOL, color="tab:red", lw=0.8)
ax.text(eps_grid[0], TOL * 1.5, "the 1e-6 bar", color="tab:red", fontsize=8)
ax.set_ylim(min(err64 / 10, 1e-12), 10)
ax.set_xlabel(r"step $\varepsilon$")
ax.set_ylabel("relative error of central differences")
ax.set_title("Layer norm: central-difference error vs step size")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "01_eps_sweep.png"), dpi=120)
plt.close(fig)

# %% [markdown]
# What to read off the plot (and what the assertions hold the code to):
#
# * In float64 the bottom of the V sits near $\varepsilon = 10^{-5}$, with an error
#   of $10^{-11}$ to $10^{-10}$: four orders or more below our bar. That is why `minilora.gradcheck`
#   uses `eps = 1e-5`.
# * Too small a step is as bad as too large: at $\varepsilon = 10^{-13}$ rounding
#   dominates and the error is back near $10^{-3}$.
# * In float32 no step passes: $x + \varepsilon$ equals $x$ for $\varepsilon$ below
#   about $10^{-7}$ (the error is 100%), and the best step, near $10^{-2}$, still leaves
#   an error far above $10^{-6}$. Gradient checks run in float64.

# %%
assert 3e-6 <= eps64 <= 3e-4, f"float64 error should bottom out near eps 1e-5..1e-4, found {eps64:.1e}"
assert err64 < 1e-9, f"float64 central differences should reach 1e-9 at the best eps, got {err64:.1e}"
assert curves["float64"][0] > 1e3 * err64 and curves["float64"][-1] > 1e3 * err64, \
    "the float64 error should rise by 1000x at both ends of the sweep (a V, not a slope)"
assert best["float32"][1] > TOL, \
    f"float32 central differences should not reach the 1e-6 bar, got {best['float32'][1]:.1e}"

print(f"lesson 01 done in {time.perf_counter() - START:.1f} s; figures in {FIGURES}")
