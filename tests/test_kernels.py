"""Triton projection kernels: the kernels' integer math (run on numpy on the CPU) against
projection.hash32 and the CPU projectors bit for bit; the kernels themselves against the CPU
projector within the tolerances stated in cropi.kernels, on a CUDA GPU (backend "cuda", marked
gpu) and on the CPU under Triton's interpreter (backend "interpret").

The interpreter replaces ``triton.jit`` when TRITON_INTERPRET=1 is set before Triton is imported,
so the "interpret" cases run in a child pytest that ``test_kernels_on_the_cpu``
starts with that variable (in the parent they skip). What the interpreter does not run: the
compiled kernels (PTX, layouts, registers, num_warps), concurrent atomics (its programs run one
after another), tensor-core summation order and speed; and its ``tl.dot`` multiplies bfloat16
operands as their raw uint16 bit patterns (triton 3.7.1), so the child converts bfloat16 dot
operands to float32 first (products of bfloat16 values are exact in float32, as on tensor cores).
Batches with more than 2^32 entries need ~13 GB and run on CUDA only; the interpreter checks
coordinates beyond 2^32 through the offset argument.
"""

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

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


# ---------------------------------------------------------------------------- kernels: CUDA or interpreter

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and kernels.triton is not None
BACKENDS = [
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not kernels.available(),
                                                                    reason="needs a CUDA GPU and Triton")]),
    pytest.param("interpret", marks=pytest.mark.skipif(not INTERPRET, reason="runs in the child pytest of "
                                                       "test_kernels_on_the_cpu")),
]
gpu = pytest.mark.skipif(not kernels.available(), reason="needs a CUDA GPU and Triton")
TOL = 1e-6  # documented in cropi.kernels: max_r |gpu - cpu| <= TOL * u * ||x_b||_1


def _bf16_dot_as_fp32(monkeypatch):
    """Triton 3.7.1's interpreter runs tl.dot as np.matmul of the operands' storage, which for
    bfloat16 is uint16 bit patterns; give it the float32 values (exact for bfloat16)."""
    from triton.runtime import interpreter

    dot = interpreter.InterpreterBuilder.create_dot

    def as_fp32(h):
        if h.get_element_ty() != kernels.tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), kernels.tl.float32)

    def create_dot(self, a, b, d, *args):
        return dot(self, as_fp32(a), as_fp32(b), d, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


@pytest.fixture
def launch(request, monkeypatch):
    """(backend, project(cpu_projector, x, offset) -> [B, k] fp32 through the kernels)."""
    if request.param == "cuda":
        def project(cpu, x, offset=0):
            dev = make_projector(cpu.kind, cpu.d, cpu.k, cpu.seed, s=cpu.s, dist=cpu.dist, density=cpu.density,
                                 device="cuda")
            assert dev._gpu is kernels
            return dev.project(x.cuda(), offset)
        return "cuda", project
    _bf16_dot_as_fp32(monkeypatch)
    # 8 "SMs": the dense kernel then cuts the coordinates into several split partials, as on a GPU
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 8)
    return "interpret", lambda cpu, x, offset=0: kernels.project(cpu, x, offset)


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
# (d, k) per backend; odd k: partial row tiles (the interpreter's 259 = 2 tiles of 128 + 3)
SIZES = {"cuda": {"sjlt": (300_007, 1000), "dense": (50_021, 999)},
         "interpret": {"sjlt": (3_001, 200), "dense": (515, 259)}}


@pytest.mark.parametrize("launch", BACKENDS, indirect=True)
@pytest.mark.parametrize("kind,dist,s", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_equal_cpu_projector(launch, kind, dist, s, dtype):
    backend, project = launch
    d, k = SIZES[backend]["sjlt" if kind == "sjlt" else "dense"]
    cpu = make_projector(kind, d, k, 123, s=s, dist=dist, density=0.1)
    g = torch.Generator().manual_seed(0)
    for B in (1, 5, 19) if backend == "cuda" else (3, 19):  # 19 > the kernels' 16-row launches
        x = torch.randn(B, d, generator=g).to(dtype)
        _check(cpu, x, project(cpu, x), cpu.project(x))
        lo, n = d // 3, d // 2  # a block at an offset
        _check(cpu, x[:, lo:lo + n], project(cpu, x[:, lo:lo + n], lo), cpu.project(x[:, lo:lo + n], lo))


@pytest.mark.parametrize("launch", BACKENDS, indirect=True)
@pytest.mark.parametrize("kind", ["sjlt", "dense"])
def test_kernels_64bit_coordinates(launch, kind):
    backend, project = launch
    d, k, seed = 2**34, 256, 5
    n = 20_000 if backend == "cuda" else 600
    cpu = make_projector(kind, d, k, seed)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(1))
    for offset in (2**31 - n // 3, 2**32 - n // 3, 2**33 + 11):  # blocks across 2^31 and 2^32, and past 2^33
        _check(cpu, x, project(cpu, x, offset), cpu.project(x, offset))


def test_kernels_on_the_cpu(tmp_path):
    """Run this module's "interpret" cases in a child pytest with TRITON_INTERPRET=1 (the variable
    must be set before Triton is imported). Every case must run and pass."""
    if INTERPRET:
        pytest.skip("this is the child")
    if kernels.triton is None:
        pytest.skip("Triton is not installed (the dev extra pins it)")
    report = tmp_path / "report.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interpret",
                          f"--junitxml={report}"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    import xml.etree.ElementTree as ET

    suite = ET.parse(report).getroot().find("testsuite")
    n_cases = 3 * len(CASES) + 2
    assert int(suite.get("tests")) == n_cases and int(suite.get("skipped")) == 0, json.dumps(suite.attrib)


def test_available_needs_triton_3(monkeypatch, capsys):
    """An older Triton on a CUDA host: no kernels (torch path), one notice line, said once."""
    from cropi import projection

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "_NOTICE", [])
    monkeypatch.delenv("CROPI_TRITON", raising=False)
    monkeypatch.setattr(kernels, "triton", types.SimpleNamespace(__version__="2.3.1"))
    assert not kernels.available() and not kernels.available()
    assert projection._gpu_kernels(torch.device("cuda")) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Triton 2.3.1 is older than 3.0" in err and "torch path" in err
    for v in ("3.0.0", "3.7.1", "3.10.0+git0123abc"):
        monkeypatch.setattr(kernels, "triton", types.SimpleNamespace(__version__=v))
        assert kernels.available()
    monkeypatch.setenv("CROPI_TRITON", "0")
    assert not kernels.available()
    assert capsys.readouterr().err == ""


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
