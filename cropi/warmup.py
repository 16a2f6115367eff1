"""Warm up the tiny default policy: a short supervised run on task solutions, stopped where RL
can still improve it.

A randomly initialised model solves nothing, so RL on it has no reward signal; a fully trained
one leaves RL nothing to do. On a model this small GRPO mostly turns what the model gets right
greedily into what it gets right when sampling at T = 1 (RL-Wall, arXiv 2505.22756), so the
warm-up trains on ``prompt -> "Answer: <gold>" + EOS`` from a few families with large prompt
spaces (seeds disjoint from every pool's) and stops at the first evaluation where, on the target
family, T = 1 accuracy has reached ``stop_t1`` and greedy accuracy is at least ``stop_gap``
above it. Each evaluation records greedy and T = 1 accuracy per family on its test split.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from cropi import models, tasks
from cropi.evaluate import evaluate, gold_batch
from cropi.runtime import derive_seed, progress

# The families of the embedded default (`cropi.tasks`): a target family, two that share its skill
# in other words, and two that do not.
TARGET_SPEC = tasks.TARGET_SPEC
WARMUP_SPECS = (TARGET_SPEC, *tasks.RELATED_SPECS, *tasks.UNRELATED_SPECS)


def sft_loss(policy: models.Policy, rows: list[dict]) -> torch.Tensor:
    """Mean negative log-likelihood of the gold response tokens (a scalar)."""
    ids, attn, rmask = gold_batch(policy, rows)
    lp = models.token_logprobs(policy.model, ids, attn)
    return -(lp * rmask).sum() / rmask.sum()


def family_accuracy(policy: models.Policy, sets: dict[str, list[dict]], *, seed: int,
                    samples: int = 4, max_new_tokens: int = 24) -> dict:
    """{spec: {"greedy": accuracy, "t1": mean accuracy over ``samples`` samples at T = 1}}."""
    out = {}
    for spec, rows in sets.items():
        greedy = evaluate(policy, rows, temperature=0.0, max_new_tokens=max_new_tokens)["accuracy"]
        t1 = evaluate(policy, rows, n_samples=samples, temperature=1.0, max_new_tokens=max_new_tokens,
                      seed=derive_seed(seed, "warmup-eval", spec))["accuracy"]
        out[spec] = {"greedy": round(greedy, 4), "t1": round(t1, 4)}
    return out


def warmup(out=None, *, seed: int = 0, max_steps: int = 2500, batch_size: int = 64, lr: float = 2e-3,
           warmup_steps: int = 100, eval_every: int = 250, eval_n: int = 100,
           stop_t1: float = 0.3, stop_gap: float = 0.08, specs: list[str] | None = None,
           target: str = TARGET_SPEC, n_per_spec: int = 2000) -> dict:
    """Build the tiny model, train it by supervised steps until the stop rule holds (or
    ``max_steps``), save it with ``cropi.json`` (recipe, per-family greedy and T = 1 accuracy at
    every evaluation, where it stopped) and return that info.

    Schedule: AdamW at ``lr``, linear warm-up over ``warmup_steps``, then linear decay to 0 at
    ``max_steps``. Evaluation: ``eval_n`` test-split prompts per family every ``eval_every`` steps.
    """
    out = Path(out) if out is not None else models.tiny_path()
    specs = list(specs or WARMUP_SPECS)
    if target not in specs:
        raise ValueError(f"warm-up target {target!r} is not one of the warm-up specs")
    t0 = time.time()
    tok = models.build_tiny_tokenizer()
    policy = models.Policy(models.build_tiny_model(tok, seed=seed), tok, models.TINY, str(out))
    train_rows = tasks.make_pool(specs, n_per_spec, derive_seed(seed, "warmup"), "train").to_pylist()
    eval_sets = {s: tasks.make_pool([s], eval_n, derive_seed(seed, "warmup-eval"), "test").to_pylist() for s in specs}
    opt = torch.optim.AdamW(policy.model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup_steps, max(0.0, (max_steps - s) / (max_steps - warmup_steps))))
    g = torch.Generator().manual_seed(derive_seed(seed, "warmup-order"))
    history, stopped = [], False
    bar = progress(total=max_steps, desc="warmup", unit="step")
    for step in range(1, max_steps + 1):
        policy.model.train()
        idx = torch.randint(len(train_rows), (batch_size,), generator=g).tolist()
        loss = sft_loss(policy, [train_rows[i] for i in idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update(1)
        if step % eval_every == 0 or step == max_steps:
            acc = family_accuracy(policy, eval_sets, seed=seed)
            history.append({"step": step, "loss": round(loss.item(), 4), "accuracy": acc})
            tgt = acc[target]
            bar.set_postfix(loss=f"{loss.item():.3f}", greedy=tgt["greedy"], t1=tgt["t1"])
            if tgt["t1"] >= stop_t1 and tgt["greedy"] >= tgt["t1"] + stop_gap:
                stopped = True
                break
    bar.close()
    policy.model.eval()
    info = {
        "kind": models.TINY,
        "model_config": models.TINY_CONFIG,
        "chars": models.TINY_CHARS,
        "parameters": sum(p.numel() for p in policy.model.parameters()),
        "recipe": {"seed": seed, "max_steps": max_steps, "batch_size": batch_size, "lr": lr,
                   "warmup_steps": warmup_steps, "eval_every": eval_every, "eval_n": eval_n,
                   "stop_t1": stop_t1, "stop_gap": stop_gap, "specs": specs, "target": target,
                   "n_per_spec": n_per_spec},
        "steps": step,
        "stopped_by_rule": stopped,
        "accuracy": history[-1]["accuracy"] if history else {},
        "seconds": round(time.time() - t0, 1),
        "history": history,
    }
    models.save(policy.model, tok, out, info)
    return info


def info(path=None) -> dict:
    path = Path(path) if path is not None else models.tiny_path()
    return json.loads((path / "cropi.json").read_text())
