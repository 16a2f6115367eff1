"""Every option of the GRPO trainer, defined once (docs/design.md).

`TrainConfig` is the single source: its fields carry their help text and allowed values,
`validate()` checks them, and `click_options` turns them into CLI flags, so a new option
is added in exactly one place.

Typical recipes (field values):
- GRPO:      adv_mean=group, adv_std=group, loss_agg=token-mean
- Dr. GRPO:  adv_std=none, loss_agg=seq-mean-token-sum-norm (constant = max_new_tokens)
- Lite PPO:  adv_mean=group, adv_std=batch, loss_agg=token-mean
- DAPO:      clip_high=0.28, dynamic_sampling, overlong_penalty, loss_agg=token-mean, mu_updates>=2
- GSPO:      ratio_level=sequence, loss_agg=seq-mean-token-mean, clip_low=3e-4, clip_high=4e-4,
             mu_updates>=2

The clip range and the ratio level act only from the second of `mu_updates` updates on: the
first update's importance ratio is exactly 1 (old log-probs come from the same pass), so it is
never clipped and a sequence ratio has the token ratio's gradient. `validate` therefore refuses
clip_low, clip_high or ratio_level away from their defaults with mu_updates=1 (DAPO and GSPO
take several mini-batch updates per generated batch). It also refuses adv_mean=batch with
adv_std=group (see `advantages.group_advantages`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

import click

from cropi.advantages import BATCH_MEAN_GROUP_STD
from cropi.runtime import MAX_NEW_TOKENS

ADV_MEAN = ("group", "batch")
ADV_STD = ("group", "batch", "none")
RATIO_LEVELS = ("token", "sequence")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
RL_PLUS_OMEGAS = ("one", "old")
LR_SCHEDULES = ("constant", "cosine")


def _opt(default, help: str, choices: tuple[str, ...] | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """GRPO trainer settings; units are stated in each field's help."""

    # advantages
    adv_mean: str = _opt(
        "group", "Baseline: mean reward over the prompt's group or the whole batch.", ADV_MEAN
    )
    adv_std: str = _opt(
        "group", "Scale: std (unbiased) over the group, the batch, or none (Dr. GRPO).", ADV_STD
    )
    adv_eps: float = _opt(1e-4, "Added to the std in A = (r - mean) / (std + eps).")
    # surrogate
    clip_low: float = _opt(0.2, "PPO clip epsilon below 1: ratios under 1 - clip_low are clipped.")
    clip_high: float = _opt(0.2, "PPO clip epsilon above 1 (clip-higher, DAPO: 0.28).")
    ratio_level: str = _opt(
        "token", "Importance ratio per token, or per sequence (GSPO).", RATIO_LEVELS
    )
    loss_agg: str = _opt("token-mean", "How per-token losses are averaged.", LOSS_AGGS)
    mask_truncated: bool = _opt(
        False, "Drop responses cut at max_new_tokens from the loss (overlong filtering)."
    )
    overlong_penalty: bool = _opt(False, "Add DAPO's soft overlong penalty to the reward.")
    overlong_buffer: int = _opt(
        4, "Tokens before max_new_tokens where the soft penalty ramps from 0 to -1."
    )
    overlong_penalty_factor: float = _opt(1.0, "Scale of the soft overlong penalty (reward units).")
    kl_beta: float = _opt(
        0.0, "Weight of the k3 KL estimate to the frozen reference policy (0: no reference)."
    )
    mu_updates: int = _opt(1, "Optimiser updates per generated batch (mu).")
    # sampling
    dynamic_sampling: bool = _opt(
        False,
        "Drop groups whose responses all pass or all fail (correctness, not penalty-shaped "
        "rewards) and refill from the shard.",
    )
    max_refill: int = _opt(
        3, "Most extra generation rounds per step when dynamic sampling or VCRL refills."
    )
    vcrl: bool = _opt(
        False,
        "VCRL: keep groups whose normalised variance of correctness p >= vcrl_kappa; replay "
        "from a bank.",
    )
    vcrl_kappa: float = _opt(0.8, "VCRL threshold on p = var / var_max, in [0, 1].")
    vcrl_bank_size: int = _opt(64, "VCRL memory bank capacity (groups).")
    vcrl_max_replay: int = _opt(
        2, "Times one banked group may be replayed before it leaves the bank."
    )
    rlve: bool = _opt(False, "RLVE adaptive difficulty per task family (generator-backed pools).")
    rlve_tau_acc: float = _opt(
        0.9, "RLVE: raise a task's top difficulty h when accuracy at h reaches this."
    )
    rlve_tau_num: int = _opt(
        32, "RLVE: responses at difficulty h needed before accuracy is checked."
    )
    rlve_window: int = _opt(3, "RLVE: sample difficulties in [h - rlve_window, h].")
    rl_plus: bool = _opt(
        False,
        "RL-PLUS: add the prompt's reference solution to its group as an external demonstration.",
    )
    rl_plus_gamma: float = _opt(
        0.5, "RL-PLUS exploration exponent: weight (1 - pi_theta(token)) ** gamma."
    )
    rl_plus_omega: str = _opt(
        "one",
        "RL-PLUS: probability of a demonstration token under the external policy: one (a fixed "
        "reference solution is deterministic) or old (pi_old: the weight reduces to pi_theta/pi_old).",
        RL_PLUS_OMEGAS,
    )
    # loop
    batch_prompts: int = _opt(8, "Prompts per step.")
    group_size: int = _opt(8, "Responses per prompt (G).")
    lr: float = _opt(1e-4, "AdamW learning rate.")
    max_new_tokens: int = _opt(MAX_NEW_TOKENS, "Generation budget per response (tokens).")
    temperature: float = _opt(1.0, "Sampling temperature.")
    steps_per_stage: int = _opt(10, "Optimiser steps per curriculum stage.")
    stages: int = _opt(
        0, "Curriculum stages to train (0: every stage the curriculum holds when training starts)."
    )
    micro_batch: int = _opt(
        0, "Responses per forward/backward pass (0: the whole batch); the update does not change."
    )
    bf16: bool = _opt(
        False,
        "bfloat16 autocast for the step's forward passes (generation, log-probs); weights, grads, "
        "optimizer and losses stay float32. Needs bf16 support (CPU, GPUs from Ampere on).",
    )
    grad_checkpointing: bool = _opt(
        False, "Recompute each decoder layer in backward instead of keeping its activations."
    )
    lora_rank: int = _opt(
        0, "Train LoRA adapters of this rank (peft) instead of every weight (0: full fine-tuning)."
    )
    lora_alpha: float = _opt(32.0, "LoRA scaling numerator: the update is (alpha / rank) * B A.")
    lora_targets: str = _opt(
        "all-linear",
        "Modules that get LoRA adapters: comma-separated names (e.g. q_proj,v_proj) or all-linear.",
    )
    eval_every: int = _opt(5, "Evaluate target accuracy every N steps (0: only at the end).")
    eval_temperature: float = _opt(0.0, "Sampling temperature of the periodic eval (0: greedy).")
    eval_samples: int = _opt(
        1,
        "Responses per eval prompt; accuracy is their mean pass rate (needs eval_temperature > 0).",
    )
    checkpoint_every: int = _opt(10, "Checkpoint every N steps (0: only on stop).")
    seed: int = _opt(0, "Seed for data order, sampling and initialisation.")
    grad_clip: float = _opt(1.0, "Clip the global gradient norm to this (0: off).")
    warmup_steps: int = _opt(0, "Linear learning-rate warm-up steps.")
    lr_schedule: str = _opt(
        "constant",
        "After warm-up: constant, or cosine decay reaching 0 after the last step.",
        LR_SCHEDULES,
    )
    weight_decay: float = _opt(0.0, "AdamW weight decay.")

    def validate(self) -> TrainConfig:
        """Check every field; raise ValueError("FIELD: reason") on the first bad one. Returns self."""
        for f in dataclasses.fields(self):
            _check_type(f.name, _types()[f.name], getattr(self, f.name))
            choices = f.metadata["choices"]
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(
                    f"{f.name}: must be one of {'|'.join(choices)}, got {getattr(self, f.name)!r}"
                )
        checks = [
            ("adv_eps", self.adv_eps >= 0, "must be >= 0"),
            ("clip_low", 0 <= self.clip_low < 1, "must be in [0, 1)"),
            ("clip_high", self.clip_high >= 0, "must be >= 0"),
            ("overlong_penalty_factor", self.overlong_penalty_factor >= 0, "must be >= 0"),
            ("kl_beta", self.kl_beta >= 0, "must be >= 0"),
            ("mu_updates", self.mu_updates >= 1, "must be >= 1"),
            ("max_refill", self.max_refill >= 0, "must be >= 0"),
            ("vcrl_kappa", 0 <= self.vcrl_kappa <= 1, "must be in [0, 1]"),
            ("vcrl_bank_size", self.vcrl_bank_size >= 1, "must be >= 1"),
            ("vcrl_max_replay", self.vcrl_max_replay >= 1, "must be >= 1"),
            ("rlve_tau_acc", 0 < self.rlve_tau_acc <= 1, "must be in (0, 1]"),
            ("rlve_tau_num", self.rlve_tau_num >= 1, "must be >= 1"),
            ("rlve_window", self.rlve_window >= 0, "must be >= 0"),
            ("rl_plus_gamma", self.rl_plus_gamma >= 0, "must be >= 0"),
            ("batch_prompts", self.batch_prompts >= 1, "must be >= 1"),
            ("group_size", self.group_size >= 2, "must be >= 2 (advantages need a group)"),
            ("lr", self.lr > 0, "must be > 0"),
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature > 0, "must be > 0"),
            ("steps_per_stage", self.steps_per_stage >= 1, "must be >= 1"),
            ("stages", self.stages >= 0, "must be >= 0"),
            ("micro_batch", self.micro_batch >= 0, "must be >= 0"),
            ("lora_rank", self.lora_rank >= 0, "must be >= 0"),
            ("lora_alpha", self.lora_alpha > 0, "must be > 0"),
            ("lora_targets", bool(self.lora_targets.strip(" ,")), "must name at least one module"),
            ("eval_every", self.eval_every >= 0, "must be >= 0"),
            ("eval_temperature", self.eval_temperature >= 0, "must be >= 0"),
            ("eval_samples", self.eval_samples >= 1, "must be >= 1"),
            ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0"),
            ("seed", self.seed >= 0, "must be >= 0"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
        ]
        if self.eval_samples > 1:
            checks.append(
                ("eval_temperature", self.eval_temperature > 0, "must be > 0 when eval_samples > 1")
            )
        if self.overlong_penalty:
            checks.append(
                (
                    "overlong_buffer",
                    1 <= self.overlong_buffer <= self.max_new_tokens,
                    "must be in [1, max_new_tokens]",
                )
            )
        for name, ok, reason in checks:
            if not ok:
                raise ValueError(f"{name}: {reason}, got {getattr(self, name)!r}")
        if self.adv_mean == "batch" and self.adv_std == "group":
            raise ValueError(f"adv_std: group with adv_mean batch is refused: {BATCH_MEAN_GROUP_STD}")
        if self.mu_updates == 1:
            defaults = TrainConfig.__dataclass_fields__
            for name in ("clip_low", "clip_high", "ratio_level"):
                if getattr(self, name) != defaults[name].default:
                    raise ValueError(
                        f"{name}: {getattr(self, name)!r} has no effect with mu_updates=1 (the only "
                        f"update's importance ratio is exactly 1): set mu_updates >= 2 or leave "
                        f"{name} at {defaults[name].default!r}"
                    )
        return self

    def to_dict(self) -> dict:
        """Plain dict of every field (YAML/JSON-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: typing.Mapping) -> TrainConfig:
        """Build and validate from a mapping; missing keys keep defaults, unknown keys raise ValueError.

        Numbers given as strings (PyYAML reads ``1e-4`` as a string) and ints for float fields are
        converted; anything else of the wrong type raises ValueError naming the field.
        """
        types = _types()
        unknown = sorted(set(d) - set(types))
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown trainer option (known: {', '.join(types)})")
        return cls(**{k: _coerce(k, types[k], v) for k, v in d.items()}).validate()


def _types() -> dict[str, type]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, typ: type, value):
    if typ is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    _check_type(name, typ, value)
    return value


def _check_type(name: str, typ: type, value) -> None:
    if typ is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, typ) and not (typ is not bool and isinstance(value, bool))
    if not ok:
        raise ValueError(f"{name}: expected {typ.__name__}, got {value!r}")


def click_options(f):
    """Decorator adding one ``--field-name`` option per TrainConfig field to a click command.

    Every option defaults to None (so a command can tell "not given" from "given": overlay the
    given ones on a YAML config with `config_from_options`); the help shows the dataclass default.
    Booleans become ``--x/--no-x`` flags and fields with choices become ``click.Choice``.
    """
    types = _types()
    for fl in reversed(dataclasses.fields(TrainConfig)):
        flag = fl.name.replace("_", "-")
        typ = types[fl.name]
        default = fl.default
        shown = "on" if default is True else "off" if default is False else default
        help_text = f"{fl.metadata['help']} [default: {shown}]"
        if typ is bool:
            f = click.option(f"--{flag}/--no-{flag}", fl.name, default=None, help=help_text)(f)
        else:
            choices = fl.metadata["choices"]
            ctype = click.Choice(choices) if choices else typ
            f = click.option(f"--{flag}", fl.name, type=ctype, default=None, help=help_text)(f)
    return f


def config_from_options(options: typing.Mapping, base: typing.Mapping | None = None) -> TrainConfig:
    """TrainConfig from `base` (e.g. a YAML section) overlaid with the CLI options that were given.

    `options` is a click command's kwargs; keys that are not TrainConfig fields are ignored and
    None values (flag not given) leave the base/default value.
    """
    names = {fl.name for fl in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in options.items() if k in names and v is not None}
    return TrainConfig.from_dict({**(base or {}), **given})
