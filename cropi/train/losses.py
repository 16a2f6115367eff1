"""The GRPO surrogate and its options, as pure batched torch functions (docs/design.md).

Shapes: N responses in the batch (B prompts x G, flattened), L = padded response length.
``logp``, ``old_logp``, ``ref_logp``: float [N, L], log-probabilities (nats) of the sampled
response tokens under the current, rollout and reference policies. ``mask``: [N, L], bool or
0/1, true on response tokens that count. Log-probs under a false mask (padding) touch neither
the loss nor its gradient, whatever they hold. Losses are to be minimised.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
RATIO_LEVELS = ("token", "sequence")


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: str,
    *,
    norm_len: int | None = None,
    total: float | None = None,
) -> Tensor:
    """Average per-token values [N, L] into a scalar.

    Modes:
        token-mean:               sum_{i,t} v / (number of unmasked tokens).
        seq-mean-token-mean:      mean over responses of (sum_t v / |y_i|).
        seq-mean-token-sum-norm:  mean over responses of (sum_t v / norm_len) (Dr. GRPO). norm_len
            is a constant that must not depend on the batch: pass the generation budget
            (max_new_tokens); None uses L, which changes with padding.
    Responses with no unmasked token (e.g. truncated ones, dropped) are left out of the means.

    total: the denominator of the whole batch (token count for token-mean, count of non-empty
        responses for the seq modes) when `values` is one micro-batch of it; the micro-batch
        losses then sum to the full-batch loss. None: this batch's own denominator.
    """
    m = mask.to(values.dtype)
    masked = torch.where(m > 0, values, torch.zeros_like(values))
    if mode == "token-mean":
        denom = m.sum() if total is None else torch.as_tensor(total, dtype=values.dtype)
        return masked.sum() / denom.clamp(min=1)
    lengths = m.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(dim=-1) / lengths.clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        per_seq = masked.sum(dim=-1) / float(norm_len if norm_len is not None else values.shape[-1])
    else:
        raise ValueError(f"loss aggregation must be one of {AGG_MODES}, got {mode!r}")
    rows = (
        (lengths > 0).sum().to(values.dtype)
        if total is None
        else torch.as_tensor(total, dtype=values.dtype)
    )
    return per_seq.sum() / rows.clamp(min=1)


def token_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """log pi_theta - log pi_old per token [N, L]; 0 where masked."""
    keep = mask.bool()
    return torch.where(keep, logp - old_logp, torch.zeros_like(logp))


def sequence_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO's sequence ratio s_i = exp(mean_t (log pi_theta - log pi_old)), broadcast per token.

    Returned in GSPO-token's straight-through form s_{i,t} = sg[s_i] * pi_theta(y_t) / sg[pi_theta(y_t)]
    (sg = stop-gradient): every token of response i has the value s_i, and d s_{i,t} = s_i * d log pi(y_t).
    Averaged over the response's tokens (loss_agg="seq-mean-token-mean", as in GSPO) the gradient
    is exactly d s_i; with equal advantages over a response GSPO-token equals GSPO.

    Returns: float [N, L]; 1 where masked (no gradient there).
    """
    keep = mask.bool()
    lengths = keep.sum(dim=-1).clamp(min=1)
    seq_log = token_log_ratio(logp, old_logp, mask).sum(dim=-1) / lengths  # [N]
    live = torch.where(keep, logp, torch.zeros_like(logp))
    st = seq_log.detach()[:, None] + live - live.detach()
    return torch.exp(torch.where(keep, st, torch.zeros_like(st)))


KL_LOG_RATIO_CAP = 20.0  # |ref - logp| is clamped to this before exp (verl's low_var_kl)
KL_K3_CAP = 10.0  # and the k3 value to [-this, this]


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimate of KL(pi_theta || pi_ref) per sampled token: e^x - x - 1, x = ref - logp.

    Non-negative, 0 iff the two log-probs are equal; gradient flows through logp only if ref_logp
    is detached by the caller (the reference is frozen). Bounded as verl's ``low_var_kl``: x is
    clamped to +-KL_LOG_RATIO_CAP and the result to +-KL_K3_CAP, so a token the reference finds
    far likelier (x > 88 overflows float32's exp) gives 10, not inf; where a clamp is active the
    token's KL term has no gradient. Returns float [N, L] (nats).
    """
    x = (ref_logp - logp).clamp(-KL_LOG_RATIO_CAP, KL_LOG_RATIO_CAP)
    return (torch.exp(x) - x - 1).clamp(-KL_K3_CAP, KL_K3_CAP)


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, a reward term per response.

    0 for |y| <= max_len - buffer; (max_len - buffer - |y|) / buffer inside the last `buffer`
    tokens (a linear ramp reaching -1 at |y| = max_len); -1 beyond max_len. Times `factor`.
    max_len is the generation budget (max_new_tokens); lengths: int [N] (tokens).
    Returns float32 [N].
    """
    if not 1 <= buffer <= max_len:
        raise ValueError(f"buffer must be in [1, max_len={max_len}], got {buffer}")
    lengths = torch.as_tensor(lengths).to(torch.float32)
    ramp = ((max_len - buffer) - lengths) / buffer
    return factor * ramp.clamp(min=-1.0, max=0.0)


def mask_truncated(mask: Tensor, truncated: Tensor) -> Tensor:
    """Overlong filtering: zero the mask rows of responses cut at the budget. truncated: bool [N]."""
    keep = ~truncated.bool()[:, None]
    return mask & keep if mask.dtype == torch.bool else mask * keep.to(mask.dtype)


def rl_plus_token_weights(
    logp: Tensor, old_logp: Tensor, omega_logp: Tensor | float, gamma: float = 0.5
) -> Tensor:
    """RL-PLUS per-token weight of an external demonstration: r^m * C (arXiv 2508.00222).

    r^m = pi_theta / (1/2 pi_old + 1/2 omega)   multiple-importance ratio; the gradient flows
          through pi_theta (numerator); pi_old and omega are constants.
    C   = (1 - sg[pi_theta])^gamma               exploration factor, detached as in the paper
          ("detach" in its definition of the exploration-based advantage A^c = A * C).
    The demonstration's surrogate is then r^m * A * C, unclipped (`policy_loss` with `demo`).

    omega_logp: log-probability of the demonstration token under the external policy. For a
    fixed reference solution the external policy is deterministic: pass 0 (omega = 1). (The
    public RL-PLUS code instead plugs in omega = (pi_old + 1) / 2.)

    All inputs float [N, L] (omega_logp may be a scalar); returns float [N, L].
    """
    omega_logp = torch.as_tensor(omega_logp, dtype=logp.dtype, device=logp.device).expand_as(logp)
    log_mix = torch.logaddexp(old_logp, omega_logp) - torch.log(torch.tensor(2.0, dtype=logp.dtype))
    r_m = torch.exp(logp - log_mix)
    explore = (1 - torch.exp(logp.detach())).clamp(min=0) ** gamma
    return r_m * explore


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    ratio_level: str = "token",
    agg: str = "token-mean",
    ref_logp: Tensor | None = None,
    kl_beta: float = 0.0,
    token_weight: Tensor | None = None,
    demo: Tensor | None = None,
    norm_len: int | None = None,
    total: float | None = None,
) -> tuple[Tensor, dict]:
    """Clipped GRPO surrogate (+ beta * k3 KL), aggregated: returns (loss scalar, stats).

    Per token: -min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A) + kl_beta * k3, where
    rho is exp(logp - old_logp) (ratio_level="token") or GSPO's `sequence_ratio`.
    A response marked in `demo` (RL-PLUS external demonstration) uses -token_weight * A instead
    (the weight from `rl_plus_token_weights`, unclipped as in RL-PLUS).

    Args:
        adv: float [N] advantage per response (broadcast over its tokens).
        demo: bool [N] or None; token_weight: float [N, L], required when demo is given.
        norm_len, total: passed to `aggregate`.

    Stats (python floats, over unmasked tokens of non-demo responses unless noted):
        clip_frac (clipped branch active: no gradient), clip_low_frac (A<0, rho<1-clip_low),
        clip_high_frac (A>0, rho>1+clip_high), ratio_mean, ratio_min, ratio_max,
        kl (mean k3 over all unmasked tokens; 0 without ref_logp), pg_loss (aggregated surrogate),
        n_tokens, demo_weight_mean (mean token_weight over demo tokens; 0 without demos).
    """
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    keep = mask.bool()
    if ratio_level == "token":
        ratio = torch.exp(token_log_ratio(logp, old_logp, mask))
    else:
        ratio = sequence_ratio(logp, old_logp, mask)
    a = adv.to(logp.dtype)[:, None]
    unclipped = -ratio * a
    clipped = -ratio.clamp(1 - clip_low, 1 + clip_high) * a
    per_token = torch.maximum(unclipped, clipped)

    on_policy = keep
    if demo is not None:
        if token_weight is None:
            raise ValueError("policy_loss: `demo` needs `token_weight` (see rl_plus_token_weights)")
        is_demo = demo.bool()[:, None].expand_as(keep)
        per_token = torch.where(is_demo, -token_weight * a, per_token)
        on_policy = keep & ~is_demo
    pg = aggregate(per_token, mask, agg, norm_len=norm_len, total=total)
    loss = pg
    kl = None
    if ref_logp is not None:
        zero = torch.zeros_like(logp)
        kl = kl_k3(torch.where(keep, logp, zero), torch.where(keep, ref_logp, zero))
        if kl_beta:
            loss = loss + kl_beta * aggregate(kl, mask, agg, norm_len=norm_len, total=total)
    elif kl_beta:
        raise ValueError("policy_loss: kl_beta > 0 needs ref_logp")

    with torch.no_grad():
        n_on = on_policy.sum().clamp(min=1)
        low = on_policy & (a < 0) & (ratio < 1 - clip_low)
        high = on_policy & (a > 0) & (ratio > 1 + clip_high)
        r_on = ratio[on_policy]
        stats = {
            "clip_frac": ((low | high).sum() / n_on).item(),
            "clip_low_frac": (low.sum() / n_on).item(),
            "clip_high_frac": (high.sum() / n_on).item(),
            "ratio_mean": r_on.mean().item() if r_on.numel() else 1.0,
            "ratio_min": r_on.min().item() if r_on.numel() else 1.0,
            "ratio_max": r_on.max().item() if r_on.numel() else 1.0,
            "kl": (kl[keep].mean().item() if keep.any() else 0.0) if kl is not None else 0.0,
            "pg_loss": pg.item(),
            "n_tokens": int(keep.sum().item()),
            "demo_weight_mean": 0.0,
        }
        if demo is not None:
            w = token_weight[keep & ~on_policy]
            stats["demo_weight_mean"] = w.mean().item() if w.numel() else 0.0
    return loss, stats
