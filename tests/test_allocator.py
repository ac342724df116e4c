"""Tests for minilora.allocator: keeping freed memory for reuse.

The promise is a behaviour, so the main test measures it: a loop that allocates and
frees the same arrays, as a training step does, takes page faults every round under
glibc's defaults and (almost) none once keep_freed_memory() has run. Each side runs in a
fresh process, because the setting is process-wide and cannot be undone.
"""
import json
import os
import subprocess
import sys

import pytest

from minilora import allocator, cli

needs_glibc = pytest.mark.skipif(allocator._glibc() is None, reason="needs glibc (Linux)")

# Forty 1 MiB arrays, written to and freed together, five times: the shape of a step's
# activations. Faults are counted over the last four rounds, after the first has
# brought the memory in.
_ROUNDS = """
import json, resource, sys
import numpy as np
import minilora
message = minilora.keep_freed_memory() if sys.argv[1] == "keep" else "defaults"
def one_round():
    arrays = [np.ones(1 << 18, dtype=np.float32) for _ in range(40)]   # 40 x 1 MiB, touched
    del arrays
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    one_round()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                  "message": message}))
"""


def _faults(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    proc = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_glibc
def test_freed_arrays_are_reused_without_page_faults():
    default, kept = _faults("defaults"), _faults("keep")
    pages_per_round = 40 * (1 << 20) // 4096                  # 10,240
    # glibc's defaults give the 40 MiB back after every round and fault it in again ...
    assert default["faults"] > 2 * pages_per_round, default
    # ... kept, the same arrays reuse the same pages.
    assert kept["message"].startswith("applied"), kept
    assert kept["faults"] < pages_per_round // 10, kept


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None, 2**31, "64"])
def test_a_threshold_must_be_a_positive_byte_count(bad):
    with pytest.raises(ValueError, match="mmap_threshold"):
        allocator.keep_freed_memory(mmap_threshold=bad)
    with pytest.raises(ValueError, match="trim_threshold"):
        allocator.keep_freed_memory(trim_threshold=bad)


@pytest.mark.parametrize("var, value", [("MALLOC_TRIM_THRESHOLD_", "1000000"),
                                        ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")])
def test_the_users_own_malloc_settings_win(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    monkeypatch.setattr(allocator, "_glibc", lambda: pytest.fail("must not touch malloc"))
    assert allocator.keep_freed_memory() == f"left alone: the environment sets {var}"


class _FakeLibc:
    """Records mallopt calls; refuses the parameter numbers in ``refuse``."""

    def __init__(self, refuse=()):
        self.calls, self.refuse = [], refuse

    def mallopt(self, param, value):
        self.calls.append((param.value, value.value))
        return 0 if param.value in self.refuse else 1


def _without_malloc_env(monkeypatch):
    for var in allocator._USER_SETTINGS + ("GLIBC_TUNABLES",):
        monkeypatch.delenv(var, raising=False)


def test_it_sets_the_mmap_threshold_then_the_trim_threshold(monkeypatch):
    _without_malloc_env(monkeypatch)
    libc = _FakeLibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    message = allocator.keep_freed_memory(3 << 20, 5 << 20)
    assert libc.calls == [(allocator.M_MMAP_THRESHOLD, 3 << 20), (allocator.M_TRIM_THRESHOLD, 5 << 20)]
    assert message == ("applied: glibc's malloc serves blocks below 3 MiB from its heap "
                       "and keeps up to 5 MiB free at the heap's top")


def test_a_refusal_is_reported_not_raised(monkeypatch):
    _without_malloc_env(monkeypatch)
    libc = _FakeLibc(refuse=(allocator.M_TRIM_THRESHOLD,))
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    message = allocator.keep_freed_memory()
    assert message.startswith("not applied: glibc refused M_TRIM_THRESHOLD"), message
    assert "(M_MMAP_THRESHOLD was set)" in message


def test_elsewhere_than_glibc_it_does_nothing(monkeypatch):
    _without_malloc_env(monkeypatch)
    monkeypatch.setattr(allocator.platform, "system", lambda: "Darwin")
    assert allocator._glibc() is None
    assert allocator.keep_freed_memory().startswith("not applied: the C library is not glibc (Darwin)")


def test_the_command_line_keeps_freed_memory(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or "applied")
    assert cli.main([]) == 2             # no command: help, but the setting comes first
    assert calls == [1]
