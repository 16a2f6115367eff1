"""The low-noise held-out metric (teacher-forced probability of the gold response), the warm-up's
stop rule and recipe record, and the calibration's summary."""

import json
import math

import numpy as np
import pytest
import torch

from cropi import evaluate, models, tasks
from pipelines import calibrate, compare

ROWS = [{"prompt": "What is 2 + 3?", "answer": "5"}, {"prompt": "Spell cat backward.", "answer": "tac"},
        {"prompt": "x", "answer": "-12"}]


def gold_prob_by_hand(policy, row, temperature=1.0) -> float:
    """One sequence at a time, no padding: prod_t softmax(logits_t / T)[gold_t] over the gold tokens."""
    tok = policy.tokenizer
    prompt = tok(row["prompt"])["input_ids"]
    gold = tok(f"Answer: {row['answer']}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt + gold])
    with torch.no_grad():
        logits = policy.model(input_ids=ids).logits[0].double() / temperature
    logp = torch.log_softmax(logits, -1)
    return math.exp(sum(logp[len(prompt) - 1 + j, g].item() for j, g in enumerate(gold)))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gold_probability_matches_one_sequence_at_a_time(small_policy, temperature):
    got = evaluate.gold_probability(small_policy, ROWS, temperature=temperature, batch=2)
    want = [gold_prob_by_hand(small_policy, r, temperature) for r in ROWS]
    # a random model gives p ~ 1e-20: relative tolerance only (pytest.approx's default abs=1e-12 would pass anything)
    assert got["per_prompt"] == pytest.approx(want, rel=1e-4, abs=0)
    assert got["gold_prob"] == pytest.approx(np.mean(want), rel=1e-4, abs=0) and got["n"] == 3


def test_warmup_records_recipe_and_stops_by_rule(tmp_path, monkeypatch):
    """The stop rule ends the run at the first evaluation where the target's T=1 accuracy reaches
    stop_t1 and greedy is stop_gap above it; cropi.json records every evaluation and the recipe."""
    from cropi import warmup as W

    seen = []

    def fake_accuracy(policy, sets, *, seed, **kw):  # scripted accuracies: stop at the 3rd evaluation
        i = len(seen)
        seen.append(i)
        t1, greedy = [(0.1, 0.3), (0.35, 0.38), (0.35, 0.5)][i]
        return {s: {"greedy": greedy if s == W.TARGET_SPEC else 0.0, "t1": t1 if s == W.TARGET_SPEC else 0.0}
                for s in sets}

    monkeypatch.setattr(W, "family_accuracy", fake_accuracy)
    info = W.warmup(tmp_path / "m", max_steps=50, eval_every=2, batch_size=2, n_per_spec=8, eval_n=2,
                    stop_t1=0.3, stop_gap=0.08)
    assert info["steps"] == 6 and info["stopped_by_rule"] and len(info["history"]) == 3
    saved = json.loads((tmp_path / "m" / "cropi.json").read_text())
    assert saved["recipe"]["stop_t1"] == 0.3 and saved["recipe"]["target"] == W.TARGET_SPEC
    assert saved["accuracy"][W.TARGET_SPEC] == {"greedy": 0.5, "t1": 0.35}
    assert saved["model_config"] == models.TINY_CONFIG and saved["parameters"] == info["parameters"]


def test_shipped_tiny_policy_is_in_the_rl_regime():
    """The committed warm-up result: on the target family T=1 accuracy in 0.15-0.5 and greedy
    clearly above it (what GRPO on a small model turns into sampled accuracy)."""
    info = json.loads((models.SHIPPED_TINY / "cropi.json").read_text())
    acc = info["accuracy"][info["recipe"]["target"]]
    assert 0.15 <= acc["t1"] <= 0.5 and acc["greedy"] >= acc["t1"] + info["recipe"]["stop_gap"]
    assert info["model_config"] == models.TINY_CONFIG
    assert set(info["accuracy"]) == set(info["recipe"]["specs"])
    for spec in info["recipe"]["specs"]:
        tasks.parse_task_spec(spec)


def test_calibration_summary_by_hand():
    runs = [{"seed": s, "gold": {"initial": 0.2, "final": 0.2 + g, "gain": g, "heldout_gain": -0.01, "best": 0.3, "steps": 30},
             "accuracy": {}} for s, g in enumerate([0.03, 0.05, 0.04])]
    rows = calibrate.summarize([{"lr": 1e-4, "batch": 32, "method": "oracle", "runs": runs}])
    assert len(rows) == 1  # no sampled-accuracy figures: no row for that metric
    r = rows[0]
    assert r["gain"] == pytest.approx(0.04) and r["seed_sd"] == pytest.approx(0.01)  # sample sd of .03 .05 .04
    assert r["ratio"] == pytest.approx(4.0) and r["heldout_gain"] == pytest.approx(-0.01)
    t = calibrate.table(rows)
    assert "| 0.0001 | 32 | oracle | 3 | 0.2000 | +0.0400 ± 0.0100 | 4.0 | -0.0100 |" in t


def test_compare_reads_both_metrics(tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text("train:\n  group_size: 4\n")
    rows = [{"event": "eval", "step": s, "target": {"t_test": a, "t": 0.9}, "heldout": {"h": 0.1},
             "target_gold": {"t_test": g, "t": 0.8}, "heldout_gold": {"h": 0.05}}
            for s, a, g in [(0, 0.25, 0.10), (5, 0.5, 0.2)]]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval" / "step-5.json").write_text(json.dumps(
        {"target": {"t_test": {"per_prompt": [0.5, 0.5], "gold_per_prompt": [0.1, 0.3]}}}))
    assert compare.read_curves(run, "gold")["target"] == [0.10, 0.2]
    assert compare.read_curves(run, "accuracy")["target"] == [0.25, 0.5]
    assert compare.read_curves(run, "gold")["heldout"] == [0.05, 0.05]
    assert compare.per_prompt(run, 5, "gold") == {"targeted": [0.1, 0.3]}
    assert compare.per_prompt(run, 5, "accuracy") == {"targeted": [0.5, 0.5]}


def test_calibration_table_of_finished_runs_only(tmp_path):
    """--table-only: cells and seeds are read from ROOT/calibrate/lr<LR>-b<B>/<method>-s<seed>;
    a run without done.json (still running, or killed) is left out."""
    def run(cell, name, gold, done=True):
        base = tmp_path / "calibrate" / cell / name
        (base / "run").mkdir(parents=True)
        (base / "run" / "config.yaml").write_text("train:\n  group_size: 8\n")
        rows = [{"event": "eval", "step": s, "target": {"t_test": 0.5}, "heldout": {"h": 0.1},
                 "target_gold": {"t_test": g}, "heldout_gold": {"h": 0.2}} for s, g in enumerate(gold)]
        (base / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if done:
            (base / "done.json").write_text("{}")

    run("lr0.0001-b32", "oracle-s0", [0.2, 0.25])
    run("lr0.0001-b32", "oracle-s1", [0.2, 0.23])
    run("lr0.0001-b32", "oracle-s2", [0.2, 0.9], done=False)
    run("lr2e-05-b8", "full-s0", [0.2, 0.19])
    cells = calibrate.finished_cells(tmp_path)
    assert [(c["lr"], c["batch"], c["method"], [r["seed"] for r in c["runs"]]) for c in cells] == [
        (0.0001, 32, "oracle", [0, 1]), (2e-05, 8, "full", [0])]
    rows = {(r["lr"], r["method"], r["metric"]): r for r in calibrate.summarize(cells)}
    assert rows[(0.0001, "oracle", "gold")]["gain"] == pytest.approx(0.04)
    assert rows[(0.0001, "oracle", "gold")]["seed_sd"] == pytest.approx(0.02 / math.sqrt(2))
    assert rows[(2e-05, "full", "gold")]["gain"] == pytest.approx(-0.01) and rows[(2e-05, "full", "gold")]["seed_sd"] is None
    assert rows[(0.0001, "oracle", "accuracy")]["gain"] == 0.0


def test_stage_shares_include_the_rescored_stages(tmp_path):
    """cropi's stage 0 is made before training (METHOD-sSEED/curriculum), its later stages by the
    trainer's re-scoring (METHOD-sSEED/run/curriculum): the study reports the share of every one."""
    import pyarrow as pa

    from cropi import curriculum

    def rows(tasks_):
        return pa.Table.from_pylist([{"id": f"{t}-{i}", "prompt": "p", "answer": "1", "task": t, "difficulty": 0,
                                      "split": "train"} for i, t in enumerate(tasks_)])

    d = tmp_path / "cropi-s0"
    curriculum.write_stage(d / "curriculum", rows(["tgt", "tgt", "x", "y"]), {"selector": "popi"})
    curriculum.write_stage(d / "run" / "curriculum", rows(["tgt", "x", "x", "x"]), {"selector": "popi"}, stage=1)
    curriculum.write_stage(d / "run" / "curriculum", rows(["tgt"] * 4), {"selector": "popi"}, stage=2)
    shares = compare.stage_shares(d, {"tgt"})
    assert [(r["stage"], r["target_share"]) for r in shares] == [(0, 0.5), (1, 0.25), (2, 1.0)]
    assert [r["target_share"] for r in compare.stage_shares(tmp_path / "none", {"tgt"})] == []


def fake_run(base, gold_final, gold_start=(0.1, 0.1), done=True):
    """A finished method-seed dir whose eval at steps 0 and 5 holds per-prompt gold probabilities."""
    run = base / "run"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text("train:\n  group_size: 8\n")
    rows = [{"event": "eval", "step": s, "target": {"t_test": 0.5}, "heldout": {"h": 0.1},
             "target_gold": {"t_test": float(np.mean(g))}, "heldout_gold": {"h": 0.2}}
            for s, g in ((0, gold_start), (5, gold_final))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for s, g in ((0, gold_start), (5, gold_final)):
        (run / "eval" / f"step-{s}.json").write_text(json.dumps(
            {"target": {"t_test": {"per_prompt": [0.5] * len(g), "gold_per_prompt": list(g)}}}))
    if done:
        (base / "done.json").write_text('{"seconds": 1}')


def test_remedies_link_the_study_data_and_pair_with_random(tmp_path):
    """A remedy's folder gets hard links to the study's data: θ_0's scores only when its scoring is
    unchanged, the target sets only when its data is; its table pairs every method with random
    by seed (mean of per-prompt differences, computed here by hand); unfinished runs are left out."""
    import os

    import pyarrow as pa

    from cropi import schema
    from pipelines import remedies

    study, out = tmp_path / "study", tmp_path / "rem"
    for rel in ("pool.traj.parquet", "tests/target_test.parquet", "scores-stage-0/meta.json"):
        (study / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        (study / "data" / rel).write_text(rel)
    schema.write_parquet_atomic(pa.table({"task": ["tgt"]}), study / "data" / "targets" / "target.parquet")
    for overrides, scores, targets in ((["train.stages=6"], True, True), (["score.params=last:1"], False, True),
                                       (["data.target_per_spec=512"], False, False)):
        root = tmp_path / "r" / overrides[0]
        remedies.link_data(study, root, overrides)
        assert os.path.samefile(root / "data" / "pool.traj.parquet", study / "data" / "pool.traj.parquet")
        assert (root / "data" / "tests" / "target_test.parquet").exists()
        assert (root / "data" / "scores-stage-0" / "meta.json").exists() == scores
        assert (root / "data" / "targets" / "target.parquet").exists() == targets

    assert remedies.overrides_of("rescore-2x", {"train": {"stages": 3, "steps_per_stage": 10}}) == [
        "train.stages=6", "train.steps_per_stage=5"]  # the same 30 steps, re-scored every 5
    assert remedies.overrides_of("family-random-kept", {"train": {"stages": 3, "steps_per_stage": 10}}) == [
        "train.stages=1", "train.steps_per_stage=30"]

    fake_run(study / "random-s0", (0.1, 0.3))
    fake_run(study / "random-s1", (0.2, 0.2))
    fake_run(out / "adam-sign" / "cropi-norescore-s0", (0.3, 0.5))
    fake_run(out / "adam-sign" / "cropi-norescore-s1", (0.2, 0.4))
    fake_run(out / "adam-sign" / "cropi-norescore-s2", (0.9, 0.9), done=False)
    comp = remedies.summarize(study, out, [0, 1, 2])
    gold = comp["metrics"]["gold"]
    assert set(gold["methods"]) == {"random", "adam-sign"}
    assert [r["seed"] for r in gold["methods"]["adam-sign"]["seeds"]] == [0, 1]
    assert gold["methods"]["adam-sign"]["ci"]["minus_ref"]["mean"] == pytest.approx((0.2 + 0.2 + 0.0 + 0.2) / 4)
    assert "minus_ref" not in gold["methods"]["random"]["ci"]
    assert "minus random (paired)" in (out / "remedies.md").read_text()


def test_steps_to_full_data_final_with_paired_intervals(tmp_path):
    """Steps to reach full data's final targeted value get a bootstrap interval over seeds and a
    paired difference; a run that never reaches it counts as one eval interval past its end."""
    for s in (0, 1):
        fake_run(tmp_path / f"full-s{s}", (0.2, 0.2))
        fake_run(tmp_path / f"random-s{s}", (0.1, 0.1 + 0.05 * s))  # never reaches 0.2: bound 5 + 5
        fake_run(tmp_path / f"cropi-s{s}", (0.3, 0.3))  # reaches it at step 5
    runs = {m: [str(tmp_path / f"{m}-s{s}") for s in (0, 1)] for m in ("full", "random", "cropi")}
    block = compare.summarize_metric(runs, {"tgt"}, "gold", ref="cropi")
    ci = {m: d["ci"] for m, d in block["methods"].items()}
    assert ci["cropi"]["steps"]["mean"] == 5.0 and ci["random"]["steps"]["mean"] == 10.0
    assert ci["random"]["steps_minus_ref"] == {"mean": 5.0, "lo": 5.0, "hi": 5.0, "seeds": 2, "prompts": 1}
    assert "steps" not in ci["full"] and "steps_minus_ref" not in ci["cropi"]
    assert "10.0 [10.0, 10.0] (0/2 seeds reach it) | +5.0 [+5.0, +5.0]" in compare.metric_table(block)
