"""`cropi check` on every artefact cropi writes: recognised, summarised, and a broken one is
refused with exit 2 and one line naming the file."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from cropi import artefacts, features, schema
from cropi.cli import main
from cropi.curriculum import write_stage


def _prompts(n: int, start: int = 0) -> pa.Table:
    rows = [{"id": f"p{i}", "prompt": f"q{i}", "answer": str(i), "task": "t" if i % 2 else "u", "difficulty": 0,
             "split": "train"} for i in range(start, start + n)]
    return pa.Table.from_pylist(rows, schema=schema.PROMPT_SCHEMA)


def _store(path, rows_per_shard=(3, 2), k=4):
    features.init_store(path, {"projector": {"kind": "sjlt", "k": k}, "checkpoint": "m"}, resume=False)
    ids = iter(range(100))
    for c, n in enumerate(rows_per_shard):
        index = pa.table({"id": [f"p{next(ids)}" for _ in range(n)], "grad_norm": [1.0] * n, "n_tokens": [3] * n,
                          "status": ["ok"] * (n - 1) + ["zero_signal"], "reason": [""] * n})
        features.write_shard(path, c, np.ones((n, k), dtype=np.float32), index)
    features.finalize(path, len(rows_per_shard))


def _cli(path):
    return CliRunner().invoke(main, ["check", str(path)])


def _refused(path, *words):
    r = _cli(path)
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and line.startswith("cropi: error: ") and all(w in line for w in words), line


def test_curriculum_and_stage(tmp_path):
    cur = tmp_path / "cur"
    write_stage(cur, _prompts(3), {"selector": "popi", "selected": 3})
    write_stage(cur, _prompts(2, 3), {"selector": "random", "selected": 2})
    s = artefacts.check(cur)
    assert s == {"kind": "curriculum", "stages": 2, "sizes": {0: 3, 1: 2}, "selectors": {0: "popi", 1: "random"}}
    assert artefacts.check(cur / "stage-001")["rows"] == 2
    r = _cli(cur)
    assert r.exit_code == 0 and "curriculum" in r.output
    (cur / "stage-000" / "manifest.json").write_text(json.dumps({"selected": 5}))
    _refused(cur / "stage-000", "manifest.json", "selected")
    import shutil

    shutil.rmtree(cur / "stage-000")
    _refused(cur, "stage 0 is missing")


def test_features_and_score_folder(tmp_path):
    sdir = tmp_path / "scores"
    _store(sdir / "features")
    _store(sdir / "targets" / "val", rows_per_shard=(2,))
    scores = pa.table({"id": [f"p{i}" for i in range(5)], "score": [0.5, 0.1, np.nan, 0.3, np.nan],
                       "score__val": [0.5, 0.1, np.nan, 0.3, np.nan], "rank": [1, 3, 4, 2, 5],
                       "pass_rate": [0.5] * 5, "status": ["ok", "ok", "zero_signal", "ok", "zero_signal"]})
    schema.write_parquet_atomic(scores, sdir / "scores.parquet")
    schema.write_json_atomic({"checkpoint": "m", "seed": 0}, sdir / "meta.json")
    s = artefacts.check(sdir)
    assert (s["kind"], s["rows"], s["targets"], s["k"]) == ("score-folder", 5, ["val"], 4)
    assert artefacts.check(sdir / "features")["status"] == {"ok": 3, "zero_signal": 2}
    # a shard whose features lost a row
    np.save(sdir / "features" / "shard-00001.npy", np.ones((1, 4), dtype=np.float32))
    _refused(sdir, "shard-00001.npy", "does not match")
    _refused(sdir / "features", "shard-00001.npy")


def test_run_folder_and_checkpoint(tmp_path, small_policy):
    from cropi import models

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("curriculum: cur\nmodel: tiny\ntrain: {stages: 1, steps_per_stage: 2}\n")
    rows = [{"event": "eval", "step": 0, "target": {"val": 0.1}}, {"event": "train", "step": 1, "loss": 0.1},
            {"event": "train", "step": 2, "loss": 0.2}, {"event": "eval", "step": 2, "target": {"val": 0.2}}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    models.save(small_policy.model, small_policy.tokenizer, run / "checkpoints" / "step-2", info={"step": 2})
    s = artefacts.check(run)
    assert (s["steps_logged"], s["eval_rows"], s["planned_steps"], s["checkpoints"], s["last_eval"]) == \
        (2, 2, 2, ["step-2"], {"val": 0.2})
    assert artefacts.check(run / "checkpoints" / "step-2")["step"] == 2
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3}\n')
    _refused(run, "metrics.jsonl", "row 4", "event")


def test_export_eval_report_tables_and_strangers(tmp_path):
    from cropi.export import export_stage

    write_stage(tmp_path / "cur", _prompts(3), {"selector": "popi"})
    export_stage(tmp_path / "cur", 0, "verl", tmp_path / "s.verl.parquet")
    assert artefacts.check(tmp_path / "s.verl.parquet") == {"kind": "export-verl", "rows": 3, "stage": 0, "selector": "popi"}
    report = {"model": "tiny", "sets": {"val": {"accuracy": 0.25}}}
    (tmp_path / "e.json").write_text(json.dumps(report, indent=2))
    assert artefacts.check(tmp_path / "e.json")["accuracy"] == {"val": 0.25}
    report["sets"]["val"]["accuracy"] = 1.5
    (tmp_path / "e.json").write_text(json.dumps(report))
    _refused(tmp_path / "e.json", "e.json", "accuracy")
    (tmp_path / "comparison.json").write_text('{"full": {"final": NaN}}')
    _refused(tmp_path / "comparison.json", "NaN is not JSON")
    (tmp_path / "comparison.json").write_text('{"full": {"final": null}}')
    assert artefacts.check(tmp_path / "comparison.json") == {"kind": "json", "keys": ["full"]}
    (tmp_path / "one.json").write_text('{"prompt": "1+1", "answer": "2"}\n')  # a one-row JSONL table
    assert artefacts.check(tmp_path / "one.json")["kind"] == "prompts"
    schema.write_parquet_atomic(_prompts(4), tmp_path / "p.parquet")
    assert artefacts.check(tmp_path / "p.parquet")["kind"] == "prompts"
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", "a folder cropi did not write")
    with pytest.raises(schema.InputError, match="no such file"):
        artefacts.check(tmp_path / "nothing")


def _traj_jsonl(path, **fields):
    """One trajectories JSONL row (two responses) with ``fields`` replaced."""
    row = {"id": "a", "prompt": "1 + 1 =", "answer": "2", "responses": ["Answer: 2", "Answer: 3"], "rewards": [1.0, 0.0],
           **fields}
    path.write_text(json.dumps(row) + "\n")
    return path


@pytest.mark.parametrize("fields, words", [
    ({"rewards": [True, False]}, ["row 0", "field rewards", "true/false are not read as numbers"]),
    ({"response_token_ids": [[-5, 3], [4]]}, ["field response_token_ids", "response 0: negative token id -5"]),
    ({"response_token_ids": [[5, 3], []]}, ["field response_token_ids", "response 1: empty token list"]),
    ({"response_token_ids": [[5, 3], None]}, ["field response_token_ids", "response 1: null token list"]),
    ({"response_token_ids": [[5, 3], [4]], "behavior_logprobs": [[-1.0, -1.0], None]},
     ["field behavior_logprobs", "response 1: 0 logprobs for 1 response tokens"]),
], ids=["bool-rewards", "negative-id", "empty-token-list", "null-token-list", "null-logprobs"])
def test_check_refuses_what_score_would_refuse_or_misread(tmp_path, fields, words):
    _refused(_traj_jsonl(tmp_path / "t.jsonl", **fields), "t.jsonl", *words)


def test_bool_rewards_in_parquet_are_refused(tmp_path):
    table = pa.table({"prompt": ["q"], "answer": ["1"], "responses": [["a", "b"]], "rewards": [[True, False]]})
    schema.write_parquet_atomic(table, tmp_path / "t.parquet")
    _refused(tmp_path / "t.parquet", "t.parquet", "field rewards", "got list<element: bool>", "true/false")


def test_check_with_a_model_runs_scores_token_checks_and_says_when_they_did_not_run(tmp_path, small_policy):
    """Without --model the summary says token ids and lengths were not checked; with it, what
    `cropi score` would refuse is refused: ids outside the vocabulary, ids that decode to other
    text, and a response longer than the model's context (a 1 MB response)."""
    from cropi import models

    models.save(small_policy.model, small_policy.tokenizer, tmp_path / "m", {"kind": "tiny"})
    tok = small_policy.tokenizer
    good = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in ("Answer: 2", "Answer: 3")]
    vocab = len(tok)

    def check(path, model=True):
        return CliRunner().invoke(main, ["check", str(path), *(["--model", str(tmp_path / "m")] if model else [])])

    f = _traj_jsonl(tmp_path / "ok.jsonl", response_token_ids=good)
    r = check(f, model=False)
    assert r.exit_code == 0 and "model_checks           not run: token ids and lengths were not checked" in r.output
    r = check(f)
    assert r.exit_code == 0 and f"token ids inside {tmp_path / 'm'}'s vocabulary and decoding to the responses" in r.output
    bad = [good[0], [vocab, *good[1][1:]]]
    r = check(_traj_jsonl(tmp_path / "oov.jsonl", response_token_ids=bad))
    assert r.exit_code == 2 and f"response_token_ids: token id {vocab} outside this model's vocabulary ({vocab})" in r.output
    r = check(_traj_jsonl(tmp_path / "other.jsonl", response_token_ids=[good[0], good[0]]))
    assert r.exit_code == 2 and "response 1: tokens do not decode to the response text" in r.output
    big = _traj_jsonl(tmp_path / "big.jsonl", responses=["Answer: 2", "x" * 1_000_000])
    assert check(big, model=False).exit_code == 0
    r = check(big)
    assert r.exit_code == 2 and "field responses: prompt+response longer than the model context (512 tokens)" in r.output
    r = CliRunner().invoke(main, ["check", str(tmp_path / "m" / "config.json"), "--model", str(tmp_path / "m")])
    assert r.exit_code == 2 and "--model: checks trajectories only" in r.output
