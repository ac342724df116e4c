"""Timing two variants of the same work on a shared machine: paired trials.

On a laptop or a cloud VM, other programs -- or other virtual machines on the same host
-- take the CPU at random moments, so the load moves while we measure. Time variant A in
one block of calls and variant B in the next, and the ratio of the two blocks measures
that movement as much as A and B. A *paired trial* runs one call of each, back to back:
calls a few milliseconds apart share the machine's moment, so the ratio *within* a trial
cancels the drift, and the median over trials of those ratios is the estimate.

Pair variants that share one pool of threads (two minilora models, merged against
unmerged LoRA). Between two programs with their own thread pools (minilora against
PyTorch), a single call right after the other program's first has to take the cores
back, so those are timed in blocks of calls instead (bench/README.md, "Timing").
Lesson 7 (``tutorials/07_where_the_time_goes.py``) shows the difference on work whose
true ratio is 1.

``sync`` is what makes a clock read honest on a GPU, where calls return before their
kernels finish (:func:`minilora.backend.synchronize`; on the CPU it does nothing).
"""
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["time_once", "paired_timing", "paired_ratio"]

Contender = Tuple[str, Callable[[], object], Callable[[], None]]   # (name, fn, sync)


def time_once(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Seconds one call of ``fn`` takes, with the device's queue empty before and after."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def paired_timing(contenders: Sequence[Contender], trials: int) -> Dict[str, List[float]]:
    """Time contenders that do comparable work, one call each per trial, back to back.

    ``contenders`` holds (name, fn, sync); the order rotates every trial (ABC, BCA, CAB,
    ...) so no contender always runs first. Returns name -> seconds, one value per trial.
    """
    times: Dict[str, List[float]] = {name: [] for name, _, _ in contenders}
    for trial in range(trials):
        k = trial % len(contenders)
        for name, fn, sync in list(contenders[k:]) + list(contenders[:k]):
            times[name].append(time_once(fn, sync))
    return times


def paired_ratio(times: Dict[str, List[float]], a: str, b: str) -> Optional[float]:
    """The median over trials of a's time / b's time (see :func:`paired_timing`); None
    if either was not timed."""
    if not times.get(a) or not times.get(b):
        return None
    return float(statistics.median([ta / tb for ta, tb in zip(times[a], times[b])]))
