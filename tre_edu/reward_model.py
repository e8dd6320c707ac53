"""Scalar reward models for the HH task: scoring, Bradley-Terry training, a tiny CPU model for tests.

A reward model is any Hugging Face ``AutoModelForSequenceClassification`` with ``num_labels=1`` (a causal-LM
checkpoint loads as base + a fresh linear head). It reads the hidden state of the last non-pad token and
returns one number per sequence: r(x, y) in R.

Training (the paper: TRL ``RewardTrainer``, 3 epochs, lr 1e-5, warm-up 0.1, ``center_rewards_coefficient``
0.01) minimises, over pairs (x, y_chosen, y_rejected), the Bradley-Terry loss plus the centring term

    L = -mean log sigmoid(r(x, y_c) - r(x, y_r)) + c * mean((r(x, y_c) + r(x, y_r))^2)

(Eisenstein et al. 2023, eq. 2, as implemented in TRL: it pushes rewards towards mean zero). Two backends:
``"trl"`` (TRL's ``RewardTrainer``, needs ``pip install tre_edu[rm]``) and ``"torch"`` (a compact loop written
here with the same loss, AdamW, linear warm-up then linear decay, grad-norm clip 1.0). Both see identical
token ids: the text is built and tokenised by :meth:`RewardModel.encode` for training and for scoring.

Text of a (prompt, response) pair: the tokenizer's chat template when it has one (user prompt, assistant
response; multi-turn prompts as message lists), else ``prompt + " " + response + eos``. Sequences longer than
``max_length`` keep their LAST ``max_length`` tokens (``truncation_side="left"``): the score is read at the
last token, so the end of the response must survive truncation.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

Messages = list[dict[str, str]]
Prompt = str | Messages

BACKENDS = ("trl", "torch")
TRL_MISSING = "TRL is not installed; `pip install tre_edu[rm]` (or `pip install trl`), or use backend='torch'"


# ----------------------------------------------------------------------------------------------------
# Text formatting
# ----------------------------------------------------------------------------------------------------


def _as_messages(prompt: Prompt) -> Messages:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise ValueError("prompt must be a string or a list of {'role', 'content'} messages; got " + repr(prompt)[:80])


def _transcript(messages: Messages) -> str:
    """Messages as an hh-rlhf style transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." (for tokenizers
    without a chat template)."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)


def format_text(tokenizer: Any, prompt: Prompt, response: str) -> str:
    """The text the reward model reads for ``(prompt, response)``.

    ``prompt`` is a string (one user turn) or a list of ``{"role", "content"}`` messages (multi-turn).
    With a chat template: the conversation + the assistant response, rendered by the template.
    Without: ``prompt + " " + response`` (message lists are rendered as a Human/Assistant transcript first).
    """
    if not isinstance(response, str):
        raise ValueError(f"response must be a string; got {type(response).__name__}")
    if getattr(tokenizer, "chat_template", None):
        messages = _as_messages(prompt) + [{"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    text = prompt if isinstance(prompt, str) else _transcript(_as_messages(prompt)) + "\n\nAssistant:"
    if text and not text[-1].isspace() and response and not response[0].isspace():
        text += " "
    return text + response


# ----------------------------------------------------------------------------------------------------
# The reward model wrapper
# ----------------------------------------------------------------------------------------------------


def _text_config(model: Any) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


class RewardModel:
    """A scalar reward model: ``score(prompts, responses) -> list[float]``.

    Args:
        model: a sequence-classification model with ``num_labels == 1`` (output ``logits`` of shape (B, 1)).
        tokenizer: its tokenizer; needs a pad token (the EOS token is used if it has none).
        max_length: longest token sequence; longer ones keep their last ``max_length`` tokens.
        truncation_side: ``"left"`` (keep the end, default) or ``"right"`` (keep the start).
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int = 1024, truncation_side: str = "left"):
        if getattr(model.config, "num_labels", None) != 1:
            raise ValueError(
                f"model must have num_labels=1 (one scalar reward); got num_labels={model.config.num_labels}"
            )
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2; got {max_length!r}")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right'; got {truncation_side!r}")
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("tokenizer needs a pad_token or an eos_token")
            tokenizer.pad_token = tokenizer.eos_token
        # Sequence-classification heads find "the last token" through config.pad_token_id.
        _text_config(model).pad_token_id = tokenizer.pad_token_id
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation_side = truncation_side
        self.history: list[dict[str, float]] = []

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, max_length: int = 1024, **model_kwargs: Any) -> RewardModel:
        """Load a reward model (or a causal LM + a new, untrained scalar head) from the hub / a path."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1, **model_kwargs)
        return cls(model, tokenizer, max_length=max_length)

    def save_pretrained(self, path: str) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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

    def _collate(self, seqs: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to (B, L) ``input_ids`` and a (B, L) ``attention_mask``."""
        length = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return ids.to(self.device), mask.to(self.device)

    def forward_ids(self, seqs: Sequence[list[int]]) -> torch.Tensor:
        """Rewards (B,) float32 for token sequences (with grad if enabled)."""
        ids, mask = self._collate(seqs)
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        return out.logits[:, 0].float()

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], responses: Sequence[str], batch_size: int = 16) -> list[float]:
        """One scalar reward per (prompt, response) pair, computed ``batch_size`` pairs at a time."""
        if len(prompts) != len(responses):
            raise ValueError(f"prompts and responses must have the same length; got {len(prompts)}, {len(responses)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        was_training = self.model.training
        self.model.eval()
        try:
            seqs = [self.encode(p, r) for p, r in zip(prompts, responses)]
            # Sort by length so each batch pads little; restore the order at the end.
            order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
            out = [0.0] * len(seqs)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                rewards = self.forward_ids([seqs[i] for i in idx]).cpu().tolist()
                for i, r in zip(idx, rewards):
                    out[i] = float(r)
        finally:
            self.model.train(was_training)
        if not all(math.isfinite(x) for x in out):
            raise FloatingPointError("reward model produced a non-finite reward")
        return out

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str], batch_size: int = 16) -> list[float]:
        return self.score(prompts, responses, batch_size=batch_size)


def pair_accuracy(rm: RewardModel, pairs: Sequence[dict[str, Any]], batch_size: int = 16) -> float:
    """Fraction of pairs with r(prompt, chosen) > r(prompt, rejected)."""
    pairs = _check_pairs(pairs)
    prompts = [p["prompt"] for p in pairs]
    chosen = rm.score(prompts, [p["chosen"] for p in pairs], batch_size)
    rejected = rm.score(prompts, [p["rejected"] for p in pairs], batch_size)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def _check_pairs(pairs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs must be a non-empty list of {'prompt', 'chosen', 'rejected'} dicts")
    for i, p in enumerate(pairs):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in p]
        if missing:
            raise ValueError(f"pairs[{i}] is missing field(s) {missing}; need 'prompt', 'chosen', 'rejected'")
    return pairs


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, center_rewards_coefficient: float | None = 0.0
) -> torch.Tensor:
    """``-mean log sigmoid(r_c - r_r) + c * mean((r_c + r_r)^2)`` for (B,) reward tensors."""
    loss = -F.logsigmoid(r_chosen - r_rejected).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def _train_torch(
    rm: RewardModel,
    chosen: list[list[int]],
    rejected: list[list[int]],
    *,
    epochs: int,
    lr: float,
    warmup_ratio: float,
    center_rewards_coefficient: float | None,
    batch_size: int,
    weight_decay: float,
    max_grad_norm: float,
    seed: int,
    progress: bool,
) -> list[dict[str, float]]:
    from tqdm.auto import tqdm

    n = len(chosen)
    steps_per_epoch = math.ceil(n / batch_size)
    total = steps_per_epoch * epochs
    warmup = math.ceil(warmup_ratio * total)
    model = rm.model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)

    # Linear warm-up to lr over `warmup` steps, then linear decay to 0 (TRL / transformers default schedule).
    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    rng = random.Random(seed)
    history: list[dict[str, float]] = []
    model.train()
    step = 0
    bar = tqdm(total=total, desc="reward model (torch)", disable=not progress)
    for epoch in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            # chosen and rejected in one forward: first half chosen, second half rejected (as TRL does)
            rewards = rm.forward_ids([chosen[i] for i in idx] + [rejected[i] for i in idx])
            r_c, r_r = rewards[: len(idx)], rewards[len(idx) :]
            loss = bradley_terry_loss(r_c, r_r, center_rewards_coefficient)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"reward-model loss is not finite at step {step}; lower lr ({lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            acc = (r_c > r_r).float().mean().item()
            history.append(
                {"step": step, "epoch": epoch + (start + len(idx)) / n, "loss": loss.item(), "accuracy": acc}
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
    bar.close()
    model.eval()
    return history


def _train_trl(
    rm: RewardModel,
    chosen: list[list[int]],
    rejected: list[list[int]],
    *,
    epochs: int,
    lr: float,
    warmup_ratio: float,
    center_rewards_coefficient: float | None,
    batch_size: int,
    weight_decay: float,
    max_grad_norm: float,
    seed: int,
    progress: bool,
    output_dir: str,
    bf16: bool | None,
    gradient_checkpointing: bool,
) -> list[dict[str, float]]:
    try:
        from trl import RewardConfig, RewardTrainer
    except ImportError as err:
        raise ImportError(TRL_MISSING) from err
    from datasets import Dataset

    names = {f.name for f in dataclasses.fields(RewardConfig)}
    kwargs: dict[str, Any] = {
        "output_dir": output_dir,
        "num_train_epochs": epochs,
        "learning_rate": lr,
        "center_rewards_coefficient": center_rewards_coefficient,
        "per_device_train_batch_size": batch_size,
        "weight_decay": weight_decay,
        "max_grad_norm": max_grad_norm,
        "seed": seed,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": not progress,
        "gradient_checkpointing": gradient_checkpointing,
        # sequences are already truncated by RewardModel.encode (TRL would drop long ones, not truncate)
        "max_length": None,
        "bf16": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) if bf16 is None else bf16,
        "remove_unused_columns": False,
    }
    # transformers >= 5 folded warmup_ratio into warmup_steps (a float in [0, 1) is a ratio).
    kwargs["warmup_ratio" if "warmup_ratio" in names else "warmup_steps"] = warmup_ratio
    if "activation_checkpointing" in names:  # transformers >= 5 renamed gradient_checkpointing
        kwargs["activation_checkpointing"] = gradient_checkpointing
    if "use_cpu" in names and not torch.cuda.is_available():
        kwargs["use_cpu"] = True
    args = RewardConfig(**{k: v for k, v in kwargs.items() if k in names})
    data = Dataset.from_dict({"chosen_ids": chosen, "rejected_ids": rejected})
    trainer = RewardTrainer(model=rm.model, args=args, train_dataset=data, processing_class=rm.tokenizer)
    if not progress:  # with tqdm disabled, transformers prints every log dict instead: keep quiet
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    trainer.train()
    rm.model = trainer.model
    rm.model.eval()
    history = []
    for rec in trainer.state.log_history:
        if "loss" in rec:
            history.append(
                {
                    "step": rec.get("step", len(history) + 1),
                    "epoch": rec.get("epoch", float("nan")),
                    "loss": float(rec["loss"]),
                    "accuracy": float(rec.get("accuracy", float("nan"))),
                }
            )
    return history


def train_reward_model(
    pairs: Sequence[dict[str, Any]],
    model: Any,
    tokenizer: Any = None,
    *,
    epochs: int = 3,
    lr: float = 1e-5,
    warmup_ratio: float = 0.1,
    center_rewards_coefficient: float | None = 0.01,
    batch_size: int = 8,
    max_length: int = 1024,
    output_dir: str | None = None,
    backend: str = "trl",
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    bf16: bool | None = None,
    gradient_checkpointing: bool = False,
) -> RewardModel:
    """Train a scalar reward model on preference pairs; defaults are the paper's (TRL RewardTrainer settings).

    Args:
        pairs: dicts with ``"prompt"`` (str or message list), ``"chosen"`` and ``"rejected"`` (str); HH
            examples from
            :mod:`tre_edu.tasks.hh` have exactly these fields.
        model: a ``num_labels=1`` sequence-classification model, a :class:`RewardModel`, or a hub id / local
            path.
        tokenizer: its tokenizer (ignored when ``model`` is a :class:`RewardModel` or a path).
        epochs, lr, warmup_ratio, center_rewards_coefficient: paper: 3, 1e-5, 0.1, 0.01.
        batch_size: pairs per optimiser step (each step scores 2 * batch_size sequences).
        max_length: token budget per sequence (longer ones keep their last tokens).
        output_dir: where to save the trained model and tokenizer (``None``: not saved).
        backend: ``"trl"`` (TRL ``RewardTrainer``; ``pip install tre_edu[rm]``) or ``"torch"`` (same loss,
            plain loop).
        bf16: TRL only; ``None`` = bf16 on a GPU that supports it, fp32 elsewhere.
        gradient_checkpointing: TRL only (TRL's own default is True; off here since it only slows small
            models).

    Returns:
        the trained :class:`RewardModel`; ``.history`` holds ``{"step", "epoch", "loss", "accuracy"}`` per
        step (accuracy = fraction of the batch with r_chosen > r_rejected).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    if not (isinstance(lr, int | float) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number; got {lr!r}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1); got {warmup_ratio!r}")
    if center_rewards_coefficient is not None and center_rewards_coefficient < 0:
        raise ValueError(f"center_rewards_coefficient must be >= 0 or None; got {center_rewards_coefficient!r}")
    if backend == "trl":
        try:
            import trl  # noqa: F401
        except ImportError as err:
            raise ImportError(TRL_MISSING) from err
    pairs = _check_pairs(pairs)
    if isinstance(model, RewardModel):
        rm = model
        rm.max_length = max_length
    elif isinstance(model, str):
        rm = RewardModel.from_pretrained(model, max_length=max_length)
    else:
        if tokenizer is None:
            raise ValueError("tokenizer is required when model is a model object")
        rm = RewardModel(model, tokenizer, max_length=max_length)
    chosen = [rm.encode(p["prompt"], p["chosen"]) for p in pairs]
    rejected = [rm.encode(p["prompt"], p["rejected"]) for p in pairs]
    common = dict(
        epochs=epochs,
        lr=lr,
        warmup_ratio=warmup_ratio,
        center_rewards_coefficient=center_rewards_coefficient,
        batch_size=batch_size,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        seed=seed,
        progress=progress,
    )
    if backend == "torch":
        rm.history = _train_torch(rm, chosen, rejected, **common)
    else:
        with tempfile.TemporaryDirectory(prefix="tre_edu_rm_") as tmp:
            rm.history = _train_trl(
                rm,
                chosen,
                rejected,
                **common,
                output_dir=output_dir or tmp,
                bf16=bf16,
                gradient_checkpointing=gradient_checkpointing,
            )
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        rm.save_pretrained(output_dir)
    return rm


# ----------------------------------------------------------------------------------------------------
# A tiny model for CPU work and tests
# ----------------------------------------------------------------------------------------------------


def build_tiny_tokenizer(texts: Sequence[str], *, max_vocab: int = 5000) -> Any:
    """A lower-cased word-level tokenizer over the words of ``texts`` (+ <pad> <unk> <bos> <eos>), no hub."""
    from collections import Counter

    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(w.lower() for w, _ in pre.pre_tokenize_str(t))
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    words = [w for w, _ in counts.most_common(max_vocab) if w not in specials]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def build_tiny_reward_model(
    texts: Sequence[str] | None = None,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    max_length: int = 256,
    seed: int = 0,
) -> RewardModel:
    """A randomly initialised Llama-style reward model (tens of thousands of parameters) + word-level
    tokenizer, all built locally.

    ``texts``: corpus for the vocabulary (default: every prompt and response of the bundled HH and
    UltraFeedback samples).
    """
    from transformers import LlamaConfig, LlamaForSequenceClassification

    if texts is None:
        from tre_edu.tasks import hh

        texts = []
        for source in hh.SOURCES:
            for ex in hh.bundled_examples(source):
                texts += [hh.prompt_as_text(ex["prompt"]), ex["chosen"], ex["rejected"]]
    tokenizer = build_tiny_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_length,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
    model.eval()
    return RewardModel(model, tokenizer, max_length=max_length)


# ----------------------------------------------------------------------------------------------------
# Entry point for the CLI
# ----------------------------------------------------------------------------------------------------


def train_rm_main(args: Any = None, **overrides: Any) -> dict[str, Any]:
    """Train a reward model on HH preference pairs and report pair accuracy; for ``tre-edu train-rm``.

    Options (``args`` may be a dict or an ``argparse.Namespace``; keyword ``overrides`` win):
        model: hub id / local path of a (causal or classification) model, or ``"tiny"`` (default) for
            :func:`build_tiny_reward_model`.
        source: ``"ultrafeedback"`` (the paper's data, default) or ``"hh-rlhf"``.
        n_train, n_test: number of pairs (``None``: the whole split).
        output_dir: where to save the model (``None``: not saved).
        epochs, lr, warmup_ratio, center_rewards_coefficient, batch_size, max_length, backend, seed,
            offline_ok, progress.

    Returns:
        ``{"source", "dataset", "n_train", "n_test", "train_accuracy", "test_accuracy", "final_loss",
        "backend", "output_dir"}``.
    """
    opts: dict[str, Any] = {
        "model": "tiny",
        "source": "ultrafeedback",
        "n_train": None,
        "n_test": None,
        "output_dir": None,
        "epochs": 3,
        "lr": 1e-5,
        "warmup_ratio": 0.1,
        "center_rewards_coefficient": 0.01,
        "batch_size": 8,
        "max_length": 1024,
        "backend": "trl",
        "seed": 0,
        "offline_ok": True,
        "progress": True,
    }
    given = vars(args) if args is not None and not isinstance(args, dict) else dict(args or {})
    given.update(overrides)
    unknown = sorted(set(given) - set(opts))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; allowed: {', '.join(opts)}")
    opts.update({k: v for k, v in given.items() if v is not None or k in ("n_train", "n_test", "output_dir")})

    from tre_edu.tasks import hh

    task = hh.HHTask(source=opts["source"])
    train = task.load("train", n=opts["n_train"], seed=opts["seed"], offline_ok=opts["offline_ok"])
    test = task.load("test", n=opts["n_test"], seed=opts["seed"], offline_ok=opts["offline_ok"])
    if opts["model"] == "tiny":
        texts = [hh.prompt_as_text(e["prompt"]) for e in train + test]
        texts += [e[k] for e in train + test for k in ("chosen", "rejected")]
        model: Any = build_tiny_reward_model(texts, max_length=min(opts["max_length"], 1024), seed=opts["seed"])
    else:
        model = opts["model"]
    rm = train_reward_model(
        train,
        model,
        epochs=opts["epochs"],
        lr=opts["lr"],
        warmup_ratio=opts["warmup_ratio"],
        center_rewards_coefficient=opts["center_rewards_coefficient"],
        batch_size=opts["batch_size"],
        max_length=opts["max_length"],
        output_dir=opts["output_dir"],
        backend=opts["backend"],
        seed=opts["seed"],
        progress=opts["progress"],
    )
    return {
        "source": train[0]["source"],
        "dataset": train[0]["dataset"],
        "n_train": len(train),
        "n_test": len(test),
        "train_accuracy": pair_accuracy(rm, train),
        "test_accuracy": pair_accuracy(rm, test),
        "final_loss": rm.history[-1]["loss"] if rm.history else float("nan"),
        "backend": opts["backend"],
        "output_dir": opts["output_dir"],
    }


__all__ = [
    "BACKENDS",
    "RewardModel",
    "bradley_terry_loss",
    "build_tiny_reward_model",
    "build_tiny_tokenizer",
    "format_text",
    "pair_accuracy",
    "train_reward_model",
    "train_rm_main",
]
