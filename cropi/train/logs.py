"""Evaluation and logging of a training run: target/held-out accuracy rows, metrics.jsonl
repair on resume, and TensorBoard events when it is installed."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from cropi import models, schema
from cropi.evaluate import evaluate, gold_probability
from cropi.runtime import derive_seed, verbosity
from cropi.train.config import TrainConfig


def eval_now(
    policy: models.Policy, sets: dict, cfg: TrainConfig, step: int, stage: int, run_dir: Path
) -> dict:
    """Accuracy on every eval set: greedy, or the mean pass rate of `eval_samples` responses at
    `eval_temperature`; beside it the teacher-forced probability of the gold response at T = 1
    (`evaluate.gold_probability`: no sampling noise). The sampling seed depends on the set, not
    the step (common random numbers: successive evals differ by the policy's change, not by
    sampling noise). Full results go to RUN/eval/step-N.json; returns the metrics row."""
    t0 = time.time()
    full = {
        group: {
            name: _eval_set(policy, rows, cfg, derive_seed(cfg.seed, "eval", group, name))
            for name, rows in named.items()
        }
        for group, named in sets.items()
    }
    schema.write_json_atomic(
        {"step": step, "stage": stage, **full}, run_dir / "eval" / f"step-{step}.json"
    )
    return {
        "event": "eval",
        "step": step,
        "stage": stage,
        **{group: {name: r["accuracy"] for name, r in res.items()} for group, res in full.items()},
        **{f"{group}_gold": {name: r["gold_prob"] for name, r in res.items()} for group, res in full.items()},
        "seconds": round(time.time() - t0, 3),
    }


def _eval_set(policy: models.Policy, rows: list[dict], cfg: TrainConfig, seed: int) -> dict:
    """`evaluate` of one set plus its gold probability ("gold_prob", "gold_per_prompt")."""
    res = evaluate(policy, rows, n_samples=cfg.eval_samples, temperature=cfg.eval_temperature,
                   max_new_tokens=cfg.max_new_tokens, seed=seed)
    gold = gold_probability(policy, rows)
    return {**res, "gold_prob": gold["gold_prob"], "gold_per_prompt": gold["per_prompt"]}


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the metrics rows of steps <= last_step (a resumed run rewrites what follows).

    A torn last line (a kill while a row was written) is dropped: rows are written before the
    checkpoint of their step, so a torn row always belongs to a step after the last checkpoint.
    An unreadable row anywhere else raises InputError naming the file and line."""
    if not path.exists():
        return
    lines = path.read_text(errors="replace").splitlines()
    keep = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int):
            if i == len(lines) - 1:
                break
            raise schema.InputError(path, None, None, f"line {i + 1}: not a metrics row")
        if step <= last_step:
            keep.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


TB_NOTICE = []  # the "not installed" notice is printed once per process


def tensorboard(run_dir: Path, purge_step: int):
    """A SummaryWriter on RUN/tb/, or None (with a one-time notice) without the `tb` extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not TB_NOTICE and verbosity() > 0:
            TB_NOTICE.append(True)
            print("cropi: TensorBoard is not installed, so no RUN/tb/ events "
                  "(pip install 'cropi[tb]'); metrics.jsonl and plots/ are written as always",
                  file=sys.stderr)
        return None
    return SummaryWriter(str(run_dir / "tb"), purge_step=purge_step or None)


def tb_row(tb, row: dict) -> None:
    """Numeric fields of a metrics row as scalars `EVENT/FIELD` (dict fields: `EVENT/FIELD/KEY`)."""
    for k, v in row.items():
        if isinstance(v, int | float) and k not in ("step", "event"):
            tb.add_scalar(f"{row['event']}/{k}", v, row["step"])
        elif isinstance(v, dict):
            for name, x in v.items():
                tb.add_scalar(f"{row['event']}/{k}/{name}", x, row["step"])
