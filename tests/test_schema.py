"""Data contracts: round trips, readers, and one clear line + exit 2 for every bad input."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cropi import schema
from cropi.cli import main


def traj_rows(n=3, G=2):
    rows = []
    for i in range(n):
        rows.append({
            "id": f"p{i}", "prompt": f"What is {i}+1?\n", "answer": str(i + 1), "task": "basic_arithmetic",
            "difficulty": i % 2, "split": "train",
            "responses": [f"Answer: {i + 1}", "Answer: 0"][:G], "rewards": [1.0, 0.0][:G], "behavior": "tiny@x",
            "response_token_ids": [[5, 6, 2], [7, 2]][:G], "behavior_logprobs": [[-0.1, -0.2, -0.3], [-1.0, -0.5]][:G],
        })
    return rows


def write(tmp_path, rows, name="t.parquet"):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def run_check(path):
    return CliRunner().invoke(main, ["check", str(path)])


def test_trajectories_round_trip_and_types(tmp_path):
    path = write(tmp_path, traj_rows())
    t = schema.read_table(path)
    assert t.schema.field("difficulty").type == pa.int32()
    assert t.schema.field("rewards").type == pa.list_(pa.float32())
    out = schema.write_parquet_atomic(t, tmp_path / "o.parquet", metadata={"seed": 3})
    back = schema.read_table(out, "trajectories")
    assert back.equals(t.replace_schema_metadata(None).cast(back.schema)) or back.to_pylist() == t.to_pylist()
    assert schema.read_cropi_meta(out) == {"seed": 3}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_public_cropi_jsonl_gets_stable_ids(tmp_path):
    rows = [{"prompt": "1+1=", "answer": "2", "responses": ["2", "3"], "rewards": [1, 0]}]
    a = schema.read_table(write(tmp_path, rows, "a.jsonl"))
    b = schema.read_table(write(tmp_path, rows, "b.jsonl"))
    assert a.column("id").to_pylist() == b.column("id").to_pylist() == [schema.stable_id("1+1=", "2")]
    assert a.column("task").to_pylist() == ["unknown"]
    assert schema.detect_kind(a) == "trajectories"


def test_datasets_folder_reader(tmp_path):
    import datasets

    rows = traj_rows()
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    t = schema.read_table(tmp_path / "ds")
    assert t.column("id").to_pylist() == ["p0", "p1", "p2"]


def test_check_summary(tmp_path):
    r = run_check(write(tmp_path, traj_rows()))
    assert r.exit_code == 0, r.output
    assert "responses_per_prompt" in r.output and "pass_rate_mean" in r.output


def mutate(rows, i, **kw):
    rows = [dict(r) for r in rows]
    rows[i].update(kw)
    return rows


BAD_CASES = [
    ("missing column", lambda rows: [{k: v for k, v in r.items() if k != "answer"} for r in rows], None, "answer", "missing column"),
    ("wrong type", lambda rows: mutate(rows, 1, difficulty="hard"), "1", "difficulty", "wrong type"),
    ("length mismatch", lambda rows: mutate(rows, 2, rewards=[1.0]), "2 (id 'p2')", "rewards", "1 rewards for 2 responses"),
    ("non-finite reward", lambda rows: mutate(rows, 1, rewards=[1.0, math.nan]), "1 (id 'p1')", "rewards", "non-finite"),
    ("empty responses", lambda rows: mutate(rows, 0, responses=[], rewards=[], response_token_ids=[], behavior_logprobs=[]), "0 (id 'p0')", "responses", "empty response list"),
    ("duplicate id", lambda rows: mutate(rows, 2, id="p0"), "2 (id 'p0')", "id", "duplicate id"),
    ("logprob length", lambda rows: mutate(rows, 1, behavior_logprobs=[[-0.1, -0.2], [-1.0, -0.5]]), "1 (id 'p1')", "behavior_logprobs", "2 logprobs for 3 response tokens"),
]


@pytest.mark.parametrize("name,fn,row,field,msg", BAD_CASES, ids=[c[0] for c in BAD_CASES])
@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_bad_input_one_line_exit_2(tmp_path, name, fn, row, field, msg, fmt):
    rows = fn(traj_rows())
    if fmt == "parquet" and name == "wrong type":
        rows = fn(traj_rows())
        # parquet cannot even hold mixed types in one column: write the column as strings
        for r in rows:
            r["difficulty"] = str(r["difficulty"]) if r["difficulty"] != "hard" else "hard"
    path = write(tmp_path, rows, f"bad.{fmt}")
    r = run_check(path)
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line
    assert str(path) in line and f"field {field}" in line and msg in line
    if row is not None and fmt == "parquet":
        assert f"row {row}" in line
    assert not (tmp_path / "out").exists()


def test_missing_file_and_unknown_format(tmp_path):
    r = run_check(tmp_path / "nope.parquet")
    assert r.exit_code == 2 and "no such file" in r.output
    (tmp_path / "x.csv").write_text("a,b\n")
    r = run_check(tmp_path / "x.csv")
    assert r.exit_code == 2 and "unknown format" in r.output


def test_pass_rates_threshold():
    assert schema.pass_rates([[1.0, 0.0, 1.0, 0.0], [0.4, 0.6], [0.0]]).tolist() == [0.5, 0.5, 0.0]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    class Boom(Exception):
        pass

    bad = pa.table({"x": [1]})
    target = tmp_path / "o.parquet"
    import cropi.schema as S

    orig = S.pq.write_table

    def failing(*a, **k):
        raise Boom()

    S.pq.write_table = failing
    try:
        with pytest.raises(Boom):
            schema.write_parquet_atomic(bad, target)
    finally:
        S.pq.write_table = orig
    assert list(tmp_path.iterdir()) == []
