"""The device rules, checked on every run, GPU or not.

minilora has one code path for NumPy and CuPy; a NumPy run cannot show that the path
never lets a host array meet a device array, which is the first thing that breaks on a
GPU. tests/fake_cupy.py stands in for CuPy with NumPy's math and CuPy's refusals. Here
it is first shown to refuse what CuPy refuses -- a stand-in that allowed everything
would prove nothing -- and then the main paths of the package run on "cuda" and must
give the CPU's numbers bit for bit (the same NumPy math; only where arrays live, and
which branches the code takes for a GPU array, differ).

``python -m pytest --backend fake-cupy`` runs the whole suite this way.
"""
import copy
import json

import numpy as np
import pytest

import fake_cupy
import minilora as ml
from minilora import backend
from minilora.cli import main
from minilora.train import TrainConfig, text_batches, text_eval_batches, train

CONFIG = ml.GPTConfig(vocab_size=48, block_size=16, n_layer=2, n_head=2, n_embd=16)
_rng = np.random.default_rng(0)
TOKENS = (np.arange(3000) * 5 % 48 + (_rng.random(3000) < 0.1) * _rng.integers(0, 48, 3000)) % 48


@pytest.fixture
def fake_gpu():
    """fake_cupy in CuPy's place for one test (left in place if the session put it there)."""
    already = backend._cupy is fake_cupy.cupy
    if not already:
        fake_cupy.install()
    try:
        yield fake_cupy.cupy
    finally:
        if not already:
            fake_cupy.uninstall()


def test_the_stand_in_refuses_what_cupy_refuses(fake_gpu):
    cp = fake_gpu
    device = cp.asarray(np.arange(6.0).reshape(2, 3))
    host = np.ones((2, 3))
    mixes = [lambda: np.asarray(device), lambda: device + host, lambda: host + device,
             lambda: device * host, lambda: host @ device.T, lambda: cp.multiply(device, host),
             lambda: np.exp(host, out=device), lambda: cp.concatenate([device, host]),
             lambda: np.testing.assert_allclose(device, host), lambda: device + [1.0, 2.0, 3.0],
             lambda: cp.maximum(device, [0.0]), lambda: cp.broadcast_to(0.5, (2, 3))]
    for mix in mixes:
        with pytest.raises(TypeError):
            mix()
    assert not isinstance(device, np.ndarray)
    assert backend.get_array_module(device) is cp and backend.get_array_module(host) is np
    # what CuPy allows: scalars, NumPy scalars, explicit transfers
    total = (device * 2.0 + np.float64(1.0)).sum()
    assert isinstance(total, cp.ndarray) and total.shape == () and float(total) == 36.0
    out = cp.empty((2, 3))
    assert cp.add(device, device, out=out) is out and device.reshape(6).base is device
    np.testing.assert_array_equal(backend.to_numpy(out), 2 * np.arange(6.0).reshape(2, 3))
    assert backend.cuda_available() and backend.device_of(device) == "cuda"
    generator = cp.random.default_rng(0)
    assert isinstance(generator.random(3), cp.ndarray) and not hasattr(generator, "choice")
    with pytest.raises(TypeError):
        copy.deepcopy(generator)


def _trained(device, lora: bool):
    """A tiny model trained a few steps on ``device`` (full, or then LoRA on top)."""
    model = ml.GPT(CONFIG, seed=3).to(device)
    config = TrainConfig(max_steps=4, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_interval=2,
                         eval_batches=2, progress=False, seed=5)
    result = train(model, text_batches(TOKENS[:2700], 4, 16), text_eval_batches(TOKENS[2700:], 4, 16), config)
    if lora:
        ml.add_lora(model, ml.LoraConfig(r=4, alpha=8.0, dropout=0.1), seed=1)
        result = train(model, text_batches(TOKENS[:2700], 4, 16), text_eval_batches(TOKENS[2700:], 4, 16), config)
    return model, [(r.step, r.loss) for r in result.train_history], [tuple(r) for r in result.val_history]


def _state(model):
    return {name: backend.to_numpy(p.data) for name, p in model.named_parameters()}


def test_full_training_on_the_device_equals_the_cpu(fake_gpu, monkeypatch):
    cpu, cpu_losses, cpu_val = _trained("cpu", lora=False)
    waits = []
    monkeypatch.setattr(fake_cupy._Device, "synchronize", lambda self: waits.append(1))
    gpu, gpu_losses, gpu_val = _trained("cuda", lora=False)
    assert len(waits) == len(gpu_losses) == 4   # the loop waits for the GPU before it reads a step's time
    assert gpu.device == "cuda"
    assert gpu_losses == cpu_losses and gpu_val == cpu_val
    for name, value in _state(cpu).items():
        np.testing.assert_array_equal(_state(gpu)[name], value, err_msg=name)


def test_lora_training_merge_and_generation_on_the_device(fake_gpu, tmp_path):
    """LoRA training with dropout, then everything that follows a fine-tune: merged =
    unmerged, unmerge restores the weights, the saved adapter round-trips, greedy
    generation with and without the KV cache -- all equal to the CPU's. (The stand-in's
    device generator is NumPy's with the same seed, so even the dropout masks match; on
    a real GPU they differ.)"""
    gpu, losses, val = _trained("cuda", lora=True)
    cpu, cpu_losses, cpu_val = _trained("cpu", lora=True)
    assert losses == cpu_losses and val == cpu_val
    for name, value in _state(cpu).items():
        np.testing.assert_array_equal(_state(gpu)[name], value, err_msg=name)
    idx = TOKENS[:32].reshape(2, 16)
    with ml.no_grad():
        gpu.eval(), cpu.eval()
        unmerged = backend.to_numpy(gpu.forward(backend.to_device(idx, "cuda")))
        np.testing.assert_array_equal(unmerged, cpu.forward(idx))
        before_merge = _state(gpu)
        ml.merge_lora(gpu)
        merged = backend.to_numpy(gpu.forward(backend.to_device(idx, "cuda")))
        np.testing.assert_allclose(merged, unmerged, atol=1e-5)
        ml.unmerge_lora(gpu)
        for name, value in before_merge.items():
            np.testing.assert_allclose(_state(gpu)[name], value, rtol=0, atol=1e-6, err_msg=name)
    ml.save_adapter(gpu, str(tmp_path / "adapter"))
    reloaded = ml.GPT(CONFIG, seed=3).to("cuda")
    gpu_base = {n: p for n, p in _state(gpu).items() if "lora_" not in n}
    reloaded.load_state_dict(gpu_base)
    ml.load_adapter(reloaded, str(tmp_path / "adapter"))
    for name, value in _state(gpu).items():
        np.testing.assert_array_equal(_state(reloaded)[name], value, err_msg=name)
    prompt = TOKENS[:5].reshape(1, 5)
    for use_cache in (True, False):
        tokens = gpu.generate(prompt, 20, temperature=0.0, use_cache=use_cache)
        np.testing.assert_array_equal(tokens, cpu.generate(prompt, 20, temperature=0.0, use_cache=use_cache))


def test_demo_on_the_device_gives_the_cpus_numbers(fake_gpu, tmp_path, capsys):
    """``minilora demo --quick --device cuda``, the README's main job, end to end: the
    same losses, merge check and byte counts as on the CPU."""
    results = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert main(["demo", "--quick", "--quiet", "--device", device, "--out", str(out)]) == 0, capsys.readouterr()
        results[device] = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    measured_or_named = {"device", "seconds", "full_step_seconds", "lora_step_seconds", "lora_over_full_step"}
    assert measured_or_named < set(results["cpu"]) and results["cuda"]["device"] == "cuda"
    for key, value in results["cpu"].items():
        if key not in measured_or_named:
            assert results["cuda"][key] == value, key


def test_ops_take_host_ids_and_scalar_gradients_on_the_device(fake_gpu):
    """What CuPy refuses and NumPy allows, where an op's caller may do it: token ids
    still on the host with a table on the device; a scalar upstream gradient."""
    cp = fake_gpu
    rng = np.random.default_rng(0)
    table = rng.standard_normal((5, 3))
    idx = np.array([[0, 4, 4], [2, 0, 1]])
    y, cache = ml.ops.embedding_forward(idx, cp.asarray(table))
    np.testing.assert_array_equal(backend.to_numpy(y), table[idx])
    dtable = ml.ops.embedding_backward(cp.ones(y.shape), cache)
    np.testing.assert_array_equal(backend.to_numpy(dtable)[4], [2.0, 2.0, 2.0])
    x = cp.asarray(rng.standard_normal((2, 4)))
    _, gelu_cache = ml.ops.gelu_forward(x)
    _, ln_cache = ml.ops.layernorm_forward(x, cp.ones(4), cp.zeros(4))
    for dx, dx_from_array in [(ml.ops.gelu_backward(0.5, gelu_cache),
                               ml.ops.gelu_backward(cp.full(x.shape, 0.5), gelu_cache)),
                              (ml.ops.layernorm_backward(0.5, ln_cache)[0],
                               ml.ops.layernorm_backward(cp.full(x.shape, 0.5), ln_cache)[0])]:
        assert backend.device_of(dx) == "cuda"
        np.testing.assert_array_equal(backend.to_numpy(dx), backend.to_numpy(dx_from_array))
    for backward, cache in ((ml.ops.gelu_backward, gelu_cache), (ml.ops.layernorm_backward, ln_cache)):
        with pytest.raises(TypeError):     # a host *array* is still refused: only scalars convert
            backward(np.full((2, 4), 0.5), cache)


def test_bench_gpu_part_on_the_device(fake_gpu, bench):
    """The benchmark's GPU measurements -- what the owed GPU run will execute -- on a
    micro model, without PyTorch (a CPU build has no CUDA side): every one validated."""
    args = bench.parse_args(["--configs", "micro=64/16/1/2/32/2", "--gpu-configs", "micro=64/16/1/2/32/2",
                             "--no-torch", "--threads", "1", "--rounds", "1", "--warmup", "0",
                             "--min-block-s", "0.001", "--gen-model", "micro=64/16/1/2/32/1",
                             "--gen-new-tokens", "8"])
    assert bench.peak_matmul("cuda", 64, repeats=1)["validated"]
    (micro,) = args.gpu_config_list
    training = [bench.bench_training(micro, mode, args, "cuda", None) for mode in ("full", "lora")]
    assert all(r["validated"] and r["device"] == "cuda" for r in training), training
    inference = bench.bench_inference(micro, args, "cuda")
    assert all(v["validated"] for v in inference["variants"].values()), inference
    generation = bench.bench_generation(args, "cuda")
    assert generation["validated"] and generation["device"] == "cuda", generation
    comparison = bench.lora_vs_full(training, [], "cuda", args)
    assert "refused" not in comparison and comparison["paired"]["step_time_ratio"] > 0, comparison


def test_bench_float64_copy_of_a_device_model(fake_gpu, bench):
    """The benchmark's float64 reference copy of a model on the GPU (its fallback check
    without PyTorch): device generators cannot be deep-copied, so it leaves them out."""
    model = ml.GPT(ml.GPTConfig(vocab_size=48, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.1),
                   seed=0).to("cuda")
    with pytest.raises(TypeError):          # what the stand-in (and CuPy) refuse
        copy.deepcopy(model)
    m64 = bench.float64_copy(model)
    assert m64.device == "cpu" and all(p.data.dtype == np.float64 for p in m64.parameters())
    assert model.device == "cuda"
    for (name, p), (_, p64) in zip(model.named_parameters(), m64.named_parameters()):
        np.testing.assert_array_equal(backend.to_numpy(p.data).astype(np.float64), p64.data, err_msg=name)
