"""Users' own prompt files: column mapping, HF datasets (cache names, save_to_disk, DatasetDict),
verl Parquet, the public CROPI JSONL, and output formats that follow the file name."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cropi import schema, tasks
from cropi.cli import main

ROWS = [{"question": f"What is {i} + {i}?", "solution": str(2 * i), "uid": f"q{i}"} for i in range(3)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_column_mapping_jsonl_and_parquet(tmp_path):
    cols = {"prompt": "question", "answer": "solution", "id": "uid"}
    j = schema.read_table(_jsonl(tmp_path / "q.jsonl", ROWS), columns=cols)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "q.parquet")
    p = schema.read_table(tmp_path / "q.parquet", columns=cols)
    for t in (j, p):
        assert t.column("prompt").to_pylist() == [r["question"] for r in ROWS]
        assert t.column("answer").to_pylist() == ["0", "2", "4"] and t.column("id").to_pylist() == ["q0", "q1", "q2"]
        assert t.column("task").to_pylist() == ["unknown"] * 3 and t.column("split").to_pylist() == ["train"] * 3
    with pytest.raises(schema.InputError, match="--prompt-column"):   # the failure named the fix
        schema.read_table(tmp_path / "q.parquet")
    with pytest.raises(schema.InputError, match="no such column for --answer-column"):
        schema.read_table(tmp_path / "q.parquet", columns={"prompt": "question", "answer": "nope"})


def test_integer_answers_and_ids_are_strings(tmp_path):
    pq.write_table(pa.table({"q": ["1+1?"], "a": [2], "k": [7]}), tmp_path / "n.parquet")
    _jsonl(tmp_path / "n.jsonl", [{"q": "1+1?", "a": 2, "k": 7}])
    for name in ("n.parquet", "n.jsonl"):
        t = schema.read_table(tmp_path / name, columns={"prompt": "q", "answer": "a", "id": "k"})
        assert t.column("answer").to_pylist() == ["2"] and t.column("id").to_pylist() == ["7"]


def test_save_to_disk_dataset_gets_jsonl_defaults(tmp_path):
    import datasets

    public = [{"prompt": "1+1?", "answer": "2", "responses": ["2", "3"], "rewards": [1.0, 0.0]}]
    datasets.Dataset.from_list(public).save_to_disk(str(tmp_path / "ds"))
    from_ds = schema.read_table(tmp_path / "ds")
    from_jsonl = schema.read_table(_jsonl(tmp_path / "p.jsonl", public))
    assert from_ds.select(from_jsonl.column_names).to_pylist() == from_jsonl.to_pylist()
    assert from_ds.column("id").to_pylist() == [schema.stable_id("1+1?", "2")]


def test_dataset_dict_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]), "test": datasets.Dataset.from_list(ROWS[2:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    cols = {"prompt": "question", "answer": "solution"}
    assert schema.read_table(tmp_path / "dd", columns=cols, split="test").num_rows == 1
    assert schema.read_table(tmp_path / "dd", columns=cols, split="train").num_rows == 2
    with pytest.raises(schema.InputError, match="--split"):
        schema.read_table(tmp_path / "dd", columns=cols)
    with pytest.raises(schema.InputError, match="no split 'val'"):
        schema.read_table(tmp_path / "dd", columns=cols, split="val")


def _build_hf_cache(home, src):
    """What `load_dataset("someone/tinymath")` leaves in HF_HOME after an online first load:
    HF_HOME/datasets/someone___tinymath/default/0.0.0/<revision>/tinymath-train.arrow."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    builder = Json(cache_dir=str(home / "datasets"), dataset_name="tinymath", config_name="default", hash="0" * 40,
                   data_files=DataFilesDict.from_patterns({"train": [str(src)]}))
    builder.download_and_prepare()
    built = next((home / "datasets" / "tinymath").iterdir())
    (home / "datasets" / "someone___tinymath").mkdir()
    built.rename(home / "datasets" / "someone___tinymath" / "default")


def test_hf_dataset_by_name_from_the_local_cache(tmp_path):
    """A fresh process with HF_HOME pointing at the cache reads the dataset by name, offline."""
    src = _jsonl(tmp_path / "train.jsonl", ROWS)
    home = tmp_path / "hf"
    _build_hf_cache(home, src)
    env = {**os.environ, "HF_HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets"), "PYTHONPATH": os.getcwd()}
    env.pop("HF_DATASETS_OFFLINE", None)
    args = [sys.executable, "-m", "cropi", "check", "someone/tinymath", "--split", "train", "--json",
            "--prompt-column", "question", "--answer-column", "solution", "--id-column", "uid"]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["rows"] == 3
    missing = subprocess.run(args[:4] + ["someone/absent"] + args[5:], env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "local HF cache" in missing.stderr


def test_verl_parquet_read_as_prompts(tmp_path):
    rows = [{"data_source": "openai/gsm8k",
             "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": "4"},
             "extra_info": {"split": "test", "index": 0}},
            {"data_source": "cropi/chain_sum", "prompt": [{"role": "user", "content": "1+1?"}], "ability": "chain_sum",
             "reward_model": {"style": "rule", "ground_truth": "2"},
             "extra_info": {"split": "train", "index": 1}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "v.parquet")
    t = schema.read_table(tmp_path / "v.parquet", "prompts").to_pylist()
    assert [r["prompt"] for r in t] == ["Be brief.\n\n2+2?", "1+1?"]
    assert [r["answer"] for r in t] == ["4", "2"] and [r["task"] for r in t] == ["openai/gsm8k", "cropi/chain_sum"]
    assert [r["split"] for r in t] == ["test", "train"]


def test_public_cropi_jsonl_as_before(tmp_path):
    lines = [{"prompt": "p", "answer": "1", "responses": ["Answer: 1", "x"], "rewards": [1.0, 0.0]}]
    t = schema.read_table(_jsonl(tmp_path / "c.jsonl", lines))
    assert schema.detect_kind(t) == "trajectories" and t.column("behavior").to_pylist() == ["unknown"]


@pytest.mark.parametrize("name,kind", [("p.parquet", "parquet"), ("p.jsonl", "jsonl"), ("p.jsonl.gz", "jsonl.gz")])
def test_tasks_make_format_follows_name(tmp_path, name, kind):
    out = tmp_path / name
    r = CliRunner().invoke(main, ["tasks", "make", "--task", "chain_sum:difficulty=0", "--n", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    raw = out.read_bytes()
    if kind == "parquet":
        assert raw[:4] == b"PAR1"
    else:
        text = gzip.decompress(raw).decode() if kind == "jsonl.gz" else raw.decode()
        assert raw[:4] != b"PAR1" and [json.loads(x)["task"] for x in text.splitlines()] == ["chain_sum"] * 3
    assert schema.read_table(out).num_rows == 3


def test_unknown_output_name_refused(tmp_path):
    r = CliRunner().invoke(main, ["tasks", "make", "--task", "chain_sum", "--n", "2", "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 2 and "format follows the name" in r.output and not (tmp_path / "p.csv").exists()


def test_rollout_reads_mapped_columns_with_math_verifier(tmp_path):
    from cropi import rollout

    _jsonl(tmp_path / "q.jsonl", ROWS[:2])
    out = rollout.rollout(tmp_path / "q.jsonl", tmp_path / "t.parquet", n=2, max_new_tokens=4, chunk=8,
                          columns={"prompt": "question", "answer": "solution", "id": "uid"}, verifier="math")
    t = schema.read_table(out, "trajectories")
    assert t.column("id").to_pylist() == ["q0", "q1"]
    assert schema.read_cropi_meta(out)["verifier"] == "math"
    with pytest.raises(schema.InputError, match=r"\.parquet"):
        rollout.rollout(tmp_path / "q.jsonl", tmp_path / "t.jsonl", n=1, columns={"prompt": "question", "answer": "solution"})


def test_pool_metadata_survives_jsonl(tmp_path):
    t = tasks.make_pool(["chain_sum:difficulty=0"], 2, 0)
    schema.write_table(t, tmp_path / "p.jsonl")
    assert schema.read_table(tmp_path / "p.jsonl").column("metadata").to_pylist() == t.column("metadata").to_pylist()


def test_run_config_data_columns_read_the_users_pool(tmp_path, monkeypatch):
    """`cropi run` with data.pool_source naming the user's file and data.columns mapping its names."""
    from cropi import config
    from pipelines import cropi_loop

    monkeypatch.setattr(cropi_loop, "rollout", lambda prompts, out, **kw: out.touch())
    _jsonl(tmp_path / "mine.jsonl", ROWS)
    raw = {"data": {"pool_source": str(tmp_path / "mine.jsonl"),
                    "columns": {"prompt": "question", "answer": "solution", "id": "uid"},
                    "target_per_spec": 2, "heldout_per_spec": 2}, "train": {"stages": 1}}
    cfg = config.resolve(raw, config.run_layout(), "test")
    out = cropi_loop.prepare_data(cfg, tmp_path / "root")
    pool = schema.read_table(out["pool"], "prompts")
    assert pool.column("id").to_pylist() == ["q0", "q1", "q2"] and pool.column("answer").to_pylist() == ["0", "2", "4"]


def test_score_reads_mapped_columns_like_cropi_names(tmp_path):
    """`cropi score --prompt-column/--answer-column` on a renamed copy of the public-format pool
    gives the same scores as the original file."""
    from click.testing import CliRunner

    from cropi.cli import main

    root = Path(__file__).resolve().parents[1] / "data"
    rows = [json.loads(line) for line in (root / "cropi_rollouts.jsonl").read_text().splitlines() if line.strip()]
    renamed = [{("question" if k == "prompt" else "solution" if k == "answer" else k): v for k, v in r.items()}
               for r in rows]
    _jsonl(tmp_path / "mine.jsonl", renamed)
    common = ["score", "--target", str(root / "target.traj.parquet"), "--k", "64", "--shard-size", "16"]
    a = CliRunner().invoke(main, [*common, "--trajectories", str(root / "cropi_rollouts.jsonl"), "--out", str(tmp_path / "a")])
    b = CliRunner().invoke(main, [*common, "--trajectories", str(tmp_path / "mine.jsonl"), "--prompt-column", "question",
                                  "--answer-column", "solution", "--out", str(tmp_path / "b")])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    sa, sb = (schema.read_table(tmp_path / x / "scores.parquet") for x in "ab")
    assert sa.column("id").to_pylist() == sb.column("id").to_pylist()
    np.testing.assert_array_equal(sa.column("score").to_numpy(), sb.column("score").to_numpy())  # NaN: zero_signal
    c = CliRunner().invoke(main, [*common, "--trajectories", str(tmp_path / "mine.jsonl"), "--out", str(tmp_path / "c")])
    assert c.exit_code == 2 and "--prompt-column" in c.output
