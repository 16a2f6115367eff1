"""Trainer checkpoints: `RUN/checkpoints/step-N/` = HF `save_pretrained` + `trainer_state.pt`.

trainer_state.pt holds everything else a resumed run needs to continue exactly: optimizer and
scheduler state, the global RNG states, the stage's sampler / VCRL bank / RLVE controller, the
stage and step. It is loaded with ``torch.load(weights_only=True)``, so it holds only tensors
and plain Python values. A checkpoint is written into a hidden temporary folder and renamed,
so a checkpoint folder either is complete or does not exist.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from cropi import models
from cropi.schema import InputError, atomic_dir

TRAINER_STATE = "trainer_state.pt"
STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step}"


def checkpoints(run_dir) -> dict[int, Path]:
    """{step: folder} of the complete checkpoints of a run, in step order."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return {}
    found = {}
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and (p / TRAINER_STATE).exists():
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def latest(run_dir) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    found = checkpoints(run_dir)
    return found[max(found)] if found else None


def rng_state() -> dict:
    """torch (CPU and every CUDA device), numpy and python global RNG states as plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(py_state), gauss],
    }


def seed_rngs(seed: int) -> None:
    """Seed the torch (CPU and every CUDA device), numpy and python global RNGs. The trainer
    draws from its own seeded generators; this only makes the RNG states a checkpoint records,
    and so trainer_state.pt, the same bytes in every run with the same seed."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def set_rng_state(state: dict) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))


def save(run_dir, step: int, policy: models.Policy, state: dict, info: dict | None = None) -> Path:
    """Write checkpoint `step`: the policy (save_pretrained, `info` -> cropi.json) and `state`
    (plus the RNG states) as trainer_state.pt. Replaces an existing checkpoint of that step."""
    final = checkpoint_dir(run_dir, step)
    with atomic_dir(final) as tmp:
        models.save(policy.model, policy.tokenizer, tmp, info)
        torch.save({**state, "rng": rng_state()}, tmp / TRAINER_STATE)
    return final


def load_state(path) -> dict:
    """The trainer state of a checkpoint folder (tensors on CPU); RNG states are not applied.

    A file that is not a trainer state (garbage, a truncated zip, a pickle of arbitrary objects,
    which weights_only refuses to unpickle) raises InputError naming it."""
    file = Path(path) / TRAINER_STATE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or zip errors here
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(file, None, None, f"not a readable cropi trainer state ({why[:200]})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise InputError(file, None, None, "not a cropi trainer state (no step recorded)")
    return state
