"""Export a curriculum stage in the formats other RL trainers read.

- verl (Parquet, name ``*.parquet``): `data_source` ("cropi/<task>", what verl's reward dispatch
  keys on), `prompt` (chat messages: one user turn), `ability` (the task), `reward_model`
  {style: "rule", ground_truth: answer}, `extra_info` {index, id, task, difficulty, split,
  metadata} where index is the row's position in the stage and metadata the task scorer's JSON.
  Score it with ``cropi.integrations.verl.compute_score``.
- trl (Parquet, for `GRPOTrainer` via `datasets`): `prompt` (one user message when the model has
  a chat template, so TRL applies the template cropi rolled out and scored with; else plain
  text), `answer`, `id`, `task`, `difficulty`, `metadata`, which TRL passes to reward functions
  (``cropi.integrations.trl.reward``) as keyword arguments.
- jsonl (``*.jsonl`` / ``*.jsonl.gz``): every column of the stage's train.parquet, one JSON
  object per line.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from cropi.curriculum import read_stage
from cropi.schema import InputError, output_format, write_parquet_atomic, write_table

FORMATS = ("verl", "trl", "jsonl")

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
VERL_EXTRA = pa.struct([("index", pa.int64()), ("id", pa.string()), ("task", pa.string()), ("difficulty", pa.int32()),
                        ("split", pa.string()), ("metadata", pa.string())])
VERL_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(MESSAGE)),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        ("extra_info", VERL_EXTRA),
    ]
)
TRL_COLUMNS = ("prompt", "answer", "id", "task", "difficulty", "metadata")


def _metadata(stage: pa.Table) -> list:
    return stage.column("metadata").to_pylist() if "metadata" in stage.column_names else [None] * stage.num_rows


def to_verl(stage: pa.Table) -> pa.Table:
    """Stage rows (prompt columns) -> verl RL dataset rows. Same row order."""
    rows = stage.select(["id", "prompt", "answer", "task", "difficulty", "split"]).to_pylist()
    return pa.Table.from_pylist(
        [
            {
                "data_source": f"cropi/{r['task']}",
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "ability": r["task"],
                "reward_model": {"style": "rule", "ground_truth": r["answer"]},
                "extra_info": {"index": i, "id": r["id"], "task": r["task"], "difficulty": r["difficulty"],
                               "split": r["split"], "metadata": m},
            }
            for i, (r, m) in enumerate(zip(rows, _metadata(stage)))
        ],
        schema=VERL_SCHEMA,
    )


def to_trl(stage: pa.Table, chat: bool) -> pa.Table:
    """Stage rows (prompt columns) -> TRL rows; ``chat``: prompt as one user message. Same order."""
    cols = {
        "prompt": pa.array([[{"role": "user", "content": p}] for p in stage.column("prompt").to_pylist()], pa.list_(MESSAGE))
        if chat else stage.column("prompt"),
        "answer": stage.column("answer"),
        "id": stage.column("id"),
        "task": stage.column("task"),
        "difficulty": stage.column("difficulty").cast(pa.int32()),
        "metadata": pa.array(_metadata(stage), pa.string()),
    }
    return pa.table(cols)


def has_chat_template(model: str) -> bool:
    """Whether the tokenizer of ``model`` (a name `cropi.models.resolve` knows, or a folder) has a
    chat template, i.e. whether cropi's rollout and scoring wrapped prompts in it."""
    from cropi import models

    return bool(getattr(models.load_tokenizer(models.resolve(model)), "chat_template", None))


def export_table(table: pa.Table, fmt: str, out, *, chat: bool = False, metadata: dict | None = None) -> Path:
    """Write prompt rows ``table`` to the file ``out`` in format ``fmt`` (FORMATS); ``chat`` (trl):
    conversational prompts; ``metadata`` goes into the Parquet key-value metadata."""
    if fmt not in FORMATS:
        raise InputError("--format", None, None, f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    output_format(out, ("jsonl", "jsonl.gz") if fmt == "jsonl" else ("parquet",))  # verl reads *.parquet only
    out = Path(out)
    if fmt == "jsonl":
        return write_table(table, out)
    converted = to_verl(table) if fmt == "verl" else to_trl(table, chat)
    meta = {"format": fmt, **({"chat": chat} if fmt == "trl" else {}), **(metadata or {})}
    return write_parquet_atomic(converted, out, metadata=meta)


def export_prompts(prompts_path, fmt: str, out, *, chat: bool = False) -> Path:
    """Every prompt of a prompts/trajectories file in format ``fmt``: the dataset a trainer loads
    once when cropi's curriculum samplers pick each stage's rows from it."""
    from cropi.schema import file_sha256, prompt_columns, read_table

    table = prompt_columns(read_table(prompts_path))
    src = Path(prompts_path)
    return export_table(table, fmt, out, chat=chat, metadata={"prompts": str(src),
                        "prompts_sha256": file_sha256(src) if src.is_file() else None})


def export_stage(curriculum_dir, stage: int, fmt: str, out, *, chat: bool = False) -> Path:
    """Write stage `stage` of `curriculum_dir` to the file `out` in format `fmt` (FORMATS).
    ``chat`` (trl): conversational prompts. The manifest travels in the Parquet key-value metadata
    (verl, trl). Returns `out`."""
    if fmt not in FORMATS:
        raise InputError("--format", None, None, f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    output_format(out, ("jsonl", "jsonl.gz") if fmt == "jsonl" else ("parquet",))
    table, manifest = read_stage(curriculum_dir, stage)
    return export_table(table, fmt, out, chat=chat, metadata={"manifest": manifest})
