"""Selectors: which prompts of a pool go into the next curriculum stage.

Each selector is one function that turns per-prompt signals into a *priority order*:
the row indices of the prompts it deems eligible, best first. `select` then sizes the
stage (`stage_size`), applies the optional stratification (`stratum_quotas`) and walks the
order taking each prompt text at most once (`take`).

Ties (values equal to 12 decimals) are broken by a seeded random permutation, never by
file order, so a pool written task by task does not favour the first task.

| selector     | eligible rows                          | order                         |
|--------------|----------------------------------------|-------------------------------|
| popi         | status "ok" and a finite score         | score, highest first          |
| random       | all                                    | seeded uniform permutation    |
| learnability | all                                    | p(1−p), highest first         |
| variance     | normalised reward variance ≥ κ (VCRL)  | that variance, highest first  |
| pass-band    | lo ≤ pass rate ≤ hi                    | seeded uniform permutation    |
| full         | all (stage size ignored)               | table order                   |
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cropi.schema import InputError, pass_rates

SELECTORS = ("popi", "random", "learnability", "variance", "pass-band", "full")
DEFAULT_RATIO = 0.1
TIE_DECIMALS = 12


def _param_error(name: str, message: str) -> InputError:
    """Errors on a selection parameter read `--name: message` (the CLI option it came from)."""
    return InputError(f"--{name.replace('_', '-')}", None, None, message)


def check_params(
    selector: str,
    ratio: float | None = None,
    n: int | None = None,
    kappa: float = 0.8,
    band: tuple[float, float] = (0.2, 0.8),
    seed: int = 0,
) -> None:
    """Raise InputError for an unknown selector, a bad size (see `stage_size`), κ outside
    [0, 1], a band that is not 0 ≤ lo ≤ hi ≤ 1, or a seed that is not a whole number ≥ 0
    (what numpy's generators take)."""
    if selector not in SELECTORS:
        raise _param_error("selector", f"unknown selector {selector!r} (choose from {', '.join(SELECTORS)})")
    stage_size(1, ratio, n)
    if not 0.0 <= kappa <= 1.0:
        raise _param_error("kappa", f"must be in [0, 1], got {kappa}")
    lo, hi = band
    if not 0.0 <= lo <= hi <= 1.0:
        raise _param_error("band", f"need 0 ≤ lo ≤ hi ≤ 1, got ({lo}, {hi})")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise _param_error("seed", f"must be a whole number ≥ 0, got {seed}")


def stage_size(pool_size: int, ratio: float | None = None, n: int | None = None) -> int:
    """Number of prompts a stage should hold.

    `n` wins when given (clamped to `pool_size`); otherwise round-half-up of
    `ratio · pool_size` (ratio defaults to 0.1), at least 1 for a non-empty pool.
    Raises InputError for ratio outside (0, 1], n < 1, or both given.
    """
    if ratio is not None and n is not None:
        raise _param_error("ratio", "give a ratio or a count (--n), not both")
    if n is not None:
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise _param_error("n", f"must be a positive integer, got {n}")
        return min(int(n), pool_size)
    ratio = DEFAULT_RATIO if ratio is None else ratio
    if not (isinstance(ratio, int | float) and 0.0 < ratio <= 1.0):
        raise _param_error("ratio", f"must be in (0, 1], got {ratio}")
    if pool_size == 0:
        return 0
    return max(1, math.floor(ratio * pool_size + 0.5))


def _ranked(values: np.ndarray, eligible: np.ndarray, seed: int) -> np.ndarray:
    """Indices of `eligible` rows sorted by `values` descending, ties by a seeded permutation.

    values: [N] float; eligible: [N] bool. Returns int64 [n_eligible].
    """
    tie = np.random.default_rng(seed).permutation(len(values))
    idx = np.flatnonzero(eligible)
    key = np.round(np.asarray(values, dtype=np.float64)[idx], TIE_DECIMALS)
    return idx[np.lexsort((tie[idx], -key))]


def order_popi(scores: np.ndarray, status: np.ndarray | None, seed: int) -> np.ndarray:
    """Top influence first. scores: [N] float (cosine; NaN = not scored); status: [N] str or
    None. Rows with status other than "ok" (zero_signal, skipped) or a non-finite score are
    never eligible."""
    scores = np.asarray(scores, dtype=np.float64)
    eligible = np.isfinite(scores)
    if status is not None:
        eligible &= np.asarray(status) == "ok"
    return _ranked(scores, eligible, seed)


def order_random(size: int, seed: int) -> np.ndarray:
    """Seeded uniform permutation of range(size): its first n rows are a uniform sample."""
    return _ranked(np.zeros(size), np.ones(size, dtype=bool), seed)


def order_learnability(pass_rate: np.ndarray, seed: int) -> np.ndarray:
    """Highest p(1−p) first (p = offline pass rate, [N] float in [0, 1]); p and 1−p tie.
    Rows with an undefined (NaN) pass rate are not eligible."""
    p = np.asarray(pass_rate, dtype=np.float64)
    return _ranked(p * (1.0 - p), np.isfinite(p), seed)


def order_variance(p: np.ndarray, kappa: float, seed: int) -> np.ndarray:
    """VCRL: rows with normalised reward variance p ≥ κ, highest p first. p: [N] float
    (NaN where undefined, e.g. one response), from `normalised_reward_variance`."""
    p = np.asarray(p, dtype=np.float64)
    # p is computed in floating point; k/G reward patterns on the threshold must not fall off it
    eligible = np.isfinite(p) & (np.round(p, TIE_DECIMALS) >= kappa)
    return _ranked(p, eligible, seed)


def order_pass_band(pass_rate: np.ndarray, lo: float, hi: float, seed: int) -> np.ndarray:
    """Rows with lo ≤ pass rate ≤ hi (inclusive), in seeded uniform order."""
    p = np.asarray(pass_rate, dtype=np.float64)
    eligible = np.isfinite(p) & (p >= lo) & (p <= hi)
    return _ranked(np.zeros(len(p)), eligible, seed)


def normalised_reward_variance(rewards: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Per-row VCRL p = σ²/σ²_max of a list<float> rewards column. [N] float64.

    The formula is `cropi.advantages.normalised_variance` (its one definition). Its
    reward range is the pool's observed range (min, max over all rewards of the column):
    (0, 1) for binary rewards, VCRL's bound; for non-binary rewards σ²_max is scaled by
    (max − min)², the largest variance G rewards inside that range can have.
    Rows may hold different numbers of responses G and are grouped by G.
    NaN for rows with G < 2, and for every row when all rewards are equal.
    """
    import torch

    from cropi.advantages import normalised_variance

    if isinstance(rewards, pa.ChunkedArray):
        rewards = rewards.combine_chunks()
    lengths = pc.list_value_length(rewards).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(rewards).to_numpy(zero_copy_only=False).astype(np.float64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    out = np.full(len(lengths), np.nan)
    if len(flat) == 0 or flat.min() == flat.max():
        return out
    reward_range = (float(flat.min()), float(flat.max()))
    for g in np.unique(lengths):
        if g < 2:
            continue
        rows = np.flatnonzero(lengths == g)
        block = flat[starts[rows, None] + np.arange(g)[None, :]]  # [B, G]
        out[rows] = normalised_variance(torch.from_numpy(block), reward_range).numpy()
    return out


def stratum_quotas(groups: np.ndarray, n: int) -> dict:
    """Split n over strata in proportion to their row counts (largest remainder).

    groups: [N] labels. Each stratum gets floor(n·N_s/N); the leftover seats go to the largest
    fractional parts, ties to the smaller label. Returns {label: quota}, summing to n (n ≤ N).
    """
    labels, counts = np.unique(np.asarray(groups, dtype=object).astype(str), return_counts=True)
    exact = n * counts / counts.sum()
    quota = np.floor(exact).astype(int)
    frac = exact - quota
    for i in sorted(range(len(labels)), key=lambda i: (-frac[i], labels[i]))[: n - quota.sum()]:
        quota[i] += 1
    return {str(label): int(q) for label, q in zip(labels, quota)}


def take(order: np.ndarray, texts, n: int, groups=None) -> np.ndarray:
    """Walk `order` and keep up to n rows, each prompt text at most once.

    order: int [M] row indices, best first; texts: [N] prompt strings; groups: [N] labels or
    None. With groups, a row is kept only while its stratum is under its `stratum_quotas`
    share of n (computed over all N rows); a stratum short of eligible rows stays short.
    Returns int64 [≤ n] in walk order.
    """
    quota = None if groups is None else stratum_quotas(groups, n)
    labels = None if groups is None else np.asarray(groups, dtype=object).astype(str)
    used = dict.fromkeys(quota, 0) if quota is not None else None
    seen: set[str] = set()
    out: list[int] = []
    for i in order:
        if len(out) >= n:
            break
        if texts[i] in seen:
            continue
        if quota is not None:
            if used[labels[i]] >= quota[labels[i]]:
                continue
            used[labels[i]] += 1
        seen.add(texts[i])
        out.append(int(i))
    return np.asarray(out, dtype=np.int64)


def _column(table: pa.Table, name: str, selector: str, source: str) -> np.ndarray:
    if name not in table.column_names:
        hint = " (is this a scores file? run `cropi score` first)" if name == "score" else ""
        raise InputError(source, None, name, f"missing column, needed by selector {selector}{hint}")
    return table.column(name).to_numpy(zero_copy_only=False)


def _pass_rate(table: pa.Table, selector: str, source: str) -> np.ndarray:
    if "pass_rate" in table.column_names:
        return table.column("pass_rate").to_numpy(zero_copy_only=False).astype(np.float64)
    if "rewards" in table.column_names:
        return pass_rates(table.column("rewards"))
    raise InputError(source, None, "rewards", f"missing column, needed by selector {selector} (or pass_rate)")


def select(
    table: pa.Table,
    selector: str,
    *,
    ratio: float | None = None,
    n: int | None = None,
    seed: int = 0,
    stratify: str | None = None,
    kappa: float = 0.8,
    band: tuple[float, float] = (0.2, 0.8),
    source: str = "<table>",
) -> np.ndarray:
    """Row indices of `table` that form the stage, in priority order (best first; for
    random and pass-band the seeded sample order; for full the table order).

    table: needs `prompt`, plus `score` [+ `status`] for popi, `rewards` (or `pass_rate`) for
    learnability / pass-band, `rewards` for variance, and the `stratify` column if given.
    Size: `stage_size(number of distinct prompt texts, ratio, n)`; `full` takes every
    distinct prompt. Fewer rows come back when fewer are eligible (none: empty array).
    `source` names the table in error messages. Same inputs and seed ⇒ same indices.
    """
    check_params(selector, ratio, n, kappa, band, seed)
    texts = _column(table, "prompt", selector, source)
    pool = len(set(texts))
    size = stage_size(pool, ratio, n)
    if selector == "full":
        return take(np.arange(table.num_rows), texts, pool)
    groups = _column(table, stratify, selector, source) if stratify else None
    if selector == "popi":
        status = table.column("status").to_numpy(zero_copy_only=False) if "status" in table.column_names else None
        order = order_popi(_column(table, "score", selector, source), status, seed)
    elif selector == "random":
        order = order_random(table.num_rows, seed)
    elif selector == "learnability":
        order = order_learnability(_pass_rate(table, selector, source), seed)
    elif selector == "variance":
        _column(table, "rewards", selector, source)
        order = order_variance(normalised_reward_variance(table.column("rewards")), kappa, seed)
    else:  # pass-band
        order = order_pass_band(_pass_rate(table, selector, source), band[0], band[1], seed)
    return take(order, texts, size, groups)
