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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from cropi import features as F
from cropi import influence, kron, layer_grads, models, schema
from cropi.config import check_fields, option
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
from cropi.projection import PROJECTORS, Inner, make_projector
from cropi.rollout import SAMPLER_LOGPROBS, rollout_meta, sampler_logprobs
from cropi.runtime import derive_seed, progress

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GRAD_PATHS = ("auto", "per-layer", "vmap")


def pool_transform(cfg) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What each pool prompt's gradient goes through before projection: None (plain) or
    ``torch.sign`` (``pool_grad=sign``). Adam's first step from a fresh state is lr·sign(g_x), so
    cos(P sign(g_x), P ḡ_V) scores the first-order change of the target objective under it."""
    return torch.sign if cfg.pool_grad == "sign" else None


@dataclass
class ScoreConfig:
    """`cropi score` settings, checked when made (`cropi.config.check_fields`)."""

    projector: str = option("sjlt", "Gradient projector.", choices=(*PROJECTORS, "kron"))
    k: int = option(8192, "Projected dimension, at most d (the selected parameters' count).", lo=1)
    seed: int = option(0, "Projection and sub-sampling seed.", lo=0)
    density: float = option(0.1, "mask-dense: kept ratio.", lo=0, lo_open=True, hi=1)
    s: int = option(1, "sjlt: nonzeros per coordinate.", lo=1)
    dist: str = option("rademacher", "Projection entries.", choices=("rademacher", "gaussian"))
    combine: str = option("mean", "How scores against several target sets combine.", choices=influence.COMBINE)
    max_target: int | None = option(None, "Prompts per target set (seeded sample; None: all).", lo=1)
    shard_size: int = option(64, "Prompts per resumable shard.", lo=1)
    batch: int = option(16, "Prompts per vmapped forward/backward.", lo=1)
    micro_batch: int = option(64, "Responses per vmap unit (a prompt's G responses are split beyond this).", lo=1)
    feature_dtype: str = option("float32", "Stored feature dtype.", choices=("float32", "float16"))
    check_rank: int = option(0, "Exact-vs-projected check on N prompts (0: off).", lo=0)
    check_influence: int = option(0, "Prompts for the measured-step check (check_influence; 0: off).", lo=0)
    influence_eps: tuple[float, ...] = option((1e-3, 1e-2, 1e-1, 1.0), "Normalised step sizes, L2 in parameter space.",
                                              lo=0, lo_open=True, nonempty=True)
    influence_lr: float | None = option(None, "Also one Adam-like step (lr·sign g) of this size.", lo=0, lo_open=True)
    grad: GradConfig = field(default_factory=GradConfig)
    dtype: str | None = option(None, "Forward/backward dtype (None: fp32 on CPU, bf16 on CUDA).", choices=tuple(DTYPES))
    adapter: str | None = option(None, "PEFT (LoRA) adapter folder: gradients of its parameters only.")
    grad_checkpointing: bool = option(False, "Recompute each block's forward in the backward (per-layer path).")
    # score() stores the path that runs back here: kron for the kron projector
    grad_path: str = option("auto", "How per-prompt gradients are formed.", choices=(*GRAD_PATHS, "kron"))
    pool_grad: str = option("plain", "Pool features from g_x (plain) or from sign(g_x), the direction of a first "
                                     "Adam step (Adam-preconditioned, as LESS); target gradients stay plain.",
                            choices=influence.POOL_GRADS)

    def __post_init__(self):
        check_fields(self)
        if self.pool_grad == "sign" and self.check_rank:
            raise ValueError("--check-rank compares with plain-gradient scores; it does not apply to --pool-grad sign")
        if self.pool_grad == "sign" and self.dtype == "fp16":  # fp16 loss scaling needs features linear in the loss
            raise ValueError("--pool-grad sign does not combine with --dtype fp16's loss scaling: use bf16 or fp32")


FP16_LOSS_SCALES = (2.0**16, 2.0**12, 2.0**8, 2.0**4, 1.0)  # tried in turn while a batch overflows
REAL_MODEL_PARAMS = 20_000_000  # auto: models above this many parameters take the per-layer path
VMAP_BYTES = 1 << 30  # auto: the vmap path only while a batch's P × d float32 gradients fit in this


def choose_grad_path(cfg: ScoreConfig, model, d: int) -> tuple[str, str]:
    """(path that runs, why): kron | per-layer | vmap."""
    if cfg.projector == "kron":
        if cfg.pool_grad == "sign":
            raise ValueError("--pool-grad sign needs a flat projector (kron projects Kronecker factors, not g_x)")
        if cfg.grad_path == "vmap":
            raise ValueError("--projector kron forms its features in one batched backward; --grad-path vmap does not apply")
        return "kron", "the kron projector forms its features from one batched backward"
    if cfg.grad_path not in GRAD_PATHS:
        raise ValueError(f"--grad-path must be one of {', '.join(GRAD_PATHS)}, got {cfg.grad_path!r}")
    batch_bytes = cfg.batch * d * 4
    if cfg.pool_grad == "sign":  # sign(g_x) needs each prompt's whole gradient before projecting it
        if cfg.grad_path == "per-layer" or cfg.grad_checkpointing:
            raise ValueError("--pool-grad sign needs --grad-path vmap (per-layer projects partial gradients)")
        if cfg.grad_path == "auto" and batch_bytes > VMAP_BYTES:  # what auto would not give vmap, said, not run
            raise ValueError(f"--pool-grad sign needs the vmap path, where a batch's P x d gradients take "
                             f"{batch_bytes / 2**30:.2f} GiB (> 1 GiB): lower --batch to "
                             f"{max(1, VMAP_BYTES // (d * 4))}, or pass --grad-path vmap to run it anyway")
        return "vmap", "--pool-grad sign: each prompt's whole gradient before projection"
    if cfg.grad_path == "vmap" and cfg.grad_checkpointing:
        raise ValueError("--grad-checkpointing needs --grad-path per-layer (or auto)")
    if cfg.grad_path != "auto":
        return cfg.grad_path, "--grad-path"
    n_model = sum(p.numel() for p in model.parameters())
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


def is_fp16(policy: models.Policy) -> bool:
    return any(p.dtype == torch.float16 for p in policy.model.parameters())


def loss_scaled(fn, policy: models.Policy, prompt_ids, responses, weights, behavior_logp, *rest) -> tuple:
    """``fn(policy, prompt_ids, responses, weights, behavior_logp, *rest)``, one of the per-prompt
    gradient functions, whose results are linear in the per-response weights (features, norms,
    inner products, gradients), protected from fp16 underflow: for a model with fp16 parameters
    it runs with every weight × S and divides the results by S. J is linear in the weights, so its fp16
    backward carries output-gradients S times larger, above fp16's underflow (loss scaling, as in
    mixed-precision training); S is a power of two, so scaling and unscaling are exact. The
    largest S of ``FP16_LOSS_SCALES`` whose results are all finite is used (an overflow backs off
    by 2^4). Other dtypes run unscaled."""
    for scale in FP16_LOSS_SCALES if is_fp16(policy) else (1.0,):
        out = fn(policy, prompt_ids, responses, [[w * scale for w in ws] for ws in weights], behavior_logp, *rest)
        out = out if isinstance(out, tuple) else (out,)
        if scale == 1.0 or all(bool(torch.isfinite(o).all()) for o in out):
            return tuple(o / scale for o in out)


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
    temperature: float = 1.0  # the file's rollout temperature: log π and log β are taken at it


def prepare(policy: models.Policy, table: pa.Table, path, behavior: models.Policy | None = None,
            temperature: float = 1.0) -> Prepared:
    """Tokenise a trajectories table for ``policy`` and check stored tokens fit its tokenizer.

    Stored ``response_token_ids`` are used as they are (checked: ids inside the vocabulary and
    every response decodes back to its text); otherwise responses are tokenised and EOS appended
    to those that ended (:func:`_retokenise`). The file's rollout metadata give its sampling
    temperature and top-p (``temperature`` for files that record none). Behaviour log-probs:
    recomputed with ``behavior`` for the distribution sampled from (`rollout.sampler_logprobs`),
    or stored ones, or None (on-policy)."""
    sampled = rollout_meta(path) if Path(str(path)).is_file() else {}
    temperature = float(sampled.get("temperature", temperature))
    top_p = float(sampled.get("top_p", 1.0))
    tok = policy.tokenizer
    rows_resp = table.column("responses").to_pylist()
    prompt_ids = models.encode_prompts(policy, table.column("prompt").to_pylist())
    ids = table.column("id").to_pylist()
    if "response_token_ids" in table.column_names:
        responses = table.column("response_token_ids").to_pylist()
        schema.check_token_ids(table, path, tok, responses)
    else:
        responses = _retokenise(tok, rows_resp, sampled.get("max_new_tokens"))
    if behavior is not None:
        flat_p = [p for p, r in zip(prompt_ids, responses) for _ in r]
        flat_r = [x for r in responses for x in r]
        lp = sampler_logprobs(behavior, flat_p, flat_r, temperature, top_p)
        blp, s = [], 0
        for r in responses:
            blp.append(lp[s : s + len(r)])
            s += len(r)
    elif "behavior_logprobs" in table.column_names:
        if top_p < 1.0 and sampled.get("behavior_logprobs") != SAMPLER_LOGPROBS:
            raise schema.InputError(path, None, "behavior_logprobs", f"sampled with top_p {top_p}, but the stored log-probs "
                                    "are not of the truncated distribution (an older cropi): recompute them with --behavior-model")
        blp = table.column("behavior_logprobs").to_pylist()
    else:
        blp = [None] * len(ids)
    schema.check_context(table, path, prompt_ids, responses, getattr(policy.model.config, "max_position_embeddings", None))
    return Prepared(ids, prompt_ids, responses, table.column("rewards").to_pylist(), blp, table, temperature)


def _retokenise(tok, rows_resp, max_new_tokens: int | None) -> list[list[list[int]]]:
    """Token ids of response texts, EOS appended to each response that ended. A response ended
    unless the file records ``max_new_tokens`` and its text takes that many tokens or more (it
    was cut there, never sampled an EOS); a file that records nothing (the public CROPI JSONL) is
    taken to hold ended responses."""
    eos = tok.eos_token_id
    out = []
    for r in rows_resp:
        enc = [tok(t, add_special_tokens=False)["input_ids"] for t in r]
        out.append([x if max_new_tokens is not None and len(x) >= max_new_tokens else x + [eos] for x in enc])
    return out


def loss_of(cfg: ScoreConfig, prep: Prepared) -> GradConfig:
    """The loss settings for ``prep``'s file: ``cfg.grad`` at the temperature it was sampled at."""
    return dataclasses.replace(cfg.grad, temperature=prep.temperature)


def batch_args(prep: Prepared, rows: list[int], loss: GradConfig, pool_std) -> tuple[list, list, list, list]:
    """(prompt ids, responses, per-response weights, behaviour log-probs) of ``rows``: what every
    per-prompt gradient function takes after the policy."""
    return ([prep.prompt_ids[i] for i in rows], [prep.responses[i] for i in rows],
            [token_weights(prep.rewards[i], [len(r) for r in prep.responses[i]], loss, pool_std) for i in rows],
            [prep.behavior_logp[i] for i in rows])


# ---------------------------------------------------------------------------- stores


def compute_store(policy, prep: Prepared, store: Path, names, projector, cfg: ScoreConfig, meta: dict, *,
                  resume: bool, rank: int = 0, world: int = 1, pool_std: float | None = None, bar=None,
                  transform=None) -> tuple[np.ndarray, int]:
    """Fill ``store`` with this rank's shards; return (sum of ok feature rows [k] float64, ok count)
    over this rank's shards (for target means). ``transform``: `pool_transform`'s (pool only)."""
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
            feats, status = _shard_features(policy, prep, lo, hi, names, projector, cfg, pool_std, store, c, transform)
        ok = np.array([s == "ok" for s in status])
        total += feats[ok].astype(np.float64).sum(0)
        count += int(ok.sum())
        if bar is not None:
            bar.update(hi - lo)
    return total, count


def _shard_features(policy, prep, lo, hi, names, projector, cfg: ScoreConfig, pool_std, store, c, transform=None):
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
    loss = loss_of(cfg, prep)
    for s in range(0, len(todo), cfg.batch):
        batch = todo[s : s + cfg.batch]
        args = batch_args(prep, batch, loss, pool_std)
        try:
            if isinstance(projector, kron.KronProjector):
                f, gn = loss_scaled(kron.prompt_features, policy, *args, loss, projector, cfg.micro_batch)
            elif cfg.grad_path == "per-layer":
                f, gn = loss_scaled(layer_grads.prompt_gradients, policy, *args, names, loss, projector, cfg.micro_batch,
                                    cfg.grad_checkpointing)
            else:
                f, gn = loss_scaled(prompt_gradients, policy, *args, names, loss, projector, cfg.micro_batch, transform)
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
    # the values as stored (float16-rounded with --feature-dtype float16), as a resumed run reads them
    return feats.astype(cfg.feature_dtype).astype(np.float64), status


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
    open_output(out, targets, resume, overwrite, rank, [model if policy is None else None, behavior_model])
    inputs = read_inputs(trajectories, targets, columns, split)
    policy, behavior = load_policies(model, behavior_model, cfg, device, policy)
    prep, target_preps = prepare_inputs(policy, behavior, inputs, cfg)
    cfg = dataclasses.replace(cfg, grad=loss_of(cfg, prep))  # the pool's; each target set keeps its own temperature
    names, projector, cfg, grad_path = make_projection(policy, cfg)
    pool_std = reward_std(inputs.table)
    store_meta = features_meta(model, behavior_model, policy, behavior, inputs, names, projector, cfg, grad_path)
    bar = progress(total=sum(_rows_of_rank(len(p.ids), cfg.shard_size, rank, world) for p in [prep, *target_preps]),
                   desc="score" if world == 1 else f"score rank {rank}", unit="prompt")
    target_means = target_set_means(policy, target_preps, inputs, out, names, projector, cfg, store_meta, resume=resume,
                                    rank=rank, world=world, pool_std=pool_std, bar=bar)
    compute_store(policy, prep, out / "features", names, projector, cfg,
                  {**store_meta, "source": str(inputs.pool.resolve()), "source_sha256": inputs.pool_sha256},
                  resume=resume, rank=rank, world=world, pool_std=pool_std, bar=bar, transform=pool_transform(cfg))
    bar.close()
    barrier()
    if rank != 0:
        return {}
    scores = finish_scores(out, inputs, prep, target_preps, target_means, cfg)
    meta = run_meta(store_meta, inputs, cfg, scores, n_prompts=sum(len(p.ids) for p in [prep, *target_preps]),
                    seconds=time.time() - t0, world=world)
    if cfg.check_rank:
        meta["check_rank"] = check_rank(policy, prep, target_preps, scores, names, cfg, pool_std)
    if cfg.check_influence:
        meta["check_influence"] = check_influence(policy, prep, target_preps, scores, names, cfg, pool_std)
    schema.write_json_atomic(meta, out / "meta.json")
    return meta


# ---------------------------------------------------------------------------- the steps of `score`


@dataclass
class Inputs:
    """What `cropi score` reads: the pool and the target sets (validated tables), with the target
    sets' names (``score__<name>``) and every file's sha256."""

    pool: Path
    table: pa.Table
    pool_sha256: str
    targets: list[Path]
    target_tables: list[pa.Table]
    names: list[str]
    target_sha256: list[str]


def open_output(out: Path, targets: list, resume: bool, overwrite: bool, rank: int, model_names: list) -> None:
    """Refuse a run without target sets or over existing scores (unless ``resume``); ``overwrite``
    removes OUT. Rank 0 builds the named models once, before the other ranks load them."""
    if not targets:
        raise schema.InputError(out, None, "--target", "at least one target set is needed")
    if rank == 0:
        if out.exists() and overwrite:
            shutil.rmtree(out)
        for m in model_names:
            if m:
                models.resolve(m)
    barrier()
    if (out / "meta.json").exists() and not resume:
        raise schema.InputError(out, None, None, "scores already exist here; pass --resume to continue or --overwrite to replace")


def read_inputs(trajectories, targets: list, columns: dict | None, split: str | None) -> Inputs:
    """Read and validate the pool (with the user's ``columns`` and ``split``) and the target sets,
    which must be trajectories (rolled out)."""
    pool = Path(trajectories)
    table = schema.read_table(pool, "trajectories", columns=columns, split=split)
    target_tables = []
    for p in targets:
        t = schema.read_table(p)
        if schema.detect_kind(t) != "trajectories":
            raise schema.InputError(p, None, "responses", "a target set needs responses and rewards: roll it out first (cropi rollout --prompts ...)")
        target_tables.append(schema.validate(t, "trajectories", p))
    return Inputs(pool, table, schema.content_sha256(pool), [Path(p) for p in targets], target_tables,
                  schema.target_names(targets), [schema.content_sha256(p) for p in targets])


def load_policies(model: str, behavior_model: str | None, cfg: ScoreConfig, device: str,
                  policy: models.Policy | None) -> tuple[models.Policy, models.Policy | None]:
    """The scored policy (``policy`` or ``model`` loaded, in ``cfg.dtype``, with ``cfg.adapter``)
    and the behaviour model (None without ``behavior_model``), which must share its tokenizer."""
    policy = policy or models.load(model, device=device, dtype=DTYPES.get(cfg.dtype))
    if cfg.dtype is not None:
        policy.model.to(DTYPES[cfg.dtype])
    if cfg.adapter:
        policy = with_adapter(policy, cfg.adapter)
    behavior = models.load(behavior_model, device=device) if behavior_model else None
    if behavior is not None and len(behavior.tokenizer) != len(policy.tokenizer):
        raise schema.InputError(behavior_model, None, "--behavior-model", "tokenizer differs from the scored model's")
    return policy, behavior


def prepare_inputs(policy, behavior, inputs: Inputs, cfg: ScoreConfig) -> tuple[Prepared, list[Prepared]]:
    """The pool and the target sets (each subsampled to ``cfg.max_target`` prompts, seeded by its
    name) tokenised for ``policy`` (:func:`prepare`)."""
    prep = prepare(policy, inputs.table, inputs.pool, behavior, cfg.grad.temperature)
    target_preps = [prepare(policy, _subsample(t, cfg.max_target, derive_seed(cfg.seed, "target", n)), p, behavior,
                            cfg.grad.temperature) for t, p, n in zip(inputs.target_tables, inputs.targets, inputs.names)]
    return prep, target_preps


def make_projection(policy, cfg: ScoreConfig):
    """(selected parameter names, projector, cfg with the k and gradient path that run, grad_path
    record {requested, ran, why}). The kron projector covers Linear/Embedding weights only, so
    those alone are scored and checked."""
    names = select_params(policy.model, cfg.grad.params)
    projector = None
    if cfg.projector == "kron":
        projector = kron.KronProjector(policy.model, names, cfg.k, cfg.seed, dist=cfg.dist, device=policy.device)
        names = projector.names
    d = param_dim(policy.model, names)
    if cfg.projector not in ("identity", "kron") and cfg.k > d:
        raise schema.InputError("--k", None, None, f"{cfg.k} is more than the {d} dimensions of the selected parameters "
                                f"({cfg.grad.params}): pass --k {d} or less, or --projector identity for exact gradients")
    k = d if cfg.projector == "identity" else projector.k if cfg.projector == "kron" else cfg.k
    path, why = choose_grad_path(cfg, policy.model, d)
    grad_path = {"requested": cfg.grad_path, "ran": path, "why": why}
    cfg = dataclasses.replace(cfg, k=k, grad_path=path)
    if projector is None:
        projector = make_projector(cfg.projector, d, k, cfg.seed, density=cfg.density, s=cfg.s, dist=cfg.dist,
                                   device=policy.device)
    return names, projector, cfg, grad_path


def reward_std(table: pa.Table) -> float:
    """Std (n − 1) of every reward of the pool (``adv_std: batch``); 0 with fewer than two."""
    all_rewards = np.concatenate([np.asarray(r, dtype=np.float64) for r in table.column("rewards").to_pylist()])
    return float(all_rewards.std(ddof=1)) if all_rewards.size > 1 else 0.0


def features_meta(model, behavior_model, policy, behavior, inputs: Inputs, names, projector, cfg: ScoreConfig,
                  grad_path: dict) -> dict:
    """What every features store of this run records (and resumes only with)."""
    return {
        "model": model,
        "checkpoint": policy.path,
        "fingerprint": models.fingerprint(policy.model),
        "params": cfg.grad.params,
        "n_params": param_dim(policy.model, names),
        "loss": cfg.grad.to_dict(),
        "projector": projector.meta(),
        "dtype": cfg.feature_dtype,
        "compute_dtype": str(next(policy.model.parameters()).dtype).removeprefix("torch."),
        "loss_scale": "fp16: weights x 2^16, backed off by 2^4 while a batch overflows, results divided back"
        if is_fp16(policy) else None,
        "grad_path": grad_path,
        "pool_grad": cfg.pool_grad,
        "grad_checkpointing": cfg.grad_checkpointing,
        "adapter": None if not cfg.adapter else {"path": str(cfg.adapter), "gradients": "adapter parameters only"},
        "shard_size": cfg.shard_size,
        "behavior": "stored" if behavior is None and "behavior_logprobs" in inputs.table.column_names
        else (behavior_model or "on-policy (current model)"),
    }


def _rows_of_rank(n: int, shard_size: int, rank: int, world: int) -> int:
    """How many of n prompts fall in this rank's shards (shard c belongs to rank c % world)."""
    return sum(min(shard_size, n - c * shard_size) for c in range(rank, (n + shard_size - 1) // shard_size, world))


def target_set_means(policy, target_preps: list[Prepared], inputs: Inputs, out: Path, names, projector, cfg: ScoreConfig,
                     store_meta: dict, **store_kw) -> dict[str, np.ndarray]:
    """Each target set's store (OUT/targets/<name>/, its loss at its own temperature) and its mean
    projected gradient ḡ_V over the prompts with a signal [k] float64, summed over the ranks."""
    means = {}
    for name, tp, path, sha in zip(inputs.names, target_preps, inputs.targets, inputs.target_sha256):
        tm = {**store_meta, "loss": loss_of(cfg, tp).to_dict(), "source": str(path.resolve()), "source_sha256": sha,
              "max_target": cfg.max_target}
        s, n_ok = compute_store(policy, tp, out / "targets" / name, names, projector, cfg, tm, **store_kw)
        acc = all_reduce_sum(torch.from_numpy(np.append(s, n_ok)))
        n_ok = int(acc[-1])
        if n_ok == 0:
            raise schema.InputError(path, None, "rewards", "no target prompt has a learning signal (all groups have equal rewards)")
        means[name] = (acc[:-1] / n_ok).numpy()
    return means


def finish_scores(out: Path, inputs: Inputs, prep: Prepared, target_preps: list[Prepared], target_means: dict,
                  cfg: ScoreConfig) -> pa.Table:
    """Merge every store's shard indexes and write OUT/scores.parquet (rank 0, all shards done)."""
    for name, tp in zip(inputs.names, target_preps):
        F.finalize(out / "targets" / name, (len(tp.ids) + cfg.shard_size - 1) // cfg.shard_size)
    index = F.finalize(out / "features", (len(prep.ids) + cfg.shard_size - 1) // cfg.shard_size)
    return write_scores(out, inputs.table, index, target_means, cfg.combine)


def run_meta(store_meta: dict, inputs: Inputs, cfg: ScoreConfig, scores: pa.Table, *, n_prompts: int, seconds: float,
             world: int) -> dict:
    """OUT/meta.json: the stores' settings, the inputs by path and sha256, every setting, status
    counts and timing."""
    return {
        **store_meta,
        "trajectories": str(inputs.pool.resolve()),
        "trajectories_sha256": inputs.pool_sha256,
        "targets": {n: str(p.resolve()) for n, p in zip(inputs.names, inputs.targets)},
        "targets_sha256": dict(zip(inputs.names, inputs.target_sha256)),
        "config": {**{k: v for k, v in cfg.__dict__.items() if k != "grad"}, "grad": cfg.grad.to_dict()},
        "seed": cfg.seed,
        "pool_size": inputs.table.num_rows,
        "status": schema.summarize(scores, "scores")["status"],
        "seconds": round(seconds, 2),
        "prompts_per_s": round(n_prompts / max(seconds, 1e-9), 2),
        "world_size": world,
    }


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
    loss = loss_of(cfg, prep)
    for s in range(0, len(rows), cfg.batch):
        b = rows[s : s + cfg.batch]
        f, _ = loss_scaled(prompt_gradients, policy, *batch_args(prep, b, loss, pool_std), names, loss, ident.project,
                           cfg.micro_batch)
        out[s : s + len(b)] = f.numpy()
    return out


def target_mean_gradient(policy, tp: Prepared, names, cfg: ScoreConfig, pool_std) -> torch.Tensor:
    """ḡ_V: the exact mean gradient [d] float32 (cpu) over the target set's prompts with a learning
    signal, by plain backward of their summed objective, ``cfg.batch`` prompts at a time."""
    t_ok = [i for i in range(len(tp.ids)) if not is_zero_signal(tp.rewards[i])]
    g = torch.zeros(param_dim(policy.model, names))
    loss = loss_of(cfg, tp)
    for s in range(0, len(t_ok), cfg.batch):
        b = t_ok[s : s + cfg.batch]
        g += loss_scaled(layer_grads.summed_gradient, policy, *batch_args(tp, b, loss, pool_std), names, loss,
                         cfg.micro_batch, cfg.grad_checkpointing)[0]
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
    loss = loss_of(cfg, prep)
    for s in range(0, len(rows), cfg.batch):
        b = rows[s : s + cfg.batch]
        dots, norms = loss_scaled(layer_grads.prompt_gradients, policy, *batch_args(prep, b, loss, pool_std), names, loss,
                                  inner, cfg.micro_batch, cfg.grad_checkpointing)
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
    error |measured − first-order| / |first-order| (first-order = ⟨∇J_V, Δθ⟩).

    The whole check runs in float32 on the parameters' device, whatever the scoring dtype (a step
    of ε = 1e-3 is below bfloat16's rounding of the weights): the model is made float32 for it,
    each step is float32 master copy + Δθ, and afterwards the parameters, their dtypes and the
    model's train/eval mode are restored exactly, also when the check fails."""
    ok = np.flatnonzero(np.array(scores.column("status").to_pylist()) == "ok")
    rng = np.random.default_rng(derive_seed(cfg.seed, "check-influence"))
    rows = np.sort(rng.choice(ok, min(cfg.check_influence, len(ok)), replace=False)).tolist()
    was_training = policy.model.training
    policy.model.eval()
    try:
        with models.as_float32(policy.model):
            measured, first, exact, target_grads = _influence_steps(policy, prep, target_preps, rows, names, cfg,
                                                                    pool_std)
    finally:
        policy.model.train(was_training)
    rules = _influence_rules(cfg)
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
    return {"n": len(rows), "combine": "mean of ΔJ_V / ‖∇J_V‖", "steps": out}


def _influence_rules(cfg: ScoreConfig) -> list[tuple[str, float]]:
    rules = [("normalised", float(e)) for e in cfg.influence_eps]
    if cfg.influence_lr:
        rules.append(("adam", float(cfg.influence_lr)))
    return rules


def _influence_steps(policy, prep: Prepared, target_preps: list[Prepared], rows: list[int], names, cfg: ScoreConfig,
                     pool_std):
    """check_influence's measurements at the model's current dtype and device: (measured [R, N],
    first-order [R, N], exact g_x [N, d] float64, ∇J_V per target [d] float64) for the R step rules."""
    exact = exact_gradients(policy, prep, rows, names, cfg, pool_std).astype(np.float64)  # [N, d]
    t_rows = [[i for i in range(len(tp.ids)) if not is_zero_signal(tp.rewards[i])] for tp in target_preps]
    target_preps = [_behavior_filled(policy, tp) for tp in target_preps]  # β fixed at θ
    target_grads = [target_mean_gradient(policy, tp, names, cfg, pool_std).double().numpy() for tp in target_preps]

    def objectives() -> np.ndarray:  # [V] J_V at the current parameters
        return np.array([_objective(policy, tp, t_ok, cfg, pool_std) for tp, t_ok in zip(target_preps, t_rows)])

    params = dict(policy.model.named_parameters())
    master = {n: params[n].detach().float().clone() for n in names}  # float32, on the parameter's device

    def step(delta: np.ndarray) -> np.ndarray:  # J_V(θ + delta) for flat delta [d]
        off = 0
        with torch.no_grad():
            for n in names:
                p = params[n]
                d = torch.from_numpy(delta[off : off + p.numel()]).to(device=p.device, dtype=torch.float32)
                p.copy_(master[n] + d.view_as(p))
                off += p.numel()
            try:
                return objectives()
            finally:
                for n in names:
                    params[n].copy_(master[n])

    tnorm = np.array([np.linalg.norm(g) for g in target_grads])
    base = objectives()
    rules = _influence_rules(cfg)
    measured = np.zeros((len(rules), len(rows)))
    first = np.zeros((len(rules), len(rows)))
    for j, g in enumerate(exact):
        for r, (rule, size) in enumerate(rules):
            delta = size * g / max(np.linalg.norm(g), 1e-30) if rule == "normalised" else size * np.sign(g)
            measured[r, j] = float(np.mean((step(delta) - base) / np.maximum(tnorm, 1e-30)))
            first[r, j] = float(np.mean([tg @ delta for tg in target_grads] / np.maximum(tnorm, 1e-30)))
    return measured, first, exact, target_grads


def _behavior_filled(policy, prep: Prepared) -> Prepared:
    """``prep`` with on-policy (None) behaviour log-probs replaced by the current model's, at the
    file's own temperature ``prep.temperature`` (the one its log π is taken at)."""
    todo = [i for i, b in enumerate(prep.behavior_logp) if b is None]
    if not todo:
        return prep
    flat = models.response_logprobs(policy, [prep.prompt_ids[i] for i in todo for _ in prep.responses[i]],
                                    [r for i in todo for r in prep.responses[i]], prep.temperature)
    blp, s = list(prep.behavior_logp), 0
    for i in todo:
        blp[i], s = flat[s : s + len(prep.responses[i])], s + len(prep.responses[i])
    return dataclasses.replace(prep, behavior_logp=blp)


@torch.no_grad()
def _objective(policy, prep: Prepared, rows: list[int], cfg: ScoreConfig, pool_std) -> float:
    """J_V = mean over ``rows`` of J_x(θ) = Σ_i Σ_t w_{i,t} ρ_{i,t} (the value whose gradient
    ``prompt_gradients`` takes), at the model's current parameters. float."""
    total, g = 0.0, loss_of(cfg, prep)
    for s in range(0, len(rows), cfg.batch):
        b = rows[s : s + cfg.batch]
        u = build_units(*batch_args(prep, b, g, pool_std), policy.tokenizer.pad_token_id, cfg.micro_batch)
        U, M, T = u.input_ids.shape
        lp = models.token_logprobs(policy.model, u.input_ids.view(U * M, T).to(policy.device),
                                   u.attention_mask.view(U * M, T).to(policy.device), g.temperature).cpu().view(U, M, T)
        ratio = torch.exp(torch.where(u.response_mask, lp - torch.nan_to_num(u.behavior_logp), torch.zeros_like(lp)))
        if g.ratio_clip is not None:
            ratio = ratio.clamp(max=g.ratio_clip)
        total += float((u.weight.double() * ratio.double() * u.response_mask).sum())
    return total / max(len(rows), 1)
