"""Curriculum stages inside a training run: open (or, with --rescore, create) a stage's shard,
its per-stage sampling state, and the prompts each step draws from it (docs/design.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cropi import curriculum, models, schema, tasks
from cropi.rewards import rewards as task_rewards
from cropi.runtime import derive_seed
from cropi.train.config import RunSpec
from cropi.train.samplers import PromptSampler, RLVEController, VCRLBank


@dataclass
class Stage:
    """One curriculum shard and the per-stage sampling state."""

    index: int
    rows: list[dict]
    prompt_ids: list[list[int]]
    sampler: PromptSampler
    bank: VCRLBank | None
    rlve: RLVEController | None
    demos: list[list[int]] | None  # RL-PLUS demonstration token ids per row
    demo_rewards: list[float] | None
    manifest: dict

    def state_dict(self) -> dict:
        return {
            "index": self.index,
            "sampler": self.sampler.state_dict(),
            "bank": self.bank.state_dict() if self.bank else None,
            "rlve": self.rlve.state_dict() if self.rlve else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        if self.bank is not None:
            self.bank.load_state_dict(state["bank"])
        if self.rlve is not None:
            self.rlve.load_state_dict(state["rlve"])


def demonstration(policy: models.Policy, row: dict) -> list[int]:
    """RL-PLUS external demonstration: token ids of "Answer: <answer>" + EOS (the warm-up format)."""
    tok = policy.tokenizer
    return tok(f"{tasks.ANSWER_PREFIX} {row['answer']}", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]


def stage_source(spec: RunSpec, run_dir: Path, s: int) -> Path | None:
    """The curriculum folder that holds stage `s` for this run: the run's own RUN/curriculum
    (stages --rescore made) first, then the input curriculum; None when neither has it."""
    for root in (Path(run_dir) / "curriculum", Path(spec.curriculum)):
        if s in curriculum.stage_dirs(root):
            return root
    return None


def open_stage(
    s: int, spec: RunSpec, policy: models.Policy, run_dir: Path, checkpoint_name: str
) -> Stage:
    """Stage `s` of the curriculum; with --rescore, first create it when it is missing by
    scoring the offline pool with the current policy (RUN/scores/stage-SSS/) and selecting
    into RUN/curriculum/stage-SSS (the input curriculum is only read)."""
    cfg = spec.train
    src = stage_source(spec, run_dir, s)
    if src is None and spec.rescore:
        from cropi.policy_grad import GradConfig
        from cropi.score import ScoreConfig, score

        sdir = run_dir / "scores" / f"stage-{s:03d}"
        score(
            spec.trajectories,
            list(spec.targets),
            sdir,
            model=checkpoint_name,
            policy=dataclasses.replace(policy, path=checkpoint_name),  # recorded as "checkpoint"
            overwrite=True,
            cfg=ScoreConfig(projector=spec.projector, k=spec.k, seed=cfg.seed, combine=spec.combine,
                            pool_grad=spec.pool_grad, grad=GradConfig(params=spec.params)),
        )
        src = run_dir / "curriculum"
        curriculum.make_stage(
            scores_dir=sdir,
            selector=spec.selector,
            ratio=spec.ratio,
            seed=cfg.seed,
            out=src,
            checkpoint=checkpoint_name,
            stage=s,
        )
    table, manifest = curriculum.read_stage(src or spec.curriculum, s)
    rows = schema.prompt_columns(table).to_pylist()
    bank = VCRLBank(cfg.vcrl_bank_size, cfg.vcrl_kappa, cfg.vcrl_max_replay) if cfg.vcrl else None
    rlve = None
    if cfg.rlve:
        levels: dict[str, list[int]] = {}
        for r in rows:
            levels.setdefault(r["task"], []).append(int(r["difficulty"]))
        rlve = RLVEController(
            levels,
            tau_acc=cfg.rlve_tau_acc,
            tau_num=cfg.rlve_tau_num,
            window=cfg.rlve_window,
            start={t: min(v) for t, v in levels.items()},
            max_level={t: max(v) for t, v in levels.items()},
        )
    demos = demo_rewards = None
    if cfg.rl_plus:
        demos = [demonstration(policy, r) for r in rows]
        demo_rewards = task_rewards(models.decode_responses(policy, demos), rows)
    return Stage(
        s,
        rows,
        models.encode_prompts(policy, [r["prompt"] for r in rows]),
        PromptSampler(len(rows), derive_seed(cfg.seed, "stage", s)),
        bank,
        rlve,
        demos,
        demo_rewards,
        manifest,
    )


def draw(stage: Stage, n: int) -> np.ndarray:
    """The next `n` shard rows, int64 [n]; with RLVE only rows inside their task's window
    (scanning at most one pass of the shard), topped up in plain order when too few are."""
    if stage.rlve is None:
        return stage.sampler.next(n)
    allowed = stage.rlve.allowed(
        [r["task"] for r in stage.rows], [r["difficulty"] for r in stage.rows]
    )
    picked: list[int] = []
    for _ in range(len(stage.rows)):
        if len(picked) == n:
            break
        i = int(stage.sampler.next(1)[0])
        if allowed[i]:
            picked.append(i)
    if len(picked) < n:
        picked += stage.sampler.next(n - len(picked)).tolist()
    return np.asarray(picked, dtype=np.int64)


def check_stages(spec: RunSpec) -> int:
    """The number of stages to train (validates the curriculum and the --rescore inputs)."""
    cfg = spec.train
    have = curriculum.stage_dirs(spec.curriculum)
    if spec.rescore:
        from cropi.select import check_params

        check_params(spec.selector, spec.ratio)
        if not spec.trajectories:
            raise schema.InputError(
                "--rescore", None, "--trajectories", "needs the offline pool to score"
            )
        if not spec.targets:
            raise schema.InputError(
                "--rescore", None, "--target", "needs at least one target set (trajectories)"
            )
        for p in spec.targets:
            if schema.detect_kind(schema.read_table(p)) != "trajectories":
                raise schema.InputError(
                    p,
                    None,
                    "responses",
                    "--rescore scores against target trajectories: "
                    "roll the target set out first (cropi rollout)",
                )
        if cfg.stages == 0:
            raise schema.InputError(
                "--rescore", None, "--stages", "give the number of stages to train"
            )
        return cfg.stages
    if not have:
        raise schema.InputError(
            spec.curriculum, None, None, "no curriculum stages here (make one with cropi select)"
        )
    n = cfg.stages or len(have)
    missing = [s for s in range(n) if s not in have]
    if missing:
        raise schema.InputError(
            spec.curriculum,
            None,
            "stage",
            f"no stage {missing[0]} for --stages {n} (stages here: {', '.join(map(str, have))}); "
            f"pass --rescore to create stages as training goes",
        )
    return n
