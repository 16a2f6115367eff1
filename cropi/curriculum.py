"""Curriculum shards: `curriculum/stage-NNN/{train.parquet, manifest.json}` (docs/design.md).

Stages are numbered from 0 (`stage-000`) and only ever appended. A stage directory is
built under a hidden temporary name inside the curriculum directory and renamed into
place, so a stage either exists whole or not at all.

train.parquet holds the prompt columns of the selected prompts (in selection order, best
first) plus `pass_rate` (offline pass rate) and, when the pool was scored, `score`.
manifest.json records what produced it: stage, selector and its parameters, ratio, pool
size, selected count, the checkpoint that produced the scores, the scores file's sha256,
seed and time.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cropi import select as sel
from cropi.schema import (
    InputError,
    content_sha256,
    file_sha256,
    pass_rates,
    prompt_columns,
    read_json,
    read_table,
    temp_dir_beside,
    write_json_atomic,
    write_parquet_atomic,
)

STAGE_RE = re.compile(r"^stage-(\d+)$")
SCORE_COLUMNS = ("score", "rank", "status")  # taken from scores.parquet (plus score__<target>)


def stage_dirs(curriculum_dir) -> dict[int, Path]:
    """{stage index: directory} of the finished stages in `curriculum_dir` (may not exist)."""
    root = Path(curriculum_dir)
    if not root.is_dir():
        return {}
    found = {}
    for p in root.iterdir():
        m = STAGE_RE.match(p.name)
        if m and p.is_dir():
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def next_stage_dir(curriculum_dir) -> Path:
    """Directory the next stage goes to: stage-000 in an empty/new dir, else last + 1."""
    stages = stage_dirs(curriculum_dir)
    return Path(curriculum_dir) / f"stage-{max(stages, default=-1) + 1:03d}"


def write_stage(curriculum_dir, rows: pa.Table, manifest: dict, stage: int | None = None) -> Path:
    """Append `rows` as the next stage (or as stage number `stage`, which must not exist yet),
    with `manifest` plus its "stage" index. Atomic: the stage is written to a hidden temporary
    directory and renamed. Returns the stage dir."""
    root = Path(curriculum_dir)
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(10):  # another writer may claim the same index between scan and rename
        final = next_stage_dir(root) if stage is None else root / f"stage-{stage:03d}"
        if stage is not None and final.exists():
            raise InputError(final, None, None, "exists already: stages are never rewritten")
        stage = int(STAGE_RE.match(final.name).group(1))
        full = {**manifest, "stage": stage}
        tmp = temp_dir_beside(final)
        try:
            write_parquet_atomic(rows, tmp / "train.parquet", metadata={"stage": stage, "selector": full.get("selector")})
            write_json_atomic(full, tmp / "manifest.json")
            os.rename(tmp, final)
            return final
        except OSError:
            if not final.exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise OSError(f"{root}: could not claim a stage directory (concurrent writers?)")


def read_stage(curriculum_dir, stage: int) -> tuple[pa.Table, dict]:
    """(train table, manifest) of stage number `stage`."""
    stages = stage_dirs(curriculum_dir)
    if stage not in stages:
        have = ", ".join(map(str, stages)) or "none"
        raise InputError(curriculum_dir, None, "stage", f"no stage {stage} (stages here: {have})")
    d = stages[stage]
    return read_table(d / "train.parquet", kind="prompts"), read_json(d / "manifest.json")


def _previous(curriculum_dir) -> tuple[set[str], set[str]]:
    ids: set[str] = set()
    texts: set[str] = set()
    for d in stage_dirs(curriculum_dir).values():
        t = read_table(d / "train.parquet", kind="prompts")
        ids.update(t.column("id").to_pylist())
        texts.update(t.column("prompt").to_pylist())
    return ids, texts


def previous_ids(curriculum_dir) -> set[str]:
    """Ids of every prompt chosen by an existing stage of `curriculum_dir`."""
    return _previous(curriculum_dir)[0]


def _chosen_before(pool: pa.Table, curriculum_dir) -> np.ndarray:
    """bool [N]: rows of `pool` whose id or prompt text an earlier stage already holds."""
    ids, texts = _previous(curriculum_dir)
    in_ids = pc.is_in(pool.column("id"), pa.array(sorted(ids), pa.string()))
    in_texts = pc.is_in(pool.column("prompt"), pa.array(sorted(texts), pa.string()))
    return pc.or_(in_ids, in_texts).to_numpy(zero_copy_only=False)


def load_pool(scores_dir=None, trajectories=None) -> tuple[pa.Table, dict]:
    """The pool to select from, and where it came from.

    With `scores_dir` (a `cropi score` output): scores.parquet joined by `id` to the
    trajectories it scored (`trajectories`, else meta.json's "trajectories", an absolute path,
    else a file of that name in or beside `scores_dir`), one row per scores row. The trajectories must have the content (sha256) the scores were made
    from, when meta.json records it. Without `scores_dir`: the trajectories file alone.
    `pass_rate` is (re)computed from `rewards`. Returns (table, provenance for the manifest).
    """
    prov: dict = {"scores_file": None, "scores_sha256": None, "model": None, "checkpoint": None, "scores_seed": None}
    scores = None
    if scores_dir is not None:
        sdir = Path(scores_dir)
        spath, mpath = sdir / "scores.parquet", sdir / "meta.json"
        for p in (spath, mpath):
            if not p.exists():
                raise InputError(p, None, None, "no such file (is this a `cropi score` output directory?)")
        meta = read_json(mpath)
        scores = read_table(spath, kind="scores")
        prov.update(
            scores_file=str(spath.resolve()),
            scores_sha256=file_sha256(spath),
            model=meta.get("model"),
            checkpoint=meta.get("checkpoint"),
            scores_seed=meta.get("seed"),
        )
        if trajectories is None:
            if not meta.get("trajectories"):
                raise InputError(mpath, None, "trajectories", "missing; pass --trajectories")
            recorded = Path(meta["trajectories"])
            # moved with the scores? same name next to them; the content hash below must still match
            near = [sdir / recorded.name, sdir.parent / recorded.name] if recorded.is_absolute() else [sdir / recorded]
            trajectories = next((p for p in [recorded, *near] if p.exists()), recorded)
    if trajectories is None:
        raise InputError("--trajectories", None, None, "give --trajectories T or --scores S/")
    tpath = Path(trajectories)
    traj = read_table(tpath, kind="trajectories")
    prov.update(trajectories_file=str(tpath.resolve()), trajectories_sha256=content_sha256(tpath))
    scored_sha = meta.get("trajectories_sha256") if scores is not None else None
    if scored_sha and scored_sha != prov["trajectories_sha256"]:
        raise InputError(tpath, None, None, f"is not the trajectories {sdir} scored (sha256 {prov['trajectories_sha256'][:12]}, "
                                            f"scored {scored_sha[:12]} = {meta.get('trajectories')})")
    if scores is not None:
        where = {x: i for i, x in enumerate(traj.column("id").to_pylist())}
        idx = []
        for r, x in enumerate(scores.column("id").to_pylist()):
            if x not in where:
                raise InputError(prov["scores_file"], r, "id", f"id {x!r} is not in the trajectories {tpath}")
            idx.append(where[x])
        extra = [c for c in scores.column_names if c in SCORE_COLUMNS or c.startswith("score__")]
        traj = traj.drop_columns([c for c in extra if c in traj.column_names]).take(np.asarray(idx, dtype=np.int64))
        for c in extra:
            traj = traj.append_column(c, scores.column(c))
    pr = pa.array(pass_rates(traj.column("rewards")), type=pa.float64())
    if "pass_rate" in traj.column_names:
        traj = traj.drop_columns(["pass_rate"])
    return traj.append_column("pass_rate", pr), prov


def _finite_mean(col) -> float | None:
    x = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
    x = x[np.isfinite(x)]
    return round(float(x.mean()), 6) if len(x) else None


def _value_counts(table: pa.Table, column: str) -> dict:
    """{value: count} of one column, most frequent first (ties by value)."""
    vc = pc.value_counts(table.column(column)).to_pylist()
    return {d["values"]: d["counts"] for d in sorted(vc, key=lambda d: (-d["counts"], str(d["values"])))}


def _no_selection(selector: str, candidates: pa.Table, n_excluded: int, source: str) -> InputError:
    if candidates.num_rows == 0:
        why = f"all {n_excluded} prompts were chosen in earlier stages" if n_excluded else "the pool is empty"
    elif selector == "popi" and "status" in candidates.column_names:
        why = f"no candidate has status ok and a finite score (status counts: {_value_counts(candidates, 'status')})"
    else:
        why = f"none of the {candidates.num_rows} candidates is eligible"
    return InputError(source, None, None, f"selector {selector} chose nothing: {why}")


def make_stage(
    *,
    scores_dir=None,
    trajectories=None,
    selector: str = "popi",
    ratio: float | None = None,
    n: int | None = None,
    seed: int = 0,
    out,
    exclude_previous: bool = False,
    stratify: str | None = None,
    checkpoint: str | None = None,
    stage: int | None = None,
    **params,
) -> Path:
    """Select the next stage from a scored (popi) or unscored pool and append it to `out`.

    popi needs `scores_dir`; the other selectors read `trajectories` (or the trajectories
    `scores_dir` points to, which also puts `score` into the stage). params: `kappa`
    (variance), `band` = (lo, hi) (pass-band). The stage size is `stage_size(distinct
    prompts in the pool, ratio, n)`; `exclude_previous` removes prompts (by id or text)
    chosen in earlier stages before selecting, without shrinking that size. `checkpoint`
    overrides the one named in the scores' meta.json. `stage` writes that stage number instead
    of the next one. Returns the new stage directory.
    Raises InputError (nothing written) on bad parameters, bad files or an empty selection.
    """
    unknown = set(params) - {"kappa", "band"}
    if unknown:
        raise TypeError(f"make_stage: unexpected parameters {sorted(unknown)}")
    kappa = float(params.get("kappa", 0.8))
    band = tuple(float(x) for x in params.get("band", (0.2, 0.8)))
    sel.check_params(selector, ratio, n, kappa, band)
    if selector == "popi" and scores_dir is None:
        raise InputError("--scores", None, None, "selector popi needs --scores S/ (a `cropi score` output)")

    pool, prov = load_pool(scores_dir, trajectories)
    source = prov["scores_file"] or prov["trajectories_file"]
    pool_size = len(set(pool.column("prompt").to_pylist()))
    size = pool_size if selector == "full" else sel.stage_size(pool_size, ratio, n)

    candidates, n_excluded = pool, 0
    if exclude_previous:
        chosen_before = _chosen_before(pool, out)
        candidates, n_excluded = pool.filter(pa.array(~chosen_before)), int(chosen_before.sum())

    idx = sel.select(candidates, selector, n=max(size, 1), seed=seed, stratify=stratify, kappa=kappa, band=band, source=source)
    if len(idx) == 0:
        raise _no_selection(selector, candidates, n_excluded, source)
    chosen = candidates.take(pa.array(idx))
    keep_cols = list(prompt_columns(chosen).column_names) + ["pass_rate"] + (["score"] if "score" in chosen.column_names else [])
    rows = chosen.select(keep_cols)

    manifest = {
        "selector": selector,
        "params": {"kappa": kappa} if selector == "variance" else {"band": list(band)} if selector == "pass-band" else {},
        "stratify": stratify,
        "ratio": None if (selector == "full" or n is not None) else (sel.DEFAULT_RATIO if ratio is None else ratio),
        "n": n,
        "target_size": size,
        "pool_size": pool_size,
        "exclude_previous": bool(exclude_previous),
        "excluded": n_excluded,
        "candidates": candidates.num_rows,
        "selected": rows.num_rows,
        "seed": seed,
        **prov,
        "checkpoint": checkpoint if checkpoint is not None else prov["checkpoint"],
        "task_counts": _value_counts(rows, "task"),
        "mean_pass_rate": _finite_mean(rows.column("pass_rate")),
        "mean_score": _finite_mean(rows.column("score")) if "score" in rows.column_names else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return write_stage(out, rows, manifest, stage)


def show(curriculum_dir) -> str:
    """A text table of the stages: stage, selector, size, task mix, mean pass rate, mean score."""
    stages = stage_dirs(curriculum_dir)
    if not stages:
        raise InputError(curriculum_dir, None, None, "no curriculum stages here (make one with `cropi select --out DIR`)")
    header = ("stage", "selector", "size", "task mix", "mean pass", "mean score")
    lines = [header]
    for k in stages:
        table, manifest = read_stage(curriculum_dir, k)
        mix = " ".join(f"{t}:{c}" for t, c in _value_counts(table, "task").items())
        pr = _finite_mean(table.column("pass_rate")) if "pass_rate" in table.column_names else None
        sc = _finite_mean(table.column("score")) if "score" in table.column_names else None
        lines.append((str(k), str(manifest.get("selector", "?")), str(table.num_rows), mix,
                      "-" if pr is None else f"{pr:.3f}", "-" if sc is None else f"{sc:.4f}"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)
