"""`cropi score` end to end: store + scores contract, zero-signal handling, resume, refusals."""

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from cropi import features, models, schema
from cropi import score as S
from cropi.cli import main


def traj(n, seed, zero_every=5):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rewards = rng.integers(0, 2, 4).astype(float).tolist()
        if i % zero_every == 0:
            rewards = [1.0] * 4  # all equal: zero signal
        elif len(set(rewards)) == 1:
            rewards[0] = 1 - rewards[0]
        rows.append({"id": f"s{seed}-{i}", "prompt": f"{i} + {seed} =\n", "answer": str(i + seed), "task": "t",
                     "difficulty": 0, "split": "train", "behavior": "x", "rewards": rewards,
                     "responses": [f"Answer: {int(v)}" for v in rng.integers(0, 99, 4)]})
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_policy):
    d = tmp_path_factory.mktemp("score")
    models.save(small_policy.model, small_policy.tokenizer, d / "model", {"kind": "tiny"})
    schema.write_parquet_atomic(traj(14, 0), d / "pool.parquet")
    schema.write_parquet_atomic(traj(6, 1), d / "t1.parquet")
    schema.write_parquet_atomic(traj(6, 2), d / "t2.parquet")
    return d


def run(setup, out, **kw):
    cfg = S.ScoreConfig(k=64, shard_size=4, batch=3, **kw)
    return S.score(setup / "pool.parquet", [setup / "t1.parquet", setup / "t2.parquet"], out, model=str(setup / "model"), cfg=cfg)


def test_scores_contract_and_zero_signal_last(setup, tmp_path):
    meta = run(setup, tmp_path / "s")
    scores = schema.read_table(tmp_path / "s" / "scores.parquet", "scores")
    assert scores.column_names == ["id", "score", "score__t1", "score__t2", "rank", "pass_rate", "status"]
    status = np.array(scores.column("status").to_pylist())
    zero = status == "zero_signal"
    assert zero.sum() == 3 and np.isnan(scores.column("score").to_numpy()[zero]).all()
    ranks = scores.column("rank").to_numpy()
    assert sorted(ranks) == list(range(1, 15)) and ranks[zero].min() > ranks[~zero].max()
    # combined score = mean of the per-target cosines; rank follows it
    ok = ~zero
    s, t1, t2 = (scores.column(c).to_numpy() for c in ("score", "score__t1", "score__t2"))
    assert np.allclose(s[ok], (t1[ok] + t2[ok]) / 2)
    assert (np.argsort(-s[ok], kind="stable") == np.argsort(ranks[ok], kind="stable")).all()
    feats, index = features.load(tmp_path / "s" / "features")
    assert feats.shape == (14, 64) and not feats[zero].any()
    assert (index.column("grad_norm").to_numpy()[zero] == 0).all()
    assert "check_rank" not in meta and meta["seed"] == 0 and meta["projector"]["kind"] == "sjlt"


def test_check_rank_with_exact_features_agrees_perfectly(setup, tmp_path):
    """--projector identity scores with the exact gradients, so --check-rank, which compares the
    scores with exact ones computed another way (per-layer inner products with each target's mean
    gradient from plain backward), must find precision 1 and Spearman 1, overall and per target."""
    meta = run(setup, tmp_path / "s", projector="identity", check_rank=11)
    cr = meta["check_rank"]
    assert meta["projector"]["kind"] == "identity" and cr["n"] == 11  # every ok prompt
    assert cr["precision"] == 1.0 and cr["spearman"] == pytest.approx(1.0, abs=1e-12)
    for t in ("score__t1", "score__t2"):
        assert cr["per_target"][t]["precision"] == 1.0 and cr["per_target"][t]["spearman"] == pytest.approx(1.0, abs=1e-12)


def test_target_names_live_with_the_scores_schema(tmp_path):
    """One naming rule for score columns and eval sets (schema.target_names); `cropi eval`'s module
    does not import the scorer for it."""
    import subprocess
    import sys

    assert schema.target_names(["a/val.traj.parquet", "b/val.parquet", "c/.x", "test.parquet"]) == [
        "val", "val2", "target", "test"]
    code = "import sys, cropi.evaluate as e; assert e.set_names is __import__('cropi.schema').schema.target_names; " \
           "assert 'cropi.score' not in sys.modules, 'cropi.evaluate imports cropi.score'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_killed_score_resumes_byte_identical(setup, tmp_path, monkeypatch):
    run(setup, tmp_path / "full")
    real, calls = S._shard_features, {"n": 0}

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # after the 2 + 2 target shards, the first pool shard dies
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(S, "_shard_features", dies)
    with pytest.raises(KeyboardInterrupt):
        run(setup, tmp_path / "r")
    assert not (tmp_path / "r" / "scores.parquet").exists()
    monkeypatch.setattr(S, "_shard_features", real)
    with pytest.raises(schema.InputError, match="--resume"):
        run(setup, tmp_path / "r")  # a partial store is never silently mixed or overwritten
    S.score(setup / "pool.parquet", [setup / "t1.parquet", setup / "t2.parquet"], tmp_path / "r", model=str(setup / "model"),
            cfg=S.ScoreConfig(k=64, shard_size=4, batch=3), resume=True)
    a, b = tmp_path / "full", tmp_path / "r"
    assert (a / "scores.parquet").read_bytes() == (b / "scores.parquet").read_bytes()
    for c in range(4):
        assert features.shard_paths(a / "features", c)[0].read_bytes() == features.shard_paths(b / "features", c)[0].read_bytes()


def test_mixed_projector_metadata_is_refused(setup, tmp_path):
    run(setup, tmp_path / "a")
    with pytest.raises(schema.InputError, match="projector k differs"):
        S.score(setup / "pool.parquet", [setup / "t1.parquet"], tmp_path / "a", model=str(setup / "model"),
                cfg=S.ScoreConfig(k=32, shard_size=4), resume=True)
    run(setup, tmp_path / "b", seed=1)
    with pytest.raises(schema.InputError, match="projector seed differs"):
        features.check_compatible(tmp_path / "a" / "features", tmp_path / "b" / "features")


def test_cli_refuses_a_prompts_file_as_target(setup, tmp_path):
    p = tmp_path / "prompts.parquet"
    schema.write_parquet_atomic(schema.prompt_columns(traj(3, 3)), p)
    r = CliRunner().invoke(main, ["score", "--trajectories", str(setup / "pool.parquet"), "--target", str(p),
                                  "--model", str(setup / "model"), "--k", "16", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "roll it out first" in r.output and "\n" not in r.output.strip()
    assert not (tmp_path / "o").exists()


def test_pool_grad_sign_scores_the_first_adam_step(setup, tmp_path):
    """--pool-grad sign: each pool feature is sign(g_x) (exact with the identity projector, whose
    plain features are the exact gradients), the target sets keep their plain gradients, and each
    score is the cosine of sign(g_x) with the target set's mean gradient, computed here by hand."""
    run(setup, tmp_path / "plain", projector="identity")
    run(setup, tmp_path / "sign", projector="identity", pool_grad="sign")
    plain, _ = features.load(tmp_path / "plain" / "features")
    signed, _ = features.load(tmp_path / "sign" / "features")
    assert np.abs(plain).max() > 0 and set(np.unique(signed)) <= {-1.0, 0.0, 1.0}
    np.testing.assert_array_equal(signed, np.sign(plain))
    scores = schema.read_table(tmp_path / "sign" / "scores.parquet", "scores")
    ok = np.array(scores.column("status").to_pylist()) == "ok"
    for t in ("t1", "t2"):
        t_plain, _ = features.load(tmp_path / "plain" / "targets" / t)
        t_sign, _ = features.load(tmp_path / "sign" / "targets" / t)
        np.testing.assert_array_equal(t_sign, t_plain)
        mean = t_plain[np.abs(t_plain).sum(1) > 0].astype(np.float64).mean(0)
        want = signed[ok] @ mean / (np.linalg.norm(signed[ok], axis=1) * np.linalg.norm(mean))
        np.testing.assert_allclose(scores.column(f"score__{t}").to_numpy()[ok], want, rtol=1e-6, atol=0)
    assert features.read_meta(tmp_path / "sign" / "features")["pool_grad"] == "sign"


def test_pool_grad_sign_refuses_what_it_cannot_do(setup, tmp_path, monkeypatch):
    """sign(g_x) needs each prompt's whole gradient before projection (not per-layer or kron),
    is not what --check-rank's exact plain scores measure, and is not linear in fp16 loss scaling."""
    for kw, says in ((dict(check_rank=4), "--check-rank"), (dict(dtype="fp16"), "fp16")):
        with pytest.raises(ValueError, match=says):
            S.ScoreConfig(pool_grad="sign", **kw)
    for kw, says in ((dict(grad_path="per-layer"), "vmap"), (dict(projector="kron"), "kron")):
        with pytest.raises(ValueError, match=says):
            run(setup, tmp_path / "x", pool_grad="sign", **kw)
    # a batch auto would keep off the vmap path (as for a real model) is refused, not run
    d = sum(p.numel() for p in models.load(str(setup / "model")).model.parameters())
    monkeypatch.setattr(S, "VMAP_BYTES", 2 * d * 4)  # two prompts' gradients fit, three (run's batch) do not
    with pytest.raises(ValueError, match="lower --batch to 2, or pass --grad-path vmap"):
        run(setup, tmp_path / "y", pool_grad="sign")
    assert run(setup, tmp_path / "z", pool_grad="sign", grad_path="vmap")["grad_path"]["ran"] == "vmap"
    r = CliRunner().invoke(main, ["score", "--trajectories", str(setup / "pool.parquet"), "--target",
                                  str(setup / "t1.parquet"), "--model", str(setup / "model"), "--pool-grad", "sign",
                                  "--grad-path", "per-layer", "--k", "64", "--out", str(tmp_path / "cli")])
    assert r.exit_code == 2 and "--pool-grad sign needs --grad-path vmap" in r.output
    assert not (tmp_path / "cli").exists()
