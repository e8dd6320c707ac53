"""tre_edu.config: plain-data sections, one validator, YAML files (base:, by_task:, errors), typed overrides."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tre_edu import config as C
from tre_edu.config import ConfigError, RegularizerConfig, RewardModelConfig, TrainConfig, load_config, load_yaml_dict
from tre_edu.regularizers import effective_coef

ROOT = Path(__file__).resolve().parent.parent


def test_importing_the_config_pulls_no_torch():
    code = "import sys, tre_edu.config; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = TrainConfig().validate()
    cfg.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again.to_dict() == cfg.to_dict()
    assert yaml.safe_load(cfg.to_yaml()) == cfg.to_dict()


def test_every_field_is_declared_once_with_help():
    for cls in (TrainConfig, RewardModelConfig):
        for key, _tp, f in C.iter_fields(cls):
            assert f.metadata.get("help"), key
    flags = [f.metadata["flag"] for _, _, f in C.iter_fields() if f.metadata.get("flag")]
    assert sorted(flags) == sorted(
        ["--kind", "--coef", "--k", "--p", "--tail-tokens", "--steps", "--seed", "--output-dir", "--init-from"]
        + ["--device", "--model"]
    )


def test_the_one_validator_rejects_each_declared_choice_and_bound():
    # every field with choices or bounds: a value outside them raises ConfigError naming the field
    for key, _tp, f in C.iter_fields():
        md = f.metadata
        if md.get("choices"):
            bad = "no-such-choice"
        elif md.get("ge") is not None or md.get("gt") is not None:
            bad = md["ge"] - 1 if md.get("ge") is not None else md["gt"]
        elif md.get("le") is not None:
            bad = md["le"] + 1
        else:
            continue
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, {key: bad})


def test_overrides_coerce_types():
    cfg = load_config(None, ["ppo.steps=7", "regularizer.kind=tre-k", "regularizer.coef=1e-3", "ppo.actor_lr=1"])
    assert cfg.ppo.steps == 7 and cfg.regularizer.kind == "tre-k"
    assert cfg.regularizer.coef == pytest.approx(1e-3)
    assert isinstance(cfg.ppo.actor_lr, float)


@pytest.mark.parametrize("value", ["runs/a #b", "on", "yes", "no", "null", "123", " spaced ", "a: b", "[1"])
def test_string_fields_keep_the_exact_text(value):
    assert load_config(None, [f"output_dir={value}"]).output_dir == value
    assert load_config(None, {"output_dir": value}).output_dir == value
    assert load_config(None, [f"notes={value}"]).notes == value


def test_set_converts_by_the_declared_type():
    cfg = load_config(None, ["eval.greedy=false", "tensorboard=yes", "ppo.dual_clip=null", "regularizer.k=3"])
    assert cfg.eval.greedy is False and cfg.tensorboard is True and cfg.ppo.dual_clip is None
    assert cfg.regularizer.k == 3 and isinstance(cfg.regularizer.k, int)
    assert load_config(None, ["init_from=none"]).init_from is None  # an optional path: null / none mean None
    assert C.parse_value(float, "1e-3") == 1e-3 and C.parse_value(dict, "{a: 1}") == {"a": 1}


def test_task_options_are_free_form():
    cfg = load_config(None, ["task.options.num_count=4", "task.options.think=true"])
    assert cfg.task.options == {"num_count": 4, "think": True}


@pytest.mark.parametrize(
    "override, needle",
    [
        ("ppo.stepz=3", "ppo.stepz"),
        ("nosuch.x=1", "nosuch"),
        ("ppo.steps=0", "ppo.steps"),
        ("ppo.clip_low=1.5", "ppo.clip_low"),
        ("ppo.agg=mean", "token-mean"),
        ("ppo.minibatch_size=100", "ppo.minibatch_size"),
        ("ppo.micro_batch_size=48", "ppo.micro_batch_size"),
        ("ppo.top_p=0", "ppo.top_p"),
        ("ppo.temperature=nan", "ppo.temperature"),
        ("model.critic=shared", "value-head"),
        ("task.name=chess", "countdown"),
        ("regularizer.kind=entropy2", "kind"),
        ("regularizer.p=1.5", "p"),
        ("device=tpu", "device"),
        ("eval.top_p=2", "eval.top_p"),
        ("ppo.whiten_advantages=maybe", "ppo.whiten_advantages"),
        ("ppo.steps=[1", "ppo.steps"),
        ("ppo.steps=1.5", "ppo.steps"),
        ("regularizer.selection=batch", "microbatch, minibatch"),
        ("regularizer.forking_per_microbatch=true", "regularizer.forking_per_microbatch"),
        ("eval.pass_k=-1", "eval.pass_k"),
        ("task.options.x=[1", "task.options.x"),
        ("ppo=3", "section"),
        ("ppo.steps.x=1", "ppo.steps"),
        ("model.n_head=3", "model.n_embd"),
    ],
)
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_override_syntax_error():
    with pytest.raises(ValueError, match="section.field=value"):
        load_config(None, ["ppo.steps"])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_base_chain(tmp_path):
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump({"ppo": {"steps": 5, "top_p": 0.9}, "task": {"options": {"a": 1}}})
    )
    (tmp_path / "child.yaml").write_text(
        yaml.safe_dump({"base": "base.yaml", "ppo": {"steps": 9}, "task": {"options": {"b": 2}}})
    )
    data = load_yaml_dict(tmp_path / "child.yaml")
    assert data["ppo"] == {"steps": 9, "top_p": 0.9}
    assert data["task"]["options"] == {"a": 1, "b": 2}


def test_files_merge_left_to_right(tmp_path):
    (tmp_path / "a.yaml").write_text("ppo: {steps: 5, top_p: 0.9}\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("ppo: {steps: 7}\n")
    cfg = load_config([tmp_path / "a.yaml", tmp_path / "b.yaml"], ["seed=3"])
    assert (cfg.ppo.steps, cfg.ppo.top_p, cfg.seed) == (7, 0.9, 3)


def test_by_task_blocks_follow_their_file(tmp_path):
    (tmp_path / "model.yaml").write_text("by_task:\n  math: {ppo: {micro_batch_size: 4}}\n  hh: {seed: 5}\n")
    (tmp_path / "math.yaml").write_text("task: {name: math}\nppo: {micro_batch_size: 8}\n")
    (tmp_path / "mine.yaml").write_text("ppo: {micro_batch_size: 2}\n")
    files = [tmp_path / "math.yaml", tmp_path / "model.yaml"]
    assert load_config(files).ppo.micro_batch_size == 4
    assert load_config([*files, tmp_path / "mine.yaml"]).ppo.micro_batch_size == 2  # a later file still wins
    assert load_config(files, ["ppo.micro_batch_size=16"]).ppo.micro_batch_size == 16
    other = load_config(files, ["task.name=hh", "task.options.reward_model=rm"])
    assert other.seed == 5 and other.ppo.micro_batch_size == 8
    (tmp_path / "bad.yaml").write_text("by_task:\n  chess: {seed: 1}\n")
    with pytest.raises(ConfigError, match="by_task"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("ppo:\n  steps: [1, 2\n", "line 3"),
        ("ppo:\n\tsteps: 1\n", "line 2"),
        ("- 1\n- 2\n", "mapping at the top level"),
        ("ppo: 3\n", "ppo must be a mapping"),
        ("base: 3\n", "base must be a file name"),
    ],
)
def test_malformed_files_name_the_file_and_line(tmp_path, text, needle):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "bad.yaml")
    assert needle in str(err.value) and "\n" not in str(err.value)
    if "line" in needle:
        assert str(tmp_path / "bad.yaml") in str(err.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="bin.yaml: not UTF-8"):
        load_config(tmp_path / "bin.yaml")


def test_base_cycles_are_named(tmp_path):
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle .*self.yaml -> .*self.yaml"):
        load_config(tmp_path / "self.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize("options, needle", [({"num_count": 7}, "task.options.num_count"), ({"nope": 1}, "nope")])
def test_task_options_are_checked_with_the_config(options, needle):
    with pytest.raises(ValueError, match=needle):
        load_config(None, {"task.name": "countdown", "task.options": options})


def test_regularizer_section_is_plain_data():
    reg = TrainConfig().regularizer
    assert type(reg) is RegularizerConfig and not callable(reg)
    assert reg.selection == "microbatch" and "forking_per_microbatch" not in dataclasses.asdict(reg)
    for name, preset in C.PRESETS.items():
        assert RegularizerConfig(**preset).kind in C.KINDS, name
    with pytest.raises(ConfigError, match=r"regularizer\.clip_cov_lb must be <= clip_cov_ub"):
        RegularizerConfig(clip_cov_lb=6.0)
    tre = RegularizerConfig(kind="tre-k", coef=0.001, k=2)
    assert effective_coef(tre, 151936) == pytest.approx(0.001 * 11.931 / 0.6931, rel=1e-3)
    assert effective_coef(RegularizerConfig(kind="kl-cov"), 100) == 0.0


def test_new_eval_fields_and_reward_model_defaults():
    ev = TrainConfig().eval
    assert ev.pass_k == 0 and ev.tail_metrics is True
    rm = RewardModelConfig()
    assert (rm.epochs, rm.lr, rm.warmup_ratio, rm.center_rewards_coefficient) == (3, 1e-5, 0.1, 0.01)
    with pytest.raises(TypeError, match="backend"):  # one trainer (TRL's RewardTrainer): no backend switch
        RewardModelConfig(backend="torch")


def test_every_shipped_config_resolves():
    # top-level recipes are complete on their own; configs/paper/ pieces are merged (tests/test_recipes.py) and
    # configs/accelerate/ holds `accelerate launch` files, not training configs.
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files, "configs/ should ship recipes"
    for f in files:
        if f.name.startswith("_"):
            continue
        cfg = load_config(f)
        assert cfg.ppo.steps >= 1, f
