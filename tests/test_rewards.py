"""The one verifier: answer extraction in every form a model writes, math answers judged as a
mathematician would, reasoning-gym tasks by their own scorers, binary unless asked."""

import json

import pytest
import reasoning_gym
import synthetic

from cropi import rewards, tasks
from cropi.rewards import extract_answer, reward

FAMILIES = sorted({tasks.parse_task_spec(s)[0] for s in synthetic.ASCII_SPECS})


def test_extract_answer_forms():
    assert extract_answer("Answer: 42") == "42"
    assert extract_answer("Answer: 1\nsome work\nAnswer:  -5 \nmore") == "-5"
    assert extract_answer("Answer:7\r\nx") == "7"
    assert extract_answer("so the Answer: dud. Done") == "dud. Done"
    assert extract_answer("Answer:") == ""
    assert extract_answer("Answer:\n239") == "239"            # answer on the next line
    assert extract_answer("Answer:\n\n  239  \nwhy") == "239"
    assert extract_answer("so \\boxed{\\frac{n(n-3)}{2}} done") == "\\frac{n(n-3)}{2}"   # nested braces
    assert extract_answer("\\boxed{1} then \\boxed{\\{1,2\\}}") == "\\{1,2\\}"           # the last box
    assert extract_answer("\\boxed{unclosed {") is None
    assert extract_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert extract_answer("Answer: 3\nwait, more work\n\\boxed{4}") == "4"                # the last marker wins
    assert extract_answer("\\boxed{4}\nAnswer: 5") == "5"
    assert extract_answer("the total is 1,250 and then 17.5 apples") == "17.5"           # final number
    assert extract_answer("answer: 42") == "42"                                          # final number
    assert extract_answer("no digits here") is None
    assert extract_answer(None) is None and extract_answer(17) is None


# (response, gold, verdict a mathematician gives): 40 kinds of case, right and wrong
MATH_CASES = [
    ("Answer: 2", "2^(n-1)", 0.0),                      # a number is not the expression
    ("Answer: 2^{n-1}", "2^(n-1)", 1.0),
    ("Answer: 2^(n-1)", "2^{n-1}", 1.0),
    ("Answer: 2^n", "2^(n-1)", 0.0),
    ("Answer: C(n, 2m)", "C(n+1, 2m+1)", 0.0),
    ("Answer: C(n+1, 2m+1)", "C(n+1, 2m+1)", 1.0),
    ("Answer: \\binom{n}{2m}", "C(n, 2m)", 1.0),
    ("Answer: (-1, 1)", "[-1, 1]", 0.0),                # open vs closed interval
    ("Answer: [-1,1]", "[-1, 1]", 1.0),
    ("Answer: (-\\infty, 2]", "(-\\infty, 2]", 1.0),
    ("Answer: no", "No", 1.0),
    ("Answer: Yes", "No", 0.0),
    ("Answer: on", "No", 0.0),                          # same letters, other word
    ("Answer: (x-1)(x+1)", "(x+1)(x-1)", 1.0),          # reordered factors
    ("Answer: (x+1)^2", "x^2+2x+1", 1.0),
    ("Answer: (x+1)^2", "x^2+1", 0.0),
    ("\\boxed{\\frac{n(n-3)}{2}}", "n(n-3)/2", 1.0),
    ("Answer: n(n-3)/2", "\\frac{n(n-3)}{2}", 1.0),
    ("Answer: n(n-2)/2", "\\frac{n(n-3)}{2}", 0.0),
    ("The answer is \\boxed{239}.", "239", 1.0),
    ("\\boxed{238}", "239", 0.0),
    ("Answer:\n239", "239", 1.0),                       # multi-line
    ("Let me think.\nStep 1: 200 + 39\nAnswer:\n\n239\n", "239", 1.0),
    ("#### 72", "72", 1.0),
    ("She sold 48 + 24 clips.\n#### 71", "72", 0.0),
    ("Answer: 1/2", "0.5", 1.0),
    ("Answer: 0.5", "\\frac{1}{2}", 1.0),
    ("Answer: \\dfrac{1}{2}", "$\\frac{1}{2}$", 1.0),
    ("Answer: 1/3", "0.5", 0.0),
    ("Answer: 3/4", "4/3", 0.0),
    ("Answer: \\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("Answer: 3.0", "3", 1.0),
    ("Answer: -7", "7", 0.0),
    ("Answer: 1,000", "1000", 1.0),
    ("Answer: 2, 3", "3, 2", 1.0),                      # a set of solutions in any order
    ("Answer: (1, 2)", "(2, 1)", 0.0),                  # an ordered pair is not reordered
    ("Answer: x = 3", "3", 1.0),
    ("Answer: 3.14159", "\\pi", 0.0),                   # an approximation is not pi
    ("The final result after all of that is 42", "42", 1.0),   # a final number, no marker
    ("I computed 41, not 42, so 41", "42", 0.0),
    ("I cannot solve this.", "42", 0.0),               # nothing to extract
    ("Answer: Paris", "Paris", 1.0),                    # not math: the words
    ("Answer: Lyon", "Paris", 0.0),
]


@pytest.mark.parametrize("response,gold,want", MATH_CASES)
@pytest.mark.parametrize("task", ["math", "my_user_pool"])  # named math / unknown to reasoning-gym
def test_math_verdicts(response, gold, want, task):
    assert reward(response, gold, task) == want


def test_math_case_table_is_large_and_mixed():
    assert len(MATH_CASES) >= 34
    assert 0.3 < sum(w for *_, w in MATH_CASES) / len(MATH_CASES) < 0.7


def test_verifier_math_overrides_the_task_scorer():
    # basic_arithmetic's scorer wants the exact text; the math verifier accepts 1/2 for 0.5
    meta = json.dumps({"expression": "1 / 2"})
    assert reward("Answer: 1/2", "0.5", "basic_arithmetic", meta) == 0.0
    assert reward("Answer: 1/2", "0.5", "basic_arithmetic", meta, verifier="math") == 1.0
    with pytest.raises(ValueError, match="unknown verifier"):
        reward("Answer: 1", "1", "math", verifier="maths")


@pytest.mark.parametrize("family", FAMILIES)
def test_reasoning_gym_scorers_binary_and_partial(family):
    """Entries straight from reasoning-gym (metadata as live objects) against our reward on the
    same answer text, metadata passed as the pool stores it (JSON)."""
    ds = reasoning_gym.create_dataset(family, seed=11, size=6)
    own = reasoning_gym.get_score_answer_fn(family)
    for i in range(6):
        entry = ds[i]
        gold = str(entry["answer"])
        meta = json.dumps(entry["metadata"], sort_keys=True)
        assert reward(f"Answer: {gold}", gold, family, meta) == own(gold, entry) == 1.0
        for wrong in ("7" + gold, gold[::-1] + "1", "hello"):
            text = f"work...\nAnswer: {wrong}\n"
            assert reward(text, gold, family, meta, partial=True) == pytest.approx(own(wrong, entry))
            assert reward(text, gold, family, meta) == 0.0


def test_partial_credit_only_when_asked():
    # reasoning-gym gives a wrong spell_backward answer partial credit, and 0.5 for a trailing period
    entry = {"answer": "olleh", "metadata": {"word": "hello"}}
    own = reasoning_gym.get_score_answer_fn("spell_backward")
    meta = json.dumps(entry["metadata"])
    for wrong in ("olleh.", "ollhe"):
        assert 0.0 < own(wrong, entry) < 1.0
        assert reward(f"Answer: {wrong}", "olleh", "spell_backward", meta) == 0.0
        assert reward(f"Answer: {wrong}", "olleh", "spell_backward", meta, partial=True) == pytest.approx(own(wrong, entry))


def test_gold_answers_score_one():
    t = tasks.make_pool(list(synthetic.ASCII_SPECS), 3, 5, "val")
    rows = t.to_pylist()
    assert rewards.rewards([f"Answer: {r['answer']}" for r in rows], rows) == [1.0] * len(rows)
    assert rewards.rewards([f"\\boxed{{{r['answer']}}}" for r in rows], rows) == [1.0] * len(rows)
    assert max(rewards.rewards([f"Answer: 9{r['answer']}x" for r in rows], rows)) < 1.0


@pytest.mark.parametrize("task", ["basic_arithmetic", "complex_arithmetic", "spell_backward", "math", "unknown"])
def test_garbage_never_raises(task):
    garbage = [None, 17, b"Answer: 3", "", "\x00\xff Answer: \x00", "Answer: " + "(" * 500,
               "Answer: 9" * 2000, "Answer: 1e999999", "Answer: nan", "Answer: \\frac{", "Answer: [[[",
               "Answer: 1 + 2i + + i", "\\boxed{" * 300, "#### " + "}" * 50]
    meta = "{}"
    if task in reasoning_gym.factory.DATASETS:  # the row's own metadata, as its scorer needs it
        meta = tasks.make_pool([task], 1, 0).column("metadata")[0].as_py()
    for g in garbage:
        r = reward(g, "3", task, meta)
        assert r in (0.0, 1.0)
    with pytest.raises(KeyError):  # the scorer needs metadata the row lacks: a data error, not a wrong answer
        reward("Answer: 3", "3", "complex_arithmetic", "{not json")


def test_final_number_thousands_separators_need_groups_of_three():
    assert extract_answer("so it is 1,2,3") == "3"
    assert extract_answer("the point (2,3)") == "3"
    assert extract_answer("a list 10,20") == "20"
    assert extract_answer("total 1,234 apples") == "1234"
    assert extract_answer("total -1,234,567.25") == "-1234567.25"
    assert extract_answer("1,2345") == "2345"
    assert extract_answer("1,234,56") == "56"
    assert reward("x = 1,2,3", "123", "math") == 0.0
    assert reward("x = 1,2,3", "3", "math") == 1.0


def test_only_answer_parsing_failures_score_zero(monkeypatch):
    """A scorer that cannot read the answer gives 0; any other exception is a bug and propagates."""
    def scorer_raising(exc):
        return lambda answer, entry: (_ for _ in ()).throw(exc)

    for exc in (ValueError("bad int"), ZeroDivisionError(), OverflowError(), SyntaxError("x"), RecursionError()):
        monkeypatch.setattr(rewards, "_scorer", lambda task, exc=exc: scorer_raising(exc))
        assert reward("Answer: 3", "3", "basic_arithmetic") == 0.0
    for exc in (AttributeError("bug"), KeyError("result"), NameError("x"), AssertionError()):
        monkeypatch.setattr(rewards, "_scorer", lambda task, exc=exc: scorer_raising(exc))
        with pytest.raises(type(exc)):
            reward("Answer: 3", "3", "basic_arithmetic")


def test_rewards_batch():
    rows = [{"answer": "5", "task": "basic_arithmetic", "metadata": "{}"},
            {"answer": "0.5", "task": "math"}, {"answer": "cat", "task": "spell_backward"}]
    resp = ["Answer: 5", "\\boxed{\\frac{1}{2}}", "nothing"]
    assert rewards.rewards(resp, rows) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        rewards.rewards(resp[:2], rows)


def test_no_second_verifier_left():
    """tasks.py builds prompts; every reward goes through cropi.rewards."""
    for name in ("extract_answer", "math_reward", "reward", "rewards"):
        assert not hasattr(tasks, name)
