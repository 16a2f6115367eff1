"""Which rows of a trainer's dataset belong to cropi's current curriculum stage."""

from __future__ import annotations

from pathlib import Path

from cropi.curriculum import read_stage, stage_dirs


class StageCursor:
    """Walks a curriculum folder's stages over a dataset whose rows carry cropi ids.

    ``ids[i]`` is the cropi id of dataset row i. :meth:`next_indices` starts a pass: the first
    pass serves the first stage; every later pass moves to the next stage when it exists (cropi
    has written it), else serves the current stage again. Indices are in stage order."""

    def __init__(self, folder: Path, ids: list[str]):
        self.folder = Path(folder)
        self.rows: dict[str, int] = {}
        for i, x in enumerate(ids):
            self.rows.setdefault(x, i)
        stages = stage_dirs(self.folder)
        if not stages:
            raise ValueError(f"{self.folder}: no curriculum stage yet (cropi select writes stage-000)")
        self.stage = min(stages)
        self.passes = 0

    def current_indices(self) -> list[int]:
        """Dataset rows of the current stage; ValueError when the dataset lacks some of them."""
        table, _ = read_stage(self.folder, self.stage)
        ids = table.column("id").to_pylist()
        missing = [x for x in ids if x not in self.rows]
        if missing:
            raise ValueError(f"{self.folder}: stage {self.stage}: {len(missing)} of {len(ids)} prompts are not in the "
                             f"trainer's dataset (first: {missing[0]!r}); train on an export of the whole pool")
        return [self.rows[x] for x in ids]

    def next_indices(self) -> list[int]:
        """Start a pass (advancing to a newly written stage after the first) and return its rows."""
        if self.passes and self.stage + 1 in stage_dirs(self.folder):
            self.stage += 1
        self.passes += 1
        return self.current_indices()

    def state_dict(self) -> dict:
        return {"stage": self.stage, "passes": self.passes}

    def load_state_dict(self, state: dict) -> None:
        self.stage, self.passes = int(state["stage"]), int(state["passes"])
