"""The GRPO training loop: stages, steps, the run directory, checkpoints and resume (docs/design.md).

One step: draw `batch_prompts` prompts from the current stage's shard, sample `group_size`
responses each in one batched call, verify them, turn rewards into advantages, and take
`mu_updates` clipped-surrogate updates on that batch. This module is the recipe: the run
spec, the run folder, resume and the step loop. Its components: `stages` (open or --rescore a
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
from cropi.train.stages import check_stages, open_stage
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
    n_stages = check_stages(spec)
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
    sets = {  # read before anything is written: a bad set leaves no run folder behind
        "target": dict(zip(set_names(spec.targets), map(load_set, spec.targets))),
        "heldout": dict(zip(set_names(spec.heldout), map(load_set, spec.heldout))),
    }

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
    run_dir.mkdir(parents=True, exist_ok=True)
    with schema.atomic_file(run_dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
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
    truncate_metrics(metrics_path, step if latest is not None else -1)
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

    tb = tensorboard(run_dir, step)
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
                    tb_row(tb, row)

            if step == 0 and has_eval:
                last_eval = eval_now(policy, sets, cfg, 0, 0, run_dir)
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
                    last_eval = eval_now(policy, sets, cfg, step, s, run_dir)
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
