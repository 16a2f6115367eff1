"""Shared by the benchmark scripts: machine description, timing, one JSON line per measurement."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / ".data"  # generated pools, rollouts and scratch outputs (gitignored)


def setup(threads: int) -> None:
    """Offline, quiet, and a fixed number of torch threads (references run under the same setting)."""
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                 ("TOKENIZERS_PARALLELISM", "false"), ("CROPI_QUIET", "1")):
        os.environ.setdefault(k, v)
    torch.set_num_threads(threads)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def machine() -> dict:
    """CPU model, cores, memory, torch threads and library versions of this run."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    from importlib.metadata import version

    import trak  # noqa: F401

    return {"cpu": cpu, "logical_cores": os.cpu_count(), "mem_gib": mem, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "traker": version("traker"), "python": platform.python_version(),
            "cuda": torch.cuda.is_available(), "loadavg_1m": round(os.getloadavg()[0], 2)}


def emit(bench: str, **record) -> dict:
    """Print one measurement as a JSON line (flushed) and return it."""
    rec = {"bench": bench, **record}
    print(json.dumps(rec, default=float), flush=True)
    return rec


def timed(fn, reps: int = 1) -> tuple[float, float]:
    """Mean (wall seconds, process CPU seconds) of ``reps`` calls of fn(). With one torch thread the
    CPU time is the work done, whatever else the shared machine runs; the wall time is not."""
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - w0) / reps, (time.process_time() - c0) / reps


def bench_data(pool_per_spec: int = 40, target_per_spec: int = 16, G: int = 8, max_new_tokens: int = 32,
               seed: int = 0) -> dict:
    """The warmed tiny model (built on first use) and a rolled-out train pool and target set of the
    default task suite, cached under benchmarks/.data/<model fingerprint>-<settings>/.

    Returns {"model": path, "fingerprint", "pool": trajectories path, "target": trajectories path,
    "pool_prompts": n, "target_prompts": n, "seconds": time spent making what was missing}."""
    from cropi import models, schema, tasks
    from cropi.rollout import rollout

    t0 = time.perf_counter()
    policy = models.load(models.TINY)
    fp = models.fingerprint(policy.model)
    del policy
    out = DATA / f"{fp}-p{pool_per_spec}-t{target_per_spec}-g{G}-m{max_new_tokens}-s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, specs, n, split in (("pool", tasks.DEFAULT_TRAIN_SPECS, pool_per_spec, "train"),
                                  ("target", tasks.DEFAULT_TARGET_SPECS, target_per_spec, "val")):
        prompts, traj = out / f"{name}-prompts.parquet", out / f"{name}.parquet"
        if not prompts.exists():
            schema.write_parquet_atomic(tasks.make_pool(list(specs), n, seed, split), prompts)
        if not traj.exists():
            rollout(prompts, traj, model=models.TINY, n=G, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
        paths[name] = traj
    import pyarrow.parquet as pq

    return {"model": str(models.tiny_path()), "fingerprint": fp, "pool": paths["pool"], "target": paths["target"],
            "pool_prompts": pq.read_metadata(paths["pool"]).num_rows,
            "target_prompts": pq.read_metadata(paths["target"]).num_rows,
            "seconds": round(time.perf_counter() - t0, 1)}
