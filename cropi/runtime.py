"""Process-level helpers shared by every stage: derived seeds, the generation budget, progress.

Progress goes to stderr in one of three ways, chosen once per bar by :func:`progress`:

- a tqdm bar when stderr is a terminal;
- plain lines (``rollout: 64/200 prompt (32%) 3.1 prompt/s 21s``) every
  ``CROPI_PROGRESS_INTERVAL`` seconds (default 30) and once at the end when it is not (logs, CI);
- nothing with ``CROPI_QUIET=1`` (``cropi --quiet``). ``CROPI_VERBOSE=1`` (``cropi --verbose``)
  prints a plain line on every update instead of a bar.

Environment variables rather than arguments, so torchrun's worker processes inherit the choice.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

MAX_NEW_TOKENS = 16
"""Generation budget per response (tokens): the one default of `cropi rollout`, `train` and `eval`.
Offline responses, trained responses and evaluated responses should share a budget (the scores
are computed on the offline responses the trainer is meant to reproduce); 16 fits the embedded
tiny policy's answers. Real models need their own budget (hundreds to thousands of tokens)."""


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed from a base seed and any keys (stage, chunk, split...): stable across runs,
    platforms and processes (sha256, not Python's salted hash)."""
    h = hashlib.sha256(repr((int(seed),) + tuple(keys)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def verbosity() -> int:
    """0 with CROPI_QUIET=1, 2 with CROPI_VERBOSE=1, else 1 (quiet wins when both are set)."""
    if os.environ.get("CROPI_QUIET") == "1":
        return 0
    return 2 if os.environ.get("CROPI_VERBOSE") == "1" else 1


class LineProgress:
    """tqdm's interface (update, set_postfix, close, context manager) printing plain lines.

    A line is printed when ``interval`` seconds have passed since the last one (0: every update)
    and by ``close`` unless the last line already shows the final count, so a log always ends
    with the true total."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0,
                 interval: float = 30.0, file=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval, self.file = interval, file if file is not None else sys.stderr
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._start_n, self._closed, self._shown = initial, False, None

    def format(self) -> str:
        elapsed = time.monotonic() - self._start
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        post = f" {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done} {self.unit}{pct} {rate:.3g} {self.unit}/s {elapsed:.0f}s{post}"

    def _emit(self) -> None:
        print(self.format(), file=self.file, flush=True)
        self._last, self._shown = time.monotonic(), self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.interval:
            self._emit()

    def set_postfix(self, **kw) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._shown != self.n:  # the last line already shows the final count otherwise
                self._emit()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Silent(LineProgress):
    def _emit(self) -> None:
        pass


def progress(total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0, file=None):
    """The progress display of one long loop (see the module docstring for which kind).

    ``total`` is the true number of units this process will count, ``initial`` the units already
    done (a resumed run), so a finished loop always reads total/total."""
    file = file if file is not None else sys.stderr
    level = verbosity()
    if level == 0:
        return _Silent(total, desc, unit, initial, file=file)
    if level == 1 and file.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=file, dynamic_ncols=True,
                    mininterval=0.5)
    interval = 0.0 if level == 2 else float(os.environ.get("CROPI_PROGRESS_INTERVAL", "30"))
    return LineProgress(total, desc, unit, initial, interval=interval, file=file)
