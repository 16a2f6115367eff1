"""Influence scores from projected gradients ("POPI", docs/design.md).

    ḡ_V        = mean over the target prompts v of P g_v            (zero-signal v excluded)
    score_V(x) = cos(P g_x, ḡ_V)
    combined   = mean_V score_V | max_V score_V | Σ_V 1/rank_V (reciprocal-rank fusion)

Rows that are not ``ok`` (zero_signal, skipped) get NaN scores and the last ranks.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

COMBINE = ("mean", "max", "rrf")
POOL_GRADS = ("plain", "sign")  # pool features from g_x, or from sign(g_x) (`cropi.score.pool_transform`)


def cosine(features: np.ndarray, target: np.ndarray, eps: float = 1e-30) -> np.ndarray:
    """cos(f_i, target) for features [N, k] and target [k] -> [N] float64 (0 for zero rows)."""
    f = np.asarray(features, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    return (f @ t) / np.maximum(np.linalg.norm(f, axis=1) * np.linalg.norm(t), eps)


def rank_desc(score: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """1-based ranks by descending score; rows with ok=False (or NaN score) come last.
    Ties keep pool order (stable). [N] int64."""
    score = np.asarray(score, dtype=np.float64)
    valid = np.asarray(ok, dtype=bool) & ~np.isnan(score)
    key = np.where(valid, -score, np.inf)
    order = np.argsort(key, kind="stable")
    ranks = np.empty(len(score), dtype=np.int64)
    ranks[order] = np.arange(1, len(score) + 1)
    return ranks


def combine(per_target: dict[str, np.ndarray], ok: np.ndarray, method: str = "mean") -> np.ndarray:
    """One score per row from several targets' cosines; NaN where not ok."""
    if method not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {method!r}")
    mat = np.stack([np.asarray(v, dtype=np.float64) for v in per_target.values()])  # [V, N]
    ok = np.asarray(ok, dtype=bool)
    if method == "mean":
        out = mat.mean(0)
    elif method == "max":
        out = mat.max(0)
    else:
        out = sum(1.0 / rank_desc(row, ok) for row in mat)
    return np.where(ok, out, np.nan)


def top_fraction(score: np.ndarray, frac: float = 0.1) -> set[int]:
    """Indices of the ⌈frac·N⌉ highest scores (ties by index)."""
    n = max(1, math.ceil(frac * len(score)))
    return set(np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")[:n].tolist())


def rank_agreement(exact: np.ndarray, approx: np.ndarray, frac: float = 0.1) -> dict:
    """precision@frac (overlap of the top-frac sets / their size) and Spearman ρ."""
    top_e, top_a = top_fraction(exact, frac), top_fraction(approx, frac)
    rho = stats.spearmanr(exact, approx).statistic if len(exact) > 2 else float("nan")
    return {"precision": len(top_e & top_a) / len(top_e), "spearman": float(rho), "n": int(len(exact)), "frac": frac}
