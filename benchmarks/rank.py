"""Rank preservation: precision@10 % and Spearman ρ of projected against exact influence scores, as
a function of k (sjlt, mask-dense, kron) and of the mask-dense kept ratio ρ (the paper's curve).

Data: the warmed tiny model and a rolled-out pool and target set of the default task suite
(benchmarks/_common.bench_data). Exact: the flat per-prompt gradients g_x of up to --n ok pool
prompts and the mean exact gradient of the ok target prompts (cropi.score.exact_gradients, the
--check-rank reference); exact score = cos(g_x, ḡ_V). Projected score = cos(P g_x, P ḡ_V) with P
applied to those exact gradients: every projector is linear and block-additive, so this is the
score `cropi score` writes (up to float32 summation order). kron features are vec(P_out G P_inᵀ)
per covered weight, computed from the exact gradients through the projector's own maps (equal to
the batched-hook path, cropi.kron.prompt_features: checked on one batch below and in
tests/test_kron.py); kron is scored against exact scores over the parameters it covers (what
`--check-rank` compares with) and, separately, against the all-parameter exact scores.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import bench_data, emit, machine, setup, timed


def kron_from_grads(proj, flat: torch.Tensor, offsets: dict) -> torch.Tensor:
    """[R, proj.k] kron features of flat exact gradients [R, d] (columns laid out as ``offsets``)."""
    out = []
    for blk in proj.blocks:
        o = offsets[blk.weight]
        G = flat[:, o : o + blk.rows * blk.cols].reshape(-1, blk.rows, blk.cols)
        G = G if blk.p_cols is None else G @ blk.p_cols
        G = G if blk.p_rows is None else blk.p_rows.T @ G
        out.append(G.flatten(1))
        if blk.bias:
            b = flat[:, offsets[blk.bias] : offsets[blk.bias] + blk.rows]
            out.append(b if blk.p_rows is None else b @ blk.p_rows)
    return torch.cat(out, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="max ok pool prompts with exact gradients")
    ap.add_argument("--ks", default="256,1024,4096,8192", help="k values for sjlt")
    ap.add_argument("--kron-ks", default="1024,8192,65536", help="k values for kron")
    ap.add_argument("--md-ks", default="1024,8192", help="k values for mask-dense at ρ = 0.1")
    ap.add_argument("--ratios", default="0.001,0.003,0.01,0.03,0.1,0.3,1.0", help="mask-dense kept ratios")
    ap.add_argument("--ratio-k", type=int, default=1024, help="k of the kept-ratio curve")
    ap.add_argument("--seeds", type=int, default=3, help="projection seeds for sjlt, kron, mask-dense")
    ap.add_argument("--ratio-seeds", type=int, default=5, help="projection seeds per point of the kept-ratio curve")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pool-per-spec", type=int, default=40)
    ap.add_argument("--target-per-spec", type=int, default=16)
    args = ap.parse_args(argv)
    setup(args.threads)
    from cropi import influence, models, schema
    from cropi.kron import KronProjector, prompt_features
    from cropi.policy_grad import GradConfig, is_zero_signal, select_params, token_weights
    from cropi.projection import make_projector
    from cropi.score import ScoreConfig, exact_gradients, prepare

    emit("rank", kind="machine", **machine())
    data = bench_data(args.pool_per_spec, args.target_per_spec)
    emit("rank", kind="data", **{k: str(v) for k, v in data.items()})
    policy = models.load(data["model"])
    cfg = ScoreConfig()
    pool_t = schema.read_table(data["pool"], "trajectories")
    prep = prepare(policy, pool_t, data["pool"])
    tprep = prepare(policy, schema.read_table(data["target"], "trajectories"), data["target"])
    rewards = np.concatenate([np.asarray(r, dtype=np.float64) for r in prep.rewards])
    pool_std = float(rewards.std(ddof=1))
    names = select_params(policy.model)
    ok = [i for i in range(len(prep.ids)) if not is_zero_signal(prep.rewards[i])]
    rows = sorted(np.random.default_rng(0).choice(ok, min(args.n, len(ok)), replace=False).tolist())
    t_ok = [i for i in range(len(tprep.ids)) if not is_zero_signal(tprep.rewards[i])]

    # exact gradients: N pool rows + the target mean as the last row, [N + 1, d] float32
    d = sum(p.numel() for n, p in policy.model.named_parameters() if n in set(names))
    flat = torch.zeros(len(rows) + 1, d)

    def fill():
        for s in range(0, len(rows), cfg.batch):
            chunk = rows[s : s + cfg.batch]
            flat[s : s + len(chunk)] = torch.from_numpy(exact_gradients(policy, prep, chunk, names, cfg, pool_std))
        tsum = torch.zeros(d, dtype=torch.float64)
        for s in range(0, len(t_ok), cfg.batch):
            tsum += torch.from_numpy(exact_gradients(policy, tprep, t_ok[s : s + cfg.batch], names, cfg, pool_std)).double().sum(0)
        flat[-1] = (tsum / len(t_ok)).float()

    wall, cpu = timed(fill)
    N = len(rows)
    emit("rank", kind="exact", pool_rows=len(prep.ids), ok_rows=len(ok), n=N, target_ok=len(t_ok), d=d,
         cpu_s=cpu, wall_s=wall, exact_dense_gib=round(flat.numel() * 4 / 2**30, 2))
    exact = influence.cosine(flat[:N].numpy(), flat[-1].numpy())

    def agree(feats: torch.Tensor, ref=exact) -> dict:
        f = feats.double().numpy()
        return influence.rank_agreement(ref, influence.cosine(f[:N], f[-1]), 0.1)

    def run_seeds(fn, seeds: int) -> tuple[list, float]:
        """[fn(seed) for each seed] and the mean CPU seconds per call."""
        out, cpu = [], 0.0
        for seed in range(seeds):
            cpu += timed(lambda: out.append(fn(seed)))[1]  # noqa: B023
        return out, cpu / seeds

    def report(projector, k, res: list[dict], cpu: float, **extra):
        prec = [r["precision"] for r in res]
        rho = [r["spearman"] for r in res]
        emit("rank", kind="agreement", projector=projector, k=k, n=N, frac=0.1, seeds=len(res),
             precision=float(np.mean(prec)), precision_min=float(np.min(prec)), precision_max=float(np.max(prec)),
             spearman=float(np.mean(rho)), spearman_min=float(np.min(rho)), cpu_s=cpu, **extra)

    ks = [int(v) for v in args.ks.split(",")]
    for k in ks:
        report("sjlt", k, *run_seeds(lambda seed, k=k: agree(make_projector("sjlt", d, k, seed).project(flat)), args.seeds))

    offsets, o = {}, 0
    params = dict(policy.model.named_parameters())
    for n in names:
        offsets[n] = o
        o += params[n].numel()
    kron_ks = [int(v) for v in args.kron_ks.split(",")]
    cover = KronProjector(policy.model, names, kron_ks[0]).names
    cols = torch.cat([torch.arange(offsets[n], offsets[n] + params[n].numel()) for n in cover])
    sub = flat[:, cols]
    exact_cov = influence.cosine(sub[:N].numpy(), sub[-1].numpy())
    emit("rank", kind="kron_coverage", covered_params=len(cover), all_params=len(names), covered_d=int(len(cols)), d=d,
         covered_share_of_sq_norm=float((sub[:N].double() ** 2).sum() / (flat[:N].double() ** 2).sum()),
         exact_covered_vs_all=influence.rank_agreement(exact, exact_cov, 0.1))
    del sub
    for k in kron_ks:
        def kron_run(seed, k=k):
            proj = KronProjector(policy.model, names, k, seed)
            f = kron_from_grads(proj, flat, offsets)
            return agree(f, exact_cov), agree(f, exact), proj.k

        res, cpu = run_seeds(kron_run, args.seeds)
        report("kron", k, [r[0] for r in res], cpu, k_actual=res[0][2], vs="exact over the covered weights")
        report("kron", k, [r[1] for r in res], cpu, k_actual=res[0][2], vs="exact over all parameters")

    # batched-hook kron == kron from exact gradients, on one batch
    proj = KronProjector(policy.model, names, 8192, 0)
    b = rows[: cfg.batch]
    gcfg = GradConfig()
    w = [token_weights(prep.rewards[i], [len(r) for r in prep.responses[i]], gcfg, pool_std) for i in b]
    hooks, _ = prompt_features(policy, [prep.prompt_ids[i] for i in b], [prep.responses[i] for i in b], w,
                               [prep.behavior_logp[i] for i in b], gcfg, proj)
    via = kron_from_grads(proj, flat[: len(b)], offsets)
    emit("rank", kind="kron_paths_agree", k=proj.k, rows=len(b),
         max_rel_diff=float(((hooks - via).norm(dim=1) / via.norm(dim=1)).max()))

    for k in [int(v) for v in args.md_ks.split(",")]:
        report("mask-dense", k, *run_seeds(lambda seed, k=k: agree(make_projector("mask-dense", d, k, seed).project(flat)),
                                           args.seeds), density=0.1)
    rk = args.ratio_k
    for rho in [float(v) for v in args.ratios.split(",")]:
        report("mask-dense", rk, *run_seeds(lambda seed, rho=rho: agree(
            make_projector("mask-dense", d, rk, seed, density=rho).project(flat)), args.ratio_seeds), density=rho,
               curve="kept-ratio")

if __name__ == "__main__":
    main()
