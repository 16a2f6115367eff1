"""The one verifier: the reward of a response given the prompt's gold answer.

Every reward in cropi (rollout, eval, the trainer, the verl and TRL reward functions in
:mod:`cropi.integrations`) comes from :func:`reward`, so the same text gets the same score
everywhere.

1. :func:`extract_answer` finds the final answer in the response: the last of ``\\boxed{...}``
   (nested braces), a ``#### x`` line, or ``Answer: x`` (the rest of that line, or the next
   non-empty line when it is empty), whichever comes last; without any of them, the last number
   in the text (commas only as thousands separators in groups of three: ``1,234`` is 1234, while
   ``1,2,3`` and ``(2,3)`` end with the number 3).
2. The verifier compares it with the gold answer:
   - ``math`` (tasks named ``math``, tasks reasoning-gym does not know, or ``verifier="math"``):
     equal words (``No`` = ``no``), else math-verify, with the gold answer parsed as the LaTeX
     math it is (``$gold$``) so ``2^(n-1)`` stays an expression;
   - a reasoning-gym task: that task's own scorer, given the answer and the row's metadata.
3. Binary by default: 1.0 only when the verifier gives full credit. ``partial=True`` keeps
   reasoning-gym's partial credit (e.g. 0.5 for a trailing period), clipped to [0, 1].
"""

from __future__ import annotations

import json
import math
import re
import threading
from functools import cache

ANSWER_PREFIX = "Answer:"
MATH_TASKS = frozenset({"math"})  # always scored by math-verify
VERIFIERS = ("auto", "math")  # auto: the task's reasoning-gym scorer, math-verify for unknown tasks

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"^[ \t]*####[ \t]*(.*)$", re.MULTILINE)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?!\d|,\d)(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# What a task scorer raises when it cannot read a malformed answer (int("x"), a float overflow, an
# unparsable expression, deep nesting): such an answer is wrong, reward 0. Any other exception
# (a missing metadata key, a bug in cropi) propagates.
SCORER_ANSWER_ERRORS = (ValueError, TypeError, ArithmeticError, SyntaxError, RecursionError)
_WORDS = re.compile(r"[A-Za-z]+(?:[ \-'][A-Za-z]+)*")
# C(a, b) for a binomial coefficient: math-verify reads C as an unknown function, so both sides
# are rewritten to \binom{a}{b} first (arguments without parentheses or commas only).
_BINOM = re.compile(r"\bC\(\s*([^(),]+?)\s*,\s*([^(),]+?)\s*\)")


def _boxed(text: str) -> tuple[int, str] | None:
    """(start, content) of the last ``\\boxed{...}`` whose braces close, else None."""
    found = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = (m.start(), text[m.end() : i - 1].strip())
    return found


def _after_prefix(text: str) -> tuple[int, str] | None:
    """(start, answer) after the last ``Answer:``: rest of its line, or the next non-empty line."""
    i = text.rfind(ANSWER_PREFIX)
    if i < 0:
        return None
    lines = text[i + len(ANSWER_PREFIX) :].splitlines()
    first = lines[0].strip() if lines else ""
    if first:
        return i, first
    return i, next((ln.strip() for ln in lines[1:] if ln.strip()), "")


def extract_answer(response) -> str | None:
    """The final answer in ``response`` (see the module docstring), stripped; None if none."""
    if not isinstance(response, str):
        return None
    marks = [_boxed(response), _after_prefix(response)]
    hashes = list(_HASHES.finditer(response))
    if hashes:
        marks.append((hashes[-1].start(), hashes[-1].group(1).strip()))
    marks = [m for m in marks if m is not None]
    if marks:
        return max(marks)[1]
    numbers = _NUMBER.findall(response)
    return numbers[-1].replace(",", "") if numbers else None


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _as_math(text: str) -> str:
    """``text`` as math-verify's LaTeX input: ``$text$`` unless it already has ``$`` or a box."""
    text = _BINOM.sub(r"\\binom{\1}{\2}", text.strip())
    return text if "$" in text or "\\boxed" in text else f"${text}$"


def math_reward(pred: str, gold: str) -> float:
    """1.0 when ``pred`` and ``gold`` are the same answer, else 0.0.

    Words are compared without case (``No`` = ``no``; never ``no`` = ``on``); anything else goes
    to math-verify, both sides parsed as LaTeX math (``1/2`` = ``0.5`` = ``\\frac{1}{2}``,
    ``(x+1)(x-1)`` = ``(x-1)(x+1)``, ``(-1, 1)`` != ``[-1, 1]``). When either side does not
    parse, exact string match. math-verify's signal-based timeouts only work in the main
    thread; elsewhere they are off."""
    from math_verify import parse, verify

    pred, gold = pred.strip().removesuffix(".").strip(), gold.strip()
    if pred == gold:
        return 1.0
    plain_p, plain_g = pred.strip("$ "), gold.strip("$ ")
    if _WORDS.fullmatch(plain_p) or _WORDS.fullmatch(plain_g):
        return float(plain_p.casefold() == plain_g.casefold())
    t = 5 if _main_thread() else None
    g = parse(_as_math(gold), parsing_timeout=t) or parse(gold, parsing_timeout=t)
    p = parse(_as_math(pred), parsing_timeout=t) or parse(pred, parsing_timeout=t)
    if g and p:
        return float(verify(g, p, timeout_seconds=t))
    return 0.0


def _registry() -> dict:
    import reasoning_gym  # noqa: F401
    from reasoning_gym.factory import DATASETS

    return DATASETS


@cache
def _scorer(task: str):
    from reasoning_gym.factory import get_score_answer_fn

    return get_score_answer_fn(task)


def _metadata(metadata) -> dict:
    if isinstance(metadata, dict):
        return metadata
    if isinstance(metadata, str) and metadata:
        try:
            value = json.loads(metadata)
        except json.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}
    return {}


def uses_math(task: str, verifier: str = "auto") -> bool:
    """Whether rows of ``task`` are verified by math-verify (else by the reasoning-gym scorer)."""
    if verifier not in VERIFIERS:
        raise ValueError(f"unknown verifier {verifier!r} (choose from {', '.join(VERIFIERS)})")
    return verifier == "math" or task in MATH_TASKS or task not in _registry()


def reward(response: str, answer: str, task: str, metadata: str | dict | None = None, *,
           verifier: str = "auto", partial: bool = False) -> float:
    """Reward in [0, 1] of one response to a prompt with gold ``answer`` (module docstring).

    0.0 when no answer can be extracted. ``metadata`` (JSON str or dict) is what the task's
    reasoning-gym scorer needs besides the answer. Never raises on model output: math-verify
    returns no match on what it cannot parse, and a task scorer's ``SCORER_ANSWER_ERRORS`` give
    0.0; anything else a scorer raises (e.g. KeyError for metadata the row lacks) propagates."""
    use_math = uses_math(task, verifier)
    pred = extract_answer(response)
    if pred is None:
        return 0.0
    if use_math:
        r = math_reward(pred, str(answer))  # math-verify's parse/verify report failures, never raise
    else:
        try:
            r = float(_scorer(task)(pred, {"answer": str(answer), "metadata": _metadata(metadata)}))
        except SCORER_ANSWER_ERRORS:
            return 0.0
    if not math.isfinite(r):
        return 0.0
    if partial:
        return min(max(r, 0.0), 1.0)
    return 1.0 if r >= 1.0 - 1e-9 else 0.0


def rewards(responses: list[str], rows: list[dict], *, verifier: str = "auto", partial: bool = False) -> list[float]:
    """:func:`reward` for each (response, row); rows carry ``answer``, ``task`` and optionally
    ``metadata``."""
    if len(responses) != len(rows):
        raise ValueError(f"{len(responses)} responses for {len(rows)} rows")
    return [reward(r, row["answer"], row.get("task", "unknown"), row.get("metadata"), verifier=verifier, partial=partial)
            for r, row in zip(responses, rows)]
