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

The LM head. By default :class:`ActorCritic` installs tre_edu's memory-lean head (:mod:`tre_edu.head`) in the
actor: a :class:`~tre_edu.head.LeanHead` takes the place of ``actor.get_output_embeddings()`` (the same weight /
bias Parameters, so tied embeddings, state dicts and ``generate`` are unchanged) and, during a training forward,
returns the per-token statistics asked for by a :class:`~tre_edu.head.StatsRequest` instead of the ``(B, R, V)``
logits. The statistics are computed inside the LM's own forward (one ``actor(...)`` call), where FSDP has the head's
weight whole. ``lean_head=False`` (config ``ppo.lean_head``) keeps the materialised logits; both paths give the
same numbers. :func:`response_stats` does the same for any causal LM (the KL reference, evaluation).

Two critic set-ups:

- ``ActorCritic(actor)``: a linear value head on the actor's last hidden state (shared trunk; cheap).
- ``ActorCritic(actor, critic=copy_of_actor)``: the paper's set-up; a separate model initialised from the same
  checkpoint. Only its trunk (``critic.base_model``) is kept, plus a ``Linear(hidden, 1)`` value head.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from tre_edu.entropy import token_logprobs
from tre_edu.head import (
    LeanHead,
    StatsRequest,
    TokenStats,
    find_lean_head,
    install_lean_head,
    statistics_from_logits,
)

__all__ = [
    "ActorCritic",
    "PolicyOutput",
    "StatsRequest",
    "TokenStats",
    "lm_forward_kwargs",
    "output_cache",
    "position_ids_from_mask",
    "response_logits",
    "response_logprobs",
    "response_stats",
]


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


def _response_forward(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, R: int, hidden: bool) -> Any:
    """The causal LM over ``[prompt | response]``: position ids from the mask, no cache, the LM head on the last
    ``R + 1`` positions only."""
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        output_hidden_states=hidden,
        **lm_forward_kwargs(model, logits_to_keep=R + 1),
    )


def response_logits(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_len: int,
    *,
    temperature: float = 1.0,
    hidden: bool = False,
) -> tuple[Tensor, Any]:
    """The one forward of a causal LM over ``[prompt | response]`` that PPO, SFT and the KL reference share.

    Returns ``(logits (B, R, V) / temperature, model output)``: the logits at positions ``P - 1 .. P + R - 2``,
    i.e. those that predict the ``R`` response tokens. Only the last ``R + 1`` positions go through the LM head
    (``logits_to_keep``); position ids come from the mask. ``hidden=True`` also returns the hidden states.
    """
    _check_inputs(input_ids, attention_mask, response_len)
    if not (isinstance(temperature, int | float) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    R = response_len
    out = _response_forward(model, input_ids, attention_mask, R, hidden)
    logits = out.logits[:, -(R + 1) : -1]  # the last one predicts past the end of the sequence
    return (logits if temperature == 1 else logits / temperature), out


def response_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, response_len: int, *, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """``(logits (B, R, V), logprobs (B, R))`` with ``log pi(a_t | s_t) = log softmax(z_t / T)[a_t]``."""
    logits, _ = response_logits(model, input_ids, attention_mask, response_len, temperature=temperature)
    return logits, token_logprobs(logits, input_ids[:, -response_len:])


def _stats_forward(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_len: int,
    request: StatsRequest | None,
    *,
    temperature: float,
    mask: Tensor | None,
    lean: bool | None,
    hidden: bool = False,
    return_logits: bool = False,
) -> tuple[TokenStats, Any, Tensor | None]:
    """(statistics, model output, logits or None): ONE ``model(...)`` call, through the lean head if installed
    (and ``lean`` is not False, and the logits are not asked for), else on the materialised logits."""
    _check_inputs(input_ids, attention_mask, response_len)
    R = response_len
    targets = input_ids[:, -R:]
    if mask is not None and tuple(mask.shape) != tuple(targets.shape):
        raise ValueError(f"mask must have shape (B, R) = {tuple(targets.shape)}, got {tuple(mask.shape)}")
    head = None if lean is False or return_logits else find_lean_head(model)
    if lean is True and head is None and not return_logits:
        raise ValueError("lean=True needs a LeanHead in the model (tre_edu.head.install_lean_head(model))")
    if head is None:
        logits, out = response_logits(
            model, input_ids, attention_mask, response_len, temperature=temperature, hidden=hidden
        )
        stats = statistics_from_logits(logits, targets, request, weights=mask)
        return stats, out, (logits if return_logits else None)
    with head.computing(targets, request, temperature=temperature, weights=mask) as call:
        out = _response_forward(model, input_ids, attention_mask, R, hidden)
    return LeanHead.unpack(out.logits, call), out, None


def response_stats(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_len: int,
    request: StatsRequest | None = None,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    lean: bool | None = None,
) -> TokenStats:
    """Per-token statistics (:class:`~tre_edu.head.TokenStats`, ``(B, R)`` tensors) of the response of any causal
    LM: log-probs always, plus what ``request`` asks for (entropy, TRE, tail metrics weighted by ``mask`` (B, R)).

    One forward over ``[prompt | response]`` as :func:`response_logits`. ``lean``: None = through the model's
    :class:`~tre_edu.head.LeanHead` if one is installed (:func:`tre_edu.head.install_lean_head`), else on the
    materialised logits; False = always materialise; True = require the head."""
    stats, _, _ = _stats_forward(
        model, input_ids, attention_mask, response_len, request, temperature=temperature, mask=mask, lean=lean
    )
    return stats


@dataclass
class PolicyOutput:
    """What :meth:`ActorCritic.forward` returns; ``R`` = response length; all ``(B, R)`` float32.

    logprobs: ``log softmax(z / T)[taken token]`` (differentiable).
    values: ``V(s_t)``, the value of the state before response token ``t``; ``None`` when not asked for (or
        without a critic).
    entropy, tre: the global / trust-region entropy per token when the request asked for them (differentiable).
    metrics: the tail metrics (no grad; masked means, keys of :func:`tre_edu.entropy.tail_metrics`) when asked
        for; ``metrics_weight`` = the sum of the mask behind them.
    logits: ``(B, R, V)`` / T, only with ``return_logits=True`` (the materialised path), else None.
    """

    logprobs: Tensor
    values: Tensor | None = None
    entropy: Tensor | None = None
    tre: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_weight: float = 0.0
    logits: Tensor | None = None


class ActorCritic(nn.Module):
    """PPO's actor (a causal LM) and critic (a value head on the actor, or a separate model).

    Args:
        actor: any Hugging Face causal LM (``PreTrainedModel`` with an LM head).
        critic: ``None`` for a value head on the actor's last hidden state, or a separate Hugging Face
            model (a causal LM initialised from the same checkpoint, as in the paper, or a bare trunk); only
            its trunk (``critic.base_model``) is kept and a ``Linear(hidden, 1)`` head is put on top.
        value_head: with ``critic=None``, whether to build the shared value head (``False``: actor only,
            e.g. for GRPO-style advantages; ``values`` are then ``None``).
        lean_head: install the memory-lean head in the actor (:func:`tre_edu.head.install_lean_head`; only where
            it is exact: a plain linear output layer) and use it in :meth:`forward`. ``use_lean_head`` says
            whether it is in use; setting it to False switches to the materialised logits.
    """

    def __init__(
        self, actor: nn.Module, critic: nn.Module | None = None, value_head: bool = True, lean_head: bool = True
    ):
        super().__init__()
        self.actor = actor
        # before any FSDP / DDP wrapping: the LeanHead holds the output layer's own Parameters
        self.use_lean_head = bool(lean_head) and install_lean_head(actor) is not None
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

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(actor parameters, critic parameters): the critic is the value head plus a separate trunk if any.

        The trainer gives each its own learning rate and gradient clipping (paper: actor 1e-6, critic 1e-5)."""
        critic = list(self.critic.parameters()) if self.critic is not None else []
        if self.value_head is not None:
            critic += list(self.value_head.parameters())
        return list(self.actor.parameters()), critic

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
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_len: int,
        *,
        request: StatsRequest | None = None,
        mask: Tensor | None = None,
        compute_values: bool = True,
        temperature: float = 1.0,
        return_logits: bool = False,
    ) -> PolicyOutput:
        """Log-probs, the requested statistics and values of the last ``response_len`` tokens, in ONE
        ``self.actor(...)`` call (plus the separate critic's, if any).

        Args:
            input_ids: ``(B, L)`` long, ``[left-padded prompt | right-padded response]``.
            attention_mask: ``(B, L)`` 1 for real tokens (prompt and valid response tokens), 0 for pads.
            response_len: ``R``, the number of response columns at the end of ``input_ids`` (``1 <= R < L``).
            request: the per-token statistics besides log-probs (:class:`~tre_edu.head.StatsRequest`; None:
                log-probs only).
            mask: ``(B, R)`` weights of the tail metrics (the response mask); None = every position.
            compute_values: also compute ``values`` (needs a value head).
            temperature: the sampling temperature T of the rollout; the policy is ``softmax(z / T)``.
            return_logits: also return the ``(B, R, V)`` logits (forces the materialised path).

        Returns:
            :class:`PolicyOutput`. Positions where the response is padding hold finite junk; mask them.
        """
        shared_values = compute_values and self.value_head is not None and self.critic is None
        stats, out, logits = _stats_forward(
            self.actor,
            input_ids,
            attention_mask,
            response_len,
            request,
            temperature=temperature,
            mask=mask,
            lean=self.use_lean_head,
            hidden=shared_values,
            return_logits=return_logits,
        )
        R = response_len
        values = None
        if compute_values and self.value_head is not None:
            if self.critic is None:
                values = self._values_from_hidden(out.hidden_states[-1][:, -(R + 1) :])
            else:
                values = self._critic_values(input_ids, attention_mask, position_ids_from_mask(attention_mask), R)
        return PolicyOutput(
            logprobs=stats.logprobs,
            values=values,
            entropy=stats.entropy,
            tre=stats.tre,
            metrics=stats.metrics,
            metrics_weight=stats.metrics_weight,
            logits=logits,
        )
