"""Per-layer (hook) per-prompt gradients: equal to the vmap path and to plain autograd, one prompt at
a time, for every projector; independent of micro-batching; LoRA adapters; score options."""

import json
import math

import numpy as np
import pytest
import synthetic
import torch
from click.testing import CliRunner

from cropi import layer_grads, models, schema
from cropi import score as S
from cropi.cli import main
from cropi.policy_grad import GradConfig, param_dim, prompt_gradients, select_params, token_weights
from cropi.projection import Inner, make_projector


def args_of(batch, cfg=GradConfig()):
    w = [token_weights(rw, [len(r) for r in rs], cfg) for _, rs, rw, _ in batch]
    return [b[0] for b in batch], [b[1] for b in batch], w, [b[3] for b in batch]


def rel(a, b):
    return float((a - b).norm() / b.norm())


PROJECTORS = [("identity", {}), ("dense", {}), ("sjlt", {"s": 2}), ("mask-dense", {"density": 0.3}),
              ("dense", {"dist": "gaussian"}), ("trak", {})]


@pytest.fixture(scope="module")
def batch():
    # prompts 3..12 tokens, responses 1..15 tokens: several lengths in one micro-batch
    return synthetic.prompts(5, 4, seed=11, prompt_len=(3, 13), resp_len=(1, 16))


@pytest.mark.parametrize("kind,kw", PROJECTORS, ids=[k + ("-" + "-".join(map(str, v.values())) if v else "")
                                                      for k, v in PROJECTORS])
def test_per_layer_equals_vmap_and_plain_autograd(small_policy, batch, kind, kw):
    model = small_policy.model
    names = select_params(model)
    d = param_dim(model, names)
    proj = make_projector(kind, d, d if kind == "identity" else 256, 3, **kw)
    cfg = GradConfig()
    f_layer, n_layer = layer_grads.prompt_gradients(small_policy, *args_of(batch), names, cfg, proj, micro_batch=64)
    f_vmap, n_vmap = prompt_gradients(small_policy, *args_of(batch), names, cfg, proj)
    refs = torch.stack([synthetic.plain_grad(model, names, *b) for b in batch])
    if kind == "trak":  # the reference goes through TRAK's own projector, not through cropi
        from trak.projectors import BasicProjector

        raw = BasicProjector(d, 256, 3, "rademacher", "cpu", block_size=100, dtype=torch.float32)
        f_ref = raw.project(refs.contiguous(), model_id=0) / math.sqrt(256)
    else:
        f_ref = proj.project(refs, 0)
    for j in range(len(batch)):
        assert rel(f_layer[j], f_ref[j]) < 1e-4
        assert rel(f_layer[j], f_vmap[j]) < 1e-4
    torch.testing.assert_close(n_layer, refs.double().norm(dim=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(n_layer, n_vmap, rtol=1e-5, atol=0)


def test_micro_batching_does_not_change_a_prompts_gradient(small_policy, batch):
    names = select_params(small_policy.model)
    d = param_dim(small_policy.model, names)
    ident = make_projector("identity", d, d)
    cfg = GradConfig()
    full, nf = layer_grads.prompt_gradients(small_policy, *args_of(batch), names, cfg, ident, micro_batch=64)
    # 8: two prompts a backward; 3: each prompt's 4 responses summed over two backwards
    for mb in (8, 3):
        part, n = layer_grads.prompt_gradients(small_policy, *args_of(batch), names, cfg, ident, micro_batch=mb)
        assert rel(part, full) < 1e-5, mb
        torch.testing.assert_close(n, nf, rtol=1e-5, atol=0)
    alone, _ = layer_grads.prompt_gradients(small_policy, *args_of(batch[3:4]), names, cfg, ident)
    assert rel(alone[0], full[3]) < 1e-5


@pytest.mark.parametrize("spec", ["last:1", "norm", r"embed_tokens|lm_head"])
def test_parameter_subsets(small_policy, batch, spec):
    """Without the embedding the backward still starts (a leaf at the embedding output); norms
    alone go through the generic module rule; the tied embedding alone gets both of its users."""
    model = small_policy.model
    names = select_params(model, spec)
    d = param_dim(model, names)
    ident = make_projector("identity", d, d)
    f, n = layer_grads.prompt_gradients(small_policy, *args_of(batch), names, GradConfig(), ident)
    for j, b in enumerate(batch):
        ref = synthetic.plain_grad(model, names, *b)
        assert rel(f[j], ref) < 1e-4
        assert float(n[j]) == pytest.approx(float(ref.double().norm()), rel=1e-5)


def fresh_policy(seed=2):
    tok = models.build_tiny_tokenizer()
    model = models.build_tiny_model(tok, seed=seed, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2)
    return models.Policy(model, tok, "tiny-test", "-")


def test_parameters_no_hook_covers_fall_back_to_vmap_exactly(batch):
    """A parameter owned by a module called with keyword arguments (the attention block) cannot be
    formed from one input and one output-gradient: the vmap path takes it, still exact."""
    policy = fresh_policy()
    attn = policy.model.model.layers[0].self_attn
    attn.register_parameter("gate", torch.nn.Parameter(torch.linspace(0.5, 1.5, 32)))
    attn.register_forward_hook(lambda m, a, out: (out[0] * m.gate,) + tuple(out[1:]))
    names = select_params(policy.model)
    assert "model.layers.0.self_attn.gate" in names
    d = param_dim(policy.model, names)
    ident = make_projector("identity", d, d)
    seen = []
    orig = layer_grads.LayerGrads._vmap_fallback
    layer_grads.LayerGrads._vmap_fallback = lambda self, u, left: (seen.append(list(left)), orig(self, u, left))
    try:
        f, _ = layer_grads.prompt_gradients(policy, *args_of(batch), names, GradConfig(), ident)
    finally:
        layer_grads.LayerGrads._vmap_fallback = orig
    assert seen == [["model.layers.0.self_attn.gate"]]
    for j, b in enumerate(batch):
        assert rel(f[j], synthetic.plain_grad(policy.model, names, *b)) < 1e-4


def test_gradient_checkpointing_recomputes_and_changes_nothing(small_policy, batch):
    names = select_params(small_policy.model)
    sjlt = make_projector("sjlt", param_dim(small_policy.model, names), 128, 0)
    calls = []
    h = small_policy.model.model.layers[1].mlp.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    try:
        plain, _ = layer_grads.prompt_gradients(small_policy, *args_of(batch), names, GradConfig(), sjlt)
        n_plain = len(calls)
        ck, _ = layer_grads.prompt_gradients(small_policy, *args_of(batch), names, GradConfig(), sjlt,
                                             checkpointing=True)
    finally:
        h.remove()
    # each call: the one-sequence probe (``_unhooked``), then the forward; checkpointed, that forward
    # runs gradient-free and is recomputed in the backward
    assert n_plain == 2 and calls[2:] == [True, False, True]
    assert rel(ck, plain) < 1e-5


def test_inner_projector_gives_exact_dot_products(small_policy, batch):
    names = select_params(small_policy.model)
    refs = torch.stack([synthetic.plain_grad(small_policy.model, names, *b) for b in batch])
    V = torch.randn(3, refs.shape[1], generator=torch.Generator().manual_seed(0))
    dots, _ = layer_grads.prompt_gradients(small_policy, *args_of(batch), names, GradConfig(), Inner(V))
    torch.testing.assert_close(dots, refs @ V.T, rtol=1e-4, atol=1e-6)
    summed = layer_grads.summed_gradient(small_policy, *args_of(batch), names, GradConfig(), micro_batch=3)
    assert rel(summed, refs.sum(0)) < 1e-5


@pytest.mark.parametrize("kind,kw", PROJECTORS[:5])
def test_project_rows_equals_dense_block(kind, kw):
    rows, cols, offset, d = 50, 7, 13, 13 + 50 * 7 + 5
    p = make_projector(kind, d, d if kind == "identity" else 64, 1, **kw)
    used = torch.tensor([2, 9, 31, 49])
    vals = torch.randn(3, len(used), cols, generator=torch.Generator().manual_seed(1))
    dense = torch.zeros(3, rows, cols)
    dense[:, used] = vals
    torch.testing.assert_close(p.project_rows(vals, offset, used, cols, rows * cols),
                               p.project(dense.flatten(1), offset), rtol=1e-5, atol=1e-6)


def test_sjlt_index_hashed_once_per_block_and_compact(monkeypatch):
    from cropi import projection

    p = make_projector("sjlt", 10_000, 512, 0, s=2)
    calls = []
    orig = projection.hash32
    monkeypatch.setattr(projection, "hash32", lambda *a: (calls.append(1), orig(*a))[1])
    x = torch.randn(2, 4000)
    a = p.project(x, 100)
    n = len(calls)
    b = p.project(x, 100)
    assert n > 0 and len(calls) == n and torch.equal(a, b)
    assert p._sjlt_index(100, 4000).dtype == torch.int16
    for off in range(0, 10_000 - 4000, 500):  # many distinct blocks: the cache stays within 2·s·d entries
        p.project(x, off)
    assert sum(v.numel() for v in p._sjlt_cache.values()) <= 2 * 2 * 10_000


def test_trak_refused_above_its_size():
    with pytest.raises(ValueError, match="exceeds its limit"):
        make_projector("trak", (1 << 24) + 1, 512, 0)


# ---------------------------------------------------------------------------- LoRA adapters and options


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """The small model saved as a folder, and a LoRA adapter on q_proj/v_proj with non-zero B."""
    from peft import LoraConfig, get_peft_model

    d = tmp_path_factory.mktemp("lora")
    policy = fresh_policy(seed=4)
    models.save(policy.model, policy.tokenizer, d / "model", {"kind": "tiny"})
    with torch.random.fork_rng(devices=[]):  # the adapter's random A and B: the same every run
        torch.manual_seed(0)
        peft_model = get_peft_model(fresh_policy(seed=4).model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                            init_lora_weights=False))
    peft_model.save_pretrained(d / "adapter")
    return d


def test_lora_adapter_gradients_are_the_adapter_parameters_only(lora, batch):
    policy = S.with_adapter(models.load(str(lora / "model")), lora / "adapter")
    names = select_params(policy.model)
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    d = param_dim(policy.model, names)
    ident = make_projector("identity", d, d)
    f_layer, _ = layer_grads.prompt_gradients(policy, *args_of(batch), names, GradConfig(), ident)
    f_vmap, _ = prompt_gradients(policy, *args_of(batch), names, GradConfig(), ident)
    for j, b in enumerate(batch):
        ref = synthetic.plain_grad(policy.model, names, *b)
        assert float(ref.norm()) > 0
        assert rel(f_layer[j], ref) < 1e-4 and rel(f_vmap[j], ref) < 1e-4


def write_traj(path, n, seed):
    rng = np.random.default_rng(seed)
    rows = [{"id": f"s{seed}-{i}", "prompt": f"{i} + {seed} =\n", "answer": "1", "task": "t", "difficulty": 0,
             "split": "train", "behavior": "x", "rewards": [0.0, 1.0, float(i % 2), 1.0],
             "responses": [f"Answer: {int(v)}" for v in rng.integers(0, 99, 4)]} for i in range(n)]
    import pyarrow as pa

    schema.write_parquet_atomic(pa.Table.from_pylist(rows), path)


def cli(lora, out, *extra):
    return CliRunner().invoke(main, ["score", "--trajectories", str(lora / "pool.parquet"), "--target",
                                     str(lora / "t.parquet"), "--model", str(lora / "model"), "--k", "32",
                                     "--out", str(out), *extra])


def test_score_options_recorded_and_paths_agree(lora, tmp_path):
    write_traj(lora / "pool.parquet", 6, 0)
    write_traj(lora / "t.parquet", 3, 1)
    r = cli(lora, tmp_path / "auto")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "auto" / "meta.json").read_text())
    assert meta["grad_path"]["ran"] == "vmap" and "small model" in meta["grad_path"]["why"]
    assert meta["compute_dtype"] == "float32" and meta["adapter"] is None
    r = cli(lora, tmp_path / "layer", "--grad-path", "per-layer", "--grad-checkpointing")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "layer" / "meta.json").read_text())
    assert meta["grad_path"] == {"requested": "per-layer", "ran": "per-layer", "why": "--grad-path"}
    from cropi import features

    a, _ = features.load(tmp_path / "auto" / "features")
    b, _ = features.load(tmp_path / "layer" / "features")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(a).max())
    r = cli(lora, tmp_path / "bf16", "--dtype", "bf16", "--adapter", str(lora / "adapter"))
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "bf16" / "meta.json").read_text())
    assert meta["compute_dtype"] == "bfloat16" and meta["adapter"]["gradients"] == "adapter parameters only"
    assert meta["n_params"] == 8 * 4 * 32 and meta["config"]["dtype"] == "bf16"
    # the numbers: each bf16 row against float32 plain autograd of the adapter, through the same map
    policy = S.with_adapter(models.load(str(lora / "model")), lora / "adapter")
    names = select_params(policy.model)
    refs = reference_features(policy, names, lora / "pool.parquet", make_projector("sjlt", param_dim(policy.model, names), 32, 0).project)
    got = torch.from_numpy(features.load(tmp_path / "bf16" / "features")[0])
    cos = torch.nn.functional.cosine_similarity(got, refs, dim=1)
    # bf16 rounding only: measured min cos 0.9999, rel 0.015 (with a log-softmax of the bf16 logits
    # not upcast to float32: 0.9989, 0.026)
    assert float(cos.min()) > 0.9995 and 1e-4 < rel(got, refs) < 0.02, (cos, rel(got, refs))


def reference_features(policy, names, pool, project):
    """Projected plain-autograd gradients [P, k] of every prompt of a pool file (on-policy: the
    behaviour log-probs are the policy's own, float32)."""
    prep = S.prepare(policy, schema.read_table(pool, "trajectories"), pool)
    out = []
    for p, rs, rw in zip(prep.prompt_ids, prep.responses, prep.rewards):
        blp = models.response_logprobs(policy, [p] * len(rs), rs)
        out.append(project(synthetic.plain_grad(policy.model, names, p, rs, rw, blp)[None])[0])
    return torch.stack(out)


def test_score_with_trak_projector(lora, tmp_path):
    write_traj(lora / "pool.parquet", 6, 0)
    write_traj(lora / "t.parquet", 3, 1)
    r = cli(lora, tmp_path / "trak", "--projector", "trak", "--grad-path", "per-layer")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "trak" / "meta.json").read_text())
    assert meta["projector"]["kind"] == "trak" and meta["projector"]["impl"] == "trak-basic-100"
    # the numbers: TRAK's own projector applied to plain-autograd gradients
    from trak.projectors import BasicProjector

    from cropi import features

    policy = models.load(str(lora / "model"))
    names = select_params(policy.model)
    raw = BasicProjector(param_dim(policy.model, names), 32, 0, "rademacher", "cpu", block_size=100, dtype=torch.float32)
    refs = reference_features(policy, names, lora / "pool.parquet",
                              lambda g: raw.project(g.contiguous(), model_id=0) / math.sqrt(32))
    got = torch.from_numpy(features.load(tmp_path / "trak" / "features")[0])
    for j in range(len(refs)):
        assert rel(got[j], refs[j]) < 1e-4, j


def test_refusals_are_one_line(lora, tmp_path, monkeypatch):
    write_traj(lora / "pool.parquet", 6, 0)
    write_traj(lora / "t.parquet", 3, 1)
    r = cli(lora, tmp_path / "x", "--grad-path", "vmap", "--grad-checkpointing")
    assert r.exit_code == 2 and "--grad-checkpointing needs --grad-path per-layer" in r.output

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(layer_grads, "prompt_gradients", oom)
    r = cli(lora, tmp_path / "y", "--grad-path", "per-layer", "--batch", "4")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "out of memory" in r.output and "lower --batch (now 4) or --micro-batch" in r.output


# ---------------------------------------------------------------------------- SmolLM2


@pytest.mark.real
def test_smollm2_per_layer_equals_plain_autograd(smollm2):
    """2 prompts x 2 short responses, sjlt (k = 8192) over all 134.5M parameters, tied lm_head."""
    model = smollm2.model
    names = select_params(model)
    d = param_dim(model, names)
    pids = models.encode_prompts(smollm2, ["What is 2+3?", "Name a prime number."])
    tok = smollm2.tokenizer
    resp = [[tok("5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
             tok("It is 6.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]],
            [tok("7", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
             tok("Nine, I think", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]]
    blp = [[[-1.0 - 0.1 * t for t in range(len(r))] for r in rs] for rs in resp]
    batch = [(p, rs, [1.0, 0.0], b) for p, rs, b in zip(pids, resp, blp)]
    sjlt = make_projector("sjlt", d, 8192, 0)
    f, n = layer_grads.prompt_gradients(smollm2, *args_of(batch), names, GradConfig(), sjlt)
    params = dict(model.named_parameters())
    for j, b in enumerate(batch):
        ref = synthetic.plain_grad(model, names, *b)
        # projected by parameter blocks (block-additive, and the blocks' hashes are already cached)
        proj, o = torch.zeros(8192), 0
        for name in names:
            proj += sjlt.project(ref[None, o:o + params[name].numel()], o)[0]
            o += params[name].numel()
        assert rel(f[j], proj) < 1e-4
        assert float(n[j]) == pytest.approx(float(ref.double().norm()), rel=1e-4)  # a float32 norm of 134.5M is off by ~1 %
