"""Tests for minilora.io: saving and loading models, optimizer state, and training
checkpoints that a crash in the middle of a save cannot break."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from minilora import io
from minilora.gpt import GPT, GPTConfig
from minilora.optim import SGD, AdamW

TINY = GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        x, y = np.asarray(sa[name]), np.asarray(sb[name])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), f"{name} differs"


def trained_optimizer(model, steps=2, cls=AdamW, **kw):
    """An optimizer with state: a few updates from random gradients."""
    opt = cls(model.parameters(), lr=1e-2, **kw)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = rng.standard_normal(p.shape).astype(p.dtype)
        opt.step()
    return opt


# --------------------------------------------------------------------------------------
# save_model / load_model
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_round_trip_is_bitwise(tmp_path, dtype):
    model = GPT(GPTConfig(32, 16, 2, 2, 16, dropout=0.1), seed=3, dtype=dtype)
    trained_optimizer(model)  # weights no longer what a seed would give
    paths = io.save_model(model, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    assert paths["weights"].endswith("model.safetensors")
    loaded = io.load_model(tmp_path / "m")
    assert loaded.config == model.config and loaded.dtype == model.dtype and loaded.seed == 3
    assert_same_weights(model, loaded)
    idx = np.random.default_rng(0).integers(0, 32, size=(2, 8))
    model.eval(), loaded.eval()
    assert np.array_equal(model.forward(idx), loaded.forward(idx))


def test_load_model_converts_dtype(tmp_path):
    model = GPT(TINY, seed=0)
    io.save_model(model, tmp_path)
    loaded = io.load_model(tmp_path, dtype="float64")
    assert loaded.dtype == np.float64
    for name, a in model.state_dict().items():
        assert np.array_equal(a.astype(np.float64), loaded.state_dict()[name])


def test_load_model_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model directory"):
        io.load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        io.load_model(tmp_path)
    io.save_model(GPT(TINY), tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        io.load_model(tmp_path)


def test_load_model_truncated_weights_is_a_value_error_naming_the_file(tmp_path):
    io.save_model(GPT(TINY), tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    for cut in (4, 20, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="model.safetensors"):
            io.load_model(tmp_path)
    path.write_bytes(b"\xff" * 64)   # garbage header
    with pytest.raises(ValueError, match="model.safetensors"):
        io.load_model(tmp_path)


@pytest.mark.parametrize("content", ['{"model": {"vocab_size": 32,', "", "[1, 2]", "\xff\xfe",
                                     '{"dtype": "float32"}',
                                     '{"model": {"vocab_size": 32, "block_size": 16}}',
                                     '{"model": {"vocab_size": -1, "block_size": 16, "n_layer": 1, '
                                     '"n_head": 2, "n_embd": 16}}',
                                     '{"model": {"vocab_size": 32, "block_size": 16, "n_layer": 1, '
                                     '"n_head": 2, "n_embd": 16, "colour": 1}}'])
def test_load_model_corrupt_config_is_a_value_error_naming_the_file(tmp_path, content):
    io.save_model(GPT(TINY), tmp_path)
    (tmp_path / "config.json").write_text(content, encoding="latin-1")
    with pytest.raises(ValueError, match="config.json"):
        io.load_model(tmp_path)


def test_load_model_weights_that_do_not_fit_the_config(tmp_path):
    io.save_model(GPT(TINY), tmp_path)
    other = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=8))
    io.write_safetensors(tmp_path / "model.safetensors", other.state_dict())
    with pytest.raises(ValueError, match="model.safetensors.*shape mismatch"):
        io.load_model(tmp_path)
    state = dict(GPT(TINY).state_dict())
    state.pop("ln_f.bias")
    io.write_safetensors(tmp_path / "model.safetensors", state)
    with pytest.raises(ValueError, match="missing keys.*ln_f.bias"):
        io.load_model(tmp_path)


def test_save_model_replaces_files_atomically(tmp_path, monkeypatch):
    """A failed write leaves the previous files complete, and no temporary file behind."""
    first = GPT(TINY, seed=1)
    io.save_model(first, tmp_path)

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        io.save_model(GPT(TINY, seed=2), tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert_same_weights(first, io.load_model(tmp_path))


# --------------------------------------------------------------------------------------
# Optimizer state <-> files
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, kw", [(AdamW, {}), (SGD, {"momentum": 0.9})])
def test_optimizer_state_flattens_and_restores(cls, kw):
    model = GPT(TINY, seed=0)
    opt = trained_optimizer(model, cls=cls, **kw)
    tensors, meta = io.flatten_optimizer_state(opt.state_dict())
    assert all(isinstance(v, np.ndarray) for v in tensors.values())
    meta = json.loads(json.dumps(meta))          # it must survive JSON
    restored = io.unflatten_optimizer_state(tensors, meta)
    fresh = cls(model.parameters(), lr=0.5, **kw)
    fresh.load_state_dict(restored)
    assert fresh.hyperparameters() == opt.hyperparameters()
    assert set(fresh.state) == set(opt.state)
    for i in opt.state:
        for k, v in opt.state[i].items():
            assert np.array_equal(fresh.state[i][k], v)


def test_unflatten_optimizer_state_rejects_unknown_arrays():
    with pytest.raises(ValueError, match="state.9.m"):
        io.unflatten_optimizer_state({"state.9.m": np.zeros(2)}, {"state": {"0": {"step": 1}}})
    with pytest.raises(ValueError, match="no 'state'"):
        io.unflatten_optimizer_state({}, None)


# --------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------

def save(out_dir, step, seed=0, **kw):
    model = GPT(TINY, seed=seed)
    opt = trained_optimizer(model)
    path = io.save_checkpoint(out_dir, step, model, opt, {"note": f"step {step}"}, **kw)
    return path, model, opt


def test_checkpoint_round_trip(tmp_path):
    path, model, opt = save(tmp_path, 7)
    assert os.path.basename(path) == "step-00000007"
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "optimizer.safetensors",
                                        "trainer_state.json"]
    assert json.loads((tmp_path / "latest.json").read_text()) == {"checkpoint": "step-00000007", "step": 7}
    for where in (tmp_path, path):   # the run directory follows latest.json
        ckpt = io.load_checkpoint(where)
        assert ckpt.directory == path and ckpt.step == 7 and not ckpt.trainable_only
        assert ckpt.trainer_state["note"] == "step 7"
        assert set(ckpt.params) == set(model.state_dict())
        for name, a in model.state_dict().items():
            assert ckpt.params[name].tobytes() == np.asarray(a).tobytes()
        fresh = AdamW(model.parameters())
        fresh.load_state_dict(ckpt.optimizer_state)
        assert fresh.state[3]["step"] == opt.state[3]["step"]
        assert np.array_equal(fresh.state[3]["v"], opt.state[3]["v"])
    assert_same_weights(model, io.load_model(tmp_path))   # a full checkpoint is also a model


def test_checkpoints_keep_the_newest_and_clean_up(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 2, keep=2)
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("step-")) == ["step-00000001", "step-00000002"]
    os.makedirs(tmp_path / ".tmp-step-00000009-junk")       # left by a killed save
    save(tmp_path, 3, keep=1)
    assert sorted(os.listdir(tmp_path)) == ["latest.json", "step-00000003"]
    with pytest.raises(ValueError, match="already the latest"):
        save(tmp_path, 3)


def test_resaving_an_earlier_step_drops_the_abandoned_future(tmp_path):
    """Resume from step 2 after a run that got to 4: saving step 3 removes step 4."""
    save(tmp_path, 2, keep=5)
    save(tmp_path, 4, keep=5)
    io.write_json(tmp_path / "latest.json", {"checkpoint": "step-00000002", "step": 2})
    save(tmp_path, 3, keep=5)
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("step-")) == ["step-00000002", "step-00000003"]


def test_trainable_only_checkpoint(tmp_path):
    model = GPT(TINY, seed=0)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("blocks.0.attn")
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    path = io.save_checkpoint(tmp_path, 1, model, opt, {}, trainable_only=True,
                              config_extra={"lora": True, "base": "some/base"})
    assert "model.safetensors" not in os.listdir(path)
    ckpt = io.load_checkpoint(tmp_path)
    assert ckpt.trainable_only and ckpt.config["base"] == "some/base"
    assert sorted(ckpt.params) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="LoRA.*some/base.*load_adapter"):
        io.load_model(tmp_path)


def _count_calls(monkeypatch, module, name, fail_at):
    """Make ``module.name`` raise on its ``fail_at``-th call (1-based); return the counter."""
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(f"simulated crash in {name}")
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


# The writes of a save, in order: model.safetensors, optimizer.safetensors,
# trainer_state.json and config.json into a temporary folder (each through os.replace),
# the folder's os.rename to step-<n>, then latest.json (write_json 3, os.replace 5).
@pytest.mark.parametrize("target, fail_at", [
    ("write_safetensors", 1), ("write_safetensors", 2),
    ("write_json", 1), ("write_json", 2),
    ("replace", 1), ("replace", 2), ("replace", 3), ("replace", 4),
    ("rename", 1),
])
def test_an_interrupted_save_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch, target, fail_at):
    first, model1, opt1 = save(tmp_path, 1)
    module = io.os if target in ("replace", "rename") else io
    _count_calls(monkeypatch, module, target, fail_at)
    with pytest.raises(OSError, match="simulated crash"):
        save(tmp_path, 2, seed=5)
    monkeypatch.undo()
    # Nothing half-written is left, and the run still resumes from step 1.
    assert sorted(os.listdir(tmp_path)) == ["latest.json", "step-00000001"]
    ckpt = io.load_checkpoint(tmp_path)
    assert ckpt.step == 1 and ckpt.directory == first
    assert_same_weights(model1, io.load_model(tmp_path))
    # ... and the next save works.
    save(tmp_path, 2)
    assert io.load_checkpoint(tmp_path).step == 2


@pytest.mark.parametrize("target, fail_at", [("write_json", 3), ("replace", 5)])
def test_a_crash_between_rename_and_pointer_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                          target, fail_at):
    """The step folder is complete, but latest.json was never updated: step 1 stays the
    latest, and a later save of step 2 replaces the orphan."""
    save(tmp_path, 1)
    _count_calls(monkeypatch, io.os if target == "replace" else io, target, fail_at)
    with pytest.raises(OSError, match="simulated crash"):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["latest.json", "step-00000001", "step-00000002"]
    assert os.path.isdir(tmp_path / "step-00000002")
    assert io.load_checkpoint(tmp_path).step == 1
    save(tmp_path, 2)
    assert io.load_checkpoint(tmp_path).step == 2


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        io.load_checkpoint(tmp_path / "nowhere")
    io.save_model(GPT(TINY), tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="trainer_state.json.*not a training checkpoint"):
        io.load_checkpoint(tmp_path / "model")
    path, _, _ = save(tmp_path / "run", 1)
    (tmp_path / "run" / "latest.json").write_text("{not json")
    with pytest.raises(ValueError, match="latest.json"):
        io.load_checkpoint(tmp_path / "run")
    io.write_json(tmp_path / "run" / "latest.json", {"checkpoint": "step-00000099", "step": 99})
    with pytest.raises(FileNotFoundError, match="step-00000099"):
        io.load_checkpoint(tmp_path / "run")
    io.write_json(tmp_path / "run" / "latest.json", {"checkpoint": "../elsewhere", "step": 1})
    with pytest.raises(ValueError, match="step folder"):
        io.load_checkpoint(tmp_path / "run")
    io.write_json(tmp_path / "run" / "latest.json", {"checkpoint": "step-00000001", "step": 1})
    opt_file = Path(path, "optimizer.safetensors")
    opt_file.write_bytes(opt_file.read_bytes()[:opt_file.stat().st_size // 2])
    with pytest.raises(ValueError, match="optimizer.safetensors"):
        io.load_checkpoint(tmp_path / "run")
