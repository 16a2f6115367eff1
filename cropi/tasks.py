"""The verifiable task suite: prompt pools from reasoning-gym generators, rewards from their scorers.

A task spec is ``NAME[:key=value,...]``, e.g. ``basic_arithmetic:difficulty=2,min_terms=2``.
``NAME`` is a reasoning-gym dataset (see :func:`list_tasks`). ``difficulty=N`` picks level N of
the task's reasoning-gym curriculum: every curriculum attribute is set to level
``min(N, its last level)`` (``BaseCurriculum.set_global_level``) and the config takes that level's
value alone (``RangeAttributeMode.UPPER_BOUND``; for attributes defined as intervals, the range
from level N to level N+1). Valid N are ``0 .. num_levels(NAME) - 1``; without the key the
level is 0. A task without a curriculum takes its default config and only ``difficulty=0``.
Every other key overrides that field of the reasoning-gym config after the level is applied;
values are parsed by the field's default type (bool, int, float, str; lists and tuples as
``a|b|c``; ``none`` for None). ``seed`` and ``size`` are set by :func:`make_pool`.

Every prompt is the reasoning-gym question followed by one fixed line asking for the final
answer after ``Answer:``, and ends with a newline, so a model's response starts with
``Answer: ...``. Rewards come from :mod:`cropi.rewards` (the task's own reasoning-gym scorer, or
math-verify for tasks named ``math`` and tasks reasoning-gym does not know).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import signal
import threading
from contextlib import contextmanager
from importlib.metadata import version

import pyarrow as pa

from cropi import schema
from cropi.rewards import ANSWER_PREFIX
from cropi.runtime import derive_seed, progress

ANSWER_INSTRUCTION = f'Reply with "{ANSWER_PREFIX} <answer>".'

# Disjoint slices of the question space: a question belongs to the split whose bucket range holds
# sha256(question) mod 100, so train, val and test pools never share a question whatever the seeds.
SPLITS = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}

# Registered names that cannot be used with a one-line "Answer:" format: `composite` mixes other
# datasets, the rest have answers spanning several lines (grids, boards, move lists); found by
# sampling each dataset's default config with reasoning-gym 0.1.25.
_EXCLUDED = frozenset({
    "composite", "arc_agi", "binary_matrix", "futoshiki", "kakurasu", "manipulate_matrix",
    "mini_sudoku", "modulo_grid", "n_queens", "pool_matrix", "rearc", "rotate_matrix", "sudoku",
    "survo", "tower_of_hanoi",
})

# The embedded policy's mix (cropi/assets/tiny was warmed up on these five specs, `cropi warmup`):
# a target family (one-digit + and -), chain_sum (the same skill in other words) and two unrelated
# families, each with thousands of distinct prompts. chain_sum 0 has only 159 train-split prompts,
# so it is held out only. The default pool is the study's (configs/validate.yaml).
TARGET_SPEC = "basic_arithmetic:difficulty=0"
RELATED_SPECS = ("chain_sum:difficulty=0", "chain_sum:difficulty=1")
UNRELATED_SPECS = ("count_bits:difficulty=0", "spell_backward:difficulty=0")
DEFAULT_TRAIN_SPECS = (TARGET_SPEC, RELATED_SPECS[1], *UNRELATED_SPECS)
DEFAULT_TARGET_SPECS = (TARGET_SPEC,)
DEFAULT_HELDOUT_SPECS = (*RELATED_SPECS, *UNRELATED_SPECS)


# Specs that do not generate or do not verify with reasoning-gym 0.1.25, found by sweeping every
# task and level (4 prompts each, 20 s limit; the hangs of jugs, number_sequence and puzzle24
# confirmed at 20 CPU seconds; tests/test_task_suite.py re-sweeps): "NAME" for every level,
# "NAME:N" for level N. They are left out of `cropi tasks list` and refused.
_BROKEN: dict[str, str] = {
    "boxnet": "stores the answer as 'None' (no gold answer to verify against)",
    "caesar_cipher:2": 'invalid config at this level: rotation must be in range [1,25]',
    "countdown:1": 'generation fails: ValueError: Failed to generate valid expression after 100 attempts',
    "countdown:2": 'generation fails: ValueError: Failed to generate valid expression after 100 attempts',
    "countdown:3": 'generation fails: ValueError: Failed to generate valid expression after 100 attempts',
    "graph_color": "stores the answer as 'None' (no gold answer to verify against)",
    "jugs:2": 'generation hangs (> 20 s for 4 prompts)',
    "jugs:3": 'generation hangs (> 20 s for 4 prompts)',
    "knight_swap": "no level generates (level 0: min_nodes must be >= 6; levels 1-4: no valid puzzle after 100 boards)",
    "letter_jumble:2": 'generation fails: ValueError: empty range for randrange() (0, -32, -32)',
    "letter_jumble:3": 'generation fails: ValueError: empty range for randrange() (0, -64, -64)',
    "number_sequence:2": 'generation hangs (> 20 s for 4 prompts)',
    "number_sequence:3": 'generation hangs (> 20 s for 4 prompts)',
    "propositional_logic": "stores the answer as 'None' (no gold answer to verify against)",
    "puzzle24:3": 'generation hangs (> 20 s for 4 prompts)',
    "puzzle24:4": 'generation hangs (> 20 s for 4 prompts)',
    "puzzle24:5": 'generation hangs (> 20 s for 4 prompts)',
    "rubiks_cube": "stores the answer as 'None' (no gold answer to verify against)",
    "rush_hour": "stores the answer as 'None' (no gold answer to verify against)",
    "sokoban:0": 'generation hangs (> 20 s for 4 prompts)',
    "sokoban:13": 'generation hangs (> 20 s for 4 prompts)',
    "spell_backward:4": 'generation fails: IndexError: Cannot choose from an empty sequence',
    "word_ladder": "its scorer fails on the gold answer (KeyError)",
    "zebra_puzzles:4": 'generation hangs (> 20 s for 4 prompts)',
    "zebra_puzzles:5": 'generation hangs (> 20 s for 4 prompts)',
}
GENERATE_SECONDS = 60  # CPU seconds; a spec whose pool takes longer is a generator hang: one-line error


def _registry() -> dict:
    """reasoning-gym's {name: (dataset class, config class)} (importing it registers them all)."""
    import reasoning_gym  # noqa: F401
    from reasoning_gym.factory import DATASETS

    return DATASETS


def list_tasks() -> list[str]:
    """Sorted reasoning-gym dataset names usable in a task spec (at least one working level)."""
    return sorted(n for n in set(_registry()) - _EXCLUDED if n not in _BROKEN)


def broken(task: str, level: int) -> str | None:
    """Why ``task`` at ``level`` cannot be used (generation fails, hangs or cannot be
    verified), or None when it works."""
    return _BROKEN.get(task) or _BROKEN.get(f"{task}:{level}")


def working_levels(task: str) -> list[int]:
    """The difficulty levels of ``task`` that generate prompts whose gold answers verify."""
    return [lv for lv in range(num_levels(task)) if broken(task, lv) is None]


def num_levels(task: str) -> int:
    """Number of distinct ``difficulty`` levels of ``task`` (1 when it has no curriculum)."""
    from reasoning_gym.coaching import RangeAttributeDefinition
    from reasoning_gym.factory import create_curriculum, has_curriculum

    _check_task(task)
    if not has_curriculum(task):
        return 1
    attrs = create_curriculum(task).attributes.values()
    # an interval attribute at level N spans levels N..N+1, so its last level adds nothing new
    return max(len(a.levels) - int(isinstance(a, RangeAttributeDefinition) and a.ensure_interval) for a in attrs)


def _check_task(task: str) -> None:
    if task in _registry() and task not in _EXCLUDED and task not in _BROKEN:
        return
    import difflib

    if task in _EXCLUDED:
        raise ValueError(f"task {task!r}: its answers span several lines, which the one-line "
                         f"{ANSWER_PREFIX!r} format cannot hold")
    if task in _BROKEN:
        raise ValueError(f"task {task!r}: {_BROKEN[task]}")
    close = difflib.get_close_matches(task, list_tasks(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `cropi tasks list` shows them"
    raise ValueError(f"unknown task {task!r}{hint}")


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _coerce(key: str, raw: str, default):
    """Parse the string ``raw`` into the type of ``default``; ValueError naming ``key``."""
    try:
        if raw.lower() == "none" and not isinstance(default, str):
            return None
        if isinstance(default, bool):
            flags = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
            return flags[raw.lower()]
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, str):
            return raw
        if isinstance(default, (list, tuple)):
            items = [] if raw == "" else raw.split("|")
            proto = default[0] if len(default) else None
            return type(default)(_coerce(key, x, proto) for x in items)
        for parse in (int, float):
            try:
                return parse(raw)
            except ValueError:
                pass
        return raw
    except (KeyError, ValueError):
        raise ValueError(f"key {key!r}: cannot read {raw!r} as {type(default).__name__}") from None


def parse_task_spec(spec: str) -> tuple[str, dict]:
    """``"NAME:k=v,..."`` -> ``(NAME, {k: typed value})``; ``difficulty`` comes back as an int.

    Raises ValueError naming the task or the key when the task is unknown, a key is not a field
    of the task's config (or is ``seed``/``size``), a value does not parse, the difficulty is
    out of range, or the resulting config fails reasoning-gym's validation.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty task spec {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    _check_task(name)
    fields = {f.name: f for f in dataclasses.fields(_registry()[name][1])}
    opts: dict = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, raw = (s.strip() for s in item.partition("="))
        if not eq or not key:
            raise ValueError(f"task spec {spec!r}: {item!r} is not key=value")
        if key in opts:
            raise ValueError(f"task spec {spec!r}: key {key!r} given twice")
        if key == "difficulty":
            try:
                opts[key] = int(raw)
            except ValueError:
                raise ValueError(f"task spec {spec!r}: key 'difficulty': {raw!r} is not an integer") from None
            levels = num_levels(name)
            if not 0 <= opts[key] < levels:
                raise ValueError(f"task spec {spec!r}: key 'difficulty': {name} has levels 0..{levels - 1}")
        elif key in ("seed", "size"):
            raise ValueError(f"task spec {spec!r}: key {key!r} is set by the pool (use --seed / --n)")
        elif key not in fields:
            raise ValueError(f"task spec {spec!r}: unknown key {key!r} (fields of {name}: "
                             f"{', '.join(sorted(set(fields) - {'seed', 'size'}))})")
        else:
            try:
                opts[key] = _coerce(key, raw, _default(fields[key]))
            except ValueError as e:
                raise ValueError(f"task spec {spec!r}: {e}") from None
    level = opts.get("difficulty", 0)
    if broken(name, level) and set(opts) <= {"difficulty"}:
        ok = ", ".join(map(str, working_levels(name)))
        raise ValueError(f"task spec {spec!r}: level {level} {broken(name, level)} (working levels: {ok})")
    _config(name, opts, seed=0, size=1, spec=spec)
    return name, opts


def _canonical(name: str, opts: dict) -> str:
    """The spec written back with sorted keys: equal specs give equal seeds and metadata."""
    def fmt(v):
        return "|".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    return ":".join([name] + ([",".join(f"{k}={fmt(v)}" for k, v in sorted(opts.items()))] if opts else []))


def _config(name: str, opts: dict, *, seed: int, size: int, spec: str):
    """The reasoning-gym config object for a parsed spec (curriculum level, then overrides)."""
    from reasoning_gym.coaching.base_curriculum import DefaultCurriculumContext, RangeAttributeMode
    from reasoning_gym.factory import create_curriculum, has_curriculum

    config_cls = _registry()[name][1]
    overrides = {k: v for k, v in opts.items() if k != "difficulty"}
    try:
        if has_curriculum(name):
            cur = create_curriculum(name)
            cur.set_global_level(opts.get("difficulty", 0))
            ctx = DefaultCurriculumContext(mode=RangeAttributeMode.UPPER_BOUND)
            cfg = cur.generate_configuration({"seed": seed, "size": size}, ctx)
            cfg = dataclasses.replace(cfg, **overrides)
        else:
            cfg = config_cls(**overrides, seed=seed, size=size)
        if hasattr(cfg, "validate"):
            cfg.validate()
    except (AssertionError, TypeError, ValueError) as e:
        raise ValueError(f"task spec {spec!r}: invalid {name} config: {e}") from None
    return cfg


def _bucket(question: str) -> int:
    return int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") % 100


def _row_id(task: str, question: str) -> str:
    digest = hashlib.sha256(f"{task}\0{question}".encode()).hexdigest()
    return f"{task}-{digest[:12]}"


def _jsonable(x):
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    if isinstance(x, (set, frozenset)):
        return sorted(x, key=repr)
    return str(x)


def _draw(name: str, opts: dict, *, n: int, seed: int, split: str, seen: set, spec: str) -> list[dict]:
    """Up to ``n`` reasoning-gym entries of ``split``'s bucket range not in ``seen`` (updated).

    Items idx = 0, 1, ... of the dataset seeded with ``seed`` are tried in order; the search
    stops after 3x the draws ``n`` would need on average (+100), so a small question space gives
    fewer than ``n`` rows rather than a long search.
    """
    lo, hi = SPLITS[split]
    budget = 3 * math.ceil(n * 100 / (hi - lo)) + 100
    cfg = _config(name, opts, seed=seed, size=budget, spec=spec)
    out = []
    with _time_limit(GENERATE_SECONDS, spec):
        dataset = _registry()[name][0](config=cfg)
        for idx in range(budget):
            if len(out) == n:
                break
            try:
                entry = dataset[idx]
            except Exception as e:  # a generator bug at this config: name it, one line
                msg = str(e).splitlines()[0] if str(e) else ""
                raise ValueError(f"task spec {spec!r}: reasoning-gym failed on item {idx}: {type(e).__name__}: {msg}") from None
            _add_entry(out, entry, idx, spec=spec, seen=seen, lo=lo, hi=hi)
    return out


class _Timeout(BaseException):  # not Exception: generators that catch Exception must not swallow it
    pass


@contextmanager
def _time_limit(seconds: float, spec: str):
    """Raise ValueError when the block uses more than ``seconds`` of CPU time (the process's, so a
    loaded machine does not trip it; main thread only: signals)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(*_):
        raise _Timeout

    old = signal.signal(signal.SIGPROF, fire)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    except _Timeout:
        raise ValueError(f"task spec {spec!r}: reasoning-gym did not finish within {seconds} CPU seconds "
                         "(its generator hangs at this config)") from None
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


def _add_entry(out: list, entry: dict, idx: int, *, spec: str, seen: set, lo: int, hi: int) -> None:
    """Append one reasoning-gym entry to ``out`` unless its question is taken or outside the
    split's buckets; ValueError for an entry cropi cannot verify (no answer, several lines)."""
    question, raw = entry["question"], entry.get("answer")
    answer = "" if raw is None else str(raw)
    if answer.strip() in ("", "None"):
        raise ValueError(f"task spec {spec!r}: item {idx} has no answer ({raw!r}), so no response can be "
                         "verified against it")
    if "\n" in answer.strip():
        raise ValueError(f"task spec {spec!r}: answers span several lines (item {idx})")
    if question in seen or not lo <= _bucket(question) < hi:
        return
    seen.add(question)
    out.append({"question": question, "answer": answer, "metadata": entry.get("metadata", {})})


POOL_SCHEMA = pa.schema(list(schema.PROMPT_SCHEMA) + list(schema.OPTIONAL_PROMPT_FIELDS))


def make_pool(specs: list[str], n: int, seed: int, split: str = "train") -> pa.Table:
    """A prompts table with up to ``n`` rows per spec, in spec order.

    Columns (POOL_SCHEMA): id str (``TASK-<12 hex of sha256(task, question)>``: unique and the
    same for the same question in any pool), prompt str (:func:`format_prompt`), answer str,
    task str, difficulty int32, split str, metadata str (JSON of the reasoning-gym entry
    metadata; :func:`cropi.rewards.reward` re-scores with it).

    Spec i draws from reasoning-gym with seed ``derive_seed(seed, "tasks", split, canonical
    spec)``, so the same (specs, n, seed, split) gives an identical table and splits draw
    different seeds; each split also owns a disjoint slice of the question space (SPLITS).
    A question already in the pool is skipped and the next item drawn instead; a spec whose
    question space is too small yields fewer than ``n`` rows (the schema metadata under
    ``b"cropi.tasks"`` records per-spec counts, seeds and the reasoning-gym version).
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: must be one of {', '.join(SPLITS)}")
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise ValueError("no task specs")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    parsed = [(spec, *parse_task_spec(spec)) for spec in specs]
    canon = [_canonical(name, opts) for _, name, opts in parsed]
    dup = next((c for i, c in enumerate(canon) if c in canon[:i]), None)
    if dup is not None:
        raise ValueError(f"task spec {dup!r} listed twice (raise n instead)")
    cols = {name: [] for name in POOL_SCHEMA.names}
    seen: set = set()
    info = []
    bar = progress(total=len(parsed), desc="tasks", unit="spec")
    for (spec, name, opts), c in zip(parsed, canon):
        spec_seed = derive_seed(seed, "tasks", split, c)
        entries = _draw(name, opts, n=n, seed=spec_seed, split=split, seen=seen, spec=spec)
        bar.update(1)
        info.append({"spec": c, "seed": spec_seed, "rows": len(entries)})
        for e in entries:
            cols["id"].append(_row_id(name, e["question"]))
            cols["prompt"].append(format_prompt(e["question"]))
            cols["answer"].append(e["answer"])
            cols["task"].append(name)
            cols["difficulty"].append(opts.get("difficulty", 0))
            cols["split"].append(split)
            cols["metadata"].append(json.dumps(e["metadata"], sort_keys=True, ensure_ascii=False, default=_jsonable))
    bar.close()
    meta = {"seed": seed, "split": split, "n": n, "specs": info, "reasoning_gym": version("reasoning-gym")}
    return pa.table(cols, schema=POOL_SCHEMA.with_metadata({"cropi.tasks": json.dumps(meta, sort_keys=True)}))


def format_prompt(question: str) -> str:
    """``question`` + newline + the fixed answer instruction + newline."""
    return f"{question.strip()}\n{ANSWER_INSTRUCTION}\n"


def summarize_pool(table: pa.Table) -> dict:
    """Counts of a prompts table: rows, per task, per difficulty, per split, per task and
    difficulty, and mean/max prompt and answer lengths in characters."""
    def counts(values) -> dict:
        out: dict = {}
        for v in values:
            out[v] = out.get(v, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: str(kv[0])))

    names = set(table.column_names)
    out: dict = {"rows": table.num_rows}
    tasks = table.column("task").to_pylist() if "task" in names else None
    diffs = [int(d) for d in table.column("difficulty").to_pylist()] if "difficulty" in names else None
    if tasks is not None:
        out["tasks"] = counts(tasks)
    if diffs is not None:
        out["difficulties"] = dict(sorted(counts(diffs).items()))
    if "split" in names:
        out["splits"] = counts(table.column("split").to_pylist())
    if tasks is not None and diffs is not None:
        out["task_difficulty"] = {t: dict(sorted(counts(d for tt, d in zip(tasks, diffs) if tt == t).items()))
                                  for t in out["tasks"]}
    for col in ("prompt", "answer"):
        if col in names and table.num_rows:
            lens = [len(s) for s in table.column(col).to_pylist()]
            out[f"{col}_chars_mean"] = round(sum(lens) / len(lens), 1)
            out[f"{col}_chars_max"] = max(lens)
    return out
