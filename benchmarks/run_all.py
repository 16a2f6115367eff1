"""`make bench`: run every benchmark in its own process, keep their JSON lines in
benchmarks/results.jsonl and write benchmarks/RESULTS.md from them.

    python benchmarks/run_all.py               # everything, sizes that fit a 2-core CPU box
    python benchmarks/run_all.py --render      # only rewrite RESULTS.md from results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_JSONL = HERE / "results.jsonl"
RESULTS_MD = HERE / "RESULTS.md"
STEPS = (
    ("data", ["-c", "import json, _common; _common.setup(1); print(json.dumps({'bench': 'data', **{k: str(v) for k, v in _common.bench_data().items()}}))"]),
    ("projection", ["projection.py"]),
    ("gradients", ["gradients.py"]),
    ("rank", ["rank.py"]),
    ("memory", ["memory.py"]),
    ("real_model", ["real_model.py"]),
)


def run(only: set | None) -> list[dict]:
    records = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CROPI_QUIET": "1"}
    t_all = time.perf_counter()
    for name, argv in STEPS:
        if only and name not in only:
            continue
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *argv], cwd=HERE, env=env, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.startswith("{"):
                records.append(json.loads(line))
                print(line.rstrip()[:200], file=sys.stderr, flush=True)
        if proc.wait():
            raise SystemExit(f"benchmark {name} failed with exit code {proc.returncode}")
        records.append({"bench": "run_all", "step": name, "wall_s": round(time.perf_counter() - t0, 1)})
    records.append({"bench": "run_all", "step": "total", "wall_s": round(time.perf_counter() - t_all, 1),
                    "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")})
    return records


# ---------------------------------------------------------------------------- rendering


def _f(x) -> str:
    """A number for a table cell: thousands separators, 3 significant-ish digits."""
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if isinstance(x, int):
        return f"{x:,}"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 0.01 or ax == 0:
        return f"{x:.3f}"
    return f"{x:.2e}"


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _sci(d: int) -> str:
    e = len(str(d)) - 1
    return f"{d / 10**e:g}e{e}"


def render(records: list[dict]) -> str:
    by = lambda bench, kind=None: [r for r in records if r.get("bench") == bench and (kind is None or r.get("kind") == kind)]  # noqa: E731
    mach = (by("projection", "machine") or by("gradients", "machine") or [{}])[0]
    loads = [r.get("loadavg_1m") for r in records if r.get("kind") == "machine"]
    steps = {r["step"]: r for r in by("run_all")}
    md = ["# Benchmarks", ""]
    md.append(f"Written by `make bench` (`benchmarks/run_all.py`), finished {steps.get('total', {}).get('finished', '?')}; "
              f"raw measurements, one JSON line each: `benchmarks/results.jsonl`.")
    md.append("")
    md.append(f"**Machine**: {mach.get('cpu')} CPU, {mach.get('logical_cores')} logical cores, {mach.get('mem_gib')} GiB RAM, "
              f"no GPU; torch {mach.get('torch')} with {mach.get('torch_threads')} thread, traker {mach.get('traker')}, "
              f"Python {mach.get('python')}. The box is shared: 1-minute load average {min(loads, default=0):.1f}–"
              f"{max(loads, default=0):.1f} at the starts of the benchmarks (2 cores). Every time is **process CPU "
              f"seconds** of a single-threaded run (the work done; wall time under that load is up to ~2x and is "
              f"kept in results.jsonl), and every figure is a ratio against a reference measured **in the same "
              f"process** on the same inputs.")
    md.append("")
    md.append("Step wall times: " + ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in steps.items() if k != "total")
              + (f"; **total {steps['total']['wall_s'] / 60:.1f} min**." if "total" in steps else "."))
    md.append("")

    # ------------------------------------------------------------------ summary
    thr = by("projection", "throughput")
    err = by("projection", "cos_error")
    costs = by("gradients", "cost")
    cost = {r["path"]: r for r in costs if r["width"] == costs[0]["width"]} if costs else {}
    agr = by("rank", "agreement")
    mem = by("memory", "peak_rss")
    summary = []

    def sj(d, k, name="sjlt"):
        return next((r for r in thr if r["projector"] == name and r["d"] == d and r["k"] == k), None)

    big_d = sorted({r["d"] for r in thr})
    if thr:
        warm = [sj(d, 8192) for d in big_d if sj(d, 8192)]
        cold = [sj(d, 8192, "sjlt-cold") for d in big_d if sj(d, 8192, "sjlt-cold")]
        lo = min(r["ratio"] for r in warm)
        lo_cold = min(r["ratio"] for r in cold)
        e8 = {r["projector"]: r for r in err if r["k"] == 8192 and r.get("ref")}
        z = e8.get("sjlt", {}).get("err_diff_z")
        summary.append(["Projection: default (sjlt) throughput ≥ 100x TRAK BasicProjector at k = 8192",
                        f"{lo:,.0f}x (warm) / {lo_cold:,.0f}x (first call) at d = {', '.join(_sci(d) for d in big_d)}",
                        "met" if lo >= 100 and lo_cold >= 100 else ("met when warm" if lo >= 100 else "**not met**")])
        if z is not None:
            ratio = e8["sjlt"]["err_vs_ref"]
            summary.append(["Projection: cosine error no worse than TRAK's (k = 8192)",
                            f"{ratio:.2f}x TRAK's mean error (difference {z:+.1f} standard errors) at d = {_sci(e8['sjlt']['d'])}",
                            "met" if z <= 2 else "**not met**"])
    if cost:
        c = cost["cropi-sjlt"]
        summary.append(["Per-prompt gradient + projection ≤ 2x one plain forward+backward",
                        f"{c['vs_plain']:.2f}x plain; {c['loop_speedup']:.2f}x the speed of the one-prompt loop",
                        "met" if c["vs_plain"] <= 2 else "**not met**"])
    default = next((r for r in agr if r["projector"] == "sjlt" and r["k"] == 8192), None)
    if default:
        summary.append(["Rank: precision@10 % ≥ 0.9 at the default (sjlt, k = 8192)",
                        f"precision {default['precision']:.3f} (seeds {default['precision_min']:.2f}–{default['precision_max']:.2f}), "
                        f"Spearman {default['spearman']:.3f}, n = {default['n']}",
                        "met" if default["precision"] >= 0.9 else "**not met** (see §3)"])
    if mem:
        spread = max(r["peak_rss_mib"] for r in mem) / min(r["peak_rss_mib"] for r in mem) - 1
        summary.append(["Memory: peak RSS of `cropi score` flat (within 10 %) over 1x/4x/16x pools",
                        f"{min(r['peak_rss_mib'] for r in mem)}–{max(r['peak_rss_mib'] for r in mem)} MiB (spread {spread:.1%})",
                        "met" if spread <= 0.10 else "**not met**"])
    if "kron" in cost:
        kr = next((r for r in agr if r["projector"] == "kron" and r["k"] == 8192 and "covered" in r.get("vs", "")), None)
        summary.append(["kron vs sjlt (cost, precision)",
                        f"cost {cost['kron']['vs_plain']:.2f}x plain vs sjlt {cost['cropi-sjlt']['vs_plain']:.2f}x"
                        + (f"; precision {kr['precision']:.3f} vs {default['precision']:.3f} at k ≈ 8192" if kr and default else ""),
                        "measured"])
    md += ["## Targets", "", _table(["target", "measured", "verdict"], summary), ""]

    # ------------------------------------------------------------------ projection
    if thr:
        B = thr[0]["batch"]
        md += ["## 1. Projection throughput and cosine error vs TRAK", "",
               f"`benchmarks/projection.py`. Batch B = {B} float32 vectors; reference: TRAK `BasicProjector` "
               "(Rademacher, block_size 100, float32) at the same d, k, B. cropi's sjlt (s = 1), mask-dense (ρ = 0.1) "
               "and dense (Rademacher) projectors. kron takes no flat vector (it projects layer inputs and "
               "output-gradients during the backward), so its cost is measured in §2.", "",
               "**Extrapolation, stated explicitly:** TRAK's cost is one d x 100 block generated and multiplied per 100 "
               "output columns, identical for every block, so one block is timed (a one-block BasicProjector built and "
               "applied, which also allocates its block buffer once: ~10 % of a block at d = 1e6) and scaled by ceil(k/100). "
               "cropi's dense and mask-dense regenerate their entries from hashes at a cost linear in the coordinates, "
               "so where a full run would exceed 1e8 generated entries they are timed on a prefix of the coordinates "
               "and scaled linearly (the `timing` column). sjlt always runs in full.", ""]
        rows = []
        for r in thr:
            rows.append([_sci(r["d"]), r["k"], r["projector"], r["cpu_s"], r["grads_per_s"], f"**{_f(r['ratio'])}x**"
                         if r["projector"].startswith("sjlt") else f"{_f(r['ratio'])}x", r["timing"]])
        md += [_table(["d", "k", "projector", "CPU s / batch", "gradients/s", "vs TRAK", "timing"], rows), ""]
        md += ["sjlt (warm) is the steady state of `cropi score`: the bucket of every coordinate is hashed on the "
               "first batch and reused for all later ones (same parameter offsets); sjlt-cold is that first call.", ""]
        md += ["Pairwise cosine error = mean over the B(B−1)/2 pairs of |cos(Px_i, Px_j) − cos(x_i, x_j)| "
               "(± jackknife standard error over vectors); test vectors have pairwise cosines spread over ~0.04–0.8 and "
               "log-normal per-4096-block scales. **Like-for-like table**: every projector, TRAK included, run in "
               "full at a reduced d so that TRAK at k = 8192 fits the time budget (the JL error depends on k and the "
               "vectors, not on d), averaged over projection seeds; ± SE is the spread over seeds (one seed: jackknife "
               "over vectors). mask-dense keeps ρ·d coordinates, so at this small d and k = 8192 it projects fewer "
               "coordinates than k and its subsampling error shows:", ""]
        ref_rows = [r for r in err if r.get("ref")]
        md += [_table(["d", "k", "projector", "seeds", "mean abs Δcos", "± SE", "max abs Δcos", "vs TRAK", "difference / SE"],
                      [[_sci(r["d"]), r["k"], r["projector"], r.get("seeds", 1), r["cos_err"], r["cos_err_se"],
                        r["cos_err_max"], f"{r['err_vs_ref']:.2f}x", f"{r['err_diff_z']:+.1f}"] for r in ref_rows]), ""]
        other = [r for r in err if not r.get("ref")]
        if other:
            md += ["At the benchmark sizes (one seed), for the projectors whose full projection fits the budget:", "",
                   _table(["d", "k", "projector", "mean abs Δcos", "± SE", "max abs Δcos"],
                          [[_sci(r["d"]), r["k"], r["projector"], r["cos_err"], r["cos_err_se"], r["cos_err_max"]] for r in other]), ""]

    # ------------------------------------------------------------------ gradients
    if cost:
        c0 = cost["plain"]
        md += ["## 2. Per-prompt gradient cost", "",
               f"`benchmarks/gradients.py`. The tiny default architecture (d = {c0['d']:,} parameters, random weights), "
               f"{c0['prompts']} prompts x G = {c0['G']} responses per batch, {c0['tokens']:,} tokens padded to "
               f"{c0['seq_len']}; all paths compute the same objective J on the same tokens. References: (a) one plain "
               "training forward+backward of J over the whole batch (parameter gradients summed over prompts); "
               "(b) one prompt at a time: forward+backward, flatten the full gradient, project it (what the public "
               "CROPI code does; projected with the same sjlt so only the gradient path differs). cropi = batched "
               "`torch.func.vmap` per-prompt gradients + sjlt (k = 8192); kron = one forward + one activation-gradient "
               "backward with hooks, k ≈ 8192.", ""]
        names = {"plain": "(a) plain forward+backward", "loop": "(b) one-prompt loop + flatten + sjlt",
                 "cropi-sjlt": "cropi: vmap per-prompt grads + sjlt", "kron": "cropi: kron"}
        md += [_table(["model (d)", "path", "CPU s / prompt", "vs (a)", "speed-up over (b)"],
                      [[f"width {r['width']} ({r['d']:,})", names[r["path"]], r["cpu_s_per_prompt"], f"{r['vs_plain']:.2f}x",
                        f"{r['loop_speedup']:.2f}x"] for r in costs]), ""]
        md += [GRAD_NOTE, ""]
        for r in by("gradients", "profile"):
            md += [f"Profile of `{r['path']}`, width {r['width']} (torch.profiler, self CPU time, top ops): "
                   + "; ".join(f"{o['op']} {o['share']:.0%}" for o in r["top_self_cpu"][:6]) + ".", ""]

    # ------------------------------------------------------------------ rank
    if agr:
        ex = by("rank", "exact")[0]
        data = (by("rank", "data") or [{}])[0]
        md += ["## 3. Rank preservation (precision@10 %, Spearman)", "",
               f"`benchmarks/rank.py`. The warmed tiny model (fingerprint {data.get('fingerprint')}), the default task "
               f"suite: {ex['pool_rows']} pool prompts rolled out with G = 8 ({ex['ok_rows']} with reward variance), "
               f"{ex['target_ok']} ok target prompts. Exact = the flat per-prompt gradients (d = {ex['d']:,}; "
               f"{ex['exact_dense_gib']} GiB for these {ex['n']} prompts) and cos(g_x, ḡ_V), as `cropi score "
               "--check-rank` computes it; projected = the same cosines after each projector, applied to those "
               "exact gradients (linear and block-additive, so equal to what `cropi score` writes). precision@10 % "
               f"= overlap of the top-{max(1, round(ex['n'] * 0.1))} sets. Means over seeds (min–max in brackets).", ""]
        rows = []
        for r in agr:
            if r.get("curve") or "all parameters" in r.get("vs", ""):
                continue
            label = r["projector"] + (f" (ρ = {r['density']})" if r.get("density") else "")
            rows.append([label, r.get("k_actual", r["k"]), f"{r['precision']:.3f} ({r['precision_min']:.2f}–{r['precision_max']:.2f})",
                         f"{r['spearman']:.3f}", r["seeds"], r["cpu_s"]])
        md += [_table(["projector", "k", "precision@10 %", "Spearman", "seeds", "CPU s"], rows), ""]
        curve = [r for r in agr if r.get("curve")]
        if curve:
            md += [f"**Kept-ratio curve** (mask-dense, k = {curve[0]['k']}, the paper's curve; means over "
                   f"{curve[0]['seeds']} projection seeds):", "",
                   _table(["kept ratio ρ", "precision@10 %", "Spearman"],
                          [[f"{r['density']:g}", f"{r['precision']:.3f} ({r['precision_min']:.2f}–{r['precision_max']:.2f})",
                            f"{r['spearman']:.3f}"] for r in curve]), ""]
        cov = (by("rank", "kron_coverage") or [None])[0]
        if cov:
            md += [f"kron covers {cov['covered_params']} of {cov['all_params']} parameter tensors ({cov['covered_d']:,} "
                   f"of {cov['d']:,} coordinates, {cov['covered_share_of_sq_norm']:.1%} of the gradients' squared norm). "
                   f"Exact scores over the covered weights alone agree with the all-parameter exact scores at "
                   f"precision {cov['exact_covered_vs_all']['precision']:.3f}, Spearman {cov['exact_covered_vs_all']['spearman']:.3f}.", ""]
        for r in by("rank", "kron_paths_agree"):
            md += [f"kron features from the batched hooks equal those from exact gradients through the same maps "
                   f"(max relative difference {r['max_rel_diff']:.1e} over {r['rows']} prompts).", ""]
        kall = [r for r in agr if "all parameters" in r.get("vs", "")]
        if kall:
            md += ["kron against the all-parameter exact scores: " + ", ".join(
                f"k = {r['k_actual']:,}: precision {r['precision']:.3f}, Spearman {r['spearman']:.3f}" for r in kall) + ".", ""]
        md += [KRON_NOTE, ""]
        if curve:
            md += [paper_note(curve, ex["n"], ex["d"]), ""]

    # ------------------------------------------------------------------ memory
    if mem:
        md += ["## 4. Memory", "",
               "`benchmarks/memory.py`. `cropi score` (sjlt, k = 8192, shards of 64, batches of 16) in a fresh child "
               f"process per pool against the same target set; peak RSS = the child's ru_maxrss. The m x pool is a "
               f"{mem[0]['pool_prompts']}-prompt sample of the rolled-out pool repeated m times with new ids, so every "
               "run computes batches of the same shapes and growth can only come from the pool's size (one batch's "
               "activation peak grows with its longest sequence, whatever the pool size). Reference: the 1x pool.", "",
               _table(["pool", "prompts (ok)", "peak RSS MiB", "vs 1x", "wall s", "dense ok gradients would take"],
                      [[f"{r['mult']}x", f"{r['pool_prompts']} ({r['ok_prompts']})", r["peak_rss_mib"],
                        f"{r['vs_1x']:.3f}", r["wall_s"], f"{r['dense_gib']} GiB"] for r in mem]), ""]

    # ------------------------------------------------------------------ real model
    real = [r for r in records if r.get("bench") == "real_model"]
    rcost = [r for r in real if r.get("kind") == "cost"]
    if real:
        md += ["## 5. A real model: SmolLM2-135M-Instruct", "",
               "`benchmarks/real_model.py`. Per-layer per-prompt gradients + sjlt (k = 8192) against (a) a plain "
               "training forward+backward over the same tokens and micro-batches and (b) one prompt at a time with a "
               "flattened full gradient then sjlt; peak RSS of `cropi score` per pool size in fresh processes; "
               "`--check-rank` against exact scores.", ""]
        if rcost:
            md += [_table(["path", "prompts x G", "tokens", "CPU s / prompt", "prompts / CPU s", "vs (a)", "speed-up over (b)"],
                          [[r["path"], f"{r['prompts']} x {r['G']}", r["tokens"], r["cpu_s_per_prompt"],
                            r["prompts_per_cpu_s"], f"{r['vs_plain']:.2f}x", f"{r['loop_speedup']:.2f}x"] for r in rcost]), ""]
        rss = [r for r in real if r.get("kind") == "peak_rss"]
        if rss:
            md += [_table(["pool", "batch", "micro-batch", "peak RSS MiB", "CPU s", "path"],
                          [[r["pool"], r["batch"], r["micro_batch"], r["peak_rss_mib"], r.get("cpu_s", "–"), r["grad_path"]]
                           for r in rss]), ""]
        for r in (r for r in real if r.get("kind") == "check_rank"):
            md += [f"check-rank on {r['n']} prompts (sjlt, k = {r['k']}): precision@10 % {r['precision_at_10pct']:.3f}, "
                   f"Spearman {r['spearman']:.3f}.", ""]

    md += [NOTES]
    return "\n".join(md) + "\n"


GRAD_NOTE = """How to read it. The batched paths pad all P·G sequences of a batch to its longest one; the
one-prompt loop (b) pads each prompt only to its own longest response and runs small matmuls that
stay in cache, which on this single-threaded CPU makes it cheap per prompt. cropi's vmapped path
spends its extra time (profile below) in `bmm` (the per-unit weight gradients: the flops of (a),
batched per unit) and in eager attention (`mul`, softmax backward: under vmap the fused SDPA kernel
is not used); kron costs (a) minus the weight-gradient matmuls plus its small projections. Where
the vmapped path is slower than the loop here, that is the measured result; no GPU was available to
this run, so the GPU case (where a one-prompt loop leaves the device mostly idle) is not measured."""


KRON_NOTE = """**kron against sjlt at equal k.** kron's estimate of a block's inner product is a product of
two independent JL estimates (rows and columns): for a rank-one gradient u vᵀ it is
<P_r u, P_r u'>·<P_c v, P_c v'>, whose relative variance is about 1/k_r + 1/k_c ≈ 2/√b for a block
of b = k_r·k_c dimensions, where a JL map of the flat gradient into the same b dimensions has
about 1/b. So at the same k kron ranks like sjlt at a much smaller k, and needs a larger k (the
65k row) for comparable precision. What it buys is cost and memory: features come from one
forward and one activation-gradient backward (§2), without per-prompt gradients (P x d floats per
batch, which on a billion-parameter model do not fit), and a larger k only grows the small
per-token projections and outer-product sums."""


def paper_note(curve: list[dict], n: int, d: int) -> str:
    """The comparison with the paper's kept-ratio curve, with this run's numbers."""
    curve = sorted(curve, key=lambda r: r["density"])
    at = {r["density"]: r for r in curve}
    lo, hi = curve[0], curve[-1]
    top = max(1, round(n * 0.1))
    p1, p01 = at.get(1.0, hi)["precision"], at.get(0.1, hi)["precision"]
    rises = hi["spearman"] > lo["spearman"] and all(
        b["spearman"] >= a["spearman"] - 0.03 for a, b in zip(curve, curve[1:]))
    shape = "rises with ρ" if rises else "is not monotone in ρ"
    return f"""**Where the curve differs from the paper's.** The paper reports ≈13 % precision@10 % when the
whole gradient is projected (ratio 1.0) and ≈70–80 % when 10 % of the coordinates are kept. Here,
over {n} prompts (top-{top}, so one swap moves precision by {1 / top:.2f}), precision@10 % is {_f(p1)} at
ρ = 1.0 and {_f(p01)} at ρ = 0.1, and Spearman ρ goes from {_f(lo['spearman'])} at ρ = {lo['density']:g} to
{_f(hi['spearman'])} at ρ = {hi['density']:g}: the curve {shape}, the opposite of the paper's. In exact
arithmetic every mask-dense setting is an unbiased JL estimate of the inner products, and dropping
coordinates only adds variance (the kept coordinates stand in for the rest, scaled by 1/ρ;
gradients whose energy sits in few coordinates suffer most), so agreement should fall as ρ shrinks
and be best at ρ = 1.0, where mask-dense is a dense JL map. The paper's low value at ratio 1.0 is
therefore not a property of the projection itself; plausible causes that a {d:,}-parameter model
cannot reproduce are numerical (a 1.5B-dimensional dense projection accumulated in low precision,
or per-block projections combined with inconsistent scaling) or a different "exact" reference. What
transfers is the practical point: a masked projection costs O(ρ·d·k) instead of O(d·k); sjlt goes
further, O(d) whatever k, with the error of a dense map (§1)."""


NOTES = """## Method notes

- Each script prints one JSON line per measurement; `run_all.py` runs them in fresh processes.
- CPU time, not wall time, is the unit because the benchmark box is shared by other jobs; with one
  torch thread the process CPU time is the work the code does. Ratios are taken between
  measurements of the same process on the same inputs.
- Scaled timings (TRAK blocks; dense/mask-dense prefixes) are marked in the `timing` column and rely
  on the per-block / per-coordinate cost being constant, which holds for both implementations.
- Generated data (the warmed tiny model under `.cache/`, task pools and rollouts under
  `benchmarks/.data/`) is cached; a fresh clone builds it first (the `data` step time).
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", action="store_true", help="only rewrite RESULTS.md from results.jsonl")
    ap.add_argument("--only", default=None, help="comma-separated steps to run (others keep their old records)")
    args = ap.parse_args(argv)
    if not args.render:
        only = set(args.only.split(",")) if args.only else None
        new = run(only)
        old = []
        if only and RESULTS_JSONL.exists():
            old = [json.loads(x) for x in RESULTS_JSONL.read_text().splitlines() if x.strip()]
            old = [r for r in old if r.get("bench") not in only and not (r.get("bench") == "run_all" and r.get("step") in only | {"total"})]
        records = old + new
        RESULTS_JSONL.write_text("".join(json.dumps(r, default=float) + "\n" for r in records))
    records = [json.loads(x) for x in RESULTS_JSONL.read_text().splitlines() if x.strip()]
    RESULTS_MD.write_text(render(records))
    print(f"wrote {RESULTS_MD}", file=sys.stderr)


if __name__ == "__main__":
    main()
