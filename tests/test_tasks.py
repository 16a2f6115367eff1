"""The task suite: spec parsing, pool determinism and splits (rewards: tests/test_rewards.py)."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import reasoning_gym
import synthetic

from cropi import models, schema, tasks

FAMILIES = sorted({tasks.parse_task_spec(s)[0] for s in synthetic.ASCII_SPECS})


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def question_of(prompt: str) -> str:
    suffix = f"\n{tasks.ANSWER_INSTRUCTION}\n"
    assert prompt.endswith(suffix)
    return prompt[: -len(suffix)]


# ---------------------------------------------------------------------------- specs


def test_parse_task_spec_types():
    assert tasks.parse_task_spec("basic_arithmetic:difficulty=2,min_terms=2") == (
        "basic_arithmetic", {"difficulty": 2, "min_terms": 2})
    assert tasks.parse_task_spec(" chain_sum ") == ("chain_sum", {})
    name, opts = tasks.parse_task_spec("basic_arithmetic:operators=+|-,allow_negation=false,format_style=natural")
    assert opts == {"operators": ("+", "-"), "allow_negation": False, "format_style": "natural"}
    _, opts = tasks.parse_task_spec("complex_arithmetic:operations_weights=0.5|0.5|0|0")
    assert opts == {"operations_weights": [0.5, 0.5, 0.0, 0.0]}


@pytest.mark.parametrize("spec, needle", [
    ("basic_arithmetic:min_termz=2", "min_termz"),            # not a config field
    ("basic_arithmetic:min_terms=two", "min_terms"),          # does not parse as int
    ("basic_arithmetic:allow_negation=maybe", "allow_negation"),
    ("basic_arithmetic:difficulty=5", "difficulty"),          # levels 0..4
    ("basic_arithmetic:difficulty=-1", "difficulty"),
    ("basic_arithmetic:difficulty=x", "difficulty"),
    ("basic_arithmetic:seed=3", "seed"),                      # owned by make_pool
    ("basic_arithmetic:difficulty", "difficulty"),            # not key=value
    ("basic_arithmetic:min_terms=1,min_terms=2", "min_terms"),
    ("basic_arithmetic:min_terms=5,max_terms=3", "max_terms"),  # fails reasoning-gym validation
    ("basic_arithmatic", "basic_arithmetic"),                 # unknown task, close match suggested
    ("sudoku", "several lines"),                              # multi-line answers
    ("", "empty"),
])
def test_parse_task_spec_errors_name_the_problem(spec, needle):
    with pytest.raises(ValueError, match=needle):
        tasks.parse_task_spec(spec)


def test_list_tasks():
    names = tasks.list_tasks()
    assert names == sorted(names) and len(names) > 50
    assert set(FAMILIES) <= set(names)
    assert "composite" not in names and "sudoku" not in names


def test_excluded_tasks_really_have_multiline_answers():
    for name in sorted(tasks._EXCLUDED - {"composite"}):
        ds = reasoning_gym.create_dataset(name, seed=1, size=4)
        assert any("\n" in str(ds[i]["answer"]).strip() for i in range(4)), name


def test_num_levels_from_curricula():
    assert tasks.num_levels("basic_arithmetic") == 5   # num_terms 2..6 (5 levels), digits 1..4
    assert tasks.num_levels("count_bits") == 4         # one interval attribute with 5 bounds
    assert tasks.num_levels("chain_sum") == 11
    assert tasks.num_levels("gsm_symbolic") == 1       # no curriculum
    with pytest.raises(ValueError, match="difficulty"):
        tasks.parse_task_spec("gsm_symbolic:difficulty=1")


# ---------------------------------------------------------------------------- difficulty


def test_difficulty_maps_to_curriculum_level():
    t = tasks.make_pool(["basic_arithmetic:difficulty=2"], 30, 0)
    meta = [json.loads(m) for m in t.column("metadata").to_pylist()]
    # level 2 of num_terms [2,3,4,5,6] and num_digits [1,2,3,4], the level's value alone
    assert {m["num_terms"] for m in meta} == {4} and {m["num_digits"] for m in meta} == {3}
    assert set(t.column("difficulty").to_pylist()) == {2}
    # interval attribute: count_bits level 1 draws n from [1_000, 1_000_000]
    t = tasks.make_pool(["count_bits:difficulty=1"], 50, 0)
    ns = [json.loads(m)["n"] for m in t.column("metadata").to_pylist()]
    assert all(1_000 <= x <= 1_000_000 for x in ns) and max(ns) > 10_000


def test_no_difficulty_is_level_zero_and_keys_override_the_level():
    t = tasks.make_pool(["basic_arithmetic"], 20, 0)
    meta = [json.loads(m) for m in t.column("metadata").to_pylist()]
    assert {(m["num_terms"], m["num_digits"]) for m in meta} == {(2, 1)}
    assert set(t.column("difficulty").to_pylist()) == {0}
    t = tasks.make_pool(["basic_arithmetic:difficulty=2,min_terms=2"], 60, 0)
    terms = {json.loads(m)["num_terms"] for m in t.column("metadata").to_pylist()}
    assert terms == {2, 3, 4}


# ---------------------------------------------------------------------------- pools


def test_pool_schema_and_contract():
    t = tasks.make_pool(["basic_arithmetic:difficulty=1", "spell_backward"], 10, 3, "val")
    assert t.schema.names == ["id", "prompt", "answer", "task", "difficulty", "split", "metadata"]
    assert t.schema.field("difficulty").type == pa.int32()
    assert schema.validate(t, "prompts") is not None
    assert t.column("task").to_pylist() == ["basic_arithmetic"] * 10 + ["spell_backward"] * 10
    assert set(t.column("split").to_pylist()) == {"val"}
    info = json.loads(t.schema.metadata[b"cropi.tasks"])
    assert info["seed"] == 3 and [s["rows"] for s in info["specs"]] == [10, 10]
    assert all(p.endswith("\n") for p in t.column("prompt").to_pylist())


def test_pool_is_deterministic_and_seeded():
    specs = ["chain_sum:difficulty=1", "simple_equations"]
    a = parquet_bytes(tasks.make_pool(specs, 15, 7))
    assert a == parquet_bytes(tasks.make_pool(specs, 15, 7))
    assert a != parquet_bytes(tasks.make_pool(specs, 15, 8))
    # key order in a spec does not change the draw
    x = tasks.make_pool(["basic_arithmetic:min_digits=1,difficulty=1"], 10, 0)
    y = tasks.make_pool(["basic_arithmetic:difficulty=1,min_digits=1"], 10, 0)
    assert x.column("id").equals(y.column("id"))


def test_ids_unique_and_stable():
    small = tasks.make_pool(["basic_arithmetic:difficulty=1"], 10, 0)
    big = tasks.make_pool(["basic_arithmetic:difficulty=1", "count_bits"], 40, 0)
    ids = big.column("id").to_pylist()
    assert len(set(ids)) == len(ids)
    # a bigger pool starts with the same rows under the same ids
    assert small.column("id").to_pylist() == ids[:10]
    assert small.column("prompt").to_pylist() == big.column("prompt").to_pylist()[:10]
    # the id is a function of (task, question): same question, same id in another pool
    other = tasks.make_pool(["basic_arithmetic"], 300, 1)
    by_q = dict(zip(map(question_of, other.column("prompt").to_pylist()), other.column("id").to_pylist()))
    again = tasks.make_pool(["basic_arithmetic"], 300, 2)
    shared = [(by_q[question_of(p)], i) for p, i in zip(again.column("prompt").to_pylist(), again.column("id").to_pylist())
              if question_of(p) in by_q]
    assert shared and all(a == b for a, b in shared)


def test_splits_draw_different_seeds_and_never_overlap():
    specs = ["basic_arithmetic:difficulty=1"]
    tr, va = tasks.make_pool(specs, 20, 0, "train"), tasks.make_pool(specs, 20, 0, "val")
    seeds = [json.loads(t.schema.metadata[b"cropi.tasks"])["specs"][0]["seed"] for t in (tr, va)]
    assert seeds[0] != seeds[1]
    # chain_sum level 0 has 200 questions (a op b, one digit each, + or -): asking each split for
    # more than exists returns what its slice holds, and the slices are disjoint
    pools = {s: set(tasks.make_pool(["chain_sum:difficulty=0"], 500, 0, s).column("prompt").to_pylist())
             for s in ("train", "val", "test")}
    assert pools["train"].isdisjoint(pools["val"]) and pools["train"].isdisjoint(pools["test"])
    assert pools["val"].isdisjoint(pools["test"])
    sizes = sorted(len(p) for p in pools.values())
    assert sum(sizes) <= 200 and sizes[-1] > 100 and sizes[0] > 5
    with pytest.raises(ValueError, match="split"):
        tasks.make_pool(specs, 5, 0, "dev")


def test_duplicate_questions_dropped_deterministically():
    # two specs with the same question space: the second skips what the first already holds
    specs = ["chain_sum:difficulty=0", "chain_sum:difficulty=0,allow_negation=false"]
    t = tasks.make_pool(specs, 120, 0)
    prompts = t.column("prompt").to_pylist()
    assert len(prompts) == len(set(prompts)) == t.num_rows
    assert 120 < t.num_rows <= 160   # 80 % of the 200 questions at most
    assert parquet_bytes(t) == parquet_bytes(tasks.make_pool(specs, 120, 0))
    with pytest.raises(ValueError, match="twice"):
        tasks.make_pool(["count_bits", "count_bits:"], 5, 0)


def test_ascii_specs_are_short_and_mixed():
    t = tasks.make_pool(list(synthetic.ASCII_SPECS), 8, 0)
    prompts = t.column("prompt").to_pylist()
    assert len(FAMILIES) >= 6 and sum(map(len, prompts)) / len(prompts) < 120
    assert all(c == "\n" or " " <= c <= "~" for p in prompts + t.column("answer").to_pylist() for c in p)
    assert len(set(t.column("difficulty").to_pylist())) >= 3


def test_default_specs_are_the_shipped_policys_mix():
    """The default pool, target and held-out sets are the specs the embedded policy was warmed up
    on (its recipe in cropi/assets/tiny/cropi.json): the target family is in the pool, the held-out
    sets are other families."""
    recipe = json.loads((models.SHIPPED_TINY / "cropi.json").read_text())["recipe"]
    assert set(tasks.DEFAULT_TRAIN_SPECS) | set(tasks.DEFAULT_HELDOUT_SPECS) == set(recipe["specs"])
    assert tasks.DEFAULT_TARGET_SPECS == (recipe["target"],)
    assert set(tasks.DEFAULT_TARGET_SPECS) < set(tasks.DEFAULT_TRAIN_SPECS)
    target = {tasks.parse_task_spec(s)[0] for s in tasks.DEFAULT_TARGET_SPECS}
    heldout = {tasks.parse_task_spec(s)[0] for s in tasks.DEFAULT_HELDOUT_SPECS}
    assert heldout and target.isdisjoint(heldout)


def test_format_prompt():
    p = tasks.format_prompt("Calculate 2 + 3.\n")
    assert p == f"Calculate 2 + 3.\n{tasks.ANSWER_INSTRUCTION}\n"
    assert tasks.ANSWER_PREFIX in tasks.ANSWER_INSTRUCTION and p.endswith("\n")


def test_summarize_pool():
    t = pa.table({"id": ["a", "b", "c"], "prompt": ["xx", "yyyy", "z"], "answer": ["1", "22", "3"],
                  "task": ["t1", "t2", "t1"], "difficulty": pa.array([0, 1, 1], pa.int32()),
                  "split": ["train"] * 3})
    s = tasks.summarize_pool(t)
    assert s["rows"] == 3 and s["tasks"] == {"t1": 2, "t2": 1} and s["difficulties"] == {0: 1, 1: 2}
    assert s["splits"] == {"train": 3} and s["task_difficulty"] == {"t1": {0: 1, 1: 1}, "t2": {1: 1}}
    assert s["prompt_chars_mean"] == pytest.approx(7 / 3, abs=0.05) and s["prompt_chars_max"] == 4
    assert s["answer_chars_max"] == 2
