"""cropi for TRL: the reward function for ``GRPOTrainer(reward_funcs=[...])`` and a curriculum
sampler for stage-by-stage training.

    from cropi.integrations.trl import reward
    trainer = GRPOTrainer(model=..., reward_funcs=[reward], train_dataset=load_dataset("parquet", data_files="stage0.parquet")["train"])

TRL passes every extra dataset column (``answer``, ``task``, ``metadata`` from ``cropi export
--format trl``) to the reward function as a keyword argument, one value per completion.
"""

from __future__ import annotations

from pathlib import Path

from cropi import rewards


def _text(completion) -> str:
    """A completion as text: itself, or the contents of its assistant messages (conversational)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict) and m.get("role", "assistant") == "assistant")


def make_reward(verifier: str = "auto", partial: bool = False):
    """A TRL reward function ``(prompts, completions, answer, task=None, metadata=None, **kw)
    -> list[float]`` that scores with :func:`cropi.rewards.reward`."""
    rewards.uses_math("", verifier)

    def cropi_reward(prompts, completions, answer, task=None, metadata=None, **kwargs) -> list[float]:
        n = len(completions)
        task = task if task is not None else ["unknown"] * n
        metadata = metadata if metadata is not None else [None] * n
        return [rewards.reward(_text(c), str(a), t, m, verifier=verifier, partial=partial)
                for c, a, t, m in zip(completions, answer, task, metadata)]

    cropi_reward.__name__ = "cropi_reward" if (verifier, partial) == ("auto", False) else f"cropi_reward_{verifier}{'_partial' if partial else ''}"
    return cropi_reward


reward = make_reward()


class CurriculumSampler:
    """A torch Sampler over a TRL train dataset exported from the whole pool (``cropi export
    --prompts``, with its ``id`` column): each pass yields the rows of cropi's current stage, and
    a pass after the stage has been served moves to the next stage once cropi has written it.
    ``repeat``: consecutive copies of each index (GRPO's ``num_generations``). Attach it to a
    GRPOTrainer with :func:`use_curriculum`."""

    def __init__(self, dataset, curriculum_dir, repeat: int = 1):
        from cropi.integrations.stages import StageCursor

        self.cursor = StageCursor(Path(curriculum_dir), [str(x) for x in dataset["id"]])
        self.repeat = repeat

    def __iter__(self):
        for i in self.cursor.next_indices():
            yield from [i] * self.repeat

    def __len__(self) -> int:
        return len(self.cursor.current_indices()) * self.repeat


def use_curriculum(trainer, curriculum_dir) -> CurriculumSampler:
    """Make ``trainer`` (a TRL GRPOTrainer whose train_dataset is ``cropi export --prompts`` of
    the pool) draw its prompts from cropi's curriculum: each epoch of its dataloader is one pass
    over the current stage, in stage order, each prompt ``num_generations`` times in a row (what
    GRPOTrainer's own sampler does without shuffling). Generations must not be reused across
    steps (``num_iterations`` 1 and ``steps_per_generation`` 1, the defaults with no gradient
    accumulation), since each pass is consumed once. Returns the sampler."""
    reuse = trainer.num_iterations * trainer.args.steps_per_generation
    if reuse != 1:
        raise ValueError(f"use_curriculum needs num_iterations * steps_per_generation == 1, got {reuse}")
    sampler = CurriculumSampler(trainer.train_dataset, curriculum_dir, repeat=trainer.num_generations)
    trainer._get_train_sampler = lambda dataset=None: sampler
    return sampler
