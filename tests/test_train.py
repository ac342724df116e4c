"""Tests for minilora.train: the loop learns, evaluation weighs tokens, resume is
bit-identical (dropout and the lr schedule included), a diverged run stops with the
last good checkpoint intact, and LoRA runs save only what they train."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from minilora import data, io
from minilora.gpt import GPT, GPTConfig, cross_entropy
from minilora.nn import is_grad_enabled
from minilora.optim import warmup_cosine_lr
from minilora.tokenizer import CharTokenizer
from minilora.train import (StepInfo, TrainConfig, TrainingDiverged, evaluate,
                            example_batches, example_eval_batches, rng_states, set_rng_states,
                            text_batches, text_eval_batches, train)

TINY = GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16)
DROPOUT = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.2)

# A token stream with structure to learn: a noisy repeating pattern.
_rng = np.random.default_rng(0)
STREAM = (np.arange(4000) * 7 % 32 + (_rng.random(4000) < 0.1) * _rng.integers(0, 32, 4000)) % 32
TRAIN_TOKENS, VAL_TOKENS = STREAM[:3600], STREAM[3600:]


def quiet(**kw) -> TrainConfig:
    base = dict(max_steps=8, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=3, eval_interval=3,
                eval_batches=2, progress=False, seed=11)
    base.update(kw)
    return TrainConfig(**base)


def batches(block=16):
    return text_batches(TRAIN_TOKENS, 4, block), text_eval_batches(VAL_TOKENS, 8, block)


def assert_bitwise_equal_models(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert np.asarray(sa[name]).tobytes() == np.asarray(sb[name]).tobytes(), f"{name} differs"


def without_speed(history):
    """History records minus the (timing-dependent) tokens/s."""
    return [(r.step, r.loss, r.lr) for r in history]


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [dict(max_steps=0), dict(batch_size=0), dict(lr=-1.0),
                                 dict(min_lr=1.0, lr=0.1), dict(warmup_steps=20, max_steps=10),
                                 dict(grad_clip=0.0), dict(eval_batches=0), dict(betas=(0.9, 1.0)),
                                 dict(eps=0.0), dict(keep_checkpoints=0), dict(max_steps=2.5),
                                 dict(lr=float("nan"))])
def test_train_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_train_config_round_trips_through_json():
    config = quiet(grad_clip=None, betas=(0.8, 0.9))
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown fields"):
        TrainConfig.from_dict({"colour": 1})


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------

def test_evaluate_weights_batches_by_counted_tokens():
    """Two batches with 3 and 9 counted targets: the result is the mean over all 12
    tokens, not the mean of the two batch means."""
    model = GPT(TINY, seed=1)
    rng = np.random.default_rng(2)
    x1, y1 = rng.integers(0, 32, (1, 6)), rng.integers(0, 32, (1, 6))
    y1[0, :3] = -100                                  # 3 counted
    x2, y2 = rng.integers(0, 32, (2, 5)), rng.integers(0, 32, (2, 5))
    y2[1, 4] = -100                                   # 9 counted
    x3, y3 = rng.integers(0, 32, (1, 4)), np.full((1, 4), -100)   # nothing counts: skipped

    def per_token_losses(x, y):
        model.eval()
        logits = model.forward(x)
        out = [cross_entropy(logits[b:b + 1, t:t + 1], y[b:b + 1, t:t + 1])[0]
               for b in range(y.shape[0]) for t in range(y.shape[1]) if y[b, t] != -100]
        model.train()
        return out
    losses = per_token_losses(x1, y1) + per_token_losses(x2, y2)
    assert len(losses) == 12
    got = evaluate(model, [(x1, y1), (x2, y2), (x3, y3)])
    assert got == pytest.approx(np.mean(losses), rel=1e-6)
    mean_of_means = (np.mean(losses[:3]) + np.mean(losses[3:])) / 2
    assert abs(got - mean_of_means) > 1e-4            # the weighting matters here
    assert evaluate(model, [(x1, y1), (x2, y2)], max_batches=1) == pytest.approx(np.mean(losses[:3]), rel=1e-6)
    with pytest.raises(ValueError, match="no target"):
        evaluate(model, [(x3, y3)])


def test_evaluate_runs_in_eval_mode_without_grad_and_restores_the_mode():
    model = GPT(DROPOUT, seed=0)
    x, y = next(iter(text_eval_batches(VAL_TOKENS, 4, 16)()))
    seen = []
    real_forward = model.forward
    model.forward = lambda idx: (seen.append((model.training, is_grad_enabled())), real_forward(idx))[1]
    a = evaluate(model, [(x, y)])
    assert seen == [(False, False)] and model.training
    assert evaluate(model, [(x, y)]) == a              # no dropout: deterministic
    model.eval()
    evaluate(model, [(x, y)])
    assert not model.training                         # the mode it had is restored


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------

def test_training_lowers_validation_loss_on_stories():
    text = data.load_builtin("stories", size=20000)
    tok = CharTokenizer.train([text])
    ids = data.encode_corpus(tok, text)
    train_ids, val_ids = data.split_text(ids, 0.1)
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32)
    model = GPT(config, seed=0)
    val = text_eval_batches(val_ids, 16, 32)
    before = evaluate(model, val())
    result = train(model, text_batches(train_ids, 16, 32), val,
                   TrainConfig(max_steps=120, batch_size=16, lr=2e-2, min_lr=2e-3, warmup_steps=10,
                               eval_interval=40, eval_batches=None, progress=False))
    assert before == pytest.approx(math.log(tok.vocab_size), rel=0.05)   # untrained: ~uniform
    assert [r.step for r in result.val_history] == [40, 80, 120]
    assert result.final_val_loss < before - 1.0
    # better than the best prediction without context (character frequencies, ~3.08 nats):
    # the model has learned to use what came before
    freq = np.bincount(train_ids, minlength=tok.vocab_size) + 1.0
    unigram = -np.log(freq / freq.sum())[val_ids].mean()
    assert result.final_val_loss < unigram - 0.15
    assert result.val_history[-1].loss < result.val_history[0].loss
    assert result.final_val_loss == pytest.approx(evaluate(model, val()), rel=1e-6)


def test_history_schedule_and_progress_bar(capsys):
    model = GPT(TINY, seed=0)
    tr, va = batches()
    infos = []
    result = train(model, tr, va, quiet(progress=True), on_step=infos.append)
    assert result.step == 8 and result.checkpoint is None and result.elapsed > 0
    assert [r.step for r in result.train_history] == list(range(1, 9))
    assert [r.step for r in result.val_history] == [3, 6, 8]            # every 3, and at the end
    # warm-up 1e-2 * (1, 2, 3) / 3, then a cosine from 1e-2 (step 4) towards 1e-3
    lrs = [r.lr for r in result.train_history]
    assert lrs[:4] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2])
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] > 1e-3
    assert all(r.tokens_per_s > 0 and math.isfinite(r.loss) for r in result.train_history)
    assert all(isinstance(i, StepInfo) for i in infos) and len(infos) == 8
    assert [i.val_loss is not None for i in infos] == [s in (3, 6, 8) for s in range(1, 9)]
    assert "tok/s" in capsys.readouterr().err


def test_a_batch_of_the_wrong_size_is_an_error():
    with pytest.raises(ValueError, match="batch_size is 5"):
        train(GPT(TINY), batches()[0], None, quiet(batch_size=5))


def test_nothing_to_train_is_an_error():
    model = GPT(TINY)
    for p in model.parameters():
        p.requires_grad = False
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, batches()[0], None, quiet())


def test_on_step_can_stop_the_run(tmp_path):
    result = train(GPT(TINY), *batches(), quiet(), out_dir=tmp_path, on_step=lambda info: info.step == 4)
    assert result.step == 4 and io.load_checkpoint(tmp_path).step == 4
    assert result.checkpoint == io.latest_checkpoint(tmp_path)


def test_example_batches_train_only_on_responses():
    examples = data.load_builtin("addition", size=60)
    tok = CharTokenizer.train([e["prompt"] + e["response"] for e in examples])
    encoded = data.encode_examples(tok, examples, block_size=16)
    x, y = example_batches(encoded, 4, tok.eot_id)(np.random.default_rng(0))
    assert x.shape[0] == 4 and (y == -100).any() and (y != -100).any()
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    result = train(model, example_batches(encoded, 4, tok.eot_id), example_eval_batches(encoded[:8], 4, tok.eot_id),
                   quiet(max_steps=4, eval_interval=2))
    assert [r.step for r in result.val_history] == [2, 4]


# --------------------------------------------------------------------------------------
# Resume: bit-identical
# --------------------------------------------------------------------------------------

class Crash(Exception):
    pass


@pytest.mark.parametrize("how", ["stop", "crash"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, how):
    """n = 8 steps with dropout 0.2, warm-up 3 then cosine; interrupted after step 4
    (stopped cleanly, or crashed after the checkpoint at 4 and before step 6 ended)."""
    config = quiet(checkpoint_interval=4 if how == "crash" else 0)
    tr, va = batches()
    full_model = GPT(DROPOUT, seed=0)
    full = train(full_model, tr, va, config)

    first = GPT(DROPOUT, seed=0)
    if how == "stop":
        train(first, tr, va, config, out_dir=tmp_path, on_step=lambda info: info.step == 4)
    else:
        def crash(info):
            if info.step == 5:
                raise Crash()
        with pytest.raises(Crash):
            train(first, tr, va, config, out_dir=tmp_path, on_step=crash)
    assert io.load_checkpoint(tmp_path).step == 4

    resumed_model = GPT(DROPOUT, seed=0)          # a new object: nothing carried over in memory
    resumed = train(resumed_model, tr, va, config, out_dir=tmp_path, resume=True)
    assert resumed.step == 8
    assert without_speed(resumed.train_history) == without_speed(full.train_history)
    assert resumed.val_history == full.val_history
    assert_bitwise_equal_models(resumed_model, full_model)
    # ... and the dropout generators end in the same state.
    assert rng_states(resumed_model) == rng_states(full_model)
    assert io.load_checkpoint(tmp_path).step == 8


def test_resume_without_checkpoint_or_onto_an_existing_one(tmp_path):
    tr, va = batches()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        train(GPT(TINY), tr, va, quiet(), out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="out_dir"):
        train(GPT(TINY), tr, va, quiet(), resume=True)
    train(GPT(TINY), tr, va, quiet(max_steps=2, warmup_steps=1), out_dir=tmp_path)
    with pytest.raises(FileExistsError, match="resume=True"):
        train(GPT(TINY), tr, va, quiet(max_steps=2, warmup_steps=1), out_dir=tmp_path)
    # resuming a finished run does nothing and returns its history
    done = train(GPT(TINY), tr, va, quiet(max_steps=2, warmup_steps=1), out_dir=tmp_path, resume=True)
    assert done.step == 2 and [r.step for r in done.train_history] == [1, 2]
    # more steps continue it
    more = train(GPT(TINY), tr, va, quiet(max_steps=3, warmup_steps=1), out_dir=tmp_path, resume=True)
    assert more.step == 3 and io.load_checkpoint(tmp_path).step == 3


def test_resume_into_another_model_is_refused(tmp_path):
    tr, va = batches()
    train(GPT(TINY), tr, va, quiet(max_steps=2, warmup_steps=1), out_dir=tmp_path)
    other = GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=32)
    with pytest.raises(ValueError, match="another model"):
        train(GPT(other), tr, va, quiet(max_steps=3, warmup_steps=1), out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="another model.*dtype"):
        train(GPT(TINY, dtype="float64"), tr, va, quiet(max_steps=3, warmup_steps=1), out_dir=tmp_path, resume=True)
    frozen = GPT(TINY)
    frozen.ln_f.bias.requires_grad = False
    with pytest.raises(ValueError, match="trainable parameters differ.*ln_f.bias"):
        train(frozen, tr, va, quiet(max_steps=3, warmup_steps=1), out_dir=tmp_path, resume=True)


def test_rng_states_round_trip_through_json():
    model = GPT(DROPOUT, seed=0)
    states, unsaved = rng_states(model)
    assert unsaved == [] and "embedding_dropout.rng" in states and "blocks.1.attn.attn_dropout_rng" in states
    saved = json.loads(json.dumps(states))
    first = model.embedding_dropout.rng.random(3)
    set_rng_states(model, saved)
    assert np.array_equal(model.embedding_dropout.rng.random(3), first)
    with pytest.raises(ValueError, match="random generators differ"):
        set_rng_states(GPT(TINY), saved)


class FakeDeviceGenerator:
    """Stands in for a CuPy generator: it has a ``bit_generator`` whose state cannot be
    read as NumPy's can."""
    bit_generator = None

    def __init__(self, seed):
        self._inner = np.random.default_rng(seed)

    def random(self, shape, dtype):
        return self._inner.random(shape, dtype=dtype)


def test_generators_that_cannot_be_saved_are_listed_and_resume_warns(tmp_path):
    def model_with_device_generator():
        model = GPT(DROPOUT, seed=0)
        model.embedding_dropout.rng = FakeDeviceGenerator(0)
        return model
    states, unsaved = rng_states(model_with_device_generator())
    assert unsaved == ["embedding_dropout.rng"] and "embedding_dropout.rng" not in states
    assert set_rng_states(model_with_device_generator(), states, unsaved) == ["embedding_dropout.rng"]
    tr, va = batches()
    train(model_with_device_generator(), tr, va, quiet(max_steps=2, warmup_steps=1), out_dir=tmp_path)
    with pytest.warns(UserWarning, match="not bit-identical"):
        train(model_with_device_generator(), tr, va, quiet(max_steps=3, warmup_steps=1),
              out_dir=tmp_path, resume=True)


def test_resume_with_other_hyperparameters_warns_and_uses_them(tmp_path):
    tr, va = batches()
    train(GPT(TINY), tr, va, quiet(max_steps=2, warmup_steps=1), out_dir=tmp_path)
    with pytest.warns(UserWarning, match="other lr, min_lr, weight_decay than the checkpoint's"):
        result = train(GPT(TINY), tr, va, quiet(max_steps=3, warmup_steps=1, lr=5e-3, min_lr=5e-4,
                                                 weight_decay=0.0),
                       out_dir=tmp_path, resume=True)
    assert result.train_history[-1].lr == warmup_cosine_lr(2, max_lr=5e-3, min_lr=5e-4, warmup_steps=1,
                                                           total_steps=3)   # the new schedule
    state = json.loads(Path(result.checkpoint, "trainer_state.json").read_text())
    assert state["optimizer"]["weight_decay"] == 0.0                          # the new decay


def test_a_malformed_trainer_state_is_a_clear_error(tmp_path):
    tr, va = batches()
    path = train(GPT(TINY), tr, va, quiet(max_steps=2, warmup_steps=1), out_dir=tmp_path).checkpoint
    state_path = os.path.join(path, "trainer_state.json")
    state = json.loads(Path(state_path).read_text())
    del state["history"]
    io.write_json(state_path, state)
    with pytest.raises(ValueError, match="trainer_state.json is incomplete"):
        train(GPT(TINY), tr, va, quiet(max_steps=3, warmup_steps=1), out_dir=tmp_path, resume=True)


# --------------------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("interval, last_good", [(1, 3), (2, 2)])
def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, interval, last_good):
    """A weight turns nan after step 3, so the loss of step 4 is nan."""
    model = GPT(TINY, seed=0)
    tr, va = batches()

    def poison(info):
        if info.step == 3:
            model.blocks[0].mlp.up_proj.weight.data[0, 0] = np.nan
    with pytest.raises(TrainingDiverged) as e:
        train(model, tr, va, quiet(checkpoint_interval=interval), out_dir=tmp_path, on_step=poison)
    err = e.value
    assert isinstance(err, RuntimeError)
    assert err.step == 4 and math.isnan(err.value) and err.checkpoint_step == last_good
    message = str(err)
    assert "step 4" in message and "loss is nan" in message
    assert f"{err.checkpoint} (step {last_good})" in message
    ckpt = io.load_checkpoint(tmp_path)
    assert ckpt.step == last_good and ckpt.directory == err.checkpoint
    assert all(np.isfinite(a).all() for a in ckpt.params.values())
    assert [r[0] for r in ckpt.trainer_state["history"]["train"]] == list(range(1, last_good + 1))
    # the run resumes from the last good checkpoint
    assert train(GPT(TINY), tr, va, quiet(), out_dir=tmp_path, resume=True).step == 8


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_nan_in_the_embedding_without_out_dir():
    model = GPT(TINY, seed=0)
    model.token_embedding.weight.data[:] = np.inf
    with pytest.raises(TrainingDiverged, match="step 1.*out_dir=None"):
        train(model, batches()[0], None, quiet(grad_clip=None))


# --------------------------------------------------------------------------------------
# LoRA runs
# --------------------------------------------------------------------------------------

lora = pytest.importorskip("minilora.lora", reason="minilora.lora is not written yet")


def lora_model(base_seed=0, dropout=0.1):
    from minilora.lora import LoraConfig, add_lora
    model = GPT(DROPOUT, seed=base_seed)
    add_lora(model, LoraConfig(r=2, alpha=4.0, dropout=dropout, target_modules=("q_proj", "v_proj")), seed=3)
    return model


def test_lora_checkpoint_holds_only_trainable_parameters(tmp_path):
    from minilora.adapters import load_adapter
    model = lora_model()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".lora_" in n for n in trainable)
    train(model, *batches(), quiet(max_steps=3, warmup_steps=1), out_dir=tmp_path, base_reference="bases/tiny")
    ckpt = io.load_checkpoint(tmp_path)
    assert ckpt.trainable_only and sorted(ckpt.params) == trainable
    assert "model.safetensors" not in os.listdir(ckpt.directory)
    assert ckpt.config["base"] == "bases/tiny" and ckpt.trainer_state["lora"]
    with pytest.raises(ValueError, match="LoRA"):
        io.load_model(tmp_path)
    # the checkpoint folder is also an adapter folder
    fresh = GPT(DROPOUT, seed=0)
    load_adapter(fresh, ckpt.directory)
    model.eval(), fresh.eval()
    idx = np.random.default_rng(0).integers(0, 32, (2, 8))
    assert np.array_equal(model.forward(idx), fresh.forward(idx))


def test_lora_resume_is_bit_identical(tmp_path):
    tr, va = batches()
    config = quiet()
    full_model = lora_model()
    full = train(full_model, tr, va, config)
    train(lora_model(), tr, va, config, out_dir=tmp_path, on_step=lambda info: info.step == 5)
    resumed_model = lora_model()
    resumed = train(resumed_model, tr, va, config, out_dir=tmp_path, resume=True)
    assert without_speed(resumed.train_history) == without_speed(full.train_history)
    assert resumed.val_history == full.val_history
    assert_bitwise_equal_models(resumed_model, full_model)


def test_lora_resume_checks_the_base(tmp_path):
    tr, va = batches()
    train(lora_model(), tr, va, quiet(max_steps=2, warmup_steps=1), out_dir=tmp_path)
    with pytest.raises(ValueError, match="other base weights"):
        train(lora_model(base_seed=1), tr, va, quiet(max_steps=3, warmup_steps=1), out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="LoRA.*add_lora"):
        train(GPT(DROPOUT, seed=0), tr, va, quiet(max_steps=3, warmup_steps=1), out_dir=tmp_path, resume=True)
