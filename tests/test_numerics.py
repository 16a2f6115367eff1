"""Numbers that must not be quietly wrong (issue 23): behaviour log-probs at the rollout's own
temperature and top-p, every selected parameter delivered on the per-layer path, fp16 backward
without underflow, resume byte-identity with float16 features, EOS only on responses that ended."""

import numpy as np
import pyarrow as pa
import pytest

from cropi import features, models, schema
from cropi import score as S


def traj(n, seed):
    """n prompts x 4 responses, every group with a learning signal."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rewards = [0.0, 1.0] + rng.integers(0, 2, 2).astype(float).tolist()
        rows.append({"id": f"s{seed}-{i}", "prompt": f"{i} + {seed} =\n", "answer": str(i + seed), "task": "t",
                     "difficulty": 0, "split": "train", "behavior": "x", "rewards": rewards,
                     "responses": [f"Answer: {int(v)}" for v in rng.integers(0, 99, 4)]})
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="module")
def small(tmp_path_factory, small_policy):
    d = tmp_path_factory.mktemp("numerics")
    models.save(small_policy.model, small_policy.tokenizer, d / "model", {"kind": "tiny"})
    schema.write_parquet_atomic(traj(8, 0), d / "pool.parquet")
    schema.write_parquet_atomic(traj(5, 1), d / "t.parquet")
    return d


# ---------------------------------------------------------------------------- item 5: resume, float16 features


def test_resume_with_float16_features_is_byte_identical(small, tmp_path, monkeypatch):
    """Target means come from the stored (float16-rounded) features, fresh or resumed."""
    def run(out, **kw):
        cfg = S.ScoreConfig(k=64, shard_size=3, batch=2, feature_dtype="float16")
        return S.score(small / "pool.parquet", [small / "t.parquet"], out, model=str(small / "model"), cfg=cfg, **kw)

    run(tmp_path / "full")
    real, calls = S._shard_features, {"n": 0}

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the 2 target shards are done, the first pool shard dies
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(S, "_shard_features", dies)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "r")
    monkeypatch.setattr(S, "_shard_features", real)
    run(tmp_path / "r", resume=True)
    a, b = tmp_path / "full", tmp_path / "r"
    assert (a / "scores.parquet").read_bytes() == (b / "scores.parquet").read_bytes()
    assert np.asarray(features.read_shard(a / "features", 0)[0]).dtype == np.float16


# ---------------------------------------------------------------------------- items 1, 2: behaviour log-probs


def rolled_out(tmp, name, temperature, top_p=1.0, n_prompts=5, max_new_tokens=16):
    """A tiny-model rollout at ``temperature``/``top_p`` whose rewards are rewritten to 0/1 patterns
    with a learning signal in every group (the file's metadata kept)."""
    from cropi import rollout as R
    from cropi import tasks

    prompts = tmp / f"{name}.prompts.parquet"
    if not prompts.exists():
        schema.write_parquet_atomic(tasks.make_pool(["chain_sum:difficulty=0"], n_prompts, 0), prompts)
    out = tmp / f"{name}.traj.parquet"
    R.rollout(prompts, out, n=4, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=3)
    t = pa.parquet.read_table(out)
    rewards = pa.array([[float((i + j) % 2) for j in range(4)] for i in range(t.num_rows)], pa.list_(pa.float32()))
    schema.write_parquet_atomic(t.set_column(t.column_names.index("rewards"), "rewards", rewards), out,
                                metadata=schema.read_cropi_meta(out))
    return out


def identity_scores(pool, target, out, **kw):
    S.score(pool, [target], out, cfg=S.ScoreConfig(projector="identity", batch=4), **kw)
    return schema.read_table(out / "scores.parquet", "scores")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    import pyarrow.parquet  # noqa: F401  (pa.parquet)

    d = tmp_path_factory.mktemp("tinyroll")
    return d, rolled_out(d, "pool", 0.7), rolled_out(d, "target", 1.3, n_prompts=3)


def test_behavior_model_scores_at_each_files_rollout_temperature(tiny_files, tmp_path):
    """Rolled out at T = 0.7 (target set at T = 1.3), scored with the stored log-probs and again with
    --behavior-model tiny (the same model: ρ ≡ 1 both times): the scores agree to float precision."""
    d, pool, target = tiny_files
    stored = identity_scores(pool, target, tmp_path / "stored")
    again = identity_scores(pool, target, tmp_path / "again", behavior_model=models.TINY)
    a, b = (np.asarray(t.column("score").to_numpy(zero_copy_only=False)) for t in (stored, again))
    ok = np.array(stored.column("status").to_pylist()) == "ok"
    assert ok.sum() >= 4 and np.abs(a[ok] - b[ok]).max() <= 1e-6
    meta = features.read_meta(tmp_path / "stored" / "targets" / "target")
    assert meta["loss"]["temperature"] == 1.3
    assert features.read_meta(tmp_path / "stored" / "features")["loss"]["temperature"] == 0.7


def test_target_set_gradient_at_its_own_temperature(tiny_files, tmp_path):
    """The target set's features equal those it gets as a pool of its own (scored at its T = 1.3),
    not those at the pool's T = 0.7."""
    d, pool, target = tiny_files
    identity_scores(pool, target, tmp_path / "a")
    identity_scores(target, target, tmp_path / "self")
    as_target, _ = features.load(tmp_path / "a" / "targets" / "target")
    as_pool, _ = features.load(tmp_path / "self" / "features")
    assert np.abs(as_target).max() > 0
    np.testing.assert_allclose(as_target, as_pool, rtol=0, atol=1e-6 * np.abs(as_pool).max())


def nucleus_logprob(logits, token, temperature, top_p):
    """log of the top-p renormalised softmax(logits / T) at ``token``, by hand (float64)."""
    p = np.exp(logits / temperature - np.max(logits / temperature))
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    kept, mass = set(), 0.0
    for v in order:  # the nucleus: largest tokens while the mass before them is below top_p
        if mass >= top_p:
            break
        kept.add(int(v))
        mass += p[v]
    kept.add(int(token))
    return float(np.log(p[token]) - np.log(sum(p[v] for v in kept)))


def test_top_p_rollout_stores_the_sampled_distributions_logprobs(tmp_path, tiny_policy):
    import torch

    path = rolled_out(tmp_path, "topp", 0.9, top_p=0.7, n_prompts=2, max_new_tokens=10)
    t = schema.read_table(path, "trajectories")
    prompt_ids = models.encode_prompts(tiny_policy, t.column("prompt").to_pylist())
    checked = truncated = 0
    for p, resps, blps in zip(prompt_ids, t.column("response_token_ids").to_pylist(), t.column("behavior_logprobs").to_pylist()):
        for r, blp in zip(resps, blps):
            with torch.no_grad():
                logits = tiny_policy.model(input_ids=torch.tensor([p + r])).logits[0].double().numpy()
            for j, tok in enumerate(r):
                want = nucleus_logprob(logits[len(p) + j - 1], tok, 0.9, 0.7)
                assert abs(blp[j] - want) < 2e-5
                full = logits[len(p) + j - 1] / 0.9
                truncated += want - (full[tok] - np.log(np.exp(full - full.max()).sum()) - full.max()) > 1e-3
                checked += 1
    assert checked > 20 and truncated > 5  # the nucleus really cut mass at most tokens
    # stored and recomputed (--behavior-model) behaviour log-probs give the same scores
    stored = identity_scores(path, path, tmp_path / "stored")
    again = identity_scores(path, path, tmp_path / "again", behavior_model=models.TINY)
    a, b = (np.asarray(x.column("score").to_numpy(zero_copy_only=False)) for x in (stored, again))
    ok = np.array(stored.column("status").to_pylist()) == "ok"
    assert ok.any() and np.abs(a[ok] - b[ok]).max() <= 1e-6


def test_top_p_file_without_truncated_logprobs_is_refused(tmp_path):
    path = rolled_out(tmp_path, "old", 1.0, top_p=0.8, n_prompts=2, max_new_tokens=6)
    meta = schema.read_cropi_meta(path)
    del meta["behavior_logprobs"]  # as an older cropi wrote it: log π at T, the nucleus ignored
    schema.write_parquet_atomic(pa.parquet.read_table(path).replace_schema_metadata(None), path, metadata=meta)
    with pytest.raises(schema.InputError, match="top_p 0.8.*--behavior-model"):
        identity_scores(path, path, tmp_path / "s")


# ---------------------------------------------------------------------------- item 6: EOS only where a response ended


def test_retokenised_responses_get_eos_only_when_they_ended(tmp_path, tiny_policy):
    """Without stored token ids, responses are re-tokenised from their text: a response cut at the
    file's max_new_tokens gets no EOS (it never sampled one); the others do."""
    path = rolled_out(tmp_path, "cut", 1.0, n_prompts=4, max_new_tokens=10)
    full = schema.read_table(path, "trajectories")
    sampled = full.column("response_token_ids").to_pylist()
    eos = tiny_policy.tokenizer.eos_token_id
    flat = [r for rs in sampled for r in rs]
    assert any(r[-1] == eos for r in flat) and any(r[-1] != eos for r in flat)  # both kinds present
    text_only = full.drop_columns(["response_token_ids", "behavior_logprobs"])
    schema.write_parquet_atomic(text_only, tmp_path / "text.parquet", metadata=schema.read_cropi_meta(path))
    prep = S.prepare(tiny_policy, text_only, tmp_path / "text.parquet")
    assert prep.responses == sampled
    # a file that records no max_new_tokens (the public CROPI JSONL): every response taken as ended
    schema.write_parquet_atomic(text_only, tmp_path / "plain.parquet")
    prep = S.prepare(tiny_policy, text_only, tmp_path / "plain.parquet")
    assert prep.responses == [[r if r[-1] == eos else r + [eos] for r in rs] for rs in sampled]


# ---------------------------------------------------------------------------- item 3: per-layer completeness


def small_model(seed=5):
    tok = models.build_tiny_tokenizer()
    model = models.build_tiny_model(tok, seed=seed, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    return models.Policy(model, tok, "tiny-test", "-")


def per_layer_vs_vmap_vs_by_hand(policy, names):
    import synthetic

    from cropi import layer_grads
    from cropi.policy_grad import GradConfig, param_dim, prompt_gradients, token_weights
    from cropi.projection import make_projector

    batch = synthetic.prompts(4, 3, seed=7, prompt_len=(3, 9), resp_len=(2, 9))
    w = [token_weights(rw, [len(r) for r in rs], GradConfig()) for _, rs, rw, _ in batch]
    args = ([b[0] for b in batch], [b[1] for b in batch], w, [b[3] for b in batch])
    d = param_dim(policy.model, names)
    ident = make_projector("identity", d, d)
    f_layer, n_layer = layer_grads.prompt_gradients(policy, *args, names, GradConfig(), ident)
    f_vmap, _ = prompt_gradients(policy, *args, names, GradConfig(), ident)
    for j, b in enumerate(batch):
        ref = synthetic.plain_grad(policy.model, names, *b)
        for f in (f_layer[j], f_vmap[j]):
            assert float((f - ref).norm() / ref.norm()) < 1e-4
        assert float(n_layer[j]) == pytest.approx(float(ref.double().norm()), rel=1e-5)


def test_lora_embedding_parameters_are_delivered_on_the_per_layer_path():
    """PEFT keeps lora_embedding_A/B in a ParameterDict that is never called as module(x)."""
    from peft import LoraConfig, get_peft_model

    policy = small_model()
    model = get_peft_model(policy.model, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                                    init_lora_weights=False)).eval()
    policy = models.Policy(model, policy.tokenizer, "tiny-test", "-")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_embedding_A" in n for n in names) and any("lora_embedding_B" in n for n in names)
    per_layer_vs_vmap_vs_by_hand(policy, names)


def test_weights_also_read_outside_their_modules_are_delivered_whole():
    """A ParameterDict entry read through F.linear, and Linear weights read again by another
    module's forward: the hooks see only their own module's call; every block is still exact."""
    import torch
    import torch.nn.functional as Fn

    policy = small_model(seed=6)
    mlp = policy.model.model.layers[0].mlp
    mlp.extra = torch.nn.ParameterDict({"s": torch.nn.Parameter(torch.randn(32, 32) * 0.05)})
    orig = mlp.forward
    mlp.forward = lambda x: orig(x) + Fn.linear(x, mlp.extra["s"])
    attn = policy.model.model.layers[1].self_attn
    post = policy.model.model.layers[1].post_attention_layernorm
    post.register_forward_hook(lambda m, a, out: out + 0.1 * Fn.linear(a[0], attn.o_proj.weight.T))
    names = [n for n, _ in policy.model.named_parameters()]
    assert "model.layers.0.mlp.extra.s" in names
    per_layer_vs_vmap_vs_by_hand(policy, names)


# ---------------------------------------------------------------------------- item 4: fp16 backward


@pytest.mark.parametrize("grad_path", ["vmap", "per-layer"])
def test_fp16_small_advantage_gradients_survive(tmp_path, grad_path):
    """Rewards 0 / 0.001 without std normalisation (A = ±5e-4): in fp16 without loss scaling most
    output-gradients underflow (features off by ~50 %). The fp16 features must match fp32 ones
    computed from the same (fp16-rounded) weights to fp16 forward precision."""
    from cropi.policy_grad import GradConfig

    policy = small_model(seed=1)
    models.save(policy.model.half().float(), policy.tokenizer, tmp_path / "model", {"kind": "tiny"})
    rng = np.random.default_rng(0)
    rows = [{"id": f"p{i}", "prompt": f"{i} + 1 =\n", "answer": "1", "task": "t", "difficulty": 0, "split": "train",
             "behavior": "x", "rewards": [0.0, 1e-3, 0.0, 1e-3],
             "responses": [f"Answer: {int(v)} and some more words" for v in rng.integers(0, 99, 4)]} for i in range(3)]
    schema.write_parquet_atomic(pa.Table.from_pylist(rows), tmp_path / "pool.parquet")
    feats = {}
    for dtype in ("fp32", "fp16"):
        cfg = S.ScoreConfig(projector="identity", dtype=dtype, grad_path=grad_path, grad=GradConfig(adv_std="none"))
        meta = S.score(tmp_path / "pool.parquet", [tmp_path / "pool.parquet"], tmp_path / dtype,
                       model=str(tmp_path / "model"), cfg=cfg)
        feats[dtype] = features.load(tmp_path / dtype / "features")[0].astype(np.float64)
        assert (meta["loss_scale"] is None) == (dtype == "fp32")
    for a, b in zip(feats["fp16"], feats["fp32"]):
        assert np.linalg.norm(b) > 0 and np.linalg.norm(a - b) / np.linalg.norm(b) < 0.01


def test_loss_scale_backs_off_on_overflow_and_unscales_exactly():
    import torch

    policy = models.Policy(torch.nn.Linear(2, 2).half(), None, "fp16", "-")
    seen = []

    def fn(policy, prompt_ids, responses, weights, behavior_logp):  # 1000·w, computed in fp16
        seen.append(weights[0][0])
        return torch.tensor([weights[0][0] * 1000.0]).half().float(), torch.tensor([weights[0][1]])

    out = S.loss_scaled(fn, policy, [[1]], [[[2]]], [[0.75, 3e-9]], [None])
    assert seen == [0.75 * 2.0**16, 0.75 * 2.0**12, 0.75 * 2.0**8, 0.75 * 2.0**4]  # 2^16..2^8 overflow fp16
    assert float(out[0]) == 750.0 and float(out[1]) == pytest.approx(3e-9, rel=1e-6)
    policy32 = models.Policy(torch.nn.Linear(2, 2), None, "fp32", "-")
    seen.clear()
    S.loss_scaled(fn, policy32, [[1]], [[[2]]], [[0.5, 1.0]], [None])
    assert seen == [0.5]  # no scaling outside fp16
