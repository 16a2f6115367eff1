"""Generation of groups: G sampled responses per drawn prompt, verified, with the overlong
penalty, dynamic sampling, VCRL filtering/replay and RL-PLUS demonstrations (docs/design.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cropi import models, schema
from cropi.advantages import has_signal
from cropi.rewards import rewards as task_rewards
from cropi.train.config import TrainConfig
from cropi.train.losses import overlong_penalty
from cropi.train.samplers import dynamic_sampling
from cropi.train.stages import Stage, draw


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
