"""Tests for minilora.timing: paired trials rotate the order and pair trial by trial."""
from minilora import timing


def test_paired_timing_rotates_the_order_and_pairs_trial_by_trial(monkeypatch):
    calls = []
    clock = iter(range(10_000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)))

    def contender(name, cost):
        def fn():
            calls.append(name)
            for _ in range(cost - 1):            # each call takes `cost` ticks of the fake clock
                next(clock)
        return name, fn, lambda: None
    times = timing.paired_timing([contender("a", 1), contender("b", 2), contender("c", 3)], trials=4)
    assert calls == list("abc" "bca" "cab" "abc")
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert times["a"] == [1.0] * 4 and times["c"] == [3.0] * 4
    assert timing.paired_ratio(times, "c", "a") == 3.0
    assert timing.paired_ratio(times, "c", "missing") is None


def test_time_once_syncs_before_and_after(monkeypatch):
    events = []
    clock = iter(range(100))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)))
    seconds = timing.time_once(lambda: events.append("call"), lambda: events.append("sync"))
    assert events == ["sync", "call", "sync"] and seconds == 1.0
