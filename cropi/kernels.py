"""Triton GPU kernels for the sjlt, dense and mask-dense projectors (docs/design.md, docs/scale.md).

Every random entry of P is regenerated inside the kernel from its key and the 64-bit global
coordinate by the rules in :mod:`cropi.projection`'s docstring; P is never stored. The integer
math the kernels run (``murmur3_le64``, ``sjlt_bucket``, ``rademacher_sign16``) is written once
as plain functions: the kernels compile them with ``triton.jit`` and the CPU tests run them on
numpy uint32/int64 arrays against ``projection.hash32`` bit for bit.

Results equal the CPU projector's for the same seed up to fp32 summation order: for every row b,
max_r |gpu[b, r] - cpu[b, r]| <= 1e-6 * u * sum_i |x[b, i]|, with u the unit entry size (1/sqrt(s)
for sjlt, 1/sqrt(k) for dense, sqrt(d/m)/sqrt(k) for mask-dense; Gaussian entries, whose
Box-Muller runs in fp32 here and fp64 on the CPU, are held to the same bound). Dense / mask-dense
are bitwise reproducible run to run (fixed split partials summed by torch); sjlt accumulates
with atomics, so its last bits may vary between runs. Coordinates and pointer offsets are int64,
so batches with more than 2^32 entries are addressed correctly.

Inputs may be float32, bfloat16 or float16 (read as they are: no fp32 copy of a gradient).
Rademacher dense uses tensor cores exactly: entries ±1 are exact in 16-bit floats, 16-bit inputs
go in as they are, and fp32 inputs are split into three bf16 terms (x = hi + mid + lo to within
2^-27 |x|), each product exact and accumulated in fp32. Gaussian dense uses fp32 FMA dots.

Triton is imported inside ``try``: without it (CPU installs) this module still imports and
``available()`` is False; :mod:`cropi.projection` imports this module only for CUDA projectors.
The kernels use Triton 3 APIs (``tl.join``, ``tl.dot(..., acc, input_precision=)``): with an
older Triton ``available()`` is False too, and says once on stderr that CUDA projectors take the
plain torch path. Set ``CROPI_TRITON=0`` to choose that path yourself.

On the CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton
is imported; tests/test_kernels.py): the launchers take CPU tensors as they are.
"""

import math
import os
import sys

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: no kernels, the torch path serves every device
    triton = None

_MAX_ROWS = 16  # batch rows per launch (larger batches are cut into chunks of this many)
_BD, _BK = 32, 128  # dense: coordinates per loop step, projected rows per program
_SJLT_ELEMS = 2048  # sjlt: coordinates x rows loaded per program


MIN_TRITON = (3, 0)  # tl.join and tl.dot's acc / input_precision= arguments
_NOTICE: list[bool] = []


def _version(v: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '3.7.1' or '3.0.0+git1234'."""
    major, minor = (v.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def available() -> bool:
    """True when Triton >= MIN_TRITON imports, CUDA is available and CROPI_TRITON is not 0. An older
    Triton on a CUDA host: False, with a one-line notice on stderr (once per process)."""
    if triton is None or not torch.cuda.is_available() or os.environ.get("CROPI_TRITON", "1") == "0":
        return False
    if _version(triton.__version__) < MIN_TRITON:
        if not _NOTICE:
            _NOTICE.append(True)
            print(f"cropi: Triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, which the "
                  "projection kernels need; CUDA projections use the torch path", file=sys.stderr)
        return False
    return True


# ---------------------------------------------------------------------------- shared integer math


def murmur3_le64(seed, lo, hi):
    """MurmurHash3 x86_32 of the 8 little-endian bytes of lo + 2^32 * hi with a 32-bit seed
    (the value of ``projection.hash32(seed, lo + 2^32 * hi)``).

    seed, lo, hi: uint32 values, broadcastable (Triton uint32 tensors in the kernels, numpy uint32
    arrays on the CPU). Every operation wraps mod 2^32; returns uint32 of the broadcast shape.
    """
    b = lo * 0xCC9E2D51
    b = ((b << 15) | (b >> 17)) * 0x1B873593
    h = seed ^ b
    h = ((h << 13) | (h >> 19)) * 5 + 0xE6546B64
    b = hi * 0xCC9E2D51
    b = ((b << 15) | (b >> 17)) * 0x1B873593
    h = h ^ b
    h = ((h << 13) | (h >> 19)) * 5 + 0xE6546B64
    h = h ^ 8
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


def sjlt_bucket(h, slot, w):
    """sjlt bucket of a coordinate in ``slot`` from its hash: slot * w + floor((h >> 1) * w / 2^31).

    h: int64 values in [0, 2^32); slot, w = k // s: ints. Returns int64 in [slot * w, (slot + 1) * w).
    The sign is -1 where h & 1, else +1.
    """
    return slot * w + (((h >> 1) * w) >> 31)


def rademacher_sign16(h, bit):
    """0x8000 where bit ``bit`` of the uint32 hash h is set (entry -1), else 0: the sign bit of a
    16-bit float, so sign | 0x3F80 is the bfloat16 and sign | 0x3C00 the float16 bit pattern of
    the entry (±1)."""
    return ((h >> bit) << 15) & 0x8000


# ---------------------------------------------------------------------------- kernels

if triton is not None:
    _murmur = triton.jit(murmur3_le64)
    _bucket = triton.jit(sjlt_bucket)
    _sign16 = triton.jit(rademacher_sign16)

    @triton.jit
    def _sjlt_kernel(x_ptr, keys_ptr, out_ptr, B, n, offset, stride_b, w, s,
                     BB: tl.constexpr, BLOCK: tl.constexpr):
        """out_t[bucket, b] += ±x[b, col] for BLOCK columns and every slot; out_t is [k, B] fp32."""
        col = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        rows = tl.arange(0, BB)
        m2 = (col < n)[:, None] & (rows < B)[None, :]
        xv = tl.load(x_ptr + rows.to(tl.int64)[None, :] * stride_b + col[:, None], mask=m2, other=0.0)
        xv = xv.to(tl.float32)  # [BLOCK, BB]
        i = col + offset
        ilo = i.to(tl.uint32)
        ihi = (i >> 32).to(tl.uint32)
        for j in range(s):
            h = _murmur(tl.load(keys_ptr + j).to(tl.uint32), ilo, ihi)
            bucket = _bucket(h.to(tl.int64), j, w)
            v = tl.where((h & 1)[:, None] == 0, xv, -xv)
            tl.atomic_add(out_ptr + bucket[:, None] * B + rows[None, :], v, mask=m2, sem="relaxed")

    @triton.jit
    def _dense_kernel(x_ptr, coords_ptr, keys_ptr, part_ptr, B, n_coords, offset, stride_b, k, n_keys,
                      tiles, HAS_COORDS: tl.constexpr, GAUSS: tl.constexpr, XKIND: tl.constexpr,
                      BB: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr):
        """part[split, b, r] = Σ_j x[b, i_j - offset] * P_unit[r, i_j] over this split's coordinates
        i_j (coords[j], or offset + j) for the BK rows r of this program; P_unit entries ±1 or N(0, 1).
        XKIND: 0 fp32, 1 bf16, 2 fp16 input."""
        pid_k = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = tl.arange(0, BB)
        rmask = rows < B
        xrow = x_ptr + rows.to(tl.int64)[:, None] * stride_b
        if GAUSS:
            q = pid_k * (BK // 2) + tl.arange(0, BK // 2)
            key_a = tl.load(keys_ptr + q, mask=q < n_keys, other=0).to(tl.uint32)
            key_b = tl.load(keys_ptr + n_keys + q, mask=q < n_keys, other=0).to(tl.uint32)
        else:
            g = pid_k * (BK // 32) + tl.arange(0, BK // 32)
            key_a = tl.load(keys_ptr + g, mask=g < n_keys, other=0).to(tl.uint32)
            key_b = key_a
        bit = tl.arange(0, 32)
        acc = tl.zeros((BB, BK), dtype=tl.float32)
        j0 = pid_s.to(tl.int64) * tiles * BD
        for _ in range(tiles):
            j = j0 + tl.arange(0, BD)
            jm = j < n_coords
            if HAS_COORDS:
                i = tl.load(coords_ptr + j, mask=jm, other=0)
            else:
                i = j + offset
            xv = tl.load(xrow + (i - offset)[None, :], mask=rmask[:, None] & jm[None, :], other=0.0)  # [BB, BD]
            ilo = i.to(tl.uint32)[:, None]
            ihi = (i >> 32).to(tl.uint32)[:, None]
            if GAUSS:
                u1 = ((_murmur(key_a[None, :], ilo, ihi) >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
                u2 = (_murmur(key_b[None, :], ilo, ihi) >> 8).to(tl.float32) * 5.9604644775390625e-08
                rad = tl.sqrt(-2.0 * tl.log(u1))
                theta = 6.283185307179586 * u2
                p = tl.reshape(tl.join(rad * tl.cos(theta), rad * tl.sin(theta)), (BD, BK))
                acc = tl.dot(xv.to(tl.float32), p, acc, input_precision="ieee")
            else:
                h = _murmur(key_a[None, :], ilo, ihi)  # [BD, BK // 32]
                sign = tl.reshape(_sign16(h[:, :, None], bit[None, None, :]), (BD, BK))
                if XKIND == 2:
                    p16 = (sign | 0x3C00).to(tl.uint16).to(tl.float16, bitcast=True)
                    acc = tl.dot(xv, p16, acc)
                else:
                    p16 = (sign | 0x3F80).to(tl.uint16).to(tl.bfloat16, bitcast=True)
                    if XKIND == 1:
                        acc = tl.dot(xv, p16, acc)
                    else:
                        x_hi = xv.to(tl.bfloat16)
                        r1 = xv - x_hi.to(tl.float32)
                        x_mid = r1.to(tl.bfloat16)
                        x_lo = (r1 - x_mid.to(tl.float32)).to(tl.bfloat16)
                        acc = tl.dot(x_hi, p16, acc)
                        acc = tl.dot(x_mid, p16, acc)
                        acc = tl.dot(x_lo, p16, acc)
            j0 += BD
        c = pid_k * BK + tl.arange(0, BK)
        out = part_ptr + (pid_s.to(tl.int64) * B + rows[:, None]) * k + c[None, :]
        tl.store(out, acc, mask=rmask[:, None] & (c < k)[None, :])


# ---------------------------------------------------------------------------- launchers

_XKIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _rows(B: int) -> int:
    return max(2, triton.next_power_of_2(B))


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for CPU tensors (Triton's interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _prepare(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in _XKIND:
        x = x.float()
    return x if x.stride(1) == 1 else x.contiguous()


def sjlt_project(x: torch.Tensor, offset: int, k: int, s: int, keys: torch.Tensor) -> torch.Tensor:
    """Count sketch of columns offset..offset+n-1: out[b, bucket_j(i)] += sign_j(i) * x[b, i - offset]
    for every slot j < s (the 1/sqrt(s) scale is the caller's).

    x: [B, n] CUDA fp32/bf16/fp16; keys: int64 [s] slot keys on x's device. Returns [B, k] fp32.
    """
    x = _prepare(x)
    B, n = x.shape
    out = torch.zeros(x.shape[0], k, dtype=torch.float32, device=x.device)
    for b0 in range(0, B, _MAX_ROWS):
        xb = x[b0:b0 + _MAX_ROWS]
        bb = _rows(xb.shape[0])
        block = max(16, _SJLT_ELEMS // bb)
        acc = torch.zeros(k, xb.shape[0], dtype=torch.float32, device=x.device)
        _sjlt_kernel[(triton.cdiv(n, block),)](xb, keys, acc, xb.shape[0], n, offset, xb.stride(0), k // s, s,
                                              BB=bb, BLOCK=block, num_warps=4)
        out[b0:b0 + xb.shape[0]] = acc.T
    return out


def dense_project(x: torch.Tensor, offset: int, k: int, keys: torch.Tensor, dist: str,
                  coords: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i x[:, i - offset] P_unit[:, i] over the global coordinates i in ``coords`` (sorted int64,
    inside [offset, offset + n)) or, when None, all of offset..offset+n-1. P_unit entries are ±1
    (rademacher) or N(0, 1) (gaussian), unscaled (the 1/sqrt(k) and mask scales are the caller's).

    x: [B, n] CUDA fp32/bf16/fp16; keys: projection key tensor on x's device (rademacher [ceil(k/32)],
    gaussian [2, ceil(k/2)]). Returns [B, k] fp32.
    """
    x = _prepare(x)
    B, n = x.shape
    gauss = dist == "gaussian"
    n_coords = n if coords is None else coords.numel()
    out = torch.zeros(B, k, dtype=torch.float32, device=x.device)
    if n_coords == 0:
        return out
    keys = keys.contiguous()
    n_keys = keys.shape[-1]
    k_tiles = triton.cdiv(k, _BK)
    steps = triton.cdiv(n_coords, _BD)
    tiles = triton.cdiv(steps, max(1, min(steps, triton.cdiv(4 * _sm_count(x.device), k_tiles))))
    splits = triton.cdiv(steps, tiles)
    for b0 in range(0, B, _MAX_ROWS):
        xb = x[b0:b0 + _MAX_ROWS]
        rows = xb.shape[0]
        part = torch.empty(splits, rows, k, dtype=torch.float32, device=x.device)
        _dense_kernel[(k_tiles, splits)](xb, keys if coords is None else coords, keys, part, rows, n_coords, offset,
                                         xb.stride(0), k, n_keys, tiles, HAS_COORDS=coords is not None, GAUSS=gauss,
                                         XKIND=0 if gauss else _XKIND[xb.dtype], BB=max(16, _rows(rows)), BD=_BD,
                                         BK=_BK, num_warps=4)
        out[b0:b0 + rows] = part.sum(0)
    return out


def project(p, x: torch.Tensor, offset: int) -> torch.Tensor:
    """``Projector.project`` for a CUDA sjlt / dense / mask-dense projector ``p``: the [B, k] fp32
    contribution of x [B, n] holding coordinates offset..offset+n-1 (checked by the caller)."""
    x = x.to(p.device)
    n = x.shape[1]
    if p.kind == "sjlt":
        out = sjlt_project(x, offset, p.k, p.s, p._keys)
        return out.mul_(1.0 / math.sqrt(p.s)) if p.s > 1 else out
    if p.kind == "mask-dense" and p._kept is not None:
        lo, hi = torch.searchsorted(p._kept, torch.tensor([offset, offset + n], device=p.device)).tolist()
        out = dense_project(x, offset, p.k, p._keys, p.dist, p._kept[lo:hi])
        return out.mul_(math.sqrt(p.d / p.m) / math.sqrt(p.k))
    return dense_project(x, offset, p.k, p._keys, p.dist).mul_(1.0 / math.sqrt(p.k))
