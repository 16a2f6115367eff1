"""`cropi score`: stream a trajectory pool through per-prompt gradients, projection and influence.

    OUT/features/            projected gradients of the pool (cropi.features store)
    OUT/targets/<name>/      projected gradients of each target set
    OUT/scores.parquet       id, score, score__<target>..., rank, pass_rate, status
    OUT/meta.json            every setting, seeds, timings, and the --check-rank result

The pool is cut into shards of ``shard_size`` prompts; each shard is computed and written on its
own, so memory does not grow with the pool and ``resume=True`` after a kill recomputes only the
missing shards (byte-identical results). Under torchrun, shard c belongs to rank c % world; target
sums are all-reduced and rank 0 writes the scores.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from cropi import features as F
from cropi import influence, kron, layer_grads, models, schema
from cropi.distributed import all_reduce_sum, barrier
from cropi.policy_grad import (
    GradConfig,
    build_units,
    is_zero_signal,
    param_dim,
    prompt_gradients,
    select_params,
    token_weights,
)
from cropi.projection import Inner, make_projector
from cropi.rollout import rollout_meta
from cropi.runtime import derive_seed, progress


@dataclass
class ScoreConfig:
    projector: str = "sjlt"
    k: int = 8192
    seed: int = 0
    density: float = 0.1
    s: int = 1
    dist: str = "rademacher"
    combine: str = "mean"
    max_target: int | None = None
    shard_size: int = 64
    batch: int = 16  # prompts per vmapped forward/backward
    micro_batch: int = 64  # responses per vmap unit (a prompt's G responses are split beyond this)
    feature_dtype: str = "float32"
    check_rank: int = 0
    check_influence: int = 0  # prompts for the measured-step check (check_influence)
    influence_eps: tuple = (1e-3, 1e-2, 1e-1, 1.0)  # normalised step sizes, L2 in parameter space
    influence_lr: float | None = None  # also one Adam-like step (lr·sign g) of this size
    grad: GradConfig = field(default_factory=GradConfig)
    dtype: str | None = None  # forward/backward dtype: fp32 | bf16 | fp16 (None: fp32 on CPU, bf16 on CUDA)
    adapter: str | None = None  # PEFT (LoRA) adapter folder: gradients of its parameters only
    grad_checkpointing: bool = False  # recompute each block's forward in the backward (per-layer path)
    grad_path: str = "auto"  # auto | per-layer | vmap


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GRAD_PATHS = ("auto", "per-layer", "vmap")
REAL_MODEL_PARAMS = 20_000_000  # auto: models above this many parameters take the per-layer path
VMAP_BYTES = 1 << 30  # auto: the vmap path only while a batch's P × d float32 gradients fit in this


def choose_grad_path(cfg: ScoreConfig, model, d: int) -> tuple[str, str]:
    """(path that runs, why): kron | per-layer | vmap."""
    if cfg.projector == "kron":
        if cfg.grad_path == "vmap":
            raise ValueError("--projector kron forms its features in one batched backward; --grad-path vmap does not apply")
        return "kron", "the kron projector forms its features from one batched backward"
    if cfg.grad_path not in GRAD_PATHS:
        raise ValueError(f"--grad-path must be one of {', '.join(GRAD_PATHS)}, got {cfg.grad_path!r}")
    if cfg.grad_path == "vmap" and cfg.grad_checkpointing:
        raise ValueError("--grad-checkpointing needs --grad-path per-layer (or auto)")
    if cfg.grad_path != "auto":
        return cfg.grad_path, "--grad-path"
    n_model = sum(p.numel() for p in model.parameters())
    batch_bytes = cfg.batch * d * 4
    if cfg.grad_checkpointing:
        return "per-layer", "--grad-checkpointing"
    if n_model > REAL_MODEL_PARAMS:
        return "per-layer", f"model of {n_model:,} parameters (> {REAL_MODEL_PARAMS:,})"
    if batch_bytes > VMAP_BYTES:
        return "per-layer", f"a batch's P x d gradients take {batch_bytes / 2**30:.2f} GiB (> 1 GiB)"
    return "vmap", f"small model ({n_model:,} parameters; a batch's P x d gradients take {batch_bytes / 2**20:.0f} MiB)"


def with_adapter(policy: models.Policy, adapter) -> models.Policy:
    """``policy`` with a PEFT adapter folder loaded on top; only the adapter's parameters require grad."""
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").exists():
        raise schema.InputError(adapter, None, "--adapter", "not a PEFT adapter folder (no adapter_config.json)")
    model = PeftModel.from_pretrained(policy.model, str(adapter), is_trainable=True)
    return dataclasses.replace(policy, model=model.eval())


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in ("out of memory", "can't allocate memory",
                                                                     "DefaultCPUAllocator")))


# ---------------------------------------------------------------------------- inputs


@dataclass
class Prepared:
    """Token-level view of a trajectories table for one policy."""

    ids: list[str]
    prompt_ids: list[list[int]]
    responses: list[list[list[int]]]
    rewards: list[list[float]]
    behavior_logp: list  # per prompt: list of per-token lists, or None (on-policy)
    table: pa.Table


def prepare(policy: models.Policy, table: pa.Table, path, behavior: models.Policy | None = None) -> Prepared:
    """Tokenise a trajectories table for ``policy`` and check stored tokens fit its tokenizer.

    Stored ``response_token_ids`` are used as they are (checked: ids inside the vocabulary and
    every response decodes back to its text); otherwise responses are tokenised
    and EOS appended. Behaviour log-probs: stored ones, or recomputed with ``behavior``, or None."""
    tok = policy.tokenizer
    vocab = len(tok)
    rows_resp = table.column("responses").to_pylist()
    prompt_ids = models.encode_prompts(policy, table.column("prompt").to_pylist())
    ids = table.column("id").to_pylist()
    if "response_token_ids" in table.column_names:
        responses = table.column("response_token_ids").to_pylist()
        for i, r in enumerate(responses):
            bad = [t for resp in r for t in resp if not 0 <= t < vocab]
            if bad:
                raise schema.InputError(path, f"{i} (id {ids[i]!r})", "response_token_ids", f"token id {bad[0]} outside this model's vocabulary ({vocab})")
        texts = iter(tok.batch_decode([resp for r in responses for resp in r], skip_special_tokens=True))
        for i, r in enumerate(rows_resp):
            for j, want in enumerate(r):
                if next(texts).strip() != want.strip():
                    raise schema.InputError(path, f"{i} (id {ids[i]!r})", "response_token_ids", f"response {j}: tokens do not decode to "
                                            "the response text with this model's tokenizer (trajectories from another tokenizer?)")
    else:
        eos = tok.eos_token_id
        responses = [[tok(t, add_special_tokens=False)["input_ids"] + [eos] for t in r] for r in rows_resp]
    if behavior is not None:
        flat_p = [p for p, r in zip(prompt_ids, responses) for _ in r]
        flat_r = [x for r in responses for x in r]
        lp = models.response_logprobs(behavior, flat_p, flat_r)
        blp, s = [], 0
        for r in responses:
            blp.append(lp[s : s + len(r)])
            s += len(r)
    elif "behavior_logprobs" in table.column_names:
        blp = table.column("behavior_logprobs").to_pylist()
    else:
        blp = [None] * len(ids)
    ctx = getattr(policy.model.config, "max_position_embeddings", None)
    if ctx:
        for i, (p, r) in enumerate(zip(prompt_ids, responses)):
            if len(p) + max(len(x) for x in r) > ctx:
                raise schema.InputError(path, f"{i} (id {ids[i]!r})", "responses", f"prompt+response longer than the model context ({ctx} tokens)")
    return Prepared(ids, prompt_ids, responses, table.column("rewards").to_pylist(), blp, table)


# ---------------------------------------------------------------------------- stores


def compute_store(policy, prep: Prepared, store: Path, names, projector, cfg: ScoreConfig, meta: dict, *,
                  resume: bool, rank: int = 0, world: int = 1, pool_std: float | None = None, bar=None) -> tuple[np.ndarray, int]:
    """Fill ``store`` with this rank's shards; return (sum of ok feature rows [k] float64, ok count)
    over this rank's shards (for target means)."""
    if rank == 0:
        F.init_store(store, meta, resume)
    barrier()
    n = len(prep.ids)
    n_shards = (n + cfg.shard_size - 1) // cfg.shard_size
    total, count = np.zeros(cfg.k, dtype=np.float64), 0
    for c in range(rank, n_shards, world):
        lo, hi = c * cfg.shard_size, min(n, (c + 1) * cfg.shard_size)
        if F.shard_done(store, c):
            feats, index = F.read_shard(store, c)
            feats, status = np.asarray(feats, dtype=np.float64), index.column("status").to_pylist()
        else:
            feats, status = _shard_features(policy, prep, lo, hi, names, projector, cfg, pool_std, store, c)
        ok = np.array([s == "ok" for s in status])
        total += feats[ok].astype(np.float64).sum(0)
        count += int(ok.sum())
        if bar is not None:
            bar.update(hi - lo)
    return total, count


def _shard_features(policy, prep, lo, hi, names, projector, cfg: ScoreConfig, pool_std, store, c):
    feats = np.zeros((hi - lo, cfg.k), dtype=np.float32)
    norms = np.zeros(hi - lo)
    status, reason = [], []
    todo = []
    for i in range(lo, hi):
        if is_zero_signal(prep.rewards[i]):
            status.append("zero_signal")
            reason.append("all rewards equal: every advantage is 0")
        else:
            status.append("ok")
            reason.append("")
            todo.append(i)
    for s in range(0, len(todo), cfg.batch):
        batch = todo[s : s + cfg.batch]
        weights = [token_weights(prep.rewards[i], [len(r) for r in prep.responses[i]], cfg.grad, pool_std) for i in batch]
        args = ([prep.prompt_ids[i] for i in batch], [prep.responses[i] for i in batch], weights, [prep.behavior_logp[i] for i in batch])
        try:
            if isinstance(projector, kron.KronProjector):
                f, gn = kron.prompt_features(policy, *args, cfg.grad, projector, cfg.micro_batch)
            elif cfg.grad_path == "per-layer":
                f, gn = layer_grads.prompt_gradients(policy, *args, names, cfg.grad, projector, cfg.micro_batch,
                                                     cfg.grad_checkpointing)
            else:
                f, gn = prompt_gradients(policy, *args, names, cfg.grad, projector, cfg.micro_batch)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e):
                raise
            raise ValueError(f"out of memory computing the gradients of {len(batch)} prompts ({cfg.grad_path} path): "
                             f"lower --batch (now {cfg.batch}) or --micro-batch (now {cfg.micro_batch}), or add "
                             "--grad-checkpointing or --dtype bf16") from None
        for j, i in enumerate(batch):
            feats[i - lo] = f[j].numpy()
            norms[i - lo] = float(gn[j])
    index = pa.table({
        "id": prep.ids[lo:hi],
        "grad_norm": norms,
        "n_tokens": [sum(len(r) for r in prep.responses[i]) for i in range(lo, hi)],
        "status": status,
        "reason": reason,
    })
    F.write_shard(store, c, feats, index, cfg.feature_dtype)
    return feats.astype(np.float64), status


# ---------------------------------------------------------------------------- the command


def _subsample(table: pa.Table, n: int | None, seed: int) -> pa.Table:
    if n is None or table.num_rows <= n:
        return table
    idx = np.sort(np.random.default_rng(seed).choice(table.num_rows, n, replace=False))
    return table.take(pa.array(idx))


def score(trajectories, targets: list, out, *, model: str = models.TINY, behavior_model: str | None = None,
          cfg: ScoreConfig | None = None, resume: bool = False, overwrite: bool = False, device: str = "cpu",
          rank: int = 0, world: int = 1, policy: models.Policy | None = None, columns: dict | None = None,
          split: str | None = None) -> dict:
    """Score every prompt of ``trajectories`` against the ``targets`` (trajectories files).
    ``columns`` maps the user's column names of the pool and ``split`` picks its split of a
    DatasetDict folder (`schema.read_table`); target sets are read with cropi's names. Returns the run's meta (also written to OUT/meta.json)."""
    cfg = cfg or ScoreConfig()
    t0 = time.time()
    out = Path(out)
    if not targets:
        raise schema.InputError(out, None, "--target", "at least one target set is needed")
    if rank == 0:
        if out.exists() and overwrite:
            shutil.rmtree(out)
        for m in (model if policy is None else None, behavior_model):
            if m:
                models.resolve(m)  # builds the tiny default once, before the other ranks load it
    barrier()
    if (out / "meta.json").exists() and not resume:
        raise schema.InputError(out, None, None, "scores already exist here; pass --resume to continue or --overwrite to replace")
    traj_path = Path(trajectories)
    table = schema.read_table(traj_path, "trajectories", columns=columns, split=split)
    target_tables = []
    for p in targets:
        t = schema.read_table(p)
        if schema.detect_kind(t) != "trajectories":
            raise schema.InputError(p, None, "responses", "a target set needs responses and rewards: roll it out first (cropi rollout --prompts ...)")
        target_tables.append(schema.validate(t, "trajectories", p))
    tnames = schema.target_names(targets)
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    policy = policy or models.load(model, device=device, dtype=DTYPES.get(cfg.dtype))
    if cfg.dtype is not None:
        policy.model.to(DTYPES[cfg.dtype])
    if cfg.adapter:
        policy = with_adapter(policy, cfg.adapter)
    behavior = models.load(behavior_model, device=device) if behavior_model else None
    if behavior is not None and len(behavior.tokenizer) != len(policy.tokenizer):
        raise schema.InputError(behavior_model, None, "--behavior-model", "tokenizer differs from the scored model's")
    rmeta = rollout_meta(traj_path)
    grad_cfg = cfg.grad
    if "temperature" in rmeta and grad_cfg.temperature != rmeta["temperature"]:
        grad_cfg = dataclasses.replace(grad_cfg, temperature=rmeta["temperature"])
        cfg = dataclasses.replace(cfg, grad=grad_cfg)
    names = select_params(policy.model, grad_cfg.params)
    if cfg.projector == "kron":  # features cover Linear/Embedding weights only: score and check those alone
        projector = kron.KronProjector(policy.model, names, cfg.k, cfg.seed, dist=cfg.dist, device=policy.device)
        names = projector.names
    d = param_dim(policy.model, names)
    if cfg.projector not in ("identity", "kron") and cfg.k > d:
        raise schema.InputError("--k", None, None, f"{cfg.k} is more than the {d} dimensions of the selected parameters "
                                f"({grad_cfg.params}): pass --k {d} or less, or --projector identity for exact gradients")
    k = d if cfg.projector == "identity" else projector.k if cfg.projector == "kron" else cfg.k
    path, why = choose_grad_path(cfg, policy.model, d)
    requested_path, cfg = cfg.grad_path, dataclasses.replace(cfg, k=k, grad_path=path)
    if cfg.projector != "kron":
        projector = make_projector(cfg.projector, d, k, cfg.seed, density=cfg.density, s=cfg.s, dist=cfg.dist,
                                   device=policy.device)
    all_rewards = np.concatenate([np.asarray(r, dtype=np.float64) for r in table.column("rewards").to_pylist()])
    pool_std = float(all_rewards.std(ddof=1)) if all_rewards.size > 1 else 0.0
    store_meta = {
        "model": model,
        "checkpoint": policy.path,
        "fingerprint": models.fingerprint(policy.model),
        "params": grad_cfg.params,
        "n_params": d,
        "loss": grad_cfg.to_dict(),
        "projector": projector.meta(),
        "dtype": cfg.feature_dtype,
        "compute_dtype": str(next(policy.model.parameters()).dtype).removeprefix("torch."),
        "grad_path": {"requested": requested_path, "ran": path, "why": why},
        "grad_checkpointing": cfg.grad_checkpointing,
        "adapter": None if not cfg.adapter else {"path": str(cfg.adapter), "gradients": "adapter parameters only"},
        "shard_size": cfg.shard_size,
        "behavior": "stored" if behavior is None and "behavior_logprobs" in table.column_names
        else (behavior_model or "on-policy (current model)"),
    }
    traj_sha = schema.content_sha256(traj_path)
    target_shas = [schema.content_sha256(p) for p in targets]
    prep = prepare(policy, table, traj_path, behavior)
    target_preps = [prepare(policy, _subsample(t, cfg.max_target, derive_seed(cfg.seed, "target", n)), p, behavior)
                    for t, p, n in zip(target_tables, targets, tnames)]
    mine = lambda n: sum(min(cfg.shard_size, n - c * cfg.shard_size) for c in range(rank, (n + cfg.shard_size - 1) // cfg.shard_size, world))  # noqa: E731
    bar = progress(total=mine(len(prep.ids)) + sum(mine(len(tp.ids)) for tp in target_preps),
                   desc="score" if world == 1 else f"score rank {rank}", unit="prompt")
    target_means = {}
    for name, tp, path, sha in zip(tnames, target_preps, targets, target_shas):
        tm = {**store_meta, "source": str(Path(path).resolve()), "source_sha256": sha, "max_target": cfg.max_target}
        s, n_ok = compute_store(policy, tp, out / "targets" / name, names, projector, cfg, tm, resume=resume,
                                rank=rank, world=world, pool_std=pool_std, bar=bar)
        acc = all_reduce_sum(torch.from_numpy(np.append(s, n_ok)))
        n_ok = int(acc[-1])
        if n_ok == 0:
            raise schema.InputError(path, None, "rewards", "no target prompt has a learning signal (all groups have equal rewards)")
        target_means[name] = (acc[:-1] / n_ok).numpy()
    pm = {**store_meta, "source": str(traj_path.resolve()), "source_sha256": traj_sha}
    compute_store(policy, prep, out / "features", names, projector, cfg, pm, resume=resume, rank=rank, world=world,
                  pool_std=pool_std, bar=bar)
    bar.close()
    barrier()
    if rank != 0:
        return {}
    for name, tp in zip(tnames, target_preps):
        F.finalize(out / "targets" / name, (len(tp.ids) + cfg.shard_size - 1) // cfg.shard_size)
    index = F.finalize(out / "features", (len(prep.ids) + cfg.shard_size - 1) // cfg.shard_size)
    scores = write_scores(out, table, index, target_means, cfg.combine)
    elapsed = time.time() - t0
    meta = {
        **store_meta,
        "trajectories": str(traj_path.resolve()),
        "trajectories_sha256": traj_sha,
        "targets": {n: str(Path(p).resolve()) for n, p in zip(tnames, targets)},
        "targets_sha256": dict(zip(tnames, target_shas)),
        "config": {**{k: v for k, v in cfg.__dict__.items() if k != "grad"}, "grad": grad_cfg.to_dict()},
        "seed": cfg.seed,
        "pool_size": table.num_rows,
        "status": schema.summarize(scores, "scores")["status"],
        "seconds": round(elapsed, 2),
        "prompts_per_s": round((len(prep.ids) + sum(len(t.ids) for t in target_preps)) / max(elapsed, 1e-9), 2),
        "world_size": world,
    }
    if cfg.check_rank:
        meta["check_rank"] = check_rank(policy, prep, target_preps, scores, names, cfg, pool_std)
    if cfg.check_influence:
        meta["check_influence"] = check_influence(policy, prep, target_preps, scores, names, cfg, pool_std)
    schema.write_json_atomic(meta, out / "meta.json")
    return meta


def write_scores(out: Path, table: pa.Table, index: pa.Table, target_means: dict, method: str) -> pa.Table:
    """Cosine of every pool feature row with each target mean; combined score, rank, pass rate."""
    per_target = {name: [] for name in target_means}
    for feats, _ in F.iter_shards(out / "features"):
        for name, g in target_means.items():
            per_target[name].append(influence.cosine(feats, g))
    per_target = {k: np.concatenate(v) for k, v in per_target.items()}
    status = np.array(index.column("status").to_pylist())
    ok = status == "ok"
    per_target = {k: np.where(ok, v, np.nan) for k, v in per_target.items()}
    combined = influence.combine(per_target, ok, method)
    cols = {"id": index.column("id"), "score": combined}
    cols.update({f"{schema.SCORE_PREFIX}{k}": v for k, v in per_target.items()})
    cols.update(rank=influence.rank_desc(combined, ok), pass_rate=schema.pass_rates(table.column("rewards")), status=status)
    scores = schema.validate(pa.table(cols), "scores", out / "scores.parquet")
    schema.write_parquet_atomic(scores, out / "scores.parquet")
    return scores


def exact_gradients(policy, prep: Prepared, rows: list[int], names, cfg: ScoreConfig, pool_std) -> np.ndarray:
    """Flat exact gradients [len(rows), d] float32 (identity projection)."""
    d = param_dim(policy.model, names)
    ident = make_projector("identity", d, d, device=policy.device)
    out = np.zeros((len(rows), d), dtype=np.float32)
    for s in range(0, len(rows), cfg.batch):
        b = rows[s : s + cfg.batch]
        w = [token_weights(prep.rewards[i], [len(r) for r in prep.responses[i]], cfg.grad, pool_std) for i in b]
        f, _ = prompt_gradients(policy, [prep.prompt_ids[i] for i in b], [prep.responses[i] for i in b], w,
                                [prep.behavior_logp[i] for i in b], names, cfg.grad, ident.project, cfg.micro_batch)
        out[s : s + len(b)] = f.numpy()
    return out


def target_mean_gradient(policy, tp: Prepared, names, cfg: ScoreConfig, pool_std) -> torch.Tensor:
    """ḡ_V: the exact mean gradient [d] float32 (cpu) over the target set's prompts with a learning
    signal, by plain backward of their summed objective, ``cfg.batch`` prompts at a time."""
    t_ok = [i for i in range(len(tp.ids)) if not is_zero_signal(tp.rewards[i])]
    g = torch.zeros(param_dim(policy.model, names))
    for s in range(0, len(t_ok), cfg.batch):
        b = t_ok[s : s + cfg.batch]
        w = [token_weights(tp.rewards[i], [len(r) for r in tp.responses[i]], cfg.grad, pool_std) for i in b]
        g += layer_grads.summed_gradient(policy, [tp.prompt_ids[i] for i in b], [tp.responses[i] for i in b], w,
                                         [tp.behavior_logp[i] for i in b], names, cfg.grad, cfg.micro_batch,
                                         cfg.grad_checkpointing)
    return g / max(len(t_ok), 1)


def exact_scores(policy, prep: Prepared, rows: list[int], target_preps: list[Prepared], names, cfg: ScoreConfig,
                 pool_std) -> np.ndarray:
    """Exact cos(g_x, ḡ_V) [len(rows), n_targets] float64: each target's mean gradient ḡ_V by plain
    backward (a d-vector per target), then each pool gradient's inner products with them from the
    per-layer path, never a flat per-prompt gradient."""
    means = [target_mean_gradient(policy, tp, names, cfg, pool_std) for tp in target_preps]
    inner = Inner(torch.stack(means).to(policy.device))
    tnorm = torch.stack(means).double().norm(dim=1)
    out = np.zeros((len(rows), len(means)))
    for s in range(0, len(rows), cfg.batch):
        b = rows[s : s + cfg.batch]
        w = [token_weights(prep.rewards[i], [len(r) for r in prep.responses[i]], cfg.grad, pool_std) for i in b]
        dots, norms = layer_grads.prompt_gradients(policy, [prep.prompt_ids[i] for i in b], [prep.responses[i] for i in b],
                                                   w, [prep.behavior_logp[i] for i in b], names, cfg.grad, inner,
                                                   cfg.micro_batch, cfg.grad_checkpointing)
        out[s : s + len(b)] = (dots.double() / (norms[:, None] * tnorm[None, :]).clamp(min=1e-30)).numpy()
    return out


def check_rank(policy, prep: Prepared, target_preps: list[Prepared], scores: pa.Table, names, cfg: ScoreConfig, pool_std) -> dict:
    """Exact vs projected scores on N seeded ok prompts: precision@10 % and Spearman ρ."""
    ok = np.flatnonzero(np.array(scores.column("status").to_pylist()) == "ok")
    rng = np.random.default_rng(derive_seed(cfg.seed, "check-rank"))
    rows = np.sort(rng.choice(ok, min(cfg.check_rank, len(ok)), replace=False)).tolist()
    exact = exact_scores(policy, prep, rows, target_preps, names, cfg, pool_std)
    per_exact, per_proj = {}, {}
    for j, col in enumerate([c for c in scores.column_names if c.startswith(schema.SCORE_PREFIX)]):
        per_exact[col] = exact[:, j]
        per_proj[col] = np.asarray(scores.column(col).to_numpy(zero_copy_only=False))[rows]
    ones = np.ones(len(rows), dtype=bool)
    ex = influence.combine(per_exact, ones, cfg.combine)
    pr = influence.combine(per_proj, ones, cfg.combine)
    res = influence.rank_agreement(ex, pr, 0.1)
    res["per_target"] = {c: influence.rank_agreement(per_exact[c], per_proj[c], 0.1) for c in per_exact}
    return res


def check_influence(policy, prep: Prepared, target_preps: list[Prepared], scores: pa.Table, names, cfg: ScoreConfig,
                    pool_std) -> dict:
    """Does the score predict what a step along a prompt's gradient does to the target objective?

    For N seeded ok prompts x, with g_x exact and u_x = g_x / ‖g_x‖₂ over the scored parameters:
    - step rule "normalised", per ε in ``cfg.influence_eps``: θ ← θ + ε·u_x (‖Δθ‖₂ = ε);
    - step rule "adam" (when ``cfg.influence_lr``): θ ← θ + lr·sign(g_x), which is the first
      update of Adam from a fresh state (bias-corrected, ε_adam ≪ |g|), ascending J.
    Measured: ΔJ_V = J_V(θ + Δθ) − J_V(θ) for each target set V, where J_V is the mean over V's
    ok prompts of the off-policy objective J_v (offline responses, ratios to β); the targets are
    combined as mean_V ΔJ_V / ‖∇J_V‖₂, so that to first order the normalised step gives
    ε·mean_V cos(g_x, ∇J_V). Reported per rule: Spearman ρ of the projected scores (column
    ``score``) and of the exact cosines against the measured change, and the median relative
    error |measured − first-order| / |first-order| (first-order = ⟨∇J_V, Δθ⟩). Parameters are
    restored exactly after each step."""
    ok = np.flatnonzero(np.array(scores.column("status").to_pylist()) == "ok")
    rng = np.random.default_rng(derive_seed(cfg.seed, "check-influence"))
    rows = np.sort(rng.choice(ok, min(cfg.check_influence, len(ok)), replace=False)).tolist()
    exact = exact_gradients(policy, prep, rows, names, cfg, pool_std).astype(np.float64)  # [N, d]
    t_rows = [[i for i in range(len(tp.ids)) if not is_zero_signal(tp.rewards[i])] for tp in target_preps]
    target_preps = [_behavior_filled(policy, tp, cfg.grad.temperature) for tp in target_preps]  # β fixed at θ
    target_grads = [target_mean_gradient(policy, tp, names, cfg, pool_std).double().numpy() for tp in target_preps]

    def objectives() -> np.ndarray:  # [V] J_V at the current parameters
        return np.array([_objective(policy, tp, t_ok, cfg, pool_std) for tp, t_ok in zip(target_preps, t_rows)])

    params = dict(policy.model.named_parameters())
    saved = {n: params[n].detach().clone() for n in names}

    def step(delta: np.ndarray) -> np.ndarray:  # J_V(θ + delta) for flat delta [d]
        off = 0
        with torch.no_grad():
            for n in names:
                p = params[n]
                p.add_(torch.from_numpy(delta[off : off + p.numel()]).view_as(p).to(p.dtype))
                off += p.numel()
            try:
                return objectives()
            finally:
                for n in names:
                    params[n].copy_(saved[n])

    tnorm = np.array([np.linalg.norm(g) for g in target_grads])
    was_training = policy.model.training
    policy.model.eval()
    base = objectives()
    rules = [("normalised", float(e)) for e in cfg.influence_eps]
    if cfg.influence_lr:
        rules.append(("adam", float(cfg.influence_lr)))
    measured = np.zeros((len(rules), len(rows)))
    first = np.zeros((len(rules), len(rows)))
    for j, g in enumerate(exact):
        for r, (rule, size) in enumerate(rules):
            delta = size * g / max(np.linalg.norm(g), 1e-30) if rule == "normalised" else size * np.sign(g)
            measured[r, j] = float(np.mean((step(delta) - base) / np.maximum(tnorm, 1e-30)))
            first[r, j] = float(np.mean([tg @ delta for tg in target_grads] / np.maximum(tnorm, 1e-30)))
    proj = np.asarray(scores.column("score").to_numpy(zero_copy_only=False))[rows]
    cos_exact = np.mean([influence.cosine(exact, tg) for tg in target_grads], axis=0)
    out = []
    for r, (rule, size) in enumerate(rules):
        rel = np.abs(measured[r] - first[r]) / np.maximum(np.abs(first[r]), 1e-30)
        out.append({
            "rule": rule,
            "step": size,
            "spearman": influence.rank_agreement(measured[r], proj, 0.1)["spearman"],
            "spearman_exact": influence.rank_agreement(measured[r], cos_exact, 0.1)["spearman"],
            "first_order_rel_err": float(np.median(rel)),
            "measured_mean": float(measured[r].mean()),
        })
    policy.model.train(was_training)
    return {"n": len(rows), "combine": "mean of ΔJ_V / ‖∇J_V‖", "steps": out}


def _behavior_filled(policy, prep: Prepared, temperature: float) -> Prepared:
    """``prep`` with on-policy (None) behaviour log-probs replaced by the current model's."""
    todo = [i for i, b in enumerate(prep.behavior_logp) if b is None]
    if not todo:
        return prep
    flat = models.response_logprobs(policy, [prep.prompt_ids[i] for i in todo for _ in prep.responses[i]],
                                    [r for i in todo for r in prep.responses[i]], temperature)
    blp, s = list(prep.behavior_logp), 0
    for i in todo:
        blp[i], s = flat[s : s + len(prep.responses[i])], s + len(prep.responses[i])
    return dataclasses.replace(prep, behavior_logp=blp)


@torch.no_grad()
def _objective(policy, prep: Prepared, rows: list[int], cfg: ScoreConfig, pool_std) -> float:
    """J_V = mean over ``rows`` of J_x(θ) = Σ_i Σ_t w_{i,t} ρ_{i,t} (the value whose gradient
    ``prompt_gradients`` takes), at the model's current parameters. float."""
    total, g = 0.0, cfg.grad
    for s in range(0, len(rows), cfg.batch):
        b = rows[s : s + cfg.batch]
        w = [token_weights(prep.rewards[i], [len(r) for r in prep.responses[i]], g, pool_std) for i in b]
        u = build_units([prep.prompt_ids[i] for i in b], [prep.responses[i] for i in b], w,
                        [prep.behavior_logp[i] for i in b], policy.tokenizer.pad_token_id, cfg.micro_batch)
        U, M, T = u.input_ids.shape
        lp = models.token_logprobs(policy.model, u.input_ids.view(U * M, T).to(policy.device),
                                   u.attention_mask.view(U * M, T).to(policy.device), g.temperature).cpu().view(U, M, T)
        ratio = torch.exp(torch.where(u.response_mask, lp - torch.nan_to_num(u.behavior_logp), torch.zeros_like(lp)))
        if g.ratio_clip is not None:
            ratio = ratio.clamp(max=g.ratio_clip)
        total += float((u.weight.double() * ratio.double() * u.response_mask).sum())
    return total / max(len(rows), 1)
