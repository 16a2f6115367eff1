"""Group-relative advantages and the normalised reward variance (docs/design.md).

The math that scoring (policy_grad), selection (select) and the trainer (train/) share, so it
lives below all three. Every function takes a reward table ``rewards[B, G]``: B prompts
(groups), G responses each.
"""

from __future__ import annotations

import torch
from torch import Tensor

MEANS = ("group", "batch")
STDS = ("group", "batch", "none")
BATCH_MEAN_GROUP_STD = (
    "batch mean with group std divides an all-equal group's (non-zero) batch-centred rewards "
    "by eps alone; use adv_std batch (whitening) or none, or adv_mean group"
)


def group_advantages(
    rewards: Tensor, mean: str = "group", std: str = "group", eps: float = 1e-4
) -> Tensor:
    """A = (r - mean) / (std + eps), one scalar advantage per response.

    Args:
        rewards: float [B, G].
        mean: "group" subtracts each row's mean; "batch" the mean of all B*G rewards.
        std: "group" divides by each row's std, "batch" by the std of all B*G rewards
            (Lite PPO: mean="group", std="batch"), "none" does not divide (Dr. GRPO; eps unused).
            mean="batch" with std="group" is refused: a group whose rewards are all equal has
            std 0 but a non-zero batch-centred reward, which would be divided by eps alone.
            The std is the unbiased one (Bessel, n - 1), as ``torch.std`` in the GRPO
            implementations of TRL and verl.
        eps: added to the std, not to the variance (1e-4 by default). A group whose rewards are
            all equal gets A = 0 exactly under mean="group".

    Returns:
        float [B, G], same dtype as rewards.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [B, G] with G >= 2, got shape {tuple(rewards.shape)}")
    if mean not in MEANS:
        raise ValueError(f"mean must be one of {MEANS}, got {mean!r}")
    if std not in STDS:
        raise ValueError(f"std must be one of {STDS}, got {std!r}")
    if mean == "batch" and std == "group":
        raise ValueError(BATCH_MEAN_GROUP_STD)
    if mean == "group":
        centred = rewards - rewards.mean(dim=1, keepdim=True)
    else:
        centred = rewards - rewards.mean()
    if std == "none":
        return centred
    if std == "group":
        scale = rewards.std(dim=1, keepdim=True)
    else:
        scale = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    return centred / (scale + eps)


def max_group_variance(group_size: int) -> float:
    """Largest unbiased variance of `group_size` rewards in {0, 1}: k = floor(G/2) successes.

    G/(4(G-1)) for even G, (G+1)/(4G) for odd G (VCRL's sigma^2_max).
    """
    g = group_size
    if g < 2:
        raise ValueError(f"group_size must be >= 2, got {g}")
    return g / (4 * (g - 1)) if g % 2 == 0 else (g + 1) / (4 * g)


def normalised_variance(rewards: Tensor, reward_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """VCRL's p = sigma^2 / sigma^2_max per group, the one definition used by trainer and selectors.

    sigma^2 is the unbiased variance of the row. For binary rewards in {0, 1} with k successes,
    sigma^2 = k(G-k) / (G(G-1)) and sigma^2_max = `max_group_variance(G)`, so p is in [0, 1] and
    p = 1 exactly at k = floor(G/2) or ceil(G/2).

    Non-binary rewards: the variance of G values in [lo, hi] is largest when they sit at the two
    ends in a floor(G/2) : ceil(G/2) split, so sigma^2_max is scaled by (hi - lo)^2 and p stays in
    [0, 1] for any rewards inside `reward_range`. Rewards outside it can give p > 1; pass the
    verifier's true range (e.g. (-1, 1)) when it is not [0, 1].

    Args:
        rewards: float [B, G], G >= 2.
        reward_range: (lo, hi), hi > lo, the range the rewards can take.

    Returns:
        float [B], same dtype as rewards.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [B, G] with G >= 2, got shape {tuple(rewards.shape)}")
    lo, hi = reward_range
    if not hi > lo:
        raise ValueError(f"reward_range must have hi > lo, got {reward_range}")
    var_max = max_group_variance(rewards.shape[1]) * (hi - lo) ** 2
    return rewards.var(dim=1) / var_max


def has_signal(rewards: Tensor) -> Tensor:
    """bool [B]: True where a group's rewards are not all equal (its advantages are not all zero)."""
    rewards = torch.as_tensor(rewards)
    return rewards.amax(dim=1) > rewards.amin(dim=1)
