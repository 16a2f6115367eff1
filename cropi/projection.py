"""Seeded random projections P: R^d -> R^k for per-prompt gradients (docs/design.md).

No projector stores a d x k matrix. Every random entry is a pure function of
(seed, global coordinate index, row/bucket slot) through ``hash32`` (MurmurHash3 x86_32 of
the 64-bit coordinate index), so a gradient can be projected in blocks at any offsets and
the block results sum to the projection of the whole vector, and a GPU kernel can
regenerate the same entries in-kernel from the rules below.

All projectors are scaled so that E_P[<Px, Py>] = <x, y>.

Generation rules (uint32 arithmetic; i = global coordinate index, 0 <= i < d < 2^63):

    base      = hash32(0x243F6A88, seed)                       seed as a 64-bit index
    key(t, j) = hash32(base, (t << 32) | j)                     stream t, slot j
    sjlt:       h = hash32(key(2, j), i) for slot j < s; w = k // s
                bucket = j * w + (((h >> 1) * w) >> 31);  sign = -1 if h & 1 else +1
                P[bucket, i] = sign / sqrt(s)
    rademacher: h = hash32(key(3, r // 32), i);  P[r, i] = (1 - 2 * ((h >> (r % 32)) & 1)) / sqrt(k)
    gaussian:   rows 2q, 2q+1 by Box-Muller from u1 = ((hash32(key(4, 2q), i) >> 8) + 0.5) / 2^24
                and u2 = (hash32(key(4, 2q + 1), i) >> 8) / 2^24:
                P[2q, i] = sqrt(-2 ln u1) cos(2 pi u2) / sqrt(k),  P[2q+1, i] = ... sin(...) / sqrt(k)
    mask-dense: keep the m = ceil(rho * d) coordinates with the smallest hash32(key(1, 0), i)
                (ties by i), then P[r, i] = sqrt(d / m) * dense[r, i] on kept i, 0 elsewhere.
"""

import math
import operator
from collections import OrderedDict
from fractions import Fraction
from functools import lru_cache

import torch

PROJECTORS = ("sjlt", "mask-dense", "dense", "identity", "trak")
DISTS = ("rademacher", "gaussian")
HASH_VERSION = "murmur3_x86_32-le64/v1"

_M32 = 0xFFFFFFFF
_SEED_KEY = 0x243F6A88
_STREAM_MASK, _STREAM_SJLT, _STREAM_RADEMACHER, _STREAM_GAUSSIAN = 1, 2, 3, 4
_MASK_CHUNK = 1 << 22  # coordinates hashed per pass step when choosing the mask-dense subset
_GEN_ENTRIES = 1 << 21  # dense entries generated per chunk (8 MiB of float32)
_SJLT_CHUNK = 1 << 22  # coordinates hashed (or widened to int64) per step
TRAK_MAX_D = 1 << 24  # trak projects whole flat vectors: refused above this many parameters
_META_KEYS = ("kind", "d", "k", "seed", "density", "s", "dist", "hash", "impl")


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for int64 h in [0, 2^32) and a 32-bit constant c, never above 2^49."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _rotl32(h: torch.Tensor, r: int) -> torch.Tensor:
    return ((h << r) & _M32) | (h >> (32 - r))


def hash32(seed, idx: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 x86_32 of the 8 little-endian bytes of idx, with 32-bit seed.

    seed: int or int64 tensor in [0, 2^32) (broadcast against idx). idx: int64 tensor of
    indices in [0, 2^63). Returns an int64 tensor in [0, 2^32), shape broadcast(seed, idx).
    Evaluated in int64 with explicit & 0xFFFFFFFF masks; no intermediate exceeds 2^49.

    With lo = idx & 0xFFFFFFFF and hi = idx >> 32, all arithmetic mod 2^32:
        h = seed
        for b in (lo, hi):
            b = rotl(b * 0xCC9E2D51, 15) * 0x1B873593
            h = rotl(h ^ b, 13) * 5 + 0xE6546B64
        h ^= 8                                   (input length in bytes)
        h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16   (fmix32)
    """
    idx = torch.as_tensor(idx, dtype=torch.int64)
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor(int(seed) & _M32, dtype=torch.int64, device=idx.device)
    h = seed
    for b in (idx & _M32, idx >> 32):
        b = _mul32(_rotl32(_mul32(b, 0xCC9E2D51), 15), 0x1B873593)
        h = (_rotl32(h ^ b, 13) * 5 + 0xE6546B64) & _M32
    h = h ^ 8
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _keys(seed: int, stream: int, slots: torch.Tensor) -> torch.Tensor:
    """32-bit keys of (seed, stream, slot) as an int64 tensor shaped like slots."""
    base = hash32(_SEED_KEY, torch.tensor(seed, dtype=torch.int64))
    return hash32(base, (stream << 32) | slots.to(torch.int64))


def mask_size(d: int, density: float) -> int:
    """m = ceil(density * d), with density read as its shortest decimal (0.1 is exactly 1/10)."""
    return max(1, math.ceil(Fraction(repr(float(density))) * d))


@lru_cache(maxsize=4)
def kept_index(d: int, density: float, seed: int, device: str = "cpu") -> torch.Tensor:
    """Sorted int64 [m] coordinates kept by mask-dense: the m smallest hash32(key(1, 0), i), ties by i.
    Computed on ``device`` (a CUDA device hashes d = 1e9 coordinates quickly) and returned there.

    Two passes over d in chunks (a 2^16-bin histogram of the hash's top 16 bits, then the
    coordinates below the boundary bin plus a stable sort of the boundary bin), so memory
    is O(m + chunk), never O(d).
    """
    m = mask_size(d, density)
    if m >= d:
        return torch.arange(d, dtype=torch.int64, device=device)  # Projector never asks for this (O(d)) case
    key = _keys(seed, _STREAM_MASK, torch.tensor(0)).to(device)
    chunk = _MASK_CHUNK
    counts = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for start in range(0, d, chunk):
        h = hash32(key, torch.arange(start, min(d, start + chunk), device=device))
        counts += torch.bincount(h >> 16, minlength=1 << 16)
    cum = counts.cumsum(0)
    edge = int(torch.searchsorted(cum, m))  # first bin whose cumulative count reaches m
    need = m - (int(cum[edge - 1]) if edge > 0 else 0)
    kept, cand_i, cand_h = [], [], []
    for start in range(0, d, chunk):
        i = torch.arange(start, min(d, start + chunk), device=device)
        h = hash32(key, i)
        top = h >> 16
        kept.append(i[top < edge])
        cand_i.append(i[top == edge])
        cand_h.append(h[top == edge])
    ci, ch = torch.cat(cand_i), torch.cat(cand_h)
    order = torch.sort(ch, stable=True).indices[:need]  # ci ascending, so ties go by index
    return torch.sort(torch.cat(kept + [ci[order]])).values


def _dense_rows(coords: torch.Tensor, k: int, keys: torch.Tensor, dist: str) -> torch.Tensor:
    """float32 [n, k]: column i of P (scaled 1/sqrt(k)) for each global coordinate i in coords [n].

    keys: rademacher -> [ceil(k/32)] group keys; gaussian -> [2, ceil(k/2)] pair keys.
    """
    scale = 1.0 / math.sqrt(k)
    coords = coords[:, None]
    if dist == "rademacher":
        h = hash32(keys[None, :], coords)  # [n, G]
        bits = (h[:, :, None] >> torch.arange(32, device=h.device)) & 1  # [n, G, 32]
        bits = bits.reshape(len(coords), -1)[:, :k]
        return bits.to(torch.float32).mul_(-2.0 * scale).add_(scale)
    u1 = ((hash32(keys[0][None, :], coords) >> 8).double() + 0.5) / 2.0**24
    u2 = (hash32(keys[1][None, :], coords) >> 8).double() / 2.0**24
    r = torch.sqrt(-2.0 * torch.log(u1)) * scale
    theta = 2.0 * math.pi * u2
    z = torch.stack((r * torch.cos(theta), r * torch.sin(theta)), dim=-1)  # [n, Q, 2]
    return z.reshape(len(coords), -1)[:, :k].to(torch.float32)


def _gpu_kernels(device: torch.device):
    """cropi.kernels (Triton) for a CUDA device when Triton imports, else None (torch path)."""
    if device.type != "cuda":
        return None
    from cropi import kernels

    return kernels if kernels.available() else None


class Projector:
    """A seeded projection R^d -> R^k applied block by block; see the module docstring."""

    def __init__(self, kind: str, d: int, k: int = 8192, seed: int = 0, *, density: float = 0.1,
                 s: int = 1, dist: str = "rademacher", device="cpu"):
        if kind not in PROJECTORS:
            raise ValueError(f"unknown projector {kind!r}; choose one of {', '.join(PROJECTORS)}")
        if not (isinstance(d, int) and d >= 1 and isinstance(k, int) and k >= 1):
            raise ValueError(f"d and k must be positive integers, got d={d!r}, k={k!r}")
        if not (isinstance(seed, int) and 0 <= seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        if dist not in DISTS:
            raise ValueError(f"unknown dist {dist!r}; choose one of {', '.join(DISTS)}")
        if kind == "identity" and k != d:
            raise ValueError(f"identity projector needs k == d, got k={k}, d={d}")
        if kind == "sjlt" and not (isinstance(s, int) and 1 <= s <= k and k % s == 0):
            raise ValueError(f"sjlt needs an integer s with 1 <= s <= k and k % s == 0, got s={s!r}, k={k}")
        if kind == "mask-dense" and not 0.0 < density <= 1.0:
            raise ValueError(f"mask-dense density must be in (0, 1], got {density!r}")
        self.kind, self.d, self.k, self.seed = kind, d, k, seed
        self.density, self.s, self.dist = float(density), s, dist
        self.device = torch.device(device)
        self._sjlt_cache: OrderedDict = OrderedDict()
        self._trak, self.impl = None, None
        self._gpu = _gpu_kernels(self.device) if kind in ("sjlt", "dense", "mask-dense") else None
        if kind in ("dense", "mask-dense"):
            if dist == "rademacher":
                self._keys = _keys(seed, _STREAM_RADEMACHER, torch.arange((k + 31) // 32))
            else:
                self._keys = _keys(seed, _STREAM_GAUSSIAN, torch.arange(2 * ((k + 1) // 2)))
                self._keys = self._keys.reshape(-1, 2).T.contiguous()
            self._keys = self._keys.to(self.device)
        if kind == "mask-dense":
            self.m = mask_size(d, density)
            # m == d keeps everything; never materialise arange(d) for that case
            self._kept = kept_index(d, self.density, seed, str(self.device)) if self.m < d else None
        if kind == "sjlt":
            self._keys = _keys(seed, _STREAM_SJLT, torch.arange(s)).to(self.device)
        if kind == "trak":
            if d > TRAK_MAX_D:
                raise ValueError(f"trak projector needs whole d-dim gradients; d = {d:,} exceeds its limit of "
                                 f"{TRAK_MAX_D:,} parameters (use --projector sjlt or dense, or fewer --params)")
            self._trak = self._make_trak()

    def _make_trak(self):
        from trak.projectors import BasicProjector, CudaProjector, ProjectionType

        ptype = ProjectionType.rademacher if self.dist == "rademacher" else ProjectionType.normal
        if self.device.type == "cuda":
            try:
                import fast_jl  # noqa: F401
            except ImportError:
                fast_jl = None
            if fast_jl is not None:
                if self.k % 512:
                    raise ValueError(f"trak CudaProjector needs k divisible by 512, got k={self.k}")
                self.impl = "trak-cuda"
                return CudaProjector(self.d, self.k, self.seed, ptype, self.device, max_batch_size=32)
        self.impl = "trak-basic-100"
        return BasicProjector(self.d, self.k, self.seed, ptype, self.device, block_size=100,
                              dtype=torch.float32)

    def meta(self) -> dict:
        """JSON-able description of everything that defines P (unused knobs are None)."""
        return {
            "kind": self.kind, "d": self.d, "k": self.k, "seed": self.seed,
            "density": self.density if self.kind == "mask-dense" else None,
            "s": self.s if self.kind == "sjlt" else None,
            "dist": self.dist if self.kind in ("dense", "mask-dense", "trak") else None,
            "hash": None if self.kind in ("identity", "trak") else HASH_VERSION,
            "impl": self.impl,
        }

    def project(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x: [B, n] (any float dtype; fp16/bf16/fp64 computed in fp32) holding coordinates
        offset..offset+n-1 of d-dim vectors; returns the [B, k] float32 contribution of those
        coordinates, on this projector's device. Projecting a full vector equals the sum of
        projecting its blocks (exactly for sjlt/identity/mask-dense up to fp32 sum order)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"x must be a 2-D tensor [B, n], got {getattr(x, 'shape', type(x))}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got {x.dtype}")
        n, offset = x.shape[1], operator.index(offset)
        if not (offset >= 0 and offset + n <= self.d):
            raise ValueError(f"block [{offset}, {offset}+{n}) is outside [0, d={self.d})")
        if self._gpu is not None:
            return self._gpu.project(self, x, offset)
        x = x.to(device=self.device, dtype=torch.float32)
        if self.kind == "identity":
            out = torch.zeros(x.shape[0], self.d, device=self.device)
            out[:, offset:offset + n] = x
            return out
        if self.kind == "sjlt":
            return self._project_sjlt(x, offset)
        if self.kind == "trak":
            if offset != 0 or n != self.d:
                raise ValueError(f"trak projector needs whole vectors (offset 0, n = d = {self.d}),"
                                 f" got offset {offset}, n {n}")
            return self._trak.project(x.contiguous(), model_id=0).float() / math.sqrt(self.k)
        if self.kind == "dense":
            return self._project_dense(x, torch.arange(offset, offset + n, device=self.device), 1.0)
        if self._kept is None:
            return self._project_dense(x, torch.arange(offset, offset + n, device=self.device), 1.0)
        lo, hi = torch.searchsorted(self._kept, torch.tensor([offset, offset + n], device=self.device))
        coords = self._kept[lo:hi]
        return self._project_dense(x[:, coords - offset], coords, math.sqrt(self.d / self.m))

    def _project_dense(self, x: torch.Tensor, coords: torch.Tensor, scale: float) -> torch.Tensor:
        """x: [B, n] fp32 values at global coordinates coords [n] -> [B, k] fp32."""
        out = torch.zeros(x.shape[0], self.k, device=self.device)
        step = max(1, _GEN_ENTRIES // self.k)
        for a in range(0, len(coords), step):
            out.addmm_(x[:, a:a + step], _dense_rows(coords[a:a + step], self.k, self._keys, self.dist))
        return out.mul_(scale) if scale != 1.0 else out

    def _sjlt_index(self, offset: int, n: int) -> torch.Tensor:
        """[s, n] bucket + k * (sign < 0) of coordinates offset..offset+n-1, per slot: int16 when
        2k <= 2^15, else int32. Cached per (offset, n) block (one entry per parameter tensor),
        least recently used dropped once the cache holds more than 2·s·d entries, so a pass over
        a model of any size hashes each coordinate once and later passes only look them up."""
        key = (offset, n)
        if key in self._sjlt_cache:
            self._sjlt_cache.move_to_end(key)
            return self._sjlt_cache[key]
        dtype = torch.int16 if 2 * self.k <= 1 << 15 else torch.int32
        idx = torch.empty(self.s, n, dtype=dtype, device=self.device)
        for a in range(0, n, _SJLT_CHUNK):
            idx[:, a:a + _SJLT_CHUNK] = self._sjlt_hash(torch.arange(offset + a, offset + min(n, a + _SJLT_CHUNK),
                                                                     device=self.device))
        self._sjlt_cache[key] = idx
        total = sum(v.numel() for v in self._sjlt_cache.values())
        while total > 2 * self.s * self.d and len(self._sjlt_cache) > 1:
            total -= self._sjlt_cache.popitem(last=False)[1].numel()
        return idx

    def _sjlt_hash(self, coords: torch.Tensor) -> torch.Tensor:
        """int64 [s, m]: bucket + k * (sign < 0) of the global coordinates coords [m], per slot."""
        h = hash32(self._keys[:, None], coords[None, :])  # [s, m]
        w = self.k // self.s
        slot = torch.arange(self.s, device=self.device)[:, None]
        return slot * w + (((h >> 1) * w) >> 31) + self.k * (h & 1)

    def _project_sjlt(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        """Count sketch: positive and negative parts accumulate in separate halves of a [B, 2k]
        buffer (no per-element sign multiply), then out = (pos - neg) / sqrt(s)."""
        n = x.shape[1]
        idx = self._sjlt_index(offset, n)
        acc = torch.zeros(x.shape[0], 2 * self.k, device=self.device)
        for a in range(0, n, _SJLT_CHUNK):
            part = idx[:, a:a + _SJLT_CHUNK].to(torch.int64)
            for j in range(self.s):
                acc.index_add_(1, part[j], x[:, a:a + part.shape[1]])
        return self._sjlt_out(acc)

    def _sjlt_out(self, acc: torch.Tensor) -> torch.Tensor:
        out = acc[:, :self.k] - acc[:, self.k:]
        return out.mul_(1.0 / math.sqrt(self.s)) if self.s > 1 else out

    def project_rows(self, x: torch.Tensor, offset: int, rows: torch.Tensor, cols: int, n: int) -> torch.Tensor:
        """Projection of a row-sparse block: x [B, r, cols] holds rows ``rows`` [r] (long, distinct)
        of a [n // cols, cols] row-major parameter whose coordinates start at ``offset``; every other
        row is zero. Returns the [B, k] float32 contribution, equal to ``project`` of the dense block
        (an embedding gradient touches only the rows of the tokens used)."""
        B, r, c = x.shape
        if c != cols or n % cols or not (offset >= 0 and offset + n <= self.d):
            raise ValueError(f"rows block [{B}, {r}, {c}] does not fit a [{n // max(cols, 1)}, {cols}] parameter at {offset}")
        rows = rows.to(self.device)
        local = (rows[:, None] * cols + torch.arange(cols, device=self.device)).flatten()  # [r * cols]
        x = x.to(device=self.device, dtype=torch.float32).reshape(B, r * c)
        if self.kind == "trak":
            raise ValueError("trak projects whole vectors only; assemble them with projection.Accumulator")
        if self.kind == "identity":
            out = torch.zeros(B, self.d, device=self.device)
            out[:, offset + local] = x
            return out
        if self.kind == "sjlt":
            idx = self._sjlt_index(offset, n)[:, local].to(torch.int64)
            acc = torch.zeros(B, 2 * self.k, device=self.device)
            for j in range(self.s):
                acc.index_add_(1, idx[j], x)
            return self._sjlt_out(acc)
        coords = offset + local
        if self.kind == "mask-dense" and self._kept is not None:
            keep = self._kept[torch.searchsorted(self._kept, coords).clamp(max=len(self._kept) - 1)] == coords
            return self._project_dense(x[:, keep], coords[keep], math.sqrt(self.d / self.m))
        return self._project_dense(x, coords, 1.0)


class Inner:
    """Exact inner products with T fixed vectors V [T, d] as a "projection" R^d -> R^T (k = T):
    project(x, offset) = x V[:, offset:offset+n]ᵀ. Scores a gradient against exact target
    gradients without storing it (``cropi score --check-rank`` on large models)."""

    kind = "inner"

    def __init__(self, vectors: torch.Tensor):
        self.v = vectors.float()
        self.k, self.d = self.v.shape
        self.device = self.v.device

    def project(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return x.to(self.v).matmul(self.v[:, offset:offset + x.shape[1]].T)

    def project_rows(self, x: torch.Tensor, offset: int, rows: torch.Tensor, cols: int, n: int) -> torch.Tensor:
        v = self.v[:, offset:offset + n].view(self.k, n // cols, cols)[:, rows.to(self.device)]  # [T, r, cols]
        return x.to(self.v).flatten(1).matmul(v.flatten(1).T)


class Accumulator:
    """Σ of the block projections of B vectors, added block by block (``add``, ``add_rows``) in any
    order; ``result()`` -> [B, k] float32. trak projects whole vectors only, so for it the blocks are
    written into flat [B, d] float32 vectors (d <= TRAK_MAX_D) and projected once in ``result``."""

    def __init__(self, projector: Projector, B: int):
        self.p = projector
        if projector.kind == "trak":
            self.flat = torch.zeros(B, projector.d, device=projector.device)
        else:
            self.out = torch.zeros(B, projector.k, device=projector.device)

    def add(self, x: torch.Tensor, offset: int, at: list[int] | None = None) -> None:
        """x [b, n]: coordinates offset..offset+n-1 of the vectors ``at`` (default all B, b = B)."""
        at = slice(None) if at is None else at
        if self.p.kind == "trak":
            self.flat[at, offset:offset + x.shape[1]] += x.to(self.flat)
        else:
            self.out[at] += self.p.project(x, offset)

    def add_rows(self, x: torch.Tensor, offset: int, rows: torch.Tensor, cols: int, n: int) -> None:
        """x [B, r, cols]: rows ``rows`` of the [n // cols, cols] parameter at ``offset`` (``project_rows``)."""
        if self.p.kind == "trak":
            view = self.flat[:, offset:offset + n].view(x.shape[0], n // cols, cols)
            view.index_add_(1, rows.to(view.device), x.to(view))
        else:
            self.out += self.p.project_rows(x, offset, rows, cols, n)

    def result(self) -> torch.Tensor:
        return self.p.project(self.flat, 0) if self.p.kind == "trak" else self.out


def make_projector(kind: str, d: int, k: int = 8192, seed: int = 0, *, density: float = 0.1,
                   s: int = 1, dist: str = "rademacher", device="cpu") -> Projector:
    """Build a projector; raises ValueError on an unknown kind or inconsistent arguments."""
    return Projector(kind, d, k, seed, density=density, s=s, dist=dist, device=device)


def incompatibility(meta_a: dict, meta_b: dict) -> str | None:
    """Why features projected under meta_a and meta_b cannot be compared, or None if they can."""
    for key in _META_KEYS:
        a, b = meta_a.get(key), meta_b.get(key)
        if a != b:
            return f"projector {key} differs: {a!r} vs {b!r}"
    return None
