"""Actor + critic around any Hugging Face causal LM.

The sequences PPO trains on are ``[left-padded prompt | response (right-padded)]`` of length ``L = P + R``::

    position      0 .. P-1 (prompt, pads on the left)    P .. P+R-1 (response, pads after EOS)
    token t of the response sits at position P + t and is predicted by the logits at position P + t - 1.

So the actor's LM head is only needed on the last ``R + 1`` positions (``logits_to_keep=R+1``; the last one
predicts beyond the sequence and is dropped). The value of the state before token ``t``, ``V(s_t)``, comes
from the same hidden state as its logits (position ``P + t - 1``), which is what GAE expects: ``values[:, t]
= V(s_t)``.

Position ids always come from the attention mask (:func:`position_ids_from_mask`), in sampling and in
training, so left padding never changes a log-prob: the old log-probs of the rollout and the new ones of the
update agree to float32 precision when the weights are the same.

Two critic set-ups:

- ``ActorCritic(actor)``: a linear value head on the actor's last hidden state (shared trunk; cheap).
- ``ActorCritic(actor, critic=copy_of_actor)``: the paper's set-up; a separate model initialised from the same
  checkpoint. Only its trunk (``critic.base_model``) is kept, plus a ``Linear(hidden, 1)`` value head.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tre_edu.entropy import token_logprobs

__all__ = ["ActorCritic", "PolicyOutput", "position_ids_from_mask", "lm_forward_kwargs", "output_cache"]

_CONFIG_NAME = "actor_critic.json"
_VALUE_HEAD_NAME = "value_head.pt"
_CRITIC_DIR = "critic"


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids ``(B, L)`` long from an attention mask ``(B, L)`` (bool / int / float, 1 = real token).

    ``pos = cumsum(mask) - 1``, clamped at 0: the first real token of every row gets position 0 whatever its
    left padding; pads before it get 0 and pads after the end repeat the last position (both are masked out
    anyway).
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must have shape (B, L); got {tuple(attention_mask.shape)}")
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ---- version-robust keyword names for a causal LM's forward ------------------------------------------------
# transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name is deprecated, removed in 5.40) and
# the output attribute likewise; transformers < 4.50 called ``logits_to_keep`` ``num_logits_to_keep``.
def _forward_params(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return set()


def lm_forward_kwargs(model: nn.Module, *, logits_to_keep: int | None = None, cache: Any = None) -> dict[str, Any]:
    """Keyword arguments for ``model(...)`` that ask for the last ``logits_to_keep`` logits and pass a KV
    cache, named as this transformers version / model class expects. ``cache=None`` passes no cache
    argument."""
    params = _forward_params(model)
    kw: dict[str, Any] = {}
    if logits_to_keep is not None:
        if "logits_to_keep" in params:
            kw["logits_to_keep"] = logits_to_keep
        elif "num_logits_to_keep" in params:
            kw["num_logits_to_keep"] = logits_to_keep
    if cache is not None:
        kw["cache" if "cache" in params else "past_key_values"] = cache
    return kw


def output_cache(output: Any) -> Any:
    """The KV cache of a model output (``output.cache`` in transformers 5.x, ``past_key_values`` before)."""
    keys = output.keys() if hasattr(output, "keys") else ()
    if "cache" in keys:
        return output["cache"]
    return output.get("past_key_values") if hasattr(output, "get") else None


def _hidden_size(model: nn.Module) -> int:
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"cannot find the hidden size of {type(model).__name__}'s config (hidden_size / n_embd)")


def _new_value_head(hidden: int) -> nn.Linear:
    # Zero init: V = 0 for every state at the start, so the first value loss is just the squared returns and
    # the critic never starts from a large random offset. The weight still gets a gradient (dV/dw = h) from
    # step one.
    head = nn.Linear(hidden, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def _check_inputs(input_ids: Tensor, attention_mask: Tensor, response_len: int) -> None:
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both have shape (B, L); got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    if not isinstance(response_len, int) or not 1 <= response_len < input_ids.shape[1]:
        raise ValueError(
            f"response_len must be an int in [1, L-1] = [1, {input_ids.shape[1] - 1}] "
            f"(at least one prompt token); got {response_len!r}"
        )


@dataclass
class PolicyOutput:
    """What :meth:`ActorCritic.forward` returns; ``R`` = response length.

    logits: ``(B, R, V)`` logits that predict the last ``R`` tokens (dtype of the model).
    logprobs: ``(B, R)`` float32 ``log softmax(logits)[taken token]`` (differentiable).
    values: ``(B, R)`` float32 ``V(s_t)``, the value of the state before response token ``t``; ``None``
        when not asked for (or without a critic).
    """

    logits: Tensor
    logprobs: Tensor
    values: Tensor | None = None


class ActorCritic(nn.Module):
    """PPO's actor (a causal LM) and critic (a value head on the actor, or a separate model).

    Args:
        actor: any Hugging Face causal LM (``PreTrainedModel`` with an LM head).
        critic: ``None`` for a value head on the actor's last hidden state, or a separate Hugging Face
            model (a causal LM initialised from the same checkpoint, as in the paper, or a bare trunk); only
            its trunk (``critic.base_model``) is kept and a ``Linear(hidden, 1)`` head is put on top.
        value_head: with ``critic=None``, whether to build the shared value head (``False``: actor only,
            e.g. for GRPO-style advantages; ``values`` are then ``None``).
    """

    def __init__(self, actor: nn.Module, critic: nn.Module | None = None, value_head: bool = True):
        super().__init__()
        self.actor = actor
        self.critic: nn.Module | None = None
        self.value_head: nn.Linear | None = None
        if critic is not None:
            # A causal LM's trunk: drop its LM head (never used by a critic; saves V * hidden parameters).
            self.critic = getattr(critic, "base_model", critic)
            self.value_head = _new_value_head(_hidden_size(self.critic))
        elif value_head:
            self.value_head = _new_value_head(_hidden_size(actor))

    # ---- structure -----------------------------------------------------------------------------------------
    @property
    def separate_critic(self) -> bool:
        return self.critic is not None

    @property
    def has_values(self) -> bool:
        return self.value_head is not None

    def actor_parameters(self) -> list[nn.Parameter]:
        """The actor's parameters (the LM being trained)."""
        return list(self.actor.parameters())

    def critic_parameters(self) -> list[nn.Parameter]:
        """The critic's parameters: the value head, plus the separate critic trunk if there is one."""
        params = list(self.critic.parameters()) if self.critic is not None else []
        if self.value_head is not None:
            params += list(self.value_head.parameters())
        return params

    def param_groups(self, actor_lr: float, critic_lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups with separate learning rates (paper: actor 1e-6, critic 1e-5).

        A group with no parameters (no critic) is left out. Each group carries a ``"name"`` ("actor" /
        "critic").
        """
        for name, lr in (("actor_lr", actor_lr), ("critic_lr", critic_lr)):
            if not lr >= 0:
                raise ValueError(f"{name} must be >= 0; got {lr!r}")
        groups = [{"params": self.actor_parameters(), "lr": actor_lr, "weight_decay": weight_decay, "name": "actor"}]
        critic = self.critic_parameters()
        if critic:
            groups.append({"params": critic, "lr": critic_lr, "weight_decay": weight_decay, "name": "critic"})
        return groups

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass of the actor (and separate critic) to save memory.

        transformers >= 5 calls it ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` is
        deprecated there); both are handled. Sampling is unaffected: :func:`tre_edu.rollout.generate` runs in
        eval mode and asks for the KV cache explicitly.
        """
        for model in (self.actor, self.critic):
            if model is None:
                continue
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            elif hasattr(model, "gradient_checkpointing_enable"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def disable_gradient_checkpointing(self) -> None:
        for model in (self.actor, self.critic):
            if model is None:
                continue
            for name in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
                if hasattr(model, name):
                    getattr(model, name)()
                    break

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether activation (gradient) checkpointing is on for the actor."""
        return any(getattr(m, "gradient_checkpointing", False) for m in self.actor.modules())

    # ---- forward -------------------------------------------------------------------------------------------
    def _values_from_hidden(self, hidden: Tensor) -> Tensor:
        """``(B, R+1, H)`` hidden states -> ``(B, R)`` float32 values (last position dropped)."""
        assert self.value_head is not None
        h = hidden[:, :-1]
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def _critic_values(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, R: int) -> Tensor:
        assert self.critic is not None
        out = self.critic(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return self._values_from_hidden(out.last_hidden_state[:, -(R + 1) :])

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, response_len: int, *, compute_values: bool = True
    ) -> PolicyOutput:
        """Logits, log-probs and values of the last ``response_len`` tokens.

        Args:
            input_ids: ``(B, L)`` long, ``[left-padded prompt | right-padded response]``.
            attention_mask: ``(B, L)`` 1 for real tokens (prompt and valid response tokens), 0 for pads.
            response_len: ``R``, the number of response columns at the end of ``input_ids`` (``1 <= R < L``).
            compute_values: also compute ``values`` (needs a value head).

        Returns:
            :class:`PolicyOutput` with logits ``(B, R, V)``, logprobs ``(B, R)`` and values ``(B, R)`` or
            ``None``. Positions where the response is padding hold finite junk; mask them with the response
            mask.
        """
        _check_inputs(input_ids, attention_mask, response_len)
        R = response_len
        position_ids = position_ids_from_mask(attention_mask)
        shared_values = compute_values and self.value_head is not None and self.critic is None
        out = self.actor(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_hidden_states=shared_values,
            **lm_forward_kwargs(self.actor, logits_to_keep=R + 1),
        )
        # logits at positions P-1 .. P+R-1; the last one predicts past the end of the sequence -> dropped.
        logits = out.logits[:, -(R + 1) : -1]
        # log pi(a_t | s_t) = z_t[a_t] - logsumexp(z_t), a_t = input_ids[:, P + t]
        logprobs = token_logprobs(logits, input_ids[:, -R:])
        values = None
        if compute_values and self.value_head is not None:
            if self.critic is None:
                values = self._values_from_hidden(out.hidden_states[-1][:, -(R + 1) :])
            else:
                values = self._critic_values(input_ids, attention_mask, position_ids, R)
        return PolicyOutput(logits=logits, logprobs=logprobs, values=values)

    def values_only(self, input_ids: Tensor, attention_mask: Tensor, response_len: int) -> Tensor:
        """``(B, R)`` float32 values ``V(s_t)`` without running the actor's LM head (inputs as in
        :meth:`forward`)."""
        if self.value_head is None:
            raise ValueError("this ActorCritic has no value head (value_head=False and no critic)")
        _check_inputs(input_ids, attention_mask, response_len)
        R = response_len
        position_ids = position_ids_from_mask(attention_mask)
        if self.critic is not None:
            return self._critic_values(input_ids, attention_mask, position_ids, R)
        trunk = getattr(self.actor, "base_model", self.actor)
        out = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return self._values_from_hidden(out.last_hidden_state[:, -(R + 1) :])

    # ---- save / load ---------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, tokenizer: Any = None) -> Path:
        """Write the actor to ``save_directory`` (a plain Hugging Face checkpoint, loadable on its own with
        ``AutoModelForCausalLM``), the separate critic trunk to ``save_directory/critic`` and the value head
        to ``value_head.pt``, plus ``actor_critic.json`` describing the set-up. Returns the directory."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.actor.save_pretrained(path)
        if self.critic is not None:
            self.critic.save_pretrained(path / _CRITIC_DIR)
        if self.value_head is not None:
            torch.save(
                {k: v.detach().cpu() for k, v in self.value_head.state_dict().items()},
                path / _VALUE_HEAD_NAME,
            )
        kind = "separate" if self.critic is not None else ("value_head" if self.value_head is not None else "none")
        (path / _CONFIG_NAME).write_text(json.dumps({"critic": kind, "format": 1}, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike, torch_dtype: torch.dtype | str | None = None, **kw) -> ActorCritic:
        """Load what :meth:`save_pretrained` wrote (actor, critic trunk, value head)."""
        path = Path(directory)
        meta_file = path / _CONFIG_NAME
        if not meta_file.is_file():
            raise FileNotFoundError(f"{directory!s} has no {_CONFIG_NAME}; it was not written by save_pretrained")
        kind = json.loads(meta_file.read_text())["critic"]
        if kind not in ("separate", "value_head", "none"):
            raise ValueError(f"{meta_file}: critic must be 'separate', 'value_head' or 'none'; got {kind!r}")
        from transformers import AutoModel, AutoModelForCausalLM

        actor = AutoModelForCausalLM.from_pretrained(path, **_dtype_kwargs(torch_dtype), **kw)
        critic = None
        if kind == "separate":
            critic = AutoModel.from_pretrained(path / _CRITIC_DIR, **_dtype_kwargs(torch_dtype), **kw)
        policy = cls(actor, critic=critic, value_head=kind != "none")
        if policy.value_head is not None:
            state = torch.load(path / _VALUE_HEAD_NAME, map_location="cpu", weights_only=True)
            policy.value_head.load_state_dict(state)
        return policy.to(next(actor.parameters()).device)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        separate_critic: bool = False,
        torch_dtype: torch.dtype | str | None = None,
        *,
        critic: str | os.PathLike | None = None,
        value_head: bool = True,
        **kw,
    ) -> ActorCritic:
        """Build from a hub id or a local directory.

        A directory written by :meth:`save_pretrained` is restored as saved (actor, critic, value head).
        Otherwise the actor is ``AutoModelForCausalLM.from_pretrained(name_or_path)`` and the critic is a
        value head on it, or (``separate_critic=True``, the paper's set-up) a copy initialised from the same
        checkpoint; ``critic`` names another checkpoint for it. Extra keywords go to ``from_pretrained``.
        ``torch_dtype`` is a ``torch.dtype`` or one of "float32", "bfloat16", "float16".

        Raises:
            OSError: the model is neither a local directory nor loadable from the hub / local cache (e.g. with
                ``HF_HUB_OFFLINE=1``); the message says how to point at a local copy.
        """
        if (Path(name_or_path) / _CONFIG_NAME).is_file():
            return cls.load(name_or_path, torch_dtype=torch_dtype, **kw)
        actor = _load_causal_lm(name_or_path, torch_dtype, **kw)
        critic_model = None
        if critic is not None:
            critic_model = _load_causal_lm(critic, torch_dtype, **kw)
        elif separate_critic:
            critic_model = _load_causal_lm(name_or_path, torch_dtype, **kw)
        return cls(actor, critic=critic_model, value_head=value_head)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_kwargs(torch_dtype: torch.dtype | str | None) -> dict[str, Any]:
    if torch_dtype is None:
        return {}
    if isinstance(torch_dtype, str):
        if torch_dtype not in _DTYPES:
            raise ValueError(f"torch_dtype must be a torch.dtype or one of {sorted(_DTYPES)}; got {torch_dtype!r}")
        torch_dtype = _DTYPES[torch_dtype]
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    # transformers >= 4.56 calls it ``dtype`` (``torch_dtype`` is deprecated there).
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch_dtype}


def _load_causal_lm(name_or_path: str | os.PathLike, torch_dtype: torch.dtype | str | None, **kw) -> nn.Module:
    from transformers import AutoModelForCausalLM

    dtype_kw = _dtype_kwargs(torch_dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **dtype_kw, **kw)
    except (OSError, ValueError) as err:
        if Path(name_or_path).is_dir():
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub could not be reached or has no such model"
        raise OSError(
            f"could not load the model {str(name_or_path)!r}: {why} and it is not in the local cache. "
            f"Download it where there is network access (`huggingface-cli download {name_or_path}`, or unset "
            f"HF_HUB_OFFLINE) or pass a local directory (one written by save_pretrained). "
            f"Original error: {type(err).__name__}: {err}"
        ) from err
