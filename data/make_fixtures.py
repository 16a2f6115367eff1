"""Rebuild the committed fixtures of data/ (same seeds => the same files):

    python data/make_fixtures.py          (from the repository root; ~1 minute on 2 CPU cores)

- pool.parquet          30 prompts (cropi prompts format): chain_sum, count_bits, spell_backward
- target.traj.parquet   16 target prompts (val split of chain_sum and count_bits) with 8 responses
                        each by the warmed tiny model (cropi trajectories format, behaviour log-probs)
- cropi_rollouts.jsonl  the 30 pool prompts with 8 responses each by the tiny model, in the
                        public CROPI rollout format: {prompt, answer, responses, rewards} per line
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from cropi import schema, tasks
from cropi.rollout import rollout

HERE = Path(__file__).resolve().parent
POOL_SPECS = ["chain_sum:difficulty=0", "count_bits:difficulty=0", "spell_backward:difficulty=1"]
TARGET_SPECS = ["chain_sum:difficulty=0", "count_bits:difficulty=1"]


def main() -> None:
    pool = tasks.make_pool(POOL_SPECS, 10, seed=7, split="train")
    schema.write_parquet_atomic(pool, HERE / "pool.parquet", metadata={"kind": "prompts", "specs": POOL_SPECS, "n": 10, "seed": 7, "split": "train"})
    target = tasks.make_pool(TARGET_SPECS, 8, seed=7, split="val")
    with tempfile.TemporaryDirectory() as tmp:
        tpath = Path(tmp) / "target.parquet"
        schema.write_parquet_atomic(target, tpath)
        rollout(tpath, HERE / "target.traj.parquet", n=8, max_new_tokens=16, seed=7)
        rollout(HERE / "pool.parquet", Path(tmp) / "pool.traj.parquet", n=8, max_new_tokens=16, seed=7)
        rows = pq.read_table(Path(tmp) / "pool.traj.parquet").select(["prompt", "answer", "responses", "rewards"]).to_pylist()
    with schema.atomic_file(HERE / "cropi_rollouts.jsonl") as f:
        f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
