"""Countdown: reach a target with + - * / using each given number exactly once.

The paper's third task (data: ``Jiayi-Pan/Countdown-Tasks-3to4-Unique``, rows 0-7,499 train, 7,500-12,499 test;
offline: :func:`generate`'s reproducible, solvable puzzles).

Reward (:func:`score`, the paper's 0/1): 1.0 iff the response, without trailing whitespace and end-of-sequence
markers (:data:`EOS_MARKERS`), **ends with** ``<think> ANYTHING </think> <answer> EQ </answer>`` (whitespace allowed
between the tags, any text before ``<think>``), and EQ has only ASCII digits, ``+ - * / ( )`` and spaces (no ``**``,
``//``, unary signs, decimals or names), uses exactly the given multiset of numbers and evaluates (exact rational
arithmetic, parsed with :mod:`ast`, never ``eval``) to the target within 1e-5.

The tiny model's compact format: prompt ``"3 7 20->41:"``, response ``"<think></think><answer>3*7+20</answer>"``
(``think=True``: ``"<think>3*7=21 21+20=41</think><answer>3*7+20</answer>"``).
"""

from __future__ import annotations

import ast
import itertools
import operator
import os
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, NamedTuple

import datasets

from tre_edu.tasks.base import Task, check_choice, check_options, load_or_fallback

HUB_ID = "Jiayi-Pan/Countdown-Tasks-3to4-Unique"
SPLIT_ROWS = {"train": (0, 7500), "test": (7500, 12500)}  # the paper's rows [start, stop) of the hub's train split

# The paper's prompt, exact text; ``{nums}`` is a Python list ("[3, 7, 20]") as in the reward code it builds on.
PROMPT = (
    "Using the numbers {nums}, create an equation that equals {target}. "
    "You can use basic arithmetic operations (+, -, *, /) and each number can only be used once. "
    "Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)
COMPACT_PROMPT = "{nums}->{target}:"  # the tiny model's prompt (all single tokens of the tiny tokenizer)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
EOS_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>", "<eos>")

# Limits of the equation checker: anything beyond them scores 0 (and is rejected before parsing).
MAX_RESPONSE_CHARS = 100_000
MAX_EQUATION_CHARS = 200
MAX_PAREN_DEPTH = 32
MAX_LITERALS = 16
MAX_MAGNITUDE = 10**12
TOLERANCE = 1e-5
_ALLOWED_CHARS = frozenset("0123456789+-*/() ")
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def extract_answer(response: str) -> str | None:
    """The EQ of a response that ends with ``<think>...</think> <answer>EQ</answer>``, else None (linear time)."""
    if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
        return None
    text = response.rstrip()
    while marker := next((m for m in EOS_MARKERS if text.endswith(m)), None):
        text = text[: -len(marker)].rstrip()
    body = text.removesuffix(ANSWER_CLOSE)
    if body == text or (start := body.rfind(ANSWER_OPEN)) < 0:
        return None
    before = body[:start].rstrip()
    if not before.endswith(THINK_CLOSE) or THINK_OPEN not in before[: -len(THINK_CLOSE)]:
        return None
    return body[start + len(ANSWER_OPEN) :]


def _eval_node(node: ast.AST, literals: list[int], steps: list[str] | None = None) -> Fraction:
    """Exact value of an allowed expression node (each operation appended to ``steps`` as ``"3*7=21"``); raises
    ValueError (or ZeroDivisionError) on anything else."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        op = _OPS[type(node.op)]
        left, right = _eval_node(node.left, literals, steps), _eval_node(node.right, literals, steps)
        value = _APPLY[op](left, right)
        if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
            raise ValueError("intermediate value too large")
        if steps is not None:
            steps.append(f"{left}{op}{right}={value}")  # a Fraction prints as "21" or "8/3"
        return value
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
        literals.append(node.value)
        if len(literals) > MAX_LITERALS or node.value > MAX_MAGNITUDE:
            raise ValueError("too many or too large literals")
        return Fraction(node.value)
    raise ValueError(f"node not allowed: {type(node).__name__}")


def evaluate_equation(equation: str) -> tuple[Fraction, list[int]] | None:
    """Exact value and integer literals of a valid Countdown equation, else None; length, characters and nesting
    depth are checked before the parser sees the string."""
    if not isinstance(equation, str):
        return None
    eq = equation.strip()
    if not eq or len(eq) > MAX_EQUATION_CHARS or not set(eq) <= _ALLOWED_CHARS or "**" in eq or "//" in eq:
        return None
    depths = list(itertools.accumulate((ch == "(") - (ch == ")") for ch in eq))
    if depths[-1] != 0 or not all(0 <= d <= MAX_PAREN_DEPTH for d in depths):
        return None
    try:
        literals: list[int] = []
        value = _eval_node(ast.parse(eq, mode="eval").body, literals)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError, ZeroDivisionError):
        return None
    return value, literals


def score(response: str, numbers: Any = None, target: Any = None, **_: Any) -> float:
    """The paper's reward (never raises); ``score(response, **example)`` works."""
    try:
        result = evaluate_equation(extract_answer(response))
        if result is None or any(int(n) != n for n in numbers) or sorted(result[1]) != sorted(map(int, numbers)):
            return 0.0
        target_value = Fraction(target) if isinstance(target, (int, float)) else Fraction(int(target))
        return float(abs(float(result[0] - target_value)) <= TOLERANCE)
    except Exception:  # malformed numbers / target (or anything unforeseen): never raise from a reward
        return 0.0


class _Expr(NamedTuple):
    """A node of a solution tree: a number (``op`` None) or ``left op right``; ``value`` is exact."""

    value: Fraction
    op: str | None = None
    left: _Expr | None = None
    right: _Expr | None = None

    def __str__(self) -> str:
        if self.op is None:
            return str(self.value)
        prec, left_prec, right_prec = (_PREC.get(e.op, 3) for e in (self, self.left, self.right))  # a number: 3
        # a - (b + c) and a / (b * c) need parentheses; a + (b - c) and a * (b / c) do not (exact arithmetic)
        left = f"({self.left})" if left_prec < prec else str(self.left)
        right = f"({self.right})" if right_prec < prec or (right_prec == prec and self.op in "-/") else str(self.right)
        return f"{left}{self.op}{right}"


def _combine(a: _Expr, b: _Expr, domain: str) -> list[_Expr]:
    """Every ``a op b`` (both orders for - and /), simple first (+ * - /), whose value lies in ``domain``:
    'natural' (integers >= 0), 'integer' or 'rational'."""
    x, y = a.value, b.value
    out = [_Expr(x + y, "+", a, b), _Expr(x * y, "*", a, b), _Expr(x - y, "-", a, b), _Expr(y - x, "-", b, a)]
    out += ([_Expr(x / y, "/", a, b)] if y != 0 else []) + ([_Expr(y / x, "/", b, a)] if x != 0 else [])
    if domain == "rational":
        return out
    return [e for e in out if e.value.denominator == 1 and (domain == "integer" or e.value >= 0)]


def _search(items: list[_Expr], target: Fraction, domain: str) -> _Expr | None:
    if len(items) == 1:
        return items[0] if items[0].value == target else None
    for i, j in itertools.combinations(range(len(items)), 2):
        rest = [e for k, e in enumerate(items) if k not in (i, j)]
        for new in _combine(items[i], items[j], domain):
            if (found := _search([new] + rest, target, domain)) is not None:
                return found
    return None


def solve(numbers: list[int], target: int | float) -> str | None:
    """An equation using each of ``numbers`` once that equals ``target``, or None if there is none.

    Exhaustive over binary trees and operators with exact fractions, in three passes so the answer is deterministic
    and simple: non-negative integer intermediate values, then integers, then fractions (``8/(3-8/3)``)."""
    nums = [int(n) for n in numbers]
    if not nums or any(n < 0 for n in nums):
        raise ValueError(f"numbers must be a non-empty list of non-negative integers; got {numbers!r}")
    leaves = [_Expr(Fraction(n)) for n in nums]
    for domain in ("natural", "integer", "rational"):
        if (found := _search(leaves, Fraction(target), domain)) is not None:
            return str(found)
    return None


def think_trace(numbers: list[int], target: int | float, solution: str) -> str:
    """The steps of ``solution`` in evaluation order, fractions as ``p/q``: ``"3*7=21 21+20=41"``; ValueError if
    ``solution`` does not use exactly ``numbers`` or does not equal ``target``."""
    result = evaluate_equation(solution)
    if result is None or sorted(result[1]) != sorted(int(n) for n in numbers):
        raise ValueError(f"solution must be a valid equation using exactly {list(numbers)}; got {solution!r}")
    if abs(float(result[0] - Fraction(target))) > TOLERANCE:
        raise ValueError(f"solution {solution!r} does not equal target {target!r}")
    steps: list[str] = []
    _eval_node(ast.parse(solution.strip(), mode="eval").body, [], steps)
    return " ".join(steps)


def generate(
    n: int,
    seed: int = 0,
    num_count: int = 3,
    number_range: tuple[int, int] = (1, 20),
    target_range: tuple[int, int] = (1, 100),
    max_tries: int = 1000,
) -> list[dict[str, Any]]:
    """``n`` random solvable puzzles ``{numbers, target, solution, source="generated"}``, reproducible for a seed.

    ``num_count`` numbers uniform in ``number_range`` are combined in a random binary tree with random operators
    (integer arithmetic only); an integer result inside ``target_range`` is the target, :func:`solve` the solution."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0; got {n!r}")
    check_options("countdown", dict(num_count=num_count, number_range=number_range, target_range=target_range), "")
    (lo, hi), (tlo, thi) = number_range, target_range
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for _ in range(n):
        for _try in range(max_tries):
            numbers = [rng.randint(lo, hi) for _ in range(num_count)]
            values = [Fraction(v) for v in numbers]
            while len(values) > 1:  # random tree: repeatedly combine two random values
                i, j = rng.sample(range(len(values)), 2)
                a, b = values[i], values[j]
                op = rng.choice("+-*/")
                if op == "/" and (b == 0 or (a / b).denominator != 1):
                    op = rng.choice("+*")
                values = [v for k, v in enumerate(values) if k not in (i, j)] + [_APPLY[op](a, b)]
            target = values[0]
            if target.denominator == 1 and tlo <= target <= thi and (solution := solve(numbers, int(target))):
                out.append({"numbers": numbers, "target": int(target), "solution": solution, "source": "generated"})
                break
        else:
            raise ValueError(
                f"could not generate a puzzle with number_range={number_range} and target_range={target_range} "
                f"in {max_tries} tries; widen the ranges"
            )
    return out


def _hub_rows(start: int, count: int, stop: int) -> list[dict[str, Any]]:
    if os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise RuntimeError("HF_DATASETS_OFFLINE is set")
    data = datasets.load_dataset(HUB_ID, split="train")
    if len(data) < stop:
        raise RuntimeError(f"{HUB_ID} has {len(data)} rows; the paper's split needs {stop}")
    return [
        {"numbers": [int(v) for v in row["nums"]], "target": int(row["target"]), "solution": None, "source": HUB_ID}
        for row in data.select(range(start, start + count))
    ]


def load(
    split: str = "train",
    n: int | None = None,
    offline_ok: bool = True,
    seed: int = 0,
    num_count: int = 3,
    number_range: tuple[int, int] = (1, 20),
    target_range: tuple[int, int] = (1, 100),
) -> list[dict[str, Any]]:
    """The first ``n`` puzzles of ``split`` ("train" / "test") of :data:`HUB_ID` with the paper's rows
    (``solution=None``: solved on demand). Offline (``HF_DATASETS_OFFLINE=1`` or any load failure), with
    ``offline_ok``: :func:`generate`'s puzzles (``n``, default 7,500 / 5,000; the generator options only apply here)
    with a split-dependent seed, so train and test differ."""
    check_choice("split", split, SPLIT_ROWS)
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be None or an integer >= 0; got {n!r}")
    start, stop = SPLIT_ROWS[split]
    count = stop - start if n is None else min(n, stop - start)
    split_seed = seed * 1000 + (0 if split == "train" else 1)  # train and test differ for every seed
    return load_or_fallback(
        HUB_ID,
        lambda: _hub_rows(start, count, stop),
        f"generated puzzles ({count} for split {split!r}, num_count={num_count}, numbers in {tuple(number_range)})",
        lambda: generate(count, split_seed, num_count, number_range, target_range),
        offline_ok,
    )


@dataclass(eq=False)
class CountdownTask(Task):
    """Countdown as a :class:`~tre_edu.tasks.base.Task`. ``num_count``, ``number_range``, ``target_range``: the
    generated puzzles (offline fallback, tiny model); ``think``: reference responses carry a worked trace (longer
    horizon); ``style``: the default prompt style ("compact" for the tiny model)."""

    num_count: int = 3
    number_range: tuple[int, int] = (1, 20)
    target_range: tuple[int, int] = (1, 100)
    think: bool = False
    style: str = "compact"

    name = "countdown"
    success_threshold = 1.0

    def __post_init__(self):
        check_options("countdown", dict(vars(self)), prefix="")
        self.number_range, self.target_range = tuple(self.number_range), tuple(self.target_range)

    def generate(self, n: int, seed: int = 0) -> list[dict[str, Any]]:
        return generate(n, seed, self.num_count, self.number_range, self.target_range)

    def load(
        self, split: str = "train", n: int | None = None, seed: int = 0, offline_ok: bool = True
    ) -> list[dict[str, Any]]:
        return load(split, n, offline_ok, seed, self.num_count, self.number_range, self.target_range)

    def user_text(self, example: dict[str, Any], style: str) -> str:
        nums, target = [int(v) for v in example["numbers"]], example["target"]
        if style == "compact":
            return COMPACT_PROMPT.format(nums=" ".join(map(str, nums)), target=target)
        return PROMPT.format(nums=nums, target=target)

    def sample_metrics(self, texts: list[str], rewards: list[float], n: int) -> dict[str, float]:
        """``distinct_correct``: the mean, over examples with a correct sample, of the number of distinct correct
        equations (spaces ignored) among its ``n`` samples."""
        counts = []
        for i in range(0, len(texts), n):
            pairs = zip(texts[i : i + n], rewards[i : i + n], strict=True)
            if answers := {(extract_answer(t) or "").replace(" ", "") for t, r in pairs if r >= self.success_threshold}:
                counts.append(len(answers))
        return {"distinct_correct": sum(counts) / len(counts) if counts else 0.0}

    def score(self, response: str, example: dict[str, Any]) -> float:
        return score(response, example.get("numbers"), example.get("target")) if isinstance(example, dict) else 0.0

    def reference_response(self, example: dict[str, Any], think: bool | None = None) -> str:
        """The target response of a warm start: ``<think>[trace]</think><answer>solution</answer>`` (the puzzle is
        solved if it has no ``solution``; ValueError if it has none)."""
        numbers, target = example["numbers"], example["target"]
        solution = example.get("solution") or solve(numbers, target)
        if solution is None:
            raise ValueError(f"puzzle {numbers} -> {target} has no solution")
        trace = think_trace(numbers, target, solution) if (self.think if think is None else think) else ""
        return f"{THINK_OPEN}{trace}{THINK_CLOSE}{ANSWER_OPEN}{solution}{ANSWER_CLOSE}"


make_task = CountdownTask  # what tre_edu.tasks.get_task("countdown", **options) calls
