"""benchmarks/gpu_check.sh --dry-run: every step of the one-shot GPU check at tiny sizes on the CPU,
so that the first run on a GPU works at the first try."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run(*args):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=300)


def test_dry_run_runs_every_step_and_writes_the_summary(tmp_path):
    r = run(tmp_path / "out", "--dry-run")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "out" / "gpu_check.jsonl").read_text().splitlines()]
    steps = {r["step"]: r["rc"] for r in rows if r["bench"] == "gpu_check.step"}
    assert steps == {"tests": 0, "projection": 0, "score": 0, "train": 0}
    proj = [r for r in rows if r["bench"] == "gpu_check.projection"]
    assert {(r["d"], r["impl"]) for r in proj} == {(d, i) for d in (20_000, 50_000)
                                                   for i in ("sjlt", "mask-dense", "dense", "torch-matmul")}
    score = {r["path"]: r for r in rows if r["bench"] == "gpu_check.score"}
    assert set(score) == {"cropi score", "plain", "per-layer", "loop"}
    assert score["cropi score"]["grad_path"] == "per-layer" and score["plain"]["vs_plain"] == 1.0
    train = {r["phase"]: r for r in rows if r["bench"] == "gpu_check.train"}
    assert set(train) == {"sample", "update"} and train["update"]["grad_norm"] > 0
    assert not [r for r in rows if "error" in r]
    assert "skipped" in (tmp_path / "out" / "gpu_tests.txt").read_text()  # the GPU tests ran and skipped cleanly
    summary = (tmp_path / "out" / "summary.md").read_text()
    for title in ("## Projection", "## Scoring", "## Trainer step", "step `train`: exit 0"):
        assert title in summary


def test_usage_errors_exit_2(tmp_path):
    assert run().returncode == 2
    r = run(tmp_path / "o", "--fast")
    assert r.returncode == 2 and "unknown option --fast" in r.stderr
