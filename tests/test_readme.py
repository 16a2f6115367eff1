"""README.md's commands block runs as written, from a fresh directory holding only the
repository's data/ and configs/.

- the fast test runs every line except `cropi run` (the 15-minute demo) in-process, with the sizes
  made small by the exact replacements in SMALL (each must occur, so an edited README cannot
  silently escape them);
- the slow test runs the whole block, unchanged, through bash, as a user types it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]

# README text -> small text (the fast test); every key must be in the block
SMALL = {
    "--n 100 --out pool.parquet": "--n 4 --out pool.parquet",
    "--n 8 --split val": "--n 4 --split val",
    "--n 16 --split test": "--n 2 --split test",
    "--prompts pool.parquet --n 8": "--prompts pool.parquet --n 4",
    "--prompts val.parquet --n 8": "--prompts val.parquet --n 4",
    "--stages 3 --steps-per-stage 10": "--stages 2 --steps-per-stage 1 --batch-prompts 2 --group-size 4",
    "checkpoints/step-30": "checkpoints/step-2",
}
SLOW_ONLY = ("cropi run ",)


def readme_block() -> list[str]:
    """The command lines of README.md's first ```bash block after '## The commands' (continuation
    lines joined)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## The commands"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [ln.strip() for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]


def _workdir(tmp_path: Path) -> Path:
    for name in ("data", "configs"):
        shutil.copytree(ROOT / name, tmp_path / name)
    return tmp_path


def test_block_uses_only_shipped_or_earlier_files():
    """Every input path of a line is in data/ or configs/, or an output of an earlier line."""
    made: set[str] = set()
    for line in readme_block():
        for cmd in line.split("&&"):
            words = shlex.split(cmd, comments=True)
            for i, w in enumerate(words):
                prev = words[i - 1] if i else ""
                if prev in ("--out", "--run"):
                    made.add(w.rstrip("/"))
                elif prev in ("--prompts", "--trajectories", "--target", "--scores", "--curriculum", "--model") \
                        or (words[:2] == ["cropi", "check"] and i == 2) or (words[:2] == ["cropi", "run"] and i == 2) \
                        or (words[:3] == ["cropi", "curriculum", "show"] and i == 3):
                    if w in ("tiny", "smollm2"):
                        continue
                    p = w.rstrip("/")
                    assert p.startswith(("data/", "configs/")) and (ROOT / p).exists() or \
                        any(p == m or p.startswith(m + "/") for m in made), f"{line!r}: {w} is neither shipped nor made earlier"


def _run_in_process(line: str) -> None:
    from cropi.cli import main

    for cmd in line.split("&&"):
        words = shlex.split(cmd, comments=True)
        assert words[0] == "cropi"
        r = CliRunner().invoke(main, words[1:], catch_exceptions=False)
        assert r.exit_code == 0, f"{cmd.strip()!r} exited {r.exit_code}: {r.output}"


def test_readme_commands_small(tmp_path, monkeypatch):
    """Every line but `cropi run`, at small sizes (about a minute on 2 free cores)."""
    lines = readme_block()
    joined = "\n".join(lines)
    for old in SMALL:
        assert old in joined, f"README no longer contains {old!r}: update SMALL"
    monkeypatch.chdir(_workdir(tmp_path))
    ran = 0
    for line in lines:
        if line.startswith(SLOW_ONLY):
            continue
        for old, new in SMALL.items():
            line = line.replace(old, new)
        _run_in_process(line)
        ran += 1
    assert ran == len(lines) - 1
    for artefact in ("scores", "curriculum", "runs/a", "scores-public", "stage-0.verl.parquet"):
        assert (tmp_path / artefact).exists()


@pytest.mark.slow
def test_readme_commands_as_written(tmp_path):
    """The whole block through bash, unchanged (the demo included: ~20 minutes on 2 cores)."""
    work = _workdir(tmp_path)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "cropi").write_text(f"#!/bin/sh\nexec {sys.executable} -m cropi \"$@\"\n")
    (bindir / "cropi").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    for line in readme_block():
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=work, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{line!r} exited {r.returncode}: {r.stderr[-2000:]}"
