"""Process-level helpers shared by every stage: derived seeds, progress bars, torch threads."""

from __future__ import annotations

import hashlib
import os
import sys

from tqdm.auto import tqdm


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed from a base seed and any keys (stage, chunk, split...): stable across runs,
    platforms and processes (sha256, not Python's salted hash)."""
    h = hashlib.sha256(repr((int(seed),) + tuple(keys)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def progress(total: int | None = None, desc: str = "", unit: str = "it", disable: bool | None = None, **kw):
    """A tqdm bar on stderr; silent when CROPI_QUIET=1 or stderr is not a terminal under CI."""
    if disable is None:
        disable = os.environ.get("CROPI_QUIET") == "1"
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5, **kw)
