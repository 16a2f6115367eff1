"""Random projections: hash vs a pure-Python MurmurHash3, projectors vs explicit matrices built
from the documented generation rules, block additivity, unbiasedness, 1/sqrt(k) error, ranking."""

import json
import math

import numpy as np
import pytest
import torch

from cropi import projection
from cropi.projection import (
    PROJECTORS,
    hash32,
    incompatibility,
    kept_index,
    make_projector,
    mask_size,
)

M32 = 0xFFFFFFFF


def _rotl(v, r):
    return ((v << r) | (v >> (32 - r))) & M32


def murmur3_32(data: bytes, seed: int) -> int:
    """Plain-Python MurmurHash3 x86_32 (Appleby's reference algorithm) of arbitrary bytes."""
    c1, c2 = 0xCC9E2D51, 0x1B873593
    h = seed & M32
    n = len(data) // 4
    for b in range(n):
        k1 = int.from_bytes(data[4 * b:4 * b + 4], "little")
        k1 = _rotl((k1 * c1) & M32, 15) * c2 & M32
        h = (_rotl(h ^ k1, 13) * 5 + 0xE6546B64) & M32
    tail = data[4 * n:]
    k1 = 0
    for j in reversed(range(len(tail))):
        k1 ^= tail[j] << (8 * j)
    if tail:
        h ^= _rotl((k1 * c1) & M32, 15) * c2 & M32
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def ref_hash(seed: int, i: int) -> int:
    return murmur3_32(i.to_bytes(8, "little"), seed)


def ref_key(seed: int, stream: int, slot: int) -> int:
    return ref_hash(ref_hash(0x243F6A88, seed), (stream << 32) | slot)


def ref_dense_entry(seed, dist, k, r, i):
    if dist == "rademacher":
        bit = (ref_hash(ref_key(seed, 3, r // 32), i) >> (r % 32)) & 1
        return (1 - 2 * bit) / math.sqrt(k)
    q = r // 2
    u1 = ((ref_hash(ref_key(seed, 4, 2 * q), i) >> 8) + 0.5) / 2**24
    u2 = (ref_hash(ref_key(seed, 4, 2 * q + 1), i) >> 8) / 2**24
    trig = math.cos if r % 2 == 0 else math.sin
    return math.sqrt(-2 * math.log(u1)) * trig(2 * math.pi * u2) / math.sqrt(k)


def ref_sjlt_matrix(seed, d, k, s, coords):
    """Explicit [k, len(coords)] count-sketch matrix from the documented rules."""
    p = np.zeros((k, len(coords)))
    w = k // s
    for c, i in enumerate(coords):
        for j in range(s):
            h = ref_hash(ref_key(seed, 2, j), i)
            p[j * w + (((h >> 1) * w) >> 31), c] = (-1 if h & 1 else 1) / math.sqrt(s)
    return p


def pairs(n, d, corr=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = corr * x + torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, y


# ------------------------------------------------------------------------------- hash


def test_reference_murmur3_matches_published_vectors():
    vectors = [
        (b"", 0, 0),
        (b"", 1, 0x514E28B7),
        (b"", 0xFFFFFFFF, 0x81F16F39),
        (b"\0\0\0\0", 0, 0x2362F9DE),
        (b"aaaa", 0x9747B28C, 0x5A97808A),
        (b"Hello, world!", 0x9747B28C, 0x24884CBA),
        (b"The quick brown fox jumps over the lazy dog", 0x9747B28C, 0x2FA826CD),
    ]
    for data, seed, want in vectors:
        assert murmur3_32(data, seed) == want, data


def test_hash32_matches_reference():
    idx = [0, 1, 2, 255, 2**31, 2**32 - 1, 2**32, 2**33 + 7, 2**62 + 12345, 2**63 - 1]
    for seed in (0, 1, 0x9747B28C, 0xFFFFFFFF):
        got = hash32(seed, torch.tensor(idx)).tolist()
        assert got == [ref_hash(seed, i) for i in idx]
    seeds = torch.tensor([[3], [0xDEADBEEF]])
    got = hash32(seeds, torch.tensor(idx)[None, :])
    assert got.shape == (2, len(idx))
    assert got[1].tolist() == [ref_hash(0xDEADBEEF, i) for i in idx]
    assert int(hash32(0, torch.tensor([0]))) == murmur3_32(bytes(8), 0)


# -------------------------------------------------------------- explicit matrices


@pytest.mark.parametrize("s", [1, 2])
def test_sjlt_equals_explicit_matrix_including_64bit_offsets(s):
    d, k, seed = 2**34, 70, 5
    proj = make_projector("sjlt", d, k, seed, s=s)
    x = torch.randn(3, 40, dtype=torch.float64)
    for offset in (0, 2**33 + 5):
        p = ref_sjlt_matrix(seed, d, k, s, range(offset, offset + 40))
        np.testing.assert_allclose(proj.project(x, offset).numpy(), x.numpy() @ p.T, atol=1e-5)


@pytest.mark.parametrize("dist,k", [("rademacher", 69), ("gaussian", 69), ("rademacher", 8)])
def test_dense_equals_explicit_matrix(dist, k):
    d, seed = 30, 11
    p = np.array([[ref_dense_entry(seed, dist, k, r, i) for i in range(d)] for r in range(k)])
    x = torch.randn(4, d, dtype=torch.float64)
    out = make_projector("dense", d, k, seed, dist=dist).project(x)
    np.testing.assert_allclose(out.numpy(), x.numpy() @ p.T, atol=2e-5)


def test_mask_dense_equals_explicit_matrix():
    d, k, seed, rho = 300, 40, 3, 0.1
    mkey = ref_key(seed, 1, 0)
    kept = sorted(sorted(range(d), key=lambda i: (ref_hash(mkey, i), i))[:30])
    p = np.zeros((k, d))
    for i in kept:
        p[:, i] = [math.sqrt(d / 30) * ref_dense_entry(seed, "rademacher", k, r, i) for r in range(k)]
    x = torch.randn(2, d, dtype=torch.float64)
    out = make_projector("mask-dense", d, k, seed, density=rho).project(x)
    np.testing.assert_allclose(out.numpy(), x.numpy() @ p.T, atol=1e-4)


def test_sjlt_columns_have_s_distinct_entries():
    d, k, s = 500, 64, 4
    p = make_projector("sjlt", d, k, 1, s=s).project(torch.eye(d))  # [d, k]: row i = P e_i
    nz = p != 0
    assert (nz.sum(1) == s).all()
    assert torch.allclose(p[nz].abs(), torch.full_like(p[nz], 1 / math.sqrt(s)))


# ------------------------------------------------------------------ mask selection


@pytest.mark.parametrize(
    "d,rho,m", [(30, 0.1, 3), (1000, 0.1, 100), (12345, 0.37, 4568), (7, 1e-3, 1), (10, 1.0, 10)]
)
def test_mask_size_is_exact_ceiling(d, rho, m):
    assert mask_size(d, rho) == m


def test_kept_index_is_smallest_hashes_across_chunks(monkeypatch):
    d, seed, rho = 20000, 9, 0.1
    h = hash32(int(projection._keys(seed, 1, torch.tensor(0))), torch.arange(d))
    want = torch.sort(torch.argsort(h, stable=True)[:2000]).values
    kept_index.cache_clear()
    monkeypatch.setattr(projection, "_MASK_CHUNK", 777)  # many chunks, boundary bin spans them
    got = kept_index(d, rho, seed)
    kept_index.cache_clear()
    assert torch.equal(got, want)
    # the projector's nonzero columns are exactly the kept coordinates
    p = make_projector("mask-dense", 600, 16, seed, density=0.25).project(torch.eye(600))
    cols = torch.nonzero(p.abs().sum(1)).flatten()
    assert len(cols) == mask_size(600, 0.25) == 150
    assert torch.equal(cols, kept_index(600, 0.25, seed))


# ------------------------------------------------------------ determinism / blocks


SETTINGS = [
    ("sjlt", {}), ("sjlt", {"s": 4}), ("mask-dense", {}), ("dense", {}),
    ("dense", {"dist": "gaussian"}), ("mask-dense", {"dist": "gaussian"}), ("trak", {}),
]


@pytest.mark.parametrize("kind,kw", SETTINGS)
def test_deterministic_and_seed_dependent(kind, kw):
    x = torch.randn(3, 1000)
    a = make_projector(kind, 1000, 64, 7, **kw).project(x)
    b = make_projector(kind, 1000, 64, 7, **kw).project(x)
    c = make_projector(kind, 1000, 64, 8, **kw).project(x)
    assert a.dtype == torch.float32 and a.shape == (3, 64)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize(
    "kind,d,kw",
    [
        ("sjlt", 2**33 + 4000, {}),
        ("sjlt", 2**33 + 4000, {"s": 2}),
        ("mask-dense", 2**33 + 4000, {"density": 1.0}),  # 64-bit dense path, no O(d) mask
        ("mask-dense", 5000, {}),
        ("mask-dense", 5000, {"dist": "gaussian"}),
        ("dense", 5000, {}),
        ("identity", 5000, {}),
    ],
)
def test_block_additivity(kind, d, kw):
    k = d if kind == "identity" else 96
    proj = make_projector(kind, d, k, 3, **kw)
    base = d - 3000 if d > 2**32 else 1000
    x = torch.randn(2, 1500)
    whole = proj.project(x, base)
    cuts = [0, *sorted(np.random.default_rng(0).choice(np.arange(1, 1500), 6, replace=False)), 1500]
    parts = sum(proj.project(x[:, a:b], base + int(a)) for a, b in zip(cuts[:-1], cuts[1:]))
    torch.testing.assert_close(parts, whole, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind,kw", [("sjlt", {}), ("sjlt", {"s": 2}), ("dense", {})])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_half_and_double_inputs_are_projected_in_float32(kind, kw, dtype):
    """Against the explicit matrix of the documented rules applied in float64 to the input's exact
    values: a float32 product agrees to ~1e-6 of the output's scale; a product in bf16/fp16 (or
    an input rounded to them) would be off by ~1e-3 to 1e-2."""
    d, k, seed = 300, 32, 4
    if kind == "sjlt":
        p = ref_sjlt_matrix(seed, d, k, kw.get("s", 1), range(d))
    else:
        p = np.array([[ref_dense_entry(seed, "rademacher", k, r, i) for i in range(d)] for r in range(k)])
    x = (torch.randn(2, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3).to(dtype)
    out = make_projector(kind, d, k, seed, **kw).project(x)
    want = x.double().numpy() @ p.T
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=2e-6 * np.abs(want).max())


# ------------------------------------------------------------------- statistics


@pytest.mark.parametrize(
    "kind,kw", [("sjlt", {}), ("sjlt", {"s": 4}), ("mask-dense", {}), ("dense", {}),
                ("dense", {"dist": "gaussian"})]
)
def test_inner_products_unbiased_over_seeds(kind, kw):
    d, k, n_seeds = 64, 16, 300
    x, y = pairs(1, d, seed=1)
    truth = float(x @ y.T)
    est = torch.tensor([
        float((lambda p: p.project(x).double() @ p.project(y).double().T)(make_projector(kind, d, k, sd, **kw)))
        for sd in range(n_seeds)
    ])
    se = float(est.std()) / math.sqrt(n_seeds)
    assert abs(float(est.mean()) - truth) < 4 * se, (float(est.mean()), truth, se)
    assert se < 0.25 * abs(truth)  # the test has power


@pytest.mark.parametrize("kind", ["sjlt", "mask-dense", "dense"])
def test_error_shrinks_like_inverse_sqrt_k(kind):
    d, n = 2048, 32
    if kind == "mask-dense":
        # x_i * y_i == 1 for every i, so an exact-count mask is exact: the error left is the JL part
        g = torch.Generator().manual_seed(2)
        u = 0.5 + 1.5 * torch.rand(n, d, generator=g, dtype=torch.float64)
        sign = torch.randint(0, 2, (n, d), generator=g).double() * 2 - 1
        x, y = sign * u, sign / u
    else:
        x, y = pairs(n, d, seed=2)
    truth = (x * y).sum(1)
    scale = x.norm(dim=1) * y.norm(dim=1)
    ks = [64, 256, 1024, 4096]
    rms = []
    for k in ks:
        errs = []
        for sd in range(3):
            p = make_projector(kind, d, k, sd)
            errs.append(((p.project(x).double() * p.project(y).double()).sum(1) - truth) / scale)
        rms.append(float(torch.cat(errs).pow(2).mean().sqrt()))
    slope = np.polyfit(np.log(ks), np.log(rms), 1)[0]
    assert -0.65 <= slope <= -0.35, (slope, rms)


def test_planted_top10_recovered():
    d, n = 8000, 200
    g = torch.Generator().manual_seed(4)
    t = torch.randn(d, generator=g)
    a = torch.cat([0.25 + 0.25 * torch.rand(20, generator=g), -0.2 + 0.4 * torch.rand(180, generator=g)])
    xs = a[:, None] * t + torch.randn(n, d, generator=g)

    def top(kind, k):
        p = make_projector(kind, d, k, 0)
        cos = torch.nn.functional.cosine_similarity(p.project(xs), p.project(t[None]), dim=1)
        return set(torch.topk(cos, 20).indices.tolist())

    exact = top("identity", d)
    assert len(exact & set(range(20))) >= 18  # the plant is what identity ranks on top
    for kind in ("sjlt", "mask-dense"):
        assert len(top(kind, 1024) & exact) / 20 >= 0.8, kind


def test_trak_wrapper_matches_trak_and_dense_statistics():
    from trak.projectors import BasicProjector

    d, k = 3000, 256
    x, y = pairs(60, d, seed=5)
    x, y = x.float(), y.float()
    wrap = make_projector("trak", d, k, 0)
    raw = BasicProjector(d, k, 0, "rademacher", "cpu", block_size=100).project(x, model_id=0)
    torch.testing.assert_close(wrap.project(x), raw / math.sqrt(k))

    true_cos = torch.nn.functional.cosine_similarity(x, y, dim=1)
    cos_err, norm_ratio = {}, {}
    for kind in ("trak", "dense"):
        p = make_projector(kind, d, k, 0)
        px, py = p.project(x), p.project(y)
        cos_err[kind] = float((torch.nn.functional.cosine_similarity(px, py, dim=1) - true_cos).abs().mean())
        norm_ratio[kind] = float((px.norm(dim=1) ** 2 / x.norm(dim=1) ** 2).mean())
    assert 0.5 < cos_err["trak"] / cos_err["dense"] < 2.0, cos_err
    for kind, r in norm_ratio.items():
        assert abs(r - 1) < 0.05, (kind, r)  # both scaled so E|Px|^2 = |x|^2
    with pytest.raises(ValueError, match="whole vectors"):
        wrap.project(x[:, :100], 0)


# ------------------------------------------------------------------ meta / errors


def test_meta_and_incompatibility():
    a = make_projector("sjlt", 1000, 64, 1).meta()
    assert json.loads(json.dumps(a)) == a
    assert {"kind", "d", "k", "seed", "density", "s", "dist"} <= set(a)
    assert incompatibility(a, make_projector("sjlt", 1000, 64, 1, density=0.3).meta()) is None
    assert "k" in incompatibility(a, make_projector("sjlt", 1000, 32, 1).meta())
    assert "seed" in incompatibility(a, make_projector("sjlt", 1000, 64, 2).meta())
    assert "kind" in incompatibility(a, make_projector("dense", 1000, 64, 1).meta())
    md = make_projector("mask-dense", 1000, 64, 1).meta()
    assert "density" in incompatibility(md, make_projector("mask-dense", 1000, 64, 1, density=0.2).meta())
    assert "dist" in incompatibility(md, make_projector("mask-dense", 1000, 64, 1, dist="gaussian").meta())
    assert set(PROJECTORS) == {"sjlt", "mask-dense", "dense", "identity", "trak"}


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="k == d"):
        make_projector("identity", 100, 64)
    with pytest.raises(ValueError, match="unknown projector"):
        make_projector("fft", 100, 64)
    with pytest.raises(ValueError, match="k % s"):
        make_projector("sjlt", 100, 64, s=3)
    with pytest.raises(ValueError, match="dist"):
        make_projector("dense", 100, 64, dist="uniform")
    p = make_projector("sjlt", 100, 8)
    with pytest.raises(ValueError, match="outside"):
        p.project(torch.zeros(1, 10), 95)
    with pytest.raises(ValueError, match="2-D"):
        p.project(torch.zeros(10))
    with pytest.raises(TypeError):
        p.project(torch.zeros(1, 10, dtype=torch.int64))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind,kw", [("sjlt", {}), ("sjlt", {"s": 2}), ("mask-dense", {}), ("dense", {}),
                                     ("dense", {"dist": "gaussian"})])
def test_cuda_matches_cpu(kind, kw):
    idx = torch.tensor([0, 5, 2**32 + 1, 2**62 + 3])
    assert torch.equal(hash32(7, idx.cuda()).cpu(), hash32(7, idx))
    x = torch.randn(4, 3000)
    cpu = make_projector(kind, 3000, 256, 1, **kw).project(x, 0)
    gpu = make_projector(kind, 3000, 256, 1, device="cuda", **kw).project(x.cuda(), 0)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
