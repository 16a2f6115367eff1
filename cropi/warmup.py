"""Warm up the tiny default policy: a short supervised run on task solutions.

A randomly initialised model solves nothing, so RL on it has no reward signal. The warm-up
trains the tiny model on ``prompt -> "Answer: <gold>"`` pairs from the default task families
(a seed disjoint from the pools') until its pass rate at temperature 1 on the default training
pool reaches ``target`` (within the 15-70 % band the product needs), or ``max_steps``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from cropi import models, rewards, tasks
from cropi.runtime import derive_seed, progress

# Every default family at every level the task suite offers for it (a superset of the pools).
WARMUP_SPECS = (
    *(f"{t}:difficulty={d}" for t in ("basic_arithmetic", "chain_sum", "count_bits", "spell_backward") for d in (0, 1, 2)),
    *(f"simple_equations:difficulty={d}" for d in (0, 1)),
    *(tasks.COMPLEX_ADD_SUB.format(d) for d in (0, 1, 2)),
)


def sft_batch(policy: models.Policy, rows: list[dict]):
    """Tokens for supervised steps: input_ids, attention_mask, and the mask of answer tokens."""
    eos = policy.tokenizer.eos_token_id
    prompt_ids = models.encode_prompts(policy, [r["prompt"] for r in rows])
    answer_ids = [policy.tokenizer(f"{tasks.ANSWER_PREFIX} {r['answer']}", add_special_tokens=False)["input_ids"] + [eos]
                  for r in rows]
    return models.pack(prompt_ids, answer_ids, policy.tokenizer.pad_token_id, policy.device)


def sft_loss(policy: models.Policy, rows: list[dict]) -> torch.Tensor:
    """Mean negative log-likelihood of the gold answer tokens."""
    ids, attn, rmask = sft_batch(policy, rows)
    lp = models.token_logprobs(policy.model, ids, attn)
    return -(lp * rmask).sum() / rmask.sum()


@torch.no_grad()
def pass_rate(policy: models.Policy, rows: list[dict], *, seed: int = 0, max_new_tokens: int = 24,
              temperature: float = 1.0) -> float:
    """Fraction of rows solved by one sample each at ``temperature``."""
    policy.model.eval()
    g = models.generator(policy, seed)
    resp = models.sample(policy, models.encode_prompts(policy, [r["prompt"] for r in rows]),
                         temperature=temperature, max_new_tokens=max_new_tokens, generator=g)
    rew = rewards.rewards(models.decode_responses(policy, resp), rows)
    return sum(r >= 0.5 for r in rew) / len(rows)


def warmup(out=None, *, seed: int = 0, max_steps: int = 1500, batch_size: int = 32, lr: float = 3e-3,
           target: float = 0.3, eval_every: int = 50, n_per_spec: int = 400, eval_n: int = 128,
           specs: list[str] | None = None) -> dict:
    """Build the tiny model, train it until its pass rate on the default pool reaches ``target``,
    save it (with ``cropi.json`` recording what was reached) and return that info."""
    out = Path(out) if out is not None else models.tiny_path()
    specs = list(specs or WARMUP_SPECS)
    t0 = time.time()
    tok = models.build_tiny_tokenizer()
    policy = models.Policy(models.build_tiny_model(tok, seed=seed), tok, models.TINY, str(out))
    train_rows = tasks.make_pool(specs, n_per_spec, derive_seed(seed, "warmup"), "train").to_pylist()
    eval_rows = tasks.make_pool(specs, max(1, eval_n // len(specs)), 0, "train").to_pylist()
    opt = torch.optim.AdamW(policy.model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    g = torch.Generator().manual_seed(derive_seed(seed, "warmup-order"))
    history, rate, step, best = [], 0.0, 0, 0.0
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
        if step % eval_every == 0:
            rate = pass_rate(policy, eval_rows, seed=step)
            history.append({"step": step, "loss": round(loss.item(), 4), "pass_rate": round(rate, 4)})
            bar.set_postfix(loss=f"{loss.item():.3f}", pass_rate=f"{rate:.2f}")
            if rate >= target:
                break
            if rate >= 0.15 and rate > best:  # in the product's band: keep it should a later step be worse or the run be cut
                best = rate
                models.save(policy.model, tok, out, {"kind": models.TINY, "partial": True, "steps": step, "pass_rate": round(rate, 4),
                                                     "model_config": models.TINY_CONFIG, "chars": models.TINY_CHARS})
    bar.close()
    policy.model.eval()
    info = {
        "kind": models.TINY,
        "model_config": models.TINY_CONFIG,
        "chars": models.TINY_CHARS,
        "seed": seed,
        "steps": step,
        "pass_rate": round(rate, 4),
        "target": target,
        "specs": specs,
        "seconds": round(time.time() - t0, 1),
        "history": history,
    }
    models.save(policy.model, tok, out, info)
    return info


def info(path=None) -> dict:
    path = Path(path) if path is not None else models.tiny_path()
    return json.loads((path / "cropi.json").read_text())
