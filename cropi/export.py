"""Export a curriculum stage in the formats other RL trainers read.

- verl (Parquet): `data_source` ("cropi/<task>", what verl's reward dispatch keys on),
  `prompt` (chat messages: one user turn), `ability` (the task), `reward_model`
  {style: "rule", ground_truth: answer}, `extra_info` {index, id, task, difficulty}
  where index is the row's position in the stage.
- trl (Parquet, for `GRPOTrainer` via `datasets`): `prompt` (plain text), `answer`, and
  `id`, `task`, `difficulty`, which TRL passes to reward functions as keyword arguments.
- jsonl: every column of the stage's train.parquet, one JSON object per line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow as pa

from cropi.curriculum import read_stage
from cropi.schema import InputError, write_parquet_atomic

FORMATS = ("verl", "trl", "jsonl")

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
VERL_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(MESSAGE)),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        ("extra_info", pa.struct([("index", pa.int64()), ("id", pa.string()), ("task", pa.string()), ("difficulty", pa.int32())])),
    ]
)
TRL_SCHEMA = pa.schema(
    [("prompt", pa.string()), ("answer", pa.string()), ("id", pa.string()), ("task", pa.string()), ("difficulty", pa.int32())]
)


def to_verl(stage: pa.Table) -> pa.Table:
    """Stage rows (prompt columns) -> verl RL dataset rows. Same row order."""
    rows = stage.select(["id", "prompt", "answer", "task", "difficulty"]).to_pylist()
    return pa.Table.from_pylist(
        [
            {
                "data_source": f"cropi/{r['task']}",
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "ability": r["task"],
                "reward_model": {"style": "rule", "ground_truth": r["answer"]},
                "extra_info": {"index": i, "id": r["id"], "task": r["task"], "difficulty": r["difficulty"]},
            }
            for i, r in enumerate(rows)
        ],
        schema=VERL_SCHEMA,
    )


def to_trl(stage: pa.Table) -> pa.Table:
    """Stage rows (prompt columns) -> TRL prompt/answer rows. Same row order."""
    return stage.select(TRL_SCHEMA.names).cast(TRL_SCHEMA)


def _write_jsonl_atomic(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in table.to_pylist():
                # NaN is not JSON: an unscored row's score is written as null
                row = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
                f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_stage(curriculum_dir, stage: int, fmt: str, out) -> Path:
    """Write stage `stage` of `curriculum_dir` to the file `out` in format `fmt` (FORMATS).
    The manifest travels in the Parquet key-value metadata (verl, trl). Returns `out`."""
    if fmt not in FORMATS:
        raise InputError("--format", None, None, f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    table, manifest = read_stage(curriculum_dir, stage)
    out = Path(out)
    if fmt == "jsonl":
        return _write_jsonl_atomic(table, out)
    converted = to_verl(table) if fmt == "verl" else to_trl(table)
    return write_parquet_atomic(converted, out, metadata={"format": fmt, "manifest": manifest})
