"""`cropi check`: recognise and validate anything cropi writes, and summarise it.

| path                                            | kind           | what is checked                          |
|-------------------------------------------------|----------------|------------------------------------------|
| prompts / trajectories / scores file or folder  | prompts ...    | `schema.validate` (Parquet, JSONL, datasets); with --model, `score.prepare` |
| `cropi score` output (scores.parquet, meta.json)| score-folder   | scores table, its features store and every target store |
| features store (meta.json, shard-NNNNN.*)       | features       | every shard: rows match its index, k columns |
| curriculum (stage-NNN/ folders)                 | curriculum     | every stage                              |
| one stage (train.parquet, manifest.json)        | stage          | prompts table, manifest, row count       |
| `cropi train` run (config.yaml, metrics.jsonl)  | run            | config, every metrics row, checkpoints   |
| checkpoint / model folder (config.json)         | model          | weights and tokenizer files present      |
| `cropi run` output (runs.json, METHOD-sSEED/)   | pipeline       | every method's run                       |
| `cropi export` Parquet (verl, trl)              | export-verl... | the columns that trainer reads           |
| `cropi eval --out` JSON                         | eval           | every set's accuracy in [0, 1]           |
| any other JSON (meta, manifest, comparison)     | json           | strict JSON: no NaN or Infinity          |

Every check raises `schema.InputError` (one line naming file, row and field) on the first problem.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cropi import schema


def check(path, kind: str | None = None, columns: dict | None = None, split: str | None = None,
          model: str | None = None) -> dict:
    """Validate the artefact at ``path`` and return its summary ({"kind": ..., ...}).

    ``kind`` forces a table kind (prompts, trajectories, scores); otherwise it is detected.
    ``columns`` and ``split`` say how a user's table is read (`schema.read_table`). Trajectories
    are also checked as `cropi score` reads them with ``model`` (token ids in its vocabulary and
    decoding to the responses, prompt+response within its context); without a model the summary
    says these were not checked."""
    path = Path(path)
    columns = schema.check_columns(columns)
    if not path.exists() and not schema.looks_like_dataset_name(path):
        raise schema.InputError(path, None, None, "no such file or folder")
    if kind is not None or columns or split is not None or not path.exists() \
            or path.is_file() and not _special_file(path) or _is_dataset(path):
        table = schema.read_table(path, kind, columns=columns, split=split)
        kind = kind or schema.detect_kind(table)
        summary = schema.summarize(table, kind)
        if kind == "trajectories":
            summary["model_checks"] = _model_checks(table, path, model)
        elif model is not None:
            raise schema.InputError("--model", None, None, f"checks trajectories only; {path} holds {kind}")
        return summary
    if model is not None:
        raise schema.InputError("--model", None, None, f"checks trajectories only; {path} is not a trajectories table")
    if path.is_file():
        return _special_file(path)(path)
    for test, fn in _FOLDERS:
        if test(path):
            return fn(path)
    raise schema.InputError(path, None, None, "a folder cropi did not write (expected a score folder, features "
                            "store, curriculum, stage, run, checkpoint, `cropi run` output or datasets folder)")


def _model_checks(table, path: Path, model: str | None) -> str:
    """Run the checks of a trajectories table that need a model (`score.prepare`, which calls
    `schema.check_token_ids` and `schema.check_context`); say which ran."""
    if model is None:
        return "not run: token ids and lengths were not checked against a tokenizer (give --model)"
    from cropi import models
    from cropi.score import prepare

    prepare(models.load(model), table, path)
    if "response_token_ids" in table.column_names:
        return f"token ids inside {model}'s vocabulary and decoding to the responses; prompt+response within its context"
    return f"prompt+response within {model}'s context (no stored token ids: score tokenises the responses)"


def _is_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists())


# ---------------------------------------------------------------------------- files


def _special_file(path: Path):
    """The checker of a non-table file cropi writes (export Parquet, eval JSON), or None."""
    if path.suffix in (".parquet", ".pq"):
        try:
            fmt = schema.read_cropi_meta(path).get("format")
        except Exception:  # not Parquet: the table reader gives the one-line reason
            return None
        return _export if fmt in ("verl", "trl") else None
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(obj, dict) or "prompt" in obj:  # a one-line JSONL table
            return None
        return _eval_report if "sets" in obj else _json_file
    return None


def _json_file(path: Path) -> dict:
    """Any other JSON cropi writes (meta.json, manifest.json, comparison.json, runs.json): strict
    JSON, so NaN and Infinity, which Python writes by default and other readers refuse, fail."""
    def refuse(name):
        raise schema.InputError(path, None, None, f"{name} is not JSON (write null for a missing number)")

    obj = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)
    return {"kind": "json", "keys": sorted(obj)[:20]}


def _export(path: Path) -> dict:
    import pyarrow as pa

    from cropi.export import MESSAGE, TRL_COLUMNS, VERL_SCHEMA

    fmt = schema.read_cropi_meta(path)["format"]
    table = pq.read_table(path)
    if fmt == "verl":
        want = {f.name: (f.type,) for f in VERL_SCHEMA}
    else:  # TRL: the prompt is plain text, or chat messages when the model has a chat template
        want = {name: () for name in TRL_COLUMNS}
        want["prompt"] = (pa.string(), pa.list_(MESSAGE))
    for name, types in want.items():
        if name not in table.column_names:
            raise schema.InputError(path, None, name, f"missing column (a {fmt} export needs {list(want)})")
        got = table.schema.field(name).type
        if types and got not in types:
            raise schema.InputError(path, None, name, f"wrong type: expected {' or '.join(map(str, types))}, got {got}")
    manifest = schema.read_cropi_meta(path).get("manifest", {})
    return {"kind": f"export-{fmt}", "rows": table.num_rows, "stage": manifest.get("stage"),
            "selector": manifest.get("selector")}


def _eval_report(path: Path) -> dict:
    report = json.loads(path.read_text(encoding="utf-8"))
    acc = {}
    for name, res in report["sets"].items():
        a = res.get("accuracy") if isinstance(res, dict) else None
        if not isinstance(a, int | float) or not 0 <= a <= 1:
            raise schema.InputError(path, None, f"sets.{name}.accuracy", f"must be a number in [0, 1], got {a!r}")
        acc[name] = a
    return {"kind": "eval", "model": report.get("checkpoint") or report.get("model"), "accuracy": acc}


# ---------------------------------------------------------------------------- folders


def _json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise schema.InputError(path, None, None, "no such file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise schema.InputError(path, None, None, f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise schema.InputError(path, None, None, "must hold a JSON object")
    return obj


def features(path: Path) -> dict:
    """A features store: meta.json, every shard's .npy rows == its index rows, k columns."""
    path = Path(path)
    meta = _json(path / "meta.json")
    k = meta.get("projector", {}).get("k")
    shards = sorted(path.glob("shard-*.npy"))
    if not shards:
        raise schema.InputError(path, None, None, "a features store without shards")
    rows, status = 0, {}
    for npy in shards:
        idx = npy.with_suffix(".parquet")
        if not idx.exists():
            raise schema.InputError(idx, None, None, "no such file (an unfinished shard: resume the score run)")
        feats = np.load(npy, mmap_mode="r")
        index = pq.read_table(idx)
        if feats.ndim != 2 or feats.shape[0] != index.num_rows:
            raise schema.InputError(npy, None, None, f"shape {feats.shape} does not match the {index.num_rows} index rows")
        if k is not None and feats.shape[1] != k:
            raise schema.InputError(npy, None, None, f"{feats.shape[1]} columns, meta.json says k = {k}")
        for s in index.column("status").to_pylist():
            if s not in schema.STATUSES:
                raise schema.InputError(idx, None, "status", f"must be one of {schema.STATUSES}, got {s!r}")
            status[s] = status.get(s, 0) + 1
        rows += index.num_rows
    if "count" in meta and meta["count"] != rows:
        raise schema.InputError(path / "meta.json", None, "count", f"{meta['count']}, but the shards hold {rows} rows")
    proj = meta.get("projector", {})
    return {"kind": "features", "rows": rows, "shards": len(shards), "status": status,
            "projector": proj.get("kind"), "k": proj.get("k"), "model": meta.get("checkpoint") or meta.get("model")}


def score_folder(path: Path) -> dict:
    """A `cropi score` output: scores.parquet, meta.json, features/ and targets/<name>/."""
    meta = _json(path / "meta.json")
    scores = schema.read_table(path / "scores.parquet", "scores")
    out = {**schema.summarize(scores, "scores"), "kind": "score-folder"}
    feats = features(path / "features")
    if feats["rows"] != scores.num_rows:
        raise schema.InputError(path / "features", None, None, f"{feats['rows']} feature rows for {scores.num_rows} scores")
    for name in out["targets"]:
        features(path / "targets" / name)
    out.update(projector=feats["projector"], k=feats["k"], model=meta.get("checkpoint") or meta.get("model"),
               seed=meta.get("seed"))
    if "check_rank" in meta:
        out["check_rank"] = {k: meta["check_rank"][k] for k in ("n", "precision", "spearman")}
    return out


def stage(path: Path) -> dict:
    """One curriculum stage: train.parquet (prompt columns) and manifest.json agree."""
    manifest = _json(path / "manifest.json")
    table = schema.read_table(path / "train.parquet", "prompts")
    if "selected" in manifest and manifest["selected"] != table.num_rows:
        raise schema.InputError(path / "manifest.json", None, "selected",
                                f"{manifest['selected']}, but train.parquet holds {table.num_rows} rows")
    return {"kind": "stage", "stage": manifest.get("stage"), "selector": manifest.get("selector"),
            "rows": table.num_rows, "pool_size": manifest.get("pool_size"),
            "tasks": schema.summarize(table, "prompts")["tasks"]}


def curriculum(path: Path) -> dict:
    """A curriculum folder: every stage-NNN checks, stages numbered 0, 1, ... without gaps."""
    from cropi.curriculum import stage_dirs

    stages = stage_dirs(path)
    if sorted(stages) != list(range(len(stages))):
        missing = min(set(range(max(stages) + 1)) - set(stages))
        raise schema.InputError(path, None, "stage", f"stage {missing} is missing (stages here: {sorted(stages)})")
    rows = {s: stage(d) for s, d in stages.items()}
    return {"kind": "curriculum", "stages": len(stages),
            "sizes": {s: r["rows"] for s, r in rows.items()}, "selectors": {s: r["selector"] for s, r in rows.items()}}


def model(path: Path) -> dict:
    """A model folder (a checkpoint, `cropi warmup`'s output): config, weights and tokenizer present."""
    cfg = _json(path / "config.json")
    if not (list(path.glob("*.safetensors")) or list(path.glob("*.bin"))):
        raise schema.InputError(path, None, None, "no weights (*.safetensors) in this model folder")
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise schema.InputError(path, None, None, "no tokenizer files in this model folder")
    out = {"kind": "model", "architecture": (cfg.get("architectures") or ["?"])[0]}
    if (path / "cropi.json").exists():
        info = _json(path / "cropi.json")
        out.update({k: info[k] for k in ("step", "stage", "seed", "trained_from") if k in info})
    out["trainer_state"] = (path / "trainer_state.pt").exists()
    return out


def run(path: Path) -> dict:
    """A `cropi train` run: config.yaml parses, metrics.jsonl rows are JSON with event and step,
    and every checkpoints/step-N is a complete model folder."""
    import yaml

    try:
        cfg = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise schema.InputError(path / "config.yaml", None, None, f"not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict) or "train" not in cfg:
        raise schema.InputError(path / "config.yaml", None, "train", "missing (not a run's config.yaml)")
    steps, evals, last = 0, 0, None
    metrics = path / "metrics.jsonl"
    if metrics.exists():
        for i, line in enumerate(metrics.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise schema.InputError(metrics, i, None, f"invalid JSON ({e})") from None
            if not isinstance(row, dict) or row.get("event") not in ("train", "eval") or not isinstance(row.get("step"), int):
                raise schema.InputError(metrics, i, "event", "each row needs event (train | eval) and an integer step")
            bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad and row["event"] == "train" and bad[0] in ("loss", "reward_mean"):
                raise schema.InputError(metrics, i, bad[0], "not finite")
            steps += row["event"] == "train"
            evals += row["event"] == "eval"
            if row["event"] == "eval":
                last = row
    ckpts = sorted(path.glob("checkpoints/step-*"), key=lambda p: int(p.name.split("-")[1]))
    for c in ckpts:
        model(c)
    train = cfg.get("train") or {}
    return {"kind": "run", "curriculum": cfg.get("curriculum"), "model": cfg.get("model"),
            "steps_logged": steps, "eval_rows": evals,
            "planned_steps": (train.get("stages") or 0) * (train.get("steps_per_stage") or 0) or None,
            "checkpoints": [c.name for c in ckpts], "last_eval": last and last.get("target")}


def pipeline(path: Path) -> dict:
    """A `cropi run` output: config.yaml, data/ and METHOD-sSEED/run folders."""
    runs = {}
    for d in sorted(p for p in path.iterdir() if p.is_dir() and (p / "run").is_dir()):
        runs[d.name] = {"done": (d / "done.json").exists(), "steps": run(d / "run")["steps_logged"]}
    if not runs:
        raise schema.InputError(path, None, None, "no METHOD-sSEED/run folders here")
    return {"kind": "pipeline", "runs": runs, "comparison": (path / "comparison.json").exists()}


_FOLDERS = [
    (lambda p: (p / "scores.parquet").exists(), score_folder),
    (lambda p: (p / "meta.json").exists() and any(p.glob("shard-*.npy")), features),
    (lambda p: (p / "train.parquet").exists() and (p / "manifest.json").exists(), stage),
    (lambda p: any(p.glob("stage-[0-9]*")), curriculum),
    (lambda p: (p / "config.yaml").exists() and ((p / "metrics.jsonl").exists() or (p / "checkpoints").is_dir()), run),
    (lambda p: (p / "config.yaml").exists() and (p / "data").is_dir(), pipeline),
    (lambda p: (p / "config.json").exists(), model),
]
