"""The selection study's evidence: `cropi score --check-influence` against plain autograd, the
comparison's bootstrap intervals and strict JSON, selection shares, curves without empty panels."""

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from cropi import models, schema
from cropi import score as S
from cropi.cli import main
from cropi.policy_grad import GradConfig, token_weights
from cropi.runtime import derive_seed
from pipelines import compare


def traj(n, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rewards = [1.0, 0.0] + rng.integers(0, 2, 2).astype(float).tolist()
        rows.append({"id": f"s{seed}-{i}", "prompt": f"{i} + {seed} =\n", "answer": str(i + seed), "task": "t",
                     "difficulty": 0, "split": "train", "behavior": "x", "rewards": rewards,
                     "responses": [f"Answer: {int(v)}" for v in rng.integers(0, 99, 4)]})
    return pa.Table.from_pylist(rows)


def plain_objective(policy, table, theta0_lp=None):
    """J_V = mean over prompts of Σ_i w_i Σ_t exp(log π(y_it) − log β(y_it)), β = θ_0, by a plain
    per-response forward; returns (J, per-response log-prob tensors)."""
    model, tok = policy.model, policy.tokenizer
    total, lps = 0.0, []
    for prompt, resps, rewards in zip(table.column("prompt").to_pylist(), table.column("responses").to_pylist(),
                                      table.column("rewards").to_pylist()):
        pid = models.encode_prompts(policy, [prompt])[0]
        rids = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in resps]
        w = token_weights(rewards, [len(r) for r in rids], GradConfig())
        for i, r in enumerate(rids):
            ids = torch.tensor([pid + r])
            logits = model(input_ids=ids).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[len(pid) - 1 :, 0]
            lps.append(lp)
            base = theta0_lp[len(lps) - 1] if theta0_lp is not None else lp.detach()
            total = total + w[i] * torch.exp(lp - base).sum()
    return total / table.num_rows, lps


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_policy):
    d = tmp_path_factory.mktemp("infl")
    models.save(small_policy.model, small_policy.tokenizer, d / "model", {"kind": "tiny"})
    schema.write_parquet_atomic(traj(8, 0), d / "pool.parquet")
    schema.write_parquet_atomic(traj(3, 1), d / "t1.parquet")
    return d


def test_check_influence_matches_plain_autograd_steps(setup, tmp_path):
    """measured_mean = mean over the checked prompts of ΔJ_V/‖∇J_V‖ after θ + ε g/‖g‖, with J_V,
    g and the step recomputed by plain autograd; small steps are first-order, large ones are not."""
    cfg = S.ScoreConfig(projector="identity", shard_size=4, batch=4, check_influence=5, influence_eps=(1e-3, 0.3, 3.0))
    meta = S.score(setup / "pool.parquet", [setup / "t1.parquet"], tmp_path / "s", model=str(setup / "model"), cfg=cfg)
    ci = meta["check_influence"]
    assert ci["n"] == 5 and [s["step"] for s in ci["steps"]] == [1e-3, 0.3, 3.0]
    small, mid, big = ci["steps"]
    assert small["spearman"] > 0.95 and small["first_order_rel_err"] < 0.05
    assert big["first_order_rel_err"] > 5 * small["first_order_rel_err"]
    json.loads((tmp_path / "s" / "meta.json").read_text())["check_influence"]  # saved

    policy = models.load(str(setup / "model"))
    model = policy.model.eval()
    pool, target = schema.read_table(setup / "pool.parquet"), schema.read_table(setup / "t1.parquet")
    rng = np.random.default_rng(derive_seed(0, "check-influence"))
    rows = np.sort(rng.choice(np.arange(8), 5, replace=False)).tolist()
    params = [p for p in model.parameters()]
    jv, lp0 = plain_objective(policy, target)
    gv = torch.autograd.grad(jv, params)
    gv_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in gv))
    for eps, res in ((0.3, mid),):  # a step large enough that float32 rounding is far below ΔJ
        changes = []
        for r in rows:
            jx, _ = plain_objective(policy, pool.slice(r, 1))
            gx = torch.autograd.grad(jx * 1, params)  # J over one prompt = J_x
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in gx))
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, g in zip(params, gx):
                    p.add_((eps * g.double() / norm).float())
                j1, _ = plain_objective(policy, target, lp0)
                for p, s in zip(params, saved):
                    p.copy_(s)
            changes.append(float(j1 - jv.detach()) / float(gv_norm))
        assert math.isclose(res["measured_mean"], np.mean(changes), rel_tol=2e-3, abs_tol=1e-8)


def test_check_influence_cli_prints_and_saves(setup, tmp_path):
    r = CliRunner().invoke(main, ["score", "--trajectories", str(setup / "pool.parquet"), "--target", str(setup / "t1.parquet"),
                                  "--model", str(setup / "model"), "--k", "64", "--check-influence", "4",
                                  "--influence-eps", "0.01", "--influence-lr", "0.001", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "check-influence on 4 prompts, normalised step 0.01: Spearman" in r.output
    assert "adam step 0.001" in r.output
    steps = json.loads((tmp_path / "o" / "meta.json").read_text())["check_influence"]["steps"]
    assert [s["rule"] for s in steps] == ["normalised", "adam"]


def test_bootstrap_ci_covers_and_pairs():
    rng = np.random.default_rng(0)
    acc = rng.integers(0, 2, (3, 400)).astype(float)
    c = compare.bootstrap_ci(acc, seed=1)
    assert c["lo"] < acc.mean() < c["hi"] and c["seeds"] == 3 and c["prompts"] == 400
    # binomial standard error of a mean of 1200 coin flips ≈ 0.0144: the interval is about ±2 se
    assert 0.03 < c["hi"] - c["lo"] < 0.09
    same = compare.bootstrap_ci(acc - acc)
    assert same["lo"] == same["hi"] == 0.0


def test_strict_json_and_table_without_full(tmp_path):
    compare.write_json_strict({"a": float("nan"), "b": [np.float64(1.5), float("inf")], "c": np.int64(2)}, tmp_path / "x.json")
    text = (tmp_path / "x.json").read_text()
    assert json.loads(text) == {"a": None, "b": [1.5, None], "c": 2} and "NaN" not in text
    block = {"label": "sampled accuracy", "methods": {"cropi": {"seeds": [{"final_target": 0.2, "steps_to_full_final": None,
             "total_steps": 4, "rollouts": 8, "wall_seconds": 1.0}], "ci": {}, "target_share": [0.5, 0.25]}}}
    t = compare.table({"metrics": {"accuracy": block}})
    assert t.startswith("**sampled accuracy**")
    assert "n/a (no full run)" in t and "not reached" not in t and "0.50 / 0.25" in t


def test_curves_have_y_labels_and_no_empty_panels(tmp_path):
    from cropi.train.plot import plot_curves

    rows = [{"event": "train", "step": s, "stage": 0, "reward_mean": 0.1 * s, "kl": 0.0, "loss": 1.0} for s in (1, 2)]
    rows.append({"event": "eval", "step": 2, "stage": 0, "target": {"t": 0.5}, "heldout": {"h": 0.1}})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    captured = {}
    import matplotlib.figure

    orig = matplotlib.figure.Figure.savefig

    def spy(self, *a, **k):
        captured["axes"] = [(ax.get_title(), ax.get_ylabel(), len(ax.lines)) for ax in self.axes]
        return orig(self, *a, **k)

    matplotlib.figure.Figure.savefig = spy
    try:
        plot_curves(tmp_path / "m.jsonl", tmp_path / "c.png")
    finally:
        matplotlib.figure.Figure.savefig = orig
    axes = captured["axes"]
    assert [a[0] for a in axes] == ["mean reward", "loss", "eval accuracy"]  # KL all 0: no panel
    assert all(a[1] and a[2] > 0 for a in axes)


def test_oracle_and_norescore_curricula(setup, tmp_path):
    """oracle: one stage holding exactly the pool's target-family prompts; family-random: every
    stage a 10 %-of-the-pool draw from those prompts only; cropi-norescore: one stage holding the
    top 10 % of θ_0's scores (the same prompts cropi starts from); shares read back."""
    from cropi import config, curriculum
    from pipelines import cropi_loop as L

    pool = traj(20, 3).to_pylist()
    for i, r in enumerate(pool):
        r["task"] = "tgt" if i % 4 == 0 else "other"
    target = traj(4, 4).to_pylist()
    for r in target:
        r["task"] = "tgt"
    d = tmp_path / "data"
    schema.write_parquet_atomic(pa.Table.from_pylist(pool), d / "pool.traj.parquet")
    schema.write_parquet_atomic(pa.Table.from_pylist(target), d / "targets" / "target.traj.parquet")
    schema.write_parquet_atomic(pa.Table.from_pylist(target).drop_columns(["responses", "rewards", "behavior"]),
                                d / "targets" / "target.parquet")
    data = {"pool_traj": d / "pool.traj.parquet", "targets": {"target": d / "targets" / "target.traj.parquet"},
            "tests": {}, "heldout": {}}
    cfg = config.resolve({"model": str(setup / "model"), "score": {"k": 32}, "select": {"ratio": 0.1},
                          "train": {"stages": 3, "steps_per_stage": 2}}, config.run_layout(), "test")
    cur = tmp_path / "family-random" / "curriculum"
    spec = L._spec(cfg, "family-random", 0, data, cur)
    L.make_curriculum("family-random", cfg, 0, data, cur, spec)
    assert sorted(curriculum.stage_dirs(cur)) == [0, 1, 2] and spec.train.steps_per_stage == 2
    tgt_ids = {r["id"] for r in pool if r["task"] == "tgt"}
    drawn = [curriculum.read_stage(cur, s)[0].column("id").to_pylist() for s in range(3)]
    assert all(len(ids) == 2 and set(ids) <= tgt_ids for ids in drawn)  # 10 % of 20, target family only
    assert len({tuple(sorted(ids)) for ids in drawn}) > 1  # a fresh draw per stage
    for method in ("oracle", "cropi-norescore", "cropi"):
        cur = tmp_path / method / "curriculum"
        spec = L._spec(cfg, method, 0, data, cur)
        L.make_curriculum(method, cfg, 0, data, cur, spec)
        assert sorted(curriculum.stage_dirs(cur)) == [0]
        assert spec.train.stages == (3 if method == "cropi" else 1)
        assert spec.train.steps_per_stage == (2 if method == "cropi" else 6)
    oracle = curriculum.read_stage(tmp_path / "oracle" / "curriculum", 0)[0]
    assert sorted(oracle.column("id").to_pylist()) == sorted(r["id"] for r in pool if r["task"] == "tgt")
    scores = schema.read_table(d / "scores-stage-0" / "scores.parquet")
    top = [i for i, k in zip(scores.column("id").to_pylist(), scores.column("rank").to_pylist()) if k <= 2]
    for method in ("cropi-norescore", "cropi"):
        assert sorted(curriculum.read_stage(tmp_path / method / "curriculum", 0)[0].column("id").to_pylist()) == sorted(top)
    shares = compare.selection_shares(tmp_path / "oracle" / "curriculum", {"tgt"})
    assert shares == [{"stage": 0, "prompts": 5, "target_share": 1.0, "per_task": {"tgt": 1.0}}]
    assert compare.target_families(tmp_path) == {"tgt"}
