"""Countdown: reach a target with + - * / using each given number exactly once.

The paper's third task (data: ``Jiayi-Pan/Countdown-Tasks-3to4-Unique``, rows 0-7,499 train,
7,500-12,499 test). This module has everything the task needs on a CPU and on a GPU:

- :func:`generate`: reproducible random puzzles, every one solvable (offline fallback, tiny-model data);
- :func:`solve`: an exhaustive solver with exact fractions that prefers simple, integer-only solutions;
- :func:`think_trace`: a worked trace of the steps ("3*7=21 21+20=41") for the longer-horizon variant;
- :func:`score`: the paper's 0/1 reward, parsed with :mod:`ast` and evaluated exactly (never ``eval``);
- :data:`PROMPT` (the paper's prompt, exact text) and the compact prompt of the tiny model;
- :func:`load`: the hub dataset with the paper's row split and a clear offline fallback;
- :class:`CountdownTask` / :func:`make_task`: the :class:`~tre_edu.tasks.base.Task` used by the trainer.

Response format (one checker for every model)
---------------------------------------------
A response scores 1.0 iff, after removing trailing whitespace and end-of-sequence markers (``<|im_end|>``,
``<|endoftext|>``, ``<|eot_id|>``, ``</s>``, ``<eos>``), it **ends with**::

    <think> ANYTHING </think> <answer> EQ </answer>

where whitespace is allowed between ``</think>`` and ``<answer>`` and inside the answer tags, any
text may come before ``<think>``, and EQ

- contains only ASCII digits, ``+ - * / ( )`` and spaces (no ``**``, ``//``, unary signs, decimals or names),
- uses exactly the given multiset of numbers (each once),
- evaluates (exact rational arithmetic) to the target within 1e-5.

The compact format of the tiny model is the same format with no spaces and (by default) an empty think block::

    prompt:   "3 7 20->41:"
    response: "<think></think><answer>3*7+20</answer>"             (think=False)
    response: "<think>3*7=21 21+20=41</think><answer>3*7+20</answer>"  (think=True, the longer horizon)
"""

from __future__ import annotations

import ast
import itertools
import os
import random
import warnings
from fractions import Fraction
from typing import Any

import datasets

from tre_edu.tasks.base import Task, apply_chat_template, check_options

HUB_ID = "Jiayi-Pan/Countdown-Tasks-3to4-Unique"
# The paper's split of the hub dataset's single "train" split: rows [start, stop).
SPLIT_ROWS = {"train": (0, 7500), "test": (7500, 12500)}
SPLITS = tuple(SPLIT_ROWS)

# The paper's prompt, exact text. ``{nums}`` is the list of numbers written as a Python list ("[3, 7, 20]"),
# as in the public reward code the paper builds on.
PROMPT = (
    "Using the numbers {nums}, create an equation that equals {target}. "
    "You can use basic arithmetic operations (+, -, *, /) and each number can only be used once. "
    "Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)
# The tiny model's prompt: the numbers, "->", the target, ":" (all single tokens of the tiny tokenizer).
COMPACT_PROMPT = "{nums}->{target}:"

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
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


# ------------------------------------------------------------------------------------------------------------
# Reward
# ------------------------------------------------------------------------------------------------------------
def extract_answer(response: str) -> str | None:
    """The EQ of a response that ends with ``<think>...</think> <answer>EQ</answer>``, else None.

    Linear time in the response length; never raises on strings.
    """
    if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
        return None
    text = response.rstrip()
    stripped = True
    while stripped:  # remove any trailing EOS markers (and the whitespace around them)
        stripped = False
        for marker in EOS_MARKERS:
            if text.endswith(marker):
                text = text[: -len(marker)].rstrip()
                stripped = True
    if not text.endswith(ANSWER_CLOSE):
        return None
    body_end = len(text) - len(ANSWER_CLOSE)
    start = text.rfind(ANSWER_OPEN, 0, body_end)
    if start < 0:
        return None
    equation = text[start + len(ANSWER_OPEN) : body_end]
    before = text[:start].rstrip()
    if not before.endswith(THINK_CLOSE):
        return None
    if before.rfind(THINK_OPEN, 0, len(before) - len(THINK_CLOSE)) < 0:
        return None
    return equation


def _apply(op: str, left: Fraction, right: Fraction) -> Fraction:
    """``left op right`` exactly; raises ValueError on division by zero."""
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    if right == 0:
        raise ValueError("division by zero")
    return left / right


def _eval_node(node: ast.AST, literals: list[int]) -> Fraction:
    """Exact value of an allowed expression node; raises ValueError on anything else."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left = _eval_node(node.left, literals)
        right = _eval_node(node.right, literals)
        value = _apply(_OPS[type(node.op)], left, right)
        if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
            raise ValueError("intermediate value too large")
        return value
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
        literals.append(node.value)
        if len(literals) > MAX_LITERALS or node.value > MAX_MAGNITUDE:
            raise ValueError("too many or too large literals")
        return Fraction(node.value)
    raise ValueError(f"node not allowed: {type(node).__name__}")


def evaluate_equation(equation: str) -> tuple[Fraction, list[int]] | None:
    """Exact value and the integer literals of a Countdown equation, or None if it is not a valid equation.

    Valid: only ASCII digits, ``+ - * / ( )`` and spaces, at most :data:`MAX_EQUATION_CHARS` characters and
    :data:`MAX_PAREN_DEPTH` nested parentheses, binary ``+ - * /`` on non-negative integer literals (no unary
    signs, no ``**`` or ``//``), no division by zero, |intermediate values| <= :data:`MAX_MAGNITUDE`.
    """
    if not isinstance(equation, str):
        return None
    eq = equation.strip()
    if not eq or len(eq) > MAX_EQUATION_CHARS or not set(eq) <= _ALLOWED_CHARS:
        return None
    if "**" in eq or "//" in eq:
        return None
    depth = 0
    for ch in eq:  # balanced parentheses, bounded depth: checked before the parser ever sees the string
        if ch == "(":
            depth += 1
            if depth > MAX_PAREN_DEPTH:
                return None
        elif ch == ")":
            depth -= 1
            if depth < 0:
                return None
    if depth != 0:
        return None
    try:
        tree = ast.parse(eq, mode="eval")
        literals: list[int] = []
        value = _eval_node(tree.body, literals)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError, ZeroDivisionError):
        return None
    return value, literals


def score(response: str, numbers: Any = None, target: Any = None, **_: Any) -> float:
    """The paper's Countdown reward: 1.0 for a correct, well-formatted answer, else 0.0. Never raises.

    ``score(response, **example)`` works (extra example fields are ignored). See the module docstring for the
    exact format that passes.
    """
    try:
        equation = extract_answer(response)
        if equation is None:
            return 0.0
        result = evaluate_equation(equation)
        if result is None:
            return 0.0
        value, literals = result
        wanted = sorted(int(n) for n in numbers)
        if any(int(n) != n for n in numbers) or sorted(literals) != wanted:
            return 0.0
        target_value = Fraction(target) if isinstance(target, (int, float)) else Fraction(int(target))
        return 1.0 if abs(float(value - target_value)) <= TOLERANCE else 0.0
    except Exception:  # malformed numbers / target (or anything unforeseen): never raise from a reward
        return 0.0


# ------------------------------------------------------------------------------------------------------------
# Solver and traces
# ------------------------------------------------------------------------------------------------------------
class _Expr:
    """A node of a solution tree: a leaf number or ``left op right``; ``value`` is exact."""

    __slots__ = ("value", "op", "left", "right")

    def __init__(self, value: Fraction, op: str | None = None, left=None, right=None):
        self.value, self.op, self.left, self.right = value, op, left, right

    def prec(self) -> int:
        return 3 if self.op is None else _PREC[self.op]

    def __str__(self) -> str:
        if self.op is None:
            return str(self.value.numerator)
        left, right = str(self.left), str(self.right)
        if self.left.prec() < self.prec():
            left = f"({left})"
        # a - (b + c) and a / (b * c) need parentheses; a + (b - c) and a * (b / c) do not (exact arithmetic)
        if self.right.prec() < self.prec() or (self.right.prec() == self.prec() and self.op in "-/"):
            right = f"({right})"
        return f"{left}{self.op}{right}"


def _combine(a: _Expr, b: _Expr, domain: str):
    """All ``a op b`` (both orders for - and /) allowed in ``domain``: 'natural' (integers >= 0), 'integer' or
    'rational'. Order: + * - / (simple first)."""
    x, y = a.value, b.value
    out = [_Expr(x + y, "+", a, b), _Expr(x * y, "*", a, b)]
    out += [_Expr(x - y, "-", a, b), _Expr(y - x, "-", b, a)]
    if y != 0:
        out.append(_Expr(x / y, "/", a, b))
    if x != 0:
        out.append(_Expr(y / x, "/", b, a))
    if domain == "rational":
        return out
    out = [e for e in out if e.value.denominator == 1]
    if domain == "natural":
        out = [e for e in out if e.value >= 0]
    return out


def _search(items: list[_Expr], target: Fraction, domain: str) -> _Expr | None:
    if len(items) == 1:
        return items[0] if items[0].value == target else None
    for i, j in itertools.combinations(range(len(items)), 2):
        rest = [e for k, e in enumerate(items) if k not in (i, j)]
        for new in _combine(items[i], items[j], domain):
            found = _search([new] + rest, target, domain)
            if found is not None:
                return found
    return None


def solve(numbers: list[int], target: int | float) -> str | None:
    """An equation using each of ``numbers`` exactly once that equals ``target``, or None if there is none.

    Exhaustive over all binary trees and operators with exact fractions (about 4k leaves for 4 numbers). The
    search runs in three passes and returns the first solution found, so the answer is deterministic and
    simple: first with non-negative integer intermediate values, then integers, then fractions (e.g.
    ``8/(3-8/3)``).
    """
    nums = [int(n) for n in numbers]
    if not nums or any(n < 0 for n in nums):
        raise ValueError(f"numbers must be a non-empty list of non-negative integers; got {numbers!r}")
    goal = Fraction(target)
    leaves = [_Expr(Fraction(n)) for n in nums]
    for domain in ("natural", "integer", "rational"):
        found = _search(leaves, goal, domain)
        if found is not None:
            return str(found)
    return None


def _fmt(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def think_trace(numbers: list[int], target: int | float, solution: str) -> str:
    """The worked steps of ``solution``, one binary operation at a time, e.g. ``"3*7=21 21+20=41"``.

    Steps are in evaluation order (left subtree first); fractions are written ``p/q``. ``numbers`` and
    ``target`` are checked against the solution: a wrong solution raises ValueError.
    """
    result = evaluate_equation(solution)
    if result is None or sorted(result[1]) != sorted(int(n) for n in numbers):
        raise ValueError(f"solution must be a valid equation using exactly {list(numbers)}; got {solution!r}")
    if abs(float(result[0] - Fraction(target))) > TOLERANCE:
        raise ValueError(f"solution {solution!r} does not equal target {target!r}")
    steps: list[str] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        left, right = walk(node.left), walk(node.right)
        op = _OPS[type(node.op)]
        value = _apply(op, left, right)
        steps.append(f"{_fmt(left)}{op}{_fmt(right)}={_fmt(value)}")
        return value

    walk(ast.parse(solution.strip(), mode="eval").body)
    return " ".join(steps)


def format_response(solution: str, numbers: list[int] | None = None, target: Any = None, think: bool = False) -> str:
    """The compact response for a solution: ``<think>[trace]</think><answer>solution</answer>``."""
    trace = think_trace(numbers, target, solution) if think else ""
    return f"{THINK_OPEN}{trace}{THINK_CLOSE}{ANSWER_OPEN}{solution}{ANSWER_CLOSE}"


# ------------------------------------------------------------------------------------------------------------
# Puzzles
# ------------------------------------------------------------------------------------------------------------
def _check_ranges(num_count: int, number_range: Any, target_range: Any) -> tuple[int, int, int, int]:
    check_options("countdown", dict(num_count=num_count, number_range=number_range, target_range=target_range), "")
    return (*number_range, *target_range)


def generate(
    n: int,
    seed: int = 0,
    num_count: int = 3,
    number_range: tuple[int, int] = (1, 20),
    target_range: tuple[int, int] = (1, 100),
    max_tries: int = 1000,
) -> list[dict[str, Any]]:
    """``n`` random solvable puzzles, reproducible for a ``seed``.

    Each puzzle draws ``num_count`` numbers uniformly from ``number_range`` (inclusive), combines them in a
    random order with random operators (a random binary tree, exact integer arithmetic only), and keeps the
    result as the target if it is an integer inside ``target_range``. The stored ``solution`` is
    :func:`solve`'s canonical (simplest) solution, which may differ from the random expression. Returns dicts
    with ``numbers``, ``target``, ``solution`` and ``source="generated"``.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0; got {n!r}")
    lo, hi, tlo, thi = _check_ranges(num_count, number_range, target_range)
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
                value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else a}[op]
                values = [v for k, v in enumerate(values) if k not in (i, j)] + [value]
            target = values[0]
            if target.denominator == 1 and tlo <= target <= thi:
                target = int(target)
                solution = solve(numbers, target)
                if solution is not None:
                    out.append({"numbers": numbers, "target": target, "solution": solution, "source": "generated"})
                    break
        else:
            raise ValueError(
                f"could not generate a puzzle with number_range={number_range} "
                f"and target_range={target_range} "
                f"in {max_tries} tries; widen the ranges"
            )
    return out


def load(
    split: str = "train",
    n: int | None = None,
    offline_ok: bool = True,
    seed: int = 0,
    num_count: int = 3,
    number_range: tuple[int, int] = (1, 20),
    target_range: tuple[int, int] = (1, 100),
) -> list[dict[str, Any]]:
    """Countdown puzzles of a ``split`` ("train" or "test").

    Online: the hub dataset :data:`HUB_ID` with the paper's rows (train: 0-7,499, test: 7,500-12,499; the
    first ``n`` of them), fields ``numbers``, ``target``, ``solution=None`` (solve on demand),
    ``source=HUB_ID``. Offline (``HF_DATASETS_OFFLINE=1`` or any load failure): if ``offline_ok``, warns and
    falls back to :func:`generate` (``n`` puzzles, default 7,500 / 5,000) with a split-dependent seed so train
    and test differ; otherwise raises RuntimeError. The generator options only apply to the fallback.
    """
    if split not in SPLIT_ROWS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be None or an integer >= 0; got {n!r}")
    start, stop = SPLIT_ROWS[split]
    count = stop - start if n is None else min(n, stop - start)
    error: Exception | None = None
    if os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        error = RuntimeError("HF_DATASETS_OFFLINE is set")
    else:
        try:
            data = datasets.load_dataset(HUB_ID, split="train")
            if len(data) < stop:
                raise RuntimeError(f"{HUB_ID} has {len(data)} rows; the paper's split needs {stop}")
            rows = data.select(range(start, start + count))
            return [
                {
                    "numbers": [int(v) for v in row["nums"]],
                    "target": int(row["target"]),
                    "solution": None,
                    "source": HUB_ID,
                }
                for row in rows
            ]
        except Exception as exc:  # offline, no cache, a renamed dataset, ...
            error = exc
    if not offline_ok:
        raise RuntimeError(
            f"could not load {HUB_ID} ({error}); pass offline_ok=True to fall back to generated puzzles"
        ) from error
    warnings.warn(
        f"Countdown: {HUB_ID} could not be loaded ({error}); offline: falling back to generated puzzles "
        f"({count} for split {split!r}, num_count={num_count}, numbers in {tuple(number_range)})",
        stacklevel=2,
    )
    split_seed = seed * 1000 + (0 if split == "train" else 1)  # train and test differ for every seed
    return generate(count, seed=split_seed, num_count=num_count, number_range=number_range, target_range=target_range)


# ------------------------------------------------------------------------------------------------------------
# Task
# ------------------------------------------------------------------------------------------------------------
class CountdownTask(Task):
    """Countdown as a :class:`~tre_edu.tasks.base.Task`.

    ``num_count``, ``number_range`` and ``target_range`` describe generated puzzles (offline fallback, tiny
    model); ``think`` makes the reference responses carry a worked trace (longer horizon); ``style`` is the
    default prompt style ("compact" for the tiny model, "plain" or "chat" for instruct models).
    """

    name = "countdown"
    success_threshold = 1.0

    def __init__(
        self,
        num_count: int = 3,
        number_range: tuple[int, int] = (1, 20),
        target_range: tuple[int, int] = (1, 100),
        think: bool = False,
        style: str = "compact",
    ):
        _check_ranges(num_count, number_range, target_range)
        check_options("countdown", dict(think=think, style=style), prefix="")
        self.num_count = num_count
        self.number_range = tuple(number_range)
        self.target_range = tuple(target_range)
        self.think = think
        self.style = style

    def __repr__(self) -> str:
        return (
            f"CountdownTask(num_count={self.num_count}, number_range={self.number_range}, "
            f"target_range={self.target_range}, think={self.think}, style={self.style!r})"
        )

    def generate(self, n: int, seed: int = 0) -> list[dict[str, Any]]:
        """``n`` generated puzzles with this task's settings (see :func:`generate`)."""
        return generate(n, seed, self.num_count, self.number_range, self.target_range)

    def load(
        self, split: str = "train", n: int | None = None, seed: int = 0, offline_ok: bool = True
    ) -> list[dict[str, Any]]:
        return load(split, n, offline_ok, seed, self.num_count, self.number_range, self.target_range)

    def prompt(self, example: dict[str, Any], tokenizer: Any = None, style: str | None = None) -> str:
        style = self.check_style(self.style if style is None else style)
        nums, target = [int(v) for v in example["numbers"]], example["target"]
        if style == "compact":
            return COMPACT_PROMPT.format(nums=" ".join(map(str, nums)), target=target)
        text = PROMPT.format(nums=nums, target=target)
        return apply_chat_template(tokenizer, text) if style == "chat" else text

    def score(self, response: str, example: dict[str, Any]) -> float:
        if not isinstance(example, dict):
            return 0.0
        return score(response, example.get("numbers"), example.get("target"))

    def reference_response(self, example: dict[str, Any], think: bool | None = None) -> str:
        """The target response for supervised warm starts (solves the puzzle if it has no ``solution``).

        Raises ValueError for an unsolvable puzzle.
        """
        think = self.think if think is None else think
        solution = example.get("solution") or solve(example["numbers"], example["target"])
        if solution is None:
            raise ValueError(f"puzzle {example['numbers']} -> {example['target']} has no solution")
        return format_response(solution, example["numbers"], example["target"], think=think)


make_task = CountdownTask  # tre_edu.tasks.get_task(name, **options) calls tre_edu.tasks.<name>.make_task(**options)


__all__ = [
    "COMPACT_PROMPT",
    "CountdownTask",
    "HUB_ID",
    "PROMPT",
    "SPLIT_ROWS",
    "evaluate_equation",
    "extract_answer",
    "format_response",
    "generate",
    "load",
    "make_task",
    "score",
    "solve",
    "think_trace",
]
