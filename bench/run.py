"""minilora's benchmark: validate against a reference, then time, then record.

    python bench/run.py                     # tiny, small, medium on the CPU (+ GPU if present)
    python bench/run.py --quick             # tiny only, fewer rounds: under a minute
    python bench/run.py --configs small --threads 4 --out bench/results

Every number is checked before it is timed: minilora and an independent PyTorch eager
model (bench/torch_gpt.py) built from the same weights must give the same loss and
gradients (training), the same logits (inference), and generation with and without the
KV cache must give the same tokens. A measurement whose check fails is not reported: it
is recorded as refused, printed, and the run exits with status 1.

Results: ``<out>/<tag>.json`` and ``<out>/<tag>.md`` (machine, CPU model, threads, library
versions, date; the tables; the targets). See bench/README.md for what each number means.

Key: B batch, T time (sequence length), L n_layer, H n_head, C n_embd, V vocab_size,
R LoRA rank, N matmul parameters.
"""
from __future__ import annotations

import os
import sys


def _threads_from_argv(argv) -> int:
    """--threads N (or --threads=N) from the command line; os.cpu_count() by default."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return os.cpu_count() or 1


THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                   "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")

if __name__ == "__main__":
    # BLAS libraries read their thread count once, when they load: set it before NumPy
    # (and PyTorch) are imported, the same for both sides.
    _n = str(_threads_from_argv(sys.argv[1:]))
    for _var in THREAD_ENV_VARS:
        os.environ[_var] = _n
    # OpenBLAS's idle workers otherwise spin ~0.1 s after each product, on the cores that
    # minilora's elementwise threads (minilora/threads.py) and then PyTorch need next; 2^20
    # cycles (~0.4 ms) bridges back-to-back products only. PyTorch's MKL is unaffected.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

import numpy as np  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
for _p in (BENCH_DIR, REPO_ROOT):          # benchmark this checkout's minilora
    if _p not in sys.path:
        sys.path.insert(0, _p)

import minilora as ml  # noqa: E402
from minilora import backend  # noqa: E402
from minilora.timing import paired_ratio, paired_timing, time_once  # noqa: E402
from minilora.train import model_generators  # noqa: E402

NO_TORCH_ENV = "MINILORA_BENCH_NO_TORCH"   # set in minilora's memory probes: PyTorch stays out
if os.environ.get(NO_TORCH_ENV) == "1":
    torch, F = None, None
    TORCH_IMPORT_ERROR = f"not imported ({NO_TORCH_ENV}=1)"
else:
    try:
        import torch  # noqa: E402
        import torch.nn.functional as F  # noqa: E402
        TORCH_IMPORT_ERROR = None
    except Exception as _e:  # noqa: BLE001 -- any failure to import means "no PyTorch side"
        torch, F = None, None
        TORCH_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"

SCHEMA_VERSION = 1

# ======================================================================================
# What is measured
# ======================================================================================


@dataclass(frozen=True)
class BenchConfig:
    """A model shape and the batch it trains on: (V, T, L, H, C) and B."""
    name: str
    V: int
    T: int
    L: int
    H: int
    C: int
    B: int

    def gpt_config(self, block_size: Optional[int] = None) -> "ml.GPTConfig":
        return ml.GPTConfig(vocab_size=self.V, block_size=block_size or self.T, n_layer=self.L,
                            n_head=self.H, n_embd=self.C, dropout=0.0)


CONFIGS = {
    "tiny": BenchConfig("tiny", V=512, T=64, L=2, H=4, C=128, B=8),
    "small": BenchConfig("small", V=2048, T=128, L=4, H=4, C=256, B=8),
    "medium": BenchConfig("medium", V=8192, T=256, L=6, H=8, C=512, B=4),
    "gpt2": BenchConfig("gpt2", V=50257, T=1024, L=12, H=12, C=768, B=4),   # GPT-2 small (GPU)
}
CPU_CONFIGS = ("tiny", "small", "medium")
GPU_CONFIGS = ("tiny", "small", "medium", "gpt2")
# Generation: the small model with a 512-position table, one prompt of 64 tokens.
GEN_MODEL = "small"
GEN_BLOCK_SIZE = 512
GEN_PROMPT = 64
GEN_NEW_TOKENS = 256

LORA = dict(r=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)

# Validation tolerances (float32): relative to the largest magnitude on either side.
TOL_LOSS = 1e-4
TOL_GRAD = 1e-3
TOL_LOGITS = 1e-4
TOL_OPTIM = 1e-5        # parameters after two AdamW steps from identical gradients
TOL_DIRECTIONAL = 1e-5  # float64 central difference vs analytic (fallback without PyTorch)
GRAD_FLOOR = 1e-4       # see rel_err_floor: scale floor, as a fraction of the largest gradient

# Targets: (key, description, comparison, threshold).
TARGETS_DOC = {
    "train_ratio": "NumPy training tokens/s ÷ PyTorch CPU eager (every config, full and LoRA) ≥ 1.0",
    "infer_ratio": "NumPy inference tokens/s ÷ PyTorch CPU eager: ≥ 1.0 small/medium, ≥ 0.9 tiny",
    "mfu": "MFU, medium full training, NumPy ≥ 70%",
    "lora_time": "LoRA step time ÷ full step time, medium ≤ 0.75",
    "lora_bytes": "LoRA gradient + optimizer-state bytes ÷ full's, medium ≤ 1%",
    "merged": "merged LoRA inference time ÷ base inference time ≤ 1.03",
    "kv": "KV-cache generation speed-up at 256 new tokens, small ≥ 5×",
    "memory": "peak training memory NumPy ÷ PyTorch, same config ≤ 1.0",
    "gpu_train": "CuPy training tokens/s ÷ PyTorch CUDA eager, GPT-2 small ≥ 0.8",
}

# ======================================================================================
# Small helpers
# ======================================================================================


def log(msg: str) -> None:
    print(msg, flush=True)


def rel_err(a, b, floor: float = 0.0) -> float:
    """max|a - b| / max(max|a|, max|b|, floor); 0 when everything is zero.

    ``floor`` keeps a quantity that is zero in exact arithmetic (k_proj's bias gradient:
    softmax ignores a constant added to every score of a row) from being compared with
    its own float32 noise: its error is measured against the model's gradient scale.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)), floor)
    diff = float(np.abs(a - b).max(initial=0.0))
    if not math.isfinite(diff):
        return float("inf")
    return diff / scale if scale > 0 else diff


def loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_times() -> Optional[List[int]]:
    """The machine's CPU time counters (Linux /proc/stat, all CPUs): user, nice, system,
    idle, iowait, irq, softirq, steal -- in clock ticks; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return [int(x) for x in fields[1:9]] if fields and fields[0] == "cpu" and len(fields) >= 9 else None
    except (OSError, ValueError):
        return None


def steal_fraction(before: Optional[List[int]], after: Optional[List[int]]) -> Optional[float]:
    """The share of the CPU time between two cpu_times() readings that the hypervisor
    gave to other guests ("steal"): on a virtual machine, time in which this one's CPUs
    were runnable but not running. Every timed block in that span waited for it."""
    if before is None or after is None:
        return None
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta)
    return delta[7] / total if total > 0 else None


def spread(xs: Sequence[float]) -> float:
    """(slowest - fastest) / median of a side's rounds: how far its rounds disagree."""
    return (max(xs) - min(xs)) / median(xs)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


class Sync:
    """Waits for a device's queued work: a no-op on the CPU; the device's synchronize
    (minilora.backend.synchronize) and torch.cuda.synchronize on a GPU (timers must not
    stop early)."""

    def __init__(self, device: str):
        self.device = device

    def minilora(self) -> None:
        backend.synchronize(self.device)

    def torch(self) -> None:
        if self.device == "cuda" and torch is not None:
            torch.cuda.synchronize()


def interleaved_timing(fns: Sequence[Tuple[str, Callable[[], object], Callable[[], None]]],
                       rounds: int, steps: int, warmup: int) -> Dict[str, List[float]]:
    """Time several contenders in turns: per round, each runs ``steps`` calls in a row.

    ``fns`` holds (name, fn, sync). Every contender first runs ``warmup`` calls. The
    order alternates between rounds (ABAB..., then BABA...) so neither side always runs
    right after the other. Returns name -> seconds per call, one value per round.
    """
    for name, fn, sync in fns:
        for _ in range(warmup):
            fn()
        sync()
    times: Dict[str, List[float]] = {name: [] for name, _, _ in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name, fn, sync in order:
            gc.collect()
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def trials_for(seconds_per_trial: float, budget_s: float, least: int, cap: int = 101) -> int:
    """Trials of :func:`paired_timing` that fit ``budget_s``, but at least ``least``."""
    if seconds_per_trial <= 0:
        return cap
    return max(least, min(cap, int(budget_s / seconds_per_trial)))


def sized_paired_timing(fns: Sequence[Tuple[str, Callable[[], object], Callable[[], None]]],
                        budget_s: float, least: int) -> Tuple[int, Dict[str, List[float]]]:
    """:func:`paired_timing` with as many trials as fit ``budget_s`` (at least ``least``),
    judged from one untimed trial that also warms every contender up. Returns
    (trials, times)."""
    one_trial = sum(time_once(fn, s) for _, fn, s in fns)
    trials = trials_for(one_trial, budget_s, least)
    return trials, paired_timing(fns, trials)


def steps_for(seconds_per_call: float, min_block_s: float, cap: int = 50) -> int:
    """How many calls make a timed block of at least ``min_block_s`` seconds."""
    if seconds_per_call <= 0:
        return cap
    return max(1, min(cap, math.ceil(min_block_s / seconds_per_call)))


# ======================================================================================
# The machine
# ======================================================================================


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def blas_info() -> Dict[str, object]:
    """NumPy's BLAS (name, version) and the thread count it actually uses, where the
    library lets us ask (OpenBLAS does, through its C API)."""
    info: Dict[str, object] = {}
    try:
        deps = np.show_config(mode="dicts").get("Build Dependencies", {})
        blas = deps.get("blas", {})
        info = {"name": blas.get("name"), "version": blas.get("version")}
    except Exception:  # noqa: BLE001 -- old NumPy: show_config has no dicts
        pass
    info["threads"] = _openblas_threads()
    return info


def _openblas_threads() -> Optional[int]:
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "openblas" in line and ".so" in line})
    except OSError:
        return None
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                    "openblas_get_num_threads64_", "openblas_get_num_threads"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                return int(fn())
    return None


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--", "minilora"],
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("+uncommitted changes in minilora/" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def gpu_name() -> Optional[str]:
    if not backend.cuda_available():
        return None
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def set_threads(n: int) -> None:
    """The same thread count for both sides' elementwise work (the BLAS's is set from the
    environment at start-up)."""
    ml.threads.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)


def machine_info(threads: int) -> Dict[str, object]:
    info: Dict[str, object] = {
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "thread_env": {v: os.environ.get(v) for v in THREAD_ENV_VARS + ("OPENBLAS_THREAD_TIMEOUT",)},
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numpy_blas": blas_info(),
        "minilora": getattr(ml, "__version__", None),
        "minilora_commit": git_commit(),
        "torch": torch.__version__ if torch is not None else None,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "minilora_threads": ml.threads.get_num_threads(),
        "torch_blas": _torch_blas() if torch is not None else None,
        "gpu": gpu_name(),
    }
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        info["memory_gib"] = round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        info["memory_gib"] = None
    if info["gpu"]:
        import cupy
        info["cupy"] = cupy.__version__
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    return info


def _torch_blas() -> str:
    cfg = torch.__config__.show()
    if "MKL" in cfg or "mkl" in cfg:
        return "MKL"
    return "OpenBLAS" if "OpenBLAS" in cfg else "unknown"


def machine_tag(info: Dict[str, object], quick: bool) -> str:
    """A file name from the hardware and the thread count (never the host name):
    cpu-<model>-<logical CPUs>c-<threads>t[-gpu-<name>][-quick]."""
    def slug(s: str) -> str:
        s = re.sub(r"\((r|tm)\)", "", s.lower())
        s = re.sub(r"\b(cpu|processor|with radeon graphics|\d+-core)\b", "", s)
        return re.sub(r"[^a-z0-9]+", "-", s).strip("-")[:40] or "unknown"
    tag = f"cpu-{slug(str(info['cpu_model']))}-{info['logical_cpus']}c-{info['threads']}t"
    if info.get("gpu"):
        tag += f"-gpu-{slug(str(info['gpu']))}"
    return tag + ("-quick" if quick else "")


# ======================================================================================
# Peak float32 matmul rate (the denominator of MFU)
# ======================================================================================


def peak_matmul(device: str, n: int, repeats: int) -> Dict[str, object]:
    """Best-of-``repeats`` rate of one (n, n) @ (n, n) float32 matmul: 2 n^3 flops.

    The result is checked first (against a float64 product on a slice of rows)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    sync = Sync(device)
    a_d, b_d = backend.to_device(a, device), backend.to_device(b, device)
    c = a_d @ b_d
    rows = slice(0, min(n, 64))
    expected = a[rows].astype(np.float64) @ b.astype(np.float64)
    err = rel_err(backend.to_numpy(c[rows]), expected)
    validated = err < 1e-4
    best = float("inf")
    for _ in range(repeats):
        best = min(best, time_once(lambda: a_d @ b_d, sync.minilora))
    return {"device": device, "n": n, "repeats": repeats, "best_s": best,
            "flops_per_s": 2.0 * n ** 3 / best, "validated": bool(validated), "rel_err": err}


# ======================================================================================
# Models, batches, steps
# ======================================================================================


def make_batch(bc: BenchConfig, seed: int = 0):
    """Token ids and targets, both (B, T) int64 on the CPU."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, bc.V, size=(bc.B, bc.T), dtype=np.int64)
    targets = rng.integers(0, bc.V, size=(bc.B, bc.T), dtype=np.int64)
    return idx, targets


def build_minilora(bc: BenchConfig, mode: str, device: str = "cpu", seed: int = 0,
                   block_size: Optional[int] = None) -> "ml.GPT":
    """A float32 GPT, with a rank-8 adapter on q_proj and v_proj for ``mode == "lora"``.

    The adapter's B is set to small random values instead of its initial zeros: with
    B = 0 the gradient of A is exactly zero on both sides, and a check of it would
    prove nothing. Speed does not depend on the values.
    """
    model = ml.GPT(bc.gpt_config(block_size), seed=seed, dtype="float32")
    if mode == "lora":
        ml.add_lora(model, ml.LoraConfig(r=LORA["r"], alpha=LORA["alpha"],
                                         target_modules=list(LORA["target_modules"])), seed=seed)
        rng = np.random.default_rng(seed + 1)
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.data = (rng.standard_normal(p.shape) * 0.02).astype(np.float32)
    elif mode != "full":
        raise ValueError(f"mode must be 'full' or 'lora', got {mode!r}")
    if device != "cpu":
        model.to(device)
    return model


def minilora_adamw(model) -> "ml.AdamW":
    return ml.AdamW([p for p in model.parameters() if p.requires_grad], **ADAMW)


def minilora_train_step(model, opt, idx, targets) -> float:
    """One training step: forward, cross-entropy, backward, AdamW."""
    model.zero_grad()                          # as PyTorch's zero_grad(set_to_none=True)
    # As minilora.train: dlogits is computed over the logits (B, T, V), which nothing
    # needs afterwards, so the step never holds two arrays of that size.
    loss, dlogits = ml.cross_entropy(model.forward(idx), targets, overwrite_logits=True)
    model.backward(dlogits)
    opt.step()
    return loss


def build_torch(model, device: str = "cpu", attention: str = "sdpa"):
    from torch_gpt import TorchGPT
    return TorchGPT.from_minilora(model, attention=attention, device=device)


def torch_adamw(tm):
    return tm.adamw(**ADAMW)


def torch_train_step(tm, opt, idx_t, targets_t) -> None:
    """One training step: forward, cross-entropy, backward, AdamW (PyTorch eager)."""
    opt.zero_grad(set_to_none=True)
    # The logits (B, T, V) get no name, as on minilora's side, so autograd alone decides
    # what stays alive through backward (log_softmax keeps its output, not its input).
    loss = F.cross_entropy(tm(idx_t).flatten(0, 1), targets_t.flatten())
    loss.backward()
    opt.step()


def matmul_params(cfg: "ml.GPTConfig") -> int:
    """N for the 6N rule: every weight that multiplies an activation: the L blocks'
    12 C^2 linear weights and the tied head's V C (embedding lookups and LayerNorms do
    no matmul work; biases are negligible and left out)."""
    C = cfg.n_embd
    return cfg.n_layer * 12 * C * C + cfg.vocab_size * C


def adapter_params(cfg: "ml.GPTConfig") -> int:
    return cfg.n_layer * len(LORA["target_modules"]) * LORA["r"] * (cfg.n_embd + cfg.n_embd)


def training_flops(bc: BenchConfig, mode: str) -> int:
    """Model FLOPs of one training step (see bench/README.md):

        full: 6 N per token                         (forward 2N, backward 4N)
        LoRA: 4 N per token + 6 N_adapter per token (frozen: forward and input gradient only)
        both: + attention 3 x 2 x 2 B L T^2 C       (QK^T and PV; forward, then twice that back)
    """
    cfg = bc.gpt_config()
    tokens = bc.B * bc.T
    attention = 3 * 2 * 2 * bc.B * bc.L * bc.T * bc.T * bc.C
    if mode == "full":
        return 6 * matmul_params(cfg) * tokens + attention
    return 4 * matmul_params(cfg) * tokens + 6 * adapter_params(cfg) * tokens + attention


def inference_flops(bc: BenchConfig) -> int:
    return 2 * matmul_params(bc.gpt_config()) * bc.B * bc.T + 2 * 2 * bc.B * bc.L * bc.T * bc.T * bc.C


# ======================================================================================
# Validation: the reference first, the stopwatch second
# ======================================================================================


def minilora_loss_and_grads(model, idx, targets) -> Tuple[float, Dict[str, np.ndarray]]:
    model.zero_grad()
    loss, dlogits = ml.cross_entropy(model.forward(idx), targets)
    model.backward(dlogits)
    grads = {n: backend.to_numpy(p.grad).copy() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


def compare_grads(ours: Dict[str, np.ndarray], theirs: Dict[str, Optional[np.ndarray]],
                  trainable: Sequence[str], tol: float) -> Tuple[float, Optional[str], List[str]]:
    """Worst per-parameter relative error, its parameter, and problems (a trainable
    parameter without a gradient on either side, or a frozen one with one)."""
    problems = []
    scale = max((float(np.abs(g).max(initial=0.0)) for g in ours.values()), default=0.0)
    worst, worst_name = 0.0, None
    for name in sorted(set(ours) | {n for n, g in theirs.items() if g is not None}):
        a, b = ours.get(name), theirs.get(name)
        if name not in trainable:
            problems.append(f"frozen parameter {name} received a gradient")
            continue
        if a is None or b is None:
            problems.append(f"{name}: gradient missing on the {'minilora' if a is None else 'reference'} side")
            continue
        err = rel_err(a, b, floor=GRAD_FLOOR * scale)
        if err > worst or worst_name is None:
            worst, worst_name = err, name
    for name in trainable:
        if name not in ours:
            problems.append(f"trainable parameter {name} received no gradient")
    if worst > tol:
        problems.append(f"gradient of {worst_name}: relative error {worst:.3g} > {tol:g}")
    return worst, worst_name, problems


def validate_training(model, opt, tm, topt, idx, targets, device: str = "cpu") -> Dict[str, object]:
    """Same weights and batch: same loss (rel 1e-4) and every gradient (rel 1e-3), on
    minilora and on the PyTorch model; then AdamW from identical gradients gives the same
    parameters (rel 1e-5) after two steps on each side. The models' weights move (by
    the two optimizer steps) but stay equal to each other.
    """
    idx_d, tg_d = backend.to_device(idx, device), backend.to_device(targets, device)
    names = [n for n, _ in model.named_parameters()]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    loss, grads = minilora_loss_and_grads(model, idx_d, tg_d)

    tm.zero_grad(set_to_none=True)
    idx_t = torch.as_tensor(idx, device=device)
    logits_t = tm(idx_t)
    loss_t = F.cross_entropy(logits_t.view(-1, logits_t.shape[-1]), torch.as_tensor(targets, device=device).view(-1))
    loss_t.backward()
    theirs = tm.grads_in_minilora_layout(names)
    loss_ref = float(loss_t.item())

    problems = []
    loss_err = abs(loss - loss_ref) / max(abs(loss_ref), 1e-30)
    if not loss_err <= TOL_LOSS:
        problems.append(f"loss {loss:.7g} vs reference {loss_ref:.7g}: relative error {loss_err:.3g} > {TOL_LOSS:g}")
    grad_err, worst, grad_problems = compare_grads(grads, theirs, trainable, TOL_GRAD)
    problems += grad_problems

    # The optimizer, fed identical gradients (minilora's), two steps on each side.
    tm.set_grads_from_minilora({n: grads[n] for n in trainable if n in grads})
    for _ in range(2):
        opt.step()
        topt.step()
    ours_p = {n: backend.to_numpy(p.data) for n, p in model.named_parameters()}
    theirs_p = tm.params_in_minilora_layout()
    optim_err, optim_worst = 0.0, None
    for n in trainable:
        if n in theirs_p:
            e = rel_err(ours_p[n], theirs_p[n])
            if e > optim_err or optim_worst is None:
                optim_err, optim_worst = e, n
    if not optim_err <= TOL_OPTIM:
        problems.append(f"AdamW: parameter {optim_worst} differs after two steps: relative error "
                        f"{optim_err:.3g} > {TOL_OPTIM:g}")
    model.zero_grad()
    tm.zero_grad(set_to_none=True)
    return {"validated": not problems, "against": "PyTorch eager (bench/torch_gpt.py), same weights and batch",
            "loss": loss, "loss_reference": loss_ref, "loss_rel_err": loss_err,
            "grad_max_rel_err": grad_err, "grad_worst": worst, "optimizer_rel_err": optim_err,
            "tolerances": {"loss": TOL_LOSS, "grad": TOL_GRAD, "optimizer": TOL_OPTIM},
            "problems": problems}


def float64_copy(model):
    """The same model with every parameter in float64 (a deep copy, on the CPU)."""
    # CuPy's generators hold a lock and cannot be deep-copied: the copy gets None in
    # their place, and .to("cpu") below gives its dropout layers CPU generators again.
    not_copied = {id(gen): None for _, gen in model_generators(model) if not isinstance(gen, np.random.Generator)}
    m64 = copy.deepcopy(model, not_copied)
    if m64.device != "cpu":
        m64.to("cpu")
    for p in m64.parameters():
        p.data = backend.to_numpy(p.data).astype(np.float64)
        p.grad = None
    return m64


def validate_training_without_torch(model, idx, targets, device: str = "cpu") -> Dict[str, object]:
    """The fallback when PyTorch is absent: (1) the float32 loss and gradients equal
    those of the same weights in float64 (rel 1e-4 / 1e-3), and (2) the float64
    gradient passes a central-difference check along one random direction d of all
    trainable parameters: (L(w + e d) - L(w - e d)) / 2e = <grad, d> (rel 1e-5)."""
    idx_d, tg_d = backend.to_device(idx, device), backend.to_device(targets, device)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    loss, grads = minilora_loss_and_grads(model, idx_d, tg_d)
    model.zero_grad()
    m64 = float64_copy(model)
    loss64, grads64 = minilora_loss_and_grads(m64, idx, targets)
    problems = []
    loss_err = abs(loss - loss64) / max(abs(loss64), 1e-30)
    if not loss_err <= TOL_LOSS:
        problems.append(f"float32 loss {loss:.7g} vs float64 {loss64:.7g}: relative error {loss_err:.3g}")
    grad_err, worst, grad_problems = compare_grads(grads, grads64, trainable, TOL_GRAD)
    problems += grad_problems

    rng = np.random.default_rng(123)
    params = dict(m64.named_parameters())
    directions = {n: rng.standard_normal(params[n].shape) for n in trainable}
    analytic = sum(float((grads64[n] * directions[n]).sum()) for n in trainable if n in grads64)
    eps = 1e-5
    m64.zero_grad()

    def loss_at(sign: float) -> float:
        saved = {n: params[n].data for n in trainable}
        for n in trainable:
            params[n].data = saved[n] + sign * eps * directions[n]
        with ml.no_grad():
            value, _ = ml.cross_entropy(m64.forward(idx), targets)
        for n in trainable:
            params[n].data = saved[n]
        return float(value)

    numeric = (loss_at(+1.0) - loss_at(-1.0)) / (2 * eps)
    dir_err = abs(numeric - analytic) / max(abs(numeric), abs(analytic), 1e-30)
    if not dir_err <= TOL_DIRECTIONAL:
        problems.append(f"float64 directional derivative: analytic {analytic:.10g}, central difference "
                        f"{numeric:.10g}, relative error {dir_err:.3g}")
    return {"validated": not problems,
            "against": "PyTorch not available: float64 copy of the same model + central difference",
            "loss": loss, "loss_reference": loss64, "loss_rel_err": loss_err,
            "grad_max_rel_err": grad_err, "grad_worst": worst, "directional_rel_err": dir_err,
            "tolerances": {"loss": TOL_LOSS, "grad": TOL_GRAD, "directional": TOL_DIRECTIONAL},
            "problems": problems}


def compare_logits(ours, theirs, what: str) -> Tuple[float, List[str]]:
    err = rel_err(ours, theirs)
    return err, ([] if err <= TOL_LOGITS else [f"{what}: logits relative error {err:.3g} > {TOL_LOGITS:g}"])


# ======================================================================================
# 1 + 2. Training throughput and MFU
# ======================================================================================


def torch_skip_reason(args) -> Optional[str]:
    if getattr(args, "no_torch", False):
        return "PyTorch side disabled (--no-torch)"
    if torch is None:
        return f"PyTorch is not installed ({TORCH_IMPORT_ERROR}); PyTorch side skipped"
    return None


def bench_training(bc: BenchConfig, mode: str, args, device: str = "cpu",
                   peak_flops: Optional[float] = None, tamper: Optional[Callable] = None) -> Dict[str, object]:
    """Validate, then time interleaved training steps of minilora and PyTorch.

    ``tamper`` (for tests) is applied to the PyTorch model before validation: a wrong
    reference must make the benchmark refuse to report the number.
    """
    log(f"[train] {device} {bc.name} {mode}: validating ...")
    record: Dict[str, object] = {"kind": "training", "device": device, "config": asdict(bc), "mode": mode,
                                 "tokens_per_step": bc.B * bc.T, "loadavg_before": loadavg()}
    model = build_minilora(bc, mode, device)
    opt = minilora_adamw(model)
    idx, targets = make_batch(bc)
    idx_d, tg_d = backend.to_device(idx, device), backend.to_device(targets, device)
    record["params_total"] = model.num_parameters()
    record["params_trainable"] = model.num_parameters(trainable_only=True)
    record["model_flops_per_step"] = training_flops(bc, mode)
    skip = torch_skip_reason(args)
    tm = topt = None
    if skip is None:
        tm = build_torch(model, device, args.torch_attention)
        if tamper is not None:
            tamper(tm)
        topt = torch_adamw(tm)
        validation = validate_training(model, opt, tm, topt, idx, targets, device)
    else:
        record["pytorch_skipped"] = skip
        log(f"        {skip}")
        validation = validate_training_without_torch(model, idx, targets, device)
    record["validation"] = validation
    record["validated"] = bool(validation["validated"])
    if not record["validated"]:
        record["refused"] = "validation failed: " + "; ".join(validation["problems"])
        log(f"  REFUSED {bc.name} {mode}: {record['refused']}")
        return record

    sync = Sync(device)
    ml_fn = (lambda: minilora_train_step(model, opt, idx_d, tg_d))
    contenders = [("minilora", ml_fn, sync.minilora)]
    if tm is not None:
        idx_t, tg_t = torch.as_tensor(idx, device=device), torch.as_tensor(targets, device=device)
        contenders.append(("pytorch", lambda: torch_train_step(tm, topt, idx_t, tg_t), sync.torch))
    one = min(time_once(fn, s) for _, fn, s in contenders)   # also the first warm-up step
    steps = steps_for(one, args.min_block_s)
    log(f"        timing: {args.rounds} rounds x {steps} steps per side (one step ~{one * 1e3:.0f} ms)")
    before = cpu_times()
    times = interleaved_timing(contenders, rounds=args.rounds, steps=steps, warmup=args.warmup)
    record["steal_fraction"] = steal_fraction(before, cpu_times())
    for name, per_step in times.items():
        step_s = median(per_step)
        side = {"step_s_median": step_s, "step_s_rounds": per_step, "tokens_per_s": bc.B * bc.T / step_s,
                "steps_per_round": steps, "rounds_spread": spread(per_step)}
        if peak_flops:
            side["mfu"] = record["model_flops_per_step"] / step_s / peak_flops
        record[name] = side
    if "pytorch" in record:
        record["ratio_tokens_per_s"] = record["minilora"]["tokens_per_s"] / record["pytorch"]["tokens_per_s"]
    # Gradient and optimizer-state bytes right after a step (grads of the last step are alive).
    ml_fn()
    record["grad_bytes"] = sum(int(p.grad.nbytes) for p in model.parameters() if p.grad is not None)
    record["optimizer_state_bytes"] = int(opt.state_bytes())
    record["loadavg_after"] = loadavg()
    msg = f"        minilora {record['minilora']['tokens_per_s']:,.0f} tok/s"
    if "pytorch" in record:
        msg += f", PyTorch {record['pytorch']['tokens_per_s']:,.0f} tok/s, ratio {record['ratio_tokens_per_s']:.2f}"
    log(msg)
    return record


# ======================================================================================
# 3. LoRA vs full: checkpoint and adapter file sizes
# ======================================================================================


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def file_sizes(bc: BenchConfig) -> Dict[str, object]:
    """Bytes on disk: ml.save_model of the (fully fine-tuned) model vs ml.save_adapter
    of the rank-8 adapter."""
    with tempfile.TemporaryDirectory() as tmp:
        full = build_minilora(bc, "full")
        ml.save_model(full, os.path.join(tmp, "model"))
        lora = build_minilora(bc, "lora")
        ml.save_adapter(lora, os.path.join(tmp, "adapter"))
        ckpt, adapter = dir_bytes(os.path.join(tmp, "model")), dir_bytes(os.path.join(tmp, "adapter"))
    return {"checkpoint_bytes": ckpt, "adapter_bytes": adapter, "ratio": adapter / ckpt}


def paired_training_steps(bc: BenchConfig, args, device: str = "cpu") -> Dict[str, object]:
    """minilora's full and LoRA training steps of one config in paired trials (see
    :func:`paired_timing`): the step function and models the training rows validated,
    built again the same way. Returns the trials and each mode's median step time."""
    idx, targets = make_batch(bc)
    idx_d, tg_d = backend.to_device(idx, device), backend.to_device(targets, device)
    sync = Sync(device).minilora
    contenders = []
    for mode in ("full", "lora"):
        model = build_minilora(bc, mode, device)
        opt = minilora_adamw(model)
        contenders.append((mode, (lambda m=model, o=opt: minilora_train_step(m, o, idx_d, tg_d)), sync))
    trials, times = sized_paired_timing(contenders, budget_s=1.0 if args.quick else 20.0,
                                        least=5 if args.quick else 9)
    log(f"[lora-vs-full] {device} {bc.name}: {trials} paired trials of one full and one LoRA step")
    return {"trials": trials, "step_s_full": median(times["full"]), "step_s_lora": median(times["lora"]),
            "step_time_ratio": paired_ratio(times, "lora", "full"),
            "step_s_full_trials": times["full"], "step_s_lora_trials": times["lora"]}


def lora_vs_full(training: List[Dict[str, object]], memory: List[Dict[str, object]],
                 device: str = "cpu", args=None) -> Optional[Dict[str, object]]:
    """Medium (or the largest config measured) full vs LoRA: counts and bytes from the
    training records; the step time ratio from paired trials when ``args`` is given
    (the ratio of the two records' medians, steps timed minutes apart, is kept as
    ``step_time_ratio_blocks``)."""
    recs = [r for r in training if r["device"] == device]
    names = [r["config"]["name"] for r in recs]
    if not names:
        return None
    name = "medium" if "medium" in names else max(recs, key=lambda r: r["model_flops_per_step"])["config"]["name"]
    full = next((r for r in recs if r["config"]["name"] == name and r["mode"] == "full"), None)
    lora = next((r for r in recs if r["config"]["name"] == name and r["mode"] == "lora"), None)
    if full is None or lora is None:
        return None
    bc = BenchConfig(**full["config"])
    out: Dict[str, object] = {"config": name, "device": device,
                              "validated": bool(full["validated"] and lora["validated"])}
    if out["validated"]:
        out["step_s_full"] = full["minilora"]["step_s_median"]
        out["step_s_lora"] = lora["minilora"]["step_s_median"]
        out["step_time_ratio"] = out["step_time_ratio_blocks"] = out["step_s_lora"] / out["step_s_full"]
        if args is not None:
            paired = paired_training_steps(bc, args, device)
            out["paired"] = paired
            out.update({k: paired[k] for k in ("step_s_full", "step_s_lora", "step_time_ratio")})
        out["trainable_full"] = full["params_trainable"]
        out["trainable_lora"] = lora["params_trainable"]
        out["grad_opt_bytes_full"] = full["grad_bytes"] + full["optimizer_state_bytes"]
        out["grad_opt_bytes_lora"] = lora["grad_bytes"] + lora["optimizer_state_bytes"]
        out["grad_opt_bytes_ratio"] = out["grad_opt_bytes_lora"] / out["grad_opt_bytes_full"]
        if "pytorch" in full and "pytorch" in lora:
            out["pytorch_step_time_ratio"] = lora["pytorch"]["step_s_median"] / full["pytorch"]["step_s_median"]
    else:
        out["refused"] = "validation of the full or LoRA training step failed"
    if device == "cpu":
        out["files"] = file_sizes(bc)
        for m in memory:
            if m["config"] == name and m.get("validated"):
                out[f"peak_memory_{m['mode']}"] = {k: m[k] for k in ("minilora", "pytorch", "ratio") if k in m}
    return out


# ======================================================================================
# Peak memory: one fresh process per measurement
# ======================================================================================


def _proc_status(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_probe(spec: Dict[str, object]) -> Dict[str, object]:
    """Runs in a fresh process (``run.py --memory-probe JSON``): build one side's model,
    optimizer and batch; run one forward and backward (no optimizer step) and drop the
    gradients; read the resident set (VmRSS) as the baseline; reset the
    high-water mark (Linux: write 5 to /proc/self/clear_refs); run ``steps`` training
    steps; read the high-water mark (VmHWM). Training memory = high-water - baseline:
    activations, gradients, optimizer state and temporaries, on top of the weights.

    For minilora, tracemalloc then measures the peak of the arrays one more step
    allocates (NumPy reports its allocations to tracemalloc): a second, exact view.
    """
    bc = BenchConfig(**spec["config"])
    mode, side, steps = spec["mode"], spec["side"], int(spec["steps"])
    idx, targets = make_batch(bc)
    model = build_minilora(bc, mode)
    if side == "minilora":
        opt = minilora_adamw(model)
        step = lambda: minilora_train_step(model, opt, idx, targets)  # noqa: E731

        def warm():
            minilora_loss_and_grads(model, idx, targets)
            model.zero_grad()
    else:
        tm = build_torch(model, "cpu", spec.get("attention", "sdpa"))
        del model
        gc.collect()
        topt = torch_adamw(tm)
        idx_t, tg_t = torch.as_tensor(idx), torch.as_tensor(targets)
        step = lambda: torch_train_step(tm, topt, idx_t, tg_t)  # noqa: E731

        def warm():
            logits = tm(idx_t)
            F.cross_entropy(logits.view(-1, logits.shape[-1]), tg_t.view(-1)).backward()
            tm.zero_grad(set_to_none=True)
    # One forward and backward (no optimizer step) first: thread pools and lazy
    # initialisation (PyTorch's autograd engine) are not training memory. The optimizer
    # state is created by the first measured step, so it is counted.
    warm()
    gc.collect()
    baseline = _proc_status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    for _ in range(steps):
        step()
    hwm = _proc_status("VmHWM")
    out = {"side": side, "baseline_rss": baseline, "peak_rss": hwm, "hwm_reset": reset,
           "training_bytes": (hwm - baseline) if (hwm is not None and baseline is not None) else None}
    if side == "minilora":
        import tracemalloc
        gc.collect()
        tracemalloc.start()
        start, _ = tracemalloc.get_traced_memory()
        step()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out["tracemalloc_step_peak_bytes"] = peak - start
    return out


def run_memory_probe(bc: BenchConfig, mode: str, side: str, args) -> Dict[str, object]:
    spec = {"config": asdict(bc), "mode": mode, "side": side, "steps": args.memory_steps,
            "attention": args.torch_attention}
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads),
           "--memory-probe", json.dumps(spec)]
    env = dict(os.environ)
    env.pop(NO_TORCH_ENV, None)
    # glibc: serve every allocation above 64 KiB by mmap and give it back on free, with a
    # fixed threshold (by default it rises after the first large free, and freed arrays
    # then linger in the heap), so the resident set follows the memory actually in use.
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    if side == "minilora":
        env[NO_TORCH_ENV] = "1"   # the minilora process never loads PyTorch
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed ({side} {bc.name} {mode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_memory(bc: BenchConfig, mode: str, args, validated: bool) -> Dict[str, object]:
    """Peak training memory of minilora and PyTorch, each in its own fresh process.
    Reported only where this run validated the same training step (``validated``)."""
    log(f"[memory] cpu {bc.name} {mode}: one fresh process per side ...")
    rec: Dict[str, object] = {"kind": "memory", "device": "cpu", "config": bc.name, "mode": mode,
                              "method": f"VmHWM - VmRSS baseline in a fresh process, over {args.memory_steps} "
                                        "training steps (MALLOC_MMAP_THRESHOLD_=65536)",
                              "validated": validated}
    if not validated:
        rec["refused"] = "the training step of this config and mode failed validation"
        return rec
    if not sys.platform.startswith("linux"):
        rec["skipped"] = "needs Linux's /proc/self/status"
        return rec
    rec["minilora"] = run_memory_probe(bc, mode, "minilora", args)
    skip = torch_skip_reason(args)
    if skip is None:
        rec["pytorch"] = run_memory_probe(bc, mode, "pytorch", args)
        a, b = rec["minilora"]["training_bytes"], rec["pytorch"]["training_bytes"]
        if a is not None and b:
            rec["ratio"] = a / b
        pa, pb = rec["minilora"]["peak_rss"], rec["pytorch"]["peak_rss"]
        if pa and pb:
            rec["peak_rss_ratio"] = pa / pb
        log(f"         training memory minilora {a / 2**20:.1f} MiB, PyTorch {b / 2**20:.1f} MiB")
    else:
        rec["pytorch_skipped"] = skip
    return rec


def _minor_faults() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def allocator_probe(spec: Dict[str, object]) -> Dict[str, object]:
    """Runs in a fresh process (``run.py --allocator-probe JSON``), PyTorch not loaded:
    with ``keep`` it first calls ml.keep_freed_memory(), else glibc's malloc keeps its
    defaults. Then minilora's forward-only pass (no_grad, eval) and full training step
    of one config, each warmed up and timed call by call for about ``seconds``:
    median time per call and page faults per call (getrusage's minor faults)."""
    bc = BenchConfig(**spec["config"])
    message = ml.keep_freed_memory() if spec["keep"] else "glibc defaults"
    idx, targets = make_batch(bc)
    model = build_minilora(bc, "full")
    opt = minilora_adamw(model)

    def forward():
        with ml.no_grad():
            model.forward(idx)
    out: Dict[str, object] = {"malloc": message}
    # The forward first: run after a training step, it would find the heap that step grew.
    for name, fn in (("forward", forward), ("step", lambda: minilora_train_step(model, opt, idx, targets))):
        model.train(name == "step")
        fn()
        fn()
        times, faults, spent = [], _minor_faults(), 0.0
        while len(times) < 3 or (spent < float(spec["seconds"]) and len(times) < 200):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            spent += times[-1]
        out[name] = {"median_s": median(times), "calls": len(times),
                     "faults_per_call": (_minor_faults() - faults) / len(times)}
    out["peak_rss"] = _proc_status("VmHWM")
    return out


def bench_allocator(bc: BenchConfig, args) -> Dict[str, object]:
    """The same minilora step and forward pass under glibc's malloc defaults and after
    ml.keep_freed_memory(), each in a fresh process (the setting is process-wide and
    cannot be undone); see minilora/allocator.py."""
    log(f"[malloc] cpu {bc.name}: glibc defaults vs keep_freed_memory(), a fresh process each ...")
    rec: Dict[str, object] = {"kind": "allocator", "config": bc.name}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env[NO_TORCH_ENV] = "1"
    for keep in (False, True):
        spec = {"config": asdict(bc), "keep": keep, "seconds": 1.0 if args.quick else 3.0}
        cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads),
               "--allocator-probe", json.dumps(spec)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"allocator probe failed ({bc.name}, keep={keep}): {proc.stderr.strip()[-2000:]}")
        rec["kept" if keep else "defaults"] = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("forward", "step"):
        a, b = rec["defaults"][name], rec["kept"][name]
        rec[f"{name}_speedup"] = a["median_s"] / b["median_s"]
        log(f"         {name}: {a['median_s'] * 1e3:,.1f} ms ({a['faults_per_call']:,.0f} faults) -> "
            f"{b['median_s'] * 1e3:,.1f} ms ({b['faults_per_call']:,.0f} faults)")
    return rec


# ======================================================================================
# 4. Inference and generation
# ======================================================================================


def bench_inference(bc: BenchConfig, args, device: str = "cpu",
                    tamper: Optional[Callable] = None) -> Dict[str, object]:
    """Forward-only tokens/s under ml.no_grad() (eval mode): the base model, the
    LoRA model (adapter unmerged) and the same after ml.merge_lora; PyTorch base and
    LoRA under torch.inference_mode(). Each logits output is checked first."""
    log(f"[infer] {device} {bc.name}: validating ...")
    rec: Dict[str, object] = {"kind": "inference", "device": device, "config": asdict(bc),
                              "tokens_per_forward": bc.B * bc.T, "model_flops_per_forward": inference_flops(bc),
                              "loadavg_before": loadavg()}
    idx, _ = make_batch(bc)
    idx_d = backend.to_device(idx, device)
    base = build_minilora(bc, "full", device).eval()
    lora = build_minilora(bc, "lora", device).eval()
    merged = build_minilora(bc, "lora", device).eval()
    skip = torch_skip_reason(args)

    def fwd(m):
        with ml.no_grad():
            return m.forward(idx_d)

    variants: Dict[str, Dict[str, object]] = {}
    out_base, out_lora = backend.to_numpy(fwd(base)), backend.to_numpy(fwd(lora))
    t_base = t_lora = None
    if skip is None:
        t_base, t_lora = build_torch(base, device, args.torch_attention).eval(), build_torch(lora, device, args.torch_attention).eval()
        if tamper is not None:
            tamper(t_base)
            tamper(t_lora)
        idx_t = torch.as_tensor(idx, device=device)

        def tfwd(tm):
            with torch.inference_mode():
                return tm(idx_t)
        ref_base, ref_lora = tfwd(t_base).cpu().numpy(), tfwd(t_lora).cpu().numpy()
        against = "PyTorch eager, same weights"
    else:
        rec["pytorch_skipped"] = skip
        with ml.no_grad():
            ref_base = float64_copy(base).forward(idx)
            ref_lora = float64_copy(lora).forward(idx)
        against = "PyTorch not available: float64 copy of the same model"
    ml.merge_lora(merged)
    out_merged = backend.to_numpy(fwd(merged))
    for name, ours, ref in (("base", out_base, ref_base), ("lora_unmerged", out_lora, ref_lora),
                            ("lora_merged", out_merged, ref_lora)):
        err, problems = compare_logits(ours, ref, name)
        variants[name] = {"validated": not problems, "logits_rel_err": err, "against": against, "problems": problems}
    if skip is None:
        variants["pytorch_base"] = {"validated": variants["base"]["validated"]}
        variants["pytorch_lora"] = {"validated": variants["lora_unmerged"]["validated"]}

    sync = Sync(device)
    contenders = []
    models = {"base": base, "lora_unmerged": lora, "lora_merged": merged}
    for name, m in models.items():
        if variants[name]["validated"]:
            contenders.append((name, (lambda m=m: fwd(m)), sync.minilora))
    if skip is None:
        for name, tm in (("pytorch_base", t_base), ("pytorch_lora", t_lora)):
            if variants[name]["validated"]:
                contenders.append((name, (lambda tm=tm: tfwd(tm)), sync.torch))
    for name, v in variants.items():
        if not v["validated"]:
            v["refused"] = "validation failed: " + "; ".join(v.get("problems", [])) if v.get("problems") else \
                "validation of the matching minilora output failed"
            log(f"  REFUSED inference {bc.name} {name}: {v['refused']}")
    if contenders:
        one = min(time_once(fn, s) for _, fn, s in contenders)
        steps = steps_for(one, args.min_block_s / 2)
        before = cpu_times()
        times = interleaved_timing(contenders, rounds=args.rounds, steps=steps, warmup=args.warmup)
        rec["steal_fraction"] = steal_fraction(before, cpu_times())
        for name, per in times.items():
            s = median(per)
            variants[name].update({"forward_s_median": s, "forward_s_rounds": per, "steps_per_round": steps,
                                   "tokens_per_s": bc.B * bc.T / s, "rounds_spread": spread(per)})
    rec["variants"] = variants
    rec["validated"] = all(v["validated"] for v in variants.values())
    v = variants

    def ratio(a, b, key="tokens_per_s"):
        return v[a][key] / v[b][key] if key in v.get(a, {}) and key in v.get(b, {}) else None
    rec["ratio_base"] = ratio("base", "pytorch_base")
    rec["ratio_lora"] = ratio("lora_unmerged", "pytorch_lora")
    # merged vs base: the same products, so the true ratio is 1 and what a ratio of two
    # medians of separate blocks measures is mostly the machine's drift between them.
    # Paired trials (one call of each, back to back, see paired_timing) measure it.
    rec["merged_time_over_base_blocks"] = ratio("lora_merged", "base", "forward_s_median")
    rec["unmerged_time_over_base_blocks"] = ratio("lora_unmerged", "base", "forward_s_median")
    rec["merged_time_over_base"] = rec["unmerged_time_over_base"] = None
    mine = [(name, fn, s) for name, fn, s in contenders if name in models]
    if len(mine) == len(models):
        trials, paired = sized_paired_timing(mine, budget_s=1.0 if args.quick else 4.0,
                                             least=5 if args.quick else 11)
        rec["paired_trials"] = trials
        rec["merged_time_over_base"] = paired_ratio(paired, "lora_merged", "base")
        rec["unmerged_time_over_base"] = paired_ratio(paired, "lora_unmerged", "base")
    rec["loadavg_after"] = loadavg()
    if "tokens_per_s" in v["base"]:
        msg = f"        minilora base {v['base']['tokens_per_s']:,.0f} tok/s"
        if rec["ratio_base"]:
            msg += f", PyTorch {v['pytorch_base']['tokens_per_s']:,.0f} tok/s, ratio {rec['ratio_base']:.2f}"
        if rec["merged_time_over_base"]:
            msg += f"; merged/base time {rec['merged_time_over_base']:.3f} ({rec['paired_trials']} paired trials)"
        log(msg)
    return rec


def bench_generation(args, device: str = "cpu") -> Dict[str, object]:
    """Greedy generation of ``--gen-new-tokens`` tokens after a 64-token prompt, with
    and without the KV cache; both must produce the same tokens before either is timed."""
    base = CONFIGS[args.gen_model] if args.gen_model in CONFIGS else parse_config(args.gen_model)
    block = max(GEN_BLOCK_SIZE, GEN_PROMPT + args.gen_new_tokens)
    new = args.gen_new_tokens
    log(f"[generate] {device} {base.name} block {block}, prompt {GEN_PROMPT}, {new} new tokens: validating ...")
    rec: Dict[str, object] = {"kind": "generation", "device": device, "config": asdict(base), "block_size": block,
                              "prompt_tokens": GEN_PROMPT, "new_tokens": new, "batch": 1,
                              "loadavg_before": loadavg()}
    model = build_minilora(base, "full", device, block_size=block).eval()
    prompt = np.random.default_rng(7).integers(0, base.V, size=(1, GEN_PROMPT), dtype=np.int64)
    runs = {"cache": lambda: model.generate(prompt, new, temperature=0.0, use_cache=True),
            "no_cache": lambda: model.generate(prompt, new, temperature=0.0, use_cache=False)}
    sync = Sync(device)
    t0 = time.perf_counter()
    with_cache = runs["cache"]()
    t_cache = time.perf_counter() - t0
    t0 = time.perf_counter()
    without = runs["no_cache"]()
    t_nocache = time.perf_counter() - t0
    same = bool(np.array_equal(with_cache, without))
    rec["validated"] = same
    rec["validation"] = {"against": "generation without the KV cache (a full forward per token)",
                         "identical_tokens": same,
                         "first_difference": None if same else int(np.argmax((with_cache != without)[0]))}
    if not same:
        rec["refused"] = f"cached and uncached greedy generation differ (first at position {rec['validation']['first_difference']})"
        log(f"  REFUSED generation: {rec['refused']}")
        return rec
    # The validation runs are the first timed round; --gen-rounds adds more.
    times = {"cache": [t_cache], "no_cache": [t_nocache]}
    if args.gen_rounds > 0:
        more = interleaved_timing([(k, fn, sync.minilora) for k, fn in runs.items()],
                                  rounds=args.gen_rounds, steps=1, warmup=0)
        for k in times:
            times[k] += more[k]
    for k, per in times.items():
        s = median(per)
        rec[k] = {"seconds_median": s, "seconds_rounds": per, "tokens_per_s": new / s}
    rec["speedup"] = rec["cache"]["tokens_per_s"] / rec["no_cache"]["tokens_per_s"]
    rec["loadavg_after"] = loadavg()
    log(f"        cache {rec['cache']['tokens_per_s']:,.1f} tok/s, no cache {rec['no_cache']['tokens_per_s']:,.1f} "
        f"tok/s: speed-up {rec['speedup']:.1f}x")
    return rec


# ======================================================================================
# Profile: where a minilora training step spends its time
# ======================================================================================


def profile_step(bc: BenchConfig, mode: str = "full", top: int = 15) -> Dict[str, object]:
    import cProfile
    import pstats
    model = build_minilora(bc, mode)
    opt = minilora_adamw(model)
    idx, targets = make_batch(bc)
    minilora_train_step(model, opt, idx, targets)     # warm-up
    prof = cProfile.Profile()
    prof.enable()
    minilora_train_step(model, opt, idx, targets)
    prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt
    rows = []
    for (filename, line, func), (cc, nc, tt, ct, _) in stats.stats.items():
        short = os.path.relpath(filename, REPO_ROOT) if filename.startswith(REPO_ROOT) else filename
        rows.append({"function": f"{short}:{line}({func})", "ncalls": nc, "tottime_s": tt, "cumtime_s": ct})
    rows.sort(key=lambda r: -r["tottime_s"])
    return {"config": bc.name, "mode": mode, "total_s": total, "top_by_tottime": rows[:top],
            "note": "cProfile of one training step (after a warm-up step); NumPy calls show up as "
                    "the Python-level line that issued them"}


# Modules that call minilora's linear op (each imported its two functions by name).
LINEAR_OP_CALLERS = ("minilora.nn", "minilora.gpt", "minilora.lora")


@contextlib.contextmanager
def timed_linear_op(totals: Dict[str, float]):
    """Inside the block, every call of minilora's linear op, forward or backward, adds
    its seconds and its matrix products' FLOPs to ``totals`` ("seconds", "flops").

    The op itself runs unchanged: the wrappers call minilora.ops.linear and return what
    it returns. Its bias add and bias gradient are timed with its products (they cost
    ~2% beside them), so the rate this gives is, if anything, low. The output head's
    weight gradient (one product written in gpt.py) is not a linear op and is not seen.
    """
    from minilora.ops import linear as linear_op

    def forward(x, W, b=None, keep_input=True):
        t0 = time.perf_counter()
        out = linear_op.linear_forward(x, W, b, keep_input)
        totals["seconds"] += time.perf_counter() - t0
        totals["flops"] += 2 * (x.size // W.shape[0]) * W.size           # (N, I) @ (I, O)
        return out

    def backward(dy, cache, need_dW=True, need_db=True):
        t0 = time.perf_counter()
        out = linear_op.linear_backward(dy, cache, need_dW, need_db)
        totals["seconds"] += time.perf_counter() - t0
        products = 2 if need_dW else 1                                   # dx, and dW
        totals["flops"] += products * 2 * (dy.size // cache.W.shape[1]) * cache.W.size
        return out

    callers = [importlib.import_module(name) for name in LINEAR_OP_CALLERS]
    saved = [(m, m.linear_forward, m.linear_backward) for m in callers]
    try:
        for m in callers:
            m.linear_forward, m.linear_backward = forward, backward
        yield totals
    finally:
        for m, f, b in saved:
            m.linear_forward, m.linear_backward = f, b


def linear_op_flops(bc: BenchConfig) -> int:
    """FLOPs of the linear op's products in one full training step: the 6N per token of
    :func:`training_flops` (forward, dx and dW of every weight in :func:`matmul_params`)
    less the tied head's dW, 2 V C per token, which gpt.py computes outside the op."""
    tokens = bc.B * bc.T
    return 6 * matmul_params(bc.gpt_config()) * tokens - 2 * bc.V * bc.C * tokens


def products_in_step(bc: BenchConfig, args) -> Dict[str, object]:
    """The rate of the linear layers' matrix products *inside* the full training step,
    minilora against PyTorch, in alternating rounds (``args.rounds``).

    minilora's side: every call of its linear op is timed (:func:`timed_linear_op`);
    the FLOPs it counts must equal :func:`linear_op_flops`, or the number is refused
    (a product the wrappers did not see would inflate the rate). PyTorch's side:
    ``aten::mm`` and ``aten::addmm`` with their FLOPs, as ``torch.profiler`` records
    them; the profiler slows the rest of PyTorch's step, so only the products' rates
    compare, not the steps. The two models are validated against each other first, as
    for the training rows.
    """
    log(f"[products] {bc.name} full: validating ...")
    record: Dict[str, object] = {"config": bc.name, "mode": "full", "rounds": []}
    model = build_minilora(bc, "full")
    opt = minilora_adamw(model)
    idx, targets = make_batch(bc)
    skip = torch_skip_reason(args)
    tm = topt = None
    if skip is None:
        tm = build_torch(model, "cpu", args.torch_attention)
        topt = torch_adamw(tm)
        validation = validate_training(model, opt, tm, topt, idx, targets)
    else:
        record["pytorch_skipped"] = skip
        validation = validate_training_without_torch(model, idx, targets)
    problems = list(validation["problems"])
    step = (lambda: minilora_train_step(model, opt, idx, targets))
    counted = {"seconds": 0.0, "flops": 0}
    with timed_linear_op(counted):
        one = time_once(step, Sync("cpu").minilora)             # also a warm-up step
    if counted["flops"] != linear_op_flops(bc):
        problems.append(f"the wrappers counted {counted['flops']:,} FLOPs of linear products in a step, "
                        f"expected {linear_op_flops(bc):,}")
    record["validated"] = not problems
    if problems:
        record["refused"] = "; ".join(problems)
        log(f"  REFUSED products in step {bc.name}: {record['refused']}")
        return record
    steps = steps_for(one, args.min_block_s)
    if tm is not None:
        idx_t, tg_t = torch.as_tensor(idx), torch.as_tensor(targets)
        torch_train_step(tm, topt, idx_t, tg_t)                 # warm-up
    sides = ["minilora", "pytorch"] if tm is not None else ["minilora"]
    for r in range(args.rounds):
        row: Dict[str, object] = {}
        for side in (sides if r % 2 == 0 else sides[::-1]):
            gc.collect()
            if side == "minilora":
                totals = {"seconds": 0.0, "flops": 0}
                with timed_linear_op(totals):
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        step()
                    row["minilora_step_s"] = (time.perf_counter() - t0) / steps
                row["minilora_products_s"] = totals["seconds"] / steps
                row["minilora_gflops"] = totals["flops"] / totals["seconds"] / 1e9
            else:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                            with_flops=True) as prof:
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        torch_train_step(tm, topt, idx_t, tg_t)
                    row["pytorch_step_s_profiled"] = (time.perf_counter() - t0) / steps
                products = [e for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm")]
                seconds = sum(e.self_cpu_time_total for e in products) * 1e-6
                row["pytorch_products_s"] = seconds / steps
                row["pytorch_gflops"] = sum(e.flops for e in products) / seconds / 1e9
        record["rounds"].append(row)
        log(f"        round {r}: minilora products {row['minilora_gflops']:.0f} GFLOP/s"
            + (f", PyTorch's {row['pytorch_gflops']:.0f}" if "pytorch_gflops" in row else ""))
    record["steps_per_round"] = steps
    for key in ("minilora_gflops", "pytorch_gflops"):
        values = [row[key] for row in record["rounds"] if key in row]
        if values:
            record[key + "_median"] = median(values)
    return record


# ======================================================================================
# Targets and the Markdown report
# ======================================================================================


def _target(key: str, what: str, measured: Optional[float], op: str, threshold: float,
            status_if_missing: str = "not measured") -> Dict[str, object]:
    if measured is None:
        status = status_if_missing
    else:
        ok = measured >= threshold if op == ">=" else measured <= threshold
        status = "pass" if ok else "miss"
    return {"key": key, "what": what, "measured": measured, "op": op, "target": threshold, "status": status}


def evaluate_targets(res: Dict[str, object]) -> List[Dict[str, object]]:
    out = []
    cpu_train = [r for r in res["training"] if r["device"] == "cpu"]
    for r in cpu_train:
        name = r["config"]["name"]
        measured = r.get("ratio_tokens_per_s")
        miss = "refused (validation failed)" if not r["validated"] else "not measured (no PyTorch)"
        out.append(_target("train_ratio", f"training tok/s NumPy ÷ PyTorch CPU, {name} {r['mode']}",
                           measured, ">=", 1.0, miss))
    for r in [r for r in res["inference"] if r["device"] == "cpu"]:
        name = r["config"]["name"]
        miss = "refused (validation failed)" if not r["variants"]["base"]["validated"] else "not measured (no PyTorch)"
        out.append(_target("infer_ratio", f"inference tok/s NumPy ÷ PyTorch CPU, {name}", r.get("ratio_base"),
                           ">=", 0.9 if name == "tiny" else 1.0, miss))
    med = next((r for r in cpu_train if r["config"]["name"] == "medium" and r["mode"] == "full"), None)
    out.append(_target("mfu", "MFU, medium full training, NumPy",
                       (med.get("minilora") or {}).get("mfu") if med else None, ">=", 0.70,
                       "refused (validation failed)" if med and not med["validated"] else "not measured"))
    lvf = res.get("lora_vs_full") or {}
    is_medium = lvf.get("config") == "medium"
    out.append(_target("lora_time", "LoRA step time ÷ full step time, medium",
                       lvf.get("step_time_ratio") if is_medium else None, "<=", 0.75))
    out.append(_target("lora_bytes", "LoRA grad + optimizer-state bytes ÷ full's, medium",
                       lvf.get("grad_opt_bytes_ratio") if is_medium else None, "<=", 0.01))
    for r in [r for r in res["inference"] if r["device"] == "cpu"]:
        out.append(_target("merged", f"merged LoRA inference time ÷ base, {r['config']['name']}",
                           r.get("merged_time_over_base"), "<=", 1.03))
    for g in [g for g in res["generation"] if g["device"] == "cpu"]:
        label = f"KV-cache generation speed-up, {g['new_tokens']} new tokens, {g['config']['name']}"
        standard = g["config"]["name"] == "small" and g["new_tokens"] == GEN_NEW_TOKENS
        out.append(_target("kv", label, g.get("speedup") if standard else None, ">=", 5.0,
                           "refused (validation failed)" if not g["validated"] else "not measured (non-standard settings)"))
    for m in res["memory"]:
        out.append(_target("memory", f"peak training memory NumPy ÷ PyTorch, {m['config']} {m['mode']}",
                           m.get("ratio"), "<=", 1.0,
                           "refused (validation failed)" if not m["validated"] else "not measured"))
    gpu = [r for r in res["training"] if r["device"] == "cuda" and r["config"]["name"] == "gpt2"]
    if gpu:
        for r in gpu:
            out.append(_target("gpu_train", f"CuPy training tok/s ÷ PyTorch CUDA, GPT-2 small {r['mode']}",
                               r.get("ratio_tokens_per_s"), ">=", 0.8,
                               "refused (validation failed)" if not r["validated"] else "not measured"))
    else:
        out.append(_target("gpu_train", "CuPy training tok/s ÷ PyTorch CUDA, GPT-2 small", None, ">=", 0.8,
                           "not measured (no CUDA device)" if not res["machine"].get("gpu") else "not measured"))
    return out


def _fmt(x, spec=",.0f", none="—") -> str:
    return none if x is None else format(x, spec)


def _spreads(a: Dict[str, object], b: Dict[str, object]) -> str:
    return f"{_fmt(a.get('rounds_spread'), '.0%')} / {_fmt(b.get('rounds_spread'), '.0%')}"


def _mib(b) -> str:
    return "—" if b is None else f"{b / 2**20:,.1f} MiB"


def markdown(res: Dict[str, object]) -> str:
    m = res["machine"]
    L = [f"# minilora benchmark: {res['name']}", ""]
    L.append(f"- date: {res['date']}  ({'--quick' if res['quick'] else 'full run'}; "
             f"`python bench/run.py {' '.join(res['argv'])}`)")
    L.append(f"- machine: {m['cpu_model']} ({m['machine']}), {m['logical_cpus']} logical CPUs, "
             f"{m.get('memory_gib')} GiB, {m['os']}" + (f"; GPU: {m['gpu']}" if m.get("gpu") else "; no GPU"))
    L.append(f"- threads: {m['threads']} (NumPy/{m['numpy_blas'].get('name')} reports "
             f"{m['numpy_blas'].get('threads')}, minilora's elementwise kernels "
             f"{m.get('minilora_threads')}, PyTorch {m['torch_threads']}; "
             f"OPENBLAS_THREAD_TIMEOUT={m['thread_env'].get('OPENBLAS_THREAD_TIMEOUT')})")
    if m.get("malloc"):
        L.append(f"- malloc (ml.keep_freed_memory(), both sides share this process): {m['malloc']}")
    L.append(f"- versions: Python {m['python']}, NumPy {m['numpy']} ({m['numpy_blas'].get('name')} "
             f"{m['numpy_blas'].get('version')}), PyTorch {m['torch'] or 'not installed'}"
             f"{' (' + str(m.get('torch_blas')) + ')' if m['torch'] else ''}, minilora {m['minilora']} "
             f"({m['minilora_commit']})" + (f", CuPy {m.get('cupy')}" if m.get("cupy") else ""))
    L.append(f"- load average (1, 5, 15 min): {res['loadavg_start']} at start, {res['loadavg_end']} at end "
             "(other processes on the machine slow both sides alike, but add noise)")
    L.append(f"- PyTorch attention: `{res['args']['torch_attention']}`; AdamW {ADAMW}; "
             f"LoRA r={LORA['r']} alpha={LORA['alpha']} on {', '.join(LORA['target_modules'])}")
    for p in res["peak_matmul"]:
        L.append(f"- peak float32 matmul ({p['device']}, {p['n']}³, best of {p['repeats']}): "
                 f"{p['flops_per_s'] / 1e9:,.1f} GFLOP/s")
    if res.get("gpu_skipped"):
        L.append(f"- GPU: {res['gpu_skipped']}")
    L.append("")
    if res["failures"]:
        L += ["## Refused (validation failed)", ""] + [f"- {f}" for f in res["failures"]] + [""]

    L += ["## Training throughput (forward + cross-entropy + backward + AdamW)", "",
          "| device | config | mode | minilora tok/s | PyTorch tok/s | ratio | minilora MFU | PyTorch MFU | "
          "rounds spread | host steal | validated |",
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["training"]:
        a, b = r.get("minilora") or {}, r.get("pytorch") or {}
        val = "yes" if r["validated"] else "**REFUSED**"
        L.append(f"| {r['device']} | {r['config']['name']} | {r['mode']} | {_fmt(a.get('tokens_per_s'))} | "
                 f"{_fmt(b.get('tokens_per_s'))} | {_fmt(r.get('ratio_tokens_per_s'), '.2f')} | "
                 f"{_fmt(a.get('mfu'), '.1%')} | {_fmt(b.get('mfu'), '.1%')} | "
                 f"{_spreads(a, b)} | {_fmt(r.get('steal_fraction'), '.1%')} | {val} |")
    L += ["", "*Rounds spread*: (slowest − fastest) ÷ median of each side's rounds, minilora / PyTorch; "
          "*host steal*: the share of CPU time the hypervisor gave to other guests while the rounds ran "
          "(Linux /proc/stat). Both say how far to trust a ratio.", ""]
    lvf = res.get("lora_vs_full")
    if lvf and lvf.get("validated"):
        L += [f"## LoRA vs full fine-tuning ({lvf['config']})", "",
              "| | full | LoRA | LoRA ÷ full |", "|---|---:|---:|---:|",
              f"| step time (minilora{', %d paired trials' % lvf['paired']['trials'] if 'paired' in lvf else ''}) | "
              f"{lvf['step_s_full'] * 1e3:,.1f} ms | {lvf['step_s_lora'] * 1e3:,.1f} ms | "
              f"{lvf['step_time_ratio']:.3f} |",
              f"| trainable parameters | {lvf['trainable_full']:,} | {lvf['trainable_lora']:,} | "
              f"{lvf['trainable_lora'] / lvf['trainable_full']:.4%} |",
              f"| gradient + AdamW state bytes | {lvf['grad_opt_bytes_full']:,} | {lvf['grad_opt_bytes_lora']:,} | "
              f"{lvf['grad_opt_bytes_ratio']:.4%} |"]
        if "files" in lvf:
            f = lvf["files"]
            L.append(f"| save_model vs save_adapter bytes | {f['checkpoint_bytes']:,} | {f['adapter_bytes']:,} | "
                     f"{f['ratio']:.4%} |")
        for mode in ("full", "lora"):
            pm = lvf.get(f"peak_memory_{mode}")
            if pm and "minilora" in pm:
                L.append(f"| training memory, {mode} (minilora) | | | {_mib(pm['minilora']['training_bytes'])} |")
        if "paired" in lvf:
            L.append(f"| step time (minilora, the training rows' medians) | | | {lvf['step_time_ratio_blocks']:.3f} |")
        if "pytorch_step_time_ratio" in lvf:
            L.append(f"| step time (PyTorch, the training rows' medians) | | | {lvf['pytorch_step_time_ratio']:.3f} |")
        if "paired" in lvf:
            L += ["", "The minilora step time ratio is the median over paired trials (one full and one LoRA "
                  "step, back to back, the order alternating) of LoRA time ÷ full time; the training rows time "
                  "each mode in blocks minutes apart, and their ratio carries the machine's drift between them."]
        L.append("")
    if res["memory"]:
        L += ["## Peak training memory (fresh process per side; high-water RSS minus the RSS before the first step)", "",
              "| config | mode | minilora | PyTorch | ratio | minilora peak RSS | PyTorch peak RSS | minilora arrays (tracemalloc) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in res["memory"]:
            a, b = r.get("minilora") or {}, r.get("pytorch") or {}
            L.append(f"| {r['config']} | {r['mode']} | {_mib(a.get('training_bytes'))} | {_mib(b.get('training_bytes'))} | "
                     f"{_fmt(r.get('ratio'), '.2f')} | {_mib(a.get('peak_rss'))} | {_mib(b.get('peak_rss'))} | "
                     f"{_mib(a.get('tracemalloc_step_peak_bytes'))} |")
        L.append("")
    if res.get("allocator"):
        L += ["## Keeping freed memory (minilora/allocator.py; minilora alone, a fresh process per column)", "",
              "| config | pass | glibc defaults | page faults | keep_freed_memory() | page faults | speed-up |",
              "|---|---|---:|---:|---:|---:|---:|"]
        for r in res["allocator"]:
            for name in ("forward", "step"):
                a, b = r["defaults"][name], r["kept"][name]
                L.append(f"| {r['config']} | {'training step' if name == 'step' else 'forward (no_grad)'} | "
                         f"{a['median_s'] * 1e3:,.1f} ms | {a['faults_per_call']:,.0f} | {b['median_s'] * 1e3:,.1f} ms | "
                         f"{b['faults_per_call']:,.0f} | {r[name + '_speedup']:.2f}× |")
        L += ["", "Peak RSS of those processes, glibc defaults vs keep_freed_memory(): " + "; ".join(
            f"{r['config']} {_mib(r['defaults'].get('peak_rss'))} vs {_mib(r['kept'].get('peak_rss'))}"
            for r in res["allocator"]) + ".", ""]
    elif res.get("allocator_skipped"):
        L += [f"Keeping freed memory: {res['allocator_skipped']}.", ""]
    if res["inference"]:
        L += ["## Inference (forward only, no_grad / inference_mode, eval)", "",
              "| device | config | base tok/s | LoRA unmerged | LoRA merged | PyTorch base | PyTorch LoRA | ratio base | "
              "merged ÷ base time | rounds spread | host steal | validated |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in res["inference"]:
            v = r["variants"]
            g = lambda k: _fmt((v.get(k) or {}).get("tokens_per_s"))  # noqa: E731
            L.append(f"| {r['device']} | {r['config']['name']} | {g('base')} | {g('lora_unmerged')} | {g('lora_merged')} | "
                     f"{g('pytorch_base')} | {g('pytorch_lora')} | {_fmt(r.get('ratio_base'), '.2f')} | "
                     f"{_fmt(r.get('merged_time_over_base'), '.3f')} | "
                     f"{_spreads(v.get('base') or {}, v.get('pytorch_base') or {})} | "
                     f"{_fmt(r.get('steal_fraction'), '.1%')} | {'yes' if r['validated'] else '**REFUSED** (partly)'} |")
        paired = [f"{r['config']['name']} {r['paired_trials']}" for r in res["inference"] if r.get("paired_trials")]
        if paired:
            L += ["", "*merged ÷ base time*: the median over paired trials (one call of each minilora variant, "
                  "back to back, the order rotating) of merged time ÷ base time; trials: " + ", ".join(paired) + ". "
                  "The ratio of the two columns' medians, blocks of calls seconds apart, is in the JSON "
                  "(merged_time_over_base_blocks)."]
        L.append("")
    if res["generation"]:
        L += ["## Generation (greedy, batch 1)", "",
              "| device | model | prompt + new | with KV cache tok/s | without tok/s | speed-up | identical tokens |",
              "|---|---|---|---:|---:|---:|---|"]
        for g in res["generation"]:
            L.append(f"| {g['device']} | {g['config']['name']} (block {g['block_size']}) | {g['prompt_tokens']} + "
                     f"{g['new_tokens']} | {_fmt((g.get('cache') or {}).get('tokens_per_s'), ',.1f')} | "
                     f"{_fmt((g.get('no_cache') or {}).get('tokens_per_s'), ',.1f')} | {_fmt(g.get('speedup'), '.1f')}× | "
                     f"{'yes' if g['validated'] else '**NO: REFUSED**'} |")
        L.append("")
    L += ["## Targets", "", "| target | measured | goal | status |", "|---|---:|---:|---|"]
    for t in res["targets"]:
        pct = t["key"] in ("mfu", "lora_bytes")
        meas = _fmt(t["measured"], ".2%" if pct else ".3f")
        goal = f"{'≥' if t['op'] == '>=' else '≤'} {format(t['target'], '.0%' if pct else 'g')}"
        L.append(f"| {t['what']} | {meas} | {goal} | {t['status']} |")
    L.append("")
    if res.get("profile"):
        p = res["profile"]
        L += [f"## Where a minilora training step spends its time ({p['config']} {p['mode']}, cProfile, "
              f"{p['total_s']:.2f} s in total)", "", "| function | calls | own time | with callees |", "|---|---:|---:|---:|"]
        for row in p["top_by_tottime"]:
            L.append(f"| `{row['function']}` | {row['ncalls']} | {row['tottime_s']:.3f} s | {row['cumtime_s']:.3f} s |")
        L.append("")
    products = res.get("products_in_step")
    if products:
        L += [f"## The linear layers' products inside the training step ({products['config']} full)", ""]
        if not products["validated"]:
            L += [f"**REFUSED**: {products['refused']}", ""]
        else:
            L += ["| round | minilora step | its products | their rate | PyTorch step (profiled) | "
                  "its products | their rate |", "|---:|---:|---:|---:|---:|---:|---:|"]
            for r, row in enumerate(products["rounds"]):
                cells = [_fmt(row[key] * scale if key in row else None, spec) + unit
                         for side in ("minilora", "pytorch")
                         for key, spec, scale, unit in (
                             (f"{side}_step_s" + ("_profiled" if side == "pytorch" else ""), ",.1f", 1e3, " ms"),
                             (f"{side}_products_s", ",.1f", 1e3, " ms"), (f"{side}_gflops", ".0f", 1, " GFLOP/s"))]
                L.append(f"| {r} | " + " | ".join(cells) + " |")
            L += ["", f"Steps per side per round: {products['steps_per_round']}, the order alternating. "
                  "minilora's products: its linear op timed call by call (bias add and bias gradient "
                  "included; the head's weight gradient, written in gpt.py, left out). PyTorch's: "
                  "`aten::mm` + `aten::addmm` as torch.profiler records them, which slows the rest of "
                  "its step: compare the rates, not the steps."
                  + (f" PyTorch side skipped: {products['pytorch_skipped']}." if "pytorch_skipped" in products else ""),
                  ""]
    L.append("How to read these numbers, and how they are validated: bench/README.md.")
    return "\n".join(L) + "\n"


# ======================================================================================
# Main
# ======================================================================================


def parse_config(spec: str) -> BenchConfig:
    """``tiny`` (a named config) or ``name=V/T/L/H/C/B`` (a custom one, e.g. micro=64/16/1/2/32/2)."""
    if spec in CONFIGS:
        return CONFIGS[spec]
    m = re.fullmatch(r"([A-Za-z0-9_\-]+)=(\d+)/(\d+)/(\d+)/(\d+)/(\d+)/(\d+)", spec)
    if not m:
        raise argparse.ArgumentTypeError(f"unknown config {spec!r}: use one of {sorted(CONFIGS)} or name=V/T/L/H/C/B")
    V, T, L, H, C, B = (int(x) for x in m.groups()[1:])
    if C % H:
        raise argparse.ArgumentTypeError(f"config {spec!r}: C={C} is not divisible by H={H}")
    return BenchConfig(m.group(1), V=V, T=T, L=L, H=H, C=C, B=B)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="minilora benchmark (validates, then times; see bench/README.md)")
    p.add_argument("--quick", action="store_true", help="tiny config only, fewer rounds (< 1 minute)")
    p.add_argument("--configs", default=None,
                   help="comma-separated CPU configs: tiny, small, medium, or name=V/T/L/H/C/B "
                        "(default: tiny,small,medium; --quick: tiny)")
    p.add_argument("--gpu-configs", default=None, help="configs for the GPU part (default: tiny,small,medium,gpt2)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads for NumPy's BLAS and PyTorch alike (default: all logical CPUs)")
    p.add_argument("--out", default=os.path.join(BENCH_DIR, "results"), help="where the .json and .md go")
    p.add_argument("--tag", default=None, help="file name (default: from the CPU model, core and GPU)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per measurement (default 5, quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per side before the rounds")
    p.add_argument("--min-block-s", type=float, default=None,
                   help="each timed block runs enough steps to last this long (default 0.5 s, quick 0.2 s)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch side even if it is installed")
    p.add_argument("--torch-attention", choices=("sdpa", "manual"), default="sdpa",
                   help="PyTorch attention: F.scaled_dot_product_attention (default) or the textbook one")
    p.add_argument("--no-inference", action="store_true")
    p.add_argument("--no-generation", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-gpu", action="store_true")
    p.add_argument("--gen-model", default=GEN_MODEL, help="model shape for generation (its T and B are ignored)")
    p.add_argument("--gen-new-tokens", type=int, default=GEN_NEW_TOKENS)
    p.add_argument("--gen-rounds", type=int, default=None,
                   help="timed generation rounds after the validation run, which is timed too "
                        "(default 2, quick 0)")
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--peak-n", type=int, default=2048, help="size of the square matmul for the peak rate")
    p.add_argument("--profile", nargs="?", const="largest", default=None, metavar="CONFIG",
                   help="cProfile one minilora full training step of CONFIG (default: the largest CPU config run)")
    p.add_argument("--no-allocator", action="store_true", help="skip the malloc comparison")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--allocator-probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    if args.min_block_s is None:
        args.min_block_s = 0.2 if args.quick else 0.5
    if args.gen_rounds is None:
        args.gen_rounds = 0 if args.quick else 2
    specs = args.configs.split(",") if args.configs else (["tiny"] if args.quick else list(CPU_CONFIGS))
    args.cpu_configs = [parse_config(s.strip()) for s in specs if s.strip()]
    gspecs = args.gpu_configs.split(",") if args.gpu_configs else (["tiny"] if args.quick else list(GPU_CONFIGS))
    args.gpu_config_list = [parse_config(s.strip()) for s in gspecs if s.strip()]
    return args


def run(args) -> Dict[str, object]:
    set_threads(args.threads)
    # As the minilora command does; in this process it holds for both sides alike.
    malloc = ml.keep_freed_memory()
    info = machine_info(args.threads)
    info["malloc"] = malloc
    res: Dict[str, object] = {
        "schema": SCHEMA_VERSION, "name": args.tag or machine_tag(info, args.quick), "quick": args.quick,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": args.argv, "machine": info, "loadavg_start": loadavg(),
        "args": {k: v for k, v in vars(args).items() if k not in ("cpu_configs", "gpu_config_list", "argv")},
        "configs": [asdict(c) for c in args.cpu_configs],
        "settings": {"adamw": {**ADAMW, "betas": list(ADAMW["betas"])},
                     "lora": {**LORA, "target_modules": list(LORA["target_modules"])},
                     "tolerances": {"loss": TOL_LOSS, "grad": TOL_GRAD, "logits": TOL_LOGITS,
                                    "optimizer": TOL_OPTIM, "directional": TOL_DIRECTIONAL,
                                    "grad_floor": GRAD_FLOOR}},
        "peak_matmul": [], "training": [], "inference": [], "generation": [], "memory": [], "allocator": [],
    }
    t_start = time.perf_counter()
    skip = torch_skip_reason(args)
    if skip:
        log(f"note: {skip}")
    log(f"threads: {args.threads}; load average {res['loadavg_start']}")
    busy = res["loadavg_start"] is not None and res["loadavg_start"][0] > (os.cpu_count() or 1) * 0.75
    res["machine_busy_at_start"] = bool(busy)
    if busy:
        log(f"WARNING: the machine is busy (load average {res['loadavg_start'][0]} on {os.cpu_count()} CPUs): "
            "timings will be slow and noisy, and multi-threaded BLAS suffers most; consider --threads 1")

    peak = peak_matmul("cpu", args.peak_n, repeats=3 if args.quick else 5)
    res["peak_matmul"].append(peak)
    log(f"[peak] cpu float32 matmul {args.peak_n}^3: {peak['flops_per_s'] / 1e9:,.1f} GFLOP/s")
    peak_cpu = peak["flops_per_s"] if peak["validated"] else None

    for bc in args.cpu_configs:
        for mode in ("full", "lora"):
            res["training"].append(bench_training(bc, mode, args, "cpu", peak_cpu))
    if not args.no_memory:
        for bc in args.cpu_configs:
            for mode in ("full", "lora"):
                tr = next(r for r in res["training"] if r["device"] == "cpu" and r["config"]["name"] == bc.name
                          and r["mode"] == mode)
                res["memory"].append(bench_memory(bc, mode, args, bool(tr["validated"])))
    if not args.no_allocator:
        if ml.allocator._glibc() is None:
            res["allocator_skipped"] = "the C library is not glibc: keep_freed_memory() does nothing here"
        else:
            for bc in args.cpu_configs:
                res["allocator"].append(bench_allocator(bc, args))
    if not args.no_inference:
        for bc in args.cpu_configs:
            res["inference"].append(bench_inference(bc, args, "cpu"))
    if not args.no_generation:
        res["generation"].append(bench_generation(args, "cpu"))
    res["lora_vs_full"] = lora_vs_full(res["training"], res["memory"], "cpu", args)
    if args.profile and (args.cpu_configs or args.profile != "largest"):
        if args.profile == "largest":
            target = max(args.cpu_configs, key=lambda c: training_flops(c, "full"))
        else:
            target = parse_config(args.profile)
        log(f"[profile] cProfile of one minilora {target.name} full training step ...")
        res["profile"] = profile_step(target)
        res["products_in_step"] = products_in_step(target, args)

    # ---- 5. GPU ------------------------------------------------------------------------
    if args.no_gpu:
        res["gpu_skipped"] = "GPU part disabled (--no-gpu)"
    elif not backend.cuda_available():
        res["gpu_skipped"] = "no CUDA device (minilora.backend.cuda_available() is False): GPU part skipped"
        log(f"note: {res['gpu_skipped']}")
    else:
        if torch is not None and not torch.cuda.is_available():
            log("note: CuPy sees a GPU but this PyTorch build has no CUDA: PyTorch GPU side skipped")
            args.no_torch = True
        if torch is not None:
            torch.backends.cuda.matmul.allow_tf32 = False   # float32 on both sides (CuPy: CUPY_TF32 unset)
            torch.backends.cudnn.allow_tf32 = False
        gpeak = peak_matmul("cuda", 8192, repeats=5)
        res["peak_matmul"].append(gpeak)
        log(f"[peak] cuda float32 matmul 8192^3: {gpeak['flops_per_s'] / 1e12:,.1f} TFLOP/s")
        for bc in args.gpu_config_list:
            for mode in ("full", "lora"):
                res["training"].append(bench_training(bc, mode, args, "cuda",
                                                      gpeak["flops_per_s"] if gpeak["validated"] else None))
        if not args.no_inference:
            for bc in args.gpu_config_list:
                res["inference"].append(bench_inference(bc, args, "cuda"))
        if not args.no_generation:
            res["generation"].append(bench_generation(args, "cuda"))
        res["lora_vs_full_cuda"] = lora_vs_full(res["training"], [], "cuda", args)

    res["loadavg_end"] = loadavg()
    res["wall_s"] = time.perf_counter() - t_start
    res["failures"] = failures(res)
    res["validated_all"] = not res["failures"]
    res["targets"] = evaluate_targets(res)
    return res


def failures(res: Dict[str, object]) -> List[str]:
    out = []
    for p in res["peak_matmul"]:
        if not p["validated"]:
            out.append(f"peak matmul {p['device']}: result wrong (rel err {p['rel_err']:.3g}); MFU not reported")
    for r in res["training"]:
        if not r["validated"]:
            out.append(f"training {r['device']} {r['config']['name']} {r['mode']}: {r.get('refused')}")
    for r in res["inference"]:
        for name, v in r["variants"].items():
            if not v["validated"]:
                out.append(f"inference {r['device']} {r['config']['name']} {name}: {v.get('refused')}")
    for g in res["generation"]:
        if not g["validated"]:
            out.append(f"generation {g['device']} {g['config']['name']}: {g.get('refused')}")
    products = res.get("products_in_step")
    if products and not products["validated"]:
        out.append(f"products in step {products['config']}: {products.get('refused')}")
    return out


def write_results(res: Dict[str, object], out_dir: str) -> Tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{res['name']}.json")
    md_path = os.path.join(out_dir, f"{res['name']}.md")
    with open(json_path, "w") as f:
        json.dump(res, f, indent=1, default=_json_default)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(markdown(res))
    return json_path, md_path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_probe is not None:
        set_threads(args.threads)
        print(json.dumps(memory_probe(json.loads(args.memory_probe)), default=_json_default))
        return 0
    if args.allocator_probe is not None:
        set_threads(args.threads)
        print(json.dumps(allocator_probe(json.loads(args.allocator_probe)), default=_json_default))
        return 0
    res = run(args)
    json_path, md_path = write_results(res, args.out)
    log("")
    log(markdown(res))
    log(f"wrote {json_path} and {md_path} ({res['wall_s']:.0f} s)")
    if res["failures"]:
        log("VALIDATION FAILED -- these numbers were refused:")
        for f in res["failures"]:
            log(f"  {f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
