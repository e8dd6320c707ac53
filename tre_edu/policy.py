"""Actor + critic around any Hugging Face causal LM.

The sequences PPO trains on are ``[left-padded prompt | response (right-padded)]`` of length ``L = P + R``;
response token ``t`` sits at position ``P + t`` and is predicted by the logits at position ``P + t - 1``. So the LM
head is only needed on the last ``R + 1`` positions (``logits_to_keep=R+1``; the last one predicts past the end and
is dropped), and ``values[:, t] = V(s_t)`` comes from the same hidden state as its logits, as GAE expects.

Position ids always come from the attention mask (:func:`position_ids_from_mask`), in sampling and in training, so
left padding never changes a log-prob: rollout and update log-probs agree to float32 precision for equal weights.

By default :class:`ActorCritic` computes the per-token statistics of a training forward inside the LM's own forward
(where FSDP has the head's weight whole) with the memory-lean head (:mod:`tre_edu.head`; it holds the output layer's
own Parameters, so tied embeddings, state dicts and ``generate`` are unchanged), never the ``(B, R, V)`` logits;
:func:`response_stats` does the same for any causal LM (the KL reference, evaluation). Both paths give the same
numbers.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor, nn

from tre_edu.entropy import token_logprobs
from tre_edu.head import LeanHead, StatsRequest, TokenStats, find_lean_head, install_lean_head, statistics_from_logits

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
    """Position ids ``(B, L)`` long from an attention mask ``(B, L)`` (1 = real token).

    ``pos = cumsum(mask) - 1``, clamped at 0: the first real token of every row gets position 0 whatever its left
    padding; pads before it get 0 and pads after the end repeat the last position (both are masked out anyway).
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must have shape (B, L); got {tuple(attention_mask.shape)}")
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def lm_forward_kwargs(model: nn.Module, *, logits_to_keep: int | None = None, cache: Any = None) -> dict[str, Any]:
    """Keyword arguments for ``model(...)`` that ask for the last ``logits_to_keep`` logits and pass a KV cache
    (``None``: no cache argument), named as this transformers version expects: 5.x renamed ``past_key_values`` to
    ``cache`` (the old name is removed in 5.40), and < 4.50 called ``logits_to_keep`` ``num_logits_to_keep``."""
    try:
        params = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        params = set()
    kw: dict[str, Any] = {}
    keep = next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in params), None)
    if logits_to_keep is not None and keep is not None:
        kw[keep] = logits_to_keep
    if cache is not None:
        kw["cache" if "cache" in params else "past_key_values"] = cache
    return kw


def output_cache(output: Any) -> Any:
    """The KV cache of a model output (``output.cache`` in transformers 5.x, ``past_key_values`` before)."""
    if "cache" in (output.keys() if hasattr(output, "keys") else ()):
        return output["cache"]
    return output.get("past_key_values") if hasattr(output, "get") else None


def _new_value_head(model: nn.Module) -> nn.Linear:
    """``Linear(hidden, 1)`` on ``model``'s hidden size, zero-initialised: V = 0 for every state at the start, so
    the first value loss is just the squared returns, never a large random offset (the weight still gets a
    gradient, dV/dw = h, from step one)."""
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = [getattr(config, name, None) for name in ("hidden_size", "n_embd", "d_model")]
    hidden = next((h for h in sizes if isinstance(h, int)), None)
    if hidden is None:
        raise ValueError(f"cannot find the hidden size of {type(model).__name__}'s config (hidden_size / n_embd)")
    head = nn.Linear(hidden, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def _check_inputs(input_ids: Tensor, attention_mask: Tensor, response_len: int) -> None:
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        shapes = f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        raise ValueError(f"input_ids and attention_mask must both have shape (B, L); got {shapes}")
    L = input_ids.shape[1]
    if not isinstance(response_len, int) or not 1 <= response_len < L:
        raise ValueError(
            f"response_len must be an int in [1, L-1] = [1, {L - 1}] (at least one prompt token); got {response_len!r}"
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

    Returns ``(logits (B, R, V) / temperature, model output)``: the logits at positions ``P - 1 .. P + R - 2``, those
    that predict the ``R`` response tokens. ``hidden=True`` also returns the hidden states.
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
    R: int,
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
    _check_inputs(input_ids, attention_mask, R)
    targets = input_ids[:, -R:]
    if mask is not None and tuple(mask.shape) != tuple(targets.shape):
        raise ValueError(f"mask must have shape (B, R) = {tuple(targets.shape)}, got {tuple(mask.shape)}")
    head = None if lean is False or return_logits else find_lean_head(model)
    if lean is True and head is None and not return_logits:
        raise ValueError("lean=True needs a LeanHead in the model (tre_edu.head.install_lean_head(model))")
    if head is None:
        logits, out = response_logits(model, input_ids, attention_mask, R, temperature=temperature, hidden=hidden)
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

    One forward as :func:`response_logits`. ``lean``: None = through the model's :class:`~tre_edu.head.LeanHead` if
    one is installed, else on the materialised logits; False = always materialise; True = require the head."""
    stats, _, _ = _stats_forward(
        model, input_ids, attention_mask, response_len, request, temperature=temperature, mask=mask, lean=lean
    )
    return stats


@dataclass
class PolicyOutput:
    """What :meth:`ActorCritic.forward` returns: the fields of :class:`~tre_edu.head.TokenStats` (``(B, R)``
    float32; ``metrics``: masked means of the tail metrics, no grad), plus ``values`` ``V(s_t)``, the value of the
    state before response token ``t`` (None when not asked for or without a critic), and ``logits`` ``(B, R, V)`` / T
    (only with ``return_logits=True``)."""

    logprobs: Tensor
    values: Tensor | None = None
    entropy: Tensor | None = None
    tre: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_weight: float = 0.0
    logits: Tensor | None = None


class ActorCritic(nn.Module):
    """PPO's actor (any Hugging Face causal LM) and critic.

    ``critic``: None for a value head on the actor's last hidden state (``value_head=False``: actor only, e.g. for
    GRPO; ``values`` are then None), or a separate model (a causal LM from the same checkpoint, as in the paper, or
    a bare trunk) of which only the trunk is kept, with a ``Linear(hidden, 1)`` on top. ``lean_head``: install the
    memory-lean head (only where it is exact: a plain linear output layer); ``use_lean_head`` says whether it is in
    use, and setting it to False switches to the materialised logits.
    """

    def __init__(
        self, actor: nn.Module, critic: nn.Module | None = None, value_head: bool = True, lean_head: bool = True
    ):
        super().__init__()
        self.actor = actor
        # before any FSDP / DDP wrapping: the LeanHead holds the output layer's own Parameters
        self.use_lean_head = bool(lean_head) and install_lean_head(actor) is not None
        # A causal LM's trunk: drop its LM head (never used by a critic; saves V * hidden parameters).
        self.critic: nn.Module | None = None if critic is None else getattr(critic, "base_model", critic)
        self.value_head: nn.Linear | None = None
        if critic is not None or value_head:
            self.value_head = _new_value_head(actor if self.critic is None else self.critic)

    @property
    def separate_critic(self) -> bool:
        return self.critic is not None

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(actor parameters, critic parameters): the critic is the value head plus a separate trunk if any; the
        trainer gives each its own learning rate and gradient clipping (paper: actor 1e-6, critic 1e-5)."""
        critic = list(self.critic.parameters()) if self.critic is not None else []
        if self.value_head is not None:
            critic += list(self.value_head.parameters())
        return list(self.actor.parameters()), critic

    def _checkpointing(self, action: str, options: dict | None = None) -> None:
        # transformers >= 5 calls it activation_checkpointing_* (gradient_checkpointing_* is deprecated there)
        for model in (self.actor, self.critic):
            kind = next((k for k in ("activation", "gradient") if hasattr(model, f"{k}_checkpointing_{action}")), None)
            if kind is not None:  # None also for a missing critic
                kwargs = {f"{kind}_checkpointing_kwargs": options} if options else {}
                getattr(model, f"{kind}_checkpointing_{action}")(**kwargs)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass of the actor (and separate critic) to save memory. Sampling
        is unaffected: :func:`tre_edu.rollout.generate` runs in eval mode and asks for the KV cache explicitly."""
        self._checkpointing("enable", options={"use_reentrant": False})

    def disable_gradient_checkpointing(self) -> None:
        self._checkpointing("disable")

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether activation (gradient) checkpointing is on for the actor."""
        return any(getattr(m, "gradient_checkpointing", False) for m in self.actor.modules())

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
        """Log-probs, the statistics of ``request`` (None: log-probs only) and values of the last ``response_len``
        tokens of ``[left-padded prompt | right-padded response]``, in ONE ``self.actor(...)`` call (plus the
        separate critic's, if any). ``mask`` ``(B, R)``: weights of the tail metrics (None: every position);
        ``temperature``: the rollout's T, the policy is ``softmax(z / T)``; ``return_logits`` forces the
        materialised path. Positions where the response is padding hold finite junk; mask them.
        """
        R = response_len
        values_wanted = compute_values and self.value_head is not None
        stats, out, logits = _stats_forward(
            self.actor,
            input_ids,
            attention_mask,
            R,
            request,
            temperature=temperature,
            mask=mask,
            lean=self.use_lean_head,
            hidden=values_wanted and self.critic is None,
            return_logits=return_logits,
        )
        values = None
        if values_wanted:
            if self.critic is None:
                hidden = out.hidden_states[-1]
            else:
                pos = position_ids_from_mask(attention_mask)
                out = self.critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False)
                hidden = out.last_hidden_state
            h = hidden[:, -(R + 1) : -1]  # V(s_t) from position P + t - 1, as the logits
            values = self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return PolicyOutput(**{f.name: getattr(stats, f.name) for f in fields(stats)}, values=values, logits=logits)
