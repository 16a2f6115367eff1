"""cropi for verl: the reward function and a curriculum sampler.

Reward (verl's custom reward function; ``custom_reward_function.*`` in verl 0.8,
``reward.custom_reward_function.*`` in verl 0.9)::

    custom_reward_function.path=pkg://cropi.integrations.verl
    custom_reward_function.name=compute_score

Curriculum (verl 0.8's ``data.sampler``; verl 0.9.1 on PyPI no longer reads it)::

    data.train_files=pool.verl.parquet        # cropi export --prompts POOL --format verl
    data.dataloader_num_workers=0
    data.sampler.class_path=pkg://cropi.integrations.verl
    data.sampler.class_name=CurriculumSampler
    +data.cropi_curriculum=curriculum/        # the folder `cropi select` / `cropi train` append to

The sampler serves the rows of the current stage and moves to the next stage when cropi has
written it and the current one has been served once.
"""

from __future__ import annotations

from pathlib import Path

from cropi import rewards


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None,
                  verifier: str = "auto", partial: bool = False, **kwargs) -> float:
    """verl's reward signature -> :func:`cropi.rewards.reward` of ``solution_str``.

    The task is ``data_source`` without its ``cropi/`` prefix (another data source, e.g.
    ``openai/gsm8k``, is unknown to reasoning-gym and gets the math verifier); the task scorer's
    metadata comes from ``extra_info["metadata"]``. ``verifier`` and ``partial`` can be set
    through verl's ``custom_reward_function.reward_kwargs``."""
    task = data_source[len("cropi/"):] if data_source.startswith("cropi/") else data_source
    metadata = (extra_info or {}).get("metadata") if isinstance(extra_info, dict) else None
    return rewards.reward(solution_str, ground_truth, task, metadata, verifier=verifier, partial=partial)


def _sampler_base():
    try:
        from verl.experimental.dataset.sampler import AbstractCurriculumSampler
    except ImportError:  # verl without the curriculum interface: torch's Sampler, same protocol
        from torch.utils.data import Sampler as AbstractCurriculumSampler
    return AbstractCurriculumSampler


class CurriculumSampler(_sampler_base()):
    """Indices into verl's train dataset: the rows of cropi's current stage, stage after stage.

    ``data_source`` is verl's RLHFDataset (or any sized dataset whose rows or ``dataframe`` give
    ``extra_info.id``); ``data_config.cropi_curriculum`` names the curriculum folder. The dataset
    must hold every prompt a stage may select (export the pool, or a union of stages, as verl
    Parquet). Within a stage rows come in stage order (best first). After the last index of a
    stage the sampler moves to the next stage if cropi has written it, else serves the current
    one again. ``update(batch)`` is verl's per-step hook; the stage switch happens between
    epochs of the dataloader, so it needs nothing from the batch.
    """

    def __init__(self, data_source, data_config):
        from cropi.integrations.stages import StageCursor

        self.ids = _dataset_ids(data_source)
        folder = data_config.get("cropi_curriculum") if hasattr(data_config, "get") else None
        if not folder:
            raise ValueError("data.cropi_curriculum: the curriculum folder is not set")
        self.cursor = StageCursor(Path(folder), self.ids)

    def __iter__(self):
        return iter(self.cursor.next_indices())

    def __len__(self) -> int:
        return len(self.cursor.current_indices())

    def update(self, batch) -> None:
        """verl calls this after each step; the stage switch happens at the end of a pass."""

    def state_dict(self) -> dict:
        return self.cursor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.cursor.load_state_dict(state)


def _dataset_ids(dataset) -> list[str]:
    """The cropi id of every row of a verl dataset (``extra_info.id``)."""
    frame = getattr(dataset, "dataframe", None)
    if frame is not None and "extra_info" in getattr(frame, "column_names", []):
        return [str((e or {}).get("id")) for e in frame["extra_info"]]
    return [str(dataset[i]["extra_info"]["id"]) for i in range(len(dataset))]
