"""GPU projection throughput: cropi's Triton kernels against TRAK's CudaProjector and against the
GPU memory-bandwidth bound, at d = 1e8 and 1e9 (docs/scale.md). Needs a CUDA GPU and Triton;
TRAK's CudaProjector also needs its `fast_jl` extension (recorded as unavailable otherwise).

For every d: B gradients [B, d] (--dtype, default bfloat16, standard normal) projected to k.
    triton-sjlt        cropi sjlt, s = 1 (reads every coordinate once; atomic adds into [k, B])
    triton-mask-dense  cropi mask-dense, rho = 0.1, Rademacher (reads the kept 10 %)
    triton-dense       cropi dense, Rademacher (the same work as TRAK's dense JL)
    torch-sjlt         cropi sjlt through the plain torch path on the GPU (CROPI_TRITON=0)
    trak-cuda          TRAK CudaProjector, Rademacher (fast_jl), float32 or float16 input
Time = median of --reps CUDA-event timings after one warm-up call (which compiles the kernels).
The bandwidth bound is the bytes a projector must read (B * d * itemsize; mask-dense: the kept
entries and their int64 index) over the measured device-to-device copy bandwidth (read + write
bytes / time of a 4 GiB copy); `of_bound` = bound time / measured time (1 = at the bound).

One JSON line per measurement (benchmarks/_common.emit), then a Markdown table for
benchmarks/RESULTS.md with --markdown.

    python benchmarks/gpu_projection.py --d 1e8 1e9 --batch 8 --k 8192 --markdown
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from _common import emit, machine, setup

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def gpu_time(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls of fn() after one warm-up call, by CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(device) -> float:
    """Measured device memory bandwidth in bytes/s: read + write bytes of a 4 GiB copy per second."""
    a = torch.empty(1 << 30, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() * a.element_size() / gpu_time(lambda: b.copy_(a), 5)


def trak_cuda(d: int, k: int, B: int, device):
    """TRAK's CudaProjector (Rademacher), or the reason it cannot run here."""
    from trak.projectors import CudaProjector, ProjectionType

    try:
        import fast_jl  # noqa: F401
    except ImportError:
        return None, "fast_jl (TRAK's CUDA projector extension) is not installed"
    if k % 512:
        return None, "CudaProjector needs k divisible by 512"
    return CudaProjector(d, k, 0, ProjectionType.rademacher, device, max_batch_size=min(32, max(8, B))), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=float, nargs="+", default=[1e8, 1e9])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--impls", nargs="+", default=["triton-sjlt", "triton-mask-dense", "triton-dense", "torch-sjlt", "trak-cuda"])
    ap.add_argument("--markdown", action="store_true", help="Also print a Markdown table of the results.")
    args = ap.parse_args()
    setup(threads=os.cpu_count() or 1)
    from cropi import kernels
    from cropi.projection import make_projector

    if not kernels.available():
        raise SystemExit("needs a CUDA GPU and Triton (and CROPI_TRITON not 0)")
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    bw = copy_bandwidth(dev)
    torch.cuda.empty_cache()
    info = {**machine(), "gpu": props.name, "gpu_mem_gib": round(props.total_memory / 2**30, 1),
            "copy_gbps": round(bw / 1e9, 1), "triton": kernels.triton.__version__}
    emit("gpu_projection.machine", **info)
    dtype = DTYPES[args.dtype]
    rows = []
    for d in map(int, args.d):
        x = torch.randn(args.batch, d, device=dev, dtype=dtype)
        item = x.element_size()
        for impl in args.impls:
            rec = {"impl": impl, "d": d, "k": args.k, "batch": args.batch, "dtype": args.dtype}
            proj = None
            try:
                if impl == "trak-cuda":
                    proj, why = trak_cuda(d, args.k, args.batch, dev)
                    if proj is None:
                        rows.append(emit("gpu_projection", **rec, error=why))
                        continue
                    xt = x if dtype != torch.bfloat16 else x.half()  # fast_jl reads float32 / float16
                    rec["dtype"] = str(xt.dtype).removeprefix("torch.")
                    read = xt.numel() * xt.element_size()
                    t = gpu_time(lambda proj=proj, xt=xt: proj.project(xt, model_id=0), args.reps)
                    del xt
                else:
                    kind = impl.split("-", 1)[1]
                    os.environ["CROPI_TRITON"] = "0" if impl.startswith("torch") else "1"
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    proj = make_projector(kind, d, args.k, 0, density=0.1, device=dev)  # mask-dense: kept index
                    end.record()
                    torch.cuda.synchronize()
                    rec["setup_s"] = round(start.elapsed_time(end) / 1e3, 3)
                    read = x.numel() * item if kind != "mask-dense" else args.batch * proj.m * item + proj.m * 8
                    t = gpu_time(lambda proj=proj, x=x: proj.project(x), args.reps)
                bound = read / bw
                rec.update(seconds=round(t, 5), grads_per_s=round(args.batch / t, 2), read_gb=round(read / 1e9, 3),
                           gbps=round(read / t / 1e9, 1), bound_s=round(bound, 5), of_bound=round(bound / t, 3))
            except (RuntimeError, ValueError) as e:  # out of memory, fast_jl limits...
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            finally:
                os.environ.pop("CROPI_TRITON", None)
                del proj
                torch.cuda.empty_cache()
            rows.append(emit("gpu_projection", **rec))
        del x
        torch.cuda.empty_cache()
    if args.markdown:
        print(f"\n{info['gpu']}, copy bandwidth {info['copy_gbps']} GB/s, B = {args.batch}, k = {args.k}\n")
        print("| d | impl | dtype | seconds | grads/s | GB/s read | bound s | of bound | setup s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if "error" in r:
                print(f"| {r['d']:.0e} | {r['impl']} | {r['dtype']} | {r['error']} | | | | | |")
            else:
                print(f"| {r['d']:.0e} | {r['impl']} | {r['dtype']} | {r['seconds']} | {r['grads_per_s']} | {r['gbps']} "
                      f"| {r['bound_s']} | {r['of_bound']} | {r.get('setup_s', '')} |")


if __name__ == "__main__":
    main()
