"""The trainer at real-model scale, on the tiny default: micro-batching, bf16 autocast, activation
checkpointing and LoRA adapters (checkpoint, resume, load).

Truths: the same run without micro-batches / checkpointing (float32 rounding is the only
difference), plain float32 for bf16, an uninterrupted run for resume, and the base model for a
freshly initialised adapter (B = 0)."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from cropi import curriculum, models, tasks
from cropi.train import checkpoint as ckpt
from cropi.train import loop, scale
from cropi.train import step as tstep
from cropi.train.config import TrainConfig

SMALL = dict(batch_prompts=2, group_size=4, max_new_tokens=12, lr=5e-4, steps_per_stage=2,
             checkpoint_every=0, eval_every=0)


@pytest.fixture(scope="module")
def cur(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    curriculum.write_stage(root / "cur", tasks.make_pool(["count_bits:difficulty=1"], 8, 0, "train"), {"selector": "test"})
    return root / "cur"


def run(cur, path, **train):
    spec = loop.RunSpec(curriculum=str(cur), train=TrainConfig(**{**SMALL, **train}))
    loop.train(path, spec)
    return ckpt.latest(path)


def weights(folder):
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(folder / name))


def rel_diff(a: dict, b: dict, base: dict) -> float:
    """max over tensors of ||a - b|| / ||a - base||: the disagreement relative to the update."""
    return max(float((a[k] - b[k]).norm() / (a[k] - base[k]).norm().clamp(min=1e-30)) for k in a if k in base)


def test_two_steps_with_micro_batch_2_and_8_give_the_same_weights(cur, tmp_path, monkeypatch):
    """10 sequences per step (2 groups of 4 samples + the RL-PLUS demonstration, which makes every
    group's rewards vary, so the update is never zero) in passes of 2 or of 8 + 2: the two-step
    updates agree to ||w2 - w8|| / ||w8 - w0|| < 1e-4 per tensor (float32 summation order only)."""
    monkeypatch.setattr(loop, "plot_curves", lambda *a: None)
    w2 = weights(run(cur, tmp_path / "mb2", micro_batch=2, rl_plus=True))
    w8 = weights(run(cur, tmp_path / "mb8", micro_batch=8, rl_plus=True))
    w0 = {k: v for k, v in models.load(models.TINY).model.state_dict().items()}
    assert max(float((w8[k] - w0[k]).abs().max()) for k in w8) > 1e-4  # the steps did move weights
    assert rel_diff(w8, w2, w0) < 1e-4


def _update_delta(policy, batch, cfg):
    """The parameter change of one tstep.update with SGD(lr=1): minus the batch gradient."""
    model = policy.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tstep.update(policy, None, torch.optim.SGD(model.parameters(), lr=1.0), batch, cfg)
    delta = {n: before[n] - p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    return delta


def _small_batch(policy, cfg):
    """Two groups of three sampled responses with advantages, packed as the loop does."""
    g = torch.Generator().manual_seed(0)
    ids = [p for p in models.encode_prompts(policy, ["12+30=\n", "What is 2*7?\n"]) for _ in range(3)]
    resp = models.sample(policy, ids, max_new_tokens=cfg.max_new_tokens, generator=g)
    ids, attn, rmask = models.pack(ids, resp, policy.tokenizer.pad_token_id)
    return tstep.Batch(ids, attn, rmask, rmask, torch.tensor([1.0, -0.5, -0.5, 0.8, -0.4, -0.4]), None)


def test_activation_checkpointing_gives_the_same_gradient(tiny_policy):
    """Recomputed decoder layers: the gradient equals the stored-activation one (rel. 1e-5)."""
    policy = models.Policy(copy.deepcopy(tiny_policy.model), tiny_policy.tokenizer, "t", "-")
    cfg = TrainConfig(grad_clip=0.0, max_new_tokens=10, micro_batch=4)
    batch = _small_batch(policy, cfg)
    plain = _update_delta(policy, batch, cfg)
    calls = []
    orig = torch.utils.checkpoint.checkpoint
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or orig(*a, **k))
        ckd = _update_delta(policy, batch, TrainConfig(**{**cfg.to_dict(), "grad_checkpointing": True}))
    n_layers = policy.model.config.num_hidden_layers
    assert len(calls) >= 2 * n_layers  # every layer of both micro-batches ran checkpointed
    assert not any("forward" in vars(layer) for layer in scale.decoder_layers(policy.model))  # restored
    for n in plain:
        assert (ckd[n] - plain[n]).norm() <= 1e-5 * plain[n].norm(), n


def test_one_checkpointing_wrapper_recomputes_each_layer_and_reaches_frozen_inputs(tiny_policy):
    """`scale.checkpointing` (the trainer's, and the per-layer scorer's through cropi.layer_grads):
    every decoder layer runs once without grad and again with grad in the backward; with frozen
    embeddings (LoRA), whose output needs no grad, the adapters' gradient still equals plain
    autograd's (rel. 1e-5); the layers' own forwards are restored, an instance forward included."""
    model = scale.add_lora(copy.deepcopy(tiny_policy.model), rank=4, alpha=8.0, targets="q_proj,v_proj", seed=0)
    with torch.no_grad():  # B != 0, so that A has a gradient too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    ids = torch.tensor([tiny_policy.tokenizer("12+30=\nAnswer: 42")["input_ids"]] * 2)
    attn = torch.ones_like(ids)

    def grads(enabled):
        model.zero_grad(set_to_none=True)
        with scale.checkpointing(model, enabled):
            models.token_logprobs(model, ids, attn).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    layers = scale.decoder_layers(model)
    assert layers and layers[0].mlp is not None
    seen = []
    handles = [layer.mlp.register_forward_hook(lambda *a: seen.append(torch.is_grad_enabled())) for layer in layers]
    mine = layers[1].forward
    layers[1].forward = mine  # an instance forward set by someone else: restored as it was
    try:
        plain = grads(False)
        assert seen == [True] * len(layers)
        seen.clear()
        ckd = grads(True)
    finally:
        for h in handles:
            h.remove()
    assert seen == [False] * len(layers) + [True] * len(layers)  # forwards without grad, recomputes in backward
    assert vars(layers[1])["forward"] is mine and not any("forward" in vars(x) for x in layers if x is not layers[1])
    del layers[1].forward
    assert plain and all(float(g.norm()) > 0 for g in plain.values())
    for n in plain:
        assert (ckd[n] - plain[n]).norm() <= 1e-5 * plain[n].norm(), n


def test_bf16_autocast_update_is_close_to_float32(tiny_policy):
    """Same batch, bf16 autocast forward: the gradient points the same way (cosine > 0.99) and is
    not bit-identical (bf16 did run)."""
    policy = models.Policy(copy.deepcopy(tiny_policy.model), tiny_policy.tokenizer, "t", "-")
    cfg = TrainConfig(grad_clip=0.0, max_new_tokens=10)
    batch = _small_batch(policy, cfg)
    fp32 = torch.cat([v.flatten() for v in _update_delta(policy, batch, cfg).values()])
    bf16 = torch.cat([v.flatten() for v in _update_delta(policy, batch, TrainConfig(**{**cfg.to_dict(), "bf16": True})).values()])
    cos = float(fp32 @ bf16 / (fp32.norm() * bf16.norm()))
    assert 0.99 < cos and not torch.equal(fp32, bf16)


def test_lora_trains_only_adapters_checkpoints_them_and_resumes_exactly(cur, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "plot_curves", lambda *a: None)
    lora = dict(lora_rank=4, lora_alpha=8.0, lora_targets="q_proj,v_proj", rl_plus=True)  # rl_plus: never a zero update
    full = run(cur, tmp_path / "full", **lora)
    assert (full / "adapter_model.safetensors").exists() and not (full / "model.safetensors").exists()
    w = weights(full)
    assert w and all("lora_" in k for k in w)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in w.items())  # B started at 0 and moved
    # resume: 1 step, stop, continue -> the uninterrupted run's adapter
    spec = loop.RunSpec(curriculum=str(cur), train=TrainConfig(**{**SMALL, **lora}))
    loop.train(tmp_path / "cut", spec, max_steps=1)
    loop.train(tmp_path / "cut", spec, resume=True)
    resumed = weights(ckpt.latest(tmp_path / "cut"))
    assert set(resumed) == set(w)
    for k in w:
        torch.testing.assert_close(resumed[k], w[k], rtol=0, atol=0)
    # the adapter folder loads as a model (base + adapter), and a fresh adapter equals the base
    pol = models.load(str(full))
    assert hasattr(pol.model, "peft_config") and pol.tokenizer("ab")["input_ids"] == models.load(models.TINY).tokenizer("ab")["input_ids"]
    base = models.load(models.TINY)
    fresh = scale.add_lora(copy.deepcopy(base.model), rank=4, alpha=8.0, targets="all-linear", seed=0)
    x = torch.tensor([base.tokenizer("12+3=")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, base.model(input_ids=x).logits)
        assert not torch.allclose(pol.model(input_ids=x).logits, base.model(input_ids=x).logits)
