"""MATH task: boxed-answer extraction, answer equivalence, hostile output, the paper's prompt, loaders."""

from __future__ import annotations

import threading
import time

import datasets
import pytest

from tre_edu.tasks import get_task
from tre_edu.tasks import math as mt

# ----------------------------------------------------------------------------------------------------
# last_boxed
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{5}.", "5"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("nested \\boxed{\\frac{\\sqrt{3}}{2}} end", "\\frac{\\sqrt{3}}{2}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\fbox{7}", "7"),
        ("\\boxed{3} and later \\fbox{4}", "4"),
        ("$\\boxed 5$", "5"),
        ("\\boxed {x+1}", "x+1"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("no box here", None),
        ("", None),
        ("\\boxed{unclosed", None),
        ("\\boxed", None),
        ("\\boxed{\\boxed{5}}", "5"),  # a box that wraps only a box is unwrapped
        ("\\fbox{ \\boxed{\\boxed{x+1}} }", "x+1"),
        ("\\boxed{5 \\boxed{6}}", "5 \\boxed{6}"),  # the outermost box is the answer, not a box inside it
        ("\\boxed{1} then \\boxed{2} then \\boxed", "2"),  # a trailing \\boxed with no argument is no box
        ("\\boxed{1} then \\boxed{2", None),  # the last box is never closed
    ],
)
def test_last_boxed(text, expected):
    assert mt.last_boxed(text) == expected


def test_last_boxed_non_string():
    assert mt.last_boxed(None) is None  # type: ignore[arg-type]
    assert mt.last_boxed(123) is None  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# score: equivalence
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("\\frac12", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac{3}{8}", "0.375"),
        ("x=3", "3"),
        ("x = 3", "3"),
        ("3", "x=3"),
        ("(1, 2]", "(1,2]"),
        ("[4,\\infty)", "[4, \\infty)"),
        ("\\left( 2, 3 \\right)", "(2, 3)"),
        ("5\\sqrt2", "5\\sqrt{2}"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"),
        ("720^\\circ", "720"),
        ("108", "108^{\\circ}"),
        ("5\\text{ cm}", "5"),
        ("1,000", "1000"),
        ("25\\%", "25"),
        ("\\text{(A)}", "(A)"),
        ("3.", "3"),
        ("(x+1)^2", "x^2+2x+1"),
        ("\\{-1,0,1\\}", "\\{1, 0, -1\\}"),
    ],
)
def test_score_equivalent(pred, ref):
    assert mt.score(f"Thinking... so \\boxed{{{pred}}}", ref) == 1.0


@pytest.mark.parametrize(
    "pred, ref",
    [("3", "4"), ("(1,2)", "[1,2]"), ("\\frac{1}{3}", "0.33"), ("2\\sqrt{2}", "\\sqrt{2}"), ("", "1")],
)
def test_score_not_equivalent(pred, ref):
    assert mt.score(f"\\boxed{{{pred}}}", ref) == 0.0


def test_score_uses_last_box_and_needs_a_box():
    assert mt.score("\\boxed{4} no wait \\boxed{5}", "5") == 1.0
    assert mt.score("\\boxed{5} no wait \\boxed{4}", "5") == 0.0
    assert mt.score("The answer is 5.", "5") == 0.0


def test_score_accepts_example_fields():
    ex = {"problem": "p", "answer": "\\frac{1}{2}", "source": "bundled", "level": "Level 1"}
    assert mt.score("\\boxed{0.5}", **ex) == 1.0


def test_rules_without_math_verify():
    assert mt.score("\\boxed{\\dfrac12}", "0.5", use_math_verify=False) == 1.0
    assert mt.score("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", use_math_verify=False) == 0.0


@pytest.mark.parametrize(
    "response, reference, expected",
    [
        ("\\boxed{\\boxed{5}}", "5", 1.0),  # a double box around 5 is the answer 5
        ("\\boxed{5 \\boxed{6}}", "6", 0.0),
        ("\\boxed{5 \\boxed{6}}", "5", 0.0),
        ("\\boxed{\\frac{1}{0}}", "\\frac{1}{0}", 0.0),  # no value: never correct, not even against itself
        ("\\boxed{\\frac10}", "\\frac{1}{0}", 0.0),
        ("\\boxed{1/0}", "1/0", 0.0),
        ("\\boxed{3 \\div 0}", "3 \\div 0", 0.0),
        ("\\boxed{nan}", "nan", 0.0),
        ("\\boxed{NaN}", "\\text{NaN}", 0.0),
        ("\\boxed{5}", "nan", 0.0),  # a broken reference scores nothing
        ("\\boxed{1/0.5}", "2", 1.0),  # a zero digit that is not a zero denominator
        ("\\boxed{\\frac{0}{1}}", "0", 1.0),
        ("\\boxed{\\frac{1}{10}}", "0.1", 1.0),
        ("\\boxed{\\infty}", "\\infty", 1.0),  # infinity is an answer (limits, intervals)
        ("\\boxed{\\tan x}", "\\tan x", 1.0),
        ("\\boxed{banana}", "banana", 1.0),
    ],
)
def test_grader_edge_cases(response, reference, expected):
    """Decided and documented in the module docstring: nested boxes, values that are no number."""
    assert mt.score(response, reference) == expected
    assert mt.MathTask().reward([response], [{"answer": reference}]) == [expected]


# ----------------------------------------------------------------------------------------------------
# hostile output
# ----------------------------------------------------------------------------------------------------

HOSTILE = [
    "\\boxed{",
    "\\boxed{{{{{{",
    "}}}}}\\boxed{}",
    "\\boxed{}",
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "\\boxed{" + "{" * 10_000,
    "\\boxed{" + "9" * 5_000 + "}",
    "\\boxed{\\frac{\\frac{}{}}{\\sqrt[}}",
    "\\boxed{\\begin{pmatrix} 2 & \\\\ \\end{}}",  # (with a 1 inside, math-verify extracts the 1)
    "\\boxed{\\left( \\right]]]\\\\}",
    "\\boxed{$$$\\$\\%^_^_}",
    "\\boxed" * 50_000,
    "x" * 1_000_000,
    "\\boxed{\x00\x01\udcff}",
]


@pytest.mark.parametrize("response", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_responses_score_zero(response):
    assert mt.score(response, "1") == 0.0


@pytest.mark.parametrize("bad", [None, 123, b"\\boxed{1}", ["\\boxed{1}"]])
def test_non_string_inputs(bad):
    assert mt.score(bad, "1") == 0.0
    assert mt.score("\\boxed{1}", None) == 0.0
    assert mt.MathTask().score("\\boxed{1}", bad) == 0.0


def test_expensive_expression_is_time_bounded():
    # a power tower that sympy cannot settle: math-verify's own timeout stops it
    assert mt.score("\\boxed{10^{10^{10^{10}}}}", "1", timeout_s=1) == 0.0


def test_score_in_worker_thread():
    out = []
    worker = threading.Thread(target=lambda: out.append(mt.score("\\boxed{2\\sqrt{2}}", "\\sqrt{8}")))
    worker.start()
    worker.join(30)
    assert out == [1.0]


# ----------------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------------


class _ChatTok:
    chat_template = "fake"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert tokenize is False and add_generation_prompt is True
        return "<user>" + messages[0]["content"] + "</user><assistant>"


def test_prompt_is_the_papers():
    task = mt.MathTask()
    ex = {"problem": "What is $1+1$?", "answer": "2"}
    paper = "What is $1+1$? Let's think step by step and output the final answer within \\boxed{}."
    assert task.prompt(ex, style="plain") == paper
    assert task.prompt(ex, style="compact") == paper
    assert task.prompt(ex, _ChatTok(), style="chat") == "<user>" + paper + "</user><assistant>"
    assert task.prompt(ex, None, style="chat") == paper  # no tokenizer: plain text
    assert task.prompts([ex, ex], style="plain") == [paper, paper]
    with pytest.raises(ValueError, match="style"):
        task.prompt(ex, style="fancy")


# ----------------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------------


def _fail(*args, **kwargs):
    raise ConnectionError("offline (test)")


def test_offline_fallback_warns_and_uses_bundled(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", _fail)
    with pytest.warns(UserWarning, match="bundled"):
        train = mt.load("train")
    with pytest.warns(UserWarning, match="bundled"):
        test = mt.load("test")
    assert len(train) >= 20 and len(test) >= 10
    assert all(e["source"] == "bundled" for e in train + test)
    assert not {e["problem"] for e in train} & {e["problem"] for e in test}
    # every bundled reference is reachable: the solution's own boxed answer scores 1
    for e in train + test:
        assert mt.score(f"\\boxed{{{e['answer']}}}", **e) == 1.0
    with pytest.raises(RuntimeError, match="offline_ok"):
        mt.load("train", offline_ok=False)


def test_hub_path_lighteval(monkeypatch):
    calls = []

    def fake(name, split=None, **kw):
        calls.append((name, split))
        return datasets.Dataset.from_dict(
            {
                "problem": ["p1", "p2", "p3"],
                "solution": ["so \\boxed{1} or \\boxed{\\frac{1}{2}}", "\\fbox{7}", "no answer here"],
                "level": ["Level 1", "Level 2", "Level 3"],
                "type": ["Algebra"] * 3,
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", fake)
    rows = mt.load("test")
    assert calls == [("DigitalLearningGmbH/MATH-lighteval", "test")]
    assert [r["answer"] for r in rows] == ["\\frac{1}{2}", "7"]  # the row without a boxed answer is skipped
    assert rows[0]["source"] == "DigitalLearningGmbH/MATH-lighteval" and rows[0]["level"] == "Level 1"
    # seeded subset: deterministic, right size
    assert mt.load("test", n=1, seed=3) == mt.load("test", n=1, seed=3)
    assert len(mt.load("test", n=1)) == 1


def test_hub_path_math500(monkeypatch):
    calls = []

    def fake(name, split=None, **kw):
        calls.append((name, split))
        return datasets.Dataset.from_dict(
            {"problem": ["p"], "solution": ["... \\boxed{3}"], "answer": ["3"], "subject": ["Algebra"]}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake)
    task = get_task("math", dataset="math500")
    rows = task.load("test")
    assert calls == [("HuggingFaceH4/MATH-500", "test")]
    assert rows == [{"problem": "p", "answer": "3", "source": "HuggingFaceH4/MATH-500", "subject": "Algebra"}]
    assert task.reward(["\\boxed{3}", "\\boxed{4}"], rows * 2) == [1.0, 0.0]
    with pytest.raises(ValueError, match="split"):
        task.load("train")
    assert "MATH-500" in task.describe()


def test_bad_options():
    with pytest.raises(ValueError, match="dataset"):
        mt.make_task(dataset="gsm8k")
    with pytest.raises(ValueError, match="split"):
        mt.load("validation")
    with pytest.raises(ValueError, match="n must"):
        mt.subsample([1, 2], 0, 0)


# ----------------------------------------------------------------------------------------------------
# issue 11 item 9: junk must not pass as the number it starts with; true answers keep passing
# ----------------------------------------------------------------------------------------------------

FALSE_ACCEPTS = [  # each must NOT be graded equal to 7 (math-verify alone reads most of them as 7)
    *("7 + ???", "7 @", "7 ???", "7 #", "7;", "7:", "7 + ", "7^", "7_", "7 \\cdot", "7\\times", "7'", "7 ="),  # garbage
    *("7)", "7\\}", "(7", "\\{7", "7]", "7\\right)", "[7"),  # unbalanced
    *("7\\text{ not}", "7 \\text{ is wrong}", "7 \\text{(wrong)}", "7\\mbox{ or 8}", "7 \\text{ or } 8"),  # text
    *("7 \\neq", "\\not 7", "\\in 7", "7 \\approx", "\\approx 7", "7\\in", "7 = 8", "8 = 7", "7 < 8"),  # relations
    *("7 \\foo", "7 \\color{red}{8}", "7 \\hline", "7 \\end{align}", "\\begin{align} 7", "\\phantom{8}7"),  # commands
    *("7 8", "7, 8", "7 \\quad 8", "7 \\\\ 8", "7 & 8", "7.0001", "70", "-7", "17", "7^2", "6.99999"),  # numbers
    *("7...", "7\\ldots", "7 \\pm 1", "seven", "7 \\text{ apples and } 8", "7\\,\\text{or}\\,8"),
]


@pytest.mark.parametrize("junk", FALSE_ACCEPTS)
def test_junk_is_not_accepted(junk):
    assert mt.score(f"\\boxed{{{junk}}}", "7") == 0.0


TRUE_ACCEPTS = [
    ("7", "7"), ("7.0", "7"), ("\\sqrt{49}", "7"), ("\\frac{14}{2}", "7"), ("8-1", "7"), ("7\\text{ cm}", "7"),
    ("7 \\text{ square units}", "7"), ("7\\mbox{ inches}^2", "7"), ("x = 7", "7"), ("7^\\circ", "7"), ("7\\%", "7"),
    ("\\mathbf{7}", "7"), ("1e3", "1000"), ("1000", "1e3"), ("1.5\\times10^{3}", "1500"), ("2e-3", "0.002"),
    ("x \\in [1, 2]", "[1,2]"), ("x \\ge 2", "x \\geq 2"), ("y = 2x + 3", "y=2x+3"),
    ("(1,2) \\cup (3,4)", "(1,2)\\cup(3,4)"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"), ("\\pi r^2", "r^2\\pi"),
    ("\\{1, 2\\}", "\\{2,1\\}"), ("2\\sqrt{2}", "\\sqrt{8}"), ("x^2+2x+1", "(x+1)^2"), ("\\text{Monday}", "Monday"),
]  # fmt: skip


@pytest.mark.parametrize("pred, ref", TRUE_ACCEPTS)
def test_true_answers_keep_passing(pred, ref):
    assert mt.score(f"so \\boxed{{{pred}}}", ref) == 1.0


def test_well_formed_gate():
    assert mt.well_formed("\\frac{\\sqrt{3}}{2}") and mt.well_formed("(1, 2]") and mt.well_formed("x = 3")
    assert not mt.well_formed("7 + ???") and not mt.well_formed("7 = 8") and mt.well_formed("7 = 8", "a = b")


# ----------------------------------------------------------------------------------------------------
# issue 11 item 8: every answer's grading is bounded in every thread, and so is a batch
# ----------------------------------------------------------------------------------------------------

SLOW = ["\\boxed{9^{9^{9}}}", "\\boxed{1000000!}", "\\boxed{10^{10^{10^{10}}}}"]


def _in_thread(fn, limit):
    out = []
    worker = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    start = time.monotonic()
    worker.start()
    worker.join(limit)
    return out, time.monotonic() - start


@pytest.mark.parametrize("response", SLOW)
def test_hostile_answers_are_bounded_in_a_thread(response):
    mt._CACHE.clear()  # before the fix: > 90 s holding the GIL (9^{9^{9}}), 8.2 s (1000000!)
    out, took = _in_thread(lambda: mt.score(response, "1", timeout_s=1), limit=60)
    assert out == [0.0] and took < 1 + mt.START_TIMEOUT_S / 4


def test_a_batch_of_hostile_answers_is_bounded_and_counted():
    mt._CACHE.clear()
    task = mt.MathTask(timeout_s=1, batch_timeout_s=4, workers=2)
    responses = [f"\\boxed{{{k}^{{{k}^{{{k}}}}}}}" for k in range(5, 25)] + ["\\boxed{1}", "\\boxed{2\\sqrt{2}}"]
    examples = [{"answer": "1"}] * 21 + [{"answer": "\\sqrt{8}"}]
    start = time.monotonic()
    scores = task.reward(responses, examples)
    took = time.monotonic() - start
    assert took < 4 + 3  # the budget, plus killing the workers still running
    assert scores[:20] == [0.0] * 20 and scores[20] == 1.0  # the cheap answer is graded without a worker
    stats = task.last_reward_stats
    assert stats["reward/grader_timeouts"] >= 1 and stats["reward/grader_skipped"] >= 1
    assert stats["reward/grader_timeouts"] + stats["reward/grader_skipped"] <= 21
    assert task.reward(["\\boxed{2\\sqrt{2}}"], [{"answer": "\\sqrt{8}"}]) == [1.0]  # the pool recovers
    assert task.last_reward_stats == {"reward/grader_timeouts": 0.0, "reward/grader_skipped": 0.0}


def test_cheap_answers_do_not_start_a_worker(monkeypatch):
    def no_workers(*a, **k):
        raise AssertionError("a worker process was started")

    monkeypatch.setattr(mt, "_Worker", no_workers)
    task = mt.MathTask()
    assert task.reward(["\\boxed{0.5}", "\\boxed{3}", "\\boxed{7 @}"], [{"answer": "\\frac12"}] * 3) == [1.0, 0.0, 0.0]
    assert task.success_threshold == 1.0


def test_options_are_checked():
    from tre_edu.tasks import check_options

    with pytest.raises(ValueError, match=r"task.options.workers must be an integer >= 1"):
        check_options("math", {"workers": 0})
    with pytest.raises(ValueError, match="timeout_s"):
        mt.MathTask(timeout_s=-1)
