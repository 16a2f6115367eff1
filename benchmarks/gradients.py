"""Per-prompt gradient cost (G responses per prompt): cropi's batched gradient + projection, and
kron, against (a) one plain training forward+backward over the same tokens and (b) a one-prompt-
at-a-time backward loop that flattens each full gradient and then projects it (what the public
CROPI code does), all in this process on the same batches.

Model: the tiny default architecture (random weights: cost does not depend on them), optionally
widened (--scales). Data: synthetic prompts and responses with the tiny default's lengths (prompt
--prompt-len ± 20 % characters, responses 8..--resp-len tokens), rewards with variance, stored
behaviour log-probs. Every path computes the same objective J (cropi.policy_grad) over the same
padded [P·G, T] tokens; (b) and cropi project with the same sjlt projector (k = --k).
Times are process CPU seconds (one torch thread; wall recorded too), the median of --reps runs
after one warm-up run; per prompt = batch time / P.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from _common import emit, machine, setup, timed


def synthetic_batch(P: int, G: int, prompt_len: int, resp_len: int, vocab: int, seed: int):
    """P prompts of G responses: prompt ids, response ids, rewards, behaviour log-probs (lists)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(P):
        p = [1] + rng.integers(4, vocab, int(prompt_len * rng.uniform(0.8, 1.2))).tolist()
        resps = [rng.integers(4, vocab, rng.integers(8, resp_len + 1)).tolist() + [2] for _ in range(G)]
        rewards = rng.integers(0, 2, G).astype(float).tolist()
        rewards[0], rewards[1] = 0.0, 1.0
        blp = [(-rng.uniform(0.1, 4.0, len(r))).tolist() for r in resps]
        out.append((p, resps, rewards, blp))
    return out


def top_ops(fn, n: int = 8) -> list[dict]:
    """The n torch ops with the most self CPU time in one call of fn (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:n]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 4), "share": round(e.self_cpu_time_total / total, 3),
             "calls": e.count} for e in rows]


def median_seconds(fn, reps: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``reps`` calls after one warm-up call (sjlt buckets, kron maps)."""
    fn()
    ts = [timed(fn) for _ in range(reps)]
    return statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)


def bench_width(scale: int, args) -> None:
    """Time every path on one batch of the tiny architecture widened ``scale`` times; emit the results."""
    from cropi import models
    from cropi.kron import KronProjector, prompt_features
    from cropi.policy_grad import (
        GradConfig,
        _unit_objective,
        build_units,
        logits_window,
        param_dim,
        prompt_gradients,
        select_params,
        token_weights,
        unit_gradients,
    )
    from cropi.projection import make_projector

    tok = models.build_tiny_tokenizer()
    cfg = GradConfig()
    width = models.TINY_CONFIG["hidden_size"] * scale
    model = models.build_tiny_model(tok, seed=args.seed, hidden_size=width,
                                    intermediate_size=models.TINY_CONFIG["intermediate_size"] * scale)
    policy = models.Policy(model, tok, f"tiny-arch-x{scale}", "-")
    names = select_params(model)
    d = param_dim(model, names)
    batch = synthetic_batch(args.prompts, args.G, args.prompt_len, args.resp_len, len(tok), args.seed)
    pids, resps, blps = [b[0] for b in batch], [b[1] for b in batch], [b[3] for b in batch]
    weights = [token_weights(rw, [len(r) for r in rs], cfg) for _, rs, rw, _ in batch]
    units = build_units(pids, resps, weights, blps, tok.pad_token_id, 64)
    U, M, T = units.input_ids.shape
    sjlt = make_projector("sjlt", d, args.k, args.seed)
    kron = KronProjector(model, names, args.k, args.seed)
    params = dict(model.named_parameters())

    def objective(u):  # J summed over every response of the units u, one plain forward
        _, m, t = u.input_ids.shape
        flat = [x.reshape(-1, t) for x in (u.input_ids, u.attention_mask, u.response_mask, u.weight, u.behavior_logp)]
        return _unit_objective(model, params, dict(model.named_buffers()), *flat, cfg.temperature, cfg.ratio_clip,
                               logits_window(model, flat[2]))

    def plain():  # (a) one training forward+backward of J over the whole batch
        model.zero_grad(set_to_none=True)
        objective(units).backward()

    def loop():  # (b) one prompt at a time: backward, flatten the full gradient, project
        for j in range(len(batch)):
            model.zero_grad(set_to_none=True)
            objective(build_units(pids[j : j + 1], resps[j : j + 1], weights[j : j + 1], blps[j : j + 1],
                                  tok.pad_token_id, 64)).backward()
            sjlt.project(torch.cat([params[n].grad.flatten() for n in names])[None])

    paths = {
        "plain": plain,
        "loop": loop,
        "cropi-sjlt": lambda: prompt_gradients(policy, pids, resps, weights, blps, names, cfg, sjlt.project),
        "kron": lambda: prompt_features(policy, pids, resps, weights, blps, cfg, kron),
        "vmap-grad": lambda: unit_gradients(policy, units, names, cfg),
    }
    model.eval()
    t = {name: median_seconds(fn, args.reps) for name, fn in paths.items()}
    model.zero_grad(set_to_none=True)
    P = len(batch)
    common = dict(width=width, d=d, k=args.k, prompts=P, G=args.G, seq_len=T,
                  tokens=int(units.attention_mask.sum()))
    cpu = {name: v[1] for name, v in t.items()}
    for name in ("plain", "loop", "cropi-sjlt", "kron"):
        emit("gradients", kind="cost", path=name, **common, cpu_s_per_prompt=cpu[name] / P,
             wall_s_per_prompt=t[name][0] / P, vs_plain=cpu[name] / cpu["plain"],
             loop_speedup=cpu["loop"] / cpu[name], k_actual=kron.k if name == "kron" else args.k)
    # where cropi's time goes: the vmapped per-unit backward vs the rest (sum per prompt + sjlt)
    emit("gradients", kind="breakdown", path="cropi-sjlt", **common, vmap_grad_cpu_s=cpu["vmap-grad"],
         rest_cpu_s=cpu["cropi-sjlt"] - cpu["vmap-grad"], total_cpu_s=cpu["cropi-sjlt"], plain_cpu_s=cpu["plain"])
    for name in ("plain", "cropi-sjlt", "kron"):
        emit("gradients", kind="profile", path=name, width=width, top_self_cpu=top_ops(paths[name]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16, help="prompts per batch (cropi score --batch)")
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=110)
    ap.add_argument("--resp-len", type=int, default=24)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--scales", default="1", help="width multipliers of the tiny default architecture")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    setup(args.threads)
    emit("gradients", kind="machine", **machine())
    for scale in [int(v) for v in args.scales.split(",")]:
        bench_width(scale, args)

if __name__ == "__main__":
    main()
