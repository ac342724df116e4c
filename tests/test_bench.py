"""The benchmark (bench/run.py) runs, records what it promises, and refuses wrong numbers.

Never a timing test: nothing here asserts on a speed. What is checked:

- ``python bench/run.py --quick`` on a micro config writes the JSON and Markdown with
  the expected keys, and every measurement says ``"validated": true``;
- a deliberately wrong reference (a perturbed PyTorch weight) makes the validation fail,
  the number is refused (no tokens/s recorded), and ``main`` exits non-zero;
- the malloc comparison (glibc defaults vs ml.keep_freed_memory()) ran both sides;
- without PyTorch, the fallback check (float64 copy + a central difference) passes a
  correct model and catches a wrong gradient.
- the products-in-step measurement (``--profile``) counts every linear product of the
  step, puts minilora's linear op back afterwards, and refuses its rate when a product
  goes unseen.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(ROOT, "bench", "run.py")
MICRO = "micro=64/16/1/2/32/2"           # V, T, L, H, C, B: a model that trains in milliseconds
FAST = ["--threads", "1", "--rounds", "1", "--warmup", "0", "--min-block-s", "0.001",
        "--peak-n", "128", "--gen-model", "micro=64/16/1/2/32/1", "--gen-new-tokens", "8",
        "--memory-steps", "1"]


def has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def perturb(tm):
    """A wrong reference: one weight of the PyTorch model changed by 5%."""
    import torch
    with torch.no_grad():
        tm.blocks[0].mlp.up_proj.weight.mul_(1.05)


# --------------------------------------------------------------------------------------
# The whole run, as a user starts it
# --------------------------------------------------------------------------------------

def test_quick_run_writes_validated_results(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, RUN_PY, "--quick", "--configs", MICRO, "--out", str(out), "--tag", "test"] + FAST
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "test.json").read_text())
    md = (out / "test.md").read_text()

    for key in ("schema", "name", "date", "machine", "peak_matmul", "training", "inference", "generation",
                "memory", "lora_vs_full", "targets", "failures", "validated_all"):
        assert key in res, key
    for key in ("cpu_model", "threads", "numpy", "torch", "python", "logical_cpus"):
        assert key in res["machine"], key
    assert res["machine"]["threads"] == 1
    assert res["validated_all"] is True and res["failures"] == []

    assert {(r["config"]["name"], r["mode"]) for r in res["training"]} == {("micro", "full"), ("micro", "lora")}
    for r in res["training"]:
        assert r["validated"] is True, r.get("refused")
        assert r["minilora"]["tokens_per_s"] > 0
        assert "mfu" in r["minilora"]
        assert r["minilora"]["rounds_spread"] >= 0
        assert "steal_fraction" in r
        if sys.platform.startswith("linux"):
            assert 0 <= r["steal_fraction"] <= 1
        if has_torch():
            assert r["validation"]["against"].startswith("PyTorch")
            assert r["pytorch"]["tokens_per_s"] > 0 and r["ratio_tokens_per_s"] > 0
        else:
            assert "pytorch_skipped" in r
    (inf,) = res["inference"]
    assert inf["validated"] is True
    for name in ("base", "lora_unmerged", "lora_merged"):
        assert inf["variants"][name]["validated"] is True
        assert inf["variants"][name]["tokens_per_s"] > 0
    assert inf["paired_trials"] >= 5 and inf["merged_time_over_base"] > 0 and inf["merged_time_over_base_blocks"] > 0
    (gen,) = res["generation"]
    assert gen["validated"] is True and gen["validation"]["identical_tokens"] is True
    assert gen["speedup"] > 0
    for m in res["memory"]:
        assert m["validated"] is True
        assert m["minilora"]["training_bytes"] is not None
    lvf = res["lora_vs_full"]
    assert lvf["validated"] is True
    assert lvf["paired"]["trials"] >= 5 and len(lvf["paired"]["step_s_lora_trials"]) == lvf["paired"]["trials"]
    assert lvf["step_time_ratio"] == lvf["paired"]["step_time_ratio"] > 0 and lvf["step_time_ratio_blocks"] > 0
    assert lvf["trainable_lora"] < lvf["trainable_full"]
    assert 0 < lvf["files"]["adapter_bytes"] < lvf["files"]["checkpoint_bytes"]
    assert all(t["status"] in ("pass", "miss") or t["status"].startswith("not measured") for t in res["targets"])
    assert "## Training throughput" in md and "## Targets" in md and res["machine"]["cpu_model"] in md
    assert "malloc" in res["machine"]
    if sys.platform.startswith("linux") and res["allocator"]:   # glibc: both sides of the comparison ran
        (alloc,) = res["allocator"]
        assert alloc["defaults"]["malloc"] == "glibc defaults"
        assert alloc["kept"]["malloc"].startswith("applied"), alloc["kept"]["malloc"]
        for side in ("defaults", "kept"):
            for name in ("forward", "step"):
                assert alloc[side][name]["median_s"] > 0 and alloc[side][name]["faults_per_call"] >= 0
        assert "## Keeping freed memory" in md
    else:
        assert res["allocator_skipped"]


# --------------------------------------------------------------------------------------
# A wrong reference: the number is refused
# --------------------------------------------------------------------------------------

def test_validation_catches_a_wrong_reference(bench):
    pytest.importorskip("torch", reason="needs PyTorch, the benchmark's reference")
    bc = bench.parse_config(MICRO)
    for mode in ("full", "lora"):
        model = bench.build_minilora(bc, mode)
        opt = bench.minilora_adamw(model)
        tm = bench.build_torch(model)
        topt = bench.torch_adamw(tm)
        idx, targets = bench.make_batch(bc)
        ok = bench.validate_training(model, opt, tm, topt, idx, targets)
        assert ok["validated"] is True, ok["problems"]

        model = bench.build_minilora(bc, mode)
        tm = bench.build_torch(model)
        perturb(tm)
        bad = bench.validate_training(model, bench.minilora_adamw(model), tm, bench.torch_adamw(tm), idx, targets)
        assert bad["validated"] is False
        assert bad["problems"]


def test_refused_measurements_record_no_number(bench):
    pytest.importorskip("torch", reason="needs PyTorch, the benchmark's reference")
    args = bench.parse_args(["--configs", MICRO] + FAST)
    bc = args.cpu_configs[0]
    rec = bench.bench_training(bc, "full", args, tamper=perturb)
    assert rec["validated"] is False and "refused" in rec
    assert "minilora" not in rec and "pytorch" not in rec and "ratio_tokens_per_s" not in rec
    inf = bench.bench_inference(bc, args, tamper=perturb)
    assert inf["validated"] is False
    for name in ("base", "lora_unmerged", "lora_merged", "pytorch_base", "pytorch_lora"):
        assert inf["variants"][name]["validated"] is False
        assert "tokens_per_s" not in inf["variants"][name]
    assert inf["ratio_base"] is None and inf["merged_time_over_base"] is None


def test_main_exits_nonzero_when_validation_fails(bench, tmp_path, monkeypatch):
    pytest.importorskip("torch", reason="needs PyTorch, the benchmark's reference")
    real_build = bench.build_torch

    def wrong_reference(*a, **kw):
        tm = real_build(*a, **kw)
        perturb(tm)
        return tm
    monkeypatch.setattr(bench, "build_torch", wrong_reference)
    code = bench.main(["--configs", MICRO, "--out", str(tmp_path), "--tag", "bad", "--no-memory",
                       "--no-generation", "--no-gpu"] + FAST)
    assert code == 1
    res = json.loads((tmp_path / "bad.json").read_text())
    assert res["validated_all"] is False and res["failures"]
    assert all(r["validated"] is False and "minilora" not in r for r in res["training"])
    train_targets = [t for t in res["targets"] if t["key"] == "train_ratio"]
    assert train_targets and all(t["measured"] is None and t["status"].startswith("refused") for t in train_targets)
    assert "REFUSED" in (tmp_path / "bad.md").read_text()


# --------------------------------------------------------------------------------------
# The products inside the step (--profile): every product counted, or refused
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("no_torch", [False, True])
def test_products_in_step_counts_every_linear_product(bench, no_torch):
    if not no_torch:
        pytest.importorskip("torch", reason="needs PyTorch, the benchmark's reference")
    args = bench.parse_args(["--configs", MICRO] + FAST + ["--rounds", "2"] + (["--no-torch"] if no_torch else []))
    bc = args.cpu_configs[0]
    rec = bench.products_in_step(bc, args)
    assert rec["validated"] is True, rec.get("refused")
    assert len(rec["rounds"]) == 2
    for row in rec["rounds"]:
        assert row["minilora_gflops"] > 0 and 0 < row["minilora_products_s"] <= row["minilora_step_s"]
        if no_torch:
            assert "pytorch_gflops" not in row
        else:
            assert row["pytorch_gflops"] > 0 and 0 < row["pytorch_products_s"] <= row["pytorch_step_s_profiled"]
    assert ("pytorch_skipped" in rec) == no_torch
    # The wrappers are gone afterwards: the modules call minilora's own linear op again.
    import minilora.nn as nn
    from minilora.ops import linear
    assert nn.linear_forward is linear.linear_forward and nn.linear_backward is linear.linear_backward


def test_products_in_step_refuses_when_a_product_goes_unseen(bench, monkeypatch):
    # Without gpt.py's calls wrapped, the head's products are not counted: the FLOPs do
    # not add up to a full step's, and the rate (which would be too high) is refused.
    monkeypatch.setattr(bench, "LINEAR_OP_CALLERS", ("minilora.nn", "minilora.lora"))
    args = bench.parse_args(["--configs", MICRO, "--no-torch"] + FAST)
    rec = bench.products_in_step(args.cpu_configs[0], args)
    assert rec["validated"] is False and "FLOPs" in rec["refused"]
    assert rec["rounds"] == []
    assert bench.failures({"peak_matmul": [], "training": [], "inference": [], "generation": [],
                           "products_in_step": rec})


# --------------------------------------------------------------------------------------
# Without PyTorch: the fallback check has teeth too
# --------------------------------------------------------------------------------------

def test_fallback_validation_without_torch(bench, monkeypatch):
    bc = bench.parse_config(MICRO)
    idx, targets = bench.make_batch(bc)
    for mode in ("full", "lora"):
        ok = bench.validate_training_without_torch(bench.build_minilora(bc, mode), idx, targets)
        assert ok["validated"] is True, ok["problems"]
        assert ok["directional_rel_err"] < bench.TOL_DIRECTIONAL

    import minilora.gpt as gpt
    real_backward = gpt.GPT.backward

    def wrong_backward(self, dlogits):
        real_backward(self, dlogits)
        for p in self.parameters():
            if p.grad is not None:
                p.grad *= 1.01          # every gradient 1% too large: a wrong derivative
    monkeypatch.setattr(gpt.GPT, "backward", wrong_backward)
    bad = bench.validate_training_without_torch(bench.build_minilora(bc, "full"), idx, targets)
    assert bad["validated"] is False
    assert any("directional" in p for p in bad["problems"])


def test_no_torch_flag_skips_the_pytorch_side(bench):
    args = bench.parse_args(["--configs", MICRO, "--no-torch"] + FAST)
    rec = bench.bench_training(args.cpu_configs[0], "lora", args)
    assert rec["validated"] is True
    assert "pytorch" not in rec and "PyTorch" in rec["pytorch_skipped"]
    assert rec["minilora"]["tokens_per_s"] > 0


def test_trials_for_fits_the_budget_within_bounds(bench):
    assert bench.trials_for(0.5, budget_s=4.0, least=11) == 11
    assert bench.trials_for(0.01, budget_s=4.0, least=11) == 101
    assert bench.trials_for(0.1, budget_s=4.0, least=11) == 40


def test_steal_and_spread(bench):
    # cpu_times() order: user, nice, system, idle, iowait, irq, softirq, steal
    before, after = [100, 0, 10, 500, 0, 0, 0, 5], [160, 0, 20, 520, 0, 0, 0, 15]
    assert bench.steal_fraction(before, after) == pytest.approx(10 / 100)
    assert bench.steal_fraction(None, after) is None and bench.steal_fraction(before, before) is None
    assert bench.spread([1.0, 1.2, 0.9]) == pytest.approx((1.2 - 0.9) / 1.0)
    if sys.platform.startswith("linux"):
        assert len(bench.cpu_times()) == 8


def test_flop_counts(bench):
    """The model-FLOP formulas of bench/README.md, on GPT-2 small's shape."""
    bc = bench.CONFIGS["gpt2"]
    cfg = bc.gpt_config()
    N = 12 * 12 * 768 * 768 + 50257 * 768
    assert bench.matmul_params(cfg) == N
    attention = 3 * 4 * bc.B * bc.L * bc.T ** 2 * bc.C
    assert bench.training_flops(bc, "full") == 6 * N * bc.B * bc.T + attention
    adapters = 12 * 2 * 8 * (768 + 768)
    assert bench.training_flops(bc, "lora") == 4 * N * bc.B * bc.T + 6 * adapters * bc.B * bc.T + attention
    model = bench.build_minilora(bench.parse_config(MICRO), "lora")
    assert model.num_parameters(trainable_only=True) == bench.adapter_params(model.config)
    np.testing.assert_equal(bench.parse_config(MICRO).B, 2)
