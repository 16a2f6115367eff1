"""Peak memory of `cropi score` for pools of 1x, 4x and 16x a base size: flat when features stream
to disk shard by shard.

Each size runs `python -m cropi.cli score` (default settings: sjlt, k = 8192, shard 64, batch 16)
in a fresh child process against the same target set; its peak resident set size is the child's
ru_maxrss (os.wait4). The base pool is a seeded sample of the rolled-out default pool
(benchmarks/_common.bench_data); the m x pool is the base repeated m times with new ids, so every
run computes batches of the same shapes and any growth comes from the pool's size alone (the
activation peak of one batch grows with its longest sequence, T² with eager attention, whatever
the pool size). The reference is the 1x run; `dense_gib` is what the pool's ok gradients would take
held in memory as float32.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
from _common import DATA, ROOT, bench_data, emit, machine, setup


def make_pool(src, base: int, mult: int, seed: int, out) -> int:
    """Write a seeded sample of ``base`` rows of src, repeated ``mult`` times (ids suffixed ~c from
    the second copy on), to out; return the number of ok rows."""
    from cropi import schema
    from cropi.policy_grad import is_zero_signal

    table = schema.read_table(src, "trajectories")
    pick = np.sort(np.random.default_rng(seed).choice(table.num_rows, min(base, table.num_rows), replace=False))
    idx = np.tile(pick, mult)
    sub = table.take(pa.array(idx))
    cycle = np.arange(len(idx)) // len(pick)
    ids = [i if c == 0 else f"{i}~{c}" for i, c in zip(sub.column("id").to_pylist(), cycle)]
    sub = sub.set_column(sub.schema.get_field_index("id"), "id", pa.array(ids, pa.string()))
    schema.write_parquet_atomic(sub, out, metadata=schema.read_cropi_meta(src))
    return sum(not is_zero_signal(r) for r in sub.column("rewards").to_pylist())


def peak_rss(cmd: list[str], env: dict) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS in MiB) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(err.decode(errors="replace")[-2000:])
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss // 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=int, default=32, help="base pool size (prompts; about half have reward variance: at least one full batch of 16)")
    ap.add_argument("--mults", default="1,4,16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool-per-spec", type=int, default=40)
    ap.add_argument("--target-per-spec", type=int, default=16)
    args = ap.parse_args(argv)
    setup(args.threads)
    from cropi import models
    from cropi.policy_grad import param_dim, select_params

    emit("memory", kind="machine", **machine())
    data = bench_data(args.pool_per_spec, args.target_per_spec)
    model = models.load(data["model"]).model
    d = param_dim(model, select_params(model))
    del model
    work = DATA / "memory"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "CROPI_QUIET": "1", "PYTHONPATH": str(ROOT)}
    ref = None
    for m in [int(v) for v in args.mults.split(",")]:
        n = args.base * m
        pool = work / f"pool-{n}.parquet"
        ok = make_pool(data["pool"], args.base, m, args.seed, pool)
        out = work / f"scores-{n}"
        cmd = [sys.executable, "-m", "cropi.cli", "score", "--trajectories", str(pool), "--target", str(data["target"]),
               "--model", data["model"], "--out", str(out), "--overwrite", "--device", "cpu"]
        rc, wall, rss = peak_rss(cmd, env)
        if rc:
            raise SystemExit(f"cropi score failed with exit code {rc} on the {m}x pool")
        ref = ref or rss
        emit("memory", kind="peak_rss", mult=m, pool_prompts=n, ok_prompts=ok, d=d, k=8192, peak_rss_mib=rss,
             vs_1x=rss / ref, wall_s=wall, dense_gib=round(ok * d * 4 / 2**30, 2), ref="1x pool")


if __name__ == "__main__":
    main()
