"""The features store: projected gradients on disk (docs/design.md).

    DIR/meta.json              model fingerprint, parameter selection, loss settings, projector, dtype, count
    DIR/shard-00000.npy        [n_c, k] float32 (or float16), row-aligned with
    DIR/shard-00000.parquet    index rows of the shard: id, grad_norm, n_tokens, status, reason
    DIR/index.parquet          all index rows, in pool order (written by ``finalize``)

Shards are written atomically and independently, so a killed run keeps every finished shard
and a resumed one computes only what is missing. Two stores are comparable only if their
projector metadata match (``check_compatible``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cropi import schema
from cropi.projection import incompatibility

FORMAT_VERSION = 1


def shard_paths(store, c: int) -> tuple[Path, Path]:
    store = Path(store)
    return store / f"shard-{c:05d}.npy", store / f"shard-{c:05d}.parquet"


def init_store(store, meta: dict, resume: bool) -> None:
    """Create ``store`` with ``meta`` or, when resuming, check the existing meta matches."""
    store = Path(store)
    meta = {**meta, "format": FORMAT_VERSION}
    f = store / "meta.json"
    if f.exists():
        old = schema.read_json(f)
        if not resume:
            raise schema.InputError(store, None, None, "a features store already exists here; pass --resume to continue it or --overwrite to replace it")
        reason = incompatibility(old.get("projector", {}), meta.get("projector", {}))
        if reason:
            raise schema.InputError(store, None, "projector", f"cannot resume: {reason}")
        if old.get("source_sha256") != meta.get("source_sha256"):
            was = str(old.get("source_sha256"))[:12] if old.get("source_sha256") else "not recorded"
            raise schema.InputError(store, None, "source_sha256", f"cannot resume: {meta.get('source')} is not the file this store was "
                                    f"started from (sha256 {str(meta.get('source_sha256'))[:12]}, store's {was}); use --overwrite")
        # inputs are identified by content (source_sha256, the model's fingerprint), not by where they lie
        diff = sorted(k for k in meta if k not in ("count", "source", "model", "checkpoint") and old.get(k) != meta.get(k))
        if diff:
            raise schema.InputError(store, None, diff[0], f"cannot resume: settings differ from the existing store ({', '.join(diff)})")
        return
    store.mkdir(parents=True, exist_ok=True)
    schema.write_json_atomic(meta, f)


def shard_done(store, c: int) -> bool:
    npy, idx = shard_paths(store, c)
    return npy.exists() and idx.exists()


def write_shard(store, c: int, feats: np.ndarray, index: pa.Table, dtype: str = "float32") -> None:
    """Write shard ``c`` (features [n, k] and its index rows): .npy first, then the index, each
    via temp+rename; a shard counts as done only when both exist."""
    npy, idx = shard_paths(store, c)
    with schema.atomic_file(npy) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(feats, dtype=dtype))
    schema.write_parquet_atomic(index.cast(schema.FEATURE_INDEX_SCHEMA), idx)


def finalize(store, n_shards: int) -> pa.Table:
    """Concatenate shard indexes into index.parquet and record the count in meta.json."""
    store = Path(store)
    missing = [c for c in range(n_shards) if not shard_done(store, c)]
    if missing:
        raise RuntimeError(f"{store}: shards {missing[:5]}{'...' if len(missing) > 5 else ''} missing; re-run with --resume")
    index = pa.concat_tables([pq.read_table(shard_paths(store, c)[1]) for c in range(n_shards)])
    index = index.replace_schema_metadata(None)
    schema.write_parquet_atomic(index, store / "index.parquet")
    meta = read_meta(store)
    meta.update(count=index.num_rows, shards=n_shards)
    schema.write_json_atomic(meta, store / "meta.json")
    return index


def read_meta(store) -> dict:
    return schema.read_json(Path(store) / "meta.json")


def read_shard(store, c: int) -> tuple[np.ndarray, pa.Table]:
    """(features memmap [n_c, k], index table) of shard ``c``. Never unpickles: a file that is
    not a plain .npy array / Parquet table raises InputError."""
    npy, idx = shard_paths(store, c)
    try:
        feats = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise schema.InputError(npy, None, None, f"not a .npy feature array ({str(e).splitlines()[0]})") from None
    try:
        index = pq.read_table(idx)
    except (pa.ArrowInvalid, OSError) as e:
        raise schema.InputError(idx, None, None, f"not a Parquet index ({str(e).splitlines()[0]})") from None
    return feats, index


def iter_shards(store):
    """Yield (features memmap [n_c, k], index table) per shard, in pool order."""
    for c in range(read_meta(store)["shards"]):
        yield read_shard(store, c)


def load(store) -> tuple[np.ndarray, pa.Table]:
    """All features [N, k] (float32, in memory) and the index. For small stores and tests."""
    parts = list(iter_shards(store))
    return np.concatenate([np.asarray(f, dtype=np.float32) for f, _ in parts]), pa.concat_tables([t for _, t in parts])


def check_compatible(store_a, store_b) -> None:
    """Raise InputError unless the two stores were projected by the same P from the same model."""
    a, b = read_meta(store_a), read_meta(store_b)
    reason = incompatibility(a.get("projector", {}), b.get("projector", {}))
    if reason is None and a.get("params") != b.get("params"):
        reason = f"parameter selections differ ({a.get('params')} vs {b.get('params')})"
    if reason is None and a.get("fingerprint") != b.get("fingerprint"):
        reason = f"model fingerprints differ ({a.get('fingerprint')} vs {b.get('fingerprint')})"
    if reason:
        raise schema.InputError(store_b, None, "meta.json", f"not comparable with {store_a}: {reason}")
