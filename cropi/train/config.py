"""Every option of the GRPO trainer and of a training run, defined once (docs/design.md).

`TrainConfig` (the trainer) and `RunSpec` (what a run trains, on what) declare their fields with
`cropi.config.option`: type, default, help, choices and range in one place. `validate()` checks
them with the checker every config shares (`cropi.config.check_fields`) plus the option
combinations below; `click_options` turns TrainConfig into CLI flags; `cropi.config.train_layout`
turns both into the RUN/config.yaml layout; `resolve_spec` builds the RunSpec of `cropi train`.

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
import typing
from dataclasses import dataclass
from pathlib import Path

import click

from cropi import config, schema
from cropi.advantages import BATCH_MEAN_GROUP_STD
from cropi.config import ConfigError, option
from cropi.influence import COMBINE, POOL_GRADS
from cropi.projection import PROJECTORS
from cropi.runtime import MAX_NEW_TOKENS
from cropi.select import SELECTORS

ADV_MEAN = ("group", "batch")
ADV_STD = ("group", "batch", "none")
RATIO_LEVELS = ("token", "sequence")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
RL_PLUS_OMEGAS = ("one", "old")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """GRPO trainer settings; units are stated in each field's help."""

    # advantages
    adv_mean: str = option(
        "group", "Baseline: mean reward over the prompt's group or the whole batch.", choices=ADV_MEAN)
    adv_std: str = option(
        "group", "Scale: std (unbiased) over the group, the batch, or none (Dr. GRPO).", choices=ADV_STD)
    adv_eps: float = option(1e-4, "Added to the std in A = (r - mean) / (std + eps).", lo=0)
    # surrogate
    clip_low: float = option(0.2, "PPO clip epsilon below 1: ratios under 1 - clip_low are clipped.", lo=0, hi=1, hi_open=True)
    clip_high: float = option(0.2, "PPO clip epsilon above 1 (clip-higher, DAPO: 0.28).", lo=0)
    ratio_level: str = option(
        "token", "Importance ratio per token, or per sequence (GSPO).", choices=RATIO_LEVELS)
    loss_agg: str = option("token-mean", "How per-token losses are averaged.", choices=LOSS_AGGS)
    mask_truncated: bool = option(
        False, "Drop responses cut at max_new_tokens from the loss (overlong filtering)."
    )
    overlong_penalty: bool = option(False, "Add DAPO's soft overlong penalty to the reward.")
    overlong_buffer: int = option(
        4, "Tokens before max_new_tokens where the soft penalty ramps from 0 to -1."
    )
    overlong_penalty_factor: float = option(1.0, "Scale of the soft overlong penalty (reward units).", lo=0)
    kl_beta: float = option(
        0.0, "Weight of the k3 KL estimate to the frozen reference policy (0: no reference).", lo=0)
    mu_updates: int = option(1, "Optimiser updates per generated batch (mu).", lo=1)
    # sampling
    dynamic_sampling: bool = option(
        False,
        "Drop groups whose responses all pass or all fail (correctness, not penalty-shaped "
        "rewards) and refill from the shard.",
    )
    max_refill: int = option(
        3, "Most extra generation rounds per step when dynamic sampling or VCRL refills.", lo=0)
    vcrl: bool = option(
        False,
        "VCRL: keep groups whose normalised variance of correctness p >= vcrl_kappa; replay "
        "from a bank.",
    )
    vcrl_kappa: float = option(0.8, "VCRL threshold on p = var / var_max, in [0, 1].", lo=0, hi=1)
    vcrl_bank_size: int = option(64, "VCRL memory bank capacity (groups).", lo=1)
    vcrl_max_replay: int = option(
        2, "Times one banked group may be replayed before it leaves the bank.", lo=1)
    rlve: bool = option(False, "RLVE adaptive difficulty per task family (generator-backed pools).")
    rlve_tau_acc: float = option(
        0.9, "RLVE: raise a task's top difficulty h when accuracy at h reaches this.", lo=0, lo_open=True, hi=1)
    rlve_tau_num: int = option(
        32, "RLVE: responses at difficulty h needed before accuracy is checked.", lo=1)
    rlve_window: int = option(3, "RLVE: sample difficulties in [h - rlve_window, h].", lo=0)
    rl_plus: bool = option(
        False,
        "RL-PLUS: add the prompt's reference solution to its group as an external demonstration.",
    )
    rl_plus_gamma: float = option(
        0.5, "RL-PLUS exploration exponent: weight (1 - pi_theta(token)) ** gamma.", lo=0)
    rl_plus_omega: str = option(
        "one",
        "RL-PLUS: probability of a demonstration token under the external policy: one (a fixed "
        "reference solution is deterministic) or old (pi_old: the weight reduces to pi_theta/pi_old).", choices=RL_PLUS_OMEGAS)
    # loop
    batch_prompts: int = option(8, "Prompts per step.", lo=1)
    group_size: int = option(8, "Responses per prompt (G).", lo=2, why="advantages need a group")
    lr: float = option(1e-4, "AdamW learning rate.", lo=0, lo_open=True)
    max_new_tokens: int = option(MAX_NEW_TOKENS, "Generation budget per response (tokens).", lo=1)
    temperature: float = option(1.0, "Sampling temperature.", lo=0, lo_open=True)
    steps_per_stage: int = option(10, "Optimiser steps per curriculum stage.", lo=1)
    stages: int = option(
        0, "Curriculum stages to train (0: every stage the curriculum holds when training starts).", lo=0)
    micro_batch: int = option(
        0, "Responses per forward/backward pass (0: the whole batch); the update does not change.", lo=0)
    bf16: bool = option(
        False,
        "bfloat16 autocast for the step's forward passes (generation, log-probs); weights, grads, "
        "optimizer and losses stay float32. Needs bf16 support (CPU, GPUs from Ampere on).",
    )
    grad_checkpointing: bool = option(
        False, "Recompute each decoder layer in backward instead of keeping its activations."
    )
    lora_rank: int = option(
        0, "Train LoRA adapters of this rank (peft) instead of every weight (0: full fine-tuning).", lo=0)
    lora_alpha: float = option(32.0, "LoRA scaling numerator: the update is (alpha / rank) * B A.", lo=0, lo_open=True)
    lora_targets: str = option(
        "all-linear",
        "Modules that get LoRA adapters: comma-separated names (e.g. q_proj,v_proj) or all-linear.",
    )
    eval_every: int = option(5, "Evaluate target accuracy every N steps (0: only at the end).", lo=0)
    eval_temperature: float = option(0.0, "Sampling temperature of the periodic eval (0: greedy).", lo=0)
    eval_samples: int = option(
        1,
        "Responses per eval prompt; accuracy is their mean pass rate (needs eval_temperature > 0).", lo=1)
    checkpoint_every: int = option(10, "Checkpoint every N steps (0: only on stop).", lo=0)
    seed: int = option(0, "Seed for data order, sampling and initialisation.", lo=0)
    grad_clip: float = option(1.0, "Clip the global gradient norm to this (0: off).", lo=0)
    warmup_steps: int = option(0, "Linear learning-rate warm-up steps.", lo=0)
    lr_schedule: str = option(
        "constant",
        "After warm-up: constant, or cosine decay reaching 0 after the last step.", choices=LR_SCHEDULES)
    weight_decay: float = option(0.0, "AdamW weight decay.", lo=0)

    def validate(self) -> TrainConfig:
        """Check every field and the option combinations; raise ConfigError (a ValueError,
        ``"FIELD: reason"``) on the first bad one. Returns self, values normalised."""
        config.check_fields(self)
        self.cross_check()
        return self

    def cross_check(self) -> None:
        """The rules that tie options together (each field alone is `validate`'s)."""
        if not self.lora_targets.strip(" ,"):
            raise ConfigError("lora_targets", f"must name at least one module, got {self.lora_targets!r}")
        if self.eval_samples > 1 and self.eval_temperature <= 0:
            raise ConfigError("eval_temperature", f"must be > 0 when eval_samples > 1, got {self.eval_temperature!r}")
        if self.overlong_penalty and not 1 <= self.overlong_buffer <= self.max_new_tokens:
            raise ConfigError("overlong_buffer", f"must be in [1, max_new_tokens], got {self.overlong_buffer!r}")
        if self.adv_mean == "batch" and self.adv_std == "group":
            raise ConfigError("adv_std", f"group with adv_mean batch is refused: {BATCH_MEAN_GROUP_STD}")
        if self.mu_updates == 1:
            defaults = TrainConfig.__dataclass_fields__
            for name in ("clip_low", "clip_high", "ratio_level"):
                if getattr(self, name) != defaults[name].default:
                    raise ConfigError(
                        name,
                        f"{getattr(self, name)!r} has no effect with mu_updates=1 (the only update's "
                        f"importance ratio is exactly 1): set mu_updates >= 2 or leave {name} at "
                        f"{defaults[name].default!r}",
                    )

    def to_dict(self) -> dict:
        """Plain dict of every field (YAML/JSON-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: typing.Mapping) -> TrainConfig:
        """Build and validate from a mapping; missing keys keep defaults, unknown keys raise
        ConfigError. Numbers given as strings (PyYAML reads ``1e-4`` as a string) and ints for
        float fields are converted; anything else of the wrong type raises ConfigError."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(unknown[0], f"unknown trainer option (known: {', '.join(names)})")
        return cls(**d).validate()


def click_options(f):
    """Decorator adding one ``--field-name`` option per TrainConfig field to a click command.

    Every option defaults to None (so a command can tell "not given" from "given": overlay the
    given ones on a YAML config with `config_from_options`); the help shows the dataclass default.
    Booleans become ``--x/--no-x`` flags and fields with choices become ``click.Choice``.
    """
    types = typing.get_type_hints(TrainConfig)
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


# ---------------------------------------------------------------------------- the run


def _tiny() -> str:
    """models.TINY, imported when a RunSpec is made: the CLI starts without transformers."""
    from cropi.models import TINY

    return TINY


@dataclass
class RunSpec:
    """Everything that defines a run: what to train, on what, and how (`train`)."""

    curriculum: str = option(help="Curriculum folder (stage-000, stage-001, ...).")
    model: str = option(help="Policy to start from: `tiny` or a local HF folder / cached hub name.",
                        default_factory=_tiny)
    targets: list[str] = option(help="Target sets (eval accuracy; --rescore's target gradients).", default_factory=list)
    heldout: list[str] = option(help="Eval-only sets.", default_factory=list)
    rescore: bool = option(False, "Score and select a missing next stage with the current checkpoint.")
    trajectories: str | None = option(None, "--rescore: the offline pool to score.")
    selector: str = option("popi", "--rescore: selector.", choices=SELECTORS)
    ratio: float = option(0.1, "--rescore: stage fraction of the pool.", lo=0, lo_open=True, hi=1)
    projector: str = option("sjlt", "--rescore: gradient projector.", choices=(*PROJECTORS, "kron"))
    k: int = option(8192, "--rescore: projected dimension.", lo=1)
    combine: str = option("mean", "--rescore: how scores against several target sets combine.",
                          choices=COMBINE)
    params: str = option("all", "--rescore: parameters whose gradients score (all | last:N | a regex on names).")
    pool_grad: str = option("plain", "--rescore: pool features from g_x (plain) or sign(g_x) (a first Adam step).",
                            choices=POOL_GRADS)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}
        return {**d, "targets": list(self.targets), "heldout": list(self.heldout), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, d: typing.Mapping, path="config", sources: typing.Mapping | None = None) -> RunSpec:
        """From a config.yaml mapping, checked by `cropi.config.train_layout()`: bad keys or values
        raise InputError naming ``path`` (or the ``sources`` label of keys given elsewhere)."""
        cfg = config.resolve(d, config.train_layout(), path, sources)
        return cls(**{k: v for k, v in cfg.items() if k != "train"}, train=TrainConfig(**cfg["train"]))


def check_curriculum(cfg: dict) -> None:
    """A run needs a curriculum (from the config file or --curriculum)."""
    if not cfg.get("curriculum"):
        raise ConfigError("curriculum", "missing (--curriculum DIR)")


def _as_given(run_options: dict, train_options: dict) -> dict:
    """The options a command line gave (None / () = not given), paths as strings."""
    given = {k: v for k, v in run_options.items() if v is not None and v != ()}
    for key in ("targets", "heldout"):
        if key in given:
            given[key] = [str(p) for p in given[key]]
    for key in ("curriculum", "trajectories"):
        if key in given:
            given[key] = str(given[key])
    return {**given, "train": {k: v for k, v in train_options.items() if v is not None}}


def resolve_spec(run_dir, *, resume: bool, config_file=None, overrides=(), run_options: dict,
                 train_options: dict) -> RunSpec:
    """The RunSpec of `cropi train`, checked by `cropi.config.train_layout()`.

    Fresh run: `config_file` (a config.yaml layout; optional) with `key=value` `overrides`, then
    the options given (None = not given). Resume: RUN/config.yaml; a config file, overrides and
    options given must equal its values.
    """
    over = config.parse_overrides(overrides)
    flags = _as_given(run_options, train_options)
    sources = {**config.override_sources(over), **config.override_sources(flags, "options")}
    given = config.merge(config.read_yaml(config_file) if config_file else {}, over, flags)
    if not resume:
        return RunSpec.from_dict(given, config_file or "options", sources)
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise schema.InputError(path, None, None, "no such file: nothing to resume")
    saved = RunSpec.from_dict(config.read_yaml(path), path)
    want = RunSpec.from_dict(config.merge(saved.to_dict(), given), config_file or "--resume", sources)
    old, new = saved.to_dict(), want.to_dict()
    pairs = [(k, new[k], old[k]) for k in old if k != "train"]
    pairs += [(k, new["train"][k], old["train"][k]) for k in old["train"]]
    for name, value, had in pairs:
        if value != had:
            raise schema.InputError(path, None, name, f"--resume: given {value!r}, but the run has {had!r}")
    return saved
