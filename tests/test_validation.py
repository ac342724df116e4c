"""The shared whole-number check that every count in minilora goes through."""
import numpy as np
import pytest

import minilora as ml
from minilora.validation import check_integer


@pytest.mark.parametrize("value", [0, 3, np.int32(3), np.int64(7), np.uint8(2), np.array(5)])
def test_integers_pass_as_python_ints(value):
    number = check_integer("n", value)
    assert number == int(value) and type(number) is int


@pytest.mark.parametrize("value", [True, False, 2.0, 1.5, "2", None, np.float32(2.0), np.array([1])])
def test_non_integers_are_refused(value):
    with pytest.raises(ValueError, match=r"^n must be a non-negative integer, got "):
        check_integer("n", value)


@pytest.mark.parametrize("minimum, maximum, value, wanted", [
    (0, None, -1, "a non-negative integer"),
    (1, None, 0, "a positive integer"),
    (2, None, 1, "an integer >= 2"),
    (1, 10, 11, r"an integer in \[1, 10\]"),
    (1, 10, 0, r"an integer in \[1, 10\]"),
])
def test_the_message_says_what_was_wanted_and_what_came(minimum, maximum, value, wanted):
    with pytest.raises(ValueError, match=rf"^the count must be {wanted}, got {value}$"):
        check_integer("the count", value, minimum, maximum)


def test_bounds_are_inclusive():
    assert check_integer("n", 1, 1, 10) == 1 and check_integer("n", 10, 1, 10) == 10


@pytest.mark.parametrize("make, message", [
    (lambda: ml.GPTConfig(vocab_size=11, block_size=6, n_layer=True, n_head=2, n_embd=8),
     "GPTConfig.n_layer must be a positive integer, got True"),
    (lambda: ml.LoraConfig(r=2.0), "LoraConfig.r must be a positive integer, got 2.0"),
    (lambda: ml.TrainConfig(seed=-1), "TrainConfig.seed must be a non-negative integer, got -1"),
    (lambda: ml.keep_freed_memory(mmap_threshold=2**31),
     r"keep_freed_memory: mmap_threshold \(bytes\) must be an integer in \[1, 2147483647\]"),
])
def test_the_package_refuses_counts_in_these_words(make, message):
    with pytest.raises(ValueError, match=message):
        make()
