"""Calibrate the selection study before comparing selectors: does RL move held-out accuracy at all?

A study in which not even the oracle (training on the target family's prompts only) moves the
targeted metric answers nothing, so the study's learning rate and prompts per step are chosen
here: for every (lr, prompts a step) of a grid, the oracle and full data train with several
seeds on the study's own data and budget (``cropi_loop.run_method``), and the targeted gain
(final minus step 0, test split of the target families) is reported per held-out metric with
its seed-to-seed spread. The study uses the setting whose oracle gain on the gold-response
probability is the largest multiple of its spread.

    ROOT/calibrate/lr<LR>-b<B>/<method>-s<seed>/    the runs (resumable, skipped when done)
    ROOT/calibration.json, ROOT/calibration.md       the table

Run: ``python -m pipelines.calibrate configs/validate.yaml --lr 2e-5 --lr 1e-4 --batch 8 --batch 32``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import click
import numpy as np

from pipelines import compare, cropi_loop


def gains(base: Path, metric: str) -> dict:
    """Targeted and other-family change from step 0 to the last eval of one run, for ``metric``."""
    c = compare.read_curves(base / "run", metric)
    if not c["steps"] or c["target"][0] is None:
        return {}
    return {"initial": c["target"][0], "final": c["target"][-1], "gain": c["target"][-1] - c["target"][0],
            "heldout_gain": c["heldout"][-1] - c["heldout"][0] if c["heldout"][0] is not None else None,
            "best": max(c["target"]), "steps": c["steps"][-1]}


def summarize(cells: list[dict]) -> list[dict]:
    """Per (lr, batch, method, metric): mean gain over seeds, its sample sd and their ratio."""
    out = []
    for cell in cells:
        for metric in compare.METRICS:
            g = [r[metric] for r in cell["runs"] if r.get(metric)]
            if not g:
                continue
            gain = np.array([x["gain"] for x in g])
            sd = float(gain.std(ddof=1)) if len(gain) > 1 else None
            held = [x["heldout_gain"] for x in g if x["heldout_gain"] is not None]
            out.append({"lr": cell["lr"], "batch": cell["batch"], "method": cell["method"], "metric": metric,
                        "seeds": len(g), "initial": float(np.mean([x["initial"] for x in g])),
                        "gain": float(gain.mean()), "seed_sd": sd,
                        "ratio": float(gain.mean() / sd) if sd else None,
                        "heldout_gain": float(np.mean(held)) if held else None,
                        "per_seed": gain.round(4).tolist()})
    return out


def table(rows: list[dict]) -> str:
    """Markdown: one row per (lr, prompts a step, method), both metrics side by side."""
    by = {}
    for r in rows:
        by.setdefault((r["lr"], r["batch"], r["method"]), {})[r["metric"]] = r
    head = ["lr", "prompts/step", "method", "seeds", "gold: step 0", "gold: gain (mean ± sd)", "gold: gain/sd",
            "gold: other families' gain", "sampled acc.: step 0", "sampled acc.: gain (mean ± sd)", "sampled: gain/sd"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(x, fmt="{:+.4f}"):
        return "—" if x is None else fmt.format(x)

    for (lr, b, m), d in sorted(by.items()):
        g, a = d.get("gold", {}), d.get("accuracy", {})
        lines.append("| " + " | ".join([
            f"{lr:g}", str(b), m, str(g.get("seeds", a.get("seeds", 0))),
            f(g.get("initial"), "{:.4f}"), f"{f(g.get('gain'))} ± {f(g.get('seed_sd'), '{:.4f}')}", f(g.get("ratio"), "{:.1f}"),
            f(g.get("heldout_gain")),
            f(a.get("initial"), "{:.3f}"), f"{f(a.get('gain'), '{:+.3f}')} ± {f(a.get('seed_sd'), '{:.3f}')}",
            f(a.get("ratio"), "{:.1f}")]) + " |")
    return "\n".join(lines)


def finished_cells(root: Path) -> list[dict]:
    """Every (lr, batch, method) cell under ROOT/calibrate with the seeds that finished."""
    cells = []
    for sub in sorted((Path(root) / "calibrate").glob("lr*-b*")):
        lr, batch = sub.name[2:].rsplit("-b", 1)
        by: dict = {}
        for base in sorted(sub.glob("*-s*")):
            if (base / "done.json").exists():
                method, seed = base.name.rsplit("-s", 1)
                by.setdefault(method, []).append({"seed": int(seed), **{m: gains(base, m) for m in compare.METRICS}})
        cells += [{"lr": float(lr), "batch": int(batch), "method": m, "runs": runs} for m, runs in sorted(by.items())]
    return cells


def write(root: Path, cfg: dict, cells: list[dict], grid: dict) -> list[dict]:
    """ROOT/calibration.{json,md} from ``cells``; returns the summary rows."""
    rows = summarize(cells)
    compare.write_json_strict({"config": cfg["name"], "train": cfg["train"], "grid": grid, "rows": rows, "cells": cells},
                              Path(root) / "calibration.json")
    (Path(root) / "calibration.md").write_text(table(rows) + "\n")
    return rows


def calibrate(cfg: dict, root: Path, lrs: list[float], batches: list[int], seeds: list[int],
              methods: tuple[str, ...] = ("oracle", "full")) -> list[dict]:
    """Train every (lr, batch, method, seed) on the study's data (``cfg`` = its resolved config),
    write ROOT/calibration.{json,md} and return the summary rows."""
    root = Path(root)
    data = cropi_loop.prepare_data(cfg, root)
    cells = []
    for batch in batches:
        for lr in lrs:
            sub = root / "calibrate" / f"lr{lr:g}-b{batch}"
            c = copy.deepcopy(cfg)
            c["train"].update(lr=lr, batch_prompts=batch)
            for method in methods:
                runs = []
                for seed in seeds:
                    base = cropi_loop.run_method(c, method, seed, data, sub)
                    runs.append({"seed": seed, **{m: gains(base, m) for m in compare.METRICS}})
                cells.append({"lr": lr, "batch": batch, "method": method, "runs": runs})
    return write(root, cfg, cells, {"lr": lrs, "batch": batches, "seeds": seeds, "methods": list(methods)})


@click.command()
@click.argument("config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: runs/NAME, shared with the study's data].")
@click.option("--lr", "lrs", type=click.FloatRange(min=0, min_open=True), multiple=True,
              help="Learning rates, repeatable (at least one unless --data-only).")
@click.option("--batch", "batches", type=click.IntRange(min=1), multiple=True,
              help="Prompts a step, repeatable (at least one unless --data-only).")
@click.option("--seed", "seeds", type=click.IntRange(min=0), multiple=True, default=(0, 1, 2), show_default=True)
@click.option("--method", "methods", type=click.Choice(["oracle", "full"]), multiple=True,
              default=("oracle", "full"), show_default=True)
@click.option("--data-only", is_flag=True, help="Only make the study's data and offline rollout, then stop.")
@click.option("--table-only", is_flag=True, help="Only the table of the runs that finished, training nothing.")
def main(config_path, root, lrs, batches, seeds, methods, data_only, table_only):
    """Calibrate the study in CONFIG_PATH: oracle and full data over a grid of lr × prompts a step."""
    cfg = cropi_loop.load_config(config_path)
    root = root or Path("runs") / cfg["name"]
    if data_only:
        cropi_loop.prepare_data(cfg, root)
        return
    if table_only:
        click.echo(table(write(root, cfg, finished_cells(root), {"finished runs only": True})))
        return
    if not lrs or not batches:
        raise click.UsageError("give at least one --lr and one --batch")
    rows = calibrate(cfg, root, list(lrs), list(batches), list(seeds), tuple(methods))
    click.echo(table(rows))


if __name__ == "__main__":
    main()
