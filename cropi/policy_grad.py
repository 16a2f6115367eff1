"""Per-prompt off-policy policy gradients, batched over prompts (docs/design.md).

For prompt x with offline responses y_1..y_G from β and rewards r_1..r_G:

    A_i     = (r_i − mean r) / (std r + 1e-4)
    ρ_{i,t} = exp(log π_θ(y_{i,t}) − log β(y_{i,t}))
    J_x(θ)  = Σ_i Σ_t w_{i,t} ρ_{i,t},  w_{i,t} = A_i / (G |y_i|)   (seq-mean-token-mean)
                                       w_{i,t} = A_i / Σ_j |y_j|    (token-mean)
    g_x     = ∇_θ J_x = Σ_{i,t} w_{i,t} ρ_{i,t} ∇ log π_θ(y_{i,t})

Truncation (``ratio_clip=c``) replaces ρ by min(ρ, c) as a constant weight on ∇ log π
(truncated importance sampling). All-equal rewards give A = 0, g_x = 0: status ``zero_signal``
and no backward at all.

Gradients of many prompts come from ONE batched forward/backward: ``torch.func.vmap`` over
"units" (a prompt's responses, or a slice of them when G exceeds ``micro_batch``) of
``grad(J_unit)``. J is linear in the responses, so a prompt's gradient is the sum of its units'
and does not depend on how its responses are micro-batched. Each parameter's per-unit gradient is
summed per prompt and handed to the projector block by block (``projector.project(g, offset)``),
so the flat d-dim gradient of a prompt is never materialised unless the projector is exact.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from torch.func import functional_call, grad, vmap

from cropi import models
from cropi.advantages import group_advantages
from cropi.config import check_fields, option
from cropi.projection import Accumulator, Projector

AGGREGATIONS = ("seq-mean-token-mean", "token-mean")
ADV_STDS = ("group", "batch", "none")


@dataclass(frozen=True)
class GradConfig:
    """Loss settings of the per-prompt objective (recorded in the features' meta.json); checked
    when made (`cropi.config.check_fields`)."""

    aggregation: str = option("seq-mean-token-mean", "How a response's token terms are averaged.",
                              choices=AGGREGATIONS)
    adv_std: str = option("group", "Advantage scale: the group's reward std, the std of all pool "
                                   "rewards (batch), or none (Dr. GRPO).", choices=ADV_STDS)
    adv_eps: float = option(1e-4, "Added to the std in A = (r - mean) / (std + eps).", lo=0)
    ratio_clip: float | None = option(None, "Truncate importance ratios at c (None: no truncation).",
                                      lo=0, lo_open=True)
    temperature: float = option(1.0, "Temperature of log pi (the rollout's).", lo=0, lo_open=True)
    params: str = option("all", "all | last:N | a regex on parameter names.")

    def __post_init__(self):
        check_fields(self)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------- parameters


def check_params_spec(spec: str) -> str:
    """Raise ValueError unless ``spec`` is ``all``, ``last:N`` with an integer N ≥ 1, or a
    regular expression that compiles. Returns ``spec``."""
    if spec.startswith("last:"):
        n = spec.split(":", 1)[1]
        if not (n.isdigit() and int(n) >= 1):
            raise ValueError(f"params {spec!r}: last:N needs a whole number N ≥ 1 of blocks")
    elif spec != "all":
        try:
            re.compile(spec)
        except re.error as e:
            raise ValueError(f"params {spec!r}: not a regular expression ({e})") from None
    return spec


def select_params(model: torch.nn.Module, spec: str = "all") -> list[str]:
    """Names of the trainable parameters whose gradient is taken.

    ``all``; ``last:N`` = the last N transformer blocks (parameters named ``...layers.<i>.`` or
    ``...h.<i>.`` with the N largest i); otherwise a regular expression searched in the name.
    """
    check_params_spec(spec)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if spec == "all":
        return names
    if spec.startswith("last:"):
        n = int(spec.split(":", 1)[1])
        idx = {}
        for name in names:
            m = re.search(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.", name)
            if m:
                idx[name] = int(m.group(1))
        if not idx:
            raise ValueError(f"params {spec!r}: no numbered transformer blocks found in the model")
        keep = sorted(set(idx.values()))[-n:]
        return [name for name in names if idx.get(name) in keep]
    pat = re.compile(spec)
    sel = [n for n in names if pat.search(n)]
    if not sel:
        raise ValueError(f"params {spec!r} matches no parameter")
    return sel


def param_dim(model, names: list[str]) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


# ---------------------------------------------------------------------------- objective weights


def is_zero_signal(rewards) -> bool:
    """All rewards equal (or a single response): every advantage is 0, so g_x = 0."""
    return len(rewards) < 2 or max(rewards) - min(rewards) == 0


def advantages(rewards: list[float], cfg: GradConfig, pool_std: float | None = None) -> torch.Tensor:
    """A_i for one prompt's G rewards [G] float64 (group mean; std per ``cfg.adv_std``)."""
    r = torch.tensor([rewards], dtype=torch.float64)
    if cfg.adv_std == "batch":
        if pool_std is None:
            raise ValueError("adv_std='batch' needs the pool's reward std")
        return group_advantages(r, "group", "none")[0] / (pool_std + cfg.adv_eps)
    return group_advantages(r, "group", cfg.adv_std, cfg.adv_eps)[0]


def token_weights(rewards: list[float], lengths: list[int], cfg: GradConfig, pool_std=None) -> list[float]:
    """w_i such that J_x = Σ_i Σ_t w_i ρ_{i,t} (one weight per response, constant over its tokens)."""
    A = advantages(rewards, cfg, pool_std)
    G = len(rewards)
    if cfg.aggregation == "seq-mean-token-mean":
        return [float(A[i]) / (G * max(lengths[i], 1)) for i in range(G)]
    total = max(sum(lengths), 1)
    return [float(A[i]) / total for i in range(G)]


# ---------------------------------------------------------------------------- batched gradients


@dataclass
class Units:
    """Padded tensors for vmap: U units × M responses × T tokens."""

    input_ids: torch.Tensor  # [U, M, T] long
    attention_mask: torch.Tensor  # [U, M, T] long
    response_mask: torch.Tensor  # [U, M, T] bool: positions holding response tokens
    weight: torch.Tensor  # [U, M, T] float32: w_{i,t} (0 off the response)
    behavior_logp: torch.Tensor  # [U, M, T] float32: log β at response positions
    owner: torch.Tensor  # [U] long: which prompt of the batch each unit belongs to


def build_units(prompt_ids: list[list[int]], responses: list[list[list[int]]], weights: list[list[float]],
                behavior_logp: list[list[list[float]] | None], pad_id: int, micro_batch: int) -> Units:
    """Cut each prompt's responses into units of at most ``micro_batch`` and pad all to [U, M, T].
    A ``None`` behaviour entry means "on-policy": its log-probs stay NaN and the objective uses
    ρ = 1 there (``_unit_objective``)."""
    units = []
    for p, (pid, resps, ws, blp) in enumerate(zip(prompt_ids, responses, weights, behavior_logp)):
        for s in range(0, len(resps), micro_batch):
            units.append((p, pid, resps[s : s + micro_batch], ws[s : s + micro_batch],
                          None if blp is None else blp[s : s + micro_batch]))
    U = len(units)
    M = max(len(u[2]) for u in units)
    T = max(len(u[1]) + len(r) for u in units for r in u[2])
    ids = torch.full((U, M, T), pad_id, dtype=torch.long)
    attn = torch.zeros((U, M, T), dtype=torch.long)
    rmask = torch.zeros((U, M, T), dtype=torch.bool)
    w = torch.zeros((U, M, T), dtype=torch.float32)
    blp = torch.full((U, M, T), float("nan"), dtype=torch.float32)
    owner = torch.empty(U, dtype=torch.long)
    for u, (p, pid, resps, ws, bl) in enumerate(units):
        owner[u] = p
        for m, r in enumerate(resps):
            L = len(pid) + len(r)
            ids[u, m, :L] = torch.tensor(list(pid) + list(r))
            attn[u, m, :L] = 1
            rmask[u, m, len(pid) : L] = True
            w[u, m, len(pid) : L] = ws[m]
            if bl is not None:
                blp[u, m, len(pid) : L] = torch.tensor(bl[m], dtype=torch.float32)
        for m in range(len(resps), M):  # padding responses: one dummy token keeps the mask non-empty
            attn[u, m, 0] = 1
    return Units(ids, attn, rmask, w, blp, owner)


def sq_norms(x: torch.Tensor) -> torch.Tensor:
    """‖x_i‖² of the rows of x [B, ...] as float64 [B] (cpu): float32 products, summed in cascade
    (relative error ~1e-7, without a float64 copy of x)."""
    x = x.reshape(x.shape[0], -1)
    return torch.linalg.vecdot(x, x).double().cpu()


def logits_window(model, rmask: torch.Tensor) -> int | None:
    """How many final positions of a [..., T] batch need logits: from the one before the earliest
    response token to the end (logits of prompt positions are not part of J). None = all, for a
    model whose forward takes no ``logits_to_keep``."""
    if not models.takes_logits_to_keep(model) or not rmask.any():
        return None
    first = int(rmask.reshape(-1, rmask.shape[-1]).any(0).nonzero()[0])
    return rmask.shape[-1] - first + 1


def _unit_objective(model, params: dict, buffers: dict, ids, attn, rmask, weight, blp, temperature, ratio_clip,
                    keep: int | None = None):
    """J of one unit: Σ_{m,t} w ρ (as Σ w·sg[ρ]·log π, whose gradient is the same). Scalar.
    ``keep`` (:func:`logits_window`): logits for the last ``keep`` positions only; None = all."""
    kwargs = {"attention_mask": attn, "use_cache": False}
    if keep is not None:
        kwargs["logits_to_keep"] = keep
    out = functional_call(model, (params, buffers), (ids,), kwargs)
    logits = out.logits[:, :-1].float()
    if temperature != 1.0:  # no copy of the [N, T, V] logits at T = 1
        logits = logits / temperature
    s = ids.shape[-1] - logits.shape[-2]  # first predicted position: logits[:, j] predicts ids[:, s + j]
    ids, rmask, weight, blp = ids[:, s:], rmask[:, s:], weight[:, s:], blp[:, s:]
    lp = torch.gather(logits, -1, ids[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
    # NaN behaviour log-probs = on-policy: β is this very forward, so ρ = 1 exactly (in any dtype;
    # a separate forward for β would differ in its last bf16 bits)
    off_policy = rmask & ~torch.isnan(blp)
    log_ratio = torch.where(off_policy, lp.detach() - torch.nan_to_num(blp), torch.zeros_like(lp))
    ratio = torch.exp(log_ratio)
    if ratio_clip is not None:
        ratio = ratio.clamp(max=ratio_clip)
    return (weight * ratio * torch.where(rmask, lp, torch.zeros_like(lp))).sum()


class _EagerAttention:
    """vmap needs the plain-PyTorch attention path; restore the model's own afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        cfg = self.model.config
        self.old = getattr(cfg, "_attn_implementation", None)
        if self.old not in (None, "eager"):
            self.model.set_attn_implementation("eager")

    def __exit__(self, *exc):
        if self.old not in (None, "eager"):
            self.model.set_attn_implementation(self.old)


def unit_gradients(policy: models.Policy, units: Units, names: list[str], cfg: GradConfig) -> dict[str, torch.Tensor]:
    """Per-unit gradients {name: [U, *param.shape]} from one vmapped forward/backward."""
    model = policy.model
    dev = policy.device
    all_params = dict(model.named_parameters())
    params = {n: all_params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in all_params.items() if n not in params}
    buffers = {**{n: b for n, b in model.named_buffers()}, **frozen}
    ids, attn = units.input_ids.to(dev), units.attention_mask.to(dev)
    rmask, w, blp = units.response_mask.to(dev), units.weight.to(dev), units.behavior_logp.to(dev)

    keep = logits_window(model, units.response_mask)

    def f(p, i, a, r, ww, b):
        return _unit_objective(model, p, buffers, i, a, r, ww, b, cfg.temperature, cfg.ratio_clip, keep)

    was_training = model.training
    model.eval()
    try:
        with _EagerAttention(model):
            return vmap(grad(f), in_dims=(None, 0, 0, 0, 0, 0))(params, ids, attn, rmask, w, blp)
    finally:
        model.train(was_training)


def prompt_gradients(policy: models.Policy, prompt_ids, responses, weights, behavior_logp, names: list[str],
                     cfg: GradConfig, project, micro_batch: int = 64, transform=None):
    """Project the gradients g_x of a batch of P prompts.

    Args:
        prompt_ids: P lists of prompt token ids; responses: P lists of G_x response id lists;
        weights: P lists of G_x per-response weights (``token_weights``); behavior_logp: P lists of
        G_x per-token log β lists, or None per prompt for on-policy;
        project: a Projector (any kind: trak gets its whole vectors assembled), or a
        callable(block [P, n] float32, offset) -> [P, k] contribution (a Projector.project);
        transform: elementwise map of each prompt's summed gradient before projection (e.g.
        torch.sign), or None.
    Returns:
        features [P, k] float32, grad_norm [P] float64 (‖g_x‖₂ of the plain gradient, exact).
    """
    units = build_units(prompt_ids, responses, weights, behavior_logp, policy.tokenizer.pad_token_id, micro_batch)
    grads = unit_gradients(policy, units, names, cfg)
    P = len(prompt_ids)
    owner = units.owner.to(policy.device)
    acc = Accumulator(project, P) if isinstance(project, Projector) else None
    feats, sq, offset = None, torch.zeros(P, dtype=torch.float64), 0
    for n in names:
        g = grads.pop(n)
        g = g.reshape(g.shape[0], -1).float()
        if g.shape[0] != P or not torch.equal(owner, torch.arange(P, device=owner.device)):
            g = torch.zeros(P, g.shape[1], device=g.device).index_add_(0, owner, g)
        sq += sq_norms(g)
        if transform is not None:
            g = transform(g)
        if acc is not None:
            acc.add(g, offset)
        else:
            part = project(g, offset)
            feats = part if feats is None else feats + part
        offset += g.shape[1]
    if acc is not None:
        feats = acc.result()
    return feats.float().cpu(), sq.sqrt()
