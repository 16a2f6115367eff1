"""`RUN/plots/curves.png`: training and evaluation curves from `RUN/metrics.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path

from cropi.schema import atomic_file

TRAIN_PANELS = (
    ("reward_mean", "mean reward"),
    ("zero_var_frac", "zero-variance groups"),
    ("entropy", "entropy (nats/token)"),
    ("kl", "KL to reference (k3)"),
    ("resp_len", "response length (tokens)"),
    ("clip_frac", "clip fraction"),
    ("loss", "loss"),
)


def read_metrics(path) -> list[dict]:
    """Rows of a metrics.jsonl file (missing file: no rows)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path, out) -> Path:
    """Draw one panel per training metric against step (stage boundaries dotted) and one with
    every eval set's accuracy; write a PNG atomically. Returns `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("event") == "train"]
    evals = [r for r in rows if r.get("event") == "eval"]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), constrained_layout=True)
    axes = axes.ravel()
    bounds = [b["step"] - 1 for a, b in zip(train, train[1:]) if b["stage"] != a["stage"]]
    for ax, (key, title) in zip(axes, TRAIN_PANELS):
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), lw=1.2)
        for x in bounds:
            ax.axvline(x + 0.5, color="grey", ls=":", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
    ax = axes[len(TRAIN_PANELS)]
    for group in ("target", "heldout"):
        names = sorted({n for r in evals for n in r.get(group, {})})
        for name in names:
            pts = [(r["step"], r[group][name]) for r in evals if name in r.get(group, {})]
            ax.plot(
                *zip(*pts),
                marker="o",
                ms=3,
                ls="-" if group == "target" else "--",
                label=f"{group}: {name}",
            )
    if evals:
        ax.legend(fontsize=7)
    ax.set_title("eval accuracy")
    ax.set_xlabel("step")
    out = Path(out)
    try:
        with atomic_file(out) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(fig)
    return out
