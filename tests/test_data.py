"""Data: deterministic built-in corpora and tasks, user files, splits and batches."""
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minilora import data
from minilora.data import (BUILTIN_DATASETS, IGNORE_INDEX, EncodedExample, addition_examples,
                           encode_corpus, encode_examples, example_batch, extract_answer,
                           generate_recipes, generate_stories, get_batch, iter_example_batches,
                           iter_text_batches, load_builtin, pad_batch, read_jsonl, read_text_file,
                           reverse_examples, score_exact_match, split_examples, split_text)
from minilora.tokenizer import EOT, BPETokenizer, CharTokenizer


@pytest.fixture(scope="module")
def stories():
    return generate_stories(40_000, seed=0)


@pytest.fixture(scope="module")
def chars(stories):
    # a char tokenizer over everything the tests encode: stories, recipes, tasks
    extra = generate_recipes(20_000) + "0123456789+=abcdefghijklmnopqrstuvwxyz"
    return CharTokenizer.train([stories, extra])


@pytest.fixture(scope="module")
def bpe(stories):
    return BPETokenizer.train([stories], vocab_size=320)


def words(text):
    return set(re.findall(r"[a-z]+", text.replace(EOT, " ").lower()))


# ------------------------------------------------------------------ the generator


def test_splitmix64_known_values():
    # reference values of SplitMix64 seeded with 0 (fixed by the algorithm, not a library)
    rng = data.SplitMix64(0)
    assert [rng.next64() for _ in range(3)] == [
        0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


# ------------------------------------------------------------------ corpora


@pytest.mark.parametrize("make", [generate_stories, generate_recipes])
def test_corpus_is_deterministic_and_of_the_requested_size(make):
    a, b = make(30_000, seed=1), make(30_000, seed=1)
    assert a == b
    assert len(a) == 30_000
    assert make(30_000, seed=2) != a
    assert len(make(777, seed=3)) == 777
    # a shorter corpus is the start of a longer one with the same seed
    assert make(50_000, seed=1).startswith(a)
    assert a.count(EOT) >= 10


def test_stories_pinned_to_their_first_words():
    # guards against accidental changes to the grammar or the generator
    assert generate_stories(60, seed=0) == "There was once a young horse called Bella. Bella loved to pl"


def test_default_sizes():
    assert len(load_builtin("stories")) == 300_000
    assert len(load_builtin("recipes")) == 100_000
    assert len(load_builtin("addition")) == 2000


def test_recipes_are_distinguishable_from_stories(stories):
    recipes = generate_recipes(40_000)
    ws, wr = words(stories), words(recipes)
    # most recipe words never occur in the stories
    assert len(wr - ws) / len(wr) > 0.7
    assert "Ingredients:" in recipes and "Method:" in recipes
    assert "Ingredients:" not in stories
    assert not re.search(r"\d", stories) and re.search(r"\d", recipes)
    # every recipe document has the same layout
    for doc in recipes.split(EOT)[:-1]:
        assert doc.startswith("Recipe: ") and "\nIngredients:\n- " in doc and "\nMethod:\n1. " in doc


def test_stories_look_like_prose(stories):
    docs = stories.split(EOT)[:-1]
    assert len(docs) > 20
    for doc in docs:
        assert doc[0].isupper() and doc.rstrip()[-1] in ".!\""
        assert "\n" not in doc
    assert len(words(stories)) > 200


# ------------------------------------------------------------------ tasks


def test_addition_examples_are_correct_and_distinct():
    exs = addition_examples(500, max_operand=50, seed=4)
    assert len(exs) == 500 and exs == addition_examples(500, max_operand=50, seed=4)
    assert len({e["prompt"] for e in exs}) == 500
    for e in exs:
        a, b = re.fullmatch(r"(\d+)\+(\d+)=", e["prompt"]).groups()
        assert 0 <= int(a) <= 50 and 0 <= int(b) <= 50
        assert e["response"] == str(int(a) + int(b))
    with pytest.raises(ValueError):
        addition_examples(10, max_operand=2)   # only 9 distinct pairs


def test_reverse_examples_are_correct():
    for e in reverse_examples(200, seed=1):
        word = re.fullmatch(r"reverse ([a-z]{3,6}) =", e["prompt"]).group(1)
        assert e["response"] == " " + word[::-1]


def test_score_exact_match():
    exs = addition_examples(50)
    answers = {e["prompt"]: e["response"] for e in exs}
    assert score_exact_match(exs, lambda p: answers[p]) == 1.0
    # continuation after the answer (a newline, end-of-text, another problem) is ignored
    assert score_exact_match(exs, lambda p: " " + answers[p] + "\n1+1=2") == 1.0
    assert score_exact_match(exs, lambda p: answers[p] + EOT + "junk") == 1.0
    assert score_exact_match(exs, lambda p: str(int(answers[p]) + 1)) == 0.0
    assert score_exact_match(exs, lambda p: answers[p] + "0") == 0.0
    assert score_exact_match(exs, lambda p: "") == 0.0
    half = {e["prompt"]: (e["response"] if k % 2 == 0 else "x") for k, e in enumerate(exs)}
    assert score_exact_match(exs, lambda p: half[p]) == 0.5
    assert score_exact_match(exs, lambda p: answers[p], limit=10) == 1.0
    assert extract_answer("  47 \nmore") == "47"


# ------------------------------------------------------------------ registry


def test_registry():
    assert {"stories", "recipes", "addition", "reverse"} <= set(BUILTIN_DATASETS)
    for name, d in BUILTIN_DATASETS.items():
        got = load_builtin(name, size=300, seed=5)
        assert got == load_builtin(name, size=300, seed=5)
        if d.kind == "text":
            assert isinstance(got, str) and len(got) == 300
        else:
            assert len(got) == 300
            assert all(set(e) == {"prompt", "response"} for e in got)
    with pytest.raises(ValueError, match="unknown built-in dataset"):
        load_builtin("wikipedia")


# ------------------------------------------------------------------ user files


def test_read_jsonl_valid(tmp_path):
    path = tmp_path / "ex.jsonl"
    path.write_text('{"prompt": "a", "response": "b", "extra": 1}\n\n  \n'
                    '{"prompt": "ünï", "response": "🙂"}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"prompt": "a", "response": "b"},
                                {"prompt": "ünï", "response": "🙂"}]


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "a", "response": ', "invalid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"prompt": "a"}', "missing key 'response'"),
    ('{"response": "a"}', "missing key 'prompt'"),
    ('{"prompt": 3, "response": "a"}', "'prompt' must be a string"),
    ('{"prompt": "a", "response": null}', "'response' must be a string"),
])
def test_read_jsonl_reports_the_bad_line(tmp_path, bad, message):
    path = tmp_path / "ex.jsonl"
    good = '{"prompt": "p", "response": "r"}'
    path.write_text(f"{good}\n\n{good}\n{bad}\n{good}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"line 4: .*{re.escape(message)}"):
        read_jsonl(path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_text_file(tmp_path / "nope.txt")


def test_read_text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffline one\r\nzwei ü\n".encode("utf-8"))
    assert read_text_file(path) == "line one\r\nzwei ü\n"
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text_file(path)


# ------------------------------------------------------------------ splits


@settings(max_examples=max(50, settings.default.max_examples), deadline=None)
@given(st.text(max_size=200), st.floats(0.0, 0.99))
def test_split_text_by_position(text, frac):
    train, val = split_text(text, frac)
    assert train + val == text
    assert len(val) == int(len(text) * frac)


def test_split_text_works_on_token_arrays():
    train, val = split_text(np.arange(100), 0.1)
    assert np.array_equal(train, np.arange(90)) and np.array_equal(val, np.arange(90, 100))
    with pytest.raises(ValueError):
        split_text("abc", 1.0)


def test_split_examples_is_deterministic_and_a_partition():
    exs = addition_examples(101)
    train, val = split_examples(exs, 0.2, seed=3)
    assert (train, val) == split_examples(exs, 0.2, seed=3)
    assert len(val) == 20 and len(train) == 81
    assert sorted(map(str, train + val)) == sorted(map(str, exs))
    assert split_examples(exs, 0.2, seed=4) != (train, val)
    assert len(split_examples(exs[:5], 0.01)[1]) == 1   # never an empty validation set


# ------------------------------------------------------------------ token streams


def test_encode_corpus(chars, bpe, stories):
    for tok in (chars, bpe):
        ids = encode_corpus(tok, stories[:5000])
        assert ids.dtype == np.int64 and ids.ndim == 1
        assert tok.decode(ids.tolist()) == stories[:5000]
        assert (ids == tok.eot_id).sum() == stories[:5000].count(EOT)
        assert ids.tolist() == tok.encode(stories[:5000])   # same as encoding it whole
    docs = ["ab", "ba", "a"]
    ids = encode_corpus(chars, docs)
    assert ids.tolist() == chars.encode(EOT.join(docs))


def test_get_batch(chars, stories):
    tokens = encode_corpus(chars, stories[:3000])
    x, y = get_batch(tokens, 8, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])
    for b in range(8):   # each row is a real window of the stream
        s = next(i for i in range(len(tokens)) if np.array_equal(tokens[i:i + 17], np.r_[x[b], y[b, -1]]))
        assert s + 17 <= len(tokens)
    x2, y2 = get_batch(tokens, 8, 16, np.random.default_rng(0))
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    x3, _ = get_batch(tokens, 8, 16, np.random.default_rng(1))
    assert not np.array_equal(x, x3)


def test_get_batch_edges():
    tokens = np.arange(11)
    x, y = get_batch(tokens, 4, 10, np.random.default_rng(0))   # exactly one window fits
    assert (x == np.arange(10)).all() and (y == np.arange(1, 11)).all()
    with pytest.raises(ValueError, match="at least 12"):
        get_batch(tokens, 4, 11, np.random.default_rng(0))


def test_iter_text_batches_covers_the_stream():
    tokens = np.arange(103)
    batches = list(iter_text_batches(tokens, 4, 10))
    xs = np.concatenate([x for x, _ in batches])
    ys = np.concatenate([y for _, y in batches])
    assert xs.shape == (10, 10) and [len(x) for x, _ in batches] == [4, 4, 2]
    assert np.array_equal(xs.ravel(), np.arange(100)) and np.array_equal(ys.ravel(), np.arange(1, 101))


# ------------------------------------------------------------------ instruction examples


@pytest.mark.parametrize("which", ["chars", "bpe"])
def test_encode_examples_masks_exactly_the_prompt(request, which):
    tok = request.getfixturevalue(which)
    exs = addition_examples(40) + reverse_examples(10)
    enc = encode_examples(tok, exs, block_size=64)
    for ex, (x, y) in zip(exs, enc):
        p, r = tok.encode(ex["prompt"]), tok.encode(ex["response"])
        seq = p + r + [tok.eot_id]
        assert x.dtype == y.dtype == np.int64
        assert x.tolist() == seq[:-1]
        # positions 0 .. P-2 predict prompt tokens: ignored; the rest predict the
        # response and the final end-of-text
        assert (y[:len(p) - 1] == IGNORE_INDEX).all()
        assert y[len(p) - 1:].tolist() == r + [tok.eot_id]
        assert tok.decode(y[y != IGNORE_INDEX].tolist()) == ex["response"] + EOT


def test_encode_examples_too_long(chars):
    ex = [{"prompt": "1+1=", "response": "2" * 30}]
    with pytest.raises(ValueError, match="example 0 is 34 tokens"):
        encode_examples(chars, ex, block_size=16)
    (x, y), = encode_examples(chars, ex, block_size=16, truncate=True)
    assert len(x) == len(y) == 16
    assert (y[:3] == IGNORE_INDEX).all() and (y[3:] != IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="prompt alone"):
        encode_examples(chars, [{"prompt": "1" * 20, "response": "2"}], block_size=16, truncate=True)


def test_padding(chars):
    exs = [{"prompt": "1+1=", "response": "2"}, {"prompt": "10+10=", "response": "20"},
           {"prompt": "0+5=", "response": "5"}]
    enc = encode_examples(chars, exs, block_size=32)
    x, y = pad_batch(enc, pad_id=chars.eot_id)
    lengths = [len(e.input_ids) for e in enc]
    assert x.shape == y.shape == (3, max(lengths))
    for b, L in enumerate(lengths):
        assert np.array_equal(x[b, :L], enc[b].input_ids) and np.array_equal(y[b, :L], enc[b].targets)
        assert (x[b, L:] == chars.eot_id).all() and (y[b, L:] == IGNORE_INDEX).all()
    # counted targets: only responses + one end-of-text each
    assert (y != IGNORE_INDEX).sum() == sum(len(e["response"]) + 1 for e in exs)


def test_example_batch_and_iteration(chars):
    enc = encode_examples(chars, addition_examples(30), block_size=32)
    x, y = example_batch(enc, 8, np.random.default_rng(0), pad_id=chars.eot_id)
    x2, y2 = example_batch(enc, 8, np.random.default_rng(0), pad_id=chars.eot_id)
    assert x.shape[0] == 8 and np.array_equal(x, x2) and np.array_equal(y, y2)
    rows = {tuple(e.input_ids.tolist()) for e in enc}
    for b in range(8):
        assert tuple(x[b][: np.flatnonzero(y[b] != IGNORE_INDEX).max() + 1].tolist()) in rows
    # more than available: sampled with replacement, still works
    assert example_batch(enc[:2], 5, np.random.default_rng(0), pad_id=0)[0].shape[0] == 5
    batches = list(iter_example_batches(enc, 7, pad_id=chars.eot_id))
    assert [len(bx) for bx, _ in batches] == [7, 7, 7, 7, 2]
    assert sum(int((by != IGNORE_INDEX).sum()) for _, by in batches) == \
        sum(int((e.targets != IGNORE_INDEX).sum()) for e in enc)
    assert isinstance(enc[0], EncodedExample) and isinstance(enc[0], tuple)
