"""Offline rollouts: G sampled responses per prompt with rewards and behaviour log-probs.

The pool is cut into fixed chunks of ``chunk`` prompts; chunk c is sampled with a generator
seeded by ``derive_seed(seed, "rollout", c)`` so the result does not depend on where a run was
interrupted. Finished chunks are kept in ``OUT.parts/`` and a resumed run (``resume=True``)
samples only what is missing, then the chunks are concatenated into OUT atomically.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cropi import models, rewards, schema
from cropi.distributed import barrier
from cropi.runtime import MAX_NEW_TOKENS, derive_seed, progress


def rollout_rows(policy: models.Policy, rows: list[dict], *, n: int, temperature: float, max_new_tokens: int,
                 seed: int, top_p: float = 1.0, micro_batch: int = 512, verifier: str = "auto",
                 partial: bool = False) -> dict[str, list]:
    """Sample ``n`` responses for each prompt row (one batched loop), reward and score them
    (``verifier``, ``partial``: see :func:`cropi.rewards.reward`).

    Returns columns: responses [P][n] str, rewards [P][n] float, response_token_ids [P][n][L_ij],
    behavior_logprobs [P][n][L_ij] (:func:`sampler_logprobs`: a fresh forward pass, the
    distribution sampled from)."""
    prompt_ids = models.encode_prompts(policy, [r["prompt"] for r in rows])
    flat_prompts = [p for p in prompt_ids for _ in range(n)]
    g = models.generator(policy, seed)
    resp_ids: list[list[int]] = []
    for s in range(0, len(flat_prompts), micro_batch):
        resp_ids += models.sample(policy, flat_prompts[s : s + micro_batch], temperature=temperature,
                                  max_new_tokens=max_new_tokens, generator=g, top_p=top_p)
    texts = models.decode_responses(policy, resp_ids)
    flat_rows = [r for r in rows for _ in range(n)]
    rew = rewards.rewards(texts, flat_rows, verifier=verifier, partial=partial)
    logps = sampler_logprobs(policy, flat_prompts, resp_ids, temperature, top_p)

    def group(xs):
        return [xs[i * n : (i + 1) * n] for i in range(len(rows))]

    return {
        "responses": group(texts),
        "rewards": group([float(x) for x in rew]),
        "response_token_ids": group(resp_ids),
        "behavior_logprobs": group(logps),
    }


# Recorded in a trajectories file's metadata ("behavior_logprobs"): its stored log-probs are those of
# the distribution sampled from. Files without it stored log π at T even when top_p < 1.
SAMPLER_LOGPROBS = "sampled distribution: softmax(logits / temperature), top-p nucleus renormalised"


@torch.no_grad()
def sampler_logprobs(policy: models.Policy, prompt_ids, response_ids, temperature: float, top_p: float = 1.0,
                     micro_batch: int = 64) -> list[list[float]]:
    """log β(y_t) of each response token under the distribution :func:`cropi.models.sample` draws
    from: softmax(logits / temperature), cut to its top-p nucleus and renormalised when top_p < 1
    (log β = log π_T(y_t) − log Σ_{v ∈ nucleus} π_T(v)). A fresh forward pass; a sampled token
    that a float difference puts just outside the recomputed nucleus counts as inside it.
    Per response a list of floats (float32 values)."""
    if top_p >= 1.0:
        return models.response_logprobs(policy, prompt_ids, response_ids, temperature, micro_batch)
    out: list[list[float]] = []
    pad = policy.tokenizer.pad_token_id
    for s in range(0, len(prompt_ids), micro_batch):
        ids, attn, rmask = models.pack(prompt_ids[s : s + micro_batch], response_ids[s : s + micro_batch], pad,
                                       policy.device)
        logits = policy.model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        at = rmask[:, 1:].nonzero()  # [M, 2]: logits[:, j] predict ids[:, j + 1], a response token
        rows = max(1, models.LOGIT_CHUNK // logits.shape[-1])
        lps = []
        for c in range(0, at.shape[0], rows):
            i, j = at[c : c + rows].unbind(1)
            lg = logits[i, j].float() / temperature  # [m, V]
            target = ids[i, j + 1]
            logp = torch.log_softmax(lg, -1)
            kept = models._top_p(logp.exp(), top_p) > 0
            kept[torch.arange(len(target)), target] = True
            lps.append(logp.gather(-1, target[:, None]).squeeze(-1) - torch.logsumexp(logp.masked_fill(~kept, -torch.inf), -1))
        lp = torch.cat(lps).cpu() if lps else torch.zeros(0)
        counts = rmask.sum(1).tolist()
        out += [x.tolist() for x in lp.split(counts)]
    return out


def rollout(prompts_path, out, *, model: str = models.TINY, n: int = 8, temperature: float = 1.0,
            max_new_tokens: int = MAX_NEW_TOKENS, seed: int = 0, chunk: int = 64, top_p: float = 1.0,
            resume: bool = False, device: str = "cpu", limit: int | None = None, rank: int = 0, world: int = 1,
            verifier: str = "auto", partial: bool = False, columns: dict | None = None, split: str | None = None) -> Path:
    """Roll out every prompt of ``prompts_path`` and write a trajectories Parquet file to ``out``.
    ``columns`` and ``split`` select what is read (`schema.read_table`).

    With ``world > 1`` this process samples only the chunks c with c % world == rank and leaves
    them in OUT.parts/; the caller merges once all ranks are done (see :func:`merge_parts`)."""
    prompts_path, out = Path(prompts_path), Path(out)
    schema.output_format(out, ("parquet",))
    rewards.uses_math("", verifier)  # an unknown verifier fails before the model loads
    table = schema.prompt_columns(schema.read_table(prompts_path, columns=columns, split=split))
    if limit is not None:
        table = table.slice(0, limit)
    parts = _parts_dir(out)
    if rank == 0:
        models.resolve(model)  # builds the tiny default once, before the other ranks load it
        if parts.exists() and not resume:
            shutil.rmtree(parts)  # a fresh run starts over
    barrier()
    policy = models.load(model, device=device)
    meta = {
        "kind": "trajectories",
        "prompts": str(prompts_path.resolve()),
        "prompts_sha256": schema.content_sha256(prompts_path),
        "model": model,
        "model_path": policy.path,
        "fingerprint": models.fingerprint(policy.model),
        "chat_template": policy.chat_template,
        "n": n,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "chunk": chunk,
        "rows": table.num_rows,
        "verifier": verifier,
        "partial_credit": partial,
        "behavior_logprobs": SAMPLER_LOGPROBS,
    }
    parts.mkdir(parents=True, exist_ok=True)
    _check_parts_meta(parts, meta, out)
    behavior = f"{model}@{meta['fingerprint']}"
    n_chunks = (table.num_rows + chunk - 1) // chunk
    mine = [c for c in range(n_chunks) if c % world == rank]
    todo = [c for c in mine if not (parts / f"chunk-{c:06d}.parquet").exists()]
    rows_of = lambda c: min(chunk, table.num_rows - c * chunk)  # noqa: E731  (the last chunk is short)
    bar = progress(total=sum(map(rows_of, mine)), initial=sum(rows_of(c) for c in mine if c not in todo),
                   desc=f"rollout{'' if world == 1 else f' rank {rank}'}", unit="prompt")
    for c in todo:
        rows_tbl = table.slice(c * chunk, chunk)
        cols = rollout_rows(policy, rows_tbl.to_pylist(), n=n, temperature=temperature,
                            max_new_tokens=max_new_tokens, seed=derive_seed(seed, "rollout", c), top_p=top_p,
                            verifier=verifier, partial=partial)
        part = rows_tbl
        for name, values in cols.items():
            part = part.append_column(name, pa.array(values, type=schema.TRAJECTORY_SCHEMA.field(name).type))
        part = part.append_column("behavior", pa.array([behavior] * part.num_rows, pa.string()))
        schema.write_parquet_atomic(part, parts / f"chunk-{c:06d}.parquet")
        bar.update(rows_tbl.num_rows)
    bar.close()
    if world == 1:
        merge_parts(out, n_chunks)
    return out


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _check_parts_meta(parts: Path, meta: dict, out: Path) -> None:
    f = parts / "meta.json"
    if f.exists():
        old = schema.read_json(f)
        diff = sorted(k for k in meta if k != "prompts" and old.get(k) != meta[k])  # prompts: by content (sha256)
        if diff:
            raise schema.InputError(out, None, None, f"--resume: unfinished parts were made with other settings ({', '.join(diff)}); remove {parts} or match them")
    else:
        schema.write_json_atomic(meta, f)


def merge_parts(out, n_chunks: int | None = None) -> Path:
    """Concatenate OUT.parts/chunk-*.parquet (in chunk order) into OUT, atomically; remove parts."""
    out = Path(out)
    parts = _parts_dir(out)
    meta = schema.read_json(parts / "meta.json")
    files = sorted(parts.glob("chunk-*.parquet"))
    if n_chunks is not None and len(files) != n_chunks:
        raise RuntimeError(f"{parts}: {len(files)} of {n_chunks} chunks present; re-run with --resume")
    table = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
    if table is None:
        raise RuntimeError(f"{parts}: no chunks")
    table = table.replace_schema_metadata(None)
    schema.write_parquet_atomic(table, out, metadata=meta)
    shutil.rmtree(parts)
    return out


def rollout_meta(path) -> dict:
    """Settings a trajectories file was sampled with ({} for files cropi did not write)."""
    return schema.read_cropi_meta(path) if Path(path).suffix in (".parquet", ".pq") else {}
