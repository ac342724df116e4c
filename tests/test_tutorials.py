"""Every tutorial runs top to bottom in fast mode, checks itself, and saves its figures.

Lessons are discovered, not listed: any ``tutorials/NN_*.py`` is run, so a new lesson is
tested the moment it exists. Each runs in its own process (as a reader would run it),
with ``MINILORA_FAST=1``, its figures sent to a temporary folder, and the working copy of
the package first on the import path.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
LESSONS = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
TIMEOUT_S = 300


def _tail(text: str, n: int = 3000) -> str:
    text = text or ""
    return text if len(text) <= n else "...\n" + text[-n:]


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.name for p in LESSONS])
def test_lesson_runs_in_fast_mode(lesson, tmp_path):
    figures, cwd = tmp_path / "figures", tmp_path / "cwd"
    cwd.mkdir()
    env = dict(os.environ, MINILORA_FAST="1", MINILORA_FIGURES=str(figures), MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        result = subprocess.run([sys.executable, str(lesson)], cwd=cwd, env=env, capture_output=True,
                                text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr
        pytest.fail(f"{lesson.name} ran past {TIMEOUT_S} s in fast mode\n"
                    f"--- stdout ---\n{_tail(out)}\n--- stderr ---\n{_tail(err)}")
    assert result.returncode == 0, (f"{lesson.name} exited with {result.returncode}\n"
                                    f"--- stdout ---\n{_tail(result.stdout)}\n"
                                    f"--- stderr ---\n{_tail(result.stderr)}")
    pngs = sorted(p.name for p in figures.glob("*.png")) if figures.is_dir() else []
    assert pngs, f"{lesson.name} saved no PNG into MINILORA_FIGURES ({figures})"
    prefix = lesson.name[:3]  # "01_"
    misnamed = [name for name in pngs if not name.startswith(prefix)]
    assert not misnamed, f"{lesson.name} saved figures not named {prefix}*.png: {misnamed}"


def test_lessons_are_numbered_without_gaps():
    numbers = [int(p.name[:2]) for p in LESSONS]
    assert numbers, f"no lessons found in {TUTORIALS}"
    assert numbers == list(range(1, len(numbers) + 1)), \
        f"lessons must be numbered 01..{len(numbers):02d} once each, found {[p.name for p in LESSONS]}"


def test_readme_lists_every_lesson():
    readme = (TUTORIALS / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in LESSONS if p.name not in readme]
    assert not missing, f"tutorials/README.md does not mention {missing}"


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.name for p in LESSONS])
def test_lesson_follows_the_conventions(lesson):
    """Percent-format cells with prose, the package imported (not re-implemented), the
    shared fast-mode and figure switches, and at least one assertion."""
    source = lesson.read_text(encoding="utf-8")
    problems = []
    if not re.search(r"^# %% \[markdown\]", source, re.M):
        problems.append("no '# %% [markdown]' cell")
    if not re.search(r"^# %%\s*$", source, re.M):
        problems.append("no '# %%' code cell")
    if not re.search(r"^\s*(from minilora\b|import minilora\b)", source, re.M):
        problems.append("does not import minilora")
    for switch in ("MINILORA_FAST", "--fast", "MINILORA_FIGURES"):
        if switch not in source:
            problems.append(f"does not read {switch}")
    if not re.search(r"^\s*assert\b", source, re.M):
        problems.append("checks nothing with assert")
    assert not problems, f"{lesson.name}: " + "; ".join(problems)


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.name for p in LESSONS])
def test_lesson_opens_as_a_notebook(lesson):
    jupytext = pytest.importorskip("jupytext", reason="jupytext is not installed (pip install jupytext)")
    notebook = jupytext.read(lesson)
    kinds = {cell.cell_type for cell in notebook.cells}
    assert {"markdown", "code"} <= kinds, f"{lesson.name} converts to cells of kinds {kinds} only"
