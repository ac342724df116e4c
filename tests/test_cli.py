"""End-to-end tests of the ``minilora`` command at tiny sizes: every subcommand, the
demo's honesty, and one-line errors (never a traceback) for bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import minilora as ml
from minilora import io
from minilora.cli import main

TINY_MODEL = ["--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--batch-size", "4",
              "--eval-interval", "5", "--quiet"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def base(workdir):
    """A tiny base model trained by ``minilora train`` on a text file."""
    text = workdir / "text.txt"
    text.write_text(ml.data.load_builtin("stories", size=6000), encoding="utf-8")
    out = workdir / "base"
    assert main(["train", "--data", str(text), "--out", str(out), "--vocab-size", "300", "--steps", "10",
                 *TINY_MODEL]) == 0
    return out


def test_demo_quick_is_honest(tmp_path, capsys):
    code, out, err = run(capsys, "demo", "--quick", "--quiet", "--out", str(tmp_path / "demo"))
    assert code == 0, err
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["adapted_val_loss_recipes"] < results["base_val_loss_recipes"]
    assert results["merge_max_abs_logit_diff"] < 1e-4          # float32 merge: same outputs
    assert abs(results["merged_val_loss_recipes"] - results["adapted_val_loss_recipes"]) < 1e-4
    assert results["adapter_bytes"] < results["checkpoint_bytes"] / 4
    assert results["lora_grad_plus_optimizer_bytes"] < results["full_grad_plus_optimizer_bytes"] / 4
    assert results["lora_over_full_step"] > 0 and f"{results['lora_over_full_step']:.2f}x, paired" in out
    for name in ("loss_curves.png", "samples.txt", "tokenizer.json", "adapter/adapter_config.json",
                 "base/model.safetensors"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert "trainable parameters" in out and "max |logit difference|" in out
    # the printed table holds the measured numbers
    assert f"{results['adapted_val_loss_recipes']:.3f}" in out


def test_train_writes_a_loadable_model(base, capsys):
    model = io.load_model(str(base))
    assert model.config.n_embd == 16 and (base / "tokenizer.json").is_file()
    assert io.latest_checkpoint(str(base / "checkpoints")) is not None
    code, out, _ = run(capsys, "info", str(base))
    assert code == 0 and "parameters:" in out and "'n_embd': 16" in out


def test_finetune_merge_generate_info(base, workdir, capsys):
    text = workdir / "recipes.txt"
    text.write_text(ml.data.load_builtin("stories", size=3000, seed=5), encoding="utf-8")
    adapter = workdir / "adapter"
    code, out, err = run(capsys, "finetune", "--base", str(base), "--data", str(text), "--out", str(adapter),
                         "--r", "2", "--alpha", "4", "--targets", "q_proj,v_proj", "--steps", "6",
                         "--batch-size", "4", "--eval-interval", "3", "--quiet")
    assert code == 0, err
    assert (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["target_modules"] == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == os.path.abspath(base)

    code, out, _ = run(capsys, "info", str(adapter))
    assert code == 0 and "r=2" in out and "LoRA adapter" in out

    merged = workdir / "merged"
    code, out, err = run(capsys, "merge", "--adapter", str(adapter), "--out", str(merged))
    assert code == 0, err
    plain = io.load_model(str(merged))
    assert not ml.is_lora_model(plain)

    # the merged model and base + adapter generate the same greedy text
    code, from_adapter, err = run(capsys, "generate", "--adapter", str(adapter), "--prompt", "Once",
                                  "--max-new-tokens", "12", "--temperature", "0")
    assert code == 0, err
    code, from_merged, err = run(capsys, "generate", "--model", str(merged), "--prompt", "Once",
                                 "--max-new-tokens", "12", "--temperature", "0")
    assert code == 0, err
    assert from_adapter == from_merged and from_adapter.startswith("Once")


def test_finetune_on_jsonl_examples(base, workdir, capsys):
    data = workdir / "pairs.jsonl"
    lines = [json.dumps({"prompt": f"Tim has {i} hats. ", "response": f"Tim is happy."}) for i in range(40)]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, err = run(capsys, "finetune", "--base", str(base), "--data", str(data),
                         "--out", str(workdir / "adapter_jsonl"), "--r", "2", "--steps", "4",
                         "--batch-size", "4", "--eval-interval", "2", "--quiet")
    assert code == 0, err


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "/no/such/file.txt", "--out", "x"], "no such data file"),
    (["train", "--data", "builtin:nothing", "--out", "x"], "unknown built-in data set"),
    (["info", "/no/such/dir"], "no such file or directory"),
    (["generate", "--prompt", "hi"], "needs --model DIR or --adapter DIR"),
])
def test_errors_are_one_line(argv, message, capsys):
    code, out, err = run(capsys, *argv)
    assert code != 0 and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(ml.cuda_available(), reason="checks the error on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_clear_error(capsys):
    code, _, err = run(capsys, "demo", "--quick", "--device", "cuda")
    assert code != 0 and "CuPy" in err and len(err.strip().splitlines()) == 1


def test_train_resume_continues_with_the_runs_own_tokenizer(workdir, capsys):
    text = workdir / "resume.txt"
    text.write_text(ml.data.load_builtin("stories", size=6000, seed=3), encoding="utf-8")
    out = workdir / "resumed"
    argv = ["train", "--data", str(text), "--out", str(out), "--vocab-size", "300", *TINY_MODEL]
    assert main(argv + ["--steps", "5"]) == 0
    tokenizer_before = (out / "tokenizer.json").read_bytes()
    capsys.readouterr()
    assert main(argv + ["--steps", "5"]) != 0                   # refuses to overwrite a run
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main(argv + ["--steps", "10", "--resume"]) == 0
    assert (out / "tokenizer.json").read_bytes() == tokenizer_before
    assert io.load_checkpoint(io.latest_checkpoint(str(out / "checkpoints"))).step == 10


def test_malformed_jsonl_reports_its_line(base, workdir, capsys):
    data = workdir / "bad.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n', encoding="utf-8")
    code, _, err = run(capsys, "finetune", "--base", str(base), "--data", str(data), "--out",
                       str(workdir / "never"), "--quiet")
    assert code != 0 and "line 2" in err and len(err.strip().splitlines()) == 1


def test_adapter_for_another_base_is_a_clear_error(base, workdir, capsys):
    other = ml.GPT(ml.GPTConfig(vocab_size=io.load_model(str(base)).config.vocab_size, block_size=16,
                                n_layer=1, n_head=2, n_embd=16), seed=99)
    other_dir = workdir / "other_base"
    io.save_model(other, str(other_dir))
    (other_dir / "tokenizer.json").write_bytes((base / "tokenizer.json").read_bytes())
    adapter = workdir / "adapter"
    if not adapter.is_dir():
        pytest.skip("needs the adapter made by test_finetune_merge_generate_info")
    code, _, err = run(capsys, "merge", "--adapter", str(adapter), "--base", str(other_dir),
                       "--out", str(workdir / "never2"))
    assert code != 0 and "different base model" in err and "Traceback" not in err


def test_corrupt_checkpoint_is_a_clear_error(base, workdir, capsys):
    broken = workdir / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((base / "config.json").read_text())
    data = (base / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    code, _, err = run(capsys, "generate", "--model", str(broken), "--prompt", "a")
    assert code != 0 and "corrupt or truncated" in err


def test_python_dash_m_and_help():
    for argv in (["--help"], ["demo", "--help"], ["finetune", "--help"]):
        done = subprocess.run([sys.executable, "-m", "minilora", *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "usage:" in done.stdout
