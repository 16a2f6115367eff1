"""Accuracy and pass@k of a policy on prompt sets: the trainer's periodic eval and `cropi eval`.

A set is any prompts or trajectories table (only the prompt columns are used). A response
passes when its verifiable reward is at least `schema.PASS_THRESHOLD`. Greedy decoding
(temperature 0) gives one deterministic answer per prompt; with n samples at temperature > 0,
accuracy is the mean per-prompt pass rate c/n and pass@k is the unbiased estimator of
Chen et al. (2021), 1 - C(n - c, k) / C(n, k), averaged over prompts.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from cropi import models, rewards, schema, tasks
from cropi.runtime import MAX_NEW_TOKENS, derive_seed, progress
from cropi.schema import target_names as set_names  # one naming rule: eval names == score__<name>


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k draws (without replacement) from n responses, c of
    which pass, passes: 1 - C(n - c, k) / C(n, k). Requires 1 <= k <= n, 0 <= c <= n."""
    if not (1 <= k <= n and 0 <= c <= n):
        raise ValueError(f"pass_at_k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def ks_for(n: int) -> list[int]:
    """The k reported for n samples: powers of two below n, and n."""
    return sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | {n})


def load_set(path, columns: dict | None = None, split: str | None = None) -> list[dict]:
    """Prompt rows (id, prompt, answer, task, difficulty, split[, metadata]) of a prompts or
    trajectories file (``columns``, ``split``: see `schema.read_table`)."""
    return schema.prompt_columns(schema.read_table(path, columns=columns, split=split)).to_pylist()


@torch.no_grad()
def evaluate(
    policy: models.Policy,
    rows: list[dict],
    *,
    n_samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    seed: int = 0,
    batch: int = 256,
    verifier: str = "auto",
    partial: bool = False,
    bar=None,
) -> dict:
    """Sample `n_samples` responses per row, verify them, and summarise.

    Args:
        rows: prompt rows (prompt, answer, task, metadata...).
        temperature: 0 = greedy (then n_samples must be 1).
        seed: seeds the sampling generator (unused when greedy).
        batch: sequences per `models.sample` call.
        verifier, partial: how responses are verified (`cropi.rewards.reward`).
        bar: a `runtime.progress` display advanced by one per prompt, or None.

    Returns: {"n": prompts, "n_samples", "accuracy": mean c/n, "pass@k": {k: mean pass@k}
    (k in `ks_for(n_samples)`, as strings), "mean_reward", "resp_len" (mean tokens), "trunc_rate",
    "per_task": {task: accuracy}, "per_prompt": [accuracy of each row, in row order]}. Floats are
    python floats.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if temperature <= 0 and n_samples > 1:
        raise ValueError(
            "--n-samples > 1 needs --temperature > 0 (greedy answers are all the same)"
        )
    if not rows:
        raise ValueError("evaluate: no prompts")
    policy.model.eval()
    prompt_ids = models.encode_prompts(policy, [r["prompt"] for r in rows])
    flat_ids = [p for p in prompt_ids for _ in range(n_samples)]
    flat_rows = [r for r in rows for _ in range(n_samples)]
    gen = models.generator(policy, derive_seed(seed, "eval"))
    responses: list[list[int]] = []
    bar_done = 0
    for s in range(0, len(flat_ids), batch):
        responses += models.sample(
            policy,
            flat_ids[s : s + batch],
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            generator=gen,
        )
        if bar is not None:
            bar.update(len(responses) // n_samples - bar_done)
            bar_done = len(responses) // n_samples
    rew = np.asarray(
        rewards.rewards(models.decode_responses(policy, responses), flat_rows, verifier=verifier, partial=partial),
        dtype=np.float64,
    ).reshape(len(rows), n_samples)
    correct = (rew >= schema.PASS_THRESHOLD).sum(axis=1)
    acc = correct / n_samples
    eos = policy.tokenizer.eos_token_id
    per_task: dict[str, list[float]] = {}
    for r, a in zip(rows, acc.tolist()):
        per_task.setdefault(r["task"], []).append(a)
    return {
        "n": len(rows),
        "n_samples": n_samples,
        "accuracy": float(acc.mean()),
        "pass@k": {
            str(k): float(np.mean([pass_at_k(n_samples, int(c), k) for c in correct]))
            for k in ks_for(n_samples)
        },
        "mean_reward": float(rew.mean()),
        "resp_len": float(np.mean([len(x) for x in responses])),
        "trunc_rate": float(np.mean([models.is_truncated(x, eos) for x in responses])),
        "per_task": {t: float(np.mean(v)) for t, v in sorted(per_task.items())},
        "per_prompt": acc.tolist(),
    }


def gold_batch(policy: models.Policy, rows: list[dict]):
    """Each prompt followed by its canonical gold response ``"Answer: <answer>"`` + EOS, the
    response the verifier accepts and the warm-up teaches: `models.pack` output (input_ids [N, T]
    long, attention_mask [N, T] long, response_mask [N, T] bool)."""
    eos = policy.tokenizer.eos_token_id
    prompt_ids = models.encode_prompts(policy, [r["prompt"] for r in rows])
    gold = [policy.tokenizer(f"{tasks.ANSWER_PREFIX} {r['answer']}", add_special_tokens=False)["input_ids"] + [eos]
            for r in rows]
    return models.pack(prompt_ids, gold, policy.tokenizer.pad_token_id, policy.device)


@torch.no_grad()
def gold_probability(policy: models.Policy, rows: list[dict], *, temperature: float = 1.0,
                     batch: int = 256) -> dict:
    """Teacher-forced probability of the canonical gold response, one forward pass per batch.

    p(x) = π_T("Answer: <gold>" + EOS | x) is the chance that one sample at ``temperature`` is
    exactly that string, so the mean over prompts is a lower bound on the expected accuracy at T
    (other strings may also pass), with no sampling noise: the held-out metric that small RL
    effects show in. Returns {"n", "gold_prob": mean p (float), "per_prompt": [p of each row]}.
    """
    if not rows:
        raise ValueError("gold_probability: no prompts")
    policy.model.eval()
    probs: list[float] = []
    for s in range(0, len(rows), batch):
        ids, attn, rmask = gold_batch(policy, rows[s : s + batch])
        lp = models.token_logprobs(policy.model, ids, attn, temperature=temperature)
        probs += torch.exp((lp * rmask).sum(-1).double()).tolist()
    return {"n": len(rows), "gold_prob": float(np.mean(probs)), "per_prompt": probs}


def run_eval(
    model: str,
    sets: list,
    *,
    n_samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    seed: int = 0,
    device: str = "cpu",
    out=None,
    policy: models.Policy | None = None,
    verifier: str = "auto",
    partial: bool = False,
    columns: dict | None = None,
    split: str | None = None,
) -> dict:
    """`cropi eval`: evaluate `model` (or the given in-memory `policy`) on every file in `sets`.

    Returns (and writes atomically to `out` when given) {"model", "checkpoint", settings,
    "sets": {name: evaluate(...) + {"path"}}, "seconds"}; set names follow `cropi score`'s.
    """
    if not sets:
        raise schema.InputError("--target", None, None, "at least one set to evaluate is needed")
    t0 = time.time()
    loaded = [load_set(p, columns=columns, split=split) for p in sets]  # read every file before the model loads: fail fast
    policy = policy or models.load(model, device=device)
    results = {}
    bar = progress(total=sum(map(len, loaded)), desc="eval", unit="prompt")
    for name, path, rows in zip(set_names(sets), sets, loaded):
        res = evaluate(
            policy,
            rows,
            n_samples=n_samples,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=derive_seed(seed, name),
            verifier=verifier,
            partial=partial,
            bar=bar,
        )
        results[name] = {"path": str(path), **res}
    bar.close()
    report = {
        "model": model,
        "checkpoint": policy.path,
        "n_samples": n_samples,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "verifier": verifier,
        "partial_credit": partial,
        "sets": results,
        "seconds": round(time.time() - t0, 2),
    }
    if out is not None:
        schema.write_json_atomic(report, Path(out))
    return report
