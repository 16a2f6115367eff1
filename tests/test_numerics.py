"""Numbers that must not be quietly wrong (issue 23): behaviour log-probs at the rollout's own
temperature and top-p, every selected parameter delivered on the per-layer path, fp16 backward
without underflow, resume byte-identity with float16 features, EOS only on responses that ended."""

import numpy as np
import pyarrow as pa
import pytest

from cropi import features, models, schema
from cropi import score as S


def traj(n, seed):
    """n prompts x 4 responses, every group with a learning signal."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rewards = [0.0, 1.0] + rng.integers(0, 2, 2).astype(float).tolist()
        rows.append({"id": f"s{seed}-{i}", "prompt": f"{i} + {seed} =\n", "answer": str(i + seed), "task": "t",
                     "difficulty": 0, "split": "train", "behavior": "x", "rewards": rewards,
                     "responses": [f"Answer: {int(v)}" for v in rng.integers(0, 99, 4)]})
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="module")
def small(tmp_path_factory, small_policy):
    d = tmp_path_factory.mktemp("numerics")
    models.save(small_policy.model, small_policy.tokenizer, d / "model", {"kind": "tiny"})
    schema.write_parquet_atomic(traj(8, 0), d / "pool.parquet")
    schema.write_parquet_atomic(traj(5, 1), d / "t.parquet")
    return d


# ---------------------------------------------------------------------------- item 5: resume, float16 features


def test_resume_with_float16_features_is_byte_identical(small, tmp_path, monkeypatch):
    """Target means come from the stored (float16-rounded) features, fresh or resumed."""
    def run(out, **kw):
        cfg = S.ScoreConfig(k=64, shard_size=3, batch=2, feature_dtype="float16")
        return S.score(small / "pool.parquet", [small / "t.parquet"], out, model=str(small / "model"), cfg=cfg, **kw)

    run(tmp_path / "full")
    real, calls = S._shard_features, {"n": 0}

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the 2 target shards are done, the first pool shard dies
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(S, "_shard_features", dies)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "r")
    monkeypatch.setattr(S, "_shard_features", real)
    run(tmp_path / "r", resume=True)
    a, b = tmp_path / "full", tmp_path / "r"
    assert (a / "scores.parquet").read_bytes() == (b / "scores.parquet").read_bytes()
    assert np.asarray(features.read_shard(a / "features", 0)[0]).dtype == np.float16
