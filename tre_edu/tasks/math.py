"""MATH: competition problems; reward 1 if the last ``\\boxed{}`` answer is equivalent to the reference.

Data (the paper's splits):

- ``DigitalLearningGmbH/MATH-lighteval``: train 7,500 / test 5,000; fields ``problem``, ``solution``; the
  reference answer is the last ``\\boxed{...}`` of the solution.
- ``HuggingFaceH4/MATH-500``: the 500-problem test subset; field ``answer`` holds the reference directly.

Offline (``HF_DATASETS_OFFLINE=1``, no cache, or any loading failure) with ``offline_ok=True`` the loader
warns and falls back to a small hand-written sample bundled with the package (``source="bundled"``).

Reward (paper): ``1.0`` if the last boxed answer of the response is equivalent to the reference, else ``0.0``.
Equivalence is decided in three steps, cheapest first:

1. a string normaliser (spaces, ``\\left``/``\\right``, ``\\dfrac``, units, degree signs, ``x=`` prefixes...);
2. exact rational arithmetic for plain numbers (``1/2 == \\frac12 == 0.5``);
3. ``math_verify.parse`` + ``math_verify.verify`` (symbolic: intervals, radicals, sets, expressions;
   time-bounded).

:func:`score` never raises: malformed, hostile or huge output scores ``0.0``.
"""

from __future__ import annotations

import json
import random
import re
import threading
import warnings
from fractions import Fraction
from importlib import resources
from typing import Any

from tre_edu.tasks.base import Task, apply_chat_template

# The paper's prompt, verbatim.
PROMPT = "{problem} Let's think step by step and output the final answer within \\boxed{{}}."

DATASETS = {
    "lighteval": "DigitalLearningGmbH/MATH-lighteval",
    "math500": "HuggingFaceH4/MATH-500",
}
# Paper's split sizes (MATH-lighteval ships exactly these two splits).
SPLIT_SIZES = {"lighteval": {"train": 7500, "test": 5000}, "math500": {"test": 500}}
BUNDLED_FILE = "math_sample.jsonl"

# Limits that keep scoring cheap on hostile model output.
MAX_RESPONSE_CHARS = 200_000  # longer responses: only the last MAX_RESPONSE_CHARS are searched
MAX_ANSWER_CHARS = 1_000  # a boxed answer longer than this is not an answer
MAX_VERIFY_CHARS = 300  # math-verify only sees answers up to this length (sympy can be slow on long input)
VERIFY_TIMEOUT_S = 3  # seconds per math-verify call (parse + verify each)

_BOX_COMMANDS = ("\\boxed", "\\fbox")


# ----------------------------------------------------------------------------------------------------
# Answer extraction
# ----------------------------------------------------------------------------------------------------


def _matching_brace(text: str, open_idx: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_idx`` (-1 if unbalanced); iterative."""
    depth = 0
    i = open_idx
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":  # skip escaped characters such as \{ and \}
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, ``\\boxed ...`` (space form) or ``\\fbox{...}`` in ``text``.

    Nested braces are handled (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``). The space form ends at the next
    ``$`` or whitespace (``\\boxed 5$`` -> ``5``). Returns ``None`` when there is no complete boxed answer
    (e.g. the last ``\\boxed{`` is never closed) or when the content is longer than :data:`MAX_ANSWER_CHARS`.
    Never raises.
    """
    if not isinstance(text, str):
        return None
    if len(text) > MAX_RESPONSE_CHARS:
        text = text[-MAX_RESPONSE_CHARS:]
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    rest_idx = start + len(cmd)
    j = rest_idx
    while j < len(text) and text[j] in " \t":  # "\boxed {5}" and "\boxed 5" both allowed
        j += 1
    if j < len(text) and text[j] == "{":
        end = _matching_brace(text, j)
        content = text[j + 1 : end] if end >= 0 else None
    elif j > rest_idx:  # "\boxed 5" form: up to the next $ or whitespace
        m = re.match(r"[^\s$]+", text[j : j + MAX_ANSWER_CHARS + 1])
        content = m.group(0) if m else None
    else:
        return None
    if content is None or len(content) > MAX_ANSWER_CHARS:
        return None
    return content.strip()


# ----------------------------------------------------------------------------------------------------
# Normalisation and equivalence
# ----------------------------------------------------------------------------------------------------

_SPACING = ("\\!", "\\,", "\\;", "\\:", "\\ ", "~", "\\quad", "\\qquad")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|mbox|mathrm|mathbf)\s*\{([^{}]*)\}")
_UNIT_SUFFIX = re.compile(r"^(.*?[\d}])\s*\\(?:text|textrm|mbox|mathrm)\s*\{\s*[a-zA-Z][a-zA-Z .^\d]*\}(\^\d)?$")
_VAR_PREFIX = re.compile(r"^[a-zA-Z]\s*(?:_\{?\w+\}?)?\s*=\s*")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def normalize_answer(answer: str) -> str:
    """A canonical string for an answer: cheap rules that make most equal answers compare equal as strings.

    Removes spaces, ``\\left``/``\\right``, thin spaces (``\\!`` ``\\,``), ``$``, ``\\%``, degree signs,
    trailing units (``5\\text{ cm}``), a single-variable prefix (``x = 3`` -> ``3``), a trailing ``.``, and
    rewrites ``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt2`` ->
    ``\\sqrt{2}``, ``1{,}000``/``1,000`` -> ``1000``, ``.5`` -> ``0.5``. Never raises (returns ``""`` for
    non-strings).
    """
    if not isinstance(answer, str):
        return ""
    s = answer.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return s
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\displaystyle", "")
    for sp in _SPACING:
        s = s.replace(sp, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    for deg in ("^{\\circ}", "^\\circ", "{}^\\circ", "°", "\\degree"):
        s = s.replace(deg, "")
    s = s.replace("{,}", ",")
    s = s.strip()
    m = _UNIT_SUFFIX.match(s)
    if m:  # "5\text{ cm}" -> "5"; keep answers that are text only
        s = m.group(1)
    m = _TEXT_CMD.fullmatch(s)
    if m:  # "\text{(A)}" -> "(A)"
        s = m.group(1)
    if s.count("=") == 1:
        s = _VAR_PREFIX.sub("", s)
    s = s.rstrip(".").strip()
    s = re.sub(r"\s+", "", s)
    # \frac12 -> \frac{1}{2}; \frac{a}2 -> \frac{a}{2}; \frac1{b} -> \frac{1}{b}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\sqrt(\d+|[a-zA-Z])", r"\\sqrt{\1}", s)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)
    return s


_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_FRAC = re.compile(r"^([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}$")
_SLASH = re.compile(r"^([+-]?\d+)/([+-]?\d+)$")


def _as_rational(s: str) -> Fraction | None:
    """``s`` (already normalised) as an exact rational if it is a plain number / fraction, else ``None``."""
    if len(s) > 64:
        return None
    try:
        if _NUMBER.match(s):
            return Fraction(s)
        m = _FRAC.match(s)
        if m:
            sign = -1 if m.group(1) == "-" else 1
            den = int(m.group(3))
            return None if den == 0 else sign * Fraction(int(m.group(2)), den)
        m = _SLASH.match(s)
        if m:
            den = int(m.group(2))
            return None if den == 0 else Fraction(int(m.group(1)), den)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def _math_verify_equal(answer: str, reference: str, timeout_s: int) -> bool:
    """Symbolic check with math-verify; every failure is ``False``.

    Time bound: in the main thread math-verify's own ``signal.alarm`` timeout is used (``parsing_timeout`` and
    ``timeout_seconds``). Signals only work in the main thread, so elsewhere the call runs in a daemon thread
    that we stop waiting for after ``2 * timeout_s`` seconds (Python cannot kill a thread: a pathological
    input may keep one core busy until it finishes; :data:`MAX_VERIFY_CHARS` keeps that unlikely).
    """
    try:
        from math_verify import parse, verify
    except ImportError:  # math-verify is a dependency; be robust anyway
        return False

    def run(t: int | None) -> bool:
        gold = parse(f"${reference}$", parsing_timeout=t)
        pred = parse(f"${answer}$", parsing_timeout=t)
        if not gold or not pred:
            return False
        return bool(verify(gold, pred, timeout_seconds=t))

    try:
        if threading.current_thread() is threading.main_thread():
            return run(max(1, int(timeout_s)))
        box: list[bool] = []

        def target() -> None:
            try:
                box.append(run(None))
            except Exception:
                box.append(False)

        worker = threading.Thread(target=target, daemon=True, name="tre_edu-math-verify")
        worker.start()
        worker.join(2 * timeout_s)
        return bool(box and box[0])
    except Exception:  # math-verify's TimeoutException, sympy errors, RecursionError, ...
        return False


def is_equivalent(
    answer: str, reference: str, *, use_math_verify: bool = True, timeout_s: int = VERIFY_TIMEOUT_S
) -> bool:
    """Whether two final answers are mathematically the same. Never raises."""
    try:
        if not isinstance(answer, str) or not isinstance(reference, str):
            return False
        a, r = normalize_answer(answer), normalize_answer(reference)
        if not a or not r:
            return False
        if a == r:
            return True
        qa, qr = _as_rational(a), _as_rational(r)
        if qa is not None and qr is not None:
            return qa == qr
        if not use_math_verify or len(answer) > MAX_VERIFY_CHARS or len(reference) > MAX_VERIFY_CHARS:
            return False
        return _math_verify_equal(answer, reference, timeout_s)
    except Exception:
        return False


def score(
    response: str,
    answer: str | None = None,
    *,
    use_math_verify: bool = True,
    timeout_s: int = VERIFY_TIMEOUT_S,
    **example: Any,
) -> float:
    """Paper's MATH reward: ``1.0`` if the last ``\\boxed{}`` of ``response`` is equivalent to ``answer``,
    else ``0.0``.

    Extra keyword arguments (the other fields of an example dict, e.g. ``problem``, ``source``) are ignored,
    so ``score(response, **example)`` works. Never raises: malformed or hostile output scores ``0.0``.
    """
    try:
        if answer is None or not isinstance(response, str):
            return 0.0
        pred = last_boxed(response)
        if pred is None:
            return 0.0
        return 1.0 if is_equivalent(pred, str(answer), use_math_verify=use_math_verify, timeout_s=timeout_s) else 0.0
    except Exception:
        return 0.0


# ----------------------------------------------------------------------------------------------------
# Data loading
# ----------------------------------------------------------------------------------------------------


def read_bundled(name: str) -> list[dict[str, Any]]:
    """Rows of a JSONL file bundled in ``tre_edu/data/``."""
    path = resources.files("tre_edu").joinpath("data", name)
    with path.open("r", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def subsample(rows: list, n: int | None, seed: int) -> list:
    """All ``rows`` when ``n`` is None or >= len(rows); else ``n`` rows drawn without replacement (seeded)."""
    if n is None:
        return list(rows)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer or None; got {n!r}")
    if n >= len(rows):
        return list(rows)
    idx = random.Random(seed).sample(range(len(rows)), n)
    return [rows[i] for i in idx]


def _check_split(split: str, allowed: tuple[str, ...], what: str) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {', '.join(allowed)} for {what}; got {split!r}")


def _example_from_row(row: dict[str, Any], source: str) -> dict[str, Any] | None:
    problem = row.get("problem")
    answer = row.get("answer")
    if answer is None and row.get("solution") is not None:
        answer = last_boxed(row["solution"])
    if not problem or answer is None:
        return None
    ex = {"problem": str(problem), "answer": str(answer), "source": source}
    for key in ("level", "type", "subject", "unique_id"):
        if key in row and row[key] is not None:
            ex[key] = row[key]
    return ex


def load(
    split: str = "train",
    n: int | None = None,
    offline_ok: bool = True,
    seed: int = 0,
    *,
    dataset: str = "lighteval",
    hub_id: str | None = None,
) -> list[dict[str, Any]]:
    """MATH examples ``{"problem", "answer", "source", ...}``.

    Args:
        split: ``"train"`` (7,500) or ``"test"`` (5,000) for ``dataset="lighteval"``; only ``"test"`` (500)
            for ``"math500"``.
        n: keep a seeded random subset of ``n`` examples (``None``: the whole split in the dataset's order).
        offline_ok: on any loading failure warn and use the bundled sample instead of raising.
        seed: seed of the subset drawn when ``n`` is given.
        dataset: ``"lighteval"`` or ``"math500"``.
        hub_id: override the Hugging Face id or give a local path (``datasets.load_dataset`` argument).
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")
    _check_split(split, tuple(SPLIT_SIZES[dataset]), f"dataset={dataset!r}")
    hub = hub_id or DATASETS[dataset]
    try:
        from datasets import load_dataset

        ds = load_dataset(hub, split=split)
    except Exception as err:
        if not offline_ok:
            raise RuntimeError(
                f"could not load MATH data {hub!r} split {split!r}: {type(err).__name__}: {err}. "
                "Connect to the Hugging Face hub (unset HF_DATASETS_OFFLINE) or pass offline_ok=True to use "
                "the small bundled sample."
            ) from err
        warnings.warn(
            f"could not load {hub!r} ({type(err).__name__}: {str(err)[:200]}); falling back to the "
            f"small bundled MATH sample tre_edu/data/{BUNDLED_FILE} (source='bundled'). Results on it "
            "are NOT comparable with the paper.",
            UserWarning,
            stacklevel=2,
        )
        rows = [
            ex
            for row in read_bundled(BUNDLED_FILE)
            if row.get("split") == split and (ex := _example_from_row(row, "bundled")) is not None
        ]
        return subsample(rows, n, seed)
    rows = [ex for row in ds if (ex := _example_from_row(dict(row), hub)) is not None]
    if not rows:
        raise ValueError(f"{hub} split {split!r} has no usable rows (need 'problem' and 'solution' or 'answer')")
    return subsample(rows, n, seed)


# ----------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------


def prompt_text(problem: str) -> str:
    """The paper's user message for ``problem``."""
    return PROMPT.format(problem=problem)


class MathTask(Task):
    """MATH with the paper's prompt and the boxed-answer 0/1 reward.

    Args:
        dataset: ``"lighteval"`` (train/test, the paper's data) or ``"math500"`` (test only).
        hub_id: override the dataset id / local path.
        use_math_verify: set ``False`` to score with the string / rational rules only (faster, stricter).
    """

    name = "math"

    def __init__(self, dataset: str = "lighteval", hub_id: str | None = None, use_math_verify: bool = True):
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")
        self.dataset = dataset
        self.hub_id = hub_id
        self.use_math_verify = bool(use_math_verify)

    def load(
        self, split: str = "train", n: int | None = None, seed: int = 0, offline_ok: bool = True
    ) -> list[dict[str, Any]]:
        return load(split, n=n, offline_ok=offline_ok, seed=seed, dataset=self.dataset, hub_id=self.hub_id)

    def prompt(self, example: dict[str, Any], tokenizer: Any = None, style: str = "plain") -> str:
        """``"chat"``: the paper's prompt in the chat template; ``"plain"`` / ``"compact"``: raw prompt."""
        self.check_style(style)
        if "problem" not in example:
            raise ValueError("example must have a 'problem' field")
        text = prompt_text(example["problem"])
        return apply_chat_template(tokenizer, text) if style == "chat" else text

    def prompts(self, examples: list[dict[str, Any]], tokenizer: Any = None, style: str = "plain") -> list[str]:
        return [self.prompt(e, tokenizer, style) for e in examples]

    def score(self, response: str, example: dict[str, Any]) -> float:
        try:
            answer = example.get("answer")
        except AttributeError:
            return 0.0
        return score(response, answer, use_math_verify=self.use_math_verify)

    def describe(self) -> str:
        return (
            f"MATH ({self.hub_id or DATASETS[self.dataset]}); reward 1 if the last \\boxed{{}} answer is "
            "equivalent to the reference (normaliser, then math-verify), else 0"
        )


def make_task(dataset: str = "lighteval", **options: Any) -> MathTask:
    """``MathTask(dataset=..., hub_id=None, use_math_verify=True)``."""
    return MathTask(dataset=dataset, **options)


__all__ = [
    "PROMPT",
    "DATASETS",
    "MathTask",
    "is_equivalent",
    "last_boxed",
    "load",
    "make_task",
    "normalize_answer",
    "prompt_text",
    "score",
]
