"""Projection throughput (gradients/s) and pairwise-cosine error of every cropi projector, each as a
ratio against TRAK's BasicProjector (block_size 100, float32, Rademacher) at the same d, k, batch
and dtype, in this process.

Vectors: B rows x_i = (a_i z_0 + sqrt(1 - a_i²) z_i) ⊙ s with z Gaussian, a_i evenly in [0.2, 0.9]
(pairwise cosines spread over ~0.04..0.8) and s a log-normal (σ = 1) scale per block of 4096
coordinates, like the per-layer scale differences of real gradients. float32.

Timing is process CPU seconds with one torch thread (the work done, robust to the other jobs of a
shared machine; wall seconds are recorded too); throughput = B / CPU seconds. sjlt runs in full
(cold = first call, which hashes and caches the coordinate buckets; warm = the steady state of
`cropi score`, where every batch reuses them). TRAK's cost is one d x 100 block generated and
multiplied per 100 output columns, the same for every block, so one block is timed (a one-block
BasicProjector built and applied, which also allocates its block buffer once) and scaled by
ceil(k / 100). dense / mask-dense regenerate their entries from hashes, linear in the coordinates
they keep, so when a full projection would exceed --work entries they are timed on a prefix of the
coordinates and scaled by d / prefix (mask-dense: by kept / kept in the prefix). Every scaled figure
says so in its `timing` field.

Cosine error = mean over the B(B-1)/2 pairs of |cos(Px_i, Px_j) - cos(x_i, x_j)|. The like-for-like
table runs every projector, TRAK included, in full at d = --err-d for each k, averaged over
--err-seeds projection seeds (SE = spread over seeds; cropi's dense, TRAK's distribution at the same
cost, one seed). At the benchmark d, projectors whose full projection is estimated at most
--err-budget CPU seconds are measured with one seed (SE = jackknife over vectors).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from _common import emit, machine, setup, timed

KINDS = ("sjlt", "mask-dense", "dense")


def make_vectors(B: int, d: int, seed: int) -> torch.Tensor:
    """[B, d] float32 test vectors (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.linspace(0.2, 0.9, B)[:, None]
    x = a * torch.randn(1, d, generator=g) + torch.sqrt(1 - a**2) * torch.randn(B, d, generator=g)
    blocks = (d + 4095) // 4096
    scale = torch.exp(torch.randn(blocks, generator=g)).repeat_interleave(4096)[:d]
    return x.mul_(scale)


def cosines(x: torch.Tensor) -> np.ndarray:
    """[B, B] float64 cosine matrix of the rows of x."""
    x = x.double()
    x = x / x.norm(dim=1, keepdim=True)
    return (x @ x.T).numpy()


def cosine_error(px: torch.Tensor, exact: np.ndarray) -> dict:
    """Mean / max |cos(Px_i, Px_j) - cos(x_i, x_j)| over pairs i < j, and the jackknife SE of the mean."""
    err = np.abs(cosines(px) - exact)
    B = len(err)
    iu = np.triu_indices(B, 1)
    mean = float(err[iu].mean())
    loo = []
    for v in range(B):
        keep = np.delete(np.arange(B), v)
        sub = err[np.ix_(keep, keep)]
        loo.append(sub[np.triu_indices(B - 1, 1)].mean())
    loo = np.array(loo)
    se = float(np.sqrt((B - 1) / B * ((loo - loo.mean()) ** 2).sum()))
    return {"cos_err": mean, "cos_err_se": se, "cos_err_max": float(err[iu].max())}


def trak_projector(d: int, k: int, seed: int):
    from trak.projectors import BasicProjector, ProjectionType

    return BasicProjector(d, k, seed, ProjectionType.rademacher, "cpu", block_size=100, dtype=torch.float32)


def trak_block_seconds(x: torch.Tensor, seed: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one 100-column block of TRAK's BasicProjector on x: constructing a
    one-block projector (generates the d x 100 block into a fresh buffer) plus its project (the multiply)."""
    return timed(lambda: trak_projector(x.shape[1], 100, seed).project(x, model_id=0))


def scale(t: tuple[float, float], f: float) -> tuple[float, float]:
    return t[0] * f, t[1] * f


def cropi_seconds(proj, x: torch.Tensor, work: float) -> tuple[tuple[float, float], str]:
    """(wall, CPU) seconds of proj.project(x) (full, or on a prefix scaled linearly; module docstring)."""
    from cropi.projection import kept_index

    d, k = proj.d, proj.k
    if proj.kind == "sjlt":
        return timed(lambda: proj.project(x)), "full"
    kept = proj.m if proj.kind == "mask-dense" else d
    if kept * k <= work:
        return timed(lambda: proj.project(x)), "full"
    n = max(1, int(work / k * d / kept))
    secs = timed(lambda: proj.project(x[:, :n], 0))
    if proj.kind == "mask-dense":
        in_prefix = int(torch.searchsorted(kept_index(d, proj.density, proj.seed), n))
        return scale(secs, kept / max(in_prefix, 1)), f"prefix of {n} coordinates ({in_prefix} kept), scaled x{kept / max(in_prefix, 1):.1f}"
    return scale(secs, d / n), f"prefix of {n} coordinates, scaled x{d / n:.1f}"


def project_full(kind: str, x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    from cropi.projection import make_projector

    if kind == "trak":
        return trak_projector(x.shape[1], k, seed).project(x, model_id=0)
    return make_projector(kind, x.shape[1], k, seed).project(x)


def put_throughput(name: str, t: tuple[float, float], t_ref: tuple[float, float], how: str, **common) -> None:
    B = common["batch"]
    emit("projection", kind="throughput", projector=name, **common, cpu_s=t[1], wall_s=t[0], grads_per_s=B / t[1],
         timing=how, ratio=t_ref[1] / t[1], ratio_wall=t_ref[0] / t[0])


def seeded_error(kind: str, x: torch.Tensor, exact: np.ndarray, k: int, seeds: list[int]) -> dict:
    """cosine_error averaged over projection seeds; with several seeds the SE is the spread over seeds
    (the projection's randomness), else the jackknife over vectors."""
    es = [cosine_error(project_full(kind, x, k, s), exact) for s in seeds]
    out = {key: float(np.mean([e[key] for e in es])) for key in es[0]}
    if len(es) > 1:
        out["cos_err_se"] = float(np.std([e["cos_err"] for e in es], ddof=1) / math.sqrt(len(es)))
    return {**out, "seeds": len(seeds)}


def put_errors(x: torch.Tensor, k: int, seeds: list[int], kinds, with_ref: bool) -> None:
    """Cosine error of each projector in ``kinds`` on x; against the first (TRAK) when with_ref.
    cropi's dense (TRAK's distribution, same cost) gets the first seed only."""
    exact = cosines(x)
    ref = None
    for kind in kinds:
        e = seeded_error(kind, x, exact, k, seeds[:1] if kind == "dense" else seeds)
        ref = e if kind == "trak" else ref
        cmp = {"ref": None, "err_vs_ref": None, "err_diff_z": None}
        if with_ref and ref is not None:
            cmp = {"ref": "trak-basic-100", "err_vs_ref": e["cos_err"] / ref["cos_err"],
                   "err_diff_z": 0.0 if kind == "trak" else (e["cos_err"] - ref["cos_err"]) / math.hypot(e["cos_err_se"], ref["cos_err_se"])}
        emit("projection", kind="cos_error", projector=kind, d=x.shape[1], k=k, batch=x.shape[0], dtype="float32",
             **e, **cmp)


def bench_size(d: int, ks: list[int], B: int, seed: int, work: float, err_budget: float) -> None:
    """Throughput of every projector vs TRAK at this d, then cosine errors where affordable."""
    from cropi.projection import make_projector

    x = make_vectors(B, d, seed)
    t_block = trak_block_seconds(x, seed)
    for k in ks:
        t_ref = scale(t_block, math.ceil(k / 100))
        common = dict(d=d, k=k, batch=B, dtype="float32", ref="trak-basic-100")
        put_throughput("trak", t_ref, t_ref, f"1 of {math.ceil(k / 100)} blocks timed, scaled linearly", **common)
        est = {"trak": t_ref[1]}
        for kind in KINDS:
            proj = make_projector(kind, d, k, seed)
            if kind == "sjlt":
                put_throughput("sjlt-cold", timed(lambda p=proj: p.project(x)), t_ref, "full, first call (hashes buckets)", **common)
                secs, how = timed(lambda p=proj: p.project(x), reps=3), "full, warm (buckets cached), mean of 3"
            else:
                secs, how = cropi_seconds(proj, x, work)
            est[kind] = secs[1]
            put_throughput(kind, secs, t_ref, how, **common)
        affordable = [kind for kind in ("trak",) + KINDS if est[kind] <= err_budget]
        put_errors(x, k, [seed], affordable, with_ref="trak" in affordable)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", default="1e6,1e7", help="gradient dimensions")
    ap.add_argument("--k", default="1024,8192", help="projected dimensions")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=float, default=1e8, help="dense/mask-dense: max generated entries timed per call")
    ap.add_argument("--err-d", type=float, default=1e5, help="d of the all-projector cosine-error table")
    ap.add_argument("--err-seeds", type=int, default=3, help="projection seeds of the all-projector table")
    ap.add_argument("--err-budget", type=float, default=5.0, help="max estimated CPU seconds for a full projection at the benchmark d")
    args = ap.parse_args(argv)
    setup(args.threads)
    ks = [int(v) for v in args.k.split(",")]
    emit("projection", kind="machine", **machine())
    x = make_vectors(args.batch, int(args.err_d), args.seed)
    for k in ks:  # like-for-like: every projector in full at d = err_d
        put_errors(x, k, list(range(args.seed, args.seed + args.err_seeds)), ("trak",) + KINDS, with_ref=True)
    for d in [int(float(v)) for v in args.d.split(",")]:
        bench_size(d, ks, args.batch, args.seed, args.work, args.err_budget)

if __name__ == "__main__":
    main()
