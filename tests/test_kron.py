"""The kron projector against plain autograd on one prompt at a time (per-layer Linear gradients)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import synthetic
import torch

from cropi import models
from cropi.kron import KronProjector, layer_dims, prompt_features
from cropi.policy_grad import GradConfig, select_params, token_weights
from cropi.projection import make_projector
from cropi.runtime import derive_seed


@pytest.fixture(scope="module")
def policy(small_policy):
    return small_policy


def make_prompts(n, G, seed):
    return synthetic.prompts(n, G, seed, prompt_len=(3, 8), resp_len=(1, 6))


def reference_grads(policy, p, resps, rewards, blp):
    """{param name: ∇J_x} by hand: numpy advantages, each response alone, plain .backward()."""
    model = policy.model
    model.zero_grad(set_to_none=True)
    r = np.asarray(rewards)
    A = (r - r.mean()) / (r.std(ddof=1) + 1e-4)
    J = 0.0
    for i, resp in enumerate(resps):
        ids = torch.tensor([p + resp])
        logits = model(input_ids=ids).logits[0, :-1]
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)[len(p) - 1 :]
        J = J + torch.exp(lp - torch.tensor(blp[i])).sum() * A[i] / (len(resps) * len(resp))
    J.backward()
    return {n: q.grad.detach().clone() for n, q in model.named_parameters()}


def kron_features(policy, batch, proj, micro_batch=64):
    cfg = GradConfig()
    w = [token_weights(rw, [len(r) for r in rs], cfg) for _, rs, rw, _ in batch]
    return prompt_features(policy, [b[0] for b in batch], [b[1] for b in batch], w, [b[3] for b in batch], cfg, proj,
                           micro_batch)


def test_layer_dims_rule():
    # b = 1000 // 2 = 500: k_cols = isqrt(500) = 22, k_rows = 500 // 22 = 22
    assert layer_dims([(64, 32), (64, 32)], 1000) == [(22, 22), (22, 22)]
    # b = 100: k_cols = min(4, 10) = 4, k_rows = min(50, 25) = 25
    assert layer_dims([(50, 4)], 100) == [(25, 4)]
    # b = 100: k_cols = 10, k_rows = min(3, 10) = 3 hits rows, so k_cols = min(64, 100 // 3) = 33
    assert layer_dims([(3, 64)], 100) == [(3, 33)]
    assert layer_dims([(8, 8)], 10**6) == [(8, 8)]  # budget covers the weight: both sides exact
    with pytest.raises(ValueError, match="k >= the number"):
        layer_dims([(8, 8)] * 3, 2)


def test_coverage_linear_and_tied_embedding_weights(policy):
    model = policy.model
    names = select_params(model)
    proj = KronProjector(model, names, 512)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one block, two users
    emb = proj.blocks[0]
    assert emb.weight == "model.embed_tokens.weight" and {u[1] for u in emb.users} == {"embedding", "linear"}
    assert len(proj.blocks) == 1 + 2 * 7  # embedding + q k v o gate up down per block
    assert proj.names == [n for n in names if "norm" not in n]  # RMSNorm scales are not covered
    assert proj.k == sum(kr * kc for _, kr, kc in proj.meta()["blocks"]) <= 512
    assert proj.d == sum(p.numel() for n, p in model.named_parameters() if n in proj.names)
    sub = KronProjector(model, select_params(model, r"mlp\."), 512)
    assert [b.weight.split(".")[-2] for b in sub.blocks] == ["gate_proj", "up_proj", "down_proj"] * 2
    with pytest.raises(ValueError, match="no nn.Linear"):
        KronProjector(model, select_params(model, r"norm"), 512)


def test_exact_when_the_budget_covers_every_weight(policy):
    """k ≥ Σ rows·cols: no side is projected and the features are the per-prompt gradients of the
    covered weights (the tied embedding / lm_head included, padding rows excluded)."""
    names = select_params(policy.model)
    proj = KronProjector(policy.model, names, 10**9)
    assert all(b.p_rows is None and b.p_cols is None for b in proj.blocks) and proj.k == proj.d
    batch = make_prompts(3, 4, seed=0)
    batch[0][1][0][:0] = [5, 0, 7]  # an attended token equal to padding_idx: its embedding row gets no gradient
    batch[0][3][0][:0] = [-1.0, -2.0, -1.5]
    f, norms = kron_features(policy, batch, proj, micro_batch=3)
    for j, b in enumerate(batch):
        ref = reference_grads(policy, *b)
        flat = torch.cat([ref[n].flatten() for n in proj.names])
        assert float((f[j] - flat).norm() / flat.norm()) < 1e-5
        assert norms[j] == pytest.approx(float(flat.norm()), rel=1e-5)


def test_features_are_projected_weight_gradients(policy):
    """Each block equals P_r G P_cᵀ with G from autograd and P from cropi.projection's dense maps."""
    names = select_params(policy.model)
    seed = 7
    proj = KronProjector(policy.model, names, 700, seed, dist="gaussian")
    batch = make_prompts(2, 3, seed=1)
    f, _ = kron_features(policy, batch, proj)
    for j, b in enumerate(batch):
        ref = reference_grads(policy, *b)
        off = 0
        for blk in proj.blocks:
            G = ref[blk.weight]  # [rows, cols]
            p_c = make_projector("dense", blk.cols, blk.k_cols, derive_seed(seed, "kron", blk.weight, "cols"),
                                 dist="gaussian")
            p_r = make_projector("dense", blk.rows, blk.k_rows, derive_seed(seed, "kron", blk.weight, "rows"),
                                 dist="gaussian")
            expect = p_r.project(p_c.project(G).T).T  # [k_rows, k_cols]
            got = f[j, off : off + blk.k_rows * blk.k_cols].reshape(blk.k_rows, blk.k_cols)
            assert float((got - expect).norm() / expect.norm()) < 1e-4, blk.weight
            off += blk.dim
        assert off == proj.k


def from_grads(proj, grads):
    """kron features from full per-weight gradients through the projector's own maps: vec(P_r G P_cᵀ).
    (Equal to prompt_features: test_features_are_projected_weight_gradients.)"""
    blocks = []
    for blk in proj.blocks:
        G = grads[blk.weight].double()
        G = G if blk.p_cols is None else G @ blk.p_cols.double()
        G = G if blk.p_rows is None else blk.p_rows.double().T @ G
        blocks.append(G.flatten())
    return torch.cat(blocks)


def test_inner_products_unbiased_and_sharper_with_k(policy):
    names = select_params(policy.model, r"layers\.0\.mlp\.")  # 3 layers: gate [64, 32], up [64, 32], down [32, 64]
    refs = [reference_grads(policy, *b) for b in make_prompts(2, 4, seed=2)]
    g = [torch.cat([r[n].flatten() for n in names]).double() for r in refs]
    exact = np.array([float(g[0] @ g[1]), float(g[0] @ g[0]), float(g[1] @ g[1])])
    scale = float(g[0].norm() * g[1].norm())
    rel_mse = {}
    for k, n_seeds in ((3 * 4, 300), (3 * 64, 100)):  # 2 x 2 and 8 x 8 per layer
        est = []
        for seed in range(n_seeds):
            proj = KronProjector(policy.model, names, k, seed)
            f0, f1 = from_grads(proj, refs[0]), from_grads(proj, refs[1])
            est.append([float(f0 @ f1), float(f0 @ f0), float(f1 @ f1)])
        est = np.array(est)
        se = est.std(0, ddof=1) / np.sqrt(n_seeds)
        assert np.all(np.abs(est.mean(0) - exact) < 4 * se), (k, est.mean(0), exact, se)
        rel_mse[k] = float(np.mean((est[:, 0] - exact[0]) ** 2)) / scale**2
    assert rel_mse[3 * 64] < rel_mse[3 * 4] / 4


def test_seeded_and_batch_invariant(policy):
    names = select_params(policy.model)
    batch = make_prompts(4, 5, seed=3)
    a, _ = kron_features(policy, batch, KronProjector(policy.model, names, 512, 11))
    b, _ = kron_features(policy, batch, KronProjector(policy.model, names, 512, 11), micro_batch=2)
    alone, _ = kron_features(policy, batch[2:3], KronProjector(policy.model, names, 512, 11))
    other, _ = kron_features(policy, batch, KronProjector(policy.model, names, 512, 12))
    assert float((a - b).norm() / a.norm()) < 1e-5
    assert float((alone[0] - a[2]).norm() / a[2].norm()) < 1e-5
    assert float((other - a).norm() / a.norm()) > 0.5


def _write_pool(path, n, seed, tok):
    rng = np.random.default_rng(seed)
    alphabet = list("0123456789+-= abcxyz")
    rows = []
    for i in range(n):
        resps = ["".join(rng.choice(alphabet, rng.integers(2, 8))) for _ in range(4)]
        rewards = rng.integers(0, 2, 4).astype(float).tolist()
        if i % 5 == 4:
            rewards = [1.0] * 4  # a zero-signal prompt
        rows.append({"id": f"{path.stem}-{i}", "prompt": f"{i}+{i}=", "answer": str(2 * i), "task": "add",
                     "difficulty": 1, "split": "train", "behavior": "random", "responses": resps, "rewards": rewards})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_score_pipeline_with_kron(policy, tmp_path):
    from click.testing import CliRunner

    from cropi import features as F
    from cropi.cli import main
    from cropi.score import ScoreConfig, score

    model_dir = models.save(policy.model, policy.tokenizer, tmp_path / "model", info={"kind": models.TINY})
    pool = _write_pool(tmp_path / "pool.parquet", 12, 0, policy.tokenizer)
    target = _write_pool(tmp_path / "target.parquet", 5, 1, policy.tokenizer)
    cfg = ScoreConfig(projector="kron", k=300, seed=3, shard_size=5, batch=4, check_rank=10)
    meta = score(pool, [target], tmp_path / "s", model=str(model_dir), cfg=cfg)
    loaded = models.load(str(model_dir))
    proj = KronProjector(loaded.model, select_params(loaded.model), 300, 3)
    assert meta["projector"]["kind"] == "kron" and meta["projector"]["k"] == proj.k
    assert meta["n_params"] == proj.d
    feats, index = F.load(tmp_path / "s" / "features")
    assert feats.shape == (12, proj.k)
    status = index.column("status").to_pylist()
    assert status.count("zero_signal") == 2 and not feats[np.array(status) == "zero_signal"].any()
    # --check-rank against exact cosines over the covered weights from plain autograd, one prompt at
    # a time: all 10 ok prompts are checked; precision@10 % is whether the top prompt agrees
    from scipy.stats import spearmanr

    from cropi import schema
    from cropi.score import prepare

    prep = prepare(loaded, schema.read_table(pool, "trajectories"), pool)
    tprep = prepare(loaded, schema.read_table(target, "trajectories"), target)

    def exact_grad(pr, i):
        blp = models.response_logprobs(loaded, [pr.prompt_ids[i]] * len(pr.responses[i]), pr.responses[i])
        ref = reference_grads(loaded, pr.prompt_ids[i], pr.responses[i], pr.rewards[i], blp)
        return torch.cat([ref[n].flatten() for n in proj.names]).double()

    t_ok = [i for i in range(5) if len(set(tprep.rewards[i])) > 1]
    g_v = torch.stack([exact_grad(tprep, i) for i in t_ok]).mean(0)
    rows = [i for i, s in enumerate(status) if s == "ok"]
    exact = np.array([float(torch.nn.functional.cosine_similarity(exact_grad(prep, i), g_v, dim=0)) for i in rows])
    projected = pq.read_table(tmp_path / "s" / "scores.parquet").column("score").to_numpy()[rows]
    cr = meta["check_rank"]
    assert cr["n"] == len(rows) == 10 and len(t_ok) == 4
    assert cr["spearman"] == pytest.approx(spearmanr(exact, projected).statistic, abs=1e-9)
    assert cr["precision"] == float(np.argmax(exact) == np.argmax(projected))
    # rows equal kron features of the same prompts computed directly
    ok = [i for i, s in enumerate(status) if s == "ok"][:3]
    cfg_g = GradConfig()
    w = [token_weights(prep.rewards[i], [len(r) for r in prep.responses[i]], cfg_g) for i in ok]
    direct, _ = prompt_features(loaded, [prep.prompt_ids[i] for i in ok], [prep.responses[i] for i in ok], w,
                                [prep.behavior_logp[i] for i in ok], cfg_g, proj)
    np.testing.assert_allclose(feats[ok], direct.numpy(), rtol=1e-4, atol=1e-7)
    # the CLI accepts --projector kron and writes the same scores
    res = CliRunner().invoke(main, ["score", "--trajectories", str(pool), "--target", str(target), "--model",
                                    str(model_dir), "--projector", "kron", "--k", "300", "--seed", "3", "--shard-size",
                                    "5", "--batch", "4", "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    a = pq.read_table(tmp_path / "s" / "scores.parquet").column("score").to_numpy()
    b = pq.read_table(tmp_path / "cli" / "scores.parquet").column("score").to_numpy()
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert json.loads((tmp_path / "cli" / "meta.json").read_text())["projector"]["kind"] == "kron"
