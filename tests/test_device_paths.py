"""Device-true paths: sampling draws on the model's device with a generator there and
moves nothing of vocabulary size to the host; check-influence steps in float32 on the parameters'
device and restores the model (mode, dtype, values) whatever happens. On CUDA (marker gpu) the
same checks run on the GPU."""

import pytest
import torch

from cropi import models

CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


class HostCopies:
    """Records every tensor of vocabulary width moved to (or read out on) the host."""

    def __init__(self, monkeypatch, vocab: int):
        self.seen: list[tuple] = []
        for name in ("cpu", "tolist", "numpy", "item"):
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name, vocab))
        to = torch.Tensor.to

        def guarded_to(t, *args, **kwargs):
            dev = kwargs.get("device", args[0] if args else None)
            if isinstance(dev, (str, torch.device)) and torch.device(dev).type == "cpu" and t.shape[-1:] == (vocab,):
                self.seen.append(("to", tuple(t.shape)))
            return to(t, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", guarded_to)

    def _wrap(self, fn, name, vocab):
        def wrapped(t, *args, **kwargs):
            if t.dim() and t.shape[-1] == vocab:
                self.seen.append((name, tuple(t.shape)))
            return fn(t, *args, **kwargs)

        return wrapped


def _prompts(policy):
    return models.encode_prompts(policy, ["1+1=\n", "What is 22*3?\n", "x\n", "7*8=\n"])


def test_sampling_never_copies_probabilities_to_the_host(small_policy, monkeypatch):
    vocab = small_policy.model.config.vocab_size
    ids = _prompts(small_policy)
    host = HostCopies(monkeypatch, vocab)
    out = models.sample(small_policy, ids, max_new_tokens=12, generator=torch.Generator().manual_seed(3))
    assert len(out) == 4 and host.seen == []


def test_sample_draws_with_the_generator_from_the_model_s_probabilities(small_policy):
    """The first token equals an independent draw: plain forward, softmax, torch.multinomial with a
    generator seeded the same on the same device."""
    ids = _prompts(small_policy)[:1]
    seed = 11
    first = models.sample(small_policy, ids, max_new_tokens=1, generator=models.generator(small_policy, seed))[0][0]
    with torch.no_grad():
        logits = small_policy.model(input_ids=torch.tensor(ids, device=small_policy.device)).logits[:, -1].float()
    g = torch.Generator(device=small_policy.device).manual_seed(seed)
    assert first == int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))


def test_generator_lives_on_the_policy_device(small_policy):
    g = models.generator(small_policy, 5)
    assert g.device == small_policy.device and g.initial_seed() == 5


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_gpu_sampling_is_device_true_and_deterministic(small_policy, monkeypatch, device):
    import copy

    policy = models.Policy(copy.deepcopy(small_policy.model).to(device), small_policy.tokenizer, "tiny-test", "-")
    ids = _prompts(policy)
    a = models.sample(policy, ids, max_new_tokens=12, generator=models.generator(policy, 7))
    with pytest.raises(ValueError, match="generator is on cpu"):
        models.sample(policy, ids, max_new_tokens=2, generator=torch.Generator().manual_seed(7))
    host = HostCopies(monkeypatch, policy.model.config.vocab_size)
    b = models.sample(policy, ids, max_new_tokens=12, generator=models.generator(policy, 7))
    assert a == b and host.seen == []


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_gpu_callers_sample_on_the_device(small_policy, device):
    """rollout, eval and warmup's pass rate build their generators on the model's device (a CPU
    generator with a CUDA model is refused by models.sample)."""
    import copy
    import json
    from pathlib import Path

    from cropi import evaluate, rollout, warmup

    rows = [json.loads(x) for x in Path(__file__).with_name("fixtures").joinpath("math_prompts.jsonl")
            .read_text().splitlines()[:3]]
    policy = models.Policy(copy.deepcopy(small_policy.model).to(device), small_policy.tokenizer, "tiny-test", "-")
    out = rollout.rollout_rows(policy, rows, n=2, temperature=1.0, max_new_tokens=6, seed=0)
    assert len(out["responses"]) == 3
    assert evaluate.evaluate(policy, rows, n_samples=2, temperature=1.0, max_new_tokens=6)["n"] == 3
    assert 0.0 <= warmup.pass_rate(policy, rows, max_new_tokens=6) <= 1.0


# ---------------------------------------------------------------------------- check-influence


@pytest.fixture(scope="module")
def influence_setup(tmp_path_factory, small_policy):
    import numpy as np
    import pyarrow as pa

    from cropi import schema

    def traj(n, seed):
        rng = np.random.default_rng(seed)
        return pa.Table.from_pylist([
            {"id": f"s{seed}-{i}", "prompt": f"{i} + {seed} =\n", "answer": str(i + seed), "task": "t",
             "difficulty": 0, "split": "train", "behavior": "x",
             "rewards": [1.0, 0.0] + rng.integers(0, 2, 2).astype(float).tolist(),
             "responses": [f"Answer: {int(v)}" for v in rng.integers(0, 99, 4)]} for i in range(n)])

    d = tmp_path_factory.mktemp("infl-dev")
    schema.write_parquet_atomic(traj(6, 0), d / "pool.parquet")
    schema.write_parquet_atomic(traj(3, 1), d / "t1.parquet")
    return d


def _bf16_policy(small_policy, device="cpu"):
    import copy

    return models.Policy(copy.deepcopy(small_policy.model).to(device=device, dtype=torch.bfloat16),
                         small_policy.tokenizer, "tiny-test", "-")


def _influence(setup, policy, out, eps=(1e-3,)):
    from cropi import score as S

    cfg = S.ScoreConfig(projector="identity", shard_size=6, batch=6, check_influence=4, influence_eps=eps, dtype="bf16")
    return S.score(setup / "pool.parquet", [setup / "t1.parquet"], out, cfg=cfg, policy=policy,
                   device=str(policy.device))["check_influence"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_check_influence_steps_below_bf16_rounding_are_real(influence_setup, small_policy, tmp_path, device):
    """A bf16 model, ε = 1e-3: most per-weight steps are below bf16's rounding of the weights, so
    stepping the bf16 weights measures rounding (relative error ~0.7 against first order here); the
    float32 steps agree with first order. The model comes back bf16, bit for bit, in train mode."""
    policy = _bf16_policy(small_policy, device)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    policy.model.train()
    step = _influence(influence_setup, policy, tmp_path / "s")["steps"][0]
    assert step["step"] == 1e-3 and step["measured_mean"] != 0.0
    assert step["first_order_rel_err"] < 0.05 and step["spearman_exact"] > 0.9
    assert policy.model.training
    for n, p in policy.model.named_parameters():
        assert p.dtype == torch.bfloat16 and p.device.type == device and torch.equal(p, before[n]), n


def test_check_influence_restores_the_model_when_it_fails(influence_setup, small_policy, tmp_path, monkeypatch):
    from cropi import score as S

    policy = _bf16_policy(small_policy)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    policy.model.train()
    calls, real = [], S._objective

    def objective_then_fail(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # inside a step: parameters moved
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(S, "_objective", objective_then_fail)
    with pytest.raises(RuntimeError, match="boom"):
        _influence(influence_setup, policy, tmp_path / "s")
    assert policy.model.training and len(calls) == 3
    for n, p in policy.model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[n]), n


# ---------------------------------------------------------------------------- on-policy ρ in bf16


@pytest.mark.parametrize("path", ["vmap", "per-layer", "kron"])
def test_on_policy_ratio_is_exactly_one_in_bf16(small_policy, path):
    """On-policy prompts (no behaviour log-probs): ρ = π/β = 1 for every token, in bf16 too. A ratio
    clip at 1 changes the weight of any token whose ρ > 1, so the features with and without it are
    equal only where ρ is exactly 1 (β from a separate forward, through another attention kernel
    and batch shape than the objective's, makes ρ ≠ 1 in bf16)."""
    import synthetic

    from cropi import kron, layer_grads, policy_grad
    from cropi.projection import make_projector

    policy = _bf16_policy(small_policy)
    batch = synthetic.prompts(4, 4, seed=5, prompt_len=(3, 13), resp_len=(4, 16))
    names = policy_grad.select_params(policy.model, "all")
    d = policy_grad.param_dim(policy.model, names)

    def features(clip):
        cfg = policy_grad.GradConfig(ratio_clip=clip)
        w = [policy_grad.token_weights(rw, [len(r) for r in rs], cfg) for _, rs, rw, _ in batch]
        args = ([b[0] for b in batch], [b[1] for b in batch], w, [None] * len(batch))
        if path == "kron":
            return kron.prompt_features(policy, *args, cfg, kron.KronProjector(policy.model, names, k=64))[0]
        proj = make_projector("dense", d, 64, 0)
        f = policy_grad.prompt_gradients if path == "vmap" else layer_grads.prompt_gradients
        return f(policy, *args, names, cfg, proj)[0]

    free = features(None)
    assert free.abs().sum() > 0
    assert torch.equal(features(1.0), free)


# ---------------------------------------------------------------------------- a GPU host's defaults


def test_default_device_on_a_gpu_host(monkeypatch):
    from cropi.distributed import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("CROPI_DEVICE")
    assert default_device() == "cuda:1" and default_device("cuda") == "cuda:1" and default_device("cpu") == "cpu"
    monkeypatch.setenv("CROPI_DEVICE", "cpu")
    assert default_device() == "cpu" and default_device("cuda:0") == "cuda:0"
    monkeypatch.setenv("CROPI_DEVICE", "cuda")
    assert default_device() == "cuda:1"


def test_suite_cli_runs_on_cpu_fp32_on_a_gpu_host(influence_setup, small_policy, tmp_path, monkeypatch):
    """The suite's CLI runs (no --device) stay on the CPU in float32 where CUDA is available: the
    conftest sets CROPI_DEVICE=cpu."""
    import json

    from click.testing import CliRunner

    from cropi.cli import main

    model_dir = tmp_path / "model"
    models.save(small_policy.model, small_policy.tokenizer, model_dir, {"kind": "tiny"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    r = CliRunner().invoke(main, ["score", "--trajectories", str(influence_setup / "pool.parquet"), "--target",
                                  str(influence_setup / "t1.parquet"), "--model", str(model_dir), "--k", "32",
                                  "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["compute_dtype"] == "float32"
