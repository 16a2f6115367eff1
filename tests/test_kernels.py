"""Triton projection kernels: the kernels' integer math (run on numpy on the CPU) against
projection.hash32 and the CPU projectors bit for bit; on a CUDA GPU with Triton, kernel results
against the CPU projector within the tolerances stated in cropi.kernels."""

import math

import numpy as np
import pytest
import torch

from cropi import kernels
from cropi.projection import _keys, hash32, kept_index, make_projector

M32 = 0xFFFFFFFF


def np_hash(seed, idx: np.ndarray) -> np.ndarray:
    """The kernels' hash evaluated on numpy uint32 arrays; idx: int64 / uint64 array."""
    idx = np.asarray(idx, dtype=np.uint64)
    lo = (idx & np.uint64(M32)).astype(np.uint32)
    hi = (idx >> np.uint64(32)).astype(np.uint32)
    return kernels.murmur3_le64(np.asarray(seed, dtype=np.uint32), lo, hi)


# ---------------------------------------------------------------------------- CPU: shared integer math


def test_kernel_hash_matches_hash32_bit_for_bit():
    rng = np.random.default_rng(0)
    idx = np.concatenate([
        np.array([0, 1, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**33 + 7, 2**62 + 12345, 2**63 - 1]),
        rng.integers(0, 2**63 - 1, size=5000, dtype=np.int64),
        rng.integers(0, 2**33, size=5000, dtype=np.int64),
    ])
    for seed in (0, 1, 0x9747B28C, 0xFFFFFFFF, int(rng.integers(0, 2**32))):
        got = np_hash(seed, idx)
        assert got.dtype == np.uint32
        want = hash32(seed, torch.from_numpy(idx)).numpy()
        np.testing.assert_array_equal(got.astype(np.int64), want)
    seeds = rng.integers(0, 2**32, size=(7, 1), dtype=np.int64)  # broadcast seeds x coordinates
    np.testing.assert_array_equal(np_hash(seeds, idx[None, :50]).astype(np.int64),
                                  hash32(torch.from_numpy(seeds), torch.from_numpy(idx[None, :50])).numpy())


@pytest.mark.parametrize("s", [1, 4])
def test_kernel_sjlt_math_reproduces_cpu_projector(s):
    d, k, seed, n = 2**34, 96, 9, 3000
    proj = make_projector("sjlt", d, k, seed, s=s)
    keys = _keys(seed, 2, torch.arange(s)).numpy()
    rng = np.random.default_rng(1)
    x = rng.integers(-8, 9, size=(3, n)).astype(np.float64)  # small integers: every sum is exact
    w = k // s
    for offset in (0, 2**32 - 1000, 2**33 + 5):
        i = np.arange(offset, offset + n, dtype=np.int64)
        out = np.zeros((3, k))
        for j in range(s):
            h = np_hash(keys[j], i).astype(np.int64)
            bucket = kernels.sjlt_bucket(h, j, w)
            assert bucket.min() >= j * w and bucket.max() < (j + 1) * w
            np.add.at(out.T, bucket, (np.where(h & 1, -1.0, 1.0) * x).T)
        got = proj.project(torch.from_numpy(x), offset).double().numpy() * math.sqrt(s)  # 1/sqrt(4) is exact
        np.testing.assert_array_equal(got, out)


def test_kernel_sjlt_bucket_is_the_documented_formula():
    h = np.array([0, 1, 2, 3, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1], dtype=np.int64)
    for slot, w in ((0, 1), (0, 8192), (3, 1000), (7, 2**20)):
        want = [slot * w + (int(v) // 2) * w // 2**31 for v in h]
        assert kernels.sjlt_bucket(h, slot, w).tolist() == want
        assert kernels.sjlt_bucket(torch.from_numpy(h), slot, w).tolist() == want  # torch int64 too


def test_kernel_rademacher_bit_patterns_are_the_cpu_entries():
    d, k, seed = 2**33 + 100, 96, 4
    proj = make_projector("dense", d, k, seed)
    keys = _keys(seed, 3, torch.arange(k // 32)).numpy()
    coords = np.array([0, 1, 77, 2**32 - 1, 2**32, 2**33 + 99], dtype=np.int64)
    h = np_hash(keys[None, :], coords[:, None])  # [n, k/32]
    sign = kernels.rademacher_sign16(h[:, :, None], np.arange(32)[None, None, :]).reshape(len(coords), k)
    assert set(np.unique(sign).tolist()) <= {0, 0x8000}
    as_fp16 = (sign | 0x3C00).astype(np.uint16).view(np.float16).astype(np.float64)
    as_bf16 = torch.from_numpy((sign | 0x3F80).astype(np.int16)).view(torch.bfloat16).double().numpy()
    np.testing.assert_array_equal(as_fp16, as_bf16)
    want = np.stack([proj.project(torch.ones(1, 1), int(i))[0].numpy() for i in coords])  # columns of P, fp32
    np.testing.assert_array_equal(as_fp16.astype(np.float32) * np.float32(1 / math.sqrt(k)), want)


def test_cpu_projectors_never_dispatch_to_kernels():
    for kind in ("sjlt", "dense", "mask-dense"):
        assert make_projector(kind, 1000, 64, 0)._gpu is None


# ---------------------------------------------------------------------------- GPU (CUDA + Triton)

gpu = pytest.mark.skipif(not kernels.available(), reason="needs a CUDA GPU and Triton")
TOL = 1e-6  # documented in cropi.kernels: max_r |gpu - cpu| <= TOL * u * ||x_b||_1


def _unit(p) -> float:
    """Largest |entry| of p's Rademacher / sjlt matrix (the Gaussian unit scale)."""
    if p.kind == "sjlt":
        return 1 / math.sqrt(p.s)
    return (math.sqrt(p.d / p.m) if p.kind == "mask-dense" else 1.0) / math.sqrt(p.k)


def _check(p, x, gpu_out, cpu_out):
    assert gpu_out.dtype == torch.float32 and gpu_out.shape == cpu_out.shape
    err = (gpu_out.cpu().double() - cpu_out.double()).abs().amax(1)
    bound = TOL * _unit(p) * torch.linalg.vector_norm(x, 1, dim=1, dtype=torch.float64).cpu()
    assert (err <= bound).all(), (err, bound)


CASES = [
    ("sjlt", "rademacher", 1), ("sjlt", "rademacher", 4),
    ("dense", "rademacher", 1), ("dense", "gaussian", 1),
    ("mask-dense", "rademacher", 1), ("mask-dense", "gaussian", 1),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind,dist,s", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_kernels_equal_cpu_projector(kind, dist, s, dtype):
    d, k, seed = (300_007, 1000, 123) if kind == "sjlt" else (50_021, 999, 123)  # odd k: partial tiles
    cpu = make_projector(kind, d, k, seed, s=s, dist=dist, density=0.1)
    dev = make_projector(kind, d, k, seed, s=s, dist=dist, density=0.1, device="cuda")
    assert dev._gpu is kernels
    g = torch.Generator().manual_seed(0)
    for B in (1, 5, 19):  # 19 > the kernels' 16-row launches
        x = torch.randn(B, d, generator=g).to(dtype)
        _check(cpu, x, dev.project(x.cuda()), cpu.project(x))
        lo, n = d // 3, d // 2  # a block at an offset
        _check(cpu, x[:, lo:lo + n], dev.project(x[:, lo:lo + n].cuda(), lo), cpu.project(x[:, lo:lo + n], lo))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", ["sjlt", "dense"])
def test_gpu_kernels_64bit_coordinates(kind):
    d, k, seed, n = 2**34, 256, 5, 20_000
    cpu, dev = make_projector(kind, d, k, seed), make_projector(kind, d, k, seed, device="cuda")
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(1))
    for offset in (2**31 - 7_000, 2**32 - 7_000, 2**33 + 11):
        _check(cpu, x, dev.project(x.cuda(), offset), cpu.project(x, offset))


@pytest.mark.gpu
@gpu
def test_gpu_mask_dense_keeps_the_cpu_coordinates_and_is_reproducible():
    d, rho, seed = 3_000_017, 0.1, 8
    np.testing.assert_array_equal(kept_index(d, rho, seed, "cuda").cpu().numpy(), kept_index(d, rho, seed).numpy())
    dev = make_projector("mask-dense", d, 512, seed, density=rho, device="cuda")
    x = torch.randn(4, d, device="cuda")
    assert torch.equal(dev.project(x), dev.project(x))  # fixed split partials: bitwise reproducible


@pytest.mark.gpu
@pytest.mark.slow
@gpu
@pytest.mark.parametrize("kind", ["sjlt", "dense"])
def test_gpu_batches_beyond_2_to_the_32_entries(kind):
    """Row 1 of a [2, 2^31 + 2^20] bf16 batch starts past element 2^31 and ends past 2^32: its
    projection must equal the projection of the same row launched on its own."""
    n = 2**31 + 2**20
    if torch.cuda.get_device_properties(0).total_memory < 3 * 2 * n * 2:
        pytest.skip("needs ~13 GB of GPU memory")
    dev = make_projector(kind, n, 128, 3, device="cuda")
    x = torch.empty(2, n, dtype=torch.bfloat16, device="cuda").normal_(generator=torch.Generator("cuda").manual_seed(0))
    both = dev.project(x)
    for r in (0, 1):
        _check(dev, x[r:r + 1], both[r:r + 1], dev.project(x[r:r + 1]).cpu())
