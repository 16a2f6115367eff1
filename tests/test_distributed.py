"""torchrun with 2 gloo ranks: `cropi score` and `cropi rollout` give the single-process result, and
a run whose rank died completes with --resume, recomputing only the missing shards."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cropi import features, models, schema, tasks
from cropi.cli import main

SCORE_ARGS = ["--k", "256", "--shard-size", "4", "--batch", "4", "--device", "cpu"]


def trajectories(tok, n, G, seed):
    """n prompts x G responses: mixed 0/1 rewards (every 6th prompt all-equal: zero_signal), stored
    tokens and behaviour log-probs (so the off-policy ratios are not 1)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        texts = [f"Answer: {rng.integers(0, 100)}" + "".join(rng.choice(list("abc xyz"), rng.integers(0, 6))) for _ in range(G)]
        ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
        rewards = [0.0] * G if i % 6 == 5 else rng.integers(0, 2, G).astype(float).tolist()
        if i % 6 != 5 and len(set(rewards)) == 1:
            rewards[0] = 1.0 - rewards[0]
        rows.append({
            "id": f"s{seed}-{i}", "prompt": f"What is {i} + {seed}?\n", "answer": str(i + seed), "task": "basic_arithmetic",
            "difficulty": i % 3, "split": "train", "responses": texts, "rewards": rewards, "behavior": "test",
            "response_token_ids": ids,
            "behavior_logprobs": [(-rng.uniform(0.5, 4.0, len(x))).tolist() for x in ids],
        })
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tok = models.build_tiny_tokenizer()
    model = models.build_tiny_model(tok, seed=3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2)
    models.save(model, tok, root / "model", {"kind": "tiny"})
    pq.write_table(trajectories(tok, 22, 4, 0), root / "pool.parquet")  # 6 shards of 4 (the last one 2)
    pq.write_table(trajectories(tok, 9, 4, 1), root / "val.parquet")  # 3 target shards
    return root


def torchrun(*args, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CROPI_QUIET": "1", "TOKENIZERS_PARALLELISM": "false"}
    # "--": torchrun's argparse would take cropi options such as --n or --s for abbreviations of its own
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cropi", "--", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def score_args(files, out):
    return ["score", "--trajectories", str(files / "pool.parquet"), "--target", str(files / "val.parquet"),
            "--model", str(files / "model"), "--out", str(out), *SCORE_ARGS]


def assert_same_scores(a, b):
    sa, sb = pq.read_table(a / "scores.parquet"), pq.read_table(b / "scores.parquet")
    assert sa.column("id").to_pylist() == sb.column("id").to_pylist()
    assert sa.column("status").to_pylist() == sb.column("status").to_pylist()
    assert sa.column("rank").to_pylist() == sb.column("rank").to_pylist()
    for col in ("score", "score__val", "pass_rate"):
        np.testing.assert_allclose(sa.column(col).to_numpy(zero_copy_only=False), sb.column(col).to_numpy(zero_copy_only=False),
                                   rtol=1e-6, atol=1e-9, equal_nan=True)
    for store in ("features", "targets/val"):
        fa, ia = features.load(a / store)
        fb, ib = features.load(b / store)
        assert ia.column("id").to_pylist() == ib.column("id").to_pylist()
        assert ia.column("status").to_pylist() == ib.column("status").to_pylist()
        np.testing.assert_allclose(fa, fb, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def one_and_two(files):
    """The pool scored in this process (world 1) and by torchrun with 2 ranks."""
    one, two = files / "one", files / "two"
    r = CliRunner().invoke(main, score_args(files, one))
    assert r.exit_code == 0, r.output
    torchrun(*score_args(files, two))
    return one, two


def test_two_ranks_score_like_one_process(one_and_two):
    one, two = one_and_two
    assert_same_scores(one, two)
    status = pq.read_table(one / "scores.parquet").column("status").to_pylist()
    assert status.count("zero_signal") == 3 and status.count("ok") == 19  # the fixture's mix
    meta_two = features.read_meta(two / "features")
    assert meta_two["shards"] == 6 and meta_two["count"] == 22
    assert json.loads((two / "meta.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_dead_rank_resumes_only_its_missing_shards(files, one_and_two, ranks):
    one, two = one_and_two
    out = files / f"died{ranks}"
    shutil.copytree(two, out)
    # rank 1 of 2 died before writing anything: its shards (odd c) and everything rank 0 writes last are gone
    for store in (out / "features", out / "targets" / "val"):
        for c in range(1, 6, 2):
            for p in features.shard_paths(store, c):
                p.unlink(missing_ok=True)
        (store / "index.parquet").unlink()
    (out / "scores.parquet").unlink()
    (out / "meta.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in (out / "features").glob("shard-*")}
    assert len(kept) == 6  # shards 0, 2, 4: .npy + .parquet
    r = CliRunner().invoke(main, score_args(files, out))  # without --resume: refuses to touch the store
    assert r.exit_code == 2 and "--resume" in r.output
    if ranks == 1:
        r = CliRunner().invoke(main, [*score_args(files, out), "--resume"])
        assert r.exit_code == 0, r.output
    else:
        torchrun(*score_args(files, out), "--resume")
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished shards were not recomputed
    assert all(features.shard_done(out / "features", c) for c in range(6))
    assert_same_scores(one, out)


@pytest.mark.slow  # a second torchrun launch: ~20 s of process start-up on a 2-core machine
def test_two_ranks_roll_out_like_one_process(files):
    prompts = files / "prompts.parquet"
    schema.write_parquet_atomic(tasks.make_pool(["basic_arithmetic:difficulty=0"], 8, 0, "train"), prompts)
    args = ["rollout", "--prompts", str(prompts), "--model", str(files / "model"), "--n", "3", "--max-new-tokens", "6",
            "--seed", "4", "--chunk", "2", "--device", "cpu"]
    r = CliRunner().invoke(main, [*args, "--out", str(files / "r1.parquet")])
    assert r.exit_code == 0, r.output
    torchrun(*args, "--out", str(files / "r2.parquet"))
    one, two = pq.read_table(files / "r1.parquet"), pq.read_table(files / "r2.parquet")
    assert one.num_rows == 8 and one.equals(two)
    assert schema.read_cropi_meta(files / "r1.parquet") == schema.read_cropi_meta(files / "r2.parquet")
    assert not (files / "r2.parquet.parts").exists()
