"""Tokenizers: exact round trips, save/load, dispatch and clear errors."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from minilora.data import generate_stories
from minilora.tokenizer import (EOT, BPETokenizer, CharTokenizer, Tokenizer,
                                load_tokenizer)

VOCAB = 400
# hypothesis: each property sets a floor on its examples; the "thorough" profile raises it


@pytest.fixture(scope="module")
def corpus():
    return generate_stories(60_000, seed=0)


@pytest.fixture(scope="module")
def bpe(corpus):
    return BPETokenizer.train([corpus], vocab_size=VOCAB)


@pytest.fixture(scope="module")
def chars(corpus):
    return CharTokenizer.train(corpus)


# ------------------------------------------------------------------ BPE


def test_bpe_vocab_size_is_the_requested_size(bpe):
    # the library stops at vocab_size (counting 256 bytes + specials + merges); this
    # corpus has far more than 400 - 257 mergeable pairs, so it reaches it exactly
    assert isinstance(bpe, Tokenizer)
    assert bpe.vocab_size == VOCAB


def test_bpe_small_corpus_gives_at_most_the_requested_size():
    tok = BPETokenizer.train(["ab ab ab"], vocab_size=1000)
    assert 257 <= tok.vocab_size < 1000


def test_bpe_eot_is_the_special_token(bpe):
    assert bpe.encode(EOT) == [bpe.eot_id]
    assert bpe.decode([bpe.eot_id]) == EOT
    assert 0 <= bpe.eot_id < bpe.vocab_size


def test_bpe_learns_merges(bpe, corpus):
    # a frequent word is one token, and the corpus needs far fewer tokens than bytes
    assert len(bpe.encode(" the")) == 1
    ids = bpe.encode(corpus[:5000])
    assert len(ids) < 0.5 * len(corpus[:5000].encode("utf-8"))
    assert all(0 <= i < bpe.vocab_size for i in ids)


@settings(max_examples=max(150, settings.default.max_examples), deadline=None)
@given(st.text())
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@pytest.mark.parametrize("text", [
    "", " ", "  leading and trailing  ", "\r\n\t\x00", "héllo wörld", "日本語のテキスト",
    "emoji 🙂👩‍👩‍👧 flags 🇫🇷", "e\u0301 (combining accent) vs \u00e9", "\ufeffBOM",
    f"a{EOT}b{EOT}{EOT}", "<|endoftext", "Ġ is not a space",
])
def test_bpe_round_trips_awkward_text(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert all(0 <= i < bpe.vocab_size for i in ids)


def test_bpe_unseen_characters_fall_back_to_bytes(bpe):
    # byte-level: a character never seen in training costs one token per UTF-8 byte
    assert len(bpe.encode("🙂")) == len("🙂".encode("utf-8")) == 4


def test_bpe_save_load(bpe, tmp_path, corpus):
    path = bpe.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(path)
    assert isinstance(again, BPETokenizer)
    assert again.vocab_size == bpe.vocab_size and again.eot_id == bpe.eot_id
    sample = corpus[:3000] + " naïve 🙂 " + EOT
    assert again.encode(sample) == bpe.encode(sample)
    # a directory means <dir>/tokenizer.json
    bpe.save(tmp_path)
    assert load_tokenizer(tmp_path).encode(sample) == bpe.encode(sample)
    # the file is the library's own format
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "BPE"


def test_bpe_rejects_too_small_vocab():
    with pytest.raises(ValueError, match="at least 257"):
        BPETokenizer.train(["abc"], vocab_size=100)


# ------------------------------------------------------------------ chars


def test_char_vocabulary(chars, corpus):
    distinct = set(corpus.replace(EOT, ""))
    assert chars.vocab_size == len(distinct) + 1
    assert chars.eot_id == len(distinct)
    assert sorted(chars.chars) == chars.chars and set(chars.chars) == distinct


@settings(max_examples=max(50, settings.default.max_examples), deadline=None)
@given(st.data())
def test_char_round_trips_its_alphabet(chars, data):
    alphabet = st.sampled_from(chars.chars)
    pieces = data.draw(st.lists(st.one_of(st.text(alphabet, max_size=20), st.just(EOT)), max_size=8))
    text = "".join(pieces)
    ids = chars.encode(text)
    assert chars.decode(ids) == text
    assert len(ids) == len(text) - pieces.count(EOT) * (len(EOT) - 1)


def test_char_unknown_character_raises_naming_it(chars):
    with pytest.raises(ValueError, match="'€'"):
        chars.encode("a price in €")


def test_char_save_load_and_dispatch(chars, tmp_path, corpus):
    path = chars.save(tmp_path / "chars.json")
    blob = json.loads(open(path, encoding="utf-8").read())
    assert blob["type"] == "minilora-char-tokenizer"
    again = load_tokenizer(path)
    assert isinstance(again, CharTokenizer)
    assert again.encode(corpus[:2000]) == chars.encode(corpus[:2000])
    assert again.vocab_size == chars.vocab_size and again.eot_id == chars.eot_id


# ------------------------------------------------------------------ loading errors


@pytest.mark.parametrize("content, message", [
    ("{not json", "invalid JSON"),
    ("[1, 2, 3]", "expected an object"),
    ('{"hello": "world"}', "unknown tokenizer file"),
    ('{"type": "minilora-char-tokenizer", "version": 99, "chars": [], "special_tokens": []}',
     "unsupported CharTokenizer version"),
    ('{"type": "minilora-char-tokenizer", "version": 1, "chars": ["ab"], "special_tokens": ["<|endoftext|>"]}',
     "single characters"),
    ('{"model": {"type": "BPE", "vocab": 5}}', "not a valid tokenizers BPE file"),
    ('{"model": {"type": "WordPiece"}}', "BPE models only"),
])
def test_corrupt_file_raises_value_error(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_tokenizer(path)


def test_binary_garbage_raises_value_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError):
        load_tokenizer(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        load_tokenizer(tmp_path / "nope.json")
