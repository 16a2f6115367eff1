"""cropi inside verl and TRL: exported stages keep what the scorers need, the reward functions
give cropi's scores for the same text, and the stage samplers walk the curriculum."""

import json

import pyarrow.parquet as pq
import pytest

from cropi import curriculum, export, schema, tasks
from cropi.integrations import trl as cropi_trl
from cropi.integrations import verl as cropi_verl

SPECS = ["fraction_simplification:difficulty=0", "chain_sum:difficulty=0", "complex_arithmetic:difficulty=0"]


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    root = tmp_path_factory.mktemp("cur")
    pool = tasks.make_pool(SPECS, 3, 0)
    curriculum.write_stage(root / "cur", pool, {"selector": "test"})
    return root


def _cases(rows):
    """(response, expected reward) pairs for each row, the expectation written by hand: the gold
    answer after each marker the verifier reads passes; a wrong final answer, a right answer
    followed by a later wrong one, and no answer fail."""
    return [[(f"Answer: {r['answer']}", 1.0), (f"\\boxed{{{r['answer']}}}", 1.0),
             (f"12345 is a guess.\n#### {r['answer']}", 1.0), ("Answer: 12345", 0.0),
             (f"Answer: {r['answer']}\nAnswer: 12345", 0.0), ("", 0.0)] for r in rows]


def test_verl_export_keeps_metadata_and_scores_like_cropi(stage):
    out = export.export_stage(stage / "cur", 0, "verl", stage / "v.parquet")
    rows = schema.read_table(stage / "cur" / "stage-000" / "train.parquet").to_pylist()
    exported = pq.read_table(out).to_pylist()
    assert [e["extra_info"]["metadata"] for e in exported] == [r["metadata"] for r in rows]
    for e, cases in zip(exported, _cases(rows)):
        for t, want in cases:
            got = cropi_verl.compute_score(e["data_source"], t, e["reward_model"]["ground_truth"], e["extra_info"])
            assert got == want, (e["ability"], t)
    # without the metadata the fraction_simplification scorer cannot give full credit: the defect
    frac = next(e for e in exported if e["ability"] == "fraction_simplification")
    right = f"Answer: {frac['reward_model']['ground_truth']}"
    assert cropi_verl.compute_score(frac["data_source"], right, frac["reward_model"]["ground_truth"], frac["extra_info"]) == 1.0
    assert cropi_verl.compute_score(frac["data_source"], right, frac["reward_model"]["ground_truth"], {}) == 0.0


def test_verl_reward_kwargs_and_foreign_data_sources():
    assert cropi_verl.compute_score("openai/gsm8k", "so #### 72", "72", {"split": "train"}) == 1.0
    assert cropi_verl.compute_score("openai/gsm8k", "so #### 71", "72") == 0.0
    meta = {"metadata": json.dumps({"word": "hello"})}
    assert cropi_verl.compute_score("cropi/spell_backward", "Answer: olleh.", "olleh", meta) == 0.0
    assert 0 < cropi_verl.compute_score("cropi/spell_backward", "Answer: olleh.", "olleh", meta, partial=True) < 1


def test_verl_custom_reward_loader_contract():
    """verl's loader does getattr(import(path), name) and calls fn(data_source=..., solution_str=...,
    ground_truth=..., extra_info=..., **reward_kwargs) with keywords."""
    import importlib

    fn = importlib.import_module("cropi.integrations.verl").compute_score
    assert fn(data_source="cropi/chain_sum", solution_str="Answer: 5", ground_truth="5", extra_info={"metadata": "{}"}) == 1.0


def test_trl_reward_matches_cropi_for_plain_and_chat_completions(stage):
    import datasets

    out = export.export_stage(stage / "cur", 0, "trl", stage / "t.parquet")
    ds = datasets.load_dataset("parquet", data_files=str(out), split="train")
    rows = schema.read_table(stage / "cur" / "stage-000" / "train.parquet").to_pylist()
    flat = [(r, t) for r, cases in zip(rows, _cases(rows)) for t, _ in cases]
    want = [w for cases in _cases(rows) for _, w in cases]
    by_id = {x["id"]: x for x in ds}
    kw = {k: [by_id[r["id"]][k] for r, _ in flat] for k in ("answer", "task", "metadata", "id", "difficulty")}
    prompts = [by_id[r["id"]]["prompt"] for r, _ in flat]
    assert cropi_trl.reward(prompts, [t for _, t in flat], **kw) == want
    chat = [[{"role": "assistant", "content": t}] for _, t in flat]
    assert cropi_trl.reward(prompts, chat, **kw) == want
    assert sum(want) == 3 * len(rows) and len(want) == 6 * len(rows)


def test_grpo_trainer_step_logs_cropi_rewards(stage, tmp_path):
    """One real GRPOTrainer step on the tiny model, the TRL export loaded as GRPOTrainer users do."""
    trl = pytest.importorskip("trl")
    import datasets

    from cropi import models

    policy = models.load("tiny")
    out = export.export_stage(stage / "cur", 0, "trl", tmp_path / "t.parquet", chat=policy.chat_template)
    ds = datasets.load_dataset("parquet", data_files=str(out), split="train").select(range(4))
    gold = {repr(x["prompt"]): x["answer"] for x in ds}
    seen = []

    def spy(prompts, completions, **kw):
        """Scores, in TRL's completion format, the gold answer of each prompt (looked up in the
        dataset, not in what TRL passes) for even completions and a wrong one for odd ones."""
        texts = [f"Answer: {gold[repr(p)]}" if j % 2 == 0 else "Answer: 12345" for j, p in enumerate(prompts)]
        texts = [[{"role": "assistant", "content": t}] if isinstance(c, list) else t for t, c in zip(texts, completions)]
        r = cropi_trl.reward(prompts, texts, **kw)
        seen.extend(r)
        return r

    spy.__name__ = "cropi_reward"
    tok = policy.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    args = trl.GRPOConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=8, max_steps=1, logging_steps=1, report_to=[], use_cpu=True,
                          save_strategy="no", seed=0, bf16=False)
    trainer = trl.GRPOTrainer(model=policy.model, processing_class=tok, reward_funcs=[spy], args=args, train_dataset=ds)
    trainer.train()
    logged = list(trainer._logs["rewards"]["cropi_reward"])
    assert len(seen) >= 4 and seen == [1.0, 0.0] * (len(seen) // 2)
    assert logged == seen[-len(logged):]
    mean = next(h for h in trainer.state.log_history if "rewards/cropi_reward/mean" in h)["rewards/cropi_reward/mean"]
    assert mean == pytest.approx(sum(logged) / len(logged))


def test_stage_samplers_walk_the_curriculum(tmp_path):
    pool = tasks.make_pool(["chain_sum:difficulty=0"], 6, 0)
    ids = pool.column("id").to_pylist()
    cur = tmp_path / "cur"
    curriculum.write_stage(cur, pool.take([4, 1]), {"selector": "test"})
    dataset_rows = [{"id": x, "extra_info": {"id": x}} for x in ids]

    class DS(list):
        def __getitem__(self, i):
            return list.__getitem__(self, i)

    verl_sampler = cropi_verl.CurriculumSampler(DS(dataset_rows), {"cropi_curriculum": str(cur)})
    trl_sampler = cropi_trl.CurriculumSampler({"id": ids}, cur, repeat=2)
    assert list(verl_sampler) == [4, 1] and len(verl_sampler) == 2
    assert list(trl_sampler) == [4, 4, 1, 1]
    assert list(verl_sampler) == [4, 1]               # no new stage: the same one again
    curriculum.write_stage(cur, pool.take([0, 5, 2]), {"selector": "test"})
    assert list(verl_sampler) == [0, 5, 2] and list(trl_sampler) == [0, 0, 5, 5, 2, 2]
    state = verl_sampler.state_dict()
    fresh = cropi_verl.CurriculumSampler(DS(dataset_rows), {"cropi_curriculum": str(cur)})
    fresh.load_state_dict(state)
    assert list(fresh) == [0, 5, 2]
    with pytest.raises(ValueError, match="not in the trainer's dataset"):
        list(cropi_verl.CurriculumSampler(DS(dataset_rows[:3]), {"cropi_curriculum": str(cur)}))


def test_grpo_trainer_walks_the_curriculum(tmp_path):
    """use_curriculum: epoch 1 of GRPOTrainer's dataloader serves stage 0; stage 1, written by
    cropi meanwhile, is served by epoch 2."""
    trl = pytest.importorskip("trl")
    import datasets

    from cropi import models

    pool = tasks.make_pool(["chain_sum:difficulty=0"], 6, 0)
    schema.write_parquet_atomic(pool, tmp_path / "pool.parquet")
    ids = pool.column("id").to_pylist()
    cur = tmp_path / "cur"
    curriculum.write_stage(cur, pool.take([4, 1]), {"selector": "test"})
    out = export.export_prompts(tmp_path / "pool.parquet", "trl", tmp_path / "pool.trl.parquet")
    ds = datasets.load_dataset("parquet", data_files=str(out), split="train")
    seen = []

    def spy(prompts, completions, **kw):
        seen.extend(kw["id"])
        return cropi_trl.reward(prompts, completions, **kw)

    policy = models.load("tiny")
    tok = policy.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    from transformers import TrainerCallback

    class WriteNextStage(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kw):
            if state.epoch <= 1:
                curriculum.write_stage(cur, pool.take([0, 5]), {"selector": "test"})

    args = trl.GRPOConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=4, max_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                          save_strategy="no", seed=0)
    trainer = trl.GRPOTrainer(model=policy.model, processing_class=tok, reward_funcs=[spy], args=args, train_dataset=ds,
                              callbacks=[WriteNextStage()])
    cropi_trl.use_curriculum(trainer, cur)
    trainer.train()
    assert seen == [ids[4], ids[4], ids[1], ids[1], ids[0], ids[0], ids[5], ids[5]]
