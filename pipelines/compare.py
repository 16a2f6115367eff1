"""Compare CROPI with its baselines on the same budget and seeds.

Reads the run directories of :mod:`pipelines.cropi_loop` and writes, under ROOT:
- ``comparison.json``: per method and seed, the target-accuracy curve and the summary figures;
- ``comparison.md``: the table — steps each method needs to reach the full-data run's final
  targeted accuracy (the paper's step-level acceleration), final targeted and held-out accuracy,
  rollouts and wall time, as mean ± std over seeds;
- ``comparison.png``: targeted accuracy against steps, one curve per method (mean and spread).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

TARGET_GROUP = "tests"  # eval sets named "<target>_test": the targeted accuracy


def read_curves(run_dir: Path) -> dict:
    """From RUN/metrics.jsonl: steps, targeted accuracy (mean over *_test sets), held-out accuracy,
    rollouts (responses generated) and training seconds."""
    import yaml

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    group = int((yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("train", {}).get("group_size", 1))
    evals = [r for r in rows if r.get("event") == "eval"]
    train = [r for r in rows if r.get("event") == "train"]
    steps, target, heldout = [], [], []
    for r in evals:
        sets = {**r.get("targets", {}), **r.get("heldout", {})}
        tgt = [v for k, v in sets.items() if k.endswith("_test")]
        other = [v for k, v in r.get("heldout", {}).items() if not k.endswith("_test")]
        steps.append(int(r["step"]))
        target.append(float(np.mean(tgt)) if tgt else float("nan"))
        heldout.append(float(np.mean(other)) if other else float("nan"))
    return {
        "steps": steps,
        "target": target,
        "heldout": heldout,
        "rollouts": int(sum(r.get("generated", 0) for r in train)) * group,
        "train_seconds": float(sum(r.get("seconds", 0.0) for r in train)),
        "reward_mean": [float(r.get("reward_mean", float("nan"))) for r in train],
    }


def steps_to_reach(steps: list[int], acc: list[float], level: float) -> float:
    """First eval step whose accuracy ≥ level (NaN when never reached)."""
    for s, a in zip(steps, acc):
        if a >= level - 1e-12:
            return float(s)
    return float("nan")


def _ms(xs) -> str:
    xs = [x for x in xs if not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return "not reached"
    return f"{np.mean(xs):.3f} ± {np.std(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def summarize(root: Path, runs: dict) -> dict:
    """runs: {method: [method-seed dirs]} -> the comparison dict (also written to ROOT)."""
    curves = {m: [read_curves(Path(d) / "run") for d in dirs] for m, dirs in runs.items()}
    for m, dirs in runs.items():
        for c, d in zip(curves[m], dirs):
            done = Path(d) / "done.json"
            c["wall_seconds"] = json.loads(done.read_text()).get("seconds") if done.exists() else None
    out = {"methods": {}}
    full = curves.get("full", [])
    for m, cs in curves.items():
        rows = []
        for i, c in enumerate(cs):
            ref = full[i] if i < len(full) else None
            level = ref["target"][-1] if ref and ref["target"] else float("nan")
            reach = steps_to_reach(c["steps"], c["target"], level)
            full_steps = ref["steps"][-1] if ref and ref["steps"] else float("nan")
            rows.append({
                "final_target": c["target"][-1] if c["target"] else float("nan"),
                "final_heldout": c["heldout"][-1] if c["heldout"] else float("nan"),
                "full_final_target": level,
                "steps_to_full_final": reach,
                "total_steps": c["steps"][-1] if c["steps"] else 0,
                "acceleration": full_steps / reach if reach and not math.isnan(reach) and reach > 0 else float("nan"),
                "rollouts": c["rollouts"],
                "wall_seconds": c["wall_seconds"],
            })
        out["methods"][m] = {"seeds": rows, "curves": cs}
    (root / "comparison.json").write_text(json.dumps(out, indent=1, default=float) + "\n")
    (root / "comparison.md").write_text(table(out) + "\n")
    plot(out, root / "comparison.png")
    return out


def table(comp: dict) -> str:
    head = ("| method | steps to full-data final target acc. | step-level acceleration vs full | final targeted acc. "
            "| final held-out acc. | rollouts | wall s |")
    lines = [head, "|" + "---|" * 7]
    for m, d in comp["methods"].items():
        s = d["seeds"]
        reach = [r["steps_to_full_final"] for r in s]
        n_reached = sum(not math.isnan(x) for x in reach)
        reach_txt = _ms(reach) + (f" ({n_reached}/{len(s)} seeds)" if n_reached < len(s) else "")
        accel = "1 (reference: its own final)" if m == "full" else _ms([r["acceleration"] for r in s])
        if m == "full":
            reach_txt = f"{int(np.mean([r['total_steps'] for r in s]))} (all its steps)"
        lines.append(
            f"| {m} | {reach_txt} | {accel} | {_ms([r['final_target'] for r in s])} "
            f"| {_ms([r['final_heldout'] for r in s])} | {int(np.mean([r['rollouts'] for r in s]))} "
            f"| {np.mean([r['wall_seconds'] or 0 for r in s]):.0f} |"
        )
    return "\n".join(lines)


def plot(comp: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, d in comp["methods"].items():
        cs = [c for c in d["curves"] if c["steps"]]
        if not cs:
            continue
        n = min(len(c["steps"]) for c in cs)
        steps = np.array(cs[0]["steps"][:n])
        acc = np.array([c["target"][:n] for c in cs])
        mean, lo, hi = acc.mean(0), acc.min(0), acc.max(0)
        (line,) = ax.plot(steps, mean, marker="o", ms=3, label=f"{m} (n={len(cs)})", lw=2.2 if m == "cropi" else 1.4)
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training step (same batch × group for every method)")
    ax.set_ylabel("targeted accuracy (target families' test split)")
    ax.set_title("CROPI vs baselines: mean over seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
