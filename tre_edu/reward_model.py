"""Scalar reward models for the HH task: scoring, training with TRL's ``RewardTrainer``, a tiny CPU model.

A reward model is any Hugging Face ``AutoModelForSequenceClassification`` with ``num_labels=1`` (a causal-LM
checkpoint loads as base + a fresh linear head): r(x, y) is read at the last non-pad token.

Training (the paper: TRL ``RewardTrainer``, 3 epochs, lr 1e-5, warm-up 0.1, ``center_rewards_coefficient`` 0.01)
minimises, over pairs (x, y_c, y_r), the Bradley-Terry loss plus the centring term (Eisenstein et al. 2023, eq. 2)

    L = -mean log sigmoid(r(x, y_c) - r(x, y_r)) + c * mean((r(x, y_c) + r(x, y_r))^2).

Training and scoring see the same ids (:meth:`RewardModel.encode`); sequences longer than ``max_length`` keep their
LAST tokens by default: the score is read at the last token, so the end of the response must survive.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from typing import Any

import datasets
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from torch.nn.utils.rnn import pad_sequence
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

Prompt = str | list[dict[str, str]]
HOW_TO_TRAIN = "make it with `tre-edu train-rm --source ultrafeedback --model MODEL --output-dir {path}`"


def valid_text(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (lone surrogates such as ``"\\ud800"``) replaced by ``?``."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _as_messages(prompt: Prompt) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise ValueError("prompt must be a string or a list of {'role', 'content'} messages; got " + repr(prompt)[:80])


def format_text(tokenizer: Any, prompt: Prompt, response: str) -> str:
    """The text the reward model reads: with a chat template, the conversation + the assistant response; without,
    ``prompt + " " + response`` (a message list first becomes a "\\n\\nHuman: ...\\n\\nAssistant:" transcript)."""
    if not isinstance(response, str):
        raise ValueError(f"response must be a string; got {type(response).__name__}")
    messages = _as_messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
        return valid_text(text)
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    turns = "".join(f"\n\n{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)
    text = prompt if isinstance(prompt, str) else turns + "\n\nAssistant:"
    if text and not text[-1].isspace() and response and not response[0].isspace():
        text += " "
    return valid_text(text + response)


class RewardModel:
    """A scalar reward model ``score(prompts, responses) -> list[float]`` over a sequence-classification ``model``
    with ``num_labels == 1`` and its ``tokenizer`` (pad token: EOS if it has none). Sequences longer than
    ``max_length`` keep their end (``truncation_side="left"``) or their start (``"right"``)."""

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int = 1024, truncation_side: str = "left"):
        if getattr(model.config, "num_labels", None) != 1:
            raise ValueError(f"model must have num_labels=1 (one scalar reward); got {model.config.num_labels}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2; got {max_length!r}")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right'; got {truncation_side!r}")
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("tokenizer needs a pad_token or an eos_token")
            tokenizer.pad_token = tokenizer.eos_token
        # Sequence-classification heads find "the last token" through config.pad_token_id.
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        cfg.pad_token_id = tokenizer.pad_token_id
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.truncation_side = max_length, truncation_side
        self.history: list[dict[str, float]] = []

    @classmethod
    def from_pretrained(cls, path: str, *, max_length: int = 1024, **model_kwargs: Any) -> RewardModel:
        """A reward model (or a causal LM + a new, untrained head) from a directory or a hub id; FileNotFoundError
        saying how to make it when there is none."""
        looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith((".", "runs/"))
        if not os.path.isdir(path) and not looks_like_hub_id:
            raise FileNotFoundError(f"reward model not found: {path}; {HOW_TO_TRAIN.format(path=path)}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **model_kwargs)
        except OSError as err:  # not on the hub, or offline
            raise FileNotFoundError(
                f"reward model not found: {path} (no such directory; as a hub id: {str(err).splitlines()[0]}); "
                + HOW_TO_TRAIN.format(path=path)
            ) from None
        return cls(model, tokenizer, max_length=max_length)

    def save_pretrained(self, path: str) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def encode(self, prompt: Prompt, response: str) -> list[int]:
        """Token ids of the (prompt, response) text, truncated to ``max_length``."""
        text = format_text(self.tokenizer, prompt, response)
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        # A chat template writes its own special tokens; plain text gets the tokenizer's (e.g. BOS) plus EOS.
        ids = list(self.tokenizer(text, add_special_tokens=not templated)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if not templated and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        if len(ids) > self.max_length:
            ids = ids[-self.max_length :] if self.truncation_side == "left" else ids[: self.max_length]
        return ids

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], responses: Sequence[str], batch_size: int = 16) -> list[float]:
        """One scalar reward per (prompt, response) pair, ``batch_size`` pairs (right-padded) per forward pass."""
        if len(prompts) != len(responses):
            raise ValueError(f"prompts and responses must have the same length; got {len(prompts)}, {len(responses)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        seqs = [self.encode(p, r) for p, r in zip(prompts, responses)]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths pad little
        out = [0.0] * len(seqs)
        was_training, device = self.model.training, next(self.model.parameters()).device
        self.model.eval()
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                rows = [torch.tensor(seqs[i], dtype=torch.long) for i in idx]
                ids = pad_sequence(rows, batch_first=True, padding_value=self.tokenizer.pad_token_id)
                mask = (torch.arange(ids.shape[1]) < torch.tensor([len(r) for r in rows])[:, None]).long()
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                for i, r in zip(idx, logits[:, 0].float().cpu().tolist()):
                    out[i] = r
        finally:
            self.model.train(was_training)
        if not all(math.isfinite(x) for x in out):
            raise FloatingPointError("reward model produced a non-finite reward")
        return out

    __call__ = score


def _check_pairs(pairs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs must be a non-empty list of {'prompt', 'chosen', 'rejected'} dicts")
    for i, p in enumerate(pairs):
        if missing := [k for k in ("prompt", "chosen", "rejected") if k not in p]:
            raise ValueError(f"pairs[{i}] is missing field(s) {missing}; need 'prompt', 'chosen', 'rejected'")
    return pairs


def pair_accuracy(rm: RewardModel, pairs: Sequence[dict[str, Any]], batch_size: int = 16) -> float:
    """Fraction of pairs with r(prompt, chosen) > r(prompt, rejected)."""
    pairs = _check_pairs(pairs)
    prompts = [p["prompt"] for p in pairs]
    chosen = rm.score(prompts, [p["chosen"] for p in pairs], batch_size)
    rejected = rm.score(prompts, [p["rejected"] for p in pairs], batch_size)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)


def build_tiny_reward_model(
    texts: Sequence[str], *, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2, max_length: int = 256,
    seed: int = 0, max_vocab: int = 5000,
) -> RewardModel:  # fmt: skip
    """A randomly initialised Llama-style reward model (tens of thousands of parameters) with a lower-cased
    word-level tokenizer over the words of ``texts`` (+ <pad> <unk> <bos> <eos>), all built locally."""
    pre = pre_tokenizers.Whitespace()
    counts = Counter(w.lower() for t in texts for w, _ in pre.pre_tokenize_str(t))
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = specials + [w for w, _ in counts.most_common(max_vocab) if w not in specials]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.normalizer, core.pre_tokenizer = normalizers.Lowercase(), pre
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_length, num_labels=1, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config).eval()
    return RewardModel(model, tokenizer, max_length=max_length)


def reward_trainer(rm: RewardModel, pairs: Sequence[dict[str, Any]], cfg: Any, output_dir: str) -> Any:
    """TRL's ``RewardTrainer`` over ``pairs`` (tokenised by :meth:`RewardModel.encode`) with ``cfg``'s settings (a
    :class:`~tre_edu.config.RewardModelConfig`, or any object with its fields)."""
    try:
        from trl import RewardConfig, RewardTrainer  # optional heavy dependency (pip install tre_edu[rm])
    except ImportError as err:
        raise ImportError("TRL is not installed: `pip install tre_edu[rm]` (or `pip install trl`)") from err
    ids = {f"{side}_ids": [rm.encode(p["prompt"], p[side]) for p in pairs] for side in ("chosen", "rejected")}
    data = datasets.Dataset.from_dict(ids)
    names = {f.name for f in dataclasses.fields(RewardConfig)}  # transformers < 5 still has warmup_ratio
    args = RewardConfig(
        **{"warmup_ratio" if "warmup_ratio" in names else "warmup_steps": cfg.warmup_ratio},
        # TRL's default (True) only slows small models; transformers >= 5 renamed it
        **{"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False},
        output_dir=output_dir,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        per_device_train_batch_size=cfg.batch_size,
        seed=cfg.seed,
        max_length=None,  # already truncated by encode (TRL would drop long sequences, not truncate them)
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    return RewardTrainer(model=rm.model, args=args, train_dataset=data, processing_class=rm.tokenizer)


def fit(pairs: Sequence[dict[str, Any]], cfg: Any, model: RewardModel | None = None) -> RewardModel:
    """Train ``model`` (default: ``cfg.model``; ``"tiny"``: :func:`build_tiny_reward_model` over the pairs' words) on
    ``pairs`` ``{prompt, chosen, rejected}`` with TRL's ``RewardTrainer``; saved to ``cfg.output_dir`` when set.
    ``.history``: ``{"step", "epoch", "loss", "accuracy"}`` per step."""
    cfg.validate()  # a RewardModelConfig: ValueError naming reward_model.<field>
    pairs = _check_pairs(pairs)
    if model is None and cfg.model == "tiny":
        texts = [format_text(None, p["prompt"], p["chosen"]) + " " + p["rejected"] for p in pairs]
        model = build_tiny_reward_model(texts, max_length=min(cfg.max_length, 1024), seed=cfg.seed)
    elif model is None:
        model = RewardModel.from_pretrained(cfg.model, max_length=cfg.max_length)
    model.max_length = cfg.max_length
    with tempfile.TemporaryDirectory(prefix="tre_edu_rm_") as tmp:
        trainer = reward_trainer(model, pairs, cfg, cfg.output_dir or tmp)
        trainer.train()
    model.model = trainer.model.eval()
    model.history = [
        {"step": r["step"], "epoch": r["epoch"], "loss": float(r["loss"]), "accuracy": float(r.get("accuracy", "nan"))}
        for r in trainer.state.log_history
        if "loss" in r
    ]
    if cfg.output_dir:
        model.save_pretrained(cfg.output_dir)
    return model


__all__ = ["RewardModel", "build_tiny_reward_model", "fit", "format_text", "pair_accuracy", "reward_trainer"]
