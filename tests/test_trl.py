"""TRE in TRL's GRPOTrainer (tre_edu.integrations.trl): parity with TRL's own path, the zero gradient outside the
trust region, the logged metrics, and a loud failure when TRL moves the overridden method. CPU, offline, tiny model."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from packaging.specifiers import SpecifierSet  # noqa: E402
from packaging.version import Version  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from tre_edu.integrations.trl import (  # noqa: E402
    TESTED_TRL,
    TREGRPOConfig,
    TREGRPOTrainer,
    check_trl_compatibility,
    task_reward,
    training_history,
)
from tre_edu.models.tiny import build_tiny_model, build_tokenizer  # noqa: E402
from tre_edu.tasks import get_task  # noqa: E402

TAIL = 200
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(tail_tokens=TAIL)


@pytest.fixture(scope="module")
def task():
    return get_task("countdown")


@pytest.fixture(scope="module")
def dataset(tok, task):
    with pytest.warns(UserWarning):  # offline: generated puzzles
        examples = task.load("train", n=8, seed=0)
    rows = [{"prompt": task.prompt(e, tok, "compact"), "numbers": e["numbers"], "target": e["target"]}
            for e in examples]  # fmt: skip
    return Dataset.from_list(rows)


def model_for(tok):
    torch.manual_seed(0)
    return build_tiny_model(tok, n_embd=32, n_layer=2, n_head=2, n_positions=64, seed=0)


def args_for(tmp_path, cls=TREGRPOConfig, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), bf16=False, use_cpu=True, report_to=[], save_strategy="no",
        per_device_train_batch_size=4, num_generations=4, max_completion_length=8, logging_steps=1,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    return cls(**{**base, **kw})


def trainer_for(tok, task, dataset, tmp_path, cls=TREGRPOTrainer, args_cls=TREGRPOConfig, **kw):
    args = args_for(tmp_path, args_cls, **kw)
    return cls(model=model_for(tok), reward_funcs=task_reward(task, tok), args=args, train_dataset=dataset,
               processing_class=tok)  # fmt: skip


def batch(tok, B=4, P=6, C=7, seed=0):
    """A left-padded prompt and a right-padded completion of random non-special tokens, as TRL builds them."""
    g = torch.Generator().manual_seed(seed)
    V = len(tok)
    prompt_ids = torch.randint(4, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    prompt_ids[0, :2] = tok.pad_token_id
    completion_ids = torch.randint(4, V, (B, C), generator=g)
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[1, 4:] = 0  # right padding after an early end
    completion_ids[1, 4:] = tok.pad_token_id
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": torch.tensor([1.0, -0.5, 0.25, -0.75]),
        "num_items_in_batch": completion_mask.sum(),
    }  # fmt: skip


def joined(b):
    ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
    return ids, torch.cat([b["prompt_mask"], b["completion_mask"]], 1), b["completion_ids"].shape[1]


# --- the extension point ----------------------------------------------------------------------------------------
def test_trl_extension_point_unchanged():
    check_trl_compatibility()  # the installed TRL still has the method, its parameters and the bonus we rely on
    extra = re.search(r'^trl = \["trl([^"]+)"\]', (ROOT / "pyproject.toml").read_text(), re.M)
    assert extra, 'pyproject.toml needs the extra: trl = ["trl>=...,<..."]'
    spec = SpecifierSet(extra.group(1))
    assert str(spec) == str(SpecifierSet(TESTED_TRL))
    assert Version(trl.__version__) in spec, f"installed trl {trl.__version__} is outside the tested range {spec}"


def test_changed_trl_signature_fails_loudly():
    class Moved(GRPOTrainer):
        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, chunk=None):
            raise AssertionError("never called")

    with pytest.raises(RuntimeError, match="changed its signature"):
        check_trl_compatibility(Moved)

    class NoBonus(GRPOTrainer):
        def _compute_loss(self, model, inputs):
            return self._get_per_token_logps_and_entropies(model, None, None, 1, compute_entropy=False)

    with pytest.raises(RuntimeError, match="_compute_loss"):
        check_trl_compatibility(NoBonus)


def test_bad_settings_are_named(tmp_path):
    bad = [({"tre_kind": "global"}, "tre_kind"), ({"tre_k": 0}, "tre_k"), ({"tre_p": 1.5}, "tre_p"),
           ({"tre_max_candidates": 0}, "tre_max_candidates"), ({"tre_rescale": "yes"}, "tre_rescale")]  # fmt: skip
    for kw, name in bad:
        with pytest.raises(ValueError, match=name):
            args_for(tmp_path, **kw)


def test_effective_coef(tmp_path):
    a = args_for(tmp_path, entropy_coef=0.0007, tre_kind="tre-k", tre_k=2)
    assert a.effective_coef(20_033) == pytest.approx(0.0007 * math.log(20_033) / math.log(2))
    assert args_for(tmp_path, entropy_coef=0.01, tre_kind="entropy").effective_coef(20_033) == 0.01


# --- parity with TRL's own path ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tre-k", "tre-p", "entropy"])
def test_full_trust_region_equals_trl_entropy_and_logps(tok, task, dataset, tmp_path, kind):
    """K = V (TRE-K), p = 1 over the whole vocabulary (TRE-P) and the global kind: H_TRE = H (the rescale factor is
    log V / log V = 1), so the entropy equals TRL's own; the log-probs equal TRL's fused-head log-probs."""
    V = len(tok)
    tr = trainer_for(tok, task, dataset, tmp_path, tre_kind=kind, tre_k=V, tre_p=1.0, tre_max_candidates=None)
    ids, attn, keep = joined(batch(tok))
    mask = attn[:, -keep:].bool()
    ours = tr._get_per_token_logps_and_entropies(tr.model, ids, attn, keep, compute_entropy=True)
    theirs = GRPOTrainer._get_per_token_logps_and_entropies(tr, tr.model, ids, attn, keep, compute_entropy=True)
    torch.testing.assert_close(ours[0][mask], theirs[0][mask], rtol=0, atol=2e-5)
    torch.testing.assert_close(ours[1][mask], theirs[1][mask], rtol=0, atol=2e-5)
    assert ours[2] is None and theirs[2] is None
    assert float(ours[1][mask].detach().std()) > 0  # a real comparison: the entropies differ across positions


@pytest.mark.parametrize(("kind", "coef"), [("tre-k", 0.0), ("entropy", 0.05)])
def test_same_loss_and_gradients_as_plain_grpo(tok, task, dataset, tmp_path, kind, coef):
    """entropy_coef = 0 (any kind), and the global kind at a nonzero coefficient: TREGRPOTrainer's loss and
    gradients are TRL's own."""
    from trl import GRPOConfig

    ours = trainer_for(tok, task, dataset, tmp_path / "a", tre_kind=kind, entropy_coef=coef)
    plain = trainer_for(tok, task, dataset, tmp_path / "b", GRPOTrainer, GRPOConfig, entropy_coef=coef)
    b = batch(tok, seed=1)
    grads, losses = [], []
    for tr in (ours, plain):
        tr.model.train()
        tr.current_gradient_accumulation_steps = 1
        tr.model.zero_grad()
        loss = tr._compute_loss(tr.model, dict(b))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-7)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)
    if coef:
        assert ours._metrics["train"]["entropy"] == pytest.approx(plain._metrics["train"]["entropy"], abs=1e-5)


@pytest.mark.parametrize("kind", ["tre-k", "entropy"])
def test_gradient_outside_top_k_is_zero(tok, task, dataset, tmp_path, kind):
    """d(sum of the bonus entropies)/d logits is exactly 0 outside the top-K for TRE-K; the global entropy lifts
    the tail (nonzero there), so the check can fail."""
    tr = trainer_for(tok, task, dataset, tmp_path, tre_kind=kind, tre_k=2, entropy_coef=0.01)
    seen = []

    def keep_logits(module, inputs, logits):  # returns None: the output is unchanged
        logits.retain_grad()
        seen.append(logits)

    hook = tr.model.get_output_embeddings().register_forward_hook(keep_logits)
    ids, attn, keep = joined(batch(tok, seed=2))
    try:
        _, ent, _ = tr._get_per_token_logps_and_entropies(tr.model, ids, attn, keep, compute_entropy=True)
    finally:
        hook.remove()
    mask = attn[:, -keep:].float()
    (ent * mask).sum().backward()
    logits = seen[-1][:, :-1]
    grad = seen[-1].grad[:, :-1]
    outside = torch.ones_like(grad, dtype=torch.bool).scatter_(-1, logits.topk(2, -1).indices, False)
    outside &= mask.bool().unsqueeze(-1)
    inside = ~outside & mask.bool().unsqueeze(-1)
    if kind == "tre-k":
        assert bool((grad[outside] == 0).all())
        assert float(grad[inside].abs().min()) > 0
    else:
        assert float((grad[outside] != 0).float().mean()) > 0.99


# --- a real run logs every new metric -----------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "lean"), [("tre-k", False), ("tre-p", False), ("tre-k", True)])
def test_few_step_run_logs_every_metric(tok, task, dataset, tmp_path, kind, lean):
    tr = trainer_for(tok, task, dataset, tmp_path, tre_kind=kind, entropy_coef=0.001, max_steps=2, tre_lean_head=lean)
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2
    new = ["entropy/global", "entropy/tre_k", "entropy/tre_p", "tail/top1_prob", "tail/mass_outside_top2",
           "tail/mass_outside_top10", "tail/nucleus_size_p99", "tail/mass_outside_nucleus_p99",
           "tail/response_frac"]  # fmt: skip
    if not lean:  # needs the logits: the materialised path only
        new += ["tail/sampled_outside_top2"] + (["tail/sampled_outside_nucleus_p99"] if kind == "tre-p" else [])
    for h in logs:
        missing = [k for k in new if k not in h]
        assert not missing, f"not logged: {missing}"
        assert all(math.isfinite(h[k]) for k in new)
        assert h["entropy"] == pytest.approx(h[f"entropy/{kind.replace('-', '_')}"], rel=1e-4)  # the bonus is H_TRE
        assert 0 <= h["tail/mass_outside_top10"] <= h["tail/mass_outside_top2"] <= 1
        assert h["entropy_coef"] == 0.001


def test_task_reward_scores_and_counts_tail_completions(tok, task):
    reward = task_reward(task, tok)
    logged = {}
    good = "<think></think><answer>3*7+20</answer>"
    ids = [tok(good)["input_ids"], tok(good)["input_ids"] + [len(tok) - 1]]
    out = reward(prompts=["", ""], completions=[good, good + "<tail_00199>"], completion_ids=ids,
                 numbers=[[3, 7, 20], [3, 7, 20]], target=[41, 41], log_metric=logged.__setitem__,
                 trainer_state=None, log_extra=None)  # fmt: skip
    assert out == [1.0, 0.0]
    assert logged == {"tail/response_frac": 0.5}


def test_vision_inputs_are_refused(tok, task, dataset, tmp_path):
    tr = trainer_for(tok, task, dataset, tmp_path)
    ids, attn, keep = joined(batch(tok))
    with pytest.raises(ValueError, match="pixel_values"):
        tr._get_per_token_logps_and_entropies(tr.model, ids, attn, keep, compute_entropy=True, pixel_values=ids)


def test_training_history_groups_generations(tok, task, dataset, tmp_path):
    tr = trainer_for(tok, task, dataset, tmp_path, tre_kind="tre-k", entropy_coef=0.001, max_steps=4,
                     steps_per_generation=2)  # fmt: skip
    tr.train()
    h = training_history(tr.state.log_history, steps_per_generation=2)
    assert [r["step"] for r in h] == [1, 2]  # 4 optimiser steps = 2 generations
    assert all("tail/mass_outside_top10" in r and "reward/mean" in r for r in h)
    with pytest.raises(ValueError, match="steps_per_generation"):
        training_history(tr.state.log_history, steps_per_generation=0)


def test_readme_snippet_runs(tok, task, dataset, tmp_path, monkeypatch):
    """The README's five lines, as written, with a saved tiny model as ``model`` and CPU-sized settings added."""
    import tre_edu.integrations.trl as mod

    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "TREGRPOTrainer(" in b)
    real = mod.TREGRPOConfig
    small = dict(bf16=False, use_cpu=True, report_to=[], save_strategy="no", per_device_train_batch_size=4,
                 num_generations=4, max_completion_length=8, max_steps=1, disable_tqdm=True)  # fmt: skip

    class Small(real):  # the snippet's settings plus the CPU-sized ones
        def __init__(self, **kw):
            super().__init__(**{**kw, **small, "output_dir": str(tmp_path / "o")})

    monkeypatch.setattr(mod, "TREGRPOConfig", Small)
    path = tmp_path / "tiny"
    model_for(tok).save_pretrained(path)
    tok.save_pretrained(path)
    ns = {"model": str(path), "reward": task_reward(task, tok), "dataset": dataset}
    exec(compile(block, "README-trl", "exec"), ns)
    tr = ns["trainer"]
    assert isinstance(tr, TREGRPOTrainer) and tr.args.tre_kind == "tre-k" and tr.args.entropy_coef == 0.001
    assert tr.state.global_step == 1


@pytest.mark.parametrize("kind", ["tre-k", "tre-p", "entropy"])
def test_lean_head_matches_the_logits_path(tok, task, dataset, tmp_path, kind):
    """tre_lean_head=True (tre_edu's chunked LM head, no (B, T, V) logits): the same log-probs, bonus entropy,
    gradients and tail metrics as the materialised path."""
    outs, grads, metrics = [], [], []
    for lean in (False, True):
        tr = trainer_for(tok, task, dataset, tmp_path / str(lean), tre_kind=kind, entropy_coef=0.01,
                         tre_lean_head=lean)  # fmt: skip
        ids, attn, keep = joined(batch(tok, seed=3))
        tr.model.train()
        lp, ent, _ = tr._get_per_token_logps_and_entropies(tr.model, ids, attn, keep, compute_entropy=True)
        mask = attn[:, -keep:].float()
        ((lp * mask).sum() + (ent * mask).sum()).backward()
        outs.append((lp.detach() * mask, ent.detach() * mask))
        grads.append({n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None})
        metrics.append({k: v[-1] for k, v in tr._metrics["train"].items()})
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=2e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=2e-4)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-3, atol=1e-5, msg=n)
    shared = [k for k in metrics[1] if k in metrics[0]]
    assert "entropy/tre_k" in shared and "tail/mass_outside_top10" in shared
    for k in shared:
        assert metrics[1][k] == pytest.approx(metrics[0][k], rel=1e-4, abs=1e-6), k
