"""Every on-disk format of cropi, and its validation, in one place (docs/design.md).

Formats
- prompts:      id, prompt, answer, task, difficulty, split (+ optional metadata JSON str)
- trajectories: prompt columns + responses, rewards, [response_token_ids], [behavior_logprobs], behavior
- scores:       id, score, score__<target>..., rank, pass_rate, status
- features index: id, grad_norm, n_tokens, status, reason

Readers accept Parquet, JSONL (cropi rows or the public CROPI rollout lines
``{prompt, answer, responses, rewards}``), ``datasets`` folders (``save_to_disk``) and names in
the local HF cache, and verl RL Parquet; users' column names are mapped (:func:`read_table`). Bad input raises :class:`InputError`, one line naming file, row and field.
Writers go through a temporary name and an atomic rename.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PASS_THRESHOLD = 0.5  # a response "passes" when its reward is at least this
STATUSES = ("ok", "zero_signal", "skipped")

PROMPT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("answer", pa.string()),
        ("task", pa.string()),
        ("difficulty", pa.int32()),
        ("split", pa.string()),
    ]
)
PROMPT_COLUMNS = tuple(PROMPT_SCHEMA.names)
OPTIONAL_PROMPT_FIELDS = (pa.field("metadata", pa.string()),)  # reasoning-gym entry metadata (JSON)

TRAJECTORY_FIELDS = (
    pa.field("responses", pa.list_(pa.string())),
    pa.field("rewards", pa.list_(pa.float32())),
    pa.field("behavior", pa.string()),
)
OPTIONAL_TRAJECTORY_FIELDS = (
    pa.field("response_token_ids", pa.list_(pa.list_(pa.int32()))),
    pa.field("behavior_logprobs", pa.list_(pa.list_(pa.float32()))),
)
TRAJECTORY_SCHEMA = pa.schema(
    list(PROMPT_SCHEMA) + list(OPTIONAL_PROMPT_FIELDS) + list(TRAJECTORY_FIELDS) + list(OPTIONAL_TRAJECTORY_FIELDS)
)

SCORES_FIELDS = (
    pa.field("id", pa.string()),
    pa.field("score", pa.float64()),
    pa.field("rank", pa.int64()),
    pa.field("pass_rate", pa.float64()),
    pa.field("status", pa.string()),
)
SCORE_PREFIX = "score__"


def target_names(paths) -> list[str]:
    """One name per target set: its file name up to the first dot, made unique with 2, 3, ...
    (``val.traj.parquet`` -> ``val``). Scores are ``SCORE_PREFIX + name`` and `cropi eval` reports
    the same names."""
    names = []
    for p in paths:
        base = Path(p).name.split(".")[0] or "target"
        name, j = base, 2
        while name in names:
            name, j = f"{base}{j}", j + 1
        names.append(name)
    return names


FEATURE_INDEX_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("grad_norm", pa.float64()),
        ("n_tokens", pa.int64()),
        ("status", pa.string()),
        ("reason", pa.string()),
    ]
)

KINDS = ("prompts", "trajectories", "scores")


class InputError(ValueError):
    """Bad user input. ``str(err)`` is one line: ``FILE: row R: field F: message``."""

    def __init__(self, path, row=None, field=None, message=""):
        self.path, self.row, self.field, self.message = str(path), row, field, message
        parts = [self.path]
        if row is not None:
            parts.append(f"row {row}")
        if field is not None:
            parts.append(f"field {field}")
        super().__init__(": ".join(parts + [message]).replace("\n", " "))


# ---------------------------------------------------------------------------- reading


def stable_id(prompt: str, answer: str) -> str:
    """Id for rows that come without one: 16 hex chars of sha1(prompt \\0 answer)."""
    return hashlib.sha1(f"{prompt}\0{answer}".encode()).hexdigest()[:16]


def _leaf_type(t: pa.DataType) -> pa.DataType:
    """The element type under any list nesting: list<list<int32>> -> int32."""
    while pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return t


def _has_integers(t: pa.DataType) -> bool:
    return pa.types.is_integer(_leaf_type(t))


def _has_bool(v) -> bool:
    """Whether a JSON value holds true/false at any depth (Arrow would read them as 1/0)."""
    return isinstance(v, bool) or (isinstance(v, list) and any(_has_bool(x) for x in v))


def _rows_to_table(rows: list[dict], path, columns: dict | None = None) -> pa.Table:
    """JSONL rows (cropi or public-CROPI style) -> Arrow table with cropi column names
    (``columns`` renames the user's keys first, see :func:`read_table`)."""
    rename = {src: dst for dst, src in (columns or {}).items()}
    if rename:
        def mapped(k, v):  # a mapped integer answer or id becomes its decimal string, as in map_columns
            return str(v) if rename.get(k) in ("answer", "id") and isinstance(v, int) and not isinstance(v, bool) else v

        rows = [{rename.get(k, k): mapped(k, v) for k, v in row.items() if k not in columns or k in rename} for row in rows]
    for i, row in enumerate(rows):
        for name in ("prompt", "answer"):
            if name not in row:
                raise InputError(path, i, name, "missing column" + _mapping_hint(name))
        row.setdefault("id", stable_id(str(row["prompt"]), str(row["answer"])))
        if "responses" in row:
            row.setdefault("behavior", "unknown")
        row.setdefault("task", "unknown")
        row.setdefault("difficulty", 0)
        row.setdefault("split", "train")
    names = list(dict.fromkeys(k for row in rows for k in row))
    known = {f.name: f.type for f in TRAJECTORY_SCHEMA}
    cols = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            if name in known and not pa.types.is_boolean(_leaf_type(known[name])):
                i = next((i for i, v in enumerate(values) if _has_bool(v)), None)
                if i is not None:
                    raise InputError(path, i, name, f"wrong type: expected {known[name]}, got {values[i]!r:.40} "
                                                    "(true/false are not read as numbers)")
            cols[name] = pa.array(values, type=known.get(name))
            if _has_integers(cols[name].type) and (back := cols[name].to_pylist()) != values:
                i = next(i for i, (a, b) in enumerate(zip(back, values)) if a != b)
                raise InputError(path, i, name, f"wrong type: expected {cols[name].type}, got {values[i]!r:.40} (not whole numbers)")
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            for i, v in enumerate(values):
                try:
                    pa.array([v], type=known.get(name))
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                    want = known.get(name, "the type of the other rows")
                    raise InputError(path, i, name, f"wrong type: expected {want}, got {type(v).__name__} {v!r:.40}") from None
            raise InputError(path, None, name, "inconsistent types across rows") from None
    return pa.table(cols)


def _read_jsonl(path: Path, gz: bool) -> list[dict]:
    """The JSON objects of a JSON-lines file (gzip-compressed when ``gz``); rows are numbered by
    line from 0, blank lines skipped. Bad bytes, bad JSON and broken gzip raise InputError."""
    import gzip
    import zlib

    rows = []
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            for i, raw in enumerate(f):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(path, i, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(path, i, None, f"invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise InputError(path, i, None, "a JSON line must be an object")
                rows.append(obj)
    except gzip.BadGzipFile as e:
        raise InputError(path, None, None, f"not a gzip file ({e})") from None
    except (EOFError, zlib.error) as e:
        raise InputError(path, None, None, f"truncated or corrupt gzip data, after {len(rows)} rows ({e})") from None
    return rows


def _read_raw(path: Path, columns: dict | None = None) -> pa.Table:
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix in (".parquet", ".pq"):
        try:
            return pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(path, None, None, f"not a readable Parquet file ({e})") from None
    if suffix in (".jsonl", ".json", ".jsonl.gz"):
        rows = _read_jsonl(path, gz=suffix.endswith(".gz"))
        if not rows:
            raise InputError(path, None, None, "no rows")
        return _rows_to_table(rows, path, columns)
    raise InputError(path, None, None, f"unknown format {suffix!r} (expected .parquet, .jsonl or a datasets folder)")


def detect_kind(table: pa.Table) -> str:
    names = set(table.column_names)
    if "responses" in names or "rewards" in names:
        return "trajectories"
    if "score" in names and "rank" in names:
        return "scores"
    return "prompts"


COLUMN_KEYS = ("prompt", "answer", "id")  # what --prompt-column etc. / data.columns map
_COLUMN_OPTIONS = {k: f"--{k}-column" for k in COLUMN_KEYS}


def _mapping_hint(name: str) -> str:
    return f" (name yours with {_COLUMN_OPTIONS[name]})" if name in _COLUMN_OPTIONS else ""


def check_columns(columns: dict | None) -> dict:
    """``columns`` ({cropi name: the user's column}) without unset entries; ValueError on keys
    other than COLUMN_KEYS or non-string names."""
    out = {k: v for k, v in (columns or {}).items() if v is not None}
    for k, v in out.items():
        if k not in COLUMN_KEYS:
            raise InputError("columns", None, k, f"cannot be mapped (mappable: {', '.join(COLUMN_KEYS)})")
        if not isinstance(v, str) or not v:
            raise InputError("columns", None, k, f"column name must be a non-empty string, got {v!r}")
    return out


def map_columns(table: pa.Table, columns: dict | None, path) -> pa.Table:
    """Rename the user's columns to cropi's: ``columns`` = {"prompt": "question", ...}. A cropi
    column of the same name that was not mapped is dropped; a mapped answer or id is made a
    string. Missing source column -> InputError naming the option."""
    columns = check_columns(columns)
    names = table.column_names
    for dst, src in columns.items():
        if src not in names:
            raise InputError(path, None, src, f"no such column for {_COLUMN_OPTIONS[dst]} (columns: {', '.join(names)})")
    sources = set(columns.values())
    keep = [n for n in names if n in sources or n not in columns]
    table = table.select(keep)
    rename = {src: dst for dst, src in columns.items()}
    table = table.rename_columns([rename.get(n, n) for n in table.column_names])
    for name in ("answer", "id"):
        if name in columns and pa.types.is_integer(table.schema.field(name).type):
            i = table.schema.get_field_index(name)
            table = table.set_column(i, name, table.column(name).cast(pa.string()))
    return table


def fill_defaults(table: pa.Table, path) -> pa.Table:
    """Add the columns a user's table may lack, as JSONL rows get them: id (:func:`stable_id`),
    task "unknown", difficulty 0, split "train", and behavior "unknown" for trajectories."""
    names = set(table.column_names)
    for name in ("prompt", "answer"):
        if name not in names:
            raise InputError(path, None, name, "missing column" + _mapping_hint(name))
    n = table.num_rows
    if "id" not in names:
        ids = [stable_id(str(p), str(a)) for p, a in zip(table.column("prompt").to_pylist(), table.column("answer").to_pylist())]
        table = table.append_column("id", pa.array(ids, pa.string()))
    defaults = {"task": ("unknown", pa.string()), "difficulty": (0, pa.int32()), "split": ("train", pa.string())}
    if "responses" in names:
        defaults["behavior"] = ("unknown", pa.string())
    for name, (value, typ) in defaults.items():
        if name not in names:
            table = table.append_column(name, pa.array([value] * n, typ))
    return table


def is_verl(table: pa.Table) -> bool:
    """A verl RL dataset: chat-message ``prompt`` and a ``reward_model`` struct."""
    names = table.column_names
    return "reward_model" in names and "prompt" in names and pa.types.is_list(table.schema.field("prompt").type)


def from_verl(table: pa.Table) -> pa.Table:
    """verl RL Parquet rows -> prompt rows: prompt = the messages' contents (system, then user,
    joined by a blank line), answer = ``reward_model.ground_truth``, task = ``data_source``;
    id, difficulty, split and metadata from ``extra_info`` when it has them."""
    cols: dict[str, list] = {k: [] for k in ("id", "prompt", "answer", "task", "difficulty", "split", "metadata")}
    for row in table.select([c for c in ("prompt", "reward_model", "data_source", "extra_info") if c in table.column_names]).to_pylist():
        messages = row["prompt"] or []
        prompt = "\n\n".join(str(m.get("content", "")) for m in messages if m.get("role") in ("system", "user"))
        rm = row.get("reward_model") or {}
        gt = rm.get("ground_truth")
        extra = row.get("extra_info") or {}
        answer = gt if isinstance(gt, str) or gt is None else json.dumps(gt)
        cols["prompt"].append(prompt)
        cols["answer"].append(answer)
        cols["task"].append(row.get("data_source") or "unknown")
        cols["id"].append(str(extra["id"]) if extra.get("id") is not None else stable_id(prompt, str(answer)))
        cols["difficulty"].append(int(extra.get("difficulty") or 0))
        cols["split"].append(str(extra.get("split") or "train"))
        meta = extra.get("metadata")
        cols["metadata"].append(meta if isinstance(meta, str) or meta is None else json.dumps(meta, sort_keys=True))
    if all(m is None for m in cols["metadata"]):
        del cols["metadata"]
    return pa.table(cols)


def _datasets_table(ds, path, split: str | None) -> pa.Table:
    """Arrow table of a ``datasets`` Dataset, or of ``split`` of a DatasetDict."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise InputError(path, None, None, f"a DatasetDict with splits {list(ds)}: choose one with --split")
            split = next(iter(ds))
        if split not in ds:
            raise InputError(path, None, None, f"no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    elif split is not None and getattr(ds, "split", None) not in (None, split):
        raise InputError(path, None, None, f"--split {split}: this dataset holds split {ds.split}")
    return ds.with_format("arrow")[:]


def _read_datasets(path, split: str | None) -> pa.Table:
    """A ``save_to_disk`` folder (Dataset or DatasetDict), or a dataset name in the local HF cache
    (offline: nothing is downloaded)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    if Path(path).is_dir():
        p = Path(path)
        if not any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            raise InputError(path, None, None, "a directory that is not a saved `datasets` dataset")
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds for a broken folder
            raise InputError(path, None, None, "not a readable saved `datasets` dataset "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        return _datasets_table(ds, path, split)
    try:
        ds = datasets.load_dataset(str(path), split=split)
    except ValueError as e:  # unknown split
        raise InputError(path, None, None, str(e).splitlines()[0]) from None
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds for "not there"
        raise InputError(path, None, None, "no such file, and no dataset of that name in the local HF cache "
                         f"({type(e).__name__}; cropi reads the cache offline)") from None
    return _datasets_table(ds, path, split)


def looks_like_dataset_name(path) -> bool:
    s = str(path)
    return s.count("/") <= 1 and not s.startswith((".", "/")) and Path(s).suffix == "" and bool(s.strip())


def read_table(path, kind: str | None = None, *, columns: dict | None = None, split: str | None = None) -> pa.Table:
    """Read and validate a prompts / trajectories / scores table from any supported format.

    Sources: Parquet, JSONL (cropi rows or the public CROPI rollout lines), a ``datasets``
    ``save_to_disk`` folder (a DatasetDict needs ``split`` unless it has one split), a dataset
    name in the local HF cache (``user/name``, read offline), and verl RL Parquet (chat
    ``prompt``, ``reward_model.ground_truth``, ``data_source``). ``columns`` maps cropi's
    names to the user's: {"prompt": "question", "answer": "solution", "id": "uid"}. Missing
    id/task/difficulty/split (and behavior) are filled the same way for every source.
    Columns are cast to the canonical Arrow types; extra columns are kept.
    """
    path = Path(path)
    columns = check_columns(columns)
    if path.is_dir() or (not path.exists() and looks_like_dataset_name(path)):
        table = _read_datasets(path, split)
    elif not path.exists():
        raise InputError(path, None, None, "no such file")
    else:
        if split is not None:
            raise InputError(path, None, None, "--split applies to datasets folders and names only")
        table = _read_raw(path, columns)
    if table.num_rows == 0:
        raise InputError(path, None, None, "no rows")
    if is_verl(table) and "prompt" not in columns:
        table = from_verl(table)
    kind = kind or detect_kind(table)
    if kind != "scores":
        jsonl = path.is_file() and path.name.lower().endswith((".jsonl", ".json", ".jsonl.gz"))  # mapped row by row
        table = fill_defaults(table if jsonl else map_columns(table, columns, path), path)
    return validate(table, kind, path)


def output_format(path, allowed=("parquet", "jsonl", "jsonl.gz")) -> str:
    """The format an output file's name asks for ("parquet", "jsonl" or "jsonl.gz"); InputError
    when the name has none of ``allowed``."""
    name = Path(path).name.lower()
    fmt = next((f for f in sorted(allowed, key=len, reverse=True) if name.endswith("." + f)), None)
    if fmt is None:
        raise InputError(path, None, None, f"output name must end in {' or '.join('.' + f for f in allowed)} "
                         "(the format follows the name)")
    return fmt


def write_table(table: pa.Table, path, metadata: dict | None = None) -> Path:
    """Write ``table`` in the format its name asks for (:func:`output_format`), atomically.
    Parquet carries ``metadata`` (:func:`write_parquet_atomic`); JSONL writes one object per
    row (NaN as null) and no metadata."""
    fmt = output_format(path)
    if fmt == "parquet":
        return write_parquet_atomic(table, path, metadata)
    import gzip

    with atomic_file(path) as tmp:
        opener = gzip.open if fmt == "jsonl.gz" else open
        with opener(tmp, "wt", encoding="utf-8") as f:
            for row in table.to_pylist():
                row = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
                f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
    return Path(path)


# ---------------------------------------------------------------------------- validation


def _row_label(ids, i: int) -> str:
    return f"{i} (id {ids[i]!r})" if ids is not None and ids[i] is not None else str(i)


def _cast_column(table: pa.Table, field: pa.Field, path) -> pa.Table:
    """Cast one column to its contract type; lossless number casts only (1.0 -> 1, never 1.5 -> 1),
    and text is never parsed into numbers ("3" is refused, not read as 3)."""
    col = table.column(field.name)
    if col.type == field.type:
        return table

    def first_bad_row():  # the first row that does not cast on its own, else the first non-null one
        values = col.to_pylist()
        for i, v in enumerate(values):
            try:
                pa.array([v], type=col.type).cast(field.type, safe=True)
            except Exception:
                return i
        return next((i for i, v in enumerate(values) if v is not None), None)

    is_text = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)  # noqa: E731
    if is_text(_leaf_type(col.type)) and not is_text(_leaf_type(field.type)):
        raise InputError(path, first_bad_row(), field.name, f"wrong type: expected {field.type}, got {col.type} (text is not read as numbers)")
    if pa.types.is_boolean(_leaf_type(col.type)) and not pa.types.is_boolean(_leaf_type(field.type)):
        raise InputError(path, first_bad_row(), field.name, f"wrong type: expected {field.type}, got {col.type} "
                         "(true/false are not read as numbers)")
    try:
        new = col.cast(field.type, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise InputError(path, first_bad_row(), field.name, f"wrong type: expected {field.type}, got {col.type} ({str(e).splitlines()[0]})") from None
    return table.set_column(table.schema.get_field_index(field.name), field.name, new)


def validate(table: pa.Table, kind: str, path="<table>") -> pa.Table:
    """Check ``table`` against the ``kind`` contract; return it with canonical column types.

    Raises InputError for: missing column, wrong type, null in a required field, duplicate id,
    responses/rewards length mismatch, empty response list, non-finite reward, token-id /
    behaviour-logprob length mismatches, bad status values.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown table kind {kind!r}")
    if kind == "scores":
        required = list(SCORES_FIELDS)
        optional = []
    else:
        required = list(PROMPT_SCHEMA)
        optional = list(OPTIONAL_PROMPT_FIELDS)
        if kind == "trajectories":
            required += list(TRAJECTORY_FIELDS)
            optional += list(OPTIONAL_TRAJECTORY_FIELDS)
    names = set(table.column_names)
    for f in required:
        if f.name not in names:
            raise InputError(path, None, f.name, f"missing column (a {kind} table needs {[x.name for x in required]})")
    for f in required + [f for f in optional if f.name in names]:
        table = _cast_column(table, f, path)
    if kind == "scores":
        for name in table.column_names:
            if name.startswith(SCORE_PREFIX):
                table = _cast_column(table, pa.field(name, pa.float64()), path)

    ids = table.column("id").to_pylist()
    for f in required:
        if f.name in ("score", "pass_rate"):  # NaN/null allowed for zero-signal rows
            continue
        col = table.column(f.name)
        if col.null_count:
            i = next(i for i, v in enumerate(col.to_pylist()) if v is None)
            raise InputError(path, _row_label(ids, i), f.name, "null value")
    seen: dict[str, int] = {}
    for i, x in enumerate(ids):
        if x in seen:
            raise InputError(path, _row_label(ids, i), "id", f"duplicate id (first at row {seen[x]})")
        seen[x] = i
    if kind == "scores":
        bad = [i for i, s in enumerate(table.column("status").to_pylist()) if s not in STATUSES]
        if bad:
            raise InputError(path, _row_label(ids, bad[0]), "status", f"must be one of {STATUSES}")
        return table
    if kind == "trajectories":
        _validate_trajectories(table, ids, path)
    return table


def _validate_trajectories(table: pa.Table, ids, path) -> None:
    responses = table.column("responses").to_pylist()
    rewards = table.column("rewards").to_pylist()
    tok = table.column("response_token_ids").to_pylist() if "response_token_ids" in table.column_names else None
    lp = table.column("behavior_logprobs").to_pylist() if "behavior_logprobs" in table.column_names else None
    if lp is not None and tok is None:
        raise InputError(path, None, "behavior_logprobs", "given without response_token_ids (the tokens they score)")
    for i, (resp, rew) in enumerate(zip(responses, rewards)):
        row = _row_label(ids, i)
        if not resp:
            raise InputError(path, row, "responses", "empty response list")
        if len(resp) != len(rew):
            raise InputError(path, row, "rewards", f"{len(rew)} rewards for {len(resp)} responses")
        for j, r in enumerate(rew):
            if r is None or not math.isfinite(r):
                raise InputError(path, row, "rewards", f"non-finite reward {r} at response {j}")
        if tok is not None:
            t = tok[i]
            if t is None or len(t) != len(resp):
                raise InputError(path, row, "response_token_ids", f"{0 if t is None else len(t)} token lists for {len(resp)} responses")
            for j, tj in enumerate(t):
                if not tj:  # rollout stores at least one token per response (EOS or the budget's first)
                    raise InputError(path, row, "response_token_ids", f"response {j}: {'null' if tj is None else 'empty'} token list")
                if min(tj) < 0:
                    raise InputError(path, row, "response_token_ids", f"response {j}: negative token id {min(tj)}")
            if lp is not None:
                lpi = lp[i]
                if lpi is None or len(lpi) != len(resp):
                    raise InputError(path, row, "behavior_logprobs", f"{0 if lpi is None else len(lpi)} logprob lists for {len(resp)} "
                                     "responses (the file gives behaviour log-probs, so every response needs them)")
                for j, (tj, lj) in enumerate(zip(t, lpi)):
                    if lj is None or len(tj) != len(lj):
                        raise InputError(path, row, "behavior_logprobs", f"response {j}: {0 if lj is None else len(lj)} logprobs "
                                         f"for {len(tj)} response tokens")
                    if any(v is None or not math.isfinite(v) or v > 1e-4 for v in lj):
                        raise InputError(path, row, "behavior_logprobs", f"response {j}: logprobs must be finite and ≤ 0")


def check_token_ids(table: pa.Table, path, tokenizer, responses: list[list[list[int]]]) -> None:
    """Stored ``response_token_ids`` against the tokenizer of the model that reads them: every id
    inside its vocabulary, and each response's ids decoding back to its text (whitespace at the
    ends aside). responses: [N][G][L] the stored ids. Raises InputError on the first problem."""
    ids = table.column("id").to_pylist()
    vocab = len(tokenizer)
    for i, r in enumerate(responses):
        bad = [t for resp in r for t in resp if not 0 <= t < vocab]
        if bad:
            raise InputError(path, _row_label(ids, i), "response_token_ids",
                             f"token id {bad[0]} outside this model's vocabulary ({vocab})")
    texts = iter(tokenizer.batch_decode([resp for r in responses for resp in r], skip_special_tokens=True))
    for i, r in enumerate(table.column("responses").to_pylist()):
        for j, want in enumerate(r):
            if next(texts).strip() != want.strip():
                raise InputError(path, _row_label(ids, i), "response_token_ids", f"response {j}: tokens do not decode to "
                                 "the response text with this model's tokenizer (trajectories from another tokenizer?)")


def check_context(table: pa.Table, path, prompt_ids: list[list[int]], responses: list[list[list[int]]],
                  context: int | None) -> None:
    """Every prompt+response within the model's ``context`` tokens (None: no limit known).
    prompt_ids: [N][L] as the model encodes them; responses: [N][G][L] the tokens it reads."""
    if not context:
        return
    ids = table.column("id").to_pylist()
    for i, (p, r) in enumerate(zip(prompt_ids, responses)):
        if len(p) + max(len(x) for x in r) > context:
            raise InputError(path, _row_label(ids, i), "responses",
                             f"prompt+response longer than the model context ({context} tokens)")


# ---------------------------------------------------------------------------- helpers on tables


def pass_rates(rewards: pa.ChunkedArray | Iterable) -> np.ndarray:
    """Per-prompt fraction of responses with reward ≥ PASS_THRESHOLD. [N] float64."""
    rows = rewards.to_pylist() if hasattr(rewards, "to_pylist") else list(rewards)
    return np.array([np.mean(np.asarray(r, dtype=np.float64) >= PASS_THRESHOLD) if len(r) else np.nan for r in rows])


def prompt_columns(table: pa.Table) -> pa.Table:
    """The prompt columns of a prompts/trajectories table (metadata kept when present)."""
    cols = list(PROMPT_COLUMNS) + [f.name for f in OPTIONAL_PROMPT_FIELDS if f.name in table.column_names]
    return table.select(cols)


def summarize(table: pa.Table, kind: str) -> dict:
    """Counts for `cropi check`: rows, tasks, difficulties, responses per prompt, pass rates."""
    out: dict = {"kind": kind, "rows": table.num_rows}
    if kind in ("prompts", "trajectories"):
        out["tasks"] = dict(sorted(_counts(table.column("task").to_pylist()).items()))
        out["difficulties"] = {int(k): v for k, v in sorted(_counts(table.column("difficulty").to_pylist()).items())}
    if kind == "trajectories":
        n_resp = [len(r) for r in table.column("responses").to_pylist()]
        out["responses_per_prompt"] = {int(k): v for k, v in sorted(_counts(n_resp).items())}
        pr = pass_rates(table.column("rewards"))
        out["pass_rate_mean"] = round(float(np.mean(pr)), 4)
        hist, edges = np.histogram(pr, bins=[0, 1e-9, 0.25, 0.5, 0.75, 1 - 1e-9, 1.0])
        labels = ["0", "(0,.25)", "[.25,.5)", "[.5,.75)", "[.75,1)", "1"]
        out["pass_rate_hist"] = dict(zip(labels, map(int, hist)))
        out["all_equal_rewards"] = int(sum(len(set(r)) <= 1 for r in table.column("rewards").to_pylist()))
        out["has_behavior_logprobs"] = "behavior_logprobs" in table.column_names
    if kind == "scores":
        out["status"] = dict(_counts(table.column("status").to_pylist()))
        out["targets"] = [c[len(SCORE_PREFIX):] for c in table.column_names if c.startswith(SCORE_PREFIX)]
    return out


def _counts(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


# ---------------------------------------------------------------------------- atomic writes


def _plain_mode(folder: bool) -> int:
    """The permission bits a plain open() (0o666) or mkdir() (0o777) gives under this process's
    umask; mkstemp/mkdtemp would give 0o600/0o700, unreadable to a teammate or another uid."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def temp_dir_beside(path) -> Path:
    """A new hidden folder ``.NAME.XXXX.tmp`` next to ``path``, with plain mkdir() permissions."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, _plain_mode(folder=True))
    return tmp


@contextmanager
def atomic_file(path):
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on error
    removed, so ``path`` is either the old file or the complete new one. The file gets the
    permissions a plain open() would give (the old file's mode when replacing one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.is_file() else _plain_mode(folder=False))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet_atomic(table: pa.Table, path, metadata: dict | None = None) -> Path:
    """Write ``table`` to ``path`` via a temporary file + rename. ``metadata`` goes into the
    Parquet key-value metadata under b"cropi" as JSON (read back with :func:`read_cropi_meta`).
    Written without timestamps, so equal tables give byte-identical files."""
    if metadata is not None:
        md = dict(table.schema.metadata or {})
        md[b"cropi"] = json.dumps(metadata, sort_keys=True).encode()
        table = table.replace_schema_metadata(md)
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


def read_cropi_meta(path) -> dict:
    """The b"cropi" JSON metadata a cropi writer put into a Parquet file ({} when absent)."""
    md = pq.read_schema(path).metadata or {}
    return json.loads(md[b"cropi"]) if b"cropi" in md else {}


@contextmanager
def atomic_dir(path):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (rename), on
    error it is removed, so ``path`` is either the old folder or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(path)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(obj, path) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_sha256(path) -> str:
    """sha256 of a file's bytes; for a folder (a saved `datasets` dataset), of its files'
    relative paths and sha256s in path order. Identifies an input by content, not by name."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def read_json(path) -> dict:
    """A JSON object file cropi wrote (meta.json, manifest.json); InputError when it is missing,
    not UTF-8 or not JSON (a pickle or a torn write, say)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise InputError(path, None, None, "no such file") from None
    except UnicodeDecodeError as e:
        raise InputError(path, None, None, f"not a JSON file: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InputError(path, None, None, f"not a JSON file ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict):
        raise InputError(path, None, None, "not a JSON object")
    return obj


def check_output(path, *, folder: bool) -> Path:
    """Raise InputError unless ``path`` can become an output file (``folder=False``) or folder,
    checked before any work: no folder where a file goes or file where a folder goes, and the
    nearest existing folder at or above it accepts new files (tried with a probe file that is
    removed at once). Creates nothing that stays."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise InputError(path, None, None, "is a folder; this output is a file")
    if path.exists() and not path.is_dir() and folder:
        raise InputError(path, None, None, "is a file; this output is a folder")
    where = path if folder and path.is_dir() else path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise InputError(where, None, None, f"is a file, so {path} cannot be created under it")
    try:
        fd, probe = tempfile.mkstemp(prefix=".cropi-write-check.", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(where, None, None, f"cannot create files in this folder ({e.strerror})") from None
    return path
