"""Every config of cropi, described one way: `Key`s (type, default, help, choices, range).

A `Key` is one setting. Settings objects are dataclasses whose fields are declared with
`option(...)` (a `Key` without its name): `cropi.train.config.TrainConfig` and `RunSpec`,
`cropi.score.ScoreConfig`, `cropi.policy_grad.GradConfig`. `check_fields` checks such an object
with the same `_check` that checks YAML, and `keys_of` turns its fields into `Key`s.

Two YAML layouts are lists of `Key`s, checked by the same functions:
- `run_layout()`: `cropi run CONFIG` (the CROPI loop and its baselines): name, seed, model,
  device and the sections data, rollout, score, select, train, compare.
- `train_layout()`: `cropi train --config CONFIG` and a run folder's RUN/config.yaml: the run
  options of `RunSpec` and its `train:` section.
The `train:` section of both is `keys_of(TrainConfig)`; its option combinations are
`TrainConfig.cross_check`'s.

A layout's `Key`s are named by dotted path (``rollout.temperature``); a section is every key
under one prefix. `resolve` checks a parsed mapping against a layout before any work starts:
unknown keys are refused naming the nearest valid key, every value's type, range and choices are
checked, names that become path parts must be safe, and the result has every key (defaults
filled). Errors are `schema.InputError`: one line, ``FILE: field KEY: message``.

To add a key, add one `Key` to the layout or one `option` field to the dataclass (and read it
where it is used); nothing else changes.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from cropi import schema

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # names that become file names
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # runs/NAME
DEVICE = re.compile(r"cpu|cuda|cuda:\d+|mps")


class Specs:
    """Type marker: task specs, ``default`` or a non-empty list of ``NAME[:key=value,...]``."""


@dataclass(frozen=True)
class Key:
    """One config key.

    name: dotted path. type: int, float, str, bool, list[T], dict[str, T] (free names, each
    matching SAFE_NAME), Specs, or T | None. choices: allowed values (of each item for lists and
    dict values). lo / hi: numeric bounds (of each item for lists), exclusive when lo_open /
    hi_open. pattern: a regex strings must match in full (`pattern_help` says it in words).
    nonempty: lists and dicts need at least one item.
    """

    name: str
    type: typing.Any
    default: typing.Any
    help: str
    choices: tuple | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    pattern: re.Pattern | None = None
    pattern_help: str = ""
    nonempty: bool = False
    why: str = ""  # said after a range error: "must be >= 2 (advantages need a group)"


RULES = ("choices", "lo", "hi", "lo_open", "hi_open", "pattern", "pattern_help", "nonempty", "why")


def option(default=dataclasses.MISSING, help: str = "", *, default_factory=dataclasses.MISSING, **rules):
    """A dataclass field declared as a config `Key` (its name and type come from the field).
    ``rules``: choices, lo, hi, lo_open, hi_open, pattern, pattern_help, nonempty, why."""
    unknown = set(rules) - set(RULES)
    if unknown:
        raise TypeError(f"option: unknown rules {sorted(unknown)}")
    meta = {"help": help, "choices": rules.get("choices"), "rules": rules}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def keys_of(cls, prefix: str = "", exclude: Iterable[str] = ()) -> list[Key]:
    """The `Key`s of a dataclass's `option` fields, named ``prefix + field``. A required field
    (no default) becomes optional with default None: it may come from a flag."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if "rules" not in f.metadata or f.name in set(exclude):
            continue
        typ, default = hints[f.name], _default(f)
        if default is dataclasses.MISSING:
            typ, default = typ | None, None
        keys.append(Key(prefix + f.name, typ, default, f.metadata["help"], **f.metadata["rules"]))
    return keys


def check_fields(obj) -> None:
    """Check every `option` field of dataclass ``obj`` as `resolve` checks YAML (type, choices,
    range) and store the normalised value (ints given for floats become floats, numbers written
    as text are read). Raises ConfigError naming the field. Fields declared without `option` are
    left alone."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if "rules" not in f.metadata:
            continue
        key = Key(f.name, hints[f.name], _default(f), f.metadata["help"], **f.metadata["rules"])
        object.__setattr__(obj, f.name, _check(getattr(obj, f.name), key.type, key, f.name))


@dataclass(frozen=True)
class Layout:
    """What a config file may hold. reserved: {dotted key: why it may not be set here};
    checks: functions of the resolved dict raising ConfigError for cross-key rules."""

    what: str
    keys: tuple[Key, ...]
    reserved: Mapping[str, str] = dataclasses.field(default_factory=dict)
    checks: tuple[Callable[[dict], None], ...] = ()

    def key(self, name: str) -> Key | None:
        return next((k for k in self.keys if k.name == name), None)

    def is_section(self, prefix: str) -> bool:
        return any(k.name.startswith(prefix + ".") for k in self.keys)

    def children(self, prefix: str) -> list[str]:
        """Dotted names of the keys and sections directly under `prefix` ("" = top level)."""
        depth = prefix.count(".") + 1 if prefix else 0
        out = []
        for k in self.keys:
            if prefix and not k.name.startswith(prefix + "."):
                continue
            child = ".".join(k.name.split(".")[: depth + 1])
            if child not in out:
                out.append(child)
        return out


class ConfigError(ValueError):
    """A bad value at dotted key `field` (turned into schema.InputError with the file)."""

    def __init__(self, field: str | None, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


# ---------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice (again on line {line})", key_node.start_mark
            )
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def parse_yaml(text: str, source) -> typing.Any:
    """YAML text -> Python value; invalid YAML raises InputError with the line and column."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise schema.InputError(source, None, None, f"{where}invalid YAML: {problem}") from None


def read_yaml(path) -> dict:
    """A config file as a mapping ({} when empty). Missing, unreadable, invalid YAML, or not a
    mapping: InputError naming the file (and the line for YAML errors)."""
    path = Path(path)
    if not path.is_file():
        raise schema.InputError(path, None, None, "no such file" if not path.exists() else "not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise schema.InputError(path, None, None, f"not UTF-8 text (byte {e.start})") from None
    data = parse_yaml(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise schema.InputError(path, None, None, f"must be a YAML mapping of keys, got {_kind(data)}")
    return data


def parse_overrides(items: Iterable[str]) -> dict:
    """``["train.lr=1e-3", "compare.seeds=[0, 1]"]`` -> nested {"train": {"lr": "1e-3"}, ...}.

    Each value is parsed as YAML (so ``[0]`` is a list, ``true`` a bool, ``8`` an int); the
    result is validated with the file it overrides. A malformed item raises InputError."""
    out: dict = {}
    for item in items:
        key, eq, raw = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(p.strip() for p in parts):
            raise schema.InputError(f"override {item!r}", None, None, "expected KEY=VALUE, e.g. train.lr=1e-3")
        value = parse_yaml(raw, f"override {item!r}")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p.strip(), {})
            if not isinstance(nxt, dict):
                raise schema.InputError(f"override {item!r}", None, key, "conflicts with another override")
            node = nxt
        node[parts[-1].strip()] = value
    return out


def merge(*layers: Mapping | None) -> dict:
    """Deep merge: later layers win; mappings merge key by key, anything else replaces."""
    out: dict = {}
    for layer in layers:
        for k, v in (layer or {}).items():
            if isinstance(v, Mapping) and isinstance(out.get(k), dict):
                out[k] = merge(out[k], v)
            else:
                out[k] = dict(v) if isinstance(v, Mapping) else v
    return out


def dotted(d: Mapping, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1} (leaves only)."""
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(dotted(v, name + "."))
        else:
            out[name] = v
    return out


# ---------------------------------------------------------------------------- checking


def _kind(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"{type(value).__name__} {value!r}"
    )


def _type_name(typ) -> str:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if typ is Specs:
        return "task specs (default or a list of NAME[:key=value,...])"
    if origin in (list, tuple):
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        return f"a list of {plural.get(args[0], _type_name(args[0]))}"
    if origin is dict:
        return f"a mapping of names to {_type_name(args[1])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " (or null)"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(typ, str(typ))


def _check_specs(value, field: str):
    from cropi import tasks

    if value == "default":
        return value
    if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
        raise ConfigError(field, f"expected {_type_name(Specs)}, got {_kind(value)}")
    for s in value:
        try:
            tasks.parse_task_spec(s)
        except ValueError as e:
            raise ConfigError(field, str(e)) from None
    return list(value)


def _check(value, typ, key: Key, field: str):
    """`value` checked (and numbers normalised) against `typ` and the key's rules."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if args and type(None) in args and origin not in (dict, list, tuple):
        if value is None:
            return None
        (typ,) = [a for a in args if a is not type(None)]
        return _check(value, typ, key, field)
    want = f"expected {_type_name(typ)}, got {_kind(value)}"
    if typ is Specs:
        return _check_specs(value, field)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(field, want)
        if key.nonempty and not value:
            raise ConfigError(field, "must not be empty")
        items = [_check(v, args[0], key, f"{field}[{i}]") for i, v in enumerate(value)]
        dup = next((v for i, v in enumerate(items) if v in items[:i]), None)
        if dup is not None:
            raise ConfigError(field, f"{dup!r} given twice")
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(field, want)
        if key.nonempty and not value:
            raise ConfigError(field, "must not be empty")
        out = {}
        for name, v in value.items():
            if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
                raise ConfigError(field, f"name {name!r} must be 1-64 letters, digits, _ or - "
                                         f"(it becomes a file name)")
            out[name] = _check(v, args[1], key, f"{field}.{name}")
        return out
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(field, want)
    elif typ is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(field, want)
    elif typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(field, want) from None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(field, want)
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(field, f"must be a finite number, got {value}")
    elif typ is str:
        if not isinstance(value, str):
            raise ConfigError(field, want)
        if key.pattern is not None and not key.pattern.fullmatch(value):
            raise ConfigError(field, f"{value!r} is not {key.pattern_help or 'allowed'}")
    if key.choices is not None and value not in key.choices:
        raise ConfigError(field, f"must be one of {', '.join(map(str, key.choices))}, got {value!r}")
    why = f" ({key.why})" if key.why else ""
    if key.lo is not None and (value < key.lo or (key.lo_open and value == key.lo)):
        raise ConfigError(field, f"must be {'>' if key.lo_open else '>='} {key.lo:g}{why}, got {value!r}")
    if key.hi is not None and (value > key.hi or (key.hi_open and value == key.hi)):
        raise ConfigError(field, f"must be {'<' if key.hi_open else '<='} {key.hi:g}{why}, got {value!r}")
    return value


def _unknown(layout: Layout, name: str, prefix: str) -> ConfigError:
    """Unknown key `name` (dotted): name the nearest valid key among its siblings, else any key
    with a close last part (e.g. a train option put at the top level)."""
    leaf = name.rsplit(".", 1)[-1]
    siblings = layout.children(prefix)
    near = difflib.get_close_matches(leaf, [s.rsplit(".", 1)[-1] for s in siblings], n=1, cutoff=0.6)
    if near:
        hint = f"did you mean {prefix + '.' if prefix else ''}{near[0]}?"
    else:
        everywhere = [k.name for k in layout.keys]
        near = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in everywhere], n=1, cutoff=0.8)
        if near:
            hint = f"did you mean {next(k for k in everywhere if k.rsplit('.', 1)[-1] == near[0])}?"
        else:
            hint = f"valid here: {', '.join(s.rsplit('.', 1)[-1] for s in siblings)}"
    return ConfigError(name, f"unknown key in the {layout.what}; {hint}")


def _walk(raw: Mapping, layout: Layout, prefix: str, out: dict) -> None:
    for k, v in raw.items():
        if not isinstance(k, str):
            raise ConfigError(prefix or None, f"key {k!r} is not a string")
        name = f"{prefix}.{k}" if prefix else k
        if name in layout.reserved:
            raise ConfigError(name, layout.reserved[name])
        key = layout.key(name)
        if key is not None:
            out[name] = _check(v, key.type, key, name)
        elif layout.is_section(name):
            if v is None:
                continue
            if not isinstance(v, Mapping):
                subs = ", ".join(s.rsplit(".", 1)[-1] for s in layout.children(name))
                raise ConfigError(name, f"expected a mapping (a section with keys {subs}), got {_kind(v)}")
            _walk(v, layout, name, out)
        else:
            raise _unknown(layout, name, prefix)


def _nest(flat: Mapping) -> dict:
    out: dict = {}
    for name, v in flat.items():
        node = out
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def resolve(raw: Mapping, layout: Layout, source, sources: Mapping[str, str] | None = None) -> dict:
    """Check `raw` against `layout` and return it nested with every key present (defaults filled,
    floats normalised). Errors: schema.InputError(source, field=dotted key); `sources` maps
    dotted prefixes of keys given elsewhere (an override, a flag) to the label to name instead."""
    try:
        given: dict = {}
        _walk(raw, layout, "", given)
        flat = {k.name: given.get(k.name, copy.deepcopy(k.default)) for k in layout.keys}
        cfg = _nest(flat)
        for check in layout.checks:
            check(cfg)
        return cfg
    except ConfigError as e:
        label = source
        for prefix, lab in (sources or {}).items():
            if e.field and (e.field == prefix or e.field.startswith(prefix + ".")):
                label = lab
        raise schema.InputError(label, None, e.field, e.message) from None


def override_sources(overrides: Mapping, label: str = "command line") -> dict[str, str]:
    """{dotted key: label} for naming errors in values that came from the command line."""
    return {k: label for k, v in dotted(overrides).items() if v != {}}


def load(path, layout: Layout, overrides: Iterable[str] = (), defaults: Mapping | None = None) -> dict:
    """Read `path`, apply `key=value` overrides, fill `defaults` (below the file) and resolve."""
    over = parse_overrides(overrides)
    raw = merge(defaults, read_yaml(path), over)
    return resolve(raw, layout, path, override_sources(over))


def dump(cfg: Mapping, path) -> Path:
    """Write a resolved config as YAML (layout order), atomically."""
    with schema.atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=None))
    return Path(path)


def check_same(path, cfg: Mapping, layout: Layout, free: Iterable[str] = ()) -> None:
    """Refuse to reuse an output folder whose resolved config (`path`, when it exists) differs
    from `cfg` in a key outside the `free` sections (e.g. the seeds to run, the device)."""
    path = Path(path)
    if not path.exists():
        return
    old, new = dotted(resolve(read_yaml(path), layout, path)), dotted(cfg)
    for k in [*new, *(k for k in old if k not in new)]:
        if k.split(".")[0] in tuple(free) or old.get(k) == new.get(k):
            continue
        raise schema.InputError(path, None, k, f"this folder was made with {old.get(k)!r}, the config now gives "
                                               f"{new.get(k)!r}: choose another --root (or name)")


# ---------------------------------------------------------------------------- the train: section


def train_keys(exclude: Iterable[str] = ()) -> list[Key]:
    """`train.*` keys: the TrainConfig dataclass's fields (types, defaults, help, choices, ranges)."""
    from cropi.train.config import TrainConfig

    return keys_of(TrainConfig, "train.", exclude)


def check_train(cfg: dict) -> None:
    """TrainConfig's option combinations on the `train:` section (each key is checked already)."""
    from cropi.train.config import TrainConfig

    try:
        TrainConfig(**cfg["train"]).cross_check()
    except ConfigError as e:
        raise ConfigError(f"train.{e.field}", e.message) from None


# ---------------------------------------------------------------------------- cropi run


METHODS = ("full", "random", "learnability", "vcrl", "oracle", "family-random", "cropi-norescore", "cropi")


def check_params(cfg: dict, key: str) -> None:
    """The gradient-parameter spec at ``key`` (score.params / params) reads as all | last:N | a regex."""
    from cropi.policy_grad import check_params_spec

    section, _, name = key.rpartition(".")
    try:
        check_params_spec((cfg[section] if section else cfg)[name])
    except ValueError as e:
        raise ConfigError(key, str(e)) from None


def _run_checks(cfg: dict) -> None:
    check_params(cfg, "score.params")
    for name in cfg["data"]["heldout"]:
        if name.endswith("_test"):
            raise ConfigError(f"data.heldout.{name}", "names ending in _test are the targeted test sets; rename it")
    if cfg["train"]["stages"] < 1:
        raise ConfigError("train.stages", "must be >= 1 in a run config (every method trains this many)")
    if cfg["compare"]["seeds"] is None:
        cfg["compare"]["seeds"] = [cfg["seed"]]


@functools.cache
def run_layout() -> Layout:
    """`cropi run CONFIG`: data, one offline rollout, score/select/train per stage, baselines."""
    from cropi import models, projection
    from cropi.influence import COMBINE, POOL_GRADS

    specs = Specs | None
    return Layout(
        "run config",
        (
            Key("name", str, None, "Run name: outputs go to runs/NAME (default: the file's stem).",
                pattern=RUN_NAME, pattern_help="a safe folder name (letters, digits, . _ -)"),
            Key("seed", int, 0, "Seed of data, rollout and the default compare.seeds.", lo=0),
            Key("model", str, models.TINY, "Policy: `tiny` (embedded) or a local HF folder / cached hub name."),
            Key("device", str, "cpu", "cpu, cuda, cuda:N or mps.", pattern=DEVICE, pattern_help="cpu, cuda, cuda:N or mps"),
            Key("data.pool", specs, "default", "Task specs of the training pool (default: the built-in mix)."),
            Key("data.pool_per_spec", int, 60, "Pool prompts per spec.", lo=1),
            Key("data.pool_source", str | None, None,
                "The user's own training prompts instead of task specs: a prompts file (Parquet, JSONL, "
                "verl Parquet), a save_to_disk folder or an HF dataset name in the local cache."),
            Key("data.split", str | None, None, "Split of a DatasetDict / HF dataset named by data.pool_source."),
            Key("data.targets", dict[str, specs], {"target": "default"},
                "Target sets: name -> task specs (val split gives target gradients, test split the targeted accuracy).",
                nonempty=True),
            Key("data.target_per_spec", int, 30, "Target prompts per spec and split.", lo=1),
            Key("data.test_per_spec", int | None, None,
                "Test-split prompts per target spec: the targeted accuracy (default: data.target_per_spec).", lo=1),
            Key("data.heldout", dict[str, specs], {"heldout": "default"}, "Held-out sets: name -> task specs (test split)."),
            Key("data.heldout_per_spec", int, 30, "Held-out prompts per spec.", lo=1),
            Key("data.columns.prompt", str | None, None, "Column holding the prompt in user data files (default: prompt)."),
            Key("data.columns.answer", str | None, None, "Column holding the reference answer (default: answer)."),
            Key("data.columns.id", str | None, None, "Column holding a unique row id (default: id, else a content hash)."),
            Key("rollout.n", int, 8, "Responses per prompt (G) of the offline rollout.", lo=2),
            Key("rollout.temperature", float, 1.0, "Sampling temperature of the offline rollout.", lo=0, lo_open=True),
            Key("rollout.max_new_tokens", int, 16, "Generation budget per response (tokens).", lo=1),
            Key("score.projector", str, "sjlt", "Gradient projector.", choices=(*projection.PROJECTORS, "kron")),
            Key("score.k", int, 8192, "Projected dimension.", lo=1),
            Key("score.combine", str, "mean", "How scores against several target sets combine.", choices=COMBINE),
            Key("score.params", str, "all", "Parameters whose gradients score: all | last:N | a regex on names."),
            Key("score.pool_grad", str, "plain", "Pool features from g_x (plain) or sign(g_x) (a first Adam step).",
                choices=POOL_GRADS),
            Key("score.check_influence", int, 0,
                "Pool prompts in the stage-0 check that scores predict one step's change of the target objective.",
                lo=0),
            Key("score.influence_eps", list[float], [1e-3, 1e-2, 0.1, 1.0],
                "Normalised step sizes of that check (L2 norm in parameter space).", lo=0, lo_open=True, nonempty=True),
            Key("select.ratio", float, 0.1, "Fraction of the pool per stage.", lo=0, lo_open=True, hi=1),
            *train_keys(exclude=("seed", "vcrl")),
            Key("compare.methods", list[str], ["cropi"], "Methods to run on the same budget.", choices=METHODS,
                nonempty=True),
            Key("compare.seeds", list[int] | None, None, "Seeds per method (default: [seed]).", lo=0, nonempty=True),
        ),
        reserved={
            "train.seed": "set per run by compare.seeds (or seed), not in the train section",
            "train.vcrl": "set per method: add vcrl to compare.methods",
        },
        checks=(check_train, _run_checks),
    )


def load_run(path, overrides: Iterable[str] = ()) -> dict:
    """A `cropi run` config, validated and resolved; `name` defaults to the file's stem."""
    path = Path(path)
    return load(path, run_layout(), overrides, defaults={"name": path.stem})


# ---------------------------------------------------------------------------- cropi train


@functools.cache
def train_layout() -> Layout:
    """`cropi train --config` and RUN/config.yaml: RunSpec's options and the `train:` section."""
    from cropi.train.config import RunSpec, check_curriculum

    return Layout("train config", (*keys_of(RunSpec), *train_keys()),
                  checks=(check_curriculum, check_train, lambda cfg: check_params(cfg, "params")))
