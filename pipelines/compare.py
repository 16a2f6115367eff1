"""Compare CROPI with its baselines on the same budget and seeds.

Reads the run directories of :mod:`pipelines.cropi_loop` and writes, under ROOT:
- ``comparison.json`` (strict JSON: missing figures are null): per method and seed, the
  accuracy curves, the final figures and the share of each stage's selection drawn from the
  target families; per method, 95 % bootstrap intervals of the final accuracies and of the
  difference to CROPI, paired by seed;
- ``comparison.md``: the table of those figures;
- ``comparison.png``: targeted accuracy against steps (mean over seeds, band = min..max) and the
  final targeted accuracy with its 95 % interval.

Accuracies: "targeted" = the test split of the target families (eval sets named
``<target>_test``), never the prompts that gave the target gradient (their val split, reported
apart as "target-gradient prompts"); the other eval sets are the other families.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

BOOTSTRAP = 2000  # resamples of (seeds, prompts) per interval
CI = 0.95


# The held-out metrics: the teacher-forced probability of the gold response (no sampling noise;
# a lower bound on expected accuracy at T = 1) and sampled accuracy. Keys: metrics row suffix,
# per-prompt key in RUN/eval/step-N.json, label.
METRICS = {
    "gold": ("_gold", "gold_per_prompt", "gold-response probability at T=1"),
    "accuracy": ("", "per_prompt", "sampled accuracy"),
}


def read_curves(run_dir: Path, metric: str = "accuracy") -> dict:
    """From RUN/metrics.jsonl: steps, targeted ``metric`` (mean over *_test sets), held-out
    ``metric`` (mean over the other families' sets), rollouts (responses generated) and training
    seconds. Eval rows without the metric (runs from before it existed) give None."""
    import yaml

    suffix = METRICS[metric][0]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    group = int((yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("train", {}).get("group_size", 1))
    evals = [r for r in rows if r.get("event") == "eval"]
    train = [r for r in rows if r.get("event") == "train"]
    steps, target, heldout = [], [], []
    for r in evals:
        sets = {**r.get("target" + suffix, {}), **r.get("heldout" + suffix, {})}
        tgt = [v for k, v in sets.items() if k.endswith("_test")]
        other = [v for k, v in r.get("heldout" + suffix, {}).items() if not k.endswith("_test")]
        steps.append(int(r["step"]))
        target.append(float(np.mean(tgt)) if tgt else None)
        heldout.append(float(np.mean(other)) if other else None)
    return {
        "steps": steps,
        "target": target,
        "heldout": heldout,
        "rollouts": int(sum(r.get("generated", 0) for r in train)) * group,
        "train_seconds": float(sum(r.get("seconds", 0.0) for r in train)),
        "reward_mean": [r.get("reward_mean") for r in train],
    }


def per_prompt(run_dir: Path, step: int, metric: str = "accuracy") -> dict:
    """{"targeted" | "gradient" | <other set name>: per-prompt ``metric`` [N] at eval ``step``}
    from RUN/eval/step-N.json (sets evaluated without per-prompt results are left out)."""
    key = METRICS[metric][1]
    path = run_dir / "eval" / f"step-{step}.json"
    if not path.exists():
        return {}
    ev = json.loads(path.read_text())
    out: dict = {}
    tests = []
    for group in ("target", "heldout"):
        for name, res in ev.get(group, {}).items():
            if key not in res:
                continue
            if name.endswith("_test"):
                tests += res[key]
            elif group == "target":
                out.setdefault("gradient", []).extend(res[key])
            else:
                out[name] = res[key]
    if tests:
        out["targeted"] = tests
    return out


def target_families(root: Path) -> set[str]:
    """Task names of the target sets under ROOT/data/targets."""
    import pyarrow.parquet as pq

    fams: set[str] = set()
    for p in sorted((root / "data" / "targets").glob("*.parquet")):
        if not p.name.endswith(".traj.parquet"):
            fams |= set(pq.read_table(p, columns=["task"]).column("task").to_pylist())
    return fams


def selection_shares(cur_dir: Path, families: set[str]) -> list[dict]:
    """Per curriculum stage: prompts, the share drawn from ``families`` and the share of each task."""
    from cropi import curriculum

    out = []
    for s in curriculum.stage_dirs(cur_dir):
        tasks = curriculum.read_stage(cur_dir, s)[0].column("task").to_pylist()
        per = {t: tasks.count(t) / len(tasks) for t in sorted(set(tasks))}
        out.append({"stage": s, "prompts": len(tasks), "target_share": sum(v for t, v in per.items() if t in families),
                    "per_task": per})
    return out


def stage_shares(method_dir: Path, families: set[str]) -> list[dict]:
    """`selection_shares` of every stage a method trained on: those made before training
    (METHOD-sSEED/curriculum) and those its re-scoring made (METHOD-sSEED/run/curriculum)."""
    by = {r["stage"]: r for r in selection_shares(method_dir / "curriculum", families)}
    if (method_dir / "run" / "curriculum").exists():
        by.update({r["stage"]: r for r in selection_shares(method_dir / "run" / "curriculum", families)})
    return [by[s] for s in sorted(by)]


def steps_to_reach(steps: list[int], acc: list, level) -> float | None:
    """First eval step whose accuracy ≥ level (None when never reached or no level)."""
    if level is None:
        return None
    for s, a in zip(steps, acc):
        if a is not None and a >= level - 1e-12:
            return float(s)
    return None


def reach_bound(row: dict) -> float | None:
    """Steps to reach full data's final value, for intervals: a run that never reaches it counts
    as one eval interval past its last step (a lower bound on its true steps). None without a
    full run for its seed."""
    if row["full_final_target"] is None:
        return None
    if row["steps_to_full_final"] is not None:
        return row["steps_to_full_final"]
    steps = row["curves"]["steps"]
    return float(steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 0))


def bootstrap_ci(acc: np.ndarray, seed: int = 0, n: int = BOOTSTRAP, level: float = CI) -> dict:
    """Mean of ``acc`` [S seeds, N prompts] and its percentile interval when seeds and prompts are
    resampled with replacement (the same prompt draw for every seed of a resample). A difference
    paired by seed is the same call on acc_a − acc_b. Returns {"mean", "lo", "hi", "seeds", "prompts"}."""
    acc = np.asarray(acc, dtype=np.float64)
    S, N = acc.shape
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    for b in range(0, n, 250):
        m = min(250, n - b)
        si = rng.integers(0, S, (m, S))
        pi = rng.integers(0, N, (m, N))
        means[b : b + m] = acc[si[:, :, None], pi[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(acc.mean()), "lo": float(lo), "hi": float(hi), "seeds": S, "prompts": N}


def _matrix(rows: list[dict], key: str) -> np.ndarray | None:
    """[seeds, prompts] of one eval set, or None when a seed lacks it or sizes differ."""
    vals = [r.get(key) for r in rows]
    if not vals or any(v is None for v in vals) or len({len(v) for v in vals}) != 1:
        return None
    return np.array(vals, dtype=np.float64)


def summarize_metric(runs: dict, families: set[str], metric: str, ref: str = "cropi") -> dict:
    """runs: {method: [method-seed dirs]} -> {"methods": per method its seeds' figures and the
    bootstrap intervals (``minus_ref``: paired by seed with method ``ref``), "full_gain"} for one
    held-out ``metric`` (a key of METRICS)."""
    out: dict = {"metric": metric, "label": METRICS[metric][2], "ref": ref, "methods": {}}
    full = {Path(d).name.rsplit("-s", 1)[1]: read_curves(Path(d) / "run", metric) for d in runs.get("full", [])}
    finals: dict = {}
    for m, dirs in runs.items():
        rows = []
        for d in map(Path, dirs):
            c = read_curves(d / "run", metric)
            seed = d.name.rsplit("-s", 1)[1]
            done = d / "done.json"
            fc = full.get(seed)
            level = fc["target"][-1] if fc and fc["target"] else None
            reach = steps_to_reach(c["steps"], c["target"], level)
            full_steps = fc["steps"][-1] if fc and fc["steps"] else None
            rows.append({
                "seed": int(seed),
                "final_target": c["target"][-1] if c["target"] else None,
                "initial_target": c["target"][0] if c["target"] else None,
                "final_heldout": c["heldout"][-1] if c["heldout"] else None,
                "full_final_target": level,
                "steps_to_full_final": reach,
                "total_steps": c["steps"][-1] if c["steps"] else 0,
                "acceleration": full_steps / reach if reach and full_steps else None,
                "rollouts": c["rollouts"],
                "wall_seconds": json.loads(done.read_text()).get("seconds") if done.exists() else None,
                "selection": stage_shares(d, families),
                "curves": c,
            })
            finals.setdefault(m, {})[int(seed)] = (per_prompt(d / "run", c["steps"][-1], metric) if c["steps"] else {},
                                                   per_prompt(d / "run", c["steps"][0], metric) if c["steps"] else {})
        out["methods"][m] = {"seeds": rows}
    reach = {m: {r["seed"]: reach_bound(r) for r in d["seeds"]} for m, d in out["methods"].items()}
    base = finals.get(ref, {})
    for m, d in out["methods"].items():
        seeds = sorted(finals[m])
        fin = [finals[m][s][0] for s in seeds]
        ci = {}
        for key in sorted({k for f in fin for k in f}):
            mat = _matrix(fin, key)
            if mat is not None:
                ci[key] = bootstrap_ci(mat)
        start = _matrix([finals[m][s][1] for s in seeds], "targeted")
        end = _matrix(fin, "targeted")
        if start is not None and end is not None and start.shape == end.shape:
            ci["gain"] = bootstrap_ci(end - start)
        common = [s for s in seeds if s in base]
        if m != ref and common:
            a = _matrix([finals[m][s][0] for s in common], "targeted")
            b = _matrix([base[s][0] for s in common], "targeted")
            if a is not None and b is not None and a.shape == b.shape:
                ci["minus_ref"] = bootstrap_ci(a - b)
        steps = [reach[m][s] for s in seeds]
        if "full" in out["methods"] and m != "full" and None not in steps:
            ci["steps"] = bootstrap_ci(np.array(steps, dtype=np.float64)[:, None])
            paired = [s for s in seeds if reach.get(ref, {}).get(s) is not None]
            if m != ref and paired:
                ci["steps_minus_ref"] = bootstrap_ci(np.array([reach[m][s] - reach[ref][s] for s in paired])[:, None])
        d["ci"] = ci
        stages = max((len(r["selection"]) for r in d["seeds"]), default=0)
        d["target_share"] = [float(np.mean([r["selection"][s]["target_share"] for r in d["seeds"] if len(r["selection"]) > s]))
                             for s in range(stages)]
    fg = out["methods"].get("full", {}).get("ci", {}).get("gain")
    if fg:
        gains = [r["final_target"] - r["initial_target"] for r in out["methods"]["full"]["seeds"]
                 if r["final_target"] is not None and r["initial_target"] is not None]
        sd = float(np.std(gains, ddof=1)) if len(gains) > 1 else None
        out["full_gain"] = {"mean": fg["mean"], "seed_sd": sd, "ratio": fg["mean"] / sd if sd else None}
    return out


def summarize(root: Path, runs: dict) -> dict:
    """runs: {method: [method-seed dirs]} -> the comparison dict, one block per held-out metric
    under "metrics" (also written to ROOT: comparison.json, .md, .png)."""
    root = Path(root)
    families = target_families(root)
    out: dict = {"target_families": sorted(families), "bootstrap": {"resamples": BOOTSTRAP, "level": CI,
                 "over": "seeds and prompts; differences paired by seed (same seed, same prompts)"},
                 "metrics": {m: summarize_metric(runs, families, m) for m in METRICS}}
    meta0 = root / "data" / "scores-stage-0" / "meta.json"
    if meta0.exists() and "check_influence" in (m0 := json.loads(meta0.read_text())):
        out["check_influence"] = m0["check_influence"]  # θ_0's scores: does the score predict a step's effect?
    write_json_strict(out, root / "comparison.json")
    (root / "comparison.md").write_text(table(out) + "\n")
    plot(out, root / "comparison.png")
    return out


def _strict(x):
    """NaN/inf -> None, numpy scalars -> python, recursively."""
    if isinstance(x, dict):
        return {str(k): _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json_strict(obj, path: Path) -> None:
    """Strict JSON (no NaN: null), written atomically."""
    from cropi import schema

    schema.write_json_atomic(json.loads(json.dumps(_strict(obj), allow_nan=False)), path)


def _ms(xs) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    return f"{np.mean(xs):.3f} ± {np.std(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def _ci(c: dict | None, signed: bool = False, digits: int = 3) -> str:
    if not c:
        return "—"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(c['mean'])} [{f.format(c['lo'])}, {f.format(c['hi'])}]"


def table(comp: dict) -> str:
    """Markdown: one table per held-out metric, then the influence check. Intervals are 95 %
    bootstrap over seeds and prompts."""
    parts = [f"**{b['label']}** (targeted = the target families' test split)\n\n{metric_table(b)}"
             for b in comp["metrics"].values()]
    ci = comp.get("check_influence")
    if ci:
        parts.append(f"check-influence (θ_0, {ci['n']} pool prompts; Spearman of the scores [exact cosines] against the "
                     "measured change of the target objective): "
                     + "; ".join(f"{st['rule']} step {st['step']:g}: {st['spearman']:.2f} [{st['spearman_exact']:.2f}]"
                                 for st in ci["steps"]))
    return "\n\n".join(parts)


def metric_table(block: dict) -> str:
    """Markdown of one metric block: one row per method."""
    methods, ref = block["methods"], block.get("ref", "cropi")
    has_full = "full" in methods
    own = {"targeted", "gradient", "gain", "minus_ref", "steps", "steps_minus_ref"}
    others = sorted({k for d in methods.values() for k in d.get("ci", {})} - own)
    head = (["method", "targeted [95 % CI]", f"minus {ref} (paired) [95 % CI]", "gain over step 0 [95 % CI]"]
            + list(others)
            + ["target-gradient prompts", "target share per stage", "steps to full-data final [95 % CI]",
               f"steps minus {ref} (paired) [95 % CI]", "rollouts", "wall s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, d in methods.items():
        s, ci = d["seeds"], d.get("ci", {})
        if not ci.get("targeted"):  # no per-prompt results: mean ± sd over seeds
            ci = {**ci, "targeted": None}
        tgt = _ci(ci["targeted"]) if ci["targeted"] else _ms([r["final_target"] for r in s])
        if m == "full":
            reach = f"{int(np.mean([r['total_steps'] for r in s]))} (its own final)"
        elif not has_full:
            reach = "n/a (no full run)"
        else:
            n = sum(r["steps_to_full_final"] is not None for r in s)
            reach = (_ci(ci.get("steps"), digits=1) if ci.get("steps") else "—") + (
                f" ({n}/{len(s)} seeds reach it)" if n < len(s) else "")
        share = " / ".join(f"{x:.2f}" for x in d.get("target_share", [])) or "—"
        row = ([m, tgt, "reference" if m == ref else _ci(ci.get("minus_ref"), True), _ci(ci.get("gain"), True)]
               + [_ci(ci.get(k)) for k in others]
               + [_ci(ci.get("gradient")), share, reach,
                  "reference" if m == ref else _ci(ci.get("steps_minus_ref"), True, digits=1),
                  str(int(np.mean([r["rollouts"] for r in s]))),
                  f"{np.mean([r['wall_seconds'] or 0 for r in s]):.0f}"])
        lines.append("| " + " | ".join(row) + " |")
    fg = block.get("full_gain")
    if fg and fg.get("ratio") is not None:
        lines.append(f"\nfull-data targeted gain {fg['mean']:+.3f}, seed-to-seed sd {fg['seed_sd']:.3f} "
                     f"(ratio {fg['ratio']:.1f})")
    return "\n".join(lines)


def plot(comp: dict, path: Path) -> None:
    """One row of panels per held-out metric: targeted metric against steps (mean over seeds, band
    = min..max) and its final value with the 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(comp["metrics"].values())
    fig, axes = plt.subplots(len(blocks), 2, figsize=(12, 4.5 * len(blocks)), gridspec_kw={"width_ratios": [3, 2]},
                             squeeze=False)
    for (ax, bx), block in zip(axes, blocks):
        _plot_metric(ax, bx, block)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_metric(ax, bx, block: dict) -> None:
    names, means, errs, colors = [], [], [], []
    for m, d in block["methods"].items():
        cs = [r["curves"] for r in d["seeds"] if r["curves"]["steps"] and None not in r["curves"]["target"]]
        if not cs:
            continue
        n = min(len(c["steps"]) for c in cs)
        steps = np.array(cs[0]["steps"][:n])
        acc = np.array([c["target"][:n] for c in cs], dtype=float)
        (line,) = ax.plot(steps, acc.mean(0), marker="o", ms=3, label=f"{m} (n={len(cs)})",
                          lw=2.2 if m == "cropi" else 1.4)
        ax.fill_between(steps, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.12)
        c = d.get("ci", {}).get("targeted")
        if c:
            names.append(m)
            means.append(c["mean"])
            errs.append([c["mean"] - c["lo"], c["hi"] - c["mean"]])
            colors.append(line.get_color())
    ax.set_xlabel("training step (same batch × group for every method)")
    ax.set_ylabel(f"targeted {block['label']}")
    ax.set_title("mean over seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if names:
        bx.barh(names, means, xerr=np.array(errs).T, color=colors, alpha=0.8, capsize=3)
        bx.invert_yaxis()
        bx.set_xlabel("final, 95 % CI (bootstrap: seeds × prompts)")
        bx.grid(alpha=0.3, axis="x")
        bx.set_title(f"final targeted {block['label']}")
    else:
        bx.remove()
