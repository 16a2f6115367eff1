"""Trainer options that were wrong or silent, resume's damaged files, and --rescore's outputs.

Truths: hand-computed values (k3 at fixed log-ratios and verl's bounds), hand-built reward
tables run through the real `collect`, and byte comparisons of the input curriculum.
"""

import io
import json
import math
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cropi import curriculum, schema, tasks
from cropi.advantages import group_advantages
from cropi.cli import main
from cropi.train import checkpoint as ckpt
from cropi.train import groups, loop, stages
from cropi.train.config import TrainConfig
from cropi.train.losses import kl_k3, policy_loss
from cropi.train.samplers import PromptSampler, VCRLBank

# ---------------------------------------------------------------------------- option combinations


def test_batch_mean_with_group_std_is_refused():
    # the example: row 0 is all-equal, its batch-centred rewards are -0.125, and a group
    # std of 0 turned them into -0.125 / 1e-4 = -1250
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="eps alone"):
        group_advantages(rewards, "batch", "group")
    with pytest.raises(ValueError, match="^adv_std: group with adv_mean batch is refused"):
        TrainConfig(adv_mean="batch", adv_std="group").validate()
    for std in ("batch", "none"):  # the batch-mean combinations that stay
        assert TrainConfig(adv_mean="batch", adv_std=std).validate()
        assert group_advantages(rewards, "batch", std).abs().max() < 3


@pytest.mark.parametrize("name,value", [("clip_low", 0.1), ("clip_high", 0.28), ("ratio_level", "sequence")])
def test_clip_and_ratio_options_need_a_second_update(name, value):
    with pytest.raises(ValueError, match=f"^{name}: .* no effect with mu_updates=1"):
        TrainConfig(**{name: value}).validate()
    assert TrainConfig(**{name: value, "mu_updates": 2}).validate()
    assert TrainConfig(**{name: getattr(TrainConfig(), name)}).validate()  # the default, explicitly


def test_clip_has_no_effect_on_the_first_update():
    """Why the rule holds: at mu=1 the ratio is exactly 1, so the clip range changes nothing."""
    logp = torch.randn(3, 5, requires_grad=True)
    adv, mask = torch.tensor([1.0, -1.0, 0.5]), torch.ones(3, 5, dtype=torch.bool)
    grads = []
    for lo, hi in [(0.2, 0.2), (1e-4, 1e-4)]:
        loss, st = policy_loss(logp, logp.detach(), adv, mask, clip_low=lo, clip_high=hi)
        grads.append(torch.autograd.grad(loss, logp)[0])
        assert st["clip_frac"] == 0.0
    assert torch.equal(grads[0], grads[1])


# ---------------------------------------------------------------------------- k3 KL


def test_k3_is_bounded_as_verl():
    ref = torch.zeros(5)
    x = torch.tensor([1.0, 2.0, 100.0, -12.0, -200.0])  # x = ref - logp
    logp = (ref - x).requires_grad_(True)
    k3 = kl_k3(logp, ref)
    # e^1-2, e^2-3; x=100 -> clamp 20 -> e^20-21 -> cap 10; x=-12: e^-12+11 > 10 -> 10; x=-200 -> 10
    want = torch.tensor([math.e - 2, math.e**2 - 3, 10.0, 10.0, 10.0])
    assert torch.allclose(k3, want, rtol=1e-6)
    (grad,) = torch.autograd.grad(k3.sum(), logp)
    # d/dlogp (e^x - x - 1) = -(e^x - 1) below the caps, 0 where a cap is active
    assert torch.allclose(grad, torch.tensor([-(math.e - 1), -(math.e**2 - 1), 0.0, 0.0, 0.0]), rtol=1e-6)
    # float32 logp 120 nats below the reference overflowed exp() before: now a finite loss
    lp = torch.full((1, 3), -121.0, requires_grad=True)
    loss, st = policy_loss(lp, lp.detach(), torch.ones(1), torch.ones(1, 3, dtype=torch.bool),
                           clip_low=0.2, clip_high=0.2, ref_logp=torch.full((1, 3), -1.0), kl_beta=0.1)
    assert math.isfinite(loss.item()) and st["kl"] == pytest.approx(10.0)


# ---------------------------------------------------------------------------- collect(): filters and replay


def _stage(n_rows: int, bank: VCRLBank | None = None) -> stages.Stage:
    rows = [{"task": "t", "difficulty": 0, "prompt": f"p{i}", "answer": "1"} for i in range(n_rows)]
    return stages.Stage(0, rows, [[1]] * n_rows, PromptSampler(n_rows, 0), bank, None, None, None, {})


def _fake_rollout(raw: dict, shaped: dict, calls: list):
    """rollout_groups stand-in: row i gets task rewards raw[i] and shaped rewards shaped[i]."""

    def rollout_groups(policy, stage, indices, cfg, gen):
        calls.append([int(i) for i in indices])
        g = cfg.group_size
        return [groups.Group(int(i), [[1]] * g, raw[int(i)], shaped.get(int(i), raw[int(i)]), [False] * g)
                for i in indices]

    return rollout_groups


def _draws(seq):
    it = iter(seq)
    return lambda stage, n: np.asarray([next(it) for _ in range(n)], dtype=np.int64)


@pytest.mark.parametrize("filt", ["dynamic_sampling", "vcrl"])
def test_filters_see_correctness_not_penalty_shaped_rewards(filt, monkeypatch):
    # row 0: every response fails, two are also overlong: shaped [0, 0, -1, -1] has variance but
    # no correctness signal (DAPO filters on `acc`); row 1: one pass of four, also penalised
    raw = {0: [0.0, 0.0, 0.0, 0.0], 1: [1.0, 0.0, 0.0, 0.0], 2: [1.0, 1.0, 0.0, 0.0]}
    shaped = {0: [0.0, 0.0, -1.0, -1.0], 1: [1.0, 0.0, -1.0, -1.0], 2: [0.5, 1.0, -1.0, 0.0]}
    calls: list = []
    monkeypatch.setattr(groups, "rollout_groups", _fake_rollout(raw, shaped, calls))
    monkeypatch.setattr(groups, "draw", _draws([0, 1, 2]))
    cfg = TrainConfig(group_size=4, batch_prompts=3, max_refill=0, **{filt: True}, vcrl_kappa=0.7)
    bank = VCRLBank(8, cfg.vcrl_kappa, 2) if filt == "vcrl" else None
    kept, generated, info = groups.collect(None, _stage(3, bank), cfg, torch.Generator())
    # dynamic sampling keeps rows with passes and fails (1, 2); VCRL keeps p >= 0.7 on
    # correctness: p(1 of 4) = (3/16*4/3) / (1/3) = 0.75, p(2 of 4) = 1
    assert [g.row for g in kept] == [1, 2] and info["dropped"] == 1
    assert len(generated) == 3 and calls == [[0, 1, 2]]
    if bank is not None:
        assert 0 not in bank and 1 in bank and 2 in bank


def test_vcrl_replays_a_group_not_already_in_the_batch(monkeypatch):
    """A banked group that is also this step's fresh group must not use up its replay (and leave
    the bank) without being trained on again: the next banked group is replayed instead."""
    raw = {0: [1.0, 1.0, 0.0, 0.0], 1: [1.0, 1.0, 0.0, 0.0], 2: [0.0, 0.0, 0.0, 0.0]}
    bank = VCRLBank(capacity=8, kappa=0.8, max_replay=1)
    bank.offer([0, 1], np.array([raw[0], raw[1]]))  # both p = 1; row 0 is older: replayed first
    calls: list = []
    monkeypatch.setattr(groups, "rollout_groups", _fake_rollout(raw, {}, calls))
    monkeypatch.setattr(groups, "draw", _draws([0, 2]))
    cfg = TrainConfig(group_size=4, batch_prompts=2, max_refill=0, vcrl=True)
    kept, _, info = groups.collect(None, _stage(3, bank), cfg, torch.Generator())
    assert calls == [[0, 2], [1]]  # fresh rows 0 and 2 (2 dropped), then row 1 replayed
    assert [g.row for g in kept] == [0, 1] and info["replayed"] == 1
    assert 0 in bank and bank.replays(0) == 0  # still waiting for its replay


def test_bank_replay_exclude_neither_returns_nor_counts():
    bank = VCRLBank(capacity=4, kappa=0.5, max_replay=2)
    bank.offer([5, 6, 7], np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]))
    assert bank.replay(2, exclude={5}) == [6, 7]
    assert bank.replays(5) == 0 and bank.replays(6) == 1 and bank.replays(7) == 1
    assert bank.replay(3, exclude=[6, 7]) == [5]


# ---------------------------------------------------------------------------- resume's damaged files


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    """A 2-step run stopped after step 1 (checkpoint step-1) on the tiny default."""
    root = tmp_path_factory.mktemp("resume")
    curriculum.write_stage(root / "cur", tasks.make_pool(["chain_sum:difficulty=0"], 6, 0, "train"),
                           {"selector": "test"})
    spec = loop.RunSpec(curriculum=str(root / "cur"), train=TrainConfig(
        batch_prompts=2, group_size=2, max_new_tokens=6, steps_per_stage=2, eval_every=0, checkpoint_every=1))
    assert loop.train(root / "run", spec, max_steps=1)["step"] == 1
    return root / "run"


def _copy(run, tmp_path):
    import shutil

    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _resume(run):
    return CliRunner().invoke(main, ["train", "--run", str(run), "--resume"])


def test_torn_last_metrics_row_is_dropped_on_resume(one_step_run, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "plot_curves", lambda *a: None)
    run = _copy(one_step_run, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "step": 2, "stage": 0, "rew')  # killed mid-write
    res = _resume(run)
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_unreadable_metrics_row_before_the_end_is_one_line(one_step_run, tmp_path):
    run = _copy(one_step_run, tmp_path)
    good = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text("not json\n" + good)
    res = _resume(run)
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert f"{run / 'metrics.jsonl'}: line 1: not a metrics row" in res.output


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("content", [b"\x00garbage" * 10, pickle.dumps(ValueError("boom")),
                                     _torch_bytes(ValueError("boom")), _torch_bytes([1, 2])],
                         ids=["garbage", "pickle", "torch-pickle-of-an-object", "not-a-state"])
def test_unreadable_trainer_state_is_one_line_naming_the_file(one_step_run, tmp_path, content):
    run = _copy(one_step_run, tmp_path)
    state = run / "checkpoints" / "step-1" / ckpt.TRAINER_STATE
    state.write_bytes(content)
    with pytest.raises(schema.InputError, match="not a (readable )?cropi trainer state"):
        ckpt.load_state(state.parent)
    res = _resume(run)
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert str(state) in res.output and "Traceback" not in res.output


# ---------------------------------------------------------------------------- --rescore outputs


def test_rescore_leaves_the_input_curriculum_read_only(tmp_path, monkeypatch):
    """A --rescore run on a curriculum holding stage 0 selects its stage 1 into its own
    RUN/curriculum; the input folder stays byte-identical, so another run on the same
    curriculum cannot train on this run's choices."""
    from cropi.rollout import rollout

    monkeypatch.setattr(loop, "plot_curves", lambda *a: None)
    # count_bits: the tiny default solves 10-20 %, so the target groups carry a gradient
    count_bits = [f"count_bits:difficulty={d}" for d in (0, 1, 2)]
    schema.write_parquet_atomic(tasks.make_pool([*count_bits, "chain_sum:difficulty=0"], 2, 5, "train"),
                                tmp_path / "pool_p.parquet")
    schema.write_parquet_atomic(tasks.make_pool(count_bits, 3, 5, "val"), tmp_path / "tgt_p.parquet")
    rollout(tmp_path / "pool_p.parquet", tmp_path / "pool.parquet", n=4, max_new_tokens=16, seed=1)
    rollout(tmp_path / "tgt_p.parquet", tmp_path / "tgt.parquet", n=4, max_new_tokens=16, seed=2)
    cur = tmp_path / "cur"
    curriculum.make_stage(trajectories=tmp_path / "pool.parquet", selector="random", ratio=0.5, out=cur)
    before = {p.relative_to(cur): p.read_bytes() for p in sorted(cur.rglob("*")) if p.is_file()}
    spec = loop.RunSpec(curriculum=str(cur), targets=[str(tmp_path / "tgt.parquet")], rescore=True,
                        trajectories=str(tmp_path / "pool.parquet"), ratio=0.25, k=32,
                        train=TrainConfig(batch_prompts=2, group_size=2, max_new_tokens=6, steps_per_stage=1,
                                          stages=2, eval_every=0, checkpoint_every=0))
    run = tmp_path / "run"
    assert loop.train(run, spec)["step"] == 2
    after = {p.relative_to(cur): p.read_bytes() for p in sorted(cur.rglob("*")) if p.is_file()}
    assert after == before and sorted(curriculum.stage_dirs(cur)) == [0]
    assert sorted(curriculum.stage_dirs(run / "curriculum")) == [1]
    table, manifest = curriculum.read_stage(run / "curriculum", 1)
    assert manifest["checkpoint"] == str(run / "checkpoints" / "step-1") and table.num_rows == 2
    assert manifest["scores_file"] == str(run / "scores" / "stage-001" / "scores.parquet")
