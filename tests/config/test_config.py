"""The experiment YAML: the embedded default, typed values, overrides, and every refusal naming its key and
where it came from."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bookgen.cli import main
from bookgen.config_io import config_from_dict, config_to_dict, load_config, write_resolved
from bookgen.errors import ConfigError
from tests.helpers import REPO, write_experiment


def test_loads_embedded_default_and_resolves_paths_against_yaml_folder():
    cfg = load_config(REPO / "experiments" / "tiny_cpu.yaml")
    assert cfg.data.source == REPO / "data" / "sample" / "booksummaries.txt"
    assert cfg.run.output_dir == REPO / "runs" / "tiny_cpu"
    assert cfg.prepared_dir == REPO / "runs" / "tiny_cpu" / "prepared"
    assert cfg.deepspeed.config == REPO / "ds_configs" / "zero1.json"


def test_reference_experiment_matches_the_reference_run():
    cfg = load_config(REPO / "experiments" / "gpt2_booksummaries.yaml")
    assert (cfg.model.name_or_path, cfg.train.learning_rate, cfg.train.epochs) == ("gpt2", 5e-5, 5)
    assert cfg.train.micro_batch_size == 2 and cfg.data.split == "reference" and cfg.data.packing == "none"


def test_the_conditional_experiments_share_their_prompt():
    gpu, cpu = (load_config(REPO / "experiments" / f"{name}.yaml") for name in ("gpt2_conditional",
                                                                                  "tiny_conditional_cpu"))
    assert gpu.data.prompt == cpu.data.prompt == "Title: {title}\nAuthor: {author}\nGenres: {genres}\nSummary:"
    assert gpu.model.name_or_path == "gpt2" and gpu.eval.scored == 16 and cpu.eval.scored == 8


def test_llama_lora_experiment_and_optional_sections(tmp_path):
    cfg = load_config(REPO / "experiments" / "llama_lora.yaml")
    assert cfg.model.lora is not None and cfg.model.lora.r == 16 and cfg.model.lora.target_modules == ["all-linear"]
    assert cfg.deepspeed.zero_stage == 3 and cfg.tokenizer.eos_token == "<|end_of_text|>"
    assert config_from_dict(config_to_dict(cfg), "resolved").model.lora == cfg.model.lora, "written and read back"
    # the README shows it short: the same experiment where it sets something
    import re

    readme = re.search(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "readme.yaml").write_text(readme)
    short = load_config(tmp_path / "experiments" / "readme.yaml")
    def named(section: dict) -> dict:  # paths resolve against each file's own folder: compare their names
        return {k: Path(v).name if isinstance(v, str) and "/" in v else v for k, v in section.items()}

    for section in ("model", "tokenizer", "deepspeed"):
        assert named(config_to_dict(short)[section]) == named(config_to_dict(cfg)[section]), section
    assert (short.train.learning_rate, short.train.epochs, short.data.packing, short.deepspeed.zero_stage) == (
        cfg.train.learning_rate, cfg.train.epochs, cfg.data.packing, cfg.deepspeed.zero_stage)
    off = load_config(REPO / "experiments" / "llama_lora.yaml", ["model.lora=null"])
    assert off.model.lora is None, "null turns an optional section off"
    assert load_config(write_experiment(tmp_path, {"model.lora": {}})).model.lora.r == 8, "{} takes the defaults"
    for bad, message in ((["model.lora.rank=4"], "model.lora.rank: unknown key"),
                         (["model.lora.r=0"], "model.lora.r: must be >= 1"),
                         (["model.lora.target_modules=[all-linear, q_proj]"], "all-linear stands alone")):
        with pytest.raises(ConfigError, match=message):
            load_config(write_experiment(tmp_path, {"model.lora": {}}), bad)


def test_unknown_key_suggests_close_match(tmp_path):
    path = write_experiment(tmp_path, {"train.lerning_rate": 1e-4})
    expected = r"exp.yaml: train.lerning_rate: unknown key; did you mean train.learning_rate\?"
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_unknown_section_is_named(tmp_path):
    path = write_experiment(tmp_path, {"trian.epochs": 2})
    with pytest.raises(ConfigError, match=r"trian: unknown key; did you mean train\?"):
        load_config(path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.micro_batch_size", "two", r"train.micro_batch_size: expected an integer, got 'two'"),
        ("train.micro_batch_size", True, r"train.micro_batch_size: expected an integer"),
        ("train.learning_rate", -1.0, r"train.learning_rate: must be > 0"),
        ("data.split", "random", r"data.split: expected one of 'seeded', 'reference'"),
        ("deepspeed.zero_stage", 4, r"deepspeed.zero_stage: must be 0, 1, 2 or 3"),
        ("data.block_size", 2, r"data.block_size: must be >= 8"),
        ("run.tensorboard", "yes", r"run.tensorboard: expected true or false"),
        ("run.trackers", ["tensorbord"], r"run.trackers\[0\]: expected one of 'tensorboard', 'wandb', 'mlflow'"),
        ("run.trackers", ["mlflow", "mlflow"], r"run.trackers: names a tracker twice"),
        ("run.wandb.projet", "x", r"run.wandb.projet: unknown key; did you mean run.wandb.project\?"),
        ("train", [1, 2], r"train: expected a mapping"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, key, value, message):
    path = write_experiment(tmp_path, {key: value})
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_required_key(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"run": {"output_dir": "x"}}))
    with pytest.raises(ConfigError, match=r"data.source: required key is missing"):
        load_config(path)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="nope.yaml: experiment file not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_key_given_twice_is_named_with_its_lines(tmp_path):
    """Plain YAML keeps the last value silently."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("run: {output_dir: run}\ndata: {source: x.txt}\ntrain:\n  learning_rate: 1.0e-3\n"
                     "  epochs: 2\n  learning_rate: 5.0e-5\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: line 6: 'learning_rate' is set twice in one section "
                                          r"\(first on line 4\)"):
        load_config(twice)


def test_an_old_spelling_still_loads_with_a_notice_and_an_older_one_is_named(tmp_path, capsys, monkeypatch):
    path = write_experiment(tmp_path, {"model.attention": "sdpa"})
    monkeypatch.delenv("RANK", raising=False)
    assert load_config(path).model.attention == "causal"
    assert capsys.readouterr().err.strip() == (f"notice: {path}: model.attention: 'sdpa' is now spelled 'causal' "
                                               "(the same setting); the old spelling still works")
    monkeypatch.setenv("RANK", "1")
    assert load_config(path).model.attention == "causal" and capsys.readouterr().err == "", "rank 0 says it once"
    with pytest.raises(ConfigError, match=r"model.attention: 'bookgen' is no longer a value; use one of 'causal', "
                                          r"'eager', 'flash_attention_2' \('bookgen' meant 'causal'\)"):
        load_config(path, ["model.attention=bookgen"])


def test_set_overrides_are_typed_and_validated(tmp_path):
    path = write_experiment(tmp_path)
    cfg = load_config(path, ["train.max_steps=10", "train.learning_rate=3e-4", "data.packing=documents"])
    assert (cfg.train.max_steps, cfg.train.learning_rate, cfg.data.packing) == (10, 3e-4, "documents")
    with pytest.raises(ConfigError, match=r"--set data.packing=true: data.packing: True is no longer a value; use "
                                          r"one of 'none', 'documents', 'concat' \(True meant 'concat'\)"):
        load_config(path, ["data.packing=true"])
    with pytest.raises(ConfigError, match="group_by_length: cannot be combined with data.packing: documents"):
        load_config(path, ["data.packing=documents", "data.group_by_length=true"])
    with pytest.raises(ConfigError, match="train.max_stpes: unknown key; did you mean train.max_steps"):
        load_config(path, ["train.max_stpes=10"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(path, ["train.max_steps"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write_experiment(tmp_path))
    out = tmp_path / "resolved.yaml"
    write_resolved(cfg, out)
    again = config_from_dict(yaml.safe_load(out.read_text()), str(out))
    assert config_to_dict(again) == config_to_dict(cfg)
    assert isinstance(again.run.output_dir, Path) and again.run.output_dir.is_absolute()


def test_config_help_lists_every_section(capsys):
    from bookgen.cli import main

    assert main(["config-help"]) == 0
    out = capsys.readouterr().out
    for key in ("seed", "run.output_dir", "data.block_size", "train.grad_accum_steps", "deepspeed.zero_stage"):
        assert key in out


def test_checkpoint_fingerprint_ignores_runtime_model_settings_but_not_shapes(tmp_path):
    from bookgen.config_io import model_fingerprint

    def fingerprint(name: str, **overrides: object) -> str:
        cfg = load_config(write_experiment(tmp_path / name, overrides))
        return model_fingerprint(cfg.model, cfg.tokenizer)

    base = fingerprint("base")
    assert fingerprint("attn", **{"model.attention": "eager", "model.dropout": 0.2,
                                  "model.activation_checkpointing": True}) == base
    assert fingerprint("wider", **{"model.n_embd": 48}) != base


def test_keep_best_needs_an_evaluation_at_every_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint.keep_best: needs checkpoint.every \(4\) to be a multiple of "
                                          r"eval.every \(3\)"):
        load_config(write_experiment(tmp_path, {"checkpoint.keep_best": True, "checkpoint.every": 4,
                                                "eval.every": 3}))
    with pytest.raises(ConfigError, match=r"exp.yaml: checkpoint.keep_best: needs checkpoint.every \(None\)"):
        load_config(write_experiment(tmp_path, {"checkpoint.keep_best": True, "eval.every": 3}))
    assert load_config(write_experiment(tmp_path, {"checkpoint.keep_best": True, "checkpoint.every": 6,
                                                   "eval.every": 3})).checkpoint.keep_best


def test_early_stopping_needs_evaluations_to_count(tmp_path):
    with pytest.raises(ConfigError, match=r"exp.yaml: eval.early_stopping_patience: needs eval.every"):
        load_config(write_experiment(tmp_path, {"eval.early_stopping_patience": 3}))
    with pytest.raises(ConfigError, match=r"eval.early_stopping_patience: must be >= 1"):
        load_config(write_experiment(tmp_path, {"eval.early_stopping_patience": 0, "eval.every": 5}))


def test_config_refusals_name_the_key_and_where_it_came_from(tmp_path):
    from bookgen.config_io import load_config
    from bookgen.errors import ConfigError

    exp = write_experiment(tmp_path)
    with pytest.raises(ConfigError, match=r"--set train.learning_rate=.inf: train.learning_rate: expected a finite"):
        load_config(exp, ["train.learning_rate=.inf"])
    with pytest.raises(ConfigError, match=r"--set generate.temperature=.nan: generate.temperature"):
        load_config(exp, ["generate.temperature=.nan"])
    with pytest.raises(ConfigError, match=r"--set train.epochs=0: train.epochs: must be >= 1"):
        load_config(exp, ["train.epochs=0"])
    with pytest.raises(ConfigError, match=r"exp.yaml: data.block_size: 128 is more than model.n_positions \(64\)"):
        load_config(write_experiment(tmp_path / "b", {"data.block_size": 128}))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty.yaml: the experiment file is empty"):
        load_config(empty)
    cfg = load_config(exp, ["checkpoint.resume=old/checkpoints/step00000004"])
    assert cfg.checkpoint.resume == str(tmp_path / "old/checkpoints/step00000004"), "relative to the YAML's folder"


def test_odd_values_are_named_errors_not_tracebacks(tmp_path, capsys):
    from bookgen.config_io import load_config
    from bookgen.errors import ConfigError

    exp = write_experiment(tmp_path)
    for item, message in (("train.adam_eps=-1", "--set train.adam_eps=-1: train.adam_eps: must be > 0"),
                          ("seed=-1", "--set seed=-1: seed: must be in"),
                          (f"seed={2**64}", f"--set seed={2**64}: seed: must be in"),
                          ("trian.lr=1", "--set trian.lr=1: trian: unknown key; did you mean train?")):
        with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
            load_config(exp, [item])
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(exp.read_bytes() + "# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml: not UTF-8 text"):
        load_config(latin)
    assert main(["show", "--cfg", str(latin), "--key", "seed"]) == 2


def test_bf16_weights_on_zero0_are_refused_for_bf16_mixed(tmp_path):
    """DeepSpeed's optimizer for 16-bit weights without ZeRO reads the device once per parameter tensor."""
    exp = write_experiment(tmp_path, {"train.precision": "bf16", "deepspeed.zero_stage": 0})
    with pytest.raises(ConfigError, match=r"train.precision: bf16 with deepspeed.zero_stage 0 .* use bf16-mixed"):
        load_config(exp)
    assert load_config(write_experiment(tmp_path, {"train.precision": "bf16-mixed"})).train.precision == "bf16-mixed"


@pytest.mark.parametrize(("given", "trackers"), [
    ({}, ["tensorboard"]),
    ({"run.trackers": []}, []),
    ({"run.tensorboard": False}, []),  # the old switch, as old experiment files say it
    ({"run.tensorboard": True, "run.trackers": ["mlflow"]}, ["mlflow", "tensorboard"]),
])
def test_trackers_default_to_tensorboard_and_the_old_switch_still_works(tmp_path, given, trackers):
    cfg = load_config(write_experiment(tmp_path, given))
    assert cfg.run.trackers == trackers
    again = config_from_dict(config_to_dict(cfg), "resolved")
    assert again.run.trackers == trackers and again.run.tensorboard is None, "the resolved config says it once"


def test_gpt2_keys_beside_a_pretrained_model_or_a_family_config_are_named_as_ignored():
    from bookgen.config import ModelConfig

    assert ModelConfig(n_layer=4, n_embd=128).ignored_gpt2_keys() == [], "they build the built-in GPT-2"
    assert ModelConfig(name_or_path="gpt2", n_layer=4, n_embd=128).ignored_gpt2_keys() == ["n_layer", "n_embd"]
    assert ModelConfig(config={"model_type": "llama"}, n_positions=64).ignored_gpt2_keys() == ["n_positions"]
    assert ModelConfig(name_or_path="gpt2").ignored_gpt2_keys() == [], "defaults are not the user's settings"


def test_the_best_by_rouge_needs_prompt_completion_rows(tmp_path):
    from tests.helpers import write_experiment

    with pytest.raises(ConfigError, match=r"checkpoint.best_by: rougeL is measured on prompt-completion rows"):
        load_config(write_experiment(tmp_path, {"checkpoint.best_by": "rougeL"}))
    assert load_config(write_experiment(tmp_path, {"checkpoint.best_by": "rougeL", "data.prompt": "{title}"})
                       ).checkpoint.best_by == "rougeL"
