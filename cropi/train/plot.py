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
    """Draw one panel per logged training metric against step (stage boundaries dotted; the KL
    panel only when a KL term was used) and one with every eval set's accuracy; write a PNG
    atomically. Returns `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("event") == "train"]
    evals = [r for r in rows if r.get("event") == "eval"]
    bounds = [b["step"] - 1 for a, b in zip(train, train[1:]) if b["stage"] != a["stage"]]
    panels = []  # (title, y label, [(label, style, points)]): only metrics that were logged
    for key, title in TRAIN_PANELS:
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if pts and not (key == "kl" and all(v == 0 for _, v in pts)):  # KL is 0 when there is no reference
            panels.append((title, title, [(None, "-", pts)]))
    lines = []
    for group in ("target", "heldout"):
        for name in sorted({n for r in evals for n in r.get(group, {})}):
            pts = [(r["step"], r[group][name]) for r in evals if name in r.get(group, {})]
            lines.append((f"{group}: {name}", "-" if group == "target" else "--", pts))
    if lines:
        panels.append(("eval accuracy", "accuracy", lines))
    cols = min(4, max(1, len(panels)))
    rows_n = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.5 * rows_n), constrained_layout=True, squeeze=False)
    axes = axes.ravel()
    for ax, (title, ylabel, series) in zip(axes, panels):
        for label, ls, pts in series:
            ax.plot(*zip(*pts), lw=1.2, ls=ls, label=label, marker="o" if label else None, ms=3)
        if series[0][0]:
            ax.legend(fontsize=7)
        for x in bounds:
            ax.axvline(x + 0.5, color="grey", ls=":", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
    for ax in axes[len(panels):]:
        ax.remove()
    if not panels:
        fig.text(0.5, 0.5, "no metrics logged yet", ha="center", va="center")
    out = Path(out)
    try:
        with atomic_file(out) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(fig)
    return out
