"""GRPO trainer math: advantages, losses, samplers, config (cropi.train).

Expected numbers are hand-computed (plain Python `statistics` / pencil) and written here as
literals; the loss gradients are checked against the analytic policy gradient and plain autograd.
"""

import json
import math

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cropi.advantages import group_advantages, max_group_variance, normalised_variance
from cropi.train.config import TrainConfig, click_options, config_from_options
from cropi.train.losses import (
    aggregate,
    kl_k3,
    mask_truncated,
    overlong_penalty,
    policy_loss,
    rl_plus_token_weights,
    sequence_ratio,
)
from cropi.train.samplers import PromptSampler, RLVEController, VCRLBank, dynamic_sampling


@pytest.fixture(autouse=True)
def _float64():
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(prev)


# ---------------------------------------------------------------- advantages

REWARDS = [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]]
# row 0: mean .5, unbiased std sqrt(1/3) = .577350; row 1: mean .75, std .5;
# batch: mean .625, unbiased std sqrt(1.875/7) = .517549; eps = 1e-4 added to the std.
ADV_TABLE = {
    ("group", "group"): [
        [0.865875, -0.865875, -0.865875, 0.865875],
        [0.4999, 0.4999, 0.4999, -1.4997],
    ],
    ("group", "batch"): [
        [0.965905, -0.965905, -0.965905, 0.965905],
        [0.482953, 0.482953, 0.482953, -1.448858],
    ],
    ("group", "none"): [[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]],
    ("batch", "batch"): [
        [0.724429, -1.207381, -1.207381, 0.724429],
        [0.724429, 0.724429, 0.724429, -1.207381],
    ],
    ("batch", "none"): [[0.375, -0.625, -0.625, 0.375], [0.375, 0.375, 0.375, -0.625]],
}


@pytest.mark.parametrize("mean,std", list(ADV_TABLE))
def test_advantages_match_hand_table(mean, std):
    got = group_advantages(torch.tensor(REWARDS), mean=mean, std=std, eps=1e-4)
    assert torch.allclose(got, torch.tensor(ADV_TABLE[(mean, std)]), atol=1e-6)


def test_advantages_zero_variance_group_is_exactly_zero_and_bad_options_raise():
    got = group_advantages(torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    assert torch.equal(got, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="std"):
        group_advantages(torch.tensor(REWARDS), std="bogus")
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.tensor([[1.0]]))


def test_normalised_variance_binary_and_ranged():
    # G=4: var_max = 4/12; k=2 -> var 4/12 (p=1), k=1 -> 3/12 (p=.75), k=0 -> 0.
    # G=5: var_max = 6/20; k=2 -> 6/20 (p=1), k=1 -> 4/20 (p=2/3).
    assert max_group_variance(4) == pytest.approx(1 / 3)
    assert max_group_variance(5) == pytest.approx(0.3)
    p4 = normalised_variance(torch.tensor([[1.0, 1, 0, 0], [1.0, 0, 0, 0], [0.0, 0, 0, 0]]))
    assert torch.allclose(p4, torch.tensor([1.0, 0.75, 0.0]))
    p5 = normalised_variance(torch.tensor([[1.0, 1, 0, 0, 0], [0.0, 1, 0, 0, 0]]))
    assert torch.allclose(p5, torch.tensor([1.0, 2 / 3]))
    # rewards in {-1, 1}: var of [1,1,-1,-1] = 4/3, var_max = 4 * 1/3.
    pr = normalised_variance(torch.tensor([[1.0, 1, -1, -1]]), reward_range=(-1.0, 1.0))
    assert torch.allclose(pr, torch.tensor([1.0]))


# ---------------------------------------------------------------- aggregation

VALUES = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 9.0, 9.0, 9.0], [7.0, 7.0, 7.0, 7.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)


def test_aggregate_modes_hand_computed():
    # tokens: 1,2,3 | 4 | (none). token-mean 10/4; seq means (2 + 4)/2; sum-norm (6/4 + 4/4)/2.
    assert aggregate(VALUES, MASK, "token-mean").item() == pytest.approx(2.5)
    assert aggregate(VALUES, MASK, "seq-mean-token-mean").item() == pytest.approx(3.0)
    assert aggregate(VALUES, MASK, "seq-mean-token-sum-norm").item() == pytest.approx(1.25)
    assert aggregate(VALUES, MASK, "seq-mean-token-sum-norm", norm_len=8).item() == pytest.approx(
        0.625
    )
    with pytest.raises(ValueError):
        aggregate(VALUES, MASK, "mean")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_micro_batches_sum_to_full_batch(mode):
    full = aggregate(VALUES, MASK, mode)
    total = MASK.sum().item() if mode == "token-mean" else 2
    parts = aggregate(VALUES[:1], MASK[:1], mode, total=total) + aggregate(
        VALUES[1:], MASK[1:], mode, total=total
    )
    assert parts.item() == pytest.approx(full.item())


@pytest.mark.parametrize(
    "agg,expected",
    # adv [1, -2] at ratio 1: per-token loss -1 (3 tokens) and +2 (1 token).
    [("token-mean", -0.25), ("seq-mean-token-mean", 0.5), ("seq-mean-token-sum-norm", -0.125)],
)
def test_policy_loss_each_aggregation_hand_computed(agg, expected):
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]]))
    mask = MASK[:2]
    loss, stats = policy_loss(
        logp, logp.clone(), torch.tensor([1.0, -2.0]), mask, clip_low=0.2, clip_high=0.2, agg=agg
    )
    assert loss.item() == pytest.approx(expected)
    assert (
        stats["n_tokens"] == 4
        and stats["clip_frac"] == 0.0
        and stats["ratio_mean"] == pytest.approx(1.0)
    )


def test_policy_loss_padding_garbage_is_ignored():
    logp = torch.tensor([[-0.7, float("-inf")], [-0.2, float("nan")]], requires_grad=True)
    old = torch.tensor([[-0.6, 0.0], [-0.3, float("inf")]])
    ref = torch.tensor([[-0.5, float("nan")], [-0.1, 3.0]])
    mask = torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)
    for level in ("token", "sequence"):
        loss, st = policy_loss(
            logp,
            old,
            torch.tensor([1.0, -1.0]),
            mask,
            clip_low=0.2,
            clip_high=0.2,
            ratio_level=level,
            ref_logp=ref,
            kl_beta=0.1,
        )
        (g,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(g).all() and (g[:, 1] == 0).all()
        assert math.isfinite(st["kl"])


# ---------------------------------------------------------------- clipping


def _one_token_rows(ratios):
    old = torch.log(torch.full((len(ratios), 1), 0.5))
    logp = (old + torch.log(torch.tensor(ratios))[:, None]).requires_grad_(True)
    return logp, old, torch.ones(len(ratios), 1, dtype=torch.bool)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_clip_higher_clips_exactly_outside_each_bound(sign):
    ratios = [0.79, 0.81, 1.27, 1.29]  # around 1 - 0.2 and 1 + 0.28
    logp, old, mask = _one_token_rows(ratios)
    adv = torch.full((4,), sign)
    loss, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    (grad,) = torch.autograd.grad(loss, logp)
    if sign > 0:  # A > 0: only rho > 1.28 is clipped (its loss is -1.28, no gradient)
        per_token = [-0.79, -0.81, -1.27, -1.28]
        clipped = [False, False, False, True]
        assert stats["clip_high_frac"] == 0.25 and stats["clip_low_frac"] == 0.0
    else:  # A < 0: only rho < 0.8 is clipped (its loss is 0.8, no gradient)
        per_token = [0.8, 0.81, 1.27, 1.29]
        clipped = [True, False, False, False]
        assert stats["clip_low_frac"] == 0.25 and stats["clip_high_frac"] == 0.0
    assert loss.item() == pytest.approx(sum(per_token) / 4)
    assert stats["clip_frac"] == 0.25
    # d(-rho A)/d logp = -rho A, then / 4 tokens; zero where clipped
    expected = [0.0 if c else -r * sign / 4 for r, c in zip(ratios, clipped)]
    assert torch.allclose(grad[:, 0], torch.tensor(expected))


def test_symmetric_clip_clips_what_clip_higher_lets_through():
    logp, old, mask = _one_token_rows([1.25])
    adv = torch.ones(1)
    _, sym = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    _, hi = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert sym["clip_frac"] == 1.0 and hi["clip_frac"] == 0.0


# ---------------------------------------------------------------- GSPO sequence ratio


def test_sequence_ratio_value_and_gradient():
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -0.9, -7.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -0.4, -1.9], [-0.2, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    s = sequence_ratio(logp, old, mask)
    # exp of the mean token log-ratio: row 0 (0.1 - 0.1 - 0.1)/3, row 1 (-0.1 + 0.1)/2
    assert torch.allclose(s[0], torch.full((3,), math.exp(-0.1 / 3)))
    assert torch.allclose(s[1, :2], torch.full((2,), 1.0)) and s[1, 2].item() == 1.0
    # straight-through: token t's value carries the gradient of its own log-prob only, times s_i
    (g_tok,) = torch.autograd.grad(s[0, 0], logp)
    assert torch.allclose(g_tok, torch.tensor([[math.exp(-0.1 / 3), 0.0, 0.0], [0.0, 0.0, 0.0]]))

    adv = torch.tensor([0.7, -1.3])
    loss, _ = policy_loss(
        logp,
        old,
        adv,
        mask,
        clip_low=0.5,
        clip_high=0.5,
        ratio_level="sequence",
        agg="seq-mean-token-mean",
    )
    (g,) = torch.autograd.grad(loss, logp)
    # plain autograd of GSPO's objective -(1/2) sum_i A_i exp(mean_t log-ratio)
    lp = logp.detach().clone().requires_grad_(True)
    s0 = torch.exp((lp[0] - old[0]).mean())
    s1 = torch.exp((lp[1, :2] - old[1, :2]).mean())
    ref_loss = -(adv[0] * s0 + adv[1] * s1) / 2
    (g_ref,) = torch.autograd.grad(ref_loss, lp)
    assert loss.item() == pytest.approx(ref_loss.item())
    assert torch.allclose(g, g_ref)


def test_sequence_ratio_clips_whole_sequence():
    logp = torch.tensor([[-0.5, -0.5], [-0.5, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.0], [-0.45, -0.55]])  # s0 = e^0.5 = 1.65 (clipped), s1 = 1
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, st = policy_loss(
        logp, old, torch.ones(2), mask, clip_low=0.2, clip_high=0.2, ratio_level="sequence"
    )
    (g,) = torch.autograd.grad(loss, logp)
    assert st["clip_frac"] == 0.5 and (g[0] == 0).all() and (g[1] != 0).all()


# ---------------------------------------------------------------- KL, overlong, RL-PLUS


def test_kl_k3_hand_value_and_policy_loss_term():
    logp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    # x = ln .5: e^x - x - 1 = .5 + .693147 - 1
    assert kl_k3(logp, ref).item() == pytest.approx(0.1931471805599454)
    assert kl_k3(logp, logp).item() == 0.0
    mask = torch.ones(1, 1, dtype=torch.bool)
    base, _ = policy_loss(logp, logp, torch.ones(1), mask, clip_low=0.2, clip_high=0.2)
    withkl, st = policy_loss(
        logp, logp, torch.ones(1), mask, clip_low=0.2, clip_high=0.2, ref_logp=ref, kl_beta=0.5
    )
    assert (withkl - base).item() == pytest.approx(0.5 * 0.1931471805599454)
    assert st["kl"] == pytest.approx(0.1931471805599454)


def test_overlong_penalty_and_truncation_mask():
    got = overlong_penalty(torch.tensor([5, 12, 13, 14, 16, 17]), max_len=16, buffer=4)
    assert torch.allclose(
        got, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0], dtype=torch.float32)
    )
    assert overlong_penalty(torch.tensor([15]), 16, 4, factor=0.5).item() == pytest.approx(-0.375)
    m = mask_truncated(torch.ones(3, 2, dtype=torch.bool), torch.tensor([False, True, False]))
    assert m.tolist() == [[True, True], [False, False], [True, True]]
    mf = mask_truncated(torch.ones(2, 2), torch.tensor([True, False]))
    assert mf.tolist() == [[0.0, 0.0], [1.0, 1.0]]


def test_rl_plus_weights_hand_example():
    # pi_theta = .5, pi_old = .4, omega = 1: r = .5 / (.2 + .5) = .714286, C = .5 ** .5
    logp = torch.log(torch.tensor([[0.5, 0.9]])).requires_grad_(True)
    old = torch.log(torch.tensor([[0.4, 0.9]]))
    w = rl_plus_token_weights(logp, old, 0.0, gamma=0.5)
    w1 = 0.9 / (0.45 + 0.5) * 0.1**0.5
    assert torch.allclose(w.detach(), torch.tensor([[0.5050762722761054, w1]]))
    # C is detached: dw/dlogp = r * C = w (r is proportional to pi_theta)
    (g,) = torch.autograd.grad(w.sum(), logp)
    assert torch.allclose(g, w.detach())
    # in policy_loss a demo row uses -w * A, unclipped, even far outside the clip range
    mask = torch.ones(2, 2, dtype=torch.bool)
    lp2 = torch.log(torch.tensor([[0.5, 0.9], [0.5, 0.5]]))
    tw = torch.cat([w.detach(), torch.zeros(1, 2)])
    loss, st = policy_loss(
        lp2,
        lp2 - 3.0,
        torch.tensor([2.0, 0.0]),
        mask,
        clip_low=0.2,
        clip_high=0.2,
        token_weight=tw,
        demo=torch.tensor([True, False]),
    )
    assert loss.item() == pytest.approx(-2.0 * (0.5050762722761054 + w1) / 4)
    assert st["demo_weight_mean"] == pytest.approx((0.5050762722761054 + w1) / 2)


# ---------------------------------------------------------------- analytic policy gradient


def test_one_token_policy_gradient_matches_analytic():
    torch.manual_seed(0)
    theta = torch.randn(5, requires_grad=True)
    theta_old = theta.detach() + 0.05 * torch.randn(5)
    y = torch.tensor([0, 2, 2, 4])
    adv = torch.tensor([0.865875, -0.865875, 0.865875, -0.865875])  # group [1, 0, 1, 0]
    logp = torch.log_softmax(theta, 0)[y][:, None]
    old = torch.log_softmax(theta_old, 0)[y][:, None]
    loss, st = policy_loss(
        logp, old, adv, torch.ones(4, 1, dtype=torch.bool), clip_low=0.2, clip_high=0.2
    )
    (g,) = torch.autograd.grad(loss, theta)
    assert st["clip_frac"] == 0.0
    # J = (1/N) sum_i rho_i A_i;  d rho_i / d theta = rho_i (onehot(y_i) - pi);  loss = -J
    pi = torch.softmax(theta.detach(), 0)
    rho = torch.exp(torch.log_softmax(theta.detach(), 0)[y] - torch.log_softmax(theta_old, 0)[y])
    analytic = (
        -sum(adv[i] * rho[i] * (torch.nn.functional.one_hot(y[i], 5) - pi) for i in range(4)) / 4
    )
    assert torch.allclose(g, analytic, atol=1e-12)


# ---------------------------------------------------------------- samplers


def test_prompt_sampler_epochs_determinism_and_resume():
    s = PromptSampler(7, seed=3)
    first = np.concatenate([s.next(3) for _ in range(7)])  # 21 = 3 epochs
    for e in range(3):
        assert sorted(first[7 * e : 7 * e + 7].tolist()) == list(range(7))
    assert not np.array_equal(first[:7], first[7:14])  # a fresh order each epoch
    assert np.array_equal(first, np.concatenate([PromptSampler(7, seed=3).next(21)]))
    a = PromptSampler(7, seed=3)
    a.next(5)
    b = PromptSampler(7, seed=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert np.array_equal(a.next(11), b.next(11))
    assert not np.array_equal(PromptSampler(7, seed=4).next(7), first[:7])
    with pytest.raises(ValueError):
        b.load_state_dict({**a.state_dict(), "n": 8})


def test_dynamic_sampling_never_keeps_zero_variance_and_caps_retries():
    rng = np.random.default_rng(0)

    def generate(idx):  # prompt i: all-wrong if i % 3 == 0, all-right if i % 3 == 1, else mixed
        out = np.empty((len(idx), 4))
        for r, i in enumerate(idx):
            out[r] = 0.0 if i % 3 == 0 else 1.0 if i % 3 == 1 else rng.integers(0, 2, 4)
            if i % 3 == 2:
                out[r, :2] = [0.0, 1.0]
        return torch.tensor(out)

    sampler = PromptSampler(30, seed=1)
    res = dynamic_sampling(sampler.next, generate, want=8, max_refill=10)
    assert len(res.indices) == 8 and all(i % 3 == 2 for i in res.indices)
    assert all(np.ptp(r) > 0 for r in res.rewards)
    assert res.generated == res.dropped + 8 and len(res.source) == 8 and res.calls >= 2

    calls = []
    res = dynamic_sampling(
        lambda n: np.zeros(n, dtype=int),
        lambda i: calls.append(len(i)) or np.zeros((len(i), 4)),
        want=4,
        max_refill=2,
    )
    assert len(res.indices) == 0 and res.calls == 3 and calls == [4, 4, 4] and res.dropped == 12


def test_vcrl_bank_capacity_replay_limit_and_resume():
    bank = VCRLBank(capacity=3, kappa=0.8, max_replay=2)
    half = [1.0, 1.0, 0.0, 0.0]  # p = 1
    one = [1.0, 0.0, 0.0, 0.0]  # p = .75 < .8
    keep = bank.offer([0, 1, 2], [half, one, half])
    assert keep.tolist() == [True, False, True] and len(bank) == 2 and 1 not in bank
    rng = np.random.default_rng(0)
    replayed: dict[int, int] = {}
    for step in range(40):
        keys = list(range(10 * step, 10 * step + 5))
        rewards = rng.integers(0, 2, (5, 4)).astype(float)
        bank.offer(keys, rewards)
        assert len(bank) <= 3
        for k in bank.replay(2):
            replayed[k] = replayed.get(k, 0) + 1
            assert replayed[k] <= 2
            assert k not in bank or bank.replays(k) < 2
    assert replayed and max(replayed.values()) == 2


def test_vcrl_bank_eviction_and_state_roundtrip():
    bank = VCRLBank(capacity=2, kappa=0.5, max_replay=3)

    def six(k):  # G=6 with k ones: p = (k(6-k)/30) / (6/20)
        return [1.0] * k + [0.0] * (6 - k)

    bank.offer([10, 11], [six(2), six(3)])  # p = .889, 1
    bank.offer([12], [six(1)])  # p = .556: lowest, not admitted when full
    assert 12 not in bank
    bank.offer([13], [six(3)])  # p = 1 evicts 10 (p = .889)
    assert 10 not in bank and 11 in bank and 13 in bank
    clone = VCRLBank(capacity=9, kappa=0.1, max_replay=9)
    clone.load_state_dict(json.loads(json.dumps(bank.state_dict())))
    assert bank.replay(1) == clone.replay(1) == [11]  # tie at p=1: the older entry first
    bank.offer([11], [six(1)])  # refreshed to p = .556: now the lowest
    bank.offer([14], [six(2)])  # p = .889 evicts 11, not 13
    assert 11 not in bank and 13 in bank and 14 in bank
    bank.offer([13], [six(0)])  # no longer high-variance: leaves the bank
    assert 13 not in bank
    edge = VCRLBank(capacity=2, kappa=1.0, max_replay=1)
    assert edge.offer([0], [[1.0, 1.0, 0.0, 0.0]]).tolist() == [True]  # p = 1 = kappa is kept


def test_rlve_controller_window_and_raises():
    c = RLVEController(["add", "mul"], tau_acc=0.9, tau_num=10, window=3, start=1)
    assert c.window("add") == (1, 1)
    for level in range(1, 6):
        for j in range(10):
            assert c.update("add", level, True) == (j == 9)
    assert c.window("add") == (3, 6) and c.window("mul") == (1, 1)
    # 8/10 correct at h: below tau_acc, no raise; counter restarts
    for j in range(10):
        assert c.update("mul", 1, j < 8) is False
    for _ in range(9):
        c.update("mul", 1, True)
    assert c.window("mul") == (1, 1)
    assert c.update("mul", 0, True) is False  # below h: ignored, not counted
    assert c.update("mul", 1, False) is True  # 9/10 since the restart = tau_acc: raise
    assert c.window("mul") == (1, 2)
    with pytest.raises(ValueError):
        c.update("add", 7, True)
    assert c.allowed(["add", "add", "mul", "zzz"], [2, 4, 1, 1]).tolist() == [
        False,
        True,
        True,
        False,
    ]
    d = RLVEController(["add", "mul"], tau_num=10, start=1)
    d.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert d.window("add") == c.window("add") and d.state_dict() == c.state_dict()


def test_rlve_accuracy_exactly_at_threshold_raises_and_cap_holds():
    c = RLVEController(["t"], tau_acc=0.9, tau_num=10, window=3, max_level=1)
    for j in range(10):
        raised = c.update("t", 0, j != 0)  # 9/10 = tau_acc
    assert raised and c.window("t") == (0, 1)
    for _ in range(10):
        assert c.update("t", 1, True) is False  # capped at max_level
    assert c.window("t") == (0, 1)


# ---------------------------------------------------------------- config


def test_config_defaults_validate_and_roundtrip():
    cfg = TrainConfig().validate()
    assert cfg.adv_mean == "group" and cfg.clip_high == 0.2 and cfg.loss_agg == "token-mean"
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert TrainConfig.from_dict({"adv_eps": "1e-3", "lr": 1}).adv_eps == 1e-3


@pytest.mark.parametrize(
    "bad,field",
    [
        ({"adv_std": "mean"}, "adv_std"),
        ({"clip_low": 1.0}, "clip_low"),
        ({"group_size": 1}, "group_size"),
        ({"vcrl_kappa": 1.5}, "vcrl_kappa"),
        ({"lr": "fast"}, "lr"),
        ({"seed": 1.5}, "seed"),
        ({"dynamic_sampling": "yes"}, "dynamic_sampling"),
        ({"nonsense": 1}, "nonsense"),
        ({"overlong_penalty": True, "overlong_buffer": 32}, "overlong_buffer"),
    ],
)
def test_config_bad_values_name_the_field(bad, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        TrainConfig.from_dict(bad)


def test_click_options_are_generated_from_the_dataclass():
    @click.command()
    @click_options
    def cmd(**kw):
        click.echo(
            json.dumps(
                config_from_options(kw, base={"lr": 0.5, "clip_high": 0.1, "vcrl": True}).to_dict()
            )
        )

    assert len(cmd.params) == len(TrainConfig().to_dict())
    runner = CliRunner()
    res = runner.invoke(
        cmd,
        ["--clip-high", "0.28", "--mu-updates", "2", "--dynamic-sampling", "--loss-agg", "seq-mean-token-mean"],
    )
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    want = {
        **TrainConfig().to_dict(),
        "lr": 0.5,
        "clip_high": 0.28,
        "mu_updates": 2,
        "dynamic_sampling": True,
        "vcrl": True,
        "loss_agg": "seq-mean-token-mean",
    }
    assert got == want
    assert runner.invoke(cmd, ["--adv-std", "bogus"]).exit_code == 2
    assert "--no-vcrl" in runner.invoke(cmd, ["--help"]).output
