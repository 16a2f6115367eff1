"""The GRPO training loop: stages, steps, the run directory, checkpoints and resume (docs/design.md).

One step: draw `batch_prompts` prompts from the current stage's shard, sample `group_size`
responses each in one batched call, verify them, turn rewards into advantages, and take
`mu_updates` clipped-surrogate updates on that batch. This module is the recipe (`train`)
and its named steps: the run folder, resume and the step loop (the run spec is
`cropi.train.config.RunSpec`). Its components: `stages` (open or --rescore a
stage), `groups` (sample and verify groups, dynamic sampling, VCRL, RL-PLUS), `step` (pack and
update), `logs` (evaluation rows, metrics.jsonl, TensorBoard); the math is in
`cropi.advantages`, `losses` and `samplers`.

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
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from cropi import models, schema
from cropi.evaluate import load_set, set_names
from cropi.runtime import derive_seed, progress
from cropi.train import checkpoint as ckpt
from cropi.train import scale
from cropi.train.config import RunSpec
from cropi.train.logs import eval_now, tb_row, tensorboard, truncate_metrics
from cropi.train.plot import plot_curves
from cropi.train.stages import Stage, check_stages, open_stage
from cropi.train.step import train_step

WALL_CLOCK_FIELDS = ("seconds",)  # the only metrics that differ between identical runs


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


@dataclass
class Run:
    """What a run carries from step to step; a checkpoint holds all of it."""

    dir: Path
    spec: RunSpec
    policy: models.Policy
    ref: torch.nn.Module | None  # frozen reference policy (kl_beta > 0)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    base_info: dict  # the starting model's cropi.json, carried into every checkpoint's
    step: int = 0  # global steps done
    seen: int = 0  # groups generated so far
    stage: Stage | None = None
    stage_state: dict | None = None  # a resumed stage's sampling state, applied when it opens

    @property
    def total(self) -> int:
        return self.spec.train.stages * self.spec.train.steps_per_stage

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "prompts_seen": self.seen,
            "stage": self.stage.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "config": self.spec.to_dict(),
            "version": 1,
        }

    def save(self) -> Path:
        info = {**self.base_info, "trained_from": self.spec.model, "step": self.step,
                "stage": self.stage.index, "seed": self.spec.train.seed, "run": str(self.dir)}
        return ckpt.save(self.dir, self.step, self.policy, self.state_dict(), info)


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

    run_dir, device = Path(run_dir), default_device(device)
    spec = with_stage_count(spec)
    latest = checkpoint_to_resume(run_dir, resume)
    sets = load_eval_sets(spec)  # every input is read before anything is written
    run = start(run_dir, spec, latest, device)
    write_config(run)
    truncate_metrics(run_dir / "metrics.jsonl", run.step if latest is not None else -1)
    cfg, has_eval = spec.train, bool(spec.targets or spec.heldout)
    stopped, last_ckpt, last_eval, steps_done, t_start = None, latest, None, 0, time.time()
    with metrics_log(run) as log, stop_on_signals(StopFlag()) as flag, progress_bar(run) as bar:
        if run.step == 0 and has_eval:
            last_eval = log(eval_now(run.policy, sets, cfg, 0, 0, run_dir))
        while run.step < run.total:
            if max_steps is not None and run.step >= max_steps:
                stopped = 0
                break
            row = log(take_step(run))
            steps_done += 1
            if has_eval and ((cfg.eval_every and run.step % cfg.eval_every == 0) or run.step == run.total):
                last_eval = log(eval_now(run.policy, sets, cfg, run.step, run.stage.index, run_dir))
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", seen=run.seen)
            if flag.signum is not None or run.step == max_steps or checkpoint_due(run):
                last_ckpt = run.save()
            if flag.signum is not None:
                stopped = flag.signum
                break
    plot_curves(run_dir / "metrics.jsonl", run_dir / "plots" / "curves.png")
    elapsed = time.time() - t_start
    return {
        "run": str(run_dir),
        "step": run.step,
        "stage": run.stage.index if run.stage else None,
        "total_steps": run.total,
        "stopped": stopped,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "eval": last_eval,
        "steps_per_s": round(steps_done / elapsed, 4) if steps_done else None,
    }


# ---------------------------------------------------------------------------- the recipe's steps


def with_stage_count(spec: RunSpec) -> RunSpec:
    """`spec` with train.stages set to the stages this run trains (`check_stages` validates the
    curriculum and the --rescore inputs)."""
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, stages=check_stages(spec)))


def checkpoint_to_resume(run_dir: Path, resume: bool) -> Path | None:
    """The newest checkpoint when resuming (None: start from the spec's model); a fresh run
    refuses a folder that already holds one."""
    if resume:
        return ckpt.latest(run_dir)
    if (run_dir / "metrics.jsonl").exists() or ckpt.checkpoints(run_dir):
        raise schema.InputError(
            run_dir, None, None, "already holds a run: pass --resume to continue it or choose another --run"
        )
    return None


def load_eval_sets(spec: RunSpec) -> dict:
    """{"target": {name: prompt rows}, "heldout": {...}} of the run's eval sets."""
    return {
        "target": dict(zip(set_names(spec.targets), map(load_set, spec.targets))),
        "heldout": dict(zip(set_names(spec.heldout), map(load_set, spec.heldout))),
    }


def start(run_dir: Path, spec: RunSpec, latest: Path | None, device: str) -> Run:
    """Policy (float32 master weights whatever the device's default dtype: AdamW on bf16 weights
    drifts), reference, optimizer and schedule; restored from `latest`, else freshly seeded."""
    cfg = spec.train
    info_file = Path(str(models.resolve(spec.model))) / "cropi.json"
    base_info = json.loads(info_file.read_text()) if info_file.exists() else {}
    if cfg.bf16:
        scale.check_bf16(device)
    policy = scale.load_policy(spec.model, latest, cfg, device)
    ref = None
    if cfg.kl_beta > 0:  # the frozen reference is the run's initial model
        ref = models.load(spec.model, device=device, dtype=torch.float32).model.requires_grad_(False)
    opt = torch.optim.AdamW(scale.trainable(policy.model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.stages * cfg.steps_per_stage
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: lr_factor(i, cfg.warmup_steps, total, cfg.lr_schedule)
    )
    run = Run(run_dir, spec, policy, ref, opt, sched, base_info)
    if latest is None:
        ckpt.seed_rngs(derive_seed(cfg.seed, "global-rngs"))
        return run
    state = ckpt.load_state(latest)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    ckpt.set_rng_state(state["rng"])
    run.step, run.seen, run.stage_state = int(state["step"]), int(state["prompts_seen"]), state["stage"]
    return run


def write_config(run: Run) -> None:
    """RUN/config.yaml: the resolved spec (written once every input has been read)."""
    run.dir.mkdir(parents=True, exist_ok=True)
    with schema.atomic_file(run.dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(run.spec.to_dict(), sort_keys=False))


@contextmanager
def metrics_log(run: Run):
    """Yield `log(row) -> row`: one line of RUN/metrics.jsonl (flushed) and TensorBoard scalars."""
    tb = tensorboard(run.dir, run.step)
    try:
        with (run.dir / "metrics.jsonl").open("a") as mf:

            def log(row: dict) -> dict:
                mf.write(json.dumps(row) + "\n")
                mf.flush()
                if tb is not None:
                    tb_row(tb, row)
                return row

            yield log
    finally:
        if tb is not None:
            tb.close()


@contextmanager
def progress_bar(run: Run):
    bar = progress(total=run.total, desc="train", unit="step", initial=run.step)
    try:
        yield bar
    finally:
        bar.close()


def take_step(run: Run) -> dict:
    """One global step: open the step's stage when it changes (from the spec's model at step 0,
    else from the newest weights' checkpoint name), update, advance the schedule. Returns the
    train metrics row."""
    cfg = run.spec.train
    s = run.step // cfg.steps_per_stage
    if run.stage is None or run.stage.index != s:
        name = run.spec.model if run.step == 0 else str(ckpt.checkpoint_dir(run.dir, run.step))
        run.stage = open_stage(s, run.spec, run.policy, run.dir, name)
        if run.stage_state is not None and run.stage_state["index"] == s:
            run.stage.load_state_dict(run.stage_state)
        run.stage_state = None
    t0 = time.time()
    row = train_step(run.policy, run.ref, run.opt, run.stage, cfg, run.step + 1)
    with warnings.catch_warnings():  # the schedule follows global steps, updates or not
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        run.sched.step()
    run.step += 1
    run.seen += row["generated"]
    row["prompts_seen"] = run.seen
    row["seconds"] = round(time.time() - t0, 3)
    return row


def checkpoint_due(run: Run) -> bool:
    """A checkpoint at every stage end and every `checkpoint_every` steps."""
    every = run.spec.train.checkpoint_every
    return run.step % run.spec.train.steps_per_stage == 0 or bool(every and run.step % every == 0)
