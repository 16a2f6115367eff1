"""Scoring a real model: SmolLM2-135M-Instruct (134.5M parameters, `--model smollm2`) on CPU.

Three measurements, JSON lines:
- kind=cost: per-prompt gradients + sjlt (k = 8192) by the per-layer path against (a) one plain
  training forward+backward over the same tokens in the same micro-batches (parameter gradients
  summed, no per-prompt anything) and (b) one prompt at a time: backward, flatten the full
  gradient, project it (what the public CROPI code does). Process CPU seconds, the fastest of
  --reps interleaved runs of each path, after the sjlt index of every parameter is hashed and
  cached (the one-off hashing is reported as hash_cpu_s).
- kind=peak_rss: `cropi score` (sjlt, k = 8192, per-layer) on pools of --pools prompts, each in a
  fresh child process; ru_maxrss of the child.
- kind=check_rank: `cropi score --check-rank N`: precision@10 % and Spearman of the sjlt scores
  against exact scores (exact target mean gradients, exact inner products).

Data: chat-templated arithmetic prompts and G fixed responses per prompt of random token ids
(lengths uniform in [--resp-min, --resp-len]); cost does not depend on which tokens they are.
Rewards have variance in every group; behaviour log-probs are stored (ratios ≠ 1).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from _common import DATA, emit, machine, setup


def make_trajectories(policy, n: int, G: int, resp_min: int, resp_len: int, seed: int):
    """A trajectories table of n prompts x G responses (token ids stored, text = their decoding)."""
    import pyarrow as pa

    from cropi import models

    rng = np.random.default_rng(seed)
    tok = policy.tokenizer
    rows = []
    for i in range(n):
        a, b, c = rng.integers(2, 999, 3)
        prompt = f"Compute {a} * {b} + {c}. Think step by step and put the final answer in \\boxed{{}}."
        resps = [rng.integers(100, 40000, rng.integers(resp_min, resp_len)).tolist() + [tok.eos_token_id]
                 for _ in range(G)]
        rewards = [float(x) for x in rng.integers(0, 2, G)]
        if len(set(rewards)) == 1:
            rewards[0] = 1.0 - rewards[0]
        rows.append({"id": f"p{seed}-{i}", "prompt": prompt, "answer": str(a * b + c), "task": "arith",
                     "difficulty": 0, "split": "train", "behavior": "fixed-tokens", "rewards": rewards,
                     "responses": models.decode_responses(policy, resps), "response_token_ids": resps,
                     "behavior_logprobs": [(-rng.uniform(0.05, 3.0, len(r))).tolist() for r in resps]})
    return pa.Table.from_pylist(rows)


def write_data(policy, name: str, n: int, args, seed: int):
    from cropi import schema

    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / f"smollm2-{name}-n{n}-g{args.G}-r{args.resp_min}-{args.resp_len}-s{seed}.parquet"
    if not path.exists():
        schema.write_parquet_atomic(make_trajectories(policy, n, args.G, args.resp_min, args.resp_len, seed), path)
    return path


def cost_paths(policy, prep, k: int, micro_batch: int) -> tuple[dict, dict]:
    """The three ways to the per-prompt information of ``prep`` (a score.Prepared) on the policy's
    device: {"per-layer": cropi's per-layer path + sjlt, "plain": one training forward+backward over
    the same tokens in the same micro-batches, "loop": one prompt at a time, flat full gradient,
    then sjlt} -> fn(), and {"d", "prompts", "tokens", "sjlt", "names"}."""
    from cropi import layer_grads
    from cropi.policy_grad import (
        GradConfig,
        _unit_objective,
        build_units,
        logits_window,
        param_dim,
        select_params,
        token_weights,
    )
    from cropi.projection import make_projector

    model, dev = policy.model, policy.device
    names = select_params(model)
    d = param_dim(model, names)
    cfg = GradConfig()
    weights = [token_weights(rw, [len(r) for r in rs], cfg) for rw, rs in zip(prep.rewards, prep.responses)]
    batch = (prep.prompt_ids, prep.responses, weights, prep.behavior_logp)
    units = build_units(*batch, policy.tokenizer.pad_token_id, 1)  # one response a unit: [N, 1, T]
    owner = units.owner.tolist()
    sjlt = make_projector("sjlt", d, k, 0, device=dev)
    params = dict(model.named_parameters())

    def objective(rows):
        flat = [x[rows, 0].to(dev) for x in (units.input_ids, units.attention_mask, units.response_mask, units.weight,
                                              units.behavior_logp)]
        return _unit_objective(model, params, dict(model.named_buffers()), *flat, cfg.temperature, cfg.ratio_clip,
                               logits_window(model, flat[2]))

    groups = layer_grads.LayerGrads(policy, names, cfg, sjlt, micro_batch)._groups([len(r) for r in prep.responses])

    def plain():  # the training backward over the same micro-batches
        model.zero_grad(set_to_none=True)
        for g in groups:
            objective([n for n, p in enumerate(owner) if p in g]).backward()
        model.zero_grad(set_to_none=True)

    def loop():  # one prompt at a time, flat full gradient, then sjlt
        for p in range(len(prep.ids)):
            model.zero_grad(set_to_none=True)
            objective([n for n, q in enumerate(owner) if q == p]).backward()
            sjlt.project(torch.cat([params[n].grad.flatten() for n in names])[None], 0)
        model.zero_grad(set_to_none=True)

    def per_layer():
        layer_grads.prompt_gradients(policy, *batch, names, cfg, sjlt, micro_batch)

    info = {"d": d, "prompts": len(prep.ids), "tokens": int(units.attention_mask.sum()), "sjlt": sjlt, "names": names}
    return {"per-layer": per_layer, "plain": plain, "loop": loop}, info


def bench_cost(policy, args) -> None:
    from cropi.score import prepare

    model = policy.model
    prep = prepare(policy, make_trajectories(policy, args.prompts, args.G, args.resp_min, args.resp_len, 1), "-")
    paths, info = cost_paths(policy, prep, args.k, args.micro_batch)
    d, sjlt, names = info["d"], info["sjlt"], info["names"]

    def cpu(fn):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - w0, time.process_time() - c0

    hash_t = cpu(lambda: (sjlt._sjlt_index(0, d), [sjlt._sjlt_index(o, n) for o, n in _blocks(model, names)]))
    runs = {name: [] for name in paths}
    for _ in range(args.reps):  # interleaved; the fastest run of each (the first pays page faults)
        for name, fn in paths.items():
            runs[name].append(cpu(fn))
    t = {name: min(r, key=lambda x: x[1]) for name, r in runs.items()}
    P, tokens = info["prompts"], info["tokens"]
    for name, (wall, c) in t.items():
        emit("real_model", kind="cost", path=name, model="smollm2", d=d, k=args.k, prompts=P, G=args.G,
             micro_batch=args.micro_batch, reps=args.reps, tokens=tokens, cpu_s_per_prompt=round(c / P, 2),
             wall_s_per_prompt=round(wall / P, 2), prompts_per_cpu_s=round(P / c, 4),
             vs_plain=round(c / t["plain"][1], 3), loop_speedup=round(t["loop"][1] / c, 3),
             hash_cpu_s=round(hash_t[1], 1))


def _blocks(model, names):
    params = dict(model.named_parameters())
    out, o = [], 0
    for n in names:
        out.append((o, params[n].numel()))
        o += params[n].numel()
    return out


def child_rss(n: int, args) -> None:
    """In this (fresh) process: `cropi score` on a pool of n prompts; print peak RSS."""
    from cropi import models
    from cropi import score as S

    policy = models.load(models.SMOLLM2)
    pool = write_data(policy, "pool", n, args, 2)
    target = write_data(policy, "target", 4, args, 3)
    out = DATA / f"smollm2-rss-{n}-{time.time_ns()}"
    t0 = time.perf_counter()
    meta = S.score(pool, [target], out, model=models.SMOLLM2, policy=policy,
                   cfg=S.ScoreConfig(k=args.k, batch=args.batch, micro_batch=args.micro_batch))
    print(json.dumps({"pool": n, "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time(), 1),
                      "grad_path": meta["grad_path"]["ran"]}), flush=True)


def bench_rss(args) -> None:
    for n in [int(v) for v in args.pools.split(",")]:
        cmd = [sys.executable, __file__, "--child-rss", str(n), *_passthrough(args)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rec = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
        emit("real_model", kind="peak_rss", model="smollm2", G=args.G, k=args.k, batch=args.batch,
             micro_batch=args.micro_batch, **rec)


def _passthrough(args) -> list[str]:
    return ["--G", str(args.G), "--resp-min", str(args.resp_min), "--resp-len", str(args.resp_len), "--k", str(args.k),
            "--batch", str(args.batch), "--micro-batch", str(args.micro_batch), "--threads", str(args.threads)]


def bench_rank(policy, args) -> None:
    from cropi import score as S

    short = argparse.Namespace(**{**vars(args), "resp_min": args.rank_resp_min, "resp_len": args.rank_resp_len})
    pool = write_data(policy, "rank-pool", args.check_rank, short, 4)
    target = write_data(policy, "rank-target", 4, short, 5)
    out = DATA / f"smollm2-rank-{time.time_ns()}"
    t0 = time.perf_counter()
    meta = S.score(pool, [target], out, model="smollm2", policy=policy,
                   cfg=S.ScoreConfig(k=args.k, batch=args.batch, micro_batch=args.micro_batch, check_rank=args.check_rank))
    cr = meta["check_rank"]
    emit("real_model", kind="check_rank", model="smollm2", projector="sjlt", k=args.k, n=cr["n"],
         precision_at_10pct=cr["precision"], spearman=cr["spearman"], resp_tokens=[args.rank_resp_min, args.rank_resp_len],
         wall_s=round(time.perf_counter() - t0, 1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4, help="prompts in the timed batch")
    ap.add_argument("--reps", type=int, default=2, help="cost: timed runs of each path (the fastest is kept)")
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--resp-min", type=int, default=32)
    ap.add_argument("--resp-len", type=int, default=128, help="responses have at most this many tokens")
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4, help="cropi score --batch")
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per backward")
    ap.add_argument("--pools", default="16,64")
    ap.add_argument("--check-rank", type=int, default=32)
    ap.add_argument("--rank-resp-min", type=int, default=8)
    ap.add_argument("--rank-resp-len", type=int, default=32)
    ap.add_argument("--only", default="cost,rss,rank")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child-rss", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    setup(args.threads)
    if args.child_rss is not None:
        child_rss(args.child_rss, args)
        return
    from cropi import models

    emit("real_model", kind="machine", **machine())
    only = set(args.only.split(","))
    policy = models.load(models.SMOLLM2) if only & {"cost", "rank"} else None
    if "cost" in only:
        bench_cost(policy, args)
    if "rss" in only:
        bench_rss(args)
    if "rank" in only:
        bench_rank(policy, args)


if __name__ == "__main__":
    main()
