"""The CROPI loop (docs/design.md): data -> one offline rollout -> per stage: score with θ_s on
the same offline trajectories, select the top 10 %, train K steps, evaluate.

    ROOT/data/pool.parquet, targets/<name>.parquet (val split), tests/<name>.parquet (test split
        of the target families), heldout/<name>.parquet (test split of other families)   prompts
    ROOT/data/pool.traj.parquet, targets/<name>.traj.parquet                    offline rollouts (β = θ_0)
    ROOT/data/scores-stage-0/                                                    θ_0's scores (shared by all seeds)
    ROOT/<method>-s<seed>/curriculum/stage-NNN/                                   the shards made before training
    ROOT/<method>-s<seed>/run/                                                    cropi.train run dir
          (curriculum/ and scores/stage-S/: cropi's re-scored stages, checkpoints/, metrics.jsonl, eval/, plots/)
    ROOT/config.yaml                                                              the resolved config
    ROOT/<method>-s<seed>/done.json                                               written when finished

Every step is skipped when its output exists, and a killed run resumes at the stage and step it
stopped at (the trainer's own --resume). Baselines share the data, the budget (stages × steps ×
batch × group) and the seeds:
- ``full``: the whole pool, one stage of stages × steps;
- ``random``: a fresh random 10 % per stage; ``learnability``: the top 10 % by p(1−p);
- ``vcrl``: the whole pool with VCRL's variance-based group filtering and replay in the trainer;
- ``oracle``: only the pool's prompts of the target families (by task name), one stage;
- ``family-random``: a fresh random draw of the target families' pool prompts per stage, as many
  as a 10 % stage (it separates choosing the family from CROPI's choice within it);
- ``cropi-norescore``: the top 10 % by θ_0's scores (stage 0), one stage of stages × steps;
- ``cropi``: popi selection re-scored with the current checkpoint before every stage.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pyarrow as pa

from cropi import config, curriculum, models, schema, tasks
from cropi.rollout import rollout
from cropi.runtime import derive_seed
from cropi.train.config import TrainConfig
from cropi.train.loop import RunSpec, train

METHODS = config.METHODS
ONE_STAGE = ("full", "vcrl", "oracle", "cropi-norescore")  # one stage of stages × steps
DEFAULT_SPECS = {
    "pool": tasks.DEFAULT_TRAIN_SPECS,
    "targets": tasks.DEFAULT_TARGET_SPECS,
    "heldout": tasks.DEFAULT_HELDOUT_SPECS,
}


def load_config(path, overrides=()) -> dict:
    """A run config (configs/*.yaml) with `key=value` overrides, validated and resolved (every
    key present, see `cropi.config.run_layout`); ``name`` defaults to the file's stem."""
    return config.load_run(path, overrides)


def _specs(value, group: str) -> list[str]:
    if value in (None, "default"):
        return list(DEFAULT_SPECS[group])
    return list(value)


def prepare_data(cfg: dict, root: Path) -> dict:
    """Make (or reuse) the prompt sets and the one offline rollout of the pool and target sets.
    The target sets (val split) give the target gradients; accuracy is measured on the test split
    of the same families ("tests", the targeted accuracy) and of other families ("heldout").
    Returns paths: {"pool", "pool_traj", "targets": {name: traj}, "tests": {name: prompts},
    "heldout": {name: prompts}}."""
    data, ro = cfg["data"], cfg["rollout"]
    seed, model = cfg["seed"], cfg["model"]
    d = root / "data"

    def prompts(path: Path, specs, n, split, s):
        if not path.exists():
            table = tasks.make_pool(specs, n, s, split)
            schema.write_parquet_atomic(table, path, metadata={"kind": "prompts", "specs": specs, "n": n, "seed": s, "split": split})
        return path

    def traj(prompts_path: Path, s: int) -> Path:
        out = prompts_path.with_name(prompts_path.name.replace(".parquet", ".traj.parquet"))
        if not out.exists():
            rollout(prompts_path, out, model=model, n=ro["n"], temperature=ro["temperature"],
                    max_new_tokens=ro["max_new_tokens"], seed=s, resume=True, device=cfg["device"])
        return out

    if data["pool_source"]:  # the user's own prompts, read with data.columns / data.split
        pool = d / "pool.parquet"
        if not pool.exists():
            table = schema.read_table(data["pool_source"], "prompts", columns=data["columns"], split=data["split"])
            schema.write_parquet_atomic(schema.prompt_columns(table), pool,
                                        metadata={"kind": "prompts", "source": str(data["pool_source"])})
    else:
        pool = prompts(d / "pool.parquet", _specs(data["pool"], "pool"), data["pool_per_spec"], "train", seed)
    out = {"pool": pool, "pool_traj": traj(pool, derive_seed(seed, "rollout", "pool")), "targets": {}, "tests": {}, "heldout": {}}
    per = {"targets": data["target_per_spec"], "heldout": data["heldout_per_spec"]}
    per["tests"] = data["test_per_spec"] or per["targets"]
    for name, specs in data["targets"].items():
        specs = _specs(specs, "targets")
        p = prompts(d / "targets" / f"{name}.parquet", specs, per["targets"], "val", derive_seed(seed, "targets", name))
        out["targets"][name] = traj(p, derive_seed(seed, "rollout", "targets", name))
        out["tests"][f"{name}_test"] = prompts(d / "tests" / f"{name}_test.parquet", specs, per["tests"], "test",
                                               derive_seed(seed, "tests", name))
    for name, specs in data["heldout"].items():
        out["heldout"][name] = prompts(d / "heldout" / f"{name}.parquet", _specs(specs, "heldout"), per["heldout"], "test",
                                       derive_seed(seed, "heldout", name))
    return out


def _spec(cfg: dict, method: str, seed: int, data: dict, cur: Path) -> RunSpec:
    """The trainer's RunSpec for one method: same budget for all, shapes per method."""
    tc = TrainConfig.from_dict({**cfg["train"], "seed": seed})
    stages, steps = tc.stages, tc.steps_per_stage
    if method in ONE_STAGE:  # one stage, same number of steps
        tc = dataclasses.replace(tc, stages=1, steps_per_stage=stages * steps, vcrl=(method == "vcrl"))
    sc = cfg["score"]
    return RunSpec(
        curriculum=str(cur),
        model=cfg["model"],
        targets=[str(p) for p in data["targets"].values()],
        heldout=[str(p) for p in [*data["tests"].values(), *data["heldout"].values()]],
        rescore=(method == "cropi"),
        trajectories=str(data["pool_traj"]),
        selector="popi",
        ratio=cfg["select"]["ratio"],
        projector=sc["projector"],
        k=sc["k"],
        combine=sc["combine"],
        params=sc["params"],
        pool_grad=sc["pool_grad"],
        train=tc,
    )


def target_families(data: dict) -> set[str]:
    """Task names of the target sets' prompts (a "family" is a reasoning-gym task)."""
    return {t for p in data["targets"].values() for t in schema.read_table(p).column("task").to_pylist()}


def target_pool(data: dict) -> Path:
    """The pool's trajectories of the target families (the oracle's data), written once."""
    out = Path(data["pool_traj"]).with_name("pool-target-families.traj.parquet")
    if not out.exists():
        import pyarrow.compute as pc

        table = schema.read_table(data["pool_traj"])
        keep = pc.is_in(table.column("task"), value_set=pa.array(sorted(target_families(data))))
        schema.write_parquet_atomic(table.filter(keep), out, metadata={"kind": "trajectories", "source": str(data["pool_traj"]),
                                                                      "filter": "target families"})
    return out


def stage0_scores(cfg: dict, data: dict, spec: RunSpec) -> Path:
    """θ_0's scores of the pool (the same for every seed: computed once), with the influence check
    when ``score.check_influence`` > 0."""
    from cropi.policy_grad import GradConfig
    from cropi.score import ScoreConfig, score

    sdir = Path(data["pool_traj"]).parent / "scores-stage-0"
    if not (sdir / "meta.json").exists():
        sc = cfg["score"]
        score(data["pool_traj"], list(data["targets"].values()), sdir, model=spec.model, resume=sdir.exists(),
              cfg=ScoreConfig(projector=spec.projector, k=spec.k, seed=cfg["seed"], combine=spec.combine,
                              check_influence=sc["check_influence"], influence_eps=tuple(sc["influence_eps"]),
                              influence_lr=spec.train.lr, pool_grad=spec.pool_grad,
                              grad=GradConfig(params=spec.params)),
              device=cfg["device"])
    return sdir


def make_curriculum(method: str, cfg: dict, seed: int, data: dict, cur: Path, spec: RunSpec) -> None:
    """The shards a method trains on before training starts (cropi makes its own via --rescore:
    stage 0 here, scored with θ_0, later stages by the trainer)."""
    ratio = spec.ratio
    have = curriculum.stage_dirs(cur)
    if method in ("full", "vcrl"):
        if not have:
            curriculum.make_stage(trajectories=data["pool_traj"], selector="full", out=cur, seed=seed)
        return
    if method == "oracle":
        if not have:
            curriculum.make_stage(trajectories=target_pool(data), selector="full", out=cur, seed=seed)
        return
    if method in ("cropi", "cropi-norescore"):
        if not have:
            curriculum.make_stage(scores_dir=stage0_scores(cfg, data, spec), selector="popi", ratio=ratio, out=cur,
                                  seed=seed)
        return
    if method == "family-random":
        from cropi.select import stage_size

        n = stage_size(len(set(schema.read_table(data["pool_traj"]).column("prompt").to_pylist())), ratio)
        for s in range(len(have), spec.train.stages):
            curriculum.make_stage(trajectories=target_pool(data), selector="random", n=n, out=cur,
                                  seed=derive_seed(seed, method, s))
        return
    for s in range(len(have), spec.train.stages):
        curriculum.make_stage(trajectories=data["pool_traj"], selector=method, ratio=ratio, out=cur,
                              seed=derive_seed(seed, method, s))


def run_method(cfg: dict, method: str, seed: int, data: dict, root: Path) -> Path:
    """Train one method with one seed (skipped when done; resumed when interrupted)."""
    base = root / f"{method}-s{seed}"
    done = base / "done.json"
    if done.exists():
        return base
    cur, run = base / "curriculum", base / "run"
    spec = _spec(cfg, method, seed, data, cur)
    t0 = time.time()
    make_curriculum(method, cfg, seed, data, cur, spec)
    from cropi.train import checkpoint

    resume = checkpoint.latest(run) is not None
    if not resume and run.exists():  # a run killed before its first checkpoint: start over
        import shutil

        shutil.rmtree(run)
    result = train(run, spec, resume=resume, device=cfg["device"])
    schema.write_json_atomic({"method": method, "seed": seed, "seconds": round(time.time() - t0, 1), **result}, done)
    return base


def run(cfg, root=None, methods=None, seeds=None, overrides=()) -> dict:
    """`cropi run CONFIG`: prepare data once, then every method × seed. `cfg` is a config path
    (read with `overrides`) or a resolved config. The resolved config is written to
    ROOT/config.yaml; a ROOT made with other settings is refused. Returns {method: [dirs]}."""
    if not isinstance(cfg, dict):
        cfg = load_config(cfg, overrides)
    root = Path(root or Path("runs") / cfg["name"])
    config.check_same(root / "config.yaml", cfg, config.run_layout(), free=("compare", "device"))
    root.mkdir(parents=True, exist_ok=True)
    config.dump(cfg, root / "config.yaml")
    models.resolve(cfg["model"])  # build + warm the tiny default if needed
    data = prepare_data(cfg, root)
    methods = methods or cfg["compare"]["methods"]
    seeds = seeds or cfg["compare"]["seeds"]
    out: dict = {}
    for seed in seeds:
        for m in methods:
            out.setdefault(m, []).append(str(run_method(cfg, m, int(seed), data, root)))
    (root / "runs.json").write_text(json.dumps(out, indent=2) + "\n")
    return out
