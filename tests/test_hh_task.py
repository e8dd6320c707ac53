"""HH task: transcripts, the paper's UltraFeedback split, offline fallback, batched reward-model scoring."""

from __future__ import annotations

import json
import math

import datasets
import pytest
from conftest import tiny_reward_model

from tre_edu.tasks import get_task, hh

# ----------------------------------------------------------------------------------------------------
# transcripts
# ----------------------------------------------------------------------------------------------------


def test_split_transcript_single_turn():
    prompt, response = hh.split_transcript("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?")
    assert prompt == "\n\nHuman: Hi there\n\nAssistant:"
    assert response == "Hello! How can I help?"
    assert hh.transcript_to_messages(prompt) == [{"role": "user", "content": "Hi there"}]


def test_split_transcript_multi_turn_keeps_prompt_whole():
    text = "\n\nHuman: I want a pet.\n\nAssistant: What kind?\n\nHuman: A cat.\n\nAssistant: Cats are great."
    prompt, response = hh.split_transcript(text)
    assert prompt == "\n\nHuman: I want a pet.\n\nAssistant: What kind?\n\nHuman: A cat.\n\nAssistant:"
    assert response == "Cats are great."
    assert hh.transcript_to_messages(prompt) == [
        {"role": "user", "content": "I want a pet."},
        {"role": "assistant", "content": "What kind?"},
        {"role": "user", "content": "A cat."},
    ]


def test_split_transcript_empty_final_response():
    assert hh.split_transcript("\n\nHuman: hi\n\nAssistant:") == ("\n\nHuman: hi\n\nAssistant:", "")


@pytest.mark.parametrize(
    "bad",
    ["no markers at all", "\n\nHuman: only a question", "\n\nAssistant: answer without a question", None, 3],
)
def test_split_transcript_malformed(bad):
    with pytest.raises(ValueError, match="transcript"):
        hh.split_transcript(bad)


def test_transcript_to_messages_malformed():
    with pytest.raises(ValueError, match="malformed"):
        hh.transcript_to_messages("preamble\n\nHuman: x\n\nAssistant:")
    with pytest.raises(ValueError, match="malformed"):
        hh.transcript_to_messages("just text")


# ----------------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------------


def _uf_dataset(n_rows: int) -> datasets.Dataset:
    def conv(i: int, answer: str) -> list[dict[str, str]]:
        return [
            {"role": "user", "content": f"question {i}"},
            {"role": "assistant", "content": f"{answer} {i}"},
        ]

    return datasets.Dataset.from_dict(
        {
            "chosen": [conv(i, "good") for i in range(n_rows)],
            "rejected": [conv(i, "bad") for i in range(n_rows)],
            "score_chosen": [8.0] * n_rows,
            "score_rejected": [2.0] * n_rows,
        }
    )


def test_ultrafeedback_paper_split(monkeypatch):
    fake = _uf_dataset(40)
    calls = []

    def load_dataset(name, split=None, **kw):
        calls.append((name, split))
        return fake

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    kw = dict(source="ultrafeedback", n_train=10, n_test=5)  # scaled-down 7,500 / 5,000
    train = hh.load("train", **kw)
    test = hh.load("test", **kw)
    # both splits come from the hub's train split, shuffled with seed 42
    assert calls == [("trl-lib/ultrafeedback_binarized", "train")] * 2
    shuffled = fake.shuffle(seed=42)
    assert [e["prompt_text"] for e in train] == [r["chosen"][0]["content"] for r in shuffled.select(range(10))]
    assert [e["prompt_text"] for e in test] == [r["chosen"][0]["content"] for r in shuffled.select(range(10, 15))]
    assert len(train) == 10 and len(test) == 5
    assert not {e["prompt_text"] for e in train} & {e["prompt_text"] for e in test}
    assert [e["prompt_text"] for e in train] != [f"question {i}" for i in range(10)]  # really shuffled
    ex = train[0]
    i = ex["prompt_text"].split()[-1]
    assert ex["prompt"] == [{"role": "user", "content": f"question {i}"}]
    assert (ex["chosen"], ex["rejected"]) == (f"good {i}", f"bad {i}")
    assert ex["source"] == "trl-lib/ultrafeedback_binarized" and ex["dataset"] == "ultrafeedback"
    assert ex["score_chosen"] == 8.0
    with pytest.raises(ValueError, match="exceeds"):
        hh.load("train", source="ultrafeedback", n_train=30, n_test=20)
    with pytest.raises(ValueError, match="n_train"):
        hh.load("train", source="ultrafeedback", n_train=0)


def test_hh_rlhf_hub_path(monkeypatch):
    chosen = [
        "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good",
        "\n\nHuman: x\n\nAssistant: fine",
    ]
    rejected = ["\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: bad", "garbage row"]
    calls = []

    def load_dataset(name, split=None, **kw):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"chosen": chosen, "rejected": rejected})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        rows = hh.load("test", source="hh-rlhf")
    assert calls == [("Anthropic/hh-rlhf", "test")]
    assert len(rows) == 1
    ex = rows[0]
    assert ex["prompt_text"] == "Human: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert [m["role"] for m in ex["prompt"]] == ["user", "assistant", "user"]
    assert (ex["chosen"], ex["rejected"], ex["dataset"]) == ("good", "bad", "hh-rlhf")


@pytest.mark.parametrize("source", ["ultrafeedback", "hh-rlhf"])
def test_offline_fallback(monkeypatch, source):
    def fail(*a, **k):
        raise ConnectionError("offline (test)")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    task = hh.HHTask(source=source)
    with pytest.warns(UserWarning, match="bundled"):
        train = task.load("train")
    with pytest.warns(UserWarning, match="bundled"):
        test = task.load("test", n=3, seed=1)
    assert len(train) >= 15 and len(test) == 3
    assert all(e["source"] == "bundled" and e["dataset"] == source for e in train + test)
    assert all(e["chosen"] and e["rejected"] and e["prompt"][-1]["role"] == "user" for e in train)
    assert source in task.describe() and "bundled" in task.describe()
    with pytest.raises(RuntimeError, match="offline_ok"):
        task.load("train", offline_ok=False)


def test_bundled_samples_have_multi_turn_hh():
    rows = hh.bundled_examples("hh-rlhf")
    assert any(len(e["prompt"]) >= 3 for e in rows)
    assert len(rows) >= 20 and len(hh.bundled_examples("ultrafeedback")) >= 20


def test_bad_options():
    with pytest.raises(ValueError, match="source"):
        hh.HHTask(source="reddit")
    with pytest.raises(ValueError, match="split"):
        hh.load("validation")
    with pytest.raises(ValueError, match="batch_size"):
        hh.HHTask(batch_size=0)
    with pytest.raises(ValueError, match="reward_model"):
        hh.HHTask(reward_model=42)


# ----------------------------------------------------------------------------------------------------
# prompts and rewards
# ----------------------------------------------------------------------------------------------------

EXAMPLES = hh.bundled_examples("hh-rlhf")


class _ChatTok:
    chat_template = "fake"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_prompt_styles():
    task = hh.HHTask(source="hh-rlhf")
    ex = next(e for e in EXAMPLES if len(e["prompt"]) == 3)
    assert task.prompt(ex, style="plain") == ex["prompt_text"]
    assert ex["prompt_text"].startswith("Human:") and ex["prompt_text"].endswith("\n\nAssistant:")
    assert task.prompt(ex, style="compact") == ex["prompt_text"]
    chat = task.prompt(ex, _ChatTok(), style="chat")
    assert chat.count("<user>") == 2 and chat.count("<assistant>") == 2
    with pytest.raises(ValueError, match="style"):
        task.prompt(ex, style="x")


class _CountingRM:
    """Reward = length of the response; records the batch sizes it saw."""

    def __init__(self, with_batch_size: bool):
        self.calls: list[int] = []
        if with_batch_size:
            self.score = self._score_bs
        else:
            self.score = self._score

    def _score(self, prompts, responses):
        assert all(isinstance(p, list) for p in prompts)  # message lists
        self.calls.append(len(responses))
        return [float(len(r)) for r in responses]

    def _score_bs(self, prompts, responses, batch_size=16):
        self.calls.append(len(responses))
        return [float(len(r)) for r in responses]


def test_reward_batches_with_a_plain_scorer():
    rm = _CountingRM(with_batch_size=False)
    task = get_task("hh", source="hh-rlhf", reward_model=rm, batch_size=4)
    responses = ["a" * i for i in range(10)]
    assert task.reward(responses, EXAMPLES[:10]) == [float(i) for i in range(10)]
    assert rm.calls == [4, 4, 2]
    assert task.score("abc", EXAMPLES[0]) == 3.0
    assert task.reward([], []) == []
    assert task.reward([None], EXAMPLES[:1]) == [0.0]  # non-string output is scored as ""


def test_reward_passes_batch_size_through():
    rm = _CountingRM(with_batch_size=True)
    task = hh.make_task(source="hh-rlhf", reward_model=rm, batch_size=4)
    task.reward(["x"] * 10, EXAMPLES[:10])
    assert rm.calls == [10]  # the reward model batches itself


def test_reward_with_a_callable_and_errors():
    task = hh.HHTask(source="hh-rlhf", reward_model=lambda p, r: [1.0] * len(r), batch_size=3)
    assert task.reward(["x"] * 5, EXAMPLES[:5]) == [1.0] * 5
    with pytest.raises(ValueError, match="same length"):
        task.reward(["x"], EXAMPLES[:2])
    task.reward_model = None
    with pytest.raises(ValueError, match="reward model"):
        task.reward(["x"], EXAMPLES[:1])
    bad = hh.HHTask(reward_model=lambda p, r: [1.0])
    with pytest.raises(ValueError, match="returned 1 scores"):
        bad.reward(["x", "y"], EXAMPLES[:2])


def test_reward_with_tiny_reward_model():
    rm = tiny_reward_model(max_length=64)
    task = hh.HHTask(source="hh-rlhf", reward_model=rm, batch_size=3)
    exs = EXAMPLES[:7]
    responses = [e["chosen"] for e in exs]
    got = task.reward(responses, exs)
    want = rm.score([e["prompt"] for e in exs], responses, batch_size=1)
    assert got == pytest.approx(want, abs=1e-5)
    assert hh.score(responses[0], reward_model=rm, **exs[0]) == pytest.approx(want[0], abs=1e-5)
    assert "RewardModel" in task.describe()


# ----------------------------------------------------------------------------------------------------
# issue 11 item 14: hostile inputs give a finite score or an error naming the example / file and line
# ----------------------------------------------------------------------------------------------------


def test_lone_surrogate_response_scores_finite():
    task = hh.HHTask(source="hh-rlhf", reward_model=tiny_reward_model(max_length=64))
    scores = task.reward(["\ud800", "ok \udcff ok"], EXAMPLES[:2])  # was TypeError from the tokenizer
    assert all(math.isfinite(x) for x in scores)
    assert task.success_threshold is None


def test_example_without_prompt_is_a_clear_error():
    task = hh.HHTask(source="hh-rlhf", reward_model=lambda p, r: [0.0] * len(r))
    with pytest.raises(ValueError, match="HH example 1 has no 'prompt'"):  # was a bare KeyError
        task.reward(["a", "b"], [EXAMPLES[0], {"chosen": "x"}])


def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_bytes(b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b"}\n{"chosen": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl: line 2 is not UTF-8"):  # was UnicodeDecodeError, no file
        hh.load("train", source="hh-rlhf", hub_id=str(bad))
    bad.write_text('{"split": "train"}\nnot json\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl: line 2 is not valid JSON"):
        hh.load("train", source="hh-rlhf", hub_id=str(bad))


def test_local_jsonl_rows_and_malformed_row_named(tmp_path):
    good = tmp_path / "uf.jsonl"
    rows = [{"chosen": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "y"}],
             "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "n"}]}
            for i in range(4)]  # fmt: skip
    rows.append({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]})
    good.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.warns(UserWarning, match=r"skipped 1 malformed ultrafeedback row\(s\).*first: row \d"):
        got = hh.load("train", source="ultrafeedback", hub_id=str(good), n_train=4, n_test=1)
    assert len(got) in (3, 4) and got[0]["source"] == str(good)  # 4 of the 5 shuffled rows, maybe the bad one


def test_check_options_names_the_key():
    from tre_edu.tasks import check_options

    with pytest.raises(ValueError, match=r"task.options.batch_size must be an integer >= 1; got 0"):
        check_options("hh", {"batch_size": 0})
    with pytest.raises(ValueError, match=r"unknown option task.options.rm; hh options are: source, reward_model"):
        check_options("hh", {"rm": "x"})
    check_options("hh", {"reward_model": "runs/no/such/dir"})  # paths are checked when the task is built
