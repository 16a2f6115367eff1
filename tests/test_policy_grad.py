"""Per-prompt off-policy gradients against plain autograd on one prompt at a time."""

import numpy as np
import pytest
import synthetic
import torch

from cropi import models
from cropi.policy_grad import (
    GradConfig,
    is_zero_signal,
    param_dim,
    prompt_gradients,
    select_params,
    token_weights,
)
from cropi.projection import make_projector


@pytest.fixture(scope="module")
def policy(small_policy):
    return small_policy


def make_prompts(n, G, seed, vary_len=True):
    return synthetic.prompts(n, G, seed, vary_len=vary_len)


def reference_grad(policy, p, resps, rewards, blp, names, aggregation="seq-mean-token-mean", clip=None):
    """J_x by hand: A by numpy, each response scored alone (no padding), plain .backward()."""
    model = policy.model
    model.zero_grad(set_to_none=True)
    r = np.asarray(rewards)
    A = (r - r.mean()) / (r.std(ddof=1) + 1e-4)
    G = len(resps)
    total_tokens = sum(len(x) for x in resps)
    J = 0.0
    for i, resp in enumerate(resps):
        ids = torch.tensor([p + resp])
        logits = model(input_ids=ids).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)[len(p) - 1 :]
        ratio = torch.exp(lp - torch.tensor(blp[i]))
        if clip is not None:  # truncated IS: min(ρ, c) as a constant weight on ∇ log π
            ratio = torch.clamp(ratio.detach(), max=clip) * torch.exp(lp - lp.detach())
        if aggregation == "seq-mean-token-mean":
            J = J + ratio.sum() * A[i] / (G * len(resp))
        else:
            J = J + ratio.sum() * A[i] / total_tokens
    J.backward()
    params = dict(model.named_parameters())
    return torch.cat([params[n].grad.flatten() for n in names])


def ours(policy, batch, names, cfg, micro_batch=64):
    d = param_dim(policy.model, names)
    ident = make_projector("identity", d, d)
    weights = [token_weights(rw, [len(r) for r in rs], cfg) for _, rs, rw, _ in batch]
    f, norms = prompt_gradients(policy, [b[0] for b in batch], [b[1] for b in batch], weights, [b[3] for b in batch],
                                names, cfg, ident.project, micro_batch)
    return f, norms


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
def test_matches_plain_autograd_per_prompt(policy, aggregation):
    names = select_params(policy.model)
    batch = make_prompts(5, 4, seed=0)
    cfg = GradConfig(aggregation=aggregation)
    f, norms = ours(policy, batch, names, cfg)
    for j, (p, resps, rw, blp) in enumerate(batch):
        ref = reference_grad(policy, p, resps, rw, blp, names, aggregation)
        assert rel_err(f[j], ref) < 1e-4
        assert norms[j] == pytest.approx(float(ref.norm()), rel=1e-4)


def test_ratio_truncation_matches_reference(policy):
    names = select_params(policy.model)
    batch = make_prompts(3, 4, seed=5)
    # behaviour log-probs far below the model's: ratios ≫ 1, so clipping at 2 is active
    batch = [(p, rs, rw, [[x - 3.0 for x in b] for b in blp]) for p, rs, rw, blp in batch]
    f, _ = ours(policy, batch, names, GradConfig(ratio_clip=2.0))
    for j, (p, resps, rw, blp) in enumerate(batch):
        ref = reference_grad(policy, p, resps, rw, blp, names, clip=2.0)
        unclipped = reference_grad(policy, p, resps, rw, blp, names)
        assert rel_err(f[j], ref) < 1e-4
        assert rel_err(f[j], unclipped) > 1e-2  # the clip really changed something


def test_micro_batch_and_batch_composition_invariance(policy):
    names = select_params(policy.model)
    batch = make_prompts(4, 6, seed=1)
    cfg = GradConfig()
    full, _ = ours(policy, batch, names, cfg, micro_batch=64)
    split, _ = ours(policy, batch, names, cfg, micro_batch=4)  # 6 responses -> units of 4 + 2
    alone, _ = ours(policy, batch[2:3], names, cfg, micro_batch=1)
    assert rel_err(split, full) < 1e-5
    assert rel_err(alone[0], full[2]) < 1e-5


def test_on_policy_ratio_one_equals_grpo_gradient(policy):
    """θ = β: with β's log-probs = the model's own, g_x = Σ_i A_i/(G|y_i|) Σ_t ∇ log π(y_it)."""
    model = policy.model
    names = select_params(model)
    batch = make_prompts(2, 4, seed=2)
    own = [(p, rs, rw, models.response_logprobs(policy, [p] * len(rs), rs)) for p, rs, rw, _ in batch]
    cfg = GradConfig()
    f_stored, _ = ours(policy, own, names, cfg)
    f_none, _ = ours(policy, [(p, rs, rw, None) for p, rs, rw, _ in batch], names, cfg)  # on-policy fill
    for j, (p, resps, rw, _) in enumerate(batch):
        model.zero_grad(set_to_none=True)
        r = np.asarray(rw)
        A = (r - r.mean()) / (r.std(ddof=1) + 1e-4)
        loss = 0.0
        for i, resp in enumerate(resps):
            ids = torch.tensor([p + resp])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            loss = loss + lp[len(p) - 1 :].sum() * A[i] / (len(resps) * len(resp))
        loss.backward()
        params = dict(model.named_parameters())
        grpo = torch.cat([params[n].grad.flatten() for n in names])
        assert rel_err(f_stored[j], grpo) < 1e-4
        assert rel_err(f_none[j], grpo) < 1e-4


def test_zero_signal_detection():
    assert is_zero_signal([1.0, 1.0, 1.0])
    assert is_zero_signal([0.0] * 8)
    assert is_zero_signal([0.5])
    assert not is_zero_signal([0.0, 1.0])
    w = token_weights([1.0, 1.0, 1.0, 1.0], [3, 4, 5, 6], GradConfig())
    assert w == [0.0, 0.0, 0.0, 0.0]


def test_param_selection(policy):
    model = policy.model
    assert select_params(model, "all") == [n for n, _ in model.named_parameters()]
    last = select_params(model, "last:1")
    assert last and all(".layers.1." in n for n in last)
    assert select_params(model, r"mlp\.") == [n for n, _ in model.named_parameters() if "mlp." in n]
    with pytest.raises(ValueError):
        select_params(model, "nothing-matches-this")


def test_selected_params_gradient_is_the_sub_vector(policy):
    names_all = select_params(policy.model)
    sub = select_params(policy.model, "last:1")
    batch = make_prompts(2, 4, seed=3)
    full, _ = ours(policy, batch, names_all, GradConfig())
    part, _ = ours(policy, batch, sub, GradConfig())
    params = dict(policy.model.named_parameters())
    offs, o = {}, 0
    for n in names_all:
        offs[n] = (o, o + params[n].numel())
        o += params[n].numel()
    expect = torch.cat([full[:, offs[n][0] : offs[n][1]] for n in sub], 1)
    assert rel_err(part, expect) < 1e-5


def test_logits_window_by_hand(policy):
    """Logits are needed from one position before the earliest response token to the end."""
    from cropi.policy_grad import logits_window

    rmask = torch.zeros(2, 1, 9, dtype=torch.bool)
    rmask[0, 0, 5:8] = True  # first response token at 5
    rmask[1, 0, 3:9] = True  # at 3: the earliest
    assert logits_window(policy.model, rmask) == 9 - 3 + 1
    assert logits_window(policy.model, torch.zeros(2, 9, dtype=torch.bool)) is None


def test_logits_window_leaves_objective_and_gradient_unchanged(policy):
    """J over the window equals J over full logits, value and gradient (float32 tolerance)."""
    from cropi.policy_grad import _unit_objective, build_units, logits_window

    cfg = GradConfig()
    batch = make_prompts(3, 4, seed=5)
    weights = [token_weights(rw, [len(r) for r in rs], cfg) for _, rs, rw, _ in batch]
    units = build_units([b[0] for b in batch], [b[1] for b in batch], weights, [b[3] for b in batch],
                        policy.tokenizer.pad_token_id, 1)
    flat = [x[:, 0] for x in (units.input_ids, units.attention_mask, units.response_mask, units.weight,
                              units.behavior_logp)]
    keep = logits_window(policy.model, flat[2])
    assert keep is not None and keep < flat[0].shape[1]  # prompts are not all empty: a real window
    model = policy.model
    params = dict(model.named_parameters())
    out = []
    for k in (None, keep):
        model.zero_grad(set_to_none=True)
        J = _unit_objective(model, params, dict(model.named_buffers()), *flat, 1.0, None, k)
        J.backward()
        out.append((J.detach(), torch.cat([p.grad.flatten() for p in params.values() if p.grad is not None])))
    model.zero_grad(set_to_none=True)
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-5, atol=1e-7)
    assert rel_err(out[1][1], out[0][1]) < 1e-5
