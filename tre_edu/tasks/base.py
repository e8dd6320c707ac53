"""The task protocol shared by Countdown, MATH and HH."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

PROMPT_STYLES = ("chat", "plain", "compact")


class Task(ABC):
    """A task turns examples into prompts and scores responses.

    Subclasses set ``name`` and implement :meth:`load`, :meth:`prompt` and :meth:`score`.

    - ``load(split, n, seed, offline_ok)`` returns a list of example dicts; each records ``"source"``
      (the hub dataset id, ``"bundled"`` or ``"generated"``) so every run can say what data it used.
    - ``prompt(example, tokenizer, style)`` returns the prompt text. ``style`` is ``"chat"`` (the paper's prompt in
      the tokenizer's chat template), ``"plain"`` (the paper's prompt as raw text) or ``"compact"`` (a short prompt
      for the tiny CPU model).
    - ``score(response, example)`` returns a float reward and never raises on malformed model output.
    """

    name: str = "task"

    @abstractmethod
    def load(
        self, split: str = "train", n: int | None = None, seed: int = 0, offline_ok: bool = True
    ) -> list[dict[str, Any]]: ...

    @abstractmethod
    def prompt(self, example: dict[str, Any], tokenizer: Any = None, style: str = "plain") -> str: ...

    @abstractmethod
    def score(self, response: str, example: dict[str, Any]) -> float: ...

    def reward(self, responses: list[str], examples: list[dict[str, Any]]) -> list[float]:
        """Score a batch. Tasks with a learned reward model override this to score in batches."""
        if len(responses) != len(examples):
            raise ValueError(
                f"responses and examples must have the same length; got {len(responses)} and {len(examples)}"
            )
        return [float(self.score(r, e)) for r, e in zip(responses, examples)]

    @staticmethod
    def check_style(style: str) -> str:
        if style not in PROMPT_STYLES:
            raise ValueError(f"prompt style must be one of {', '.join(PROMPT_STYLES)}; got {style!r}")
        return style


def apply_chat_template(tokenizer: Any, user_text: str) -> str:
    """The user's message in the tokenizer's chat template with the generation prompt (falls back to plain text)."""
    template = getattr(tokenizer, "chat_template", None)
    if tokenizer is None or not template:
        return user_text
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )
