"""Which prompts a GRPO step trains on: plain-Python/numpy state machines (docs/design.md).

Each stateful class has ``state_dict()`` (JSON-ready) and ``load_state_dict()`` so a resumed
run continues with exactly the same data order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from cropi.advantages import has_signal, normalised_variance


class PromptSampler:
    """Epoch-wise seeded shuffling of n prompts.

    Epoch e visits every index once in the order ``default_rng([seed, e]).permutation(n)``; a
    batch that runs past the end of an epoch continues into the next one (so one batch can
    hold an index twice only when batch > n or it straddles two epochs).
    """

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"PromptSampler: need at least one prompt, got n={n}")
        self.n, self.seed = int(n), int(seed)
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next(self, batch: int) -> np.ndarray:
        """The next `batch` prompt indices, int64 [batch]."""
        out = []
        need = int(batch)
        while need > 0:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(need, self.n - self.pos)
            out.append(self._perm[self.pos : self.pos + take])
            self.pos += take
            need -= take
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: Mapping) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise ValueError(
                f"sampler state is for n={state['n']}, seed={state['seed']}; this run has n={self.n}, seed={self.seed}"
            )
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation(self.epoch)


@dataclass
class Refill:
    """What `dynamic_sampling` kept.

    indices: int64 [k] prompt indices; rewards: float64 [k, G];
    source: (call, row) per kept group: row `row` of the `call`-th generate() call (0-based), so
    the caller can pick the matching responses out of what its generate() produced;
    calls: generate() calls made; generated: groups generated; dropped: groups filtered out.
    """

    indices: np.ndarray
    rewards: np.ndarray
    source: list[tuple[int, int]] = field(default_factory=list)
    calls: int = 0
    generated: int = 0
    dropped: int = 0


def dynamic_sampling(
    draw: Callable[[int], np.ndarray],
    generate: Callable[[np.ndarray], np.ndarray | torch.Tensor],
    want: int,
    max_refill: int,
    keep: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Refill:
    """DAPO dynamic sampling: drop groups that carry no signal and refill, with capped retries.

    Draws `want` prompts with draw(n) (e.g. `PromptSampler.next`), calls generate(indices) ->
    rewards [n, G], and keeps the rows where keep(rewards) is true (default: not all rewards
    equal). While fewer than `want` are kept it draws just the shortfall and generates again, at
    most `max_refill` more times. May return fewer than `want` groups (even none) when the
    retries run out; the caller decides whether to train on a short batch.
    """
    keep = keep or (lambda r: has_signal(torch.as_tensor(r)).numpy())
    idx_parts, rew_parts, source = [], [], []
    calls = generated = kept = 0
    while kept < want and calls <= max_refill:
        indices = np.asarray(draw(want - kept), dtype=np.int64)
        rewards = np.asarray(
            torch.as_tensor(generate(indices)).detach().cpu().numpy(), dtype=np.float64
        )
        if rewards.ndim != 2 or rewards.shape[0] != len(indices):
            raise ValueError(
                f"generate() must return rewards [{len(indices)}, G], got shape {rewards.shape}"
            )
        ok = np.asarray(keep(rewards), dtype=bool)
        rows = np.flatnonzero(ok)
        idx_parts.append(indices[rows])
        rew_parts.append(rewards[rows])
        source.extend((calls, int(r)) for r in rows)
        calls += 1
        generated += len(indices)
        kept += len(rows)
    g = rew_parts[0].shape[1] if rew_parts else 0
    return Refill(
        indices=np.concatenate(idx_parts) if idx_parts else np.zeros(0, dtype=np.int64),
        rewards=np.concatenate(rew_parts) if rew_parts else np.zeros((0, g)),
        source=source,
        calls=calls,
        generated=generated,
        dropped=generated - kept,
    )


class VCRLBank:
    """VCRL's memory bank of high-variance groups, bounded and with a per-entry replay limit.

    `offer(keys, rewards)` scores each group with p = `normalised_variance` and returns the
    keep mask p >= kappa; kept groups enter (or refresh) the bank with priority p.
    Rules (all deterministic):
    - a key already in the bank gets its p refreshed and keeps its replay count; re-offered with
      p < kappa it leaves the bank (it is no longer a high-value group);
    - when full, a new entry evicts the lowest-p entry (ties: the oldest) if its own p is
      higher; otherwise it is not admitted;
    - `replay(n, exclude)` returns up to n distinct keys not in `exclude`, highest p first (ties:
      the oldest), and counts one replay for each; an entry that reaches `max_replay` replays
      leaves the bank.
    So the bank never holds more than `capacity` entries and no entry is replayed more than
    `max_replay` times during one stay.
    """

    def __init__(
        self,
        capacity: int,
        kappa: float,
        max_replay: int,
        reward_range: tuple[float, float] = (0.0, 1.0),
    ):
        if capacity < 1 or max_replay < 1 or not 0 <= kappa <= 1:
            raise ValueError(
                f"VCRLBank: need capacity >= 1, max_replay >= 1, kappa in [0, 1]; got {capacity}, {max_replay}, {kappa}"
            )
        self.capacity, self.kappa, self.max_replay = int(capacity), float(kappa), int(max_replay)
        self.reward_range = reward_range
        self._entries: dict[int, list] = {}  # key -> [p, replays, admitted_at]
        self._clock = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: int) -> bool:
        return int(key) in self._entries

    def replays(self, key: int) -> int:
        """Replays so far of a banked key (0 if absent)."""
        return self._entries.get(int(key), [0, 0, 0])[1]

    def offer(self, keys: Iterable[int], rewards) -> np.ndarray:
        """Score groups (rewards [n, G]) and bank the ones with p >= kappa; returns keep, bool [n]."""
        keys = [int(k) for k in keys]
        p = normalised_variance(
            torch.as_tensor(rewards, dtype=torch.float64), self.reward_range
        ).numpy()
        keep = p >= self.kappa
        for key, pk, ok in zip(keys, p.tolist(), keep.tolist()):
            if key in self._entries:
                if ok:
                    self._entries[key][0] = pk
                else:
                    del self._entries[key]
            elif ok:
                self._admit(key, pk)
        return keep

    def _admit(self, key: int, p: float) -> None:
        if len(self._entries) >= self.capacity:
            worst = min(self._entries, key=lambda k: (self._entries[k][0], self._entries[k][2]))
            if p <= self._entries[worst][0]:
                return
            del self._entries[worst]
        self._entries[key] = [p, 0, self._clock]
        self._clock += 1

    def replay(self, n: int, exclude: Iterable[int] = ()) -> list[int]:
        """Up to n banked keys to train on again (highest p first); counts one replay each.

        Keys in `exclude` (e.g. groups already in this step's batch) are passed over: they are
        neither returned nor counted, so they stay in the bank for a later replay."""
        skip = {int(k) for k in exclude}
        order = sorted(
            (k for k in self._entries if k not in skip),
            key=lambda k: (-self._entries[k][0], self._entries[k][2]),
        )[: max(n, 0)]
        for key in order:
            self._entries[key][1] += 1
            if self._entries[key][1] >= self.max_replay:
                del self._entries[key]
        return order

    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "kappa": self.kappa,
            "max_replay": self.max_replay,
            "clock": self._clock,
            "entries": [[k, *v] for k, v in self._entries.items()],
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.capacity, self.kappa, self.max_replay = (
            int(state["capacity"]),
            float(state["kappa"]),
            int(state["max_replay"]),
        )
        self._clock = int(state["clock"])
        self._entries = {int(k): [float(p), int(r), int(t)] for k, p, r, t in state["entries"]}


class RLVEController:
    """RLVE adaptive difficulty (arXiv 2511.07317): one difficulty window [h - window, h] per task.

    Every task starts at h = start (an int, or a mapping task -> int). `update` counts only
    responses at difficulty h; once `tau_num` of them are in, h rises by one if their accuracy
    is >= tau_acc, and the count restarts either way (as in the RLVE code). h never exceeds
    max_level (int, mapping, or None for no cap). Responses below h (stale, from before a raise)
    are ignored; above h they are a caller bug and raise ValueError.
    """

    def __init__(
        self,
        tasks: Iterable[str],
        *,
        tau_acc: float = 0.9,
        tau_num: int = 32,
        window: int = 3,
        start: int | Mapping[str, int] = 0,
        max_level: int | Mapping[str, int] | None = None,
    ):
        tasks = list(dict.fromkeys(tasks))
        if not tasks or tau_num < 1 or window < 0 or not 0 < tau_acc <= 1:
            raise ValueError(
                "RLVEController: need tasks, tau_num >= 1, window >= 0, tau_acc in (0, 1]"
            )
        self.tau_acc, self.tau_num, self.width = float(tau_acc), int(tau_num), int(window)
        self._start = {t: int(start[t] if isinstance(start, Mapping) else start) for t in tasks}
        self._cap = {
            t: None
            if max_level is None
            else int(max_level[t] if isinstance(max_level, Mapping) else max_level)
            for t in tasks
        }
        self._h = dict(self._start)
        self._seen = dict.fromkeys(tasks, 0)
        self._correct = dict.fromkeys(tasks, 0)

    @property
    def tasks(self) -> list[str]:
        return list(self._h)

    def window(self, task: str) -> tuple[int, int]:
        """(lo, hi) inclusive difficulty range to sample for `task`: (max(start, h - window), h)."""
        h = self._h[task]
        return max(self._start[task], h - self.width), h

    def update(self, task: str, difficulty: int, correct: bool | float) -> bool:
        """Record one verified response; returns True when this raised the task's h."""
        h = self._h[task]
        if difficulty > h:
            raise ValueError(
                f"RLVE: task {task!r} got difficulty {difficulty} above its current top {h}"
            )
        if difficulty < h:
            return False
        self._seen[task] += 1
        self._correct[task] += float(correct)
        if self._seen[task] < self.tau_num:
            return False
        raise_h = self._correct[task] / self._seen[task] >= self.tau_acc
        cap = self._cap[task]
        raise_h = raise_h and (cap is None or h < cap)
        if raise_h:
            self._h[task] = h + 1
        self._seen[task], self._correct[task] = 0, 0
        return raise_h

    def allowed(self, tasks: Iterable[str], difficulties: Iterable[int]) -> np.ndarray:
        """bool [n]: which (task, difficulty) pool rows fall in their task's window (unknown task: False)."""
        out = []
        for t, d in zip(tasks, difficulties):
            if t in self._h:
                lo, hi = self.window(t)
                out.append(lo <= int(d) <= hi)
            else:
                out.append(False)
        return np.asarray(out, dtype=bool)

    def state_dict(self) -> dict:
        return {
            "tau_acc": self.tau_acc,
            "tau_num": self.tau_num,
            "window": self.width,
            "h": dict(self._h),
            "seen": dict(self._seen),
            "correct": dict(self._correct),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if set(state["h"]) != set(self._h):
            raise ValueError(
                f"RLVE state is for tasks {sorted(state['h'])}, this run has {sorted(self._h)}"
            )
        self.tau_acc, self.tau_num, self.width = (
            float(state["tau_acc"]),
            int(state["tau_num"]),
            int(state["window"]),
        )
        self._h = {t: int(v) for t, v in state["h"].items()}
        self._seen = {t: int(v) for t, v in state["seen"].items()}
        self._correct = {t: float(v) for t, v in state["correct"].items()}
