"""Tokenizers: turning text into the integer ids a language model reads, and back.

A GPT does not see characters; it sees a sequence of integer *token ids*, each an index
into its embedding table of ``vocab_size`` rows. A tokenizer is the two-way map

    encode(text) -> list[int]        decode(ids) -> text

and minilora asks one promise of every tokenizer: ``decode(encode(text)) == text``
(exactly, for every text the tokenizer accepts). Two tokenizers live here, behind one
interface (:class:`Tokenizer`):

- :class:`BPETokenizer` — byte-level byte-pair encoding, as in GPT-2, trained with the
  Hugging Face ``tokenizers`` library. Accepts *any* Unicode text.
- :class:`CharTokenizer` — one id per distinct character of a training text. The
  simplest thing that works; useful in lessons and for tiny models, but it cannot
  encode a character it never saw.

Both also have an end-of-text token, ``eot_id`` (GPT-2's ``<|endoftext|>``): it
separates documents in a training stream, ends every instruction example (so a model
learns when to stop), and pads batches. The literal string ``<|endoftext|>`` inside a
text is encoded as that one token by both tokenizers, and decoded back to the string,
so the round trip still holds.

Save a tokenizer with ``tok.save(path)`` and read it back with :func:`load_tokenizer`,
which looks inside the file to pick the right class. ``path`` may be a file, or a
directory, in which case the file is ``<dir>/tokenizer.json``.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Sequence

EOT = "<|endoftext|>"
TOKENIZER_FILENAME = "tokenizer.json"
CHAR_FORMAT = "minilora-char-tokenizer"   # the "type" marker in a CharTokenizer file
CHAR_FORMAT_VERSION = 1


def _resolve(path) -> str:
    """A directory means ``<dir>/tokenizer.json``; anything else is the file itself."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.join(path, TOKENIZER_FILENAME)
    return path


class Tokenizer:
    """The interface every minilora tokenizer offers.

    - ``encode(text) -> list[int]`` and ``decode(ids) -> str``, with
      ``decode(encode(text)) == text``;
    - ``vocab_size``: ids lie in ``[0, vocab_size)``; the model's embedding has this
      many rows;
    - ``eot_id``: the end-of-text token id;
    - ``save(path)``; read back with the module-level :func:`load_tokenizer`.
    """

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eot_id(self) -> int:
        raise NotImplementedError

    def save(self, path) -> str:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.vocab_size


# --------------------------------------------------------------------------- BPE


class BPETokenizer(Tokenizer):
    """Byte-level byte-pair encoding (BPE), the scheme GPT-2 uses.

    **What BPE does.** Start with a vocabulary of single symbols. Count every pair of
    adjacent symbols in the training text, make the most frequent pair (say ``t`` +
    ``h``) a new symbol ``th``, and record the *merge* ``t h -> th``. Repeat until the
    vocabulary has ``vocab_size`` entries. Frequent words end up as one token
    (`` the``), rare words as a few pieces (`` lan`` + ``tern``). Encoding new text
    replays the learned merges in order. A larger vocabulary gives shorter sequences
    (cheaper attention) but a bigger embedding table and rarer, harder-to-learn tokens.

    **Why byte-level means no unknown tokens.** The starting symbols are not characters
    (there are over a million possible ones) but the 256 possible *bytes* of UTF-8.
    Every string is a sequence of bytes, so every string can be encoded: at worst an
    unseen emoji becomes its four bytes, one token each. There is no ``<unk>``. (To keep
    its internals printable, the library shows each byte as a visible stand-in
    character, e.g. a space as ``Ġ``; the ``ByteLevel`` decoder maps them back.)

    **Pieces of the pipeline** (``tokenizers`` library):

    - no normalizer: text is not lower-cased, NFC-normalised or stripped, which is what
      makes ``decode(encode(text)) == text`` exact;
    - pre-tokenizer ``ByteLevel(add_prefix_space=False)``: split text into word-like
      chunks with GPT-2's regular expression (merges never cross a chunk boundary) and
      map bytes to stand-ins. ``add_prefix_space=False`` because a prefix space would be
      an invented character that decoding cannot know to remove;
    - model ``BPE``: the vocabulary and merges;
    - decoder ``ByteLevel``: stand-ins back to bytes, bytes back to UTF-8 text.

    The special tokens (``<|endoftext|>`` by default) are given the first ids, so
    ``eot_id`` is 0 here (GPT-2 puts it last; only its being fixed matters).
    """

    def __init__(self, tokenizer):
        """Wrap a ``tokenizers.Tokenizer``; use :meth:`train` or :func:`load_tokenizer`."""
        self._tok = tokenizer
        specials = sorted((i, t.content) for i, t in tokenizer.get_added_tokens_decoder().items()
                          if t.special)
        if not specials:
            raise ValueError("BPETokenizer: the tokenizer has no special token to use as "
                             f"end-of-text (expected {EOT!r})")
        ids = {content: i for i, content in specials}
        # end-of-text is <|endoftext|> when present, else the first special token
        self._eot_id = ids.get(EOT, specials[0][0])

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int,
              special_tokens: Sequence[str] = (EOT,)) -> "BPETokenizer":
        """Learn a byte-level BPE vocabulary of (at most) ``vocab_size`` tokens.

        texts: an iterable of strings (a single ``str`` is taken as one text).
        vocab_size: the total size, counting the 256 byte tokens and the special tokens,
            so it must be at least ``256 + len(special_tokens)``. The library stops
            early when no pair occurs twice any more, so a small corpus can give fewer
            tokens than asked for: ``vocab_size`` of the result is ``<=`` the request.
        special_tokens: never split, never merged; the first (or ``<|endoftext|>``)
            becomes ``eot_id``.
        """
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        special_tokens = list(special_tokens)
        if not special_tokens:
            raise ValueError("BPETokenizer.train: give at least one special token (end-of-text)")
        minimum = 256 + len(special_tokens)
        if vocab_size < minimum:
            raise ValueError(f"BPETokenizer.train: vocab_size={vocab_size} is too small; it must "
                             f"be at least {minimum} (256 byte tokens + {len(special_tokens)} "
                             "special tokens)")
        if isinstance(texts, str):
            texts = [texts]
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special_tokens,
            # all 256 byte stand-ins, even ones the corpus lacks: every text is encodable
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Encode many texts at once (in parallel inside the library)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        # keep special tokens: dropping <|endoftext|> would break the round trip.
        # Ids that end inside a multi-byte character decode to U+FFFD (the library
        # decodes bytes leniently), which can happen with sampled model output.
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        return self._eot_id

    def id_to_token(self, i: int) -> str:
        """The token's internal spelling (bytes shown as stand-ins, e.g. ``Ġthe``)."""
        return self._tok.id_to_token(int(i))

    def save(self, path) -> str:
        """Write the library's own ``tokenizer.json``; returns the file path written."""
        path = _resolve(path)
        self._tok.save(path)
        return path

    @classmethod
    def load(cls, path) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = _resolve(path)
        try:
            tok = HFTokenizer.from_file(path)
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise ValueError(f"{path}: not a valid tokenizers BPE file ({e})") from None
        return cls(tok)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


# --------------------------------------------------------------------------- chars


class CharTokenizer(Tokenizer):
    """One token per distinct character of the training text, plus the special tokens.

    The vocabulary is the sorted set of characters (ids ``0 .. n-1``), then the special
    tokens (so ``eot_id == n`` with the default one). Sequences are as long as the text,
    and the embedding table is tiny; but a character that was not in the training text
    has no id, and encoding it raises ``ValueError`` naming it. Train on all the text
    you will ever encode (e.g. base corpus + fine-tuning data).
    """

    def __init__(self, chars: Sequence[str], special_tokens: Sequence[str] = (EOT,)):
        chars = list(chars)
        special_tokens = list(special_tokens)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"CharTokenizer: vocabulary entries must be single characters, got {c!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: the character list has duplicates")
        if not special_tokens:
            raise ValueError("CharTokenizer: give at least one special token (end-of-text)")
        for s in special_tokens:
            if not isinstance(s, str) or len(s) < 2:
                raise ValueError(f"CharTokenizer: special tokens must be strings of length >= 2 "
                                 f"(to differ from characters), got {s!r}")
        self.chars = chars
        self.special_tokens = special_tokens
        self._stoi = {c: i for i, c in enumerate(chars)}
        self._special_ids = {s: len(chars) + k for k, s in enumerate(special_tokens)}
        self._itos = chars + special_tokens
        self._eot_id = self._special_ids.get(EOT, len(chars))

    @classmethod
    def train(cls, texts, special_tokens: Sequence[str] = (EOT,)) -> "CharTokenizer":
        """Vocabulary = the sorted distinct characters of ``texts`` (a str or an iterable
        of str). Special-token strings inside the texts are not split into characters."""
        if isinstance(texts, str):
            texts = [texts]
        chars = set()
        for text in texts:
            for piece in _split_specials(text, special_tokens):
                if piece not in special_tokens:
                    chars.update(piece)
        return cls(sorted(chars), special_tokens)

    def encode(self, text: str) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids: List[int] = []
        for piece in _split_specials(text, self.special_tokens):
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
                continue
            for pos, c in enumerate(piece):
                i = self._stoi.get(c)
                if i is None:
                    raise ValueError(f"CharTokenizer: character {c!r} (U+{ord(c):04X}) is not in "
                                     f"the vocabulary of {len(self.chars)} characters; train the "
                                     "tokenizer on text that contains it, or use BPETokenizer")
                ids.append(i)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._itos):
                raise ValueError(f"CharTokenizer: id {i} is outside [0, {len(self._itos)})")
            out.append(self._itos[i])
        return "".join(out)

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    @property
    def eot_id(self) -> int:
        return self._eot_id

    def save(self, path) -> str:
        """Write JSON ``{"type": "minilora-char-tokenizer", "version": 1, "chars": [...],
        "special_tokens": [...]}``; returns the file path written."""
        path = _resolve(path)
        blob = {"type": CHAR_FORMAT, "version": CHAR_FORMAT_VERSION,
                "chars": self.chars, "special_tokens": self.special_tokens}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(blob, f, ensure_ascii=True)
        return path

    @classmethod
    def from_dict(cls, blob: dict, where: str = "CharTokenizer") -> "CharTokenizer":
        if blob.get("type") != CHAR_FORMAT:
            raise ValueError(f"{where}: not a CharTokenizer file (type={blob.get('type')!r})")
        if blob.get("version") != CHAR_FORMAT_VERSION:
            raise ValueError(f"{where}: unsupported CharTokenizer version {blob.get('version')!r} "
                             f"(this minilora reads version {CHAR_FORMAT_VERSION})")
        chars, specials = blob.get("chars"), blob.get("special_tokens")
        if not isinstance(chars, list) or not isinstance(specials, list):
            raise ValueError(f"{where}: 'chars' and 'special_tokens' must be lists")
        try:
            return cls(chars, specials)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


def _split_specials(text: str, special_tokens: Sequence[str]) -> List[str]:
    """Split ``text`` into pieces, each special-token string standing alone.

    Longest special token wins where two start at the same place.
    """
    if not special_tokens:
        return [text] if text else []
    specials = sorted(special_tokens, key=len, reverse=True)
    pieces, start, pos = [], 0, 0
    while pos < len(text):
        for s in specials:
            if text.startswith(s, pos):
                if pos > start:
                    pieces.append(text[start:pos])
                pieces.append(s)
                pos += len(s)
                start = pos
                break
        else:
            pos += 1
    if start < len(text):
        pieces.append(text[start:])
    return pieces


# --------------------------------------------------------------------------- loading


def load_tokenizer(path) -> Tokenizer:
    """Read a tokenizer saved by ``save``; the file's content picks the class.

    A ``tokenizers`` library file (it has a ``"model"`` entry) gives a
    :class:`BPETokenizer`; a file marked ``"type": "minilora-char-tokenizer"`` gives a
    :class:`CharTokenizer`. A missing file raises ``FileNotFoundError``; anything else
    unreadable raises ``ValueError`` saying what is wrong.
    """
    path = _resolve(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer file at {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            blob = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a tokenizer file (invalid JSON: {e})") from None
    if not isinstance(blob, dict):
        raise ValueError(f"{path}: not a tokenizer file (the JSON is a {type(blob).__name__}, "
                         "expected an object)")
    if blob.get("type") == CHAR_FORMAT:
        return CharTokenizer.from_dict(blob, where=path)
    model = blob.get("model")
    if isinstance(model, dict):
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: a tokenizers file with a {model.get('type')!r} model; "
                             "minilora reads BPE models only")
        return BPETokenizer.load(path)
    raise ValueError(f"{path}: unknown tokenizer file (neither a tokenizers BPE file nor "
                     f"'type': {CHAR_FORMAT!r})")
