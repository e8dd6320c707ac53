"""Countdown: generator, solver, traces, the reward checker (good / bad / hostile inputs), prompts, loader."""

from __future__ import annotations

import warnings
from fractions import Fraction

import pytest

from tre_edu.tasks import countdown as cd
from tre_edu.tasks import get_task


def _ok(eq: str) -> str:
    return f"<think>x</think><answer>{eq}</answer>"


# ---- generator and solver ----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_count", [3, 4])
def test_generate_reproducible_and_solvable(num_count):
    a = cd.generate(40, seed=3, num_count=num_count)
    b = cd.generate(40, seed=3, num_count=num_count)
    c = cd.generate(40, seed=4, num_count=num_count)
    assert a == b and a != c
    for ex in a:
        assert len(ex["numbers"]) == num_count and all(1 <= n <= 20 for n in ex["numbers"])
        assert 1 <= ex["target"] <= 100 and ex["source"] == "generated"
        assert cd.score(_ok(ex["solution"]), ex["numbers"], ex["target"]) == 1.0


def test_generate_bad_arguments():
    with pytest.raises(ValueError, match="num_count"):
        cd.generate(3, num_count=5)
    with pytest.raises(ValueError, match="number_range"):
        cd.generate(3, number_range=(5, 1))
    with pytest.raises(ValueError, match="n must be"):
        cd.generate(-1)


@pytest.mark.parametrize(
    "numbers,target",
    [
        ([3, 7, 20], 41),
        ([1, 2, 3], 6),
        ([19, 36, 55, 7], 65),
        ([3, 8, 8, 3], 24),
        ([1, 5, 5, 5], 24),
        ([4, 4], 1),
    ],
)
def test_solve_finds_valid_solutions(numbers, target):
    sol = cd.solve(numbers, target)
    assert sol is not None
    value, literals = cd.evaluate_equation(sol)
    assert value == Fraction(target) and sorted(literals) == sorted(numbers)


def test_solve_prefers_integers_and_reports_unsolvable():
    assert cd.solve([3, 7, 20], 41) in ("3*7+20", "20+3*7")
    assert cd.solve([1, 2, 3], 100) is None
    assert cd.solve([1, 1, 1, 1], 1000) is None
    assert cd.solve([3, 8, 8, 3], 24) == "8/(3-8/3)"  # only a fractional solution exists
    with pytest.raises(ValueError, match="numbers"):
        cd.solve([], 3)


def test_think_trace():
    assert cd.think_trace([3, 7, 20], 41, "3*7+20") == "3*7=21 21+20=41"
    assert cd.think_trace([3, 8, 8, 3], 24, "8/(3-8/3)") == "8/3=8/3 3-8/3=1/3 8/1/3=24"
    with pytest.raises(ValueError, match="target"):
        cd.think_trace([3, 7, 20], 40, "3*7+20")
    with pytest.raises(ValueError, match="solution"):
        cd.think_trace([3, 7, 20], 41, "3*7")


# ---- reward ------------------------------------------------------------------------------------------------
GOOD = [
    "<think></think><answer>3*7+20</answer>",
    "<think>3*7=21 21+20=41</think><answer>3*7+20</answer>",
    "<think> let me see </think> <answer> (3 * 7) + 20 </answer>",
    "blah <think>\nsteps\n</think>\n<answer>20 + 7 * 3</answer>\n",
    "<think>a</think><answer>(20+(7*3))</answer><|im_end|>",
    "<think>a</think><answer>20+21*3/3-0*0+0</answer>  <|endoftext|>  ".replace("21*3/3-0*0+0", "3*7"),
    "<think>a</think><answer>7*3+20</answer></s>",
    "<think>a</think><answer>\n7*3+20\n</answer>",  # whitespace around EQ is stripped
    "<think>first try <answer>1</answer></think><answer>7*3+20</answer>",
]
BAD = [
    "",
    "3*7+20",
    "<answer>3*7+20</answer>",  # no think block
    "<think>x</think><answer>3*7+20</answer> trailing text",
    "<think>x</think><answer>3*7+20</answer><think></think>",
    "</think><answer>3*7+20</answer>",  # no opening think
    "<think>x</think> junk <answer>3*7+20</answer>",  # text between think and answer
    "<think>x</think><answer>3*7+20",
    "<think>x</think><answer>3*7+20</answer>".replace("</answer>", "</Answer>"),
    _ok("3*7+21"),  # wrong value
    _ok("3*7"),  # number missing
    _ok("3*7+20+3"),  # number used twice
    _ok("3*7+20+0"),  # extra number
    _ok("41"),
    _ok("(3*7)+(20)-0*0"),
    _ok("3*7+20.0"),  # decimals are not allowed
    _ok("-3*7+20+42"),
]
HOSTILE = [
    _ok("3**7"),
    _ok("20//7+3"),
    _ok("__import__('os').system('echo hi')"),
    _ok("abs(3)+7*20"),
    _ok("3*7+20 # comment"),
    _ok("3*7+٢0"),  # Arabic-Indic digit
    _ok("3*7+２0"),  # full-width digit
    _ok("3*7\n+20"),
    _ok("3*7\t+20"),
    _ok("(3*7+20"),
    _ok("3*7+20)"),
    _ok(")3*7+20("),
    _ok("3/(7-7)+20"),
    _ok("(" * 10000 + "1" + ")" * 10000),
    _ok("(" * 40 + "3*7+20" + ")" * 40),
    _ok("9" * 5000),
    _ok("+".join(["1"] * 5000)),
    _ok("99999*99999*99999*99999"),
    _ok("3*7+-20"),
    _ok("+3*7+20"),
    _ok("3 7 20"),
    _ok("(3)(7)(20)"),
    _ok("3*7+20,"),
    _ok("3*7+0x14"),
    _ok("3*7+1_9+1"),
    _ok("3*7+20j"),
    _ok("03*7+20"),
    _ok(""),
    _ok("   "),
    "<think>" * 100000 + "</think><answer>3*7+20</answer>",
    "<answer>" * 50000 + "</answer>",
    "\x00" * 1000,
    None,
    123,
    b"<think></think><answer>3*7+20</answer>",
]


@pytest.mark.parametrize("response", GOOD)
def test_score_good(response):
    assert cd.score(response, [3, 7, 20], 41) == 1.0
    assert cd.score(response, numbers=[20, 3, 7], target=41.0, solution="x", source="generated") == 1.0


@pytest.mark.parametrize("response", BAD + HOSTILE)
def test_score_bad_and_hostile_inputs_give_zero(response):
    assert cd.score(response, [3, 7, 20], 41) == 0.0


def test_score_edge_cases():
    assert cd.score(_ok("8/(3-8/3)"), [3, 8, 8, 3], 24) == 1.0  # fractional intermediate values
    assert cd.score(_ok("1/3"), [1, 3], 0.333334) == 1.0  # within 1e-5
    assert cd.score(_ok("1/3"), [1, 3], 0.3334) == 0.0
    assert cd.score(_ok("3*7+20"), None, 41) == 0.0  # malformed example: 0, never raises
    assert cd.score(_ok("3*7+20"), [3, 7, 20], "forty") == 0.0
    assert cd.score(_ok("3*7+20"), [3, 7, 20.5], 41) == 0.0
    assert cd.evaluate_equation("2*(3+4)") == (Fraction(14), [2, 3, 4])
    assert cd.evaluate_equation("2**3") is None


def test_task_score_and_reward():
    task = get_task("countdown")
    ex = {"numbers": [3, 7, 20], "target": 41}
    assert task.score(GOOD[0], ex) == 1.0 and task.score(BAD[0], ex) == 0.0
    assert task.score(GOOD[0], None) == 0.0
    assert task.reward([GOOD[0], HOSTILE[0]], [ex, ex]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="same length"):
        task.reward([GOOD[0]], [ex, ex])


# ---- prompts -----------------------------------------------------------------------------------------------
PAPER_TEXT = (
    "Using the numbers [3, 7, 20], create an equation that equals 41. "
    "You can use basic arithmetic operations (+, -, *, /) and each number can only be used once. "
    "Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)


class _ChatTokenizer:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return f"<|user|>{messages[0]['content']}<|assistant|>"


def test_prompts_match_the_paper():
    task = cd.make_task()
    ex = {"numbers": [3, 7, 20], "target": 41}
    assert task.prompt(ex, style="plain") == PAPER_TEXT
    assert task.prompt(ex, None, "chat") == PAPER_TEXT  # no chat template: plain text
    assert task.prompt(ex, _ChatTokenizer(), "chat") == f"<|user|>{PAPER_TEXT}<|assistant|>"
    assert task.prompt(ex) == "3 7 20->41:"  # default style: compact
    assert task.prompts([ex, ex], style="compact") == ["3 7 20->41:"] * 2
    with pytest.raises(ValueError, match="style"):
        task.prompt(ex, style="fancy")


def test_reference_response_passes_the_checker():
    for think in (False, True):
        task = cd.make_task(num_count=4, think=think)
        for ex in task.generate(20, seed=1):
            resp = task.reference_response(ex)
            assert task.score(resp, ex) == 1.0
            assert ("=" in resp) == think
    ex = {"numbers": [3, 7, 20], "target": 41}
    assert cd.make_task().reference_response(ex) == "<think></think><answer>3*7+20</answer>"
    with pytest.raises(ValueError, match="no solution"):
        cd.make_task().reference_response({"numbers": [1, 2, 3], "target": 100})


def test_make_task_options():
    task = get_task("countdown", num_count=4, think=True, number_range=(1, 9))
    assert task.num_count == 4 and task.think and task.number_range == (1, 9)
    with pytest.raises(ValueError, match="countdown options"):
        get_task("countdown", digits=3)
    with pytest.raises(ValueError, match="think"):
        cd.make_task(think="yes")


# ---- loader ------------------------------------------------------------------------------------------------
def test_load_offline_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.warns(UserWarning, match="offline: falling back to generated puzzles"):
        train = cd.load("train", n=30, seed=0)
    with pytest.warns(UserWarning):
        test = cd.load("test", n=30, seed=0)
    assert len(train) == 30 and all(e["source"] == "generated" for e in train)
    assert [e["numbers"] for e in train] != [e["numbers"] for e in test]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cd.load("train", n=30, seed=0) == train  # reproducible
    with pytest.raises(RuntimeError, match="offline_ok"):
        cd.load("train", n=3, offline_ok=False)
    with pytest.raises(ValueError, match="split"):
        cd.load("validation", n=3)


def test_load_hub_path_uses_the_paper_rows(monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = {"nums": [[i % 50 + 1, 2, 3] for i in range(12500)], "target": list(range(12500))}
    fake = datasets.Dataset.from_dict(rows)
    calls = []

    def fake_load_dataset(name, split=None, **kw):
        calls.append((name, split))
        return fake

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    train = cd.load("train", n=5)
    test = cd.load("test", n=5)
    assert calls == [(cd.HUB_ID, "train")] * 2
    assert [e["target"] for e in train] == [0, 1, 2, 3, 4]
    assert [e["target"] for e in test] == [7500, 7501, 7502, 7503, 7504]
    assert test[0] == {"numbers": [1, 2, 3], "target": 7500, "solution": None, "source": cd.HUB_ID}
    assert len(cd.load("test")) == 5000 and len(cd.load("train")) == 7500

    def broken(*a, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.warns(UserWarning, match="no network"):
        assert cd.load("train", n=2)[0]["source"] == "generated"
