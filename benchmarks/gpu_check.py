"""The steps of benchmarks/gpu_check.sh (docs/scale.md, "First run on a GPU"): each step appends
JSON lines to OUT/gpu_check.jsonl; `summary` turns them into OUT/summary.md.

    projection  gradient read throughput of the projectors at d = 1e8 and 1e9, k = 8192, B = 8 bf16
                gradients: GB/s read, against the measured copy bandwidth, the device's nominal HBM
                bandwidth (by GPU name, when known) and a dense torch matmul (x @ P with P stored).
    score       `cropi score` (sjlt, k = 8192, per-layer path, bf16) on a model of Qwen2.5-1.5B's
                published shape with random weights: prompts/s, tokens/s, peak memory; and the same
                tokens through one plain training forward+backward and through the one-prompt
                flattened way (backward per prompt, flatten the full gradient, project it).
    train       one trainer step of that model: sampling G = 8 responses of 512 tokens on the
                device, then the update with micro-batches and bf16 autocast (float32 master
                weights, AdamW): seconds, tokens/s, peak memory.
    summary     OUT/summary.md from OUT/gpu_check.jsonl (and OUT/gpu_tests.txt).

--dry-run: every step at tiny sizes on the CPU (what the test suite runs). No weights are read or
written: the model is built from its config with random weights; prompts and responses are random
characters of cropi's tiny tokenizer (the cost does not depend on which tokens they are).
"""

from __future__ import annotations

import argparse
import json
import string
import time
from pathlib import Path

import numpy as np
import torch
from _common import emit, machine, setup

# Qwen/Qwen2.5-1.5B, its published config.json (architecture fields): 1.54B parameters
QWEN25_1P5B = {
    "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 131072,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
    "use_sliding_window": False, "attention_dropout": 0.0, "initializer_range": 0.02,
}
TINY = {**QWEN25_1P5B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 2048}
# nominal HBM bandwidth, bytes/s, by a substring of torch.cuda.get_device_properties().name
HBM = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.039e12),
       ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12)]
SIZES = {  # real run / dry run
    "d": ([1e8, 1e9], [2e4, 5e4]), "k": (8192, 256), "batch": (8, 3), "matmul_block": (1 << 16, 4096),
    "prompts": (16, 3), "G": (8, 2), "resp_len": (512, 24), "train_prompts": (4, 2), "micro_batch": (8, 2),
}


def size(args, key):
    return SIZES[key][1 if args.dry_run else 0]


def device(args) -> torch.device:
    if args.dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --dry-run on a CPU)")
    return torch.device("cuda")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, reps: int = 1, warm_up: bool = True) -> float:
    """Median wall seconds of ``reps`` calls of fn() after one warm-up call (compiles kernels)."""
    if warm_up:
        fn()
    times = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev) -> float | None:
    """Peak memory allocated by torch on the GPU since the last reset_peak (None on the CPU)."""
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None


def record(out: Path, bench: str, **rec) -> dict:
    rec = emit(bench, **rec)
    with open(out / "gpu_check.jsonl", "a") as f:
        f.write(json.dumps(rec, default=float) + "\n")
    return rec


# ---------------------------------------------------------------------------- projection


def nominal_hbm(name: str) -> float | None:
    return next((bw for key, bw in HBM if key in name), None)


def projection(args, out: Path) -> None:
    from cropi import kernels
    from cropi.projection import make_projector

    dev = device(args)
    k, B = size(args, "k"), size(args, "batch")
    n = (1 << 30) if dev.type == "cuda" else (1 << 20)
    a = torch.empty(n, dtype=torch.float32, device=dev)
    b = torch.empty_like(a)
    copy_bw = 2 * a.numel() * 4 / timed(lambda a=a, b=b: b.copy_(a), dev, 3)  # read + write bytes per second
    del a, b
    name = torch.cuda.get_device_properties(dev).name if dev.type == "cuda" else "cpu (dry run)"
    hbm = nominal_hbm(name) if dev.type == "cuda" else None
    record(out, "gpu_check.machine", **machine(), device=name, copy_gbps=round(copy_bw / 1e9, 1),
           hbm_gbps=hbm and round(hbm / 1e9), kernels=kernels.available(),
           triton=kernels.triton.__version__ if kernels.triton else None,
           gpu_mem_gib=round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1) if dev.type == "cuda" else None)
    for d in map(int, size(args, "d")):
        x = torch.randn(B, d, device=dev, dtype=torch.bfloat16)
        read = x.numel() * x.element_size()
        for impl in ("sjlt", "mask-dense", "dense", "torch-matmul"):
            rec = {"impl": impl, "d": d, "k": k, "batch": B, "dtype": "bfloat16"}
            try:
                if impl == "torch-matmul":
                    t, nbytes = matmul_time(x, k, size(args, "matmul_block"), dev)
                    rec["kernels"] = False
                else:
                    proj = make_projector(impl, d, k, 0, density=0.1, device=dev)
                    rec["kernels"] = proj._gpu is not None
                    nbytes = read if impl != "mask-dense" else B * proj.m * x.element_size() + proj.m * 8
                    t = timed(lambda proj=proj, x=x: proj.project(x), dev, args.reps)
                    del proj
                rec.update(seconds=round(t, 5), read_gb=round(nbytes / 1e9, 3), gbps=round(nbytes / t / 1e9, 1),
                           of_copy_bw=round(nbytes / t / copy_bw, 3), of_hbm=hbm and round(nbytes / t / hbm, 3))
            except (RuntimeError, ValueError) as e:  # out of memory...
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            record(out, "gpu_check.projection", **rec)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        del x


def matmul_time(x: torch.Tensor, k: int, block: int, dev) -> tuple[float, int]:
    """A dense projection by torch matmuls with P stored: x[:, block] @ P_block for every block of
    coordinates (one random bf16 [block, k] P_block reused, as if P were in memory). Returns
    (seconds, bytes of x read)."""
    P = torch.randn(block, k, device=dev, dtype=torch.bfloat16)
    d = x.shape[1]

    def run():
        acc = torch.zeros(x.shape[0], k, device=dev, dtype=torch.float32)
        for s in range(0, d - block + 1, block):
            acc += x[:, s:s + block] @ P
        return acc

    return timed(run, dev, 1), x.shape[0] * (d // block) * block * x.element_size()


# ---------------------------------------------------------------------------- the 1.5B-shaped model


def build_policy(args, dtype=torch.bfloat16):
    """Qwen2.5-1.5B's shape (TINY for --dry-run), random weights (seeded), built on the device in
    ``dtype``; cropi's tiny character tokenizer."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from cropi import models

    dev = device(args)
    torch.manual_seed(0)
    conf = {k: v for k, v in (TINY if args.dry_run else QWEN25_1P5B).items() if k != "model_type"}
    with dev:
        model = AutoModelForCausalLM.from_config(Qwen2Config(**conf), dtype=dtype)
    model.eval()
    return models.Policy(model, models.build_tiny_tokenizer(), "qwen2.5-1.5b-shaped-random", "-")


def trajectories(n: int, G: int, resp_len: int, seed: int):
    """n prompts x G responses of resp_len - 1 random characters (+ EOS: resp_len tokens with the
    tiny tokenizer), rewards with variance in every group, on-policy (no behaviour log-probs)."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    chars = np.array(list(string.ascii_lowercase + string.digits + " +*="))
    rows = []
    for i in range(n):
        a, b = rng.integers(2, 999, 2)
        rewards = [float(v) for v in rng.integers(0, 2, G)]
        if len(set(rewards)) == 1:
            rewards[0] = 1.0 - rewards[0]
        rows.append({"id": f"g{seed}-{i}", "prompt": f"Compute {a} * {b}. Answer:", "answer": str(a * b), "task": "arith",
                     "difficulty": 0, "split": "train", "behavior": "random-chars", "rewards": rewards,
                     "responses": ["".join(rng.choice(chars, resp_len - 1)) for _ in range(G)]})
    return pa.Table.from_pylist(rows)


def score(args, out: Path) -> None:
    from real_model import cost_paths

    from cropi import schema
    from cropi import score as S
    from cropi.score import prepare

    dev = device(args)
    P, G, L, mb = size(args, "prompts"), size(args, "G"), size(args, "resp_len"), size(args, "micro_batch")
    k = size(args, "k")
    policy = build_policy(args)
    n_params = sum(p.numel() for p in policy.model.parameters())
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    pool, target = data / "pool.parquet", data / "target.parquet"
    schema.write_parquet_atomic(trajectories(P, G, L, 0), pool)
    schema.write_parquet_atomic(trajectories(2, G, L, 1), target)
    prep = prepare(policy, schema.read_table(pool), pool)
    tokens = sum(len(p) + len(r) for p, rs in zip(prep.prompt_ids, prep.responses) for r in rs)
    common = {"model": "qwen2.5-1.5b-shaped" if not args.dry_run else "tiny-qwen2", "params": n_params, "prompts": P,
              "G": G, "resp_tokens": L, "tokens": tokens, "k": k, "micro_batch": mb}

    reset_peak(dev)
    cfg = S.ScoreConfig(k=k, batch=P, micro_batch=mb, dtype="bf16", grad_path="per-layer")
    sync(dev)
    t0 = time.perf_counter()
    meta = S.score(pool, [target], out / "scores", cfg=cfg, policy=policy, device=str(dev), overwrite=True)
    sync(dev)
    wall = time.perf_counter() - t0
    record(out, "gpu_check.score", path="cropi score", **common, seconds=round(wall, 2),
           prompts_per_s=round(P / wall, 3), tokens_per_s=round(tokens / wall), peak_gib=peak_gib(dev),
           grad_path=meta["grad_path"]["ran"], note="pool and target set, store and scores written")

    paths, info = cost_paths(policy, prep, k, mb)
    times = {}
    for name in ("plain", "per-layer", "loop"):  # no warm-up call: `cropi score` above compiled and warmed
        reset_peak(dev)
        try:
            times[name] = timed(paths[name], dev, 1, warm_up=False)
            rec = {"seconds": round(times[name], 2), "prompts_per_s": round(P / times[name], 3),
                   "tokens_per_s": round(info["tokens"] / times[name]), "peak_gib": peak_gib(dev)}
        except RuntimeError as e:  # out of memory
            rec = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        if "plain" in times and name in times:  # seconds / seconds of the plain training backward
            rec["vs_plain"] = round(times[name] / times["plain"], 3)
        record(out, "gpu_check.score", path=name, **common, d=info["d"], **rec)


# ---------------------------------------------------------------------------- trainer step


def train(args, out: Path) -> None:
    from cropi import models
    from cropi.train import scale
    from cropi.train import step as tstep
    from cropi.train.config import TrainConfig

    dev = device(args)
    n, G, L, mb = size(args, "train_prompts"), size(args, "G"), size(args, "resp_len"), size(args, "micro_batch")
    reset_peak(dev)
    policy = build_policy(args, dtype=torch.float32)  # float32 master weights, as `cropi train`
    cfg = TrainConfig(bf16=True, micro_batch=mb, group_size=G, batch_prompts=n, max_new_tokens=L, grad_clip=1.0)
    opt = torch.optim.AdamW(scale.trainable(policy.model), lr=1e-6)
    prompts = models.encode_prompts(policy, [f"Compute {i} * {i + 3}. Answer:" for i in range(n)])
    ids = [p for p in prompts for _ in range(G)]
    common = {"model": "qwen2.5-1.5b-shaped" if not args.dry_run else "tiny-qwen2", "sequences": len(ids),
              "max_new_tokens": L, "micro_batch": mb, "bf16": True}
    sync(dev)
    t0 = time.perf_counter()
    with scale.autocast(True, dev):
        resp = models.sample(policy, ids, max_new_tokens=L, generator=models.generator(policy, 0))
    sync(dev)
    t_sample = time.perf_counter() - t0
    new = sum(len(r) for r in resp)
    record(out, "gpu_check.train", phase="sample", **common, seconds=round(t_sample, 2),
           tokens_per_s=round(new / t_sample), new_tokens=new, peak_gib=peak_gib(dev))
    p_ids, attn, rmask = models.pack(ids, resp, policy.tokenizer.pad_token_id, dev)
    adv = torch.tensor([1.0 if i % 2 else -1.0 for i in range(len(ids))], device=dev)
    batch = tstep.Batch(p_ids, attn, rmask, rmask, adv, None)
    reset_peak(dev)
    sync(dev)
    t0 = time.perf_counter()
    stats = tstep.update(policy, None, opt, batch, cfg)
    sync(dev)
    t_update = time.perf_counter() - t0
    record(out, "gpu_check.train", phase="update", **common, seconds=round(t_update, 2),
           tokens_per_s=round(int(attn.sum()) / t_update), tokens=int(attn.sum()), peak_gib=peak_gib(dev),
           loss=round(float(stats["loss"]), 6), grad_norm=round(float(stats["grad_norm"]), 4))


# ---------------------------------------------------------------------------- summary


def summary(args, out: Path) -> None:
    rows = [json.loads(x) for x in (out / "gpu_check.jsonl").read_text().splitlines()] if (
        out / "gpu_check.jsonl").exists() else []
    by = {}
    for r in rows:
        by.setdefault(r["bench"], []).append(r)
    m = (by.get("gpu_check.machine") or [{}])[-1]
    lines = [f"# GPU check{' (dry run: tiny sizes on the CPU)' if args.dry_run else ''}", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; device **{m.get('device', '?')}**, "
             f"torch {m.get('torch', '?')}, Triton {m.get('triton')}, kernels {'on' if m.get('kernels') else 'off'}; "
             f"copy bandwidth {m.get('copy_gbps')} GB/s (read + write), nominal HBM "
             f"{str(m['hbm_gbps']) + ' GB/s' if m.get('hbm_gbps') else 'unknown'}.", ""]
    for step in ("tests", "projection", "score", "train"):
        st = [r for r in by.get("gpu_check.step", []) if r["step"] == step]
        if st:
            lines.append(f"- step `{step}`: exit {st[-1]['rc']} in {st[-1]['seconds']} s"
                         + (f" (timed out at {st[-1]['timeout_s']} s)" if st[-1]["rc"] == 124 else ""))
    tests = out / "gpu_tests.txt"
    if tests.exists():
        tail = [x for x in tests.read_text().splitlines() if x.strip()][-1:]
        lines += ["", f"GPU tests (`pytest -m gpu`): {tail[0] if tail else 'no output'}"]
    table(lines, "Projection (bf16 gradients)", by.get("gpu_check.projection", []),
          ["d", "impl", "kernels", "batch", "k", "seconds", "read_gb", "gbps", "of_copy_bw", "of_hbm", "error"])
    table(lines, "Scoring (per-layer path, sjlt)", by.get("gpu_check.score", []),
          ["path", "params", "prompts", "G", "resp_tokens", "tokens", "seconds", "prompts_per_s", "tokens_per_s",
           "peak_gib", "vs_plain", "error"])
    table(lines, "Trainer step (bf16 autocast, micro-batches)", by.get("gpu_check.train", []),
          ["phase", "sequences", "max_new_tokens", "micro_batch", "seconds", "tokens_per_s", "peak_gib", "loss"])
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print((out / "summary.md").read_text())


def table(lines: list, title: str, rows: list[dict], cols: list[str]) -> None:
    if not rows:
        lines += ["", f"## {title}", "", "no results (see the step's exit above)"]
        return
    cols = [c for c in cols if any(c in r for r in rows)]
    lines += ["", f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.0e}" if c == "d" else str(r.get(c, "")) for c in cols) + " |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["projection", "score", "train", "summary"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    setup(threads=torch.get_num_threads() if not args.dry_run else 1)
    args.out.mkdir(parents=True, exist_ok=True)
    {"projection": projection, "score": score, "train": train, "summary": summary}[args.step](
        args, args.out)


if __name__ == "__main__":
    main()
