"""The remedies for a selection that does not beat random (docs/validate-comparison.md).

Each remedy is one way of scoring (or re-scoring) that the CROPI paper or LESS uses, run on the
study's own data and budget and compared with the study's methods, paired by seed (one more
entry is a control that keeps a random target-family draw for all steps, as cropi-norescore
keeps its stage):

    STUDY/data/...                the study's pool, offline rollout, test and held-out sets (read)
    OUT/<remedy>/data/...         hard links to them (θ_0's scores too when the scoring is unchanged)
    OUT/<remedy>/<method>-s<seed>/  one run, as in the study (`pipelines.cropi_loop.run_method`)
    OUT/remedies.md, .json        the table: every remedy beside the study's random, cropi-norescore,
                                  family-random, oracle and cropi, differences paired with random

The influence check (`score.check_influence`) is off in the remedies: it does not change scores.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from pipelines import compare, cropi_loop


def twice_the_stages(cfg: dict) -> list[str]:
    """Re-score twice as often on the same budget: twice the stages, half the steps in each."""
    t = cfg["train"]
    if t["steps_per_stage"] % 2:
        raise click.UsageError(f"rescore-2x halves train.steps_per_stage: {t['steps_per_stage']} is odd")
    return [f"train.stages={2 * t['stages']}", f"train.steps_per_stage={t['steps_per_stage'] // 2}"]


def one_stage(cfg: dict) -> list[str]:
    """All steps in one stage: the stage drawn once is kept, as cropi-norescore keeps θ_0's."""
    t = cfg["train"]
    return ["train.stages=1", f"train.steps_per_stage={t['stages'] * t['steps_per_stage']}"]


# name -> (config overrides, or a function of the study's config giving them; method; what it changes)
REMEDIES = {
    "last-block": (["score.params=last:1"], "cropi-norescore",
                   "gradients of the last transformer block only (--params last:1)"),
    "adam-sign": (["score.pool_grad=sign"], "cropi-norescore",
                  "pool features sign(g_x): the direction of a first Adam step (--pool-grad sign)"),
    "targets-512": (["data.target_per_spec=512"], "cropi-norescore",
                    "the target gradient from 512 val prompts instead of 64"),
    "rescore-2x": (twice_the_stages, "cropi",
                   "re-scoring twice as often: twice the stages, half the steps each (the same steps in all)"),
    "family-random-kept": (one_stage, "family-random",
                           "a control, not a remedy: one random draw of the target family kept for all steps, "
                           "as cropi-norescore keeps its stage"),
}
STUDY_METHODS = ("random", "family-random", "cropi-norescore", "cropi", "oracle", "full")


def link_data(study: Path, root: Path, overrides: list[str]) -> None:
    """Hard-link the study's data into ROOT/data: everything when only training changes; without
    θ_0's scores when the scoring changes; without the target sets when the data does."""
    keys = [o.split("=", 1)[0] for o in overrides]
    skip = set()
    if any(k.startswith(("score.", "data.")) for k in keys):
        skip.add("scores-stage-0")
    if any(k.startswith("data.target") for k in keys):
        skip.add("targets")
    src = study / "data"
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if not path.is_file() or rel.parts[0] in skip:
            continue
        dst = root / "data" / rel
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, dst)


def overrides_of(name: str, cfg: dict) -> list[str]:
    """The config overrides of remedy ``name`` on the study's resolved ``cfg``."""
    overrides = REMEDIES[name][0]
    return list(overrides(cfg) if callable(overrides) else overrides)


def run_remedy(config: Path, study: Path, out: Path, name: str, seeds: list[int]) -> list[str]:
    """Run one remedy with ``seeds``; returns its method-seed dirs."""
    method = REMEDIES[name][1]
    overrides = overrides_of(name, cropi_loop.load_config(config))
    cfg = cropi_loop.load_config(config, [*overrides, "score.check_influence=0", f"name={name}"])
    root = out / name
    link_data(study, root, overrides)
    return cropi_loop.run(cfg, root, [method], seeds)[method]


def summarize(study: Path, out: Path, seeds: list[int]) -> dict:
    """The table over the finished runs: the study's methods and every remedy, one row each,
    differences paired by seed with random (`pipelines.compare.summarize_metric`)."""
    def finished(base: Path, method: str) -> list[str]:
        return [str(base / f"{method}-s{s}") for s in seeds if (base / f"{method}-s{s}" / "done.json").exists()]

    runs = {m: finished(study, m) for m in STUDY_METHODS}
    for name, (_, method, _) in REMEDIES.items():
        runs[name] = finished(out / name, method)
    runs = {m: d for m, d in runs.items() if d}
    families = compare.target_families(study)
    comp = {"remedies": {n: {"method": m, "what": w} for n, (_, m, w) in REMEDIES.items()},
            "metrics": {m: compare.summarize_metric(runs, families, m, ref="random") for m in compare.METRICS}}
    compare.write_json_strict(comp, out / "remedies.json")
    text = "\n\n".join(f"**{b['label']}**\n\n{compare.metric_table(b)}" for b in comp["metrics"].values())
    text += "\n\n" + "\n".join(f"- {n}: {w} (method {m})" for n, (_, m, w) in REMEDIES.items())
    (out / "remedies.md").write_text(text + "\n")
    return comp


@click.command()
@click.argument("config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--study", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/validate"),
              show_default=True, help="The study's folder (`cropi run CONFIG`): its data and methods.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/validate-remedies"),
              show_default=True)
@click.option("--remedy", "names", type=click.Choice(list(REMEDIES)), multiple=True,
              help="Only these remedies, repeatable [default: all].")
@click.option("--seed", "seeds", type=click.IntRange(min=0), multiple=True, default=(0, 1, 2, 3, 4), show_default=True)
@click.option("--table-only", is_flag=True, help="Only write the table of the finished runs.")
def main(config_path, study, out, names, seeds, table_only):
    """Run the remedies of CONFIG's study (`make remedies`) and write OUT/remedies.md."""
    if not (study / "data" / "pool.traj.parquet").exists():
        raise click.UsageError(f"{study}/data has no study data: run `cropi run {config_path}` first")
    if not table_only:
        for name in names or REMEDIES:
            run_remedy(config_path, study, out, name, list(seeds))
    out.mkdir(parents=True, exist_ok=True)
    comp = summarize(study, out, list(seeds))
    click.echo((out / "remedies.md").read_text())
    return comp


if __name__ == "__main__":
    main()
