"""Exports read by their consumers: verl's column contract (and verl's own RLHFDataset and
custom-reward loader when verl can be imported), and TRL's prompt tokenization, which must give
the tokens cropi rolled out and scored."""

import copy
import importlib.util
import types

import datasets
import pytest
from click.testing import CliRunner

from cropi import curriculum, export, models, rewards, schema, tasks
from cropi.cli import main
from cropi.integrations import verl as cropi_verl

SPECS = ["fraction_simplification:difficulty=0", "chain_sum:difficulty=0", "spell_backward:difficulty=1"]


@pytest.fixture()
def own_tiny():
    """A tiny policy of this test's own: TRL's trainer sets a pad token and gradient checkpointing
    on what it is given, which must not leak into the session's tiny_policy."""
    return models.load(models.TINY)


@pytest.fixture(scope="module")
def cur(tmp_path_factory):
    root = tmp_path_factory.mktemp("cur") / "cur"
    curriculum.write_stage(root, tasks.make_pool(SPECS, 2, 0), {"selector": "test"})
    return root


def _stage_rows(cur):
    return schema.read_table(cur / "stage-000" / "train.parquet").to_pylist()


@pytest.mark.parametrize("fmt,name", [("verl", "exp/verl"), ("verl", "v.jsonl"), ("trl", "t.json"), ("jsonl", "j.parquet")])
def test_export_name_must_match_format(cur, tmp_path, fmt, name):
    out = tmp_path / name
    r = CliRunner().invoke(main, ["export", "--curriculum", str(cur), "--stage", "0", "--format", fmt, "--out", str(out)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "must end in" in r.output
    assert not out.exists()


def test_verl_column_contract_and_reward_manager_call(cur, tmp_path):
    """The columns verl's RLHFDataset and NaiveRewardManager read (verl 0.9 docs and code):
    data_source, prompt (chat messages), reward_model.ground_truth, extra_info (a dict, to
    which the reward manager adds num_turns and rollout_reward_scores)."""
    out = export.export_stage(cur, 0, "verl", tmp_path / "v.parquet")
    ds = datasets.load_dataset("parquet", data_files=str(out), split="train")  # what RLHFDataset does
    for row, src in zip(ds, _stage_rows(cur)):
        assert row["prompt"] == [{"role": "user", "content": src["prompt"]}]
        assert row["extra_info"]["metadata"] == src["metadata"]
        extra = {**copy.deepcopy(row["extra_info"]), "num_turns": 2, "rollout_reward_scores": {}}
        for text in (f"Answer: {src['answer']}", f"\\boxed{{{src['answer']}}}", "Answer: 999"):
            got = cropi_verl.compute_score(data_source=row["data_source"], solution_str=text,
                                           ground_truth=row["reward_model"]["ground_truth"], extra_info=extra)
            assert got == rewards.reward(text, src["answer"], src["task"], src["metadata"])


def _verl():
    try:
        from verl.trainer.ppo.reward import get_custom_reward_fn
        from verl.utils.dataset.rl_dataset import RLHFDataset
    except ImportError:
        return None
    return RLHFDataset, get_custom_reward_fn


@pytest.mark.skipif(importlib.util.find_spec("verl") is None, reason="verl is not installed (see test_verl_column_contract)")
def test_verl_rlhf_dataset_custom_reward_loader_and_sampler(cur, tmp_path, own_tiny):
    loaded = _verl()
    if loaded is None:
        pytest.skip("verl is installed but cannot be imported here")
    RLHFDataset, get_custom_reward_fn = loaded
    from omegaconf import OmegaConf

    out = export.export_stage(cur, 0, "verl", tmp_path / "v.parquet")
    cfg = OmegaConf.create({"max_prompt_length": 512, "filter_overlong_prompts": False, "cache_dir": str(tmp_path / "c"),
                            "cropi_curriculum": str(cur)})
    ds = RLHFDataset(data_files=[str(out)], tokenizer=own_tiny.tokenizer, config=cfg)
    fn = get_custom_reward_fn(OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "pkg://cropi.integrations.verl", "name": "compute_score", "reward_kwargs": {}}}}))
    src = _stage_rows(cur)
    assert len(ds) == len(src)
    for i, s in enumerate(src):
        item = ds[i]
        for text in (f"Answer: {s['answer']}", "Answer: 999"):
            got = fn(data_source=item["data_source"], solution_str=text, ground_truth=item["reward_model"]["ground_truth"],
                     extra_info=item["extra_info"])
            assert got == rewards.reward(text, s["answer"], s["task"], s["metadata"])
    sampler = cropi_verl.CurriculumSampler(data_source=ds, data_config=cfg)
    assert list(sampler) == list(range(len(src)))
    try:  # verl 0.8's curriculum interface (the 0.9 wheel on PyPI no longer ships it)
        from verl.experimental.dataset.sampler import AbstractCurriculumSampler
    except ImportError:
        return
    from verl.utils.import_utils import load_extern_object

    # the class_path branch of verl's create_rl_sampler (verl/trainer/main_ppo.py)
    data_config = OmegaConf.create({"dataloader_num_workers": 0, "cropi_curriculum": str(cur), "sampler": {
        "class_path": "pkg://cropi.integrations.verl", "class_name": "CurriculumSampler"}})
    cls = load_extern_object(data_config.sampler.class_path, data_config.sampler.class_name)
    sampler = cls(data_source=ds, data_config=data_config)
    assert isinstance(sampler, AbstractCurriculumSampler) and list(sampler) == list(range(len(src)))


def _trl_prompt_ids(trainer_like, prompts):
    import trl

    return trl.GRPOTrainer._tokenize_prompts(trainer_like, prompts)[0]


def _tokens_match(policy, cur, tmp_path, trainer_like):
    out = export.export_stage(cur, 0, "trl", tmp_path / "t.parquet", chat=policy.chat_template)
    ds = datasets.load_dataset("parquet", data_files=str(out), split="train")
    trl_ids = [list(x) for x in _trl_prompt_ids(trainer_like, list(ds["prompt"]))]
    cropi_ids = models.encode_prompts(policy, [r["prompt"] for r in _stage_rows(cur)])
    decode = policy.tokenizer.batch_decode
    assert decode(trl_ids) == decode(cropi_ids)
    assert trl_ids == cropi_ids


def _trainer(policy, tmp_path):
    trl = pytest.importorskip("trl")
    tok = policy.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    args = trl.GRPOConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=2, num_generations=2,
                          max_completion_length=4, max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    ds = datasets.Dataset.from_dict({"prompt": ["x"], "answer": ["1"]})
    return trl.GRPOTrainer(model=policy.model, processing_class=tok, reward_funcs=[lambda **kw: [0.0]], args=args,
                           train_dataset=ds)


def test_trl_plain_prompts_tokenize_as_cropi_scored(cur, tmp_path, own_tiny):
    assert not own_tiny.chat_template
    _tokens_match(own_tiny, cur, tmp_path, _trainer(own_tiny, tmp_path))


@pytest.mark.real
def test_trl_chat_export_tokenizes_as_cropi_scored(cur, tmp_path, own_tiny, smollm2):
    """SmolLM2 has a chat template: the conversational export gives TRL the tokens cropi scored;
    the old plain-text export did not."""
    trainer = _trainer(own_tiny, tmp_path)
    like = types.SimpleNamespace(**{k: getattr(trainer, k) for k in
                                    ("chat_template", "tools", "environment_factories", "_is_vlm", "chat_template_kwargs")})
    like.processing_class = smollm2.tokenizer
    _tokens_match(smollm2, cur, tmp_path, like)
    plain = [r["prompt"] for r in _stage_rows(cur)]
    assert [list(x) for x in _trl_prompt_ids(like, plain)] != models.encode_prompts(smollm2, plain)
