"""The GRPO training loop: stages, steps, the run directory, checkpoints and resume (docs/design.md).

One step: draw `batch_prompts` prompts from the current stage's shard, sample `group_size`
responses each in one batched call, verify them, turn rewards into advantages, and take
`mu_updates` clipped-surrogate updates on that batch. The math is in `advantages`, `losses`
and `samplers`; this module only wires it.

    RUN/config.yaml            the resolved RunSpec (run options + `train:` TrainConfig)
    RUN/metrics.jsonl          one {"event": "train", ...} row per step, {"event": "eval", ...} rows
    RUN/checkpoints/step-N/    HF save_pretrained + trainer_state.pt (see `checkpoint`)
    RUN/eval/step-N.json       full eval results;  RUN/scores/stage-S/  --rescore scores
    RUN/curriculum/stage-S/    stages --rescore selected (the input curriculum is never written)
    RUN/plots/curves.png       curves;             RUN/tb/  TensorBoard events (when installed)

Train row fields: reward_mean / reward_std (task rewards of every response generated this step,
before any penalty), zero_var_frac (generated groups with all-equal rewards), clip_frac (on-policy
tokens in the clipped branch, over the mu updates), entropy (nats/token of sampled responses,
first pass), kl (k3 to the reference, null without one), resp_len (tokens), trunc_rate, lr,
loss (mean over the mu updates), grad_norm (before clipping), ratio_max, groups (trained),
generated (groups sampled, refills and replays included), gen_calls, dropped, replayed,
overlong_penalty (mean penalty), demo_weight_mean (RL-PLUS), rlve_h (RLVE top level per task),
prompts_seen (cumulative `generated`), seconds (wall clock; the only field that differs between
identical runs). Eval rows: {"event": "eval", "step", "stage", "target": {set: accuracy},
"heldout": {set: accuracy}, "seconds"}; step 0 is the model before training.

Determinism: step g samples with a generator seeded by derive_seed(seed, "step", g) and the
shard order is a seeded PromptSampler per stage, so a resumed run reproduces an uninterrupted
one (metrics and weights). The policy stays in eval mode (dropout off, as in verl and TRL).

Option notes:
- RL-PLUS: the external demonstration of a prompt is its reference solution
  "Answer: <answer>" + EOS (the format the tiny model was warmed up on), added to the group as
  response G+1 with its verified reward. Its importance weight uses omega = 1 (`rl_plus_omega`
  "one", the default: a fixed solution is what a deterministic external policy emits) or
  omega = pi_old ("old": the multiple-importance ratio then reduces to pi_theta / pi_old).
- VCRL bank, RLVE controller and the shard order live per stage (a new shard starts afresh).
  RLVE keeps, per task, the shard rows whose difficulty is in [h - window, h] (h starts at the
  task's easiest level in the shard and stops at its hardest); when the window holds fewer
  rows than a step needs, the rest come in plain shard order.
- Dynamic sampling and VCRL may leave a step with no group to train on: it then makes no
  update (metrics still logged, `groups` = 0).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from cropi import config, curriculum, models, schema, tasks
from cropi.advantages import group_advantages, has_signal
from cropi.evaluate import evaluate, load_set, set_names
from cropi.rewards import rewards as task_rewards
from cropi.runtime import derive_seed, progress, verbosity
from cropi.train import checkpoint as ckpt
from cropi.train import scale
from cropi.train.config import TrainConfig
from cropi.train.losses import mask_truncated, overlong_penalty, policy_loss, rl_plus_token_weights
from cropi.train.plot import plot_curves
from cropi.train.samplers import PromptSampler, RLVEController, VCRLBank, dynamic_sampling

WALL_CLOCK_FIELDS = ("seconds",)  # the only metrics that differ between identical runs


# ---------------------------------------------------------------------------- run spec


@dataclass
class RunSpec:
    """Everything that defines a run: what to train, on what, and how (`train`)."""

    curriculum: str
    model: str = models.TINY
    targets: list[str] = field(default_factory=list)  # eval sets; --rescore's target gradients
    heldout: list[str] = field(default_factory=list)  # eval-only sets
    rescore: bool = False  # score + select a missing next stage with the current checkpoint
    trajectories: str | None = None  # the offline pool --rescore scores
    selector: str = "popi"
    ratio: float = 0.1
    projector: str = "sjlt"
    k: int = 8192
    combine: str = "mean"
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}
        return {
            **d,
            "targets": list(self.targets),
            "heldout": list(self.heldout),
            "train": self.train.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict, path="config") -> RunSpec:
        """From a config.yaml mapping; unknown keys and bad trainer options raise InputError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise schema.InputError(
                path, None, unknown[0], f"unknown run option (known: {', '.join(sorted(names))})"
            )
        if not d.get("curriculum"):
            raise schema.InputError(path, None, "curriculum", "missing (--curriculum DIR)")
        try:
            train = TrainConfig.from_dict(d.get("train") or {})
        except ValueError as e:
            raise schema.InputError(path, None, "train", str(e)) from None
        out = {k: v for k, v in d.items() if k != "train"}
        for key in ("targets", "heldout"):
            out[key] = [str(p) for p in out.get(key) or []]
        for key in ("curriculum", "trajectories"):
            if out.get(key) is not None:
                out[key] = str(out[key])
        return cls(**out, train=train)


def resolve_spec(
    run_dir, *, resume: bool, config_file=None, overrides=(), run_options: dict, train_options: dict
) -> RunSpec:
    """The RunSpec of `cropi train`, checked by `cropi.config.train_layout()`.

    Fresh run: `config_file` (a config.yaml layout; optional) with `key=value` `overrides`, then
    the options given (None = not given). Resume: RUN/config.yaml; a config file, overrides and
    options given must equal its values.
    """
    given_run = {k: v for k, v in run_options.items() if v is not None and v != ()}
    given_train = {k: v for k, v in train_options.items() if v is not None}
    for key in ("targets", "heldout"):
        if key in given_run:
            given_run[key] = [str(p) for p in given_run[key]]
    for key in ("curriculum", "trajectories"):
        if key in given_run:
            given_run[key] = str(given_run[key])
    over = config.parse_overrides(overrides)
    flags = {**given_run, "train": given_train}
    sources = {**config.override_sources(over), **config.override_sources(flags, "options")}
    given = config.merge(config.read_yaml(config_file) if config_file else {}, over, flags)
    layout = config.train_layout()
    if resume:
        path = Path(run_dir) / "config.yaml"
        if not path.exists():
            raise schema.InputError(path, None, None, "no such file: nothing to resume")
        saved = RunSpec.from_dict(config.resolve(config.read_yaml(path), layout, path), path)
        want = RunSpec.from_dict(
            config.resolve(config.merge(saved.to_dict(), given), layout, config_file or "--resume", sources),
            "--resume",
        )
        old, new = saved.to_dict(), want.to_dict()
        pairs = [(k, new[k], old[k]) for k in old if k != "train"]
        pairs += [(k, new["train"][k], old["train"][k]) for k in old["train"]]
        for name, value, had in pairs:
            if value != had:
                raise schema.InputError(
                    path, None, name, f"--resume: given {value!r}, but the run has {had!r}"
                )
        return saved
    return RunSpec.from_dict(
        config.resolve(given, layout, config_file or "options", sources), config_file or "options"
    )


# ---------------------------------------------------------------------------- schedule, signals


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base learning rate for 0-based update `step` of `total`.

    Linear warm-up (step + 1) / warmup over the first `warmup` steps; then 1 ("constant") or a
    half cosine from 1 at the end of warm-up to 0 at step == total ("cosine").
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    raise ValueError(f"lr_schedule must be constant or cosine, got {schedule!r}")


class StopFlag:
    """Signal handler that only records the signal; the loop stops at the end of the step.
    A second SIGINT while a stop is pending interrupts at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


@contextmanager
def stop_on_signals(flag: StopFlag):
    """Route SIGINT and SIGTERM to `flag` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {s: signal.signal(s, flag) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------- stages


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
        from cropi.score import ScoreConfig, score

        sdir = run_dir / "scores" / f"stage-{s:03d}"
        score(
            spec.trajectories,
            list(spec.targets),
            sdir,
            model=checkpoint_name,
            policy=dataclasses.replace(policy, path=checkpoint_name),  # recorded as "checkpoint"
            overwrite=True,
            cfg=ScoreConfig(projector=spec.projector, k=spec.k, seed=cfg.seed, combine=spec.combine),
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


# ---------------------------------------------------------------------------- one step


@dataclass
class Group:
    """G sampled responses of one shard row. raw: task rewards; rewards: raw + overlong penalty."""

    row: int
    responses: list[list[int]]
    raw: list[float]
    rewards: list[float]
    truncated: list[bool]


def rollout_groups(
    policy: models.Policy, stage: Stage, indices, cfg: TrainConfig, gen: torch.Generator
) -> list[Group]:
    """Sample G responses for each shard row in `indices` in ONE `models.sample` call and verify them."""
    g = cfg.group_size
    flat_ids = [stage.prompt_ids[i] for i in indices for _ in range(g)]
    flat_rows = [stage.rows[i] for i in indices for _ in range(g)]
    resp = models.sample(
        policy,
        flat_ids,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        generator=gen,
    )
    raw = task_rewards(models.decode_responses(policy, resp), flat_rows)
    shaped = list(raw)
    if cfg.overlong_penalty:
        pen = overlong_penalty(
            torch.tensor([len(r) for r in resp]),
            cfg.max_new_tokens,
            cfg.overlong_buffer,
            cfg.overlong_penalty_factor,
        )
        shaped = [a + b for a, b in zip(raw, pen.tolist())]
    eos = policy.tokenizer.eos_token_id
    trunc = [models.is_truncated(r, eos) for r in resp]
    return [
        Group(
            int(i),
            resp[j * g : (j + 1) * g],
            raw[j * g : (j + 1) * g],
            shaped[j * g : (j + 1) * g],
            trunc[j * g : (j + 1) * g],
        )
        for j, i in enumerate(indices)
    ]


def passed(groups: list[Group]) -> np.ndarray:
    """Correctness of each response, float64 [n_groups, G]: 1 where the task reward (before any
    overlong penalty) is >= schema.PASS_THRESHOLD, else 0."""
    return np.array([[r >= schema.PASS_THRESHOLD for r in grp.raw] for grp in groups], dtype=np.float64)


def collect(policy: models.Policy, stage: Stage, cfg: TrainConfig, gen: torch.Generator):
    """Generate this step's groups. Returns (groups to train on, every generated group, info).

    Dynamic sampling / VCRL drop groups (all pass or all fail / p < kappa, both on correctness,
    not on penalty-shaped rewards) and refill at most `max_refill` times; VCRL then tops the
    batch up with replays from its bank (fresh samples of groups not already in the batch)."""
    calls: list[list[Group]] = []

    def generate(indices):  # filters see correctness, as DAPO's `acc`: never the penalty-shaped reward
        calls.append(rollout_groups(policy, stage, indices, cfg, gen))
        return passed(calls[-1])

    def keep(rewards):
        ok = np.ones(len(rewards), dtype=bool)
        if cfg.dynamic_sampling:
            ok &= has_signal(torch.as_tensor(rewards)).numpy()
        if cfg.vcrl:
            ok &= stage.bank.offer([grp.row for grp in calls[-1]], rewards)
        return ok

    filtered = cfg.dynamic_sampling or cfg.vcrl
    got = dynamic_sampling(
        lambda n: draw(stage, n),
        generate,
        cfg.batch_prompts,
        cfg.max_refill if filtered else 0,
        keep if filtered else None,
    )
    kept = [calls[c][r] for c, r in got.source] if filtered else calls[0]
    replayed = 0
    if cfg.vcrl and len(kept) < cfg.batch_prompts:
        present = {grp.row for grp in kept}
        keys = stage.bank.replay(cfg.batch_prompts - len(kept), exclude=present)
        if keys:
            stage.bank.offer(keys, generate(np.asarray(keys, dtype=np.int64)))
            kept = kept + calls[-1]
            replayed = len(keys)
    generated = [grp for call in calls for grp in call]
    return (
        kept,
        generated,
        {"gen_calls": len(calls), "dropped": got.dropped if filtered else 0, "replayed": replayed},
    )


@dataclass
class Batch:
    """Packed training sequences. ids, attn: [N, T] long; mask: [N, T] bool, response tokens
    in the loss; sampled: [N, T] bool, response tokens of sampled (non-demo) responses;
    adv: [N] float32; demo: [N] bool or None (RL-PLUS)."""

    ids: torch.Tensor
    attn: torch.Tensor
    mask: torch.Tensor
    sampled: torch.Tensor
    adv: torch.Tensor
    demo: torch.Tensor | None


def build_batch(
    policy: models.Policy, stage: Stage, groups: list[Group], cfg: TrainConfig
) -> Batch:
    """Advantages per group (+ the RL-PLUS demonstration as one more member) and packed tokens."""
    prompts, responses, rewards, trunc, demo = [], [], [], [], []
    for grp in groups:
        resp, rew, tr, dm = (
            list(grp.responses),
            list(grp.rewards),
            list(grp.truncated),
            [False] * len(grp.responses),
        )
        if cfg.rl_plus:
            resp.append(stage.demos[grp.row])
            rew.append(stage.demo_rewards[grp.row])
            tr.append(False)
            dm.append(True)
        prompts += [stage.prompt_ids[grp.row]] * len(resp)
        responses += resp
        rewards.append(rew)
        trunc += tr
        demo += dm
    adv = group_advantages(
        torch.tensor(rewards, dtype=torch.float32), cfg.adv_mean, cfg.adv_std, cfg.adv_eps
    )
    ids, attn, rmask = models.pack(prompts, responses, policy.tokenizer.pad_token_id, policy.device)
    demo_t = torch.tensor(demo, dtype=torch.bool, device=policy.device)
    mask = (
        mask_truncated(rmask, torch.tensor(trunc, device=policy.device))
        if cfg.mask_truncated
        else rmask
    )
    return Batch(
        ids,
        attn,
        mask,
        rmask & ~demo_t[:, None],
        adv.flatten().to(policy.device),
        demo_t if cfg.rl_plus else None,
    )


def loss_total(mask: torch.Tensor, agg: str) -> float:
    """The whole batch's denominator for `aggregate(total=...)`: tokens (token-mean) or
    responses with at least one token (seq modes), so micro-batch losses sum to the batch loss."""
    return float(mask.sum()) if agg == "token-mean" else float((mask.sum(-1) > 0).sum())


def _forward_logprobs(model, ids, attn, cfg: TrainConfig, entropy: bool):
    """One micro-batch's differentiable log-probs [n, t] (and detached entropy [n, t] when
    ``entropy``, else None) under the run's bf16 / activation-checkpointing settings."""
    with scale.autocast(cfg.bf16, ids.device), scale.checkpointing(model, cfg.grad_checkpointing):
        out = models.token_logprobs(model, ids, attn, cfg.temperature, return_entropy=entropy)
    return out if entropy else (out, None)


def update(
    policy: models.Policy,
    ref: torch.nn.Module | None,
    opt: torch.optim.Optimizer,
    batch: Batch,
    cfg: TrainConfig,
) -> dict:
    """`mu_updates` optimiser steps on one batch (micro-batched; old log-probs from the first
    pass, detached). Returns loss, clip_frac, kl, entropy, grad_norm, ratio_max, demo_weight_mean."""
    model = policy.model
    params = [p for p in model.parameters() if p.requires_grad]
    n = batch.ids.shape[0]
    mb = cfg.micro_batch or n
    chunks = []
    for s in range(0, n, mb):
        t = int(batch.attn[s : s + mb].sum(-1).max())  # trim right padding
        chunks.append((slice(s, s + mb), t))
    total = loss_total(batch.mask, cfg.loss_agg)
    ref_lp = None
    if ref is not None:
        with torch.no_grad(), scale.autocast(cfg.bf16, batch.ids.device):
            ref_lp = [
                models.token_logprobs(ref, batch.ids[c, :t], batch.attn[c, :t], cfg.temperature)
                for c, t in chunks
            ]
    old: list[torch.Tensor] = []
    acc = {
        "loss": 0.0,
        "clip": 0.0,
        "kl": 0.0,
        "tok": 0,
        "tok0": 0,
        "ent": 0.0,
        "ent_n": 0.0,
        "gn": 0.0,
        "ratio_max": 1.0,
        "demo_w": 0.0,
        "demo_n": 0,
    }
    for u in range(cfg.mu_updates):
        opt.zero_grad(set_to_none=True)
        for j, (c, t) in enumerate(chunks):
            ids, attn = batch.ids[c, :t], batch.attn[c, :t]
            lp, ent = _forward_logprobs(model, ids, attn, cfg, entropy=u == 0)
            if u == 0:
                old.append(lp.detach())
                sampled = batch.sampled[c, :t]
                acc["ent"] += float((ent * sampled).sum())
                acc["ent_n"] += float(sampled.sum())
                del ent
            demo = batch.demo[c] if batch.demo is not None else None
            weight = None
            if demo is not None:
                omega = 0.0 if cfg.rl_plus_omega == "one" else old[j]
                weight = rl_plus_token_weights(lp, old[j], omega, cfg.rl_plus_gamma)
            loss, st = policy_loss(
                lp,
                old[j],
                batch.adv[c],
                batch.mask[c, :t],
                clip_low=cfg.clip_low,
                clip_high=cfg.clip_high,
                ratio_level=cfg.ratio_level,
                agg=cfg.loss_agg,
                ref_logp=None if ref_lp is None else ref_lp[j],
                kl_beta=cfg.kl_beta,
                token_weight=weight,
                demo=demo,
                norm_len=cfg.max_new_tokens,
                total=total,
            )
            loss.backward()
            n_on = st["n_tokens"] - (
                int((batch.mask[c, :t] & demo[:, None]).sum()) if demo is not None else 0
            )
            acc["loss"] += loss.item()
            acc["clip"] += st["clip_frac"] * n_on
            acc["tok"] += n_on
            acc["ratio_max"] = max(acc["ratio_max"], st["ratio_max"])
            if u == 0:
                acc["kl"] += st["kl"] * st["n_tokens"]
                acc["tok0"] += st["n_tokens"]
            if demo is not None:
                n_demo = st["n_tokens"] - n_on
                acc["demo_w"] += st["demo_weight_mean"] * n_demo
                acc["demo_n"] += n_demo
        gn = torch.nn.utils.clip_grad_norm_(
            params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        )
        acc["gn"] += float(gn)
        opt.step()
    mu = cfg.mu_updates
    return {
        "loss": acc["loss"] / mu,
        "clip_frac": acc["clip"] / max(acc["tok"], 1),
        "kl": acc["kl"] / max(acc["tok0"], 1) if ref is not None else None,
        "entropy": acc["ent"] / max(acc["ent_n"], 1.0),
        "grad_norm": acc["gn"] / mu,
        "ratio_max": acc["ratio_max"],
        "demo_weight_mean": acc["demo_w"] / max(acc["demo_n"], 1) if cfg.rl_plus else None,
    }


def train_step(policy: models.Policy, ref, opt, stage: Stage, cfg: TrainConfig, step: int) -> dict:
    """Global step `step` (1-based): collect, update; returns the metrics row (no wall clock)."""
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "step", step))
    with scale.autocast(cfg.bf16, policy.device):
        kept, generated, info = collect(policy, stage, cfg, gen)
    raw = np.array([grp.raw for grp in generated], dtype=np.float64)
    shaped = np.array([grp.rewards for grp in generated], dtype=np.float64)
    if stage.rlve is not None:
        for grp in generated:
            r = stage.rows[grp.row]
            if int(r["difficulty"]) <= stage.rlve.window(r["task"])[1]:
                for x in grp.raw:
                    stage.rlve.update(r["task"], int(r["difficulty"]), x >= schema.PASS_THRESHOLD)
    lr = opt.param_groups[0]["lr"]
    stats = {
        "loss": 0.0,
        "clip_frac": 0.0,
        "kl": None,
        "entropy": None,
        "grad_norm": 0.0,
        "ratio_max": 1.0,
        "demo_weight_mean": None,
    }
    if kept:
        stats = update(policy, ref, opt, build_batch(policy, stage, kept, cfg), cfg)
    lengths = [len(r) for grp in generated for r in grp.responses]
    row = {
        "event": "train",
        "step": step,
        "stage": stage.index,
        "reward_mean": float(raw.mean()),
        "reward_std": float(raw.std()),
        "zero_var_frac": float(1 - has_signal(torch.as_tensor(raw)).float().mean()),
        "clip_frac": stats["clip_frac"],
        "entropy": stats["entropy"],
        "kl": stats["kl"],
        "resp_len": float(np.mean(lengths)),
        "trunc_rate": float(np.mean([t for grp in generated for t in grp.truncated])),
        "lr": lr,
        "loss": stats["loss"],
        "grad_norm": stats["grad_norm"],
        "ratio_max": stats["ratio_max"],
        "groups": len(kept),
        "generated": len(generated),
        **info,
        "overlong_penalty": float((shaped - raw).mean()),
        "demo_weight_mean": stats["demo_weight_mean"],
    }
    if stage.rlve is not None:
        row["rlve_h"] = {t: stage.rlve.window(t)[1] for t in stage.rlve.tasks}
    return row


# ---------------------------------------------------------------------------- the run


def _eval(
    policy: models.Policy, sets: dict, cfg: TrainConfig, step: int, stage: int, run_dir: Path
) -> dict:
    """Accuracy on every eval set: greedy, or the mean pass rate of `eval_samples` responses at
    `eval_temperature`. The sampling seed depends on the set, not the step (common random
    numbers: successive evals differ by the policy's change, not by sampling noise). Full
    results go to RUN/eval/step-N.json; returns the metrics row."""
    t0 = time.time()
    full = {
        group: {
            name: evaluate(
                policy,
                rows,
                n_samples=cfg.eval_samples,
                temperature=cfg.eval_temperature,
                max_new_tokens=cfg.max_new_tokens,
                seed=derive_seed(cfg.seed, "eval", group, name),
            )
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
        "seconds": round(time.time() - t0, 3),
    }


def _truncate_metrics(path: Path, last_step: int) -> None:
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


_TB_NOTICE = []  # the "not installed" notice is printed once per process


def _tensorboard(run_dir: Path, purge_step: int):
    """A SummaryWriter on RUN/tb/, or None (with a one-time notice) without the `tb` extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _TB_NOTICE and verbosity() > 0:
            _TB_NOTICE.append(True)
            print("cropi: TensorBoard is not installed, so no RUN/tb/ events "
                  "(pip install 'cropi[tb]'); metrics.jsonl and plots/ are written as always",
                  file=sys.stderr)
        return None
    return SummaryWriter(str(run_dir / "tb"), purge_step=purge_step or None)


def _tb_row(tb, row: dict) -> None:
    """Numeric fields of a metrics row as scalars `EVENT/FIELD` (dict fields: `EVENT/FIELD/KEY`)."""
    for k, v in row.items():
        if isinstance(v, int | float) and k not in ("step", "event"):
            tb.add_scalar(f"{row['event']}/{k}", v, row["step"])
        elif isinstance(v, dict):
            for name, x in v.items():
                tb.add_scalar(f"{row['event']}/{k}/{name}", x, row["step"])


def _check_stages(spec: RunSpec) -> int:
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


def train(
    run_dir,
    spec: RunSpec,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    device: str | None = None,
) -> dict:
    """Train `spec` into RUN; `resume` continues from the latest checkpoint exactly.

    Stops after global step `max_steps` when given (with a checkpoint, as on SIGINT/SIGTERM).
    Returns {"run", "step", "stage", "total_steps", "stopped" (signal number, 0 for max_steps,
    or None when the run finished), "checkpoint", "eval" (last eval row or None), "steps_per_s"}.
    """
    from cropi.distributed import default_device

    run_dir = Path(run_dir)
    device = default_device(device)
    cfg = spec.train
    n_stages = _check_stages(spec)
    spec = dataclasses.replace(spec, train=dataclasses.replace(cfg, stages=n_stages))
    cfg = spec.train
    total = n_stages * cfg.steps_per_stage
    metrics_path = run_dir / "metrics.jsonl"
    latest = ckpt.latest(run_dir) if resume else None
    if not resume and (metrics_path.exists() or ckpt.checkpoints(run_dir)):
        raise schema.InputError(
            run_dir,
            None,
            None,
            "already holds a run: pass --resume to continue it or choose another --run",
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    with schema.atomic_file(run_dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))

    info_file = Path(str(models.resolve(spec.model))) / "cropi.json"
    base_info = json.loads(info_file.read_text()) if info_file.exists() else {}
    if cfg.bf16:
        scale.check_bf16(device)
    # float32 master weights whatever the device's default dtype (AdamW on bf16 weights drifts)
    policy = scale.load_policy(spec.model, latest, cfg, device)
    ref = None
    if cfg.kl_beta > 0:  # the frozen reference is the run's initial model
        ref = models.load(spec.model, device=device, dtype=torch.float32).model.requires_grad_(
            False
        )
    opt = torch.optim.AdamW(scale.trainable(policy.model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: lr_factor(i, cfg.warmup_steps, total, cfg.lr_schedule)
    )

    step, seen, stage, stage_state = 0, 0, None, None
    if latest is not None:
        state = ckpt.load_state(latest)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        step, seen, stage_state = int(state["step"]), int(state["prompts_seen"]), state["stage"]
    else:
        ckpt.seed_rngs(derive_seed(cfg.seed, "global-rngs"))
    _truncate_metrics(metrics_path, step if latest is not None else -1)
    sets = {
        "target": dict(zip(set_names(spec.targets), map(load_set, spec.targets))),
        "heldout": dict(zip(set_names(spec.heldout), map(load_set, spec.heldout))),
    }
    has_eval = bool(spec.targets or spec.heldout)

    def state_dict() -> dict:
        return {
            "step": step,
            "prompts_seen": seen,
            "stage": stage.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "config": spec.to_dict(),
            "version": 1,
        }

    def save() -> Path:
        info = {
            **base_info,
            "trained_from": spec.model,
            "step": step,
            "stage": stage.index,
            "seed": cfg.seed,
            "run": str(run_dir),
        }
        return ckpt.save(run_dir, step, policy, state_dict(), info)

    tb = _tensorboard(run_dir, step)
    flag = StopFlag()
    stopped, last_ckpt, last_eval = None, latest, None
    steps_done, t_start = 0, time.time()
    bar = progress(total=total, desc="train", unit="step", initial=step)
    try:
        with stop_on_signals(flag), metrics_path.open("a") as mf:

            def log(row):
                mf.write(json.dumps(row) + "\n")
                mf.flush()
                if tb is not None:
                    _tb_row(tb, row)

            if step == 0 and has_eval:
                last_eval = _eval(policy, sets, cfg, 0, 0, run_dir)
                log(last_eval)
            while step < total:
                if max_steps is not None and step >= max_steps:
                    stopped = 0
                    break
                s = step // cfg.steps_per_stage
                if stage is None or stage.index != s:
                    name = spec.model if step == 0 else str(ckpt.checkpoint_dir(run_dir, step))
                    stage = open_stage(s, spec, policy, run_dir, name)
                    if stage_state is not None and stage_state["index"] == s:
                        stage.load_state_dict(stage_state)
                    stage_state = None
                t0 = time.time()
                row = train_step(policy, ref, opt, stage, cfg, step + 1)
                with warnings.catch_warnings():  # the schedule follows global steps, updates or not
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                    sched.step()
                step += 1
                steps_done += 1
                seen += row["generated"]
                row["prompts_seen"] = seen
                row["seconds"] = round(time.time() - t0, 3)
                log(row)
                if has_eval and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
                    last_eval = _eval(policy, sets, cfg, step, s, run_dir)
                    log(last_eval)
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", seen=seen)
                stage_end = step % cfg.steps_per_stage == 0
                if (
                    flag.signum is not None
                    or step == max_steps
                    or stage_end
                    or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                ):
                    last_ckpt = save()
                if flag.signum is not None:
                    stopped = flag.signum
                    break
    finally:
        bar.close()
        if tb is not None:
            tb.close()
    plot_curves(metrics_path, run_dir / "plots" / "curves.png")
    elapsed = time.time() - t_start
    return {
        "run": str(run_dir),
        "step": step,
        "stage": stage.index if stage else None,
        "total_steps": total,
        "stopped": stopped,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "eval": last_eval,
        "steps_per_s": round(steps_done / elapsed, 4) if steps_done else None,
    }
