"""One optimisation step: pack the groups into sequences, take `mu_updates` clipped-surrogate
updates (micro-batched, optionally under bf16 autocast), and report the step's metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cropi import models, schema
from cropi.advantages import group_advantages, has_signal
from cropi.runtime import derive_seed
from cropi.train import scale
from cropi.train.config import TrainConfig
from cropi.train.groups import Group, collect
from cropi.train.losses import mask_truncated, policy_loss, rl_plus_token_weights
from cropi.train.stages import Stage


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
    gen = models.generator(policy, derive_seed(cfg.seed, "step", step))
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
