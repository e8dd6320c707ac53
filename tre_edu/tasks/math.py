"""MATH: competition problems; reward 1 if the last ``\\boxed{}`` answer is equivalent to the reference.

Data (the paper's): ``DigitalLearningGmbH/MATH-lighteval`` (train 7,500 / test 5,000; the reference is the last
``\\boxed{...}`` of ``solution``) or ``HuggingFaceH4/MATH-500`` (500 test problems, reference in ``answer``);
offline, a small sample bundled with the package (``source="bundled"``).

Equivalence, cheapest first: (1) a string normaliser (:func:`normalize_answer`); (2) exact rational arithmetic for
plain numbers (``1/2 == \\frac12 == 0.5``); (3) only for a :func:`well_formed` answer (math-verify would read junk
such as ``7 + ???`` as ``7``): ``math_verify.parse`` + ``verify`` in worker processes (:class:`GraderPool`), bounded
by ``timeout_s`` per answer in every thread and ``batch_timeout_s`` per batch; the timeouts are counted in
``MathTask.last_reward_stats``. :func:`score` never raises: malformed, hostile or huge output scores ``0.0``.
Edge cases, decided: see :func:`last_boxed` (nested boxes) and :func:`denotes_no_value` (``\\frac{1}{0}``);
``\\infty`` and text answers (``\\text{undefined}``) are ordinary answers.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from subprocess import DEVNULL, PIPE, Popen
from typing import Any

import datasets

from tre_edu.tasks.base import Task, check_batch, check_choice, check_options, load_or_fallback, read_jsonl, subsample

PROMPT = "{problem} Let's think step by step and output the final answer within \\boxed{{}}."  # the paper's

DATASETS = {"lighteval": "DigitalLearningGmbH/MATH-lighteval", "math500": "HuggingFaceH4/MATH-500"}
SPLIT_SIZES = {"lighteval": {"train": 7500, "test": 5000}, "math500": {"test": 500}}  # the paper's splits
BUNDLED_FILE = "math_sample.jsonl"

# Limits that keep scoring cheap on hostile model output.
MAX_RESPONSE_CHARS = 200_000  # longer responses: only the last MAX_RESPONSE_CHARS are searched
MAX_ANSWER_CHARS = 1_000  # a boxed answer longer than this is not an answer
MAX_VERIFY_CHARS = 300  # math-verify only sees answers up to this length (sympy can be slow on long input)
VERIFY_TIMEOUT_S = 3.0  # seconds of symbolic checking per answer, in any thread
BATCH_TIMEOUT_S = 60.0  # seconds of symbolic checking per reward() batch; answers not reached score 0
WORKERS = 2  # worker processes a reward() batch uses
START_TIMEOUT_S = 60.0  # a worker that is not ready (imports done) after this long is killed

_BRACE_OR_ESCAPE = re.compile(r"[{}]|\\.", re.DOTALL)


def _matching_brace(text: str, open_idx: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_idx`` (-1 if unbalanced); skips escaped ``\\{`` ``\\}``."""
    depth = 0
    for m in _BRACE_OR_ESCAPE.finditer(text, open_idx):
        if m.group() in ("{", "}"):
            depth += 1 if m.group() == "{" else -1
            if depth == 0:
                return m.start()
    return -1


_BOX = re.compile(r"\\(?:boxed|fbox)([ \t]*)")  # "\boxed {5}" and "\boxed 5" both allowed


def _box_at(text: str, box: re.Match) -> tuple[str | None, int] | None:
    """The box command matched by ``box``: ``(content, end)``; content None when its ``{`` is never closed (end =
    ``len(text)``); None when the command is not followed by ``{`` or by a space and a bare token."""
    j = box.end()
    if text.startswith("{", j):
        end = _matching_brace(text, j)
        return (text[j + 1 : end], end + 1) if end >= 0 else (None, len(text))
    if box.group(1) and (m := re.match(r"[^\s$]+", text[j : j + MAX_ANSWER_CHARS + 1])):
        return m.group(0), j + m.end()
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last outermost ``\\boxed{...}`` (nested braces), ``\\boxed 5`` (up to ``$`` or whitespace) or
    ``\\fbox{...}``; ``None`` when there is none, it is never closed, empty or longer than :data:`MAX_ANSWER_CHARS`.

    Boxes inside a box belong to it: the outermost box is the answer, and a box that wraps nothing but another box
    is unwrapped (``\\boxed{\\boxed{5}}`` is ``5``; ``\\boxed{5 \\boxed{6}}`` is ``5 \\boxed{6}``, which matches no
    reference)."""
    if not isinstance(text, str):
        return None
    text = text[-MAX_RESPONSE_CHARS:]
    content, pos = None, 0
    while m := _BOX.search(text, pos):
        content, pos = _box_at(text, m) or (content, m.start() + 1)  # "\boxed" without an argument: not a box
    while content is not None and len(content) <= MAX_ANSWER_CHARS:  # \boxed{\boxed{5}} -> 5
        inner = content.strip()
        box = (m := _BOX.match(inner)) and _box_at(inner, m)
        if not box or box[0] is None or box[1] != len(inner):
            break
        content = box[0]
    return None if content is None or len(content) > MAX_ANSWER_CHARS else content.strip()


_SPACING = re.compile(r"\\q?quad|(?<!\\)\\[!,;: ]|~")  # \quad \! \, \; \: "\ " ~ (not the row break \\)
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|mbox|mathrm|mathbf)\s*\{([^{}]*)\}")
# Units that may follow a number: "5\text{ cm}", "3\text{ square units}", "12\mbox{ inches}^2" (a word outside this
# list, as in "7\text{ not}" or "7\mbox{ or 8}", is not a unit and the answer stays as it is).
_UNIT = (
    r"(?:mm|cm|m|km|in|inch(?:es)?|ft|foot|feet|yards?|yd|miles?|meters?|centimeters?|kilometers?|square|sq|cubic|"
    r"units?|degrees?|radians?|dollars?|cents?|seconds?|sec|s|minutes?|min|hours?|hrs?|days?|weeks?|months?|years?|"
    r"mph|grams?|g|kg|pounds?|lbs?|ounces?|oz|liters?|ml|gallons?|people|students|ways|points|percent)"
)
_UNIT_SUFFIX = re.compile(
    rf"^(.*?[\d}}])\s*\\(?:text|textrm|mbox|mathrm)\s*\{{\s*{_UNIT}(?:\s+{_UNIT}){{0,2}}\s*(?:\^\d)?\s*\}}(\^\{{?\d\}}?)?$"
)
_VAR_PREFIX = re.compile(r"^[a-zA-Z]\s*(?:_\{?\w+\}?)?\s*=\s*")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
# 1e3, 2.5E-4, 1.5\times10^{3}, 3\cdot 10^4 (exponent up to 3 digits)
_SCIENTIFIC = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:[eE]|(?:\\times|\\cdot|\*)10\^)\{?([+-]?\d{1,3})\}?$")


def _cosmetic(s: str) -> str:
    """``s`` without the marks that never change a value: ``\\left``/``\\right``, thin spaces, ``$``, ``\\%``,
    degree signs, ``{,}``, and a trailing unit (:data:`_UNIT_SUFFIX`)."""
    s = s.strip().replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    s = _SPACING.sub(" ", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    for deg in ("^{\\circ}", "^\\circ", "{}^\\circ", "°", "\\degree"):
        s = s.replace(deg, "")
    s = s.replace("{,}", ",").strip()
    m = _UNIT_SUFFIX.match(s)
    return m.group(1) if m else s


def normalize_answer(answer: str) -> str:
    """A canonical string, so that most equal answers compare equal (``\\text{(A)}`` -> ``(A)``, ``x = 3`` -> ``3``,
    ``1,000`` -> ``1000``, ``.5`` -> ``0.5``, ``1\\times10^{3}`` -> ``1000``); ``""`` for non-strings."""
    if not isinstance(answer, str):
        return ""
    if len(answer) > MAX_ANSWER_CHARS:
        return answer.strip()
    s = _cosmetic(answer)
    if m := _TEXT_CMD.fullmatch(s):  # a text-only answer
        s = m.group(1)
    if s.count("=") == 1:  # a single-variable prefix
        s = _VAR_PREFIX.sub("", s)
    s = re.sub(r"\s+", "", s.removesuffix(".").strip())
    # \frac12 -> \frac{1}{2}; \frac{a}2 -> \frac{a}{2}; \frac1{b} -> \frac{1}{b}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\sqrt(\d+|[a-zA-Z])", r"\\sqrt{\1}", s)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)
    if m := _SCIENTIFIC.match(s):  # 1e3 -> 1000, 2e-3 -> 1/500
        s = str(Fraction(m.group(1)) * Fraction(10) ** int(m.group(2)))
    return s


_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_FRAC = re.compile(r"^([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}$")
_SLASH = re.compile(r"^([+-]?\d+)/([+-]?\d+)$")


def _as_rational(s: str) -> Fraction | None:
    """``s`` (already normalised) as an exact rational if it is a plain number / fraction, else ``None``."""
    if len(s) > 64:
        return None
    if _NUMBER.match(s):
        return Fraction(s)
    m = _FRAC.match(s) or _SLASH.match(s)
    if not m:
        return None
    sign, num, den = m.groups() if len(m.groups()) == 3 else ("", *m.groups())
    return None if int(den) == 0 else (-1 if sign == "-" else 1) * Fraction(int(num), int(den))


_ALLOWED_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 +-*/^_=<>()[]{}|,.!'\\&:")
_GREEK = (
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta kappa lambda mu nu xi rho sigma tau phi varphi "
    "chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma Phi Psi Omega"
)
_RELATIONS = frozenset("le ge leq geq lt gt ne neq in notin".split())
_OPERATORS = frozenset("cdot times div pm mp cup cap setminus".split())
_FUNCTIONS = "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln exp"
_OTHER = "frac sqrt pi infty emptyset varnothing mathbb mathbf boldsymbol binom dbinom tbinom overline lfloor rfloor"
_COMMANDS = _RELATIONS | _OPERATORS | frozenset(f"{_OTHER} lceil rceil prime begin end {_FUNCTIONS} {_GREEK}".split())
_MATRIX_ENVS = frozenset("matrix pmatrix bmatrix vmatrix cases array".split())
_LEADING_VAR = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?\s*(?:=|\\in\b)\s*")


def _has_relation(s: str) -> bool:
    return bool(re.search(r"[=<>]", s)) or any(c in _RELATIONS for c in re.findall(r"\\([a-zA-Z]+)", s))


def _balanced(s: str) -> bool:
    """Braces ``{}``, escaped braces ``\\{\\}`` and brackets (``(`` or ``[`` closed by ``)`` or ``]``, so that the
    intervals ``(1, 2]`` count) each close in order."""
    depth = {"{": 0, "\\{": 0, "(": 0}
    for tok in re.findall(r"\\[{}]|[{}()\[\]]", s):
        kind = {"}": "{", "\\}": "\\{", ")": "(", "]": "(", "[": "("}.get(tok, tok)
        depth[kind] += 1 if tok in ("{", "\\{", "(", "[") else -1
        if depth[kind] < 0:
            return False
    return not any(depth.values())


def well_formed(answer: str, reference: str = "") -> bool:
    """Whether ``answer`` is a complete mathematical expression worth a symbolic check.

    math-verify reads the longest prefix it can parse, so junk around a number would pass as the number
    (``7 + ???``, ``7 @``, ``\\not 7``, ``7 \\neq``, ``\\in 7``, ``7)``, ``7 \\text{ or } 8``). Rejected: other
    characters or commands (text commands included: text answers are compared as strings); unbalanced brackets; a
    leading or trailing operator or relation; two numbers separated by a space only; ``&`` or ``\\\\`` outside a
    matrix; and, when ``reference`` has no relation, any relation other than a leading ``x =`` / ``x \\in``."""
    s = _cosmetic(answer)
    if not s or not set(s) <= _ALLOWED_CHARS or not _balanced(s):
        return False
    commands = re.findall(r"\\([a-zA-Z]+)", s)
    if any(c not in _COMMANDS for c in commands) or re.search(r"\\[^a-zA-Z{}\\]", s):
        return False
    if "begin" in commands or "end" in commands:
        if not set(re.findall(r"\\(?:begin|end)\{(\w+)\}", s)) <= _MATRIX_ENVS:
            return False
    elif "&" in s or "\\\\" in s:
        return False
    if re.search(r"\d\s+\d", s):
        return False
    body = _LEADING_VAR.sub("", s, count=1)
    if not body or (_has_relation(body) and not _has_relation(reference)):
        return False
    ends = r"[+\-*/^_=<>,.:&']|\\(?:" + "|".join(_RELATIONS | _OPERATORS) + r")\b"
    return not (re.search(f"(?:{ends})$", body) or re.match(f"(?:{ends.replace('+', '')})", body.lstrip("-+")))


_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_WORKER_COMMAND = [sys.executable, "-m", "tre_edu.tasks.math_worker"]


class _Worker:
    """One ``python -m tre_edu.tasks.math_worker`` process and its pipes."""

    def __init__(self) -> None:
        path = os.pathsep.join(p for p in (_PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path}
        self.proc = Popen(_WORKER_COMMAND, stdin=PIPE, stdout=PIPE, stderr=DEVNULL, env=env)
        self.fd, self.buffer, self.ready = self.proc.stdout.fileno(), b"", False
        self.since = time.monotonic()  # start of the process, then of the current answer

    def send(self, answer: str, reference: str, timeout_s: float) -> None:
        self.proc.stdin.write((json.dumps([answer, reference, timeout_s]) + "\n").encode())
        self.proc.stdin.flush()

    def read_lines(self) -> list[str] | None:
        """The complete lines available now; ``None`` when the process has exited."""
        data = os.read(self.fd, 65536)
        if not data:
            return None
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        return [line.decode() for line in lines]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


class GraderPool:
    """math-verify worker processes (:mod:`tre_edu.tasks.math_worker`), kept between calls.

    An answer still running after ``timeout_s`` has its worker killed (a process can be stopped where a thread
    holding the GIL cannot) and replaced on demand; a call stops at ``budget_s``. Thread-safe: every call uses its
    own workers, taken from and returned to the idle list."""

    def __init__(self, start_timeout_s: float = START_TIMEOUT_S, max_idle: int = 8):
        self.start_timeout_s, self.max_idle = start_timeout_s, max_idle
        self.broken: str | None = None  # why workers cannot start (e.g. math-verify missing)
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        atexit.register(self.close)

    def _take(self) -> _Worker:
        with self._lock:
            if os.getpid() != self._pid:  # a forked child does not share its parent's workers
                self._idle, self._pid = [], os.getpid()
            while self._idle:
                worker = self._idle.pop()
                if worker.proc.poll() is None:
                    return worker
        return _Worker()

    def close(self) -> None:
        """Stop the idle workers (registered with :mod:`atexit`)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()

    def verify(
        self, pairs: list[tuple[str, str]], *, timeout_s: float, budget_s: float, workers: int = 1
    ) -> tuple[list[bool | None], int]:
        """``(results, timeouts)``: for each ``(answer, reference)`` whether math-verify finds them equal,
        ``False`` when stopped after ``timeout_s`` (or its worker died; counted in ``timeouts``), ``None`` when
        never started within ``budget_s``."""
        results: list[bool | None] = [None] * len(pairs)
        if self.broken or not pairs:
            return results, 0
        end = time.monotonic() + budget_s
        todo = list(range(len(pairs)))[::-1]
        busy: dict[int, tuple[_Worker, int]] = {}  # fd -> (worker, index of its pair)
        free: list[_Worker] = []
        timeouts = 0

        def deadline(w: _Worker) -> float:
            return w.since + (timeout_s if w.ready else self.start_timeout_s)

        def stop(fd: int) -> None:  # kill the worker on ``fd``: its answer scores 0 and counts as a timeout
            nonlocal timeouts
            worker, i = busy.pop(fd)
            worker.kill()
            results[i], timeouts = False, timeouts + 1

        try:
            while (todo or busy) and time.monotonic() < end:
                while todo and len(busy) < workers:
                    worker, i = free.pop() if free else self._take(), todo.pop()
                    worker.send(*pairs[i], timeout_s)
                    worker.since = time.monotonic() if worker.ready else worker.since
                    busy[worker.fd] = (worker, i)
                wait = min([end, *(deadline(w) for w, _ in busy.values())]) - time.monotonic()
                readable, _, _ = select.select(list(busy), [], [], max(0.0, wait))
                now = time.monotonic()
                for fd in readable:
                    worker, i = busy[fd]
                    lines = worker.read_lines()
                    if lines is None:  # the worker died (out of memory, a crash, or math-verify missing)
                        if not worker.ready:
                            self.broken = f"the math-verify worker exited with code {worker.proc.wait()} at start"
                            warnings.warn(f"MATH grader: {self.broken}; symbolic answers score 0", stacklevel=3)
                            todo.clear()
                        stop(fd)
                    for line in lines or ():
                        if line == "ready":
                            worker.ready, worker.since = True, now
                        else:
                            results[i] = line == "1"
                            free.append(busy.pop(fd)[0])
                for fd, (worker, _) in list(busy.items()):
                    if now >= deadline(worker):
                        stop(fd)
        finally:
            for fd in list(busy):  # still running when the budget ran out
                stop(fd)
            with self._lock:
                self._idle.extend(free)
                while len(self._idle) > self.max_idle:
                    self._idle.pop(0).kill()
        return results, timeouts


POOL = GraderPool()
_CACHE: dict[tuple[str, str], bool] = {}  # (answer, reference) -> verdict, timeouts included; cleared when full
_CACHE_SIZE = 100_000


def symbolic_check(
    pairs: list[tuple[str, str]], *, timeout_s: float, budget_s: float, workers: int = 1
) -> tuple[list[bool], dict[str, float]]:
    """math-verify on each ``(answer, reference)`` (duplicates and earlier verdicts served from a cache);
    ``(verdicts, {"reward/grader_timeouts": n, "reward/grader_skipped": n})``."""
    todo = sorted({p for p in pairs if p not in _CACHE})
    found, timeouts = POOL.verify(todo, timeout_s=timeout_s, budget_s=budget_s, workers=workers)
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.clear()
    _CACHE.update((p, v) for p, v in zip(todo, found) if v is not None)
    stats = {"reward/grader_timeouts": float(timeouts), "reward/grader_skipped": float(found.count(None))}
    return [_CACHE.get(p, False) for p in pairs], stats


# A value that is no number: NaN, or a division by zero (\frac{1}{0}, 1/0, 1 \div 0), after normalize_answer.
_NO_VALUE = re.compile(
    r"(?<![a-zA-Z\\])nan(?![a-zA-Z])|\\frac\{[^{}]*\}\{[+-]?0+(?:\.0*)?\}|(?:/|\\div)[+-]?0+(?:\.0*)?(?![\d.])",
    re.IGNORECASE,
)


def denotes_no_value(answer: str) -> bool:
    """Whether a normalised answer holds a value that is no number (``nan``, ``\\frac{1}{0}``, ``1/0``): such an answer
    is never correct, not even against the same text (a reference like that is a broken reference)."""
    return bool(_NO_VALUE.search(answer))


def _cheap_verdict(answer: Any, reference: Any, use_math_verify: bool) -> bool | tuple[str, str]:
    """True / False when the string and rational rules decide; else the ``(answer, reference)`` for math-verify."""
    if not isinstance(answer, str) or not isinstance(reference, str):
        return False
    a, r = normalize_answer(answer), normalize_answer(reference)
    if not a or not r or denotes_no_value(a) or denotes_no_value(r):
        return False
    if a == r:
        return True
    qa, qr = _as_rational(a), _as_rational(r)
    if qa is not None and qr is not None:
        return qa == qr
    if not use_math_verify or max(len(answer), len(reference)) > MAX_VERIFY_CHARS or not well_formed(answer, reference):
        return False
    return (a if qa is not None else answer), reference  # a plain number goes as normalised ("1e3" -> "1000")


def _grade(answers: list[Any], references: list[Any], use_math_verify: bool, **bounds: Any):
    """``(verdicts, stats)``: the cheap rules first, then one bounded :func:`symbolic_check` of the undecided."""
    verdicts = [_cheap_verdict(a, r, use_math_verify) for a, r in zip(answers, references)]
    pending = [i for i, v in enumerate(verdicts) if not isinstance(v, bool)]
    found, stats = symbolic_check([verdicts[i] for i in pending], **bounds)
    for i, v in zip(pending, found):
        verdicts[i] = v
    return verdicts, stats


def is_equivalent(
    answer: str, reference: str, *, use_math_verify: bool = True, timeout_s: float = VERIFY_TIMEOUT_S
) -> bool:
    """Whether two final answers are the same; never raises; a symbolic check takes <= ``timeout_s`` seconds."""
    try:
        bounds = dict(timeout_s=timeout_s, budget_s=timeout_s + START_TIMEOUT_S)
        return _grade([answer], [reference], use_math_verify, **bounds)[0][0]
    except Exception:
        return False


def score(
    response: str, answer: str | None = None, *, use_math_verify: bool = True, timeout_s: float = VERIFY_TIMEOUT_S, **_
) -> float:
    """The paper's reward (never raises); ``score(response, **example)`` works."""
    pred = last_boxed(response)
    if answer is None or pred is None:
        return 0.0
    return float(is_equivalent(pred, str(answer), use_math_verify=use_math_verify, timeout_s=timeout_s))


def _example_from_row(row: dict[str, Any], source: str) -> dict[str, Any] | None:
    problem, answer = row.get("problem"), row.get("answer")
    if answer is None and row.get("solution") is not None:
        answer = last_boxed(row["solution"])
    if not problem or answer is None:
        return None
    extra = {k: row[k] for k in ("level", "type", "subject", "unique_id") if row.get(k) is not None}
    return {"problem": str(problem), "answer": str(answer), "source": source, **extra}


def load(
    split: str = "train",
    n: int | None = None,
    offline_ok: bool = True,
    seed: int = 0,
    *,
    dataset: str = "lighteval",
    hub_id: str | None = None,
) -> list[dict[str, Any]]:
    """MATH examples ``{"problem", "answer", "source", ...}`` of ``split`` ("train" / "test" of ``"lighteval"``,
    "test" of ``"math500"``), a seeded random subset of ``n`` of them (``None``: all, in order). ``hub_id``
    overrides the dataset id or gives a local path; on a loading failure, with ``offline_ok``: the bundled sample."""
    check_options("math", {"dataset": dataset}, prefix="")
    check_choice("split", split, SPLIT_SIZES[dataset], f" for dataset={dataset!r}")
    hub = hub_id or DATASETS[dataset]
    ds, source = load_or_fallback(
        f"MATH data {hub!r} split {split!r}",
        lambda: (datasets.load_dataset(hub, split=split), hub),
        f"the small bundled MATH sample tre_edu/data/{BUNDLED_FILE} (source='bundled')",
        lambda: ([r for r in read_jsonl(BUNDLED_FILE) if r.get("split") == split], "bundled"),
        offline_ok,
    )
    rows = [ex for row in ds if (ex := _example_from_row(dict(row), source)) is not None]
    if not rows:
        raise ValueError(f"{source} split {split!r} has no usable rows (need 'problem' and 'solution' or 'answer')")
    return subsample(rows, n, seed)


@dataclass(eq=False)
class MathTask(Task):
    """MATH with the paper's prompt and the boxed-answer 0/1 reward (``dataset``, ``hub_id``: see :func:`load`).

    ``use_math_verify=False``: the string / rational rules only (faster, stricter); ``timeout_s``, ``batch_timeout_s``,
    ``workers``: bounds of the symbolic check per answer and per :meth:`reward` batch, and its worker processes.
    After each batch, ``last_reward_stats`` holds ``reward/grader_timeouts`` and ``_skipped``."""

    dataset: str = "lighteval"
    hub_id: str | None = None
    use_math_verify: bool = True
    timeout_s: float = VERIFY_TIMEOUT_S
    batch_timeout_s: float = BATCH_TIMEOUT_S
    workers: int = WORKERS
    last_reward_stats: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    name = "math"
    success_threshold = 1.0

    def __post_init__(self):
        check_options("math", {k: v for k, v in vars(self).items() if k != "last_reward_stats"}, prefix="")

    def load(
        self, split: str = "train", n: int | None = None, seed: int = 0, offline_ok: bool = True
    ) -> list[dict[str, Any]]:
        return load(split, n=n, offline_ok=offline_ok, seed=seed, dataset=self.dataset, hub_id=self.hub_id)

    def user_text(self, example: dict[str, Any], style: str) -> str:
        if "problem" not in example:
            raise ValueError("example must have a 'problem' field")
        return PROMPT.format(problem=example["problem"])

    def score(self, response: str, example: dict[str, Any]) -> float:
        answer = example.get("answer") if isinstance(example, dict) else None
        return score(response, answer, use_math_verify=self.use_math_verify, timeout_s=self.timeout_s)

    def reward(self, responses: list[str], examples: list[dict[str, Any]]) -> list[float]:
        check_batch(responses, examples)
        answers = [e.get("answer") if isinstance(e, dict) else None for e in examples]
        bounds = dict(timeout_s=self.timeout_s, budget_s=self.batch_timeout_s, workers=self.workers)
        boxed = [last_boxed(r) for r in responses]
        verdicts, self.last_reward_stats = _grade(boxed, answers, self.use_math_verify, **bounds)
        return [float(v) for v in verdicts]

    def describe(self) -> str:
        return (
            f"MATH ({self.hub_id or DATASETS[self.dataset]}); reward 1 if the last \\boxed{{}} answer is "
            "equivalent to the reference (normaliser, then math-verify), else 0"
        )


make_task = MathTask  # what tre_edu.tasks.get_task("math", **options) calls
