"""Offline rollouts: shapes, rewards = re-verification, behaviour log-probs = fresh forward, resume."""

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cropi import models, rewards, rollout, schema, tasks
from cropi.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, small_policy):
    d = tmp_path_factory.mktemp("m") / "small"
    models.save(small_policy.model, small_policy.tokenizer, d, {"kind": "tiny"})
    return d


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("p") / "prompts.parquet"
    table = tasks.make_pool(["basic_arithmetic:difficulty=0", "spell_backward:difficulty=0"], 3, 0, "train")
    schema.write_parquet_atomic(table, path)
    return path


def test_rollout_shapes_rewards_and_logprobs(tmp_path, model_dir, prompts):
    out = rollout.rollout(prompts, tmp_path / "t.parquet", model=str(model_dir), n=4, max_new_tokens=10, seed=1, chunk=2)
    t = schema.read_table(out, "trajectories")
    assert t.num_rows == 6
    pol = models.load(str(model_dir))
    rows = t.to_pylist()
    for row in rows:
        assert len(row["responses"]) == len(row["rewards"]) == len(row["response_token_ids"]) == 4
        for text, ids, lp in zip(row["responses"], row["response_token_ids"], row["behavior_logprobs"]):
            assert 1 <= len(ids) <= 10 and len(lp) == len(ids)
            assert pol.tokenizer.decode(ids, skip_special_tokens=True) == text
        # rewards equal an independent re-verification with the task's scorer
        assert row["rewards"] == pytest.approx([rewards.reward(r, row["answer"], row["task"], row["metadata"]) for r in row["responses"]])
    # behaviour log-probs equal a fresh forward pass of the model on the same tokens
    p_ids = models.encode_prompts(pol, [rows[0]["prompt"]])[0]
    fresh = models.response_logprobs(pol, [p_ids] * 4, rows[0]["response_token_ids"])
    for a, b in zip(fresh, rows[0]["behavior_logprobs"]):
        assert a == pytest.approx(b, abs=1e-5)
    meta = rollout.rollout_meta(out)
    assert meta["seed"] == 1 and meta["n"] == 4 and meta["fingerprint"] == models.fingerprint(pol.model)
    assert not out.with_name(out.name + ".parts").exists()


def test_killed_rollout_resumes_to_identical_file(tmp_path, model_dir, prompts, monkeypatch):
    full = rollout.rollout(prompts, tmp_path / "full.parquet", model=str(model_dir), n=3, max_new_tokens=8, seed=2, chunk=2)
    calls = {"n": 0}
    real = rollout.rollout_rows

    def dies_on_third_chunk(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rollout, "rollout_rows", dies_on_third_chunk)
    out = tmp_path / "resumed.parquet"
    with pytest.raises(KeyboardInterrupt):
        rollout.rollout(prompts, out, model=str(model_dir), n=3, max_new_tokens=8, seed=2, chunk=2)
    assert not out.exists() and len(list(out.with_name(out.name + ".parts").glob("chunk-*.parquet"))) == 2
    monkeypatch.setattr(rollout, "rollout_rows", real)
    rollout.rollout(prompts, out, model=str(model_dir), n=3, max_new_tokens=8, seed=2, chunk=2, resume=True)
    assert pq.read_table(out).equals(pq.read_table(full))
    assert out.read_bytes() == full.read_bytes()


def test_rollout_cli_bad_prompts_exit_2(tmp_path, model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    r = CliRunner().invoke(main, ["rollout", "--prompts", str(bad), "--model", str(model_dir), "--out", str(tmp_path / "o.parquet")])
    assert r.exit_code == 2 and "field answer" in r.output
    assert not (tmp_path / "o.parquet").exists()
