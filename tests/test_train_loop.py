"""The GRPO training loop, checkpoints/resume, `cropi train` / `cropi eval`.

Truths used: hand-computed pass@k and learning-rate values, brute-force pass@k over every
k-subset, plain autograd of the batch loss for micro-batching, an uninterrupted run for resume,
the tiny default's measured learning curve (effect sizes in the comments), and for every trainer
option hand formulas (advantages, penalties, masks, log-probs, the surrogate, clipping, AdamW,
the sampling rules) applied to what a spy records of one or two real steps.
"""

import dataclasses
import itertools
import json
import math
import random
import signal
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from cropi import curriculum, models, rewards, schema, tasks
from cropi.cli import main
from cropi.evaluate import evaluate, ks_for, pass_at_k
from cropi.runtime import derive_seed
from cropi.train import checkpoint as ckpt
from cropi.train import groups as tgroups
from cropi.train import loop, scale, stages
from cropi.train import step as tstep
from cropi.train.config import TrainConfig
from cropi.train.plot import read_metrics

COUNT_BITS = [f"count_bits:difficulty={d}" for d in (0, 1, 2)]
TRAIN_SPECS = COUNT_BITS + ["chain_sum:difficulty=0"]
# basic_arithmetic:0, the tiny default's target family: it solves ~1/3 at temperature 1 and ~1/2
# greedily, so groups have reward variance and RL moves unseen prompts of the family.
TARGET_FAMILY = ["basic_arithmetic:difficulty=0"]
SMALL = dict(
    batch_prompts=4,
    group_size=4,
    max_new_tokens=16,
    lr=1e-4,  # RL's range for the tiny default (5e-4 and above collapse it)
    checkpoint_every=0,
    eval_every=15,
    eval_samples=8,
    eval_temperature=1.0,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One-stage curricula of 24 prompts with 24-prompt target sets (val split): `cur` of four
    specs (count_bits levels 0-2, chain_sum 0) with `val.parquet` (count_bits), and `learn` of the
    target family with `learn-val.parquet`, for the learning runs."""
    root = tmp_path_factory.mktemp("loop")
    pool = tasks.make_pool(TRAIN_SPECS, 6, 0, "train")
    curriculum.write_stage(root / "cur", pool, {"selector": "test"})
    schema.write_parquet_atomic(tasks.make_pool(COUNT_BITS, 8, 0, "val"), root / "val.parquet")
    curriculum.write_stage(root / "learn", tasks.make_pool(TARGET_FAMILY, 24, 0, "train"), {"selector": "test"})
    schema.write_parquet_atomic(tasks.make_pool(TARGET_FAMILY, 24, 0, "val"), root / "learn-val.parquet")
    return root


def spec_for(data, **train) -> loop.RunSpec:
    return loop.RunSpec(
        curriculum=str(data / "cur"),
        targets=[str(data / "val.parquet")],
        train=TrainConfig(**{**SMALL, **train}),
    )


def learn_spec(data) -> loop.RunSpec:
    """The 30-step learning run on the target family (seed 0)."""
    return loop.RunSpec(curriculum=str(data / "learn"), targets=[str(data / "learn-val.parquet")],
                        train=TrainConfig(**{**SMALL, "steps_per_stage": 30}))


def metric_rows(run):
    """metrics.jsonl rows without wall-clock fields."""
    rows = read_metrics(run / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k not in loop.WALL_CLOCK_FIELDS} for r in rows]


@pytest.fixture(scope="module")
def full_run(data):
    """30 uninterrupted steps on the tiny default (seed 0)."""
    run = data / "full"
    summary = loop.train(run, learn_spec(data))
    return run, summary


# ---------------------------------------------------------------------------- pure helpers


def test_pass_at_k_hand_values_and_brute_force():
    # n=4, c=2: pass@1 = 2/4; pass@2 = 1 - C(2,2)/C(4,2) = 1 - 1/6; pass@4 = 1.
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5)
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert pass_at_k(4, 2, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0
    for n, c, k in [(5, 1, 2), (6, 3, 3), (7, 2, 5)]:
        hits = [any(i < c for i in sub) for sub in itertools.combinations(range(n), k)]
        assert pass_at_k(n, c, k) == pytest.approx(sum(hits) / len(hits))
    assert ks_for(8) == [1, 2, 4, 8] and ks_for(6) == [1, 2, 4, 6] and ks_for(1) == [1]


def test_lr_factor_warmup_constant_cosine():
    assert [loop.lr_factor(i, 4, 10, "constant") for i in (0, 1, 3, 4, 9)] == [
        0.25,
        0.5,
        1.0,
        1.0,
        1.0,
    ]
    # cosine after 2 warm-up steps of 10: 0.5 * (1 + cos(pi * (i - 2) / 8))
    assert loop.lr_factor(2, 2, 10, "cosine") == 1.0
    assert loop.lr_factor(6, 2, 10, "cosine") == pytest.approx(0.5)
    assert loop.lr_factor(10, 2, 10, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


# ---------------------------------------------------------------------------- the update


def _batch(policy, cfg):
    """A fixed two-group batch of real tiny-model samples with hand-set rewards."""
    stage_rows = tasks.make_pool(["chain_sum:difficulty=0"], 2, 1, "train").to_pylist()
    ids = models.encode_prompts(policy, [r["prompt"] for r in stage_rows])
    gen = torch.Generator().manual_seed(0)
    resp = models.sample(
        policy,
        [p for p in ids for _ in range(4)],
        temperature=1.0,
        max_new_tokens=12,
        generator=gen,
    )
    stage = stages.Stage(0, stage_rows, ids, None, None, None, None, None, {})
    rewards = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]
    eos = policy.tokenizer.eos_token_id
    groups = [
        tgroups.Group(
            j,
            resp[4 * j : 4 * j + 4],
            rewards[j],
            rewards[j],
            [models.is_truncated(r, eos) for r in resp[4 * j : 4 * j + 4]],
        )
        for j in range(2)
    ]
    return tstep.build_batch(policy, stage, groups, cfg), resp


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batched_update_equals_full_batch_autograd(tiny_policy, agg):
    """The loop's micro-batched gradient (3 responses per pass) equals plain autograd of the
    whole-batch surrogate, read off through SGD: delta = -lr * grad."""
    cfg = TrainConfig(micro_batch=3, loss_agg=agg, grad_clip=0.0, max_new_tokens=12)
    batch, _ = _batch(tiny_policy, cfg)
    model = tiny_policy.model
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    tstep.update(tiny_policy, None, opt, batch, cfg)
    delta = [b - p.detach() for b, p in zip(before, model.parameters())]
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    from cropi.train.losses import policy_loss

    model.zero_grad()
    lp = models.token_logprobs(model, batch.ids, batch.attn)
    loss, _ = policy_loss(
        lp, lp.detach(), batch.adv, batch.mask, clip_low=0.2, clip_high=0.2, agg=agg, norm_len=12
    )
    loss.backward()
    for d, p in zip(delta, model.parameters()):
        torch.testing.assert_close(d, p.grad, rtol=1e-4, atol=1e-7)
    model.zero_grad()


def test_update_moves_log_probs_along_the_advantages(tiny_policy):
    """One update raises the log-probability of the positive-advantage responses and lowers the
    negative ones' (the direction of the policy gradient)."""
    import copy

    policy = models.Policy(copy.deepcopy(tiny_policy.model), tiny_policy.tokenizer, "t", "-")
    # a step in RL's range for the tiny policy (lr 1e-3 overshoots it: every log-prob falls, measured)
    cfg = TrainConfig(max_new_tokens=12, lr=1e-4)
    batch, _ = _batch(policy, cfg)

    def seq_logp():
        with torch.no_grad():
            lp = models.token_logprobs(policy.model, batch.ids, batch.attn)
        return (lp * batch.mask).sum(-1)

    before = seq_logp()
    opt = torch.optim.AdamW(policy.model.parameters(), lr=cfg.lr)
    stats = tstep.update(policy, None, opt, batch, cfg)
    change = seq_logp() - before
    assert stats["clip_frac"] == 0.0 and math.isfinite(stats["loss"])
    # advantages: group 0 [+, -, -, +], group 1 [-, -, +, -]
    pos, neg = batch.adv > 0, batch.adv < 0
    assert change[pos].mean() > 0 > change[neg].mean()
    assert (change[pos].mean() - change[neg].mean()) > 0.05


# ---------------------------------------------------------------------------- runs


@pytest.mark.slow  # ~15-20 s each on 2 shared cores; fast: update direction, stateful resume
def test_thirty_steps_raise_training_reward_and_target_accuracy(full_run):
    """Seeded 30-step run (B=4, G=4, lr 1e-4) on the tiny default. The shard is 24 prompts, so
    steps 1-6 and 25-30 each visit every prompt once: their mean rewards compare like with like.
    Target accuracy: mean pass rate of 8 samples at temperature 1 on 24 unseen prompts of the
    family; gold: their mean teacher-forced probability of the gold response.
    Measured with seeds 0-4 (scratch script, this machine, 2026-12-07): reward +0.105, +0.052,
    +0.146, +0.084, +0.115 (seed 0: 0.333 -> 0.438); target accuracy +0.083, +0.104, +0.114,
    +0.067, +0.083 (seed 0: 0.245 -> 0.328); gold +0.100, +0.099, +0.071, +0.093, +0.075 (seed 0:
    0.212 -> 0.312). Seed 0 is asserted with margins well inside its effect."""
    run, summary = full_run
    rows = read_metrics(run / "metrics.jsonl")
    train = [r for r in rows if r["event"] == "train"]
    evals = [r for r in rows if r["event"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 31)) and summary["stopped"] is None
    assert [r["step"] for r in evals] == [0, 15, 30]
    first = np.mean([r["reward_mean"] for r in train[:6]])
    last = np.mean([r["reward_mean"] for r in train[-6:]])
    assert last > first + 0.05
    assert evals[-1]["target"]["learn-val"] > evals[0]["target"]["learn-val"] + 0.03
    assert evals[-1]["target_gold"]["learn-val"] > evals[0]["target_gold"]["learn-val"] + 0.05
    for key in (
        "reward_std",
        "zero_var_frac",
        "clip_frac",
        "entropy",
        "resp_len",
        "trunc_rate",
        "prompts_seen",
        "lr",
        "loss",
        "seconds",
    ):
        assert key in train[0]
    assert train[-1]["prompts_seen"] == 30 * 4 and train[0]["kl"] is None
    saved = (run / "config.yaml").read_text()
    assert "seed: 0" in saved and "steps_per_stage: 30" in saved and "stages: 1" in saved
    assert (run / "plots" / "curves.png").stat().st_size > 10_000
    assert sorted(ckpt.checkpoints(run)) == [30] and (run / "eval" / "step-30.json").exists()
    again = models.load(str(run / "checkpoints" / "step-30"))  # loads as a plain HF model folder
    assert json.loads((run / "checkpoints" / "step-30" / "cropi.json").read_text())["step"] == 30
    assert models.fingerprint(again.model) != models.fingerprint(models.load(models.TINY).model)


@pytest.mark.slow  # ~15-20 s each on 2 shared cores; fast: update direction, stateful resume
def test_sigterm_at_step_15_then_resume_equals_the_uninterrupted_run(data, full_run, monkeypatch):
    """A real SIGTERM during step 15 stops after that step with a checkpoint; --resume then ends
    with the uninterrupted run's metrics (wall clock aside) and bit-identical weights."""
    full, _ = full_run
    run = data / "cut"
    real_step = loop.train_step

    def step_then_signal(*args):
        row = real_step(*args)
        if args[-1] == 15:
            signal.raise_signal(signal.SIGTERM)
        return row

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    cut = loop.train(run, learn_spec(data))
    assert cut["stopped"] == signal.SIGTERM and cut["step"] == 15
    assert sorted(ckpt.checkpoints(run)) == [15]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(loop, "train_step", real_step)
    with open(run / "metrics.jsonl", "a") as f:  # rows written after the checkpoint are dropped
        f.write(json.dumps({"event": "train", "step": 16}) + "\n")
    done = loop.train(run, learn_spec(data), resume=True)
    assert done["stopped"] is None and done["step"] == 30
    assert metric_rows(run) == metric_rows(full)
    a = load_file(full / "checkpoints" / "step-30" / "model.safetensors")
    b = load_file(run / "checkpoints" / "step-30" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def rollouts(data):
    """Offline trajectories of a 16-prompt pool and of an 8-prompt target set (tiny default)."""
    from cropi.rollout import rollout

    pool = tasks.make_pool(TRAIN_SPECS, 4, 5, "train")
    schema.write_parquet_atomic(pool, data / "pool_prompts.parquet")
    schema.write_parquet_atomic(
        tasks.make_pool(COUNT_BITS, 3, 5, "val"), data / "tgt_prompts.parquet"
    )
    rollout(data / "pool_prompts.parquet", data / "pool.parquet", n=4, max_new_tokens=16, seed=1)
    rollout(data / "tgt_prompts.parquet", data / "tgt.parquet", n=4, max_new_tokens=16, seed=2)
    return data / "pool.parquet", data / "tgt.parquet"


def test_rescore_creates_each_stage_by_score_and_select(data, rollouts):
    """Empty curriculum, --rescore, 2 stages x 2 steps: stage 0 is scored with the initial model,
    stage 1 with the step-2 checkpoint, each into RUN/scores/stage-SSS and selected (top 25 %)."""
    pool, tgt = rollouts
    cur, run = data / "cur_rescore", data / "rescore"
    spec = loop.RunSpec(
        curriculum=str(cur),
        targets=[str(tgt)],
        rescore=True,
        trajectories=str(pool),
        ratio=0.25,
        k=64,
        train=TrainConfig(**{**SMALL, "steps_per_stage": 2, "stages": 2, "eval_every": 0}),
    )
    summary = loop.train(run, spec)
    assert summary["step"] == 4 and summary["stage"] == 1
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["event"] == "train"]
    assert [(r["step"], r["stage"]) for r in rows] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert not cur.exists()  # the input curriculum is only read; the run's stages are its own
    assert sorted(curriculum.stage_dirs(run / "curriculum")) == [0, 1]
    step2 = str(run / "checkpoints" / "step-2")
    for s, made_by in [(0, models.TINY), (1, step2)]:
        table, manifest = curriculum.read_stage(run / "curriculum", s)
        meta = json.loads((run / "scores" / f"stage-{s:03d}" / "meta.json").read_text())
        assert manifest["checkpoint"] == made_by and meta["checkpoint"] == made_by
        assert manifest["selector"] == "popi" and table.num_rows == 4  # 25 % of 16
        scores = pq.read_table(run / "scores" / f"stage-{s:03d}" / "scores.parquet").to_pylist()
        ok = sorted((r for r in scores if r["status"] == "ok"), key=lambda r: -r["score"])
        assert set(table.column("id").to_pylist()) == {r["id"] for r in ok[:4]}
    meta1 = json.loads((run / "scores" / "stage-001" / "meta.json").read_text())
    assert meta1["fingerprint"] == models.fingerprint(models.load(step2).model)
    assert sorted(ckpt.checkpoints(run)) == [2, 4]


def test_more_stages_than_the_curriculum_holds_needs_rescore(data):
    with pytest.raises(schema.InputError, match="--rescore"):
        loop.train(data / "nostage", spec_for(data, stages=2))


# ---------------------------------------------------------------------------- every option, one step

NON_DEFAULT = {  # option -> (value, options it needs)
    "adv_mean": ("batch", {"adv_std": "batch"}),
    "adv_std": ("none", {}),
    "adv_eps": (0.01, {}),
    "clip_low": (0.1, {"mu_updates": 2, "lr": 1e-2}),  # lr 1e-2: the second update's ratios leave the clip range
    "clip_high": (0.28, {"mu_updates": 2, "lr": 1e-2}),
    "ratio_level": ("sequence", {"mu_updates": 2, "lr": 1e-2}),
    "loss_agg": ("seq-mean-token-sum-norm", {}),
    "mask_truncated": (True, {"max_new_tokens": 10}),  # about half the responses are cut
    "overlong_penalty": (True, {"max_new_tokens": 10}),
    "overlong_buffer": (8, {"overlong_penalty": True}),
    "overlong_penalty_factor": (0.5, {"overlong_penalty": True, "max_new_tokens": 10}),
    "kl_beta": (0.1, {"mu_updates": 2, "lr": 1e-2}),
    "mu_updates": (3, {}),
    "dynamic_sampling": (True, {}),
    "max_refill": (1, {"dynamic_sampling": True}),
    "vcrl": (True, {}),
    "vcrl_kappa": (0.5, {"vcrl": True}),
    "vcrl_bank_size": (2, {"vcrl": True}),
    "vcrl_max_replay": (1, {"vcrl": True, "max_refill": 0}),
    "rlve": (True, {}),
    "rlve_tau_acc": (0.5, {"rlve": True, "rlve_tau_num": 4}),
    "rlve_tau_num": (4, {"rlve": True}),
    "rlve_window": (0, {"rlve": True, "rlve_tau_num": 4}),
    "rl_plus": (True, {}),
    "rl_plus_gamma": (1.0, {"rl_plus": True}),
    "rl_plus_omega": ("old", {"rl_plus": True, "mu_updates": 2, "lr": 1e-2}),
    "batch_prompts": (2, {}),
    "group_size": (3, {}),
    "lr": (1e-2, {}),
    "max_new_tokens": (8, {}),
    "temperature": (0.7, {}),
    "steps_per_stage": (2, {}),
    "stages": (1, {}),
    "micro_batch": (5, {}),
    "bf16": (True, {}),
    "grad_checkpointing": (True, {}),
    "lora_rank": (4, {}),
    "lora_alpha": (8.0, {"lora_rank": 4}),
    "lora_targets": ("q_proj,v_proj", {"lora_rank": 4}),
    "eval_every": (1, {}),
    "eval_temperature": (0.7, {}),
    "eval_samples": (2, {"eval_temperature": 1.0}),
    "checkpoint_every": (1, {}),
    "seed": (3, {}),
    "grad_clip": (0.05, {}),
    "warmup_steps": (4, {}),
    "lr_schedule": ("cosine", {}),
    "weight_decay": (0.1, {}),
}
TWO_STEPS = {"vcrl_max_replay", "rlve_window", "lr_schedule"}  # their effect shows in step 2

# Verifier stand-ins: the number of passing responses (the first k of G) of the n-th group of a
# generate call; every option's run gets rewards with a learning signal, some options a pattern
# that makes their effect certain. Call numbers count from 1 over the whole run.
MIXED = lambda call, n, G: G // 2 if n % 2 == 0 else G - 1  # noqa: E731
PASSES = {
    "dynamic_sampling": lambda call, n, G: G // 2 if n % 2 == 0 else 0,  # odd groups all fail: dropped
    "max_refill": lambda call, n, G: 0,  # every group dropped: refills until max_refill
    "vcrl": lambda call, n, G: (2, 3, 0)[n % 3],  # p = 1, 0.75, 0
    "vcrl_kappa": lambda call, n, G: (2, 3, 0)[n % 3],
    "vcrl_bank_size": lambda call, n, G: 2,  # every group qualifies (p = 1)
    "vcrl_max_replay": lambda call, n, G: 0 if call == 2 else 2,  # step 2's fresh groups fail: replays
    "rlve_tau_num": lambda call, n, G: G,
    "rlve_tau_acc": lambda call, n, G: 3,  # accuracy 0.75: >= 0.5, < 0.9
    "rlve_window": lambda call, n, G: G,
}


def hand_advantages(rewards: np.ndarray, mean: str, std: str, eps: float) -> np.ndarray:
    """A = (r - mean) / (std + eps) over rewards [B, G] (docs/design.md), unbiased std."""
    m = rewards.mean(1, keepdims=True) if mean == "group" else rewards.mean()
    if std == "none":
        return rewards - m
    sd = rewards.std(1, ddof=1, keepdims=True) if std == "group" else rewards.std(ddof=1)
    return (rewards - m) / (sd + eps)


def hand_penalty(length: int, max_len: int, buffer: int, factor: float) -> float:
    """DAPO's soft overlong penalty: 0 up to max_len - buffer, then linear down to -1 at max_len."""
    if length <= max_len - buffer:
        return 0.0
    return factor * max(-1.0, (max_len - buffer - length) / buffer)


def hand_loss(lp, old, adv, mask, cfg, total, demo=None, ref=None) -> float:
    """The clipped surrogate per token -min(ρA, clip(ρ, 1 - ε_low, 1 + ε_high)A), ρ per token or
    GSPO's exp(mean_t log-ratio) per sequence; RL-PLUS demonstrations -(π / (½π_old + ½ω))·
    (1 - π)^γ·A; + β·k3(ref); aggregated over the whole batch's `total` (float64)."""
    lp, old, m = lp.double(), old.double(), mask.bool()
    a = adv.double()[:, None]
    if cfg.ratio_level == "token":
        ratio = torch.exp(lp - old)
    else:
        seq = (torch.where(m, lp - old, 0.0).sum(1) / m.sum(1).clamp(min=1)).exp()
        ratio = seq[:, None].expand_as(lp)
    per = torch.maximum(-ratio * a, -ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * a)
    if demo is not None:
        omega = 1.0 if cfg.rl_plus_omega == "one" else old.exp()
        w = lp.exp() / (0.5 * old.exp() + 0.5 * omega) * (1 - lp.exp()).clamp(min=0) ** cfg.rl_plus_gamma
        per = torch.where(demo[:, None], -w * a, per)

    def agg(v):
        v = torch.where(m, v, 0.0)
        total_ = max(total, 1.0)  # a batch without loss tokens has loss 0
        if cfg.loss_agg == "token-mean":
            return float(v.sum()) / total_
        norm = m.sum(1).clamp(min=1) if cfg.loss_agg == "seq-mean-token-mean" else cfg.max_new_tokens
        return float((v.sum(1) / norm).sum()) / total_

    loss = agg(per)
    if ref is not None and cfg.kl_beta:  # k3 = e^x - x - 1, x = ref - log π, bounded as documented
        x = (ref.double() - lp).clamp(-20, 20)
        loss += cfg.kl_beta * agg((x.exp() - x - 1).clamp(-10, 10))
    return loss


def hand_lr_factor(i: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier of 0-based step i: linear warm-up (i + 1) / warmup_steps, then 1
    (constant) or a half cosine reaching 0 at the run's last step (stages x steps_per_stage)."""
    if i < cfg.warmup_steps:
        return (i + 1) / cfg.warmup_steps
    total = (cfg.stages or 1) * cfg.steps_per_stage
    return 1.0 if cfg.lr_schedule == "constant" else 0.5 * (1 + math.cos(math.pi * (i - cfg.warmup_steps) / (total - cfg.warmup_steps)))


def hand_rlve(groups, rows, cfg) -> dict:
    """Each task's top difficulty h after these groups, by RLVE's rule: count the responses at h;
    after rlve_tau_num of them raise h (up to the shard's top) if their accuracy is at least
    rlve_tau_acc, and count again."""
    levels = {}
    for r in rows:
        levels.setdefault(r["task"], []).append(int(r["difficulty"]))
    h = {t: min(v) for t, v in levels.items()}
    seen, good = dict.fromkeys(h, 0), dict.fromkeys(h, 0)
    for grp in groups:
        t, d = rows[grp.row]["task"], int(rows[grp.row]["difficulty"])
        for x in grp.raw:
            if d != h[t]:
                continue
            seen[t] += 1
            good[t] += x >= 0.5
            if seen[t] == cfg.rlve_tau_num:
                if good[t] / seen[t] >= cfg.rlve_tau_acc and h[t] < max(levels[t]):
                    h[t] += 1
                seen[t] = good[t] = 0
    return h


def hand_p(passes: list[float]) -> float:
    """VCRL's normalised variance of binary correctness: unbiased variance / its maximum."""
    G, k = len(passes), sum(x >= 0.5 for x in passes)
    var = k * (G - k) / (G * (G - 1))
    return var / (G / (4 * (G - 1)) if G % 2 == 0 else (G + 1) / (4 * G))


class Spy:
    """Records what the trainer hands to the functions that carry its options during one
    `loop.train`, and stands in for the verifier (`PASSES`)."""

    def __init__(self, monkeypatch, passes):
        self.rollouts, self.batches, self.losses, self.forwards = [], [], [], []
        self.clips, self.updates, self.samples, self.checkpoints = [], [], [], []
        self.policy, self.cfg, self.step, self.update_steps = None, None, 0, []
        real_rollout, real_build, real_loss = tgroups.rollout_groups, tstep.build_batch, tstep.policy_loss
        real_fwd, real_update, real_clip = tstep._forward_logprobs, tstep.update, torch.nn.utils.clip_grad_norm_
        real_sample, real_load, real_ckpt = models.sample, scale.load_policy, torch.utils.checkpoint.checkpoint
        real_step = loop.train_step

        def train_step(*args):
            self.step = args[-1]  # the global step, from 1
            return real_step(*args)

        def task_rewards(texts, rows):
            G = self.cfg.group_size
            call = len(self.rollouts) + 1
            return [float(j % G < passes(call, j // G, G)) for j in range(len(texts))]

        def rollout(policy, stage, indices, cfg, gen):
            out = real_rollout(policy, stage, indices, cfg, gen)
            self.rollouts.append((stage, list(map(int, indices)), out))
            return out

        def build(policy, stage, groups, cfg):
            batch = real_build(policy, stage, groups, cfg)
            self.batches.append((stage, list(groups), batch))
            return batch

        def loss(lp, old, adv, mask, **kw):
            out = real_loss(lp, old, adv, mask, **kw)
            self.losses.append((lp.detach().clone(), old.clone(), adv.clone(), mask.clone(), kw, out[0].item(),
                                len(self.batches) - 1))
            return out

        def forward(model, ids, attn, cfg, entropy):
            with torch.no_grad():  # by hand: log-softmax of the logits at the run's temperature
                logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].double() / cfg.temperature
                hand = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                at_one = torch.log_softmax(logits * cfg.temperature, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            n_ckpt = len(self.checkpoints)
            out = real_fwd(model, ids, attn, cfg, entropy)
            self.forwards.append((ids.shape[0], out[0].detach()[:, 1:], hand, at_one, attn[:, 1:].bool(),
                                  len(self.checkpoints) - n_ckpt))
            return out

        def clip(params, max_norm, *a, **k):
            params = list(params)
            total = float(torch.cat([p.grad.flatten() for p in params if p.grad is not None]).double().norm())
            out = real_clip(params, max_norm, *a, **k)
            after = float(torch.cat([p.grad.flatten() for p in params if p.grad is not None]).double().norm())
            self.clips.append((total, after, {id(p): p.grad.clone() for p in params if p.grad is not None}))
            return out

        def update(policy, ref, opt, batch, cfg):
            named = [(n, p) for n, p in policy.model.named_parameters() if p.requires_grad]
            before = {n: p.detach().clone() for n, p in named}
            group = dict(opt.param_groups[0])
            out = real_update(policy, ref, opt, batch, cfg)
            self.update_steps.append(self.step - 1)
            self.updates.append((named, before, {n: p.detach().clone() for n, p in named}, group["lr"],
                                 group["weight_decay"], ref))
            return out

        def sample(policy, prompt_ids, **kw):
            caller = sys._getframe(1).f_globals["__name__"]
            self.samples.append((caller, len(prompt_ids), kw.get("temperature"), kw.get("max_new_tokens")))
            return real_sample(policy, prompt_ids, **kw)

        def load(model, checkpoint, cfg, device):
            self.policy, self.cfg = real_load(model, checkpoint, cfg, device), cfg
            return self.policy

        def ckpt_fn(*a, **k):  # the decoder layers' (re-entrant; the log-prob chunks' are not)
            if k.get("use_reentrant"):
                self.checkpoints.append(1)
            return real_ckpt(*a, **k)

        for obj, name, fn in [(tgroups, "task_rewards", task_rewards), (tgroups, "rollout_groups", rollout),
                              (tstep, "build_batch", build), (tstep, "policy_loss", loss),
                              (tstep, "_forward_logprobs", forward), (tstep, "update", update),
                              (torch.nn.utils, "clip_grad_norm_", clip), (models, "sample", sample),
                              (scale, "load_policy", load), (torch.utils.checkpoint, "checkpoint", ckpt_fn),
                              (loop, "train_step", train_step)]:
            monkeypatch.setattr(obj, name, fn)

    def generated(self):
        return [g for _, _, gs in self.rollouts for g in gs]


def check_truths(spy: Spy, cfg: TrainConfig, eos: int) -> None:
    """What holds in every run, from hand formulas: sampling settings, penalties, advantages,
    loss masks, log-probs, losses, gradient clipping and the AdamW step."""
    for caller, n, temp, max_new in spy.samples:
        if caller == "cropi.train.groups":
            assert (temp, max_new) == (cfg.temperature, cfg.max_new_tokens) and n % cfg.group_size == 0
        else:
            assert caller == "cropi.evaluate" and temp == cfg.eval_temperature
    for grp in spy.generated():
        assert len(grp.responses) == cfg.group_size and all(len(r) <= cfg.max_new_tokens for r in grp.responses)
        pen = [hand_penalty(len(r), cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty_factor)
               if cfg.overlong_penalty else 0.0 for r in grp.responses]
        np.testing.assert_allclose(np.subtract(grp.rewards, grp.raw), pen, atol=1e-6)
    for stage, groups, batch in spy.batches:
        rew = np.array([list(g.rewards) + ([stage.demo_rewards[g.row]] if cfg.rl_plus else []) for g in groups])
        want = hand_advantages(rew, cfg.adv_mean, cfg.adv_std, cfg.adv_eps).flatten()
        np.testing.assert_allclose(batch.adv.numpy(), want, rtol=1e-5, atol=1e-6)
        resps = [r for g in groups for r in list(g.responses) + ([stage.demos[g.row]] if cfg.rl_plus else [])]
        for row, r in zip(batch.mask, resps):  # truncated: cut at the budget without EOS
            dropped = cfg.mask_truncated and r[-1] != eos
            assert int(row.sum()) == (0 if dropped else len(r))
    for _, lp, hand, _, live, _ in spy.forwards:
        if cfg.bf16:  # bf16 rounding through every layer: close on average
            assert float((lp[live].double() - hand[live]).abs().mean()) < 0.05
        else:
            torch.testing.assert_close(lp[live].double(), hand[live], atol=1e-4, rtol=0)
    for lp, old, adv, mask, kw, loss, b in spy.losses:
        want = hand_loss(lp, old, adv, mask, cfg, _total(spy.batches[b][2].mask, cfg), kw["demo"], kw["ref_logp"])
        assert loss == pytest.approx(want, rel=1e-4, abs=1e-7)
    for total, after, _ in spy.clips:
        assert after == pytest.approx(min(total, cfg.grad_clip) if cfg.grad_clip > 0 else total, rel=1e-4)
    if cfg.mu_updates == 1:  # AdamW by hand (betas 0.9, 0.999, eps 1e-8) from the clipped gradients
        m, v = {}, {}
        for t, ((named, before, after, lr, wd, _), (_, _, grads), i) in enumerate(
                zip(spy.updates, spy.clips, spy.update_steps), 1):
            assert lr == pytest.approx(cfg.lr * hand_lr_factor(i, cfg)) and wd == cfg.weight_decay
            for n, p in named:
                g = grads.get(id(p))
                if g is None:
                    torch.testing.assert_close(after[n], before[n], atol=0, rtol=0)
                    continue
                m[n] = 0.9 * m.get(n, 0) + 0.1 * g.double()
                v[n] = 0.999 * v.get(n, 0) + 0.001 * g.double() ** 2
                step = (m[n] / (1 - 0.9**t)) / ((v[n] / (1 - 0.999**t)).sqrt() + 1e-8)
                want = before[n].double() * (1 - lr * wd) - lr * step
                torch.testing.assert_close(after[n].double(), want, atol=2e-7, rtol=1e-6)


def _total(mask, cfg) -> float:
    """The whole batch's denominator: its loss tokens (token-mean) or its responses with any."""
    return float(mask.sum()) if cfg.loss_agg == "token-mean" else float((mask.sum(-1) > 0).sum())


def _differs(spy, cfg, option):
    """Some recorded loss differs from the hand loss with the option at its default value."""
    default = dataclasses.replace(cfg, **{option: getattr(TrainConfig(), option)})
    return any(abs(loss - hand_loss(lp, old, adv, mask, default, _total(spy.batches[b][2].mask, default), kw["demo"],
                                    kw["ref_logp"])) > 1e-5
               for lp, old, adv, mask, kw, loss, b in spy.losses)


def _adv_differs(spy, cfg, **default):
    stage, groups, batch = spy.batches[0]
    rew = np.array([list(g.rewards) for g in groups])
    d = dataclasses.replace(cfg, **default)
    return not np.allclose(batch.adv.numpy(), hand_advantages(rew, d.adv_mean, d.adv_std, d.adv_eps).flatten())


def _penalty_differs(spy, cfg, **default):
    d = dataclasses.replace(cfg, **default)
    return any(abs(hand_penalty(len(r), d.max_new_tokens, d.overlong_buffer, d.overlong_penalty_factor)
                   - (g.rewards[j] - g.raw[j])) > 1e-6 for g in spy.generated() for j, r in enumerate(g.responses))


def _lora_modules(model) -> set:
    return {n.rsplit(".lora_A", 1)[0].split(".")[-1] for n, p in model.named_parameters() if ".lora_A" in n}


def _lora_forward_ok(model, cfg) -> bool:
    """A LoRA-wrapped projection computes W x + (alpha / rank)·B A x, B moved by the step."""
    mod = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A"))
    A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
    x = torch.randn(3, A.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = x @ mod.base_layer.weight.T + (cfg.lora_alpha / cfg.lora_rank) * (x @ A.T @ B.T)
        return float(B.abs().max()) > 0 and torch.allclose(mod(x), want, atol=1e-6)


def _effects(spy, cfg, out, run, rows, data) -> dict:
    """Per option, a check that the option did what it says (and its default would not have)."""
    stage0, groups0, batch0 = spy.batches[0] if spy.batches else (None, [], None)
    first = spy.rollouts[0]
    train_rows = [r for r in read_metrics(run / "metrics.jsonl") if r["event"] == "train"]
    eval_rows = [r for r in read_metrics(run / "metrics.jsonl") if r["event"] == "eval"]
    row = train_rows[0]
    n_chunks = lambda: len(spy.forwards) // cfg.mu_updates  # noqa: E731
    eos = spy.policy.tokenizer.eos_token_id
    fresh = lambda: [g for _, _, gs in spy.rollouts for g in gs]  # noqa: E731
    perm = lambda seed, n: np.random.default_rng([derive_seed(seed, "stage", 0), 0]).permutation(n)  # noqa: E731
    stage_rows = first[0].rows
    return {
        "adv_mean": lambda: _adv_differs(spy, cfg, adv_mean="group"),
        "adv_std": lambda: _adv_differs(spy, cfg, adv_std="group"),
        "adv_eps": lambda: _adv_differs(spy, cfg, adv_eps=1e-4),
        "clip_low": lambda: _differs(spy, cfg, "clip_low"),
        "clip_high": lambda: _differs(spy, cfg, "clip_high"),
        "ratio_level": lambda: _differs(spy, cfg, "ratio_level"),
        "loss_agg": lambda: _differs(spy, cfg, "loss_agg"),
        "kl_beta": lambda: _differs(spy, cfg, "kl_beta") and row["kl"] is not None and row["kl"] >= 0,
        "rl_plus_gamma": lambda: _differs(spy, cfg, "rl_plus_gamma"),
        "rl_plus_omega": lambda: _differs(spy, cfg, "rl_plus_omega"),
        "rl_plus": lambda: batch0.demo.sum() == len(groups0) and row["demo_weight_mean"] > 0,
        "mask_truncated": lambda: {r[-1] != eos for g in groups0 for r in g.responses} == {True, False},
        "overlong_penalty": lambda: row["overlong_penalty"] < 0,
        "overlong_buffer": lambda: _penalty_differs(spy, cfg, overlong_buffer=4),
        "overlong_penalty_factor": lambda: _penalty_differs(spy, cfg, overlong_penalty_factor=1.0),
        "mu_updates": lambda: len(spy.losses) == 3 * n_chunks() and row["ratio_max"] > 1.0,
        "dynamic_sampling": lambda: (  # kept: exactly the groups whose correctness varies
            [g.row for g in groups0] == [g.row for g in fresh() if 0 < sum(g.raw) < len(g.raw)][: cfg.batch_prompts]
            and row["dropped"] == sum(1 for g in fresh() if sum(g.raw) in (0, len(g.raw))) > 0),
        "max_refill": lambda: row["gen_calls"] == 2 and row["groups"] == 0,
        "vcrl": lambda: (all(hand_p(g.raw) >= 0.8 for g in groups0)
                         and [g.row for g in groups0] == [g.row for g in fresh() if hand_p(g.raw) >= 0.8][: cfg.batch_prompts]
                         and row["dropped"] > 0),
        "vcrl_kappa": lambda: (all(hand_p(g.raw) >= 0.5 for g in groups0)
                               and any(0.5 <= hand_p(g.raw) < 0.8 for g in groups0)),
        "vcrl_bank_size": lambda: len(stage0.bank) == 2 < len({g.row for g in fresh() if hand_p(g.raw) >= 0.8}),
        "vcrl_max_replay": lambda: (train_rows[1]["replayed"] > 0 and all(  # left the bank, came back fresh
            spy.rollouts[-1][0].bank.replays(k) == 0 for k in spy.rollouts[-1][1])),
        "rlve": lambda: (row["rlve_h"] == hand_rlve(fresh(), stage_rows, cfg)
                         and {int(stage_rows[g.row]["difficulty"]) for g in fresh()} == {0}
                         and {int(r["difficulty"]) for r in stage_rows} == {0, 1, 2}),
        "rlve_tau_num": lambda: row["rlve_h"] == hand_rlve(fresh(), stage_rows, cfg) != hand_rlve(
            fresh(), stage_rows, dataclasses.replace(cfg, rlve_tau_num=32)),
        "rlve_tau_acc": lambda: row["rlve_h"] == hand_rlve(fresh(), stage_rows, cfg) != hand_rlve(
            fresh(), stage_rows, dataclasses.replace(cfg, rlve_tau_acc=0.9)),
        "rlve_window": lambda: (train_rows[0]["rlve_h"]["count_bits"] == 1 and {  # step 2 draws h only
            int(stage_rows[i]["difficulty"]) for _, idx, _ in spy.rollouts[1:] for i in idx
            if stage_rows[i]["task"] == "count_bits"} == {1}),
        "batch_prompts": lambda: len(first[1]) == 2 and row["prompts_seen"] == row["generated"] == 2,
        "group_size": lambda: all(len(g.responses) == 3 for g in fresh()),
        "lr": lambda: spy.updates[0][3] == pytest.approx(1e-2) and row["lr"] == pytest.approx(1e-2),
        "max_new_tokens": lambda: max(len(r) for g in fresh() for r in g.responses) == 8,
        "temperature": lambda: all(float((lp[live].double() - at_one[live]).abs().max()) > 0.01  # not T = 1
                                   for _, lp, _, at_one, live, _ in spy.forwards),
        "steps_per_stage": lambda: out["total_steps"] == 2,
        "stages": lambda: out["total_steps"] == 1 and len(curriculum.stage_dirs(rows)) == 2,
        "micro_batch": lambda: ([n for n, *_ in spy.forwards[:-1]] == [5] * (len(spy.forwards) - 1)
                                and len(spy.forwards) == math.ceil(batch0.ids.shape[0] / 5) > 1),
        "bf16": lambda: all(float((lp[live].double() - hand[live]).abs().max()) > 1e-3  # not float32's
                            for _, lp, hand, _, live, _ in spy.forwards),
        "grad_checkpointing": lambda: all(c == spy.policy.model.config.num_hidden_layers for *_, c in spy.forwards),
        "lora_rank": lambda: (all(".lora_" in n for n, _ in spy.updates[0][0]) and all(
            p.shape[0 if "lora_A" in n else 1] == 4 for n, p in spy.updates[0][0])),
        "lora_alpha": lambda: _lora_forward_ok(spy.policy.model, cfg),
        "lora_targets": lambda: _lora_modules(spy.policy.model) == {"q_proj", "v_proj"},
        "eval_every": lambda: [r["step"] for r in eval_rows] == [0, 1] and (run / "eval" / "step-1.json").exists(),
        "eval_temperature": lambda: {t for c, _, t, _ in spy.samples if c == "cropi.evaluate"} == {0.7},
        "eval_samples": lambda: all(n == 2 * 24 for c, n, _, _ in spy.samples if c == "cropi.evaluate"),
        "checkpoint_every": lambda: sorted(ckpt.checkpoints(run)) == [1],
        "seed": lambda: first[1] == perm(3, len(stage_rows))[:4].tolist() != perm(0, len(stage_rows))[:4].tolist(),
        "grad_clip": lambda: spy.clips[0][1] == pytest.approx(0.05, rel=1e-4) and 0.05 < spy.clips[0][0] < 1.0,  # 1.0: unclipped
        "warmup_steps": lambda: row["lr"] == pytest.approx(cfg.lr / 4),
        "lr_schedule": lambda: train_rows[1]["lr"] == pytest.approx(cfg.lr * 0.5 * (1 + math.cos(math.pi / 2))),
        "weight_decay": lambda: any(float((a - b).abs().max()) > 0 for a, b in zip(spy.updates[0][1].values(), spy.updates[0][2].values())),
    }


def test_every_option_is_exercised():
    assert set(NON_DEFAULT) == set(TrainConfig().to_dict())


@pytest.mark.parametrize("option", sorted(NON_DEFAULT))
def test_each_option_has_its_effect(data, option, monkeypatch, tmp_path):
    """One step (two for TWO_STEPS) with the option away from its default: every run matches the
    hand formulas of `check_truths`, and the option shows its own effect (`_effects`)."""
    monkeypatch.setattr(loop, "plot_curves", lambda *a: None)
    value, needs = NON_DEFAULT[option]
    steps = 2 if option in TWO_STEPS else 1
    base = {**SMALL, "steps_per_stage": steps, "eval_every": 0, **needs}
    cfg = TrainConfig(**{**base, option: value})
    assert getattr(cfg, option) != getattr(TrainConfig(**base), option)
    cur = data / "cur"
    if option == "stages":  # two stages written; stages=1 trains the first only
        cur = tmp_path / "cur2"
        for seed in (0, 1):
            curriculum.write_stage(cur, tasks.make_pool(TRAIN_SPECS, 6, seed, "train"), {"selector": "test"})
    targets = [str(data / "val.parquet")] if option.startswith("eval_") else []
    spy = Spy(monkeypatch, PASSES.get(option, MIXED))
    spec = loop.RunSpec(curriculum=str(cur), targets=targets, train=cfg)
    out = loop.train(tmp_path / "run", spec, max_steps=steps)
    row = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "train"][0]
    assert out["step"] == steps and math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
    check_truths(spy, cfg, spy.policy.tokenizer.eos_token_id)
    assert _effects(spy, cfg, out, tmp_path / "run", cur, data)[option]()


# ---------------------------------------------------------------------------- evaluation


def test_greedy_accuracy_equals_one_prompt_at_a_time(tiny_policy, data):
    """Batched (left-padded) greedy eval agrees with sampling and verifying each prompt alone."""
    rows = pq.read_table(data / "val.parquet").to_pylist()[:8]
    res = evaluate(tiny_policy, rows, max_new_tokens=16, batch=3)
    alone = []
    for r in rows:
        ids = models.encode_prompts(tiny_policy, [r["prompt"]])
        out = models.sample(tiny_policy, ids, temperature=0.0, max_new_tokens=16)
        alone.append(
            rewards.reward(
                models.decode_responses(tiny_policy, out)[0], r["answer"], r["task"], r["metadata"]
            )
            >= 0.5
        )
    assert res["n"] == 8 and res["accuracy"] == pytest.approx(np.mean(alone))
    assert res["pass@k"] == {"1": pytest.approx(np.mean(alone))}
    assert res["per_prompt"] == [float(a) for a in alone]  # in row order
    by_task = {
        t: np.mean([a for a, r in zip(alone, rows) if r["task"] == t])
        for t in {r["task"] for r in rows}
    }
    assert res["per_task"] == pytest.approx(by_task)


def test_cropi_eval_cli(data, tmp_path):
    runner = CliRunner()
    out = tmp_path / "eval.json"
    res = runner.invoke(
        main,
        [
            "eval",
            "--target",
            str(data / "val.parquet"),
            "--n-samples",
            "4",
            "--temperature",
            "1.0",
            "--max-new-tokens",
            "16",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report == json.loads(out.read_text())
    s = report["sets"]["val"]
    assert s["n"] == 24 and s["n_samples"] == 4 and set(s["pass@k"]) == {"1", "2", "4"}
    assert s["pass@k"]["1"] == pytest.approx(s["accuracy"])
    assert s["pass@k"]["1"] <= s["pass@k"]["2"] <= s["pass@k"]["4"]
    bad = runner.invoke(main, ["eval", "--target", str(data / "val.parquet"), "--n-samples", "2"])
    assert bad.exit_code == 2 and "--temperature" in bad.output
    missing = runner.invoke(main, ["eval", "--target", str(tmp_path / "nope.parquet")])
    assert missing.exit_code == 2 and "nope.parquet" in missing.output


# ---------------------------------------------------------------------------- cropi train


def test_cropi_train_cli_resume_rules_and_sigterm_exit_code(data, tmp_path, monkeypatch):
    runner = CliRunner()
    run = tmp_path / "run"
    config = {
        "curriculum": str(data / "cur"),
        "train": {
            "steps_per_stage": 2,
            "batch_prompts": 2,
            "group_size": 4,
            "max_new_tokens": 8,
            "eval_every": 0,
        },
    }
    (tmp_path / "cfg.yaml").write_text(json.dumps(config))  # JSON is YAML
    args = [
        "train",
        "--config",
        str(tmp_path / "cfg.yaml"),
        "--run",
        str(run),
        "--target",
        str(data / "val.parquet"),
        "--group-size",
        "2",
    ]
    real_step = loop.train_step

    def step_then_signal(*a):
        row = real_step(*a)
        signal.raise_signal(signal.SIGTERM)
        return row

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    res = runner.invoke(main, args)
    assert res.exit_code == 128 + signal.SIGTERM, res.output
    assert sorted(ckpt.checkpoints(run)) == [1]
    monkeypatch.setattr(loop, "train_step", real_step)
    again = runner.invoke(main, args)
    assert again.exit_code == 2 and "--resume" in again.output
    changed = runner.invoke(main, ["train", "--run", str(run), "--resume", "--lr", "0.5"])
    assert changed.exit_code == 2 and "field lr: --resume: given 0.5" in changed.output
    done = runner.invoke(main, ["train", "--run", str(run), "--resume"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output.splitlines()[-1])["step"] == 2
    saved = loop.RunSpec.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    assert (
        saved.train.batch_prompts == 2 and saved.train.group_size == 2
    )  # --config, overridden by a flag
    assert saved.train.stages == 1 and saved.targets == [str(data / "val.parquet")]


def test_stateful_options_resume_exactly(data, tmp_path, monkeypatch):
    """Sampler, VCRL bank, RLVE controller, reference model and optimiser state survive a stop
    at step 3 of 6 (spanning two stages of 3)."""
    monkeypatch.setattr(loop, "plot_curves", lambda *a: None)
    curriculum.write_stage(
        tmp_path / "cur", tasks.make_pool(TRAIN_SPECS, 3, 1, "train"), {"selector": "test"}
    )
    curriculum.write_stage(
        tmp_path / "cur", tasks.make_pool(TRAIN_SPECS, 3, 2, "train"), {"selector": "test"}
    )
    opts = dict(
        vcrl=True,
        vcrl_kappa=0.3,
        rlve=True,
        rlve_tau_num=4,
        rlve_tau_acc=0.2,
        dynamic_sampling=True,
        max_refill=1,
        rl_plus=True,
        kl_beta=0.05,
        mu_updates=2,
        overlong_penalty=True,
        steps_per_stage=3,
        max_new_tokens=12,
        lr_schedule="cosine",
        warmup_steps=2,
    )
    spec = loop.RunSpec(curriculum=str(tmp_path / "cur"), train=TrainConfig(**{**SMALL, **opts}))
    loop.train(tmp_path / "a", spec)
    assert loop.train(tmp_path / "b", spec, max_steps=2)["stopped"] == 0
    loop.train(tmp_path / "b", spec, resume=True)
    rows = metric_rows(tmp_path / "a")
    assert rows == metric_rows(tmp_path / "b") and [r["stage"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert any(r["replayed"] or r["dropped"] for r in rows)
    a = load_file(tmp_path / "a" / "checkpoints" / "step-6" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step-6" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tensorboard_events_when_available(data, tmp_path, monkeypatch):
    """With torch.utils.tensorboard importable, every numeric metric goes to a SummaryWriter."""
    import sys
    import types

    calls = []

    class Writer:
        def __init__(self, logdir, purge_step=None):
            calls.append(("init", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer)
    )
    monkeypatch.setattr(loop, "plot_curves", lambda *a: None)
    loop.train(tmp_path / "run", spec_for(data, steps_per_stage=2, eval_every=0), max_steps=2)
    assert calls[0] == ("init", str(tmp_path / "run" / "tb")) and calls[-1] == ("close",)
    tags = {c[0] for c in calls[1:-1]}
    assert {"train/reward_mean", "train/loss", "eval/target/val"} <= tags
    assert ("train/prompts_seen", 8, 2) in calls
