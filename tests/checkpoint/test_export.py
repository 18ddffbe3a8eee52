"""Export to a Hugging Face folder: it loads in transformers with the engine's logits, and it never writes
into a run, over a user's files or half-way."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from bookgen.checkpoint.folder import MARKER
from bookgen.cli import main
from tests.helpers import REPO, run_cli, world_readable_tmp, write_experiment
from tests.ranks import launch
from tests.runs import FINISHED_SETTINGS, FINISHED_STEPS, TRAINED_SETTINGS, copy_trained_run


@pytest.mark.multirank
def test_export_refuses_the_run_folder_and_leaves_it_whole(trained, tmp_path):
    exp = copy_trained_run(trained, tmp_path)
    run = tmp_path / "run"
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    proc = run_cli(["export", "--cfg", str(exp), "--out", str(run), "--force"])
    assert proc.returncode == 2 and "is a run folder" in proc.stderr, proc.stderr[-2000:]
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before, "nothing in the run folder changed"
    assert (run / "checkpoints" / "step00000004" / MARKER).is_file()


@pytest.mark.multirank
def test_export_refuses_a_file_and_a_foreign_folder_unless_forced(trained, tmp_path):
    exp = write_experiment(tmp_path / "exp", TRAINED_SETTINGS, rows=120)
    shutil.copytree(trained / "run", exp.parent / "run")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    proc = run_cli(["export", "--cfg", str(exp), "--out", str(a_file)])
    assert proc.returncode == 2 and "is a file" in proc.stderr and a_file.read_text() == "mine"
    foreign = tmp_path / "papers"
    foreign.mkdir()
    (foreign / "draft.tex").write_text("keep me")
    proc = run_cli(["export", "--cfg", str(exp), "--out", str(foreign)])
    assert proc.returncode == 2 and "--force" in proc.stderr and sorted(os.listdir(foreign)) == ["draft.tex"]
    proc = run_cli(["export", "--cfg", str(exp), "--out", str(foreign), "--force"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (foreign / "draft.tex").read_text() == "keep me" and (foreign / "model.safetensors").is_file()


@pytest.mark.multirank
def test_export_into_the_current_folder_and_over_a_previous_export(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    exp = write_experiment(tmp_path / "exp", TRAINED_SETTINGS, rows=120)
    shutil.copytree(trained / "run", exp.parent / "run")
    here = tmp_path / "here"
    here.mkdir()
    proc = run_cli(["export", "--cfg", str(exp), "--out", "."], cwd=here)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not [p for p in os.listdir(tmp_path) + os.listdir(here) if p.startswith(".")], "no scratch left"
    (here / "stale.bin").write_text("left by an older export")
    record = json.loads((here / "bookgen_export.json").read_text())
    record["files"].append("stale.bin")
    (here / "bookgen_export.json").write_text(json.dumps(record))
    (here / "README.md").write_text("the user's own notes")
    proc = run_cli(["export", "--cfg", str(exp), "--checkpoint", str(exp.parent / "run/checkpoints/step00000002"),
                 "--out", str(here)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (here / "stale.bin").exists(), "a file of the previous export that this one does not write goes"
    assert (here / "README.md").read_text() == "the user's own notes", "a file the user added stays"
    assert json.loads((here / "bookgen_export.json").read_text())["checkpoint"].endswith("step00000002")
    AutoModelForCausalLM.from_pretrained(str(here))


@pytest.mark.multirank
def test_exported_files_follow_the_umask(trained, tmp_path):
    exp = write_experiment(tmp_path / "exp", TRAINED_SETTINGS, rows=120)
    shutil.copytree(trained / "run", exp.parent / "run")
    old = os.umask(0o022)
    try:
        assert main(["export", "--cfg", str(exp), "--out", str(tmp_path / "shared_model")]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "shared_model"
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}
    assert (tmp_path / "exp/run/resolved_config.yaml").stat().st_mode & 0o777 == 0o644


def test_an_export_killed_while_replacing_another_is_recognised_and_finished_by_the_next(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    import bookgen.checkpoint.export as export_mod
    from bookgen.data.tokenizer import train_bpe

    tok = train_bpe(["a small corpus about dragons and kings"] * 20, 300, ["<BOS>", "<EOS>", "<PAD>"])
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_head=1, n_embd=8, n_positions=16))
    monkeypatch.setattr(export_mod, "_source", lambda folder, adapter_only: export_mod.ModelSource(model, tok))
    checkpoint, out = tmp_path / "ckpt", tmp_path / "model"
    checkpoint.mkdir()
    export_mod.export(checkpoint, out)
    (out / "old_only.bin").write_text("a file only the previous export wrote")
    record = json.loads((out / "bookgen_export.json").read_text())
    (out / "bookgen_export.json").write_text(json.dumps(record | {"files": [*record["files"], "old_only.bin"]}))
    (out / "notes.md").write_text("the user's")

    moved = []
    real_replace = os.replace

    def dies_after_one_move(src, dst):  # type: ignore[no-untyped-def]
        if Path(dst).parent == out and Path(src).parent != out:  # an exported file moving in
            if moved:
                raise KeyboardInterrupt  # as a kill half-way through the moves
            moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(export_mod.os, "replace", dies_after_one_move)
    with pytest.raises(KeyboardInterrupt):
        export_mod.export(checkpoint, out)
    monkeypatch.setattr(export_mod.os, "replace", real_replace)
    half = json.loads((out / "bookgen_export.json").read_text())
    assert half["complete"] is False, "a half-replaced export never claims to be complete"
    assert "old_only.bin" in half["files"]
    export_mod.export(checkpoint, out)  # no --force needed: it is still a (previous) export
    done = json.loads((out / "bookgen_export.json").read_text())
    assert done["complete"] is True and not (out / "old_only.bin").exists()
    assert (out / "notes.md").read_text() == "the user's"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no scratch left"
    AutoModelForCausalLM.from_pretrained(str(out))


@pytest.mark.multirank
def test_export_refuses_any_folder_inside_a_run_however_spelled(trained, tmp_path):
    exp = copy_trained_run(trained, tmp_path)
    hf = tmp_path / "run/checkpoints/step00000004/hf"
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    for cwd, out in ((hf, "."), (hf, "../hf/"), (tmp_path, "run/checkpoints/step00000004/hf"),
                     (tmp_path, "run/notes/new"), (hf.parent, "../../checkpoints/x")):
        for force in ([], ["--force"]):
            proc = run_cli(["export", "--cfg", str(exp), "--out", out, *force], cwd=cwd)
            assert proc.returncode == 2 and "run folder or checkpoint" in proc.stderr, (out, proc.stderr[-2000:])
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before
    assert not (tmp_path / "run/notes").exists()
    launch(1, ["--cfg", str(exp), "--set", "train.max_steps=5"])  # the checkpoint still resumes


@pytest.mark.multirank
def test_export_force_never_replaces_a_file_it_did_not_write(trained, tmp_path):
    exp = copy_trained_run(trained, tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    (mine / "config.json").write_text('{"my": "own"}')
    proc = run_cli(["export", "--cfg", str(exp), "--out", str(mine), "--force"])
    assert proc.returncode == 2 and "config.json, which no bookgen export wrote" in proc.stderr, proc.stderr[-2000:]
    assert sorted(os.listdir(mine)) == ["config.json", "notes.txt"]
    assert (mine / "config.json").read_text() == '{"my": "own"}'


@pytest.mark.multirank
def test_export_into_a_read_only_folder_is_named(trained, tmp_path):
    base = world_readable_tmp(tmp_path)
    try:
        shutil.copytree(trained / "run", base / "run")
        exp = write_experiment(base, TRAINED_SETTINGS, rows=120)
        for path in [base, *base.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        for out in (locked, locked / "new"):
            proc = run_cli(["export", "--cfg", str(exp), "--out", str(out)], user=True)
            assert proc.returncode == 2 and f"cannot write into {locked}" in proc.stderr, proc.stderr[-2000:]
            assert "Traceback" not in proc.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.multirank
def test_the_printed_export_command_runs_as_printed(finished, tmp_path):
    import shlex

    shutil.copytree(finished / "run", tmp_path / "run")
    exp = write_experiment(tmp_path, FINISHED_SETTINGS | {"train.max_steps": FINISHED_STEPS + 1}, rows=120)
    # a list value: rich's markup used to swallow "[tensorboard]" from the printed line
    proc = run_cli(["train", "--cfg", str(exp), "--set", "eval.samples=0", "--set", "run.trackers=[tensorboard]"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("export it: "))
    command = shlex.split(line.removeprefix("export it: "))
    assert command[:4] == ["bookgen", "export", "--cfg", str(exp)] and "--set=eval.samples=0" in command
    assert "--set=run.trackers=[tensorboard]" in command
    out = run_cli(command[1:])
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run-hf" / "config.json").is_file()


@pytest.mark.multirank
@pytest.mark.parametrize("stage", [2, 3])
def test_export_loads_in_transformers_and_matches_engine_logits(tmp_path, stage):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    exp = write_experiment(tmp_path, {"train.max_steps": 3, "train.learning_rate": 3e-3, "deepspeed.zero_stage": stage,
                                      "deepspeed.config": str(REPO / f"ds_configs/zero{stage}.json")}, rows=120)
    launch(2, ["--cfg", str(exp)])
    out = tmp_path / "hf"
    launch(1, ["--mode", "export", "--cfg", str(exp), "--out", str(out)])
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    probe = tmp_path / "engine.pt"
    launch(2, [str(exp), str(probe)], program=REPO / "tests" / "engine_logits.py")
    engine = torch.load(probe, weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        logits = model(input_ids=engine["ids"]).logits
    assert torch.allclose(logits, engine["logits"], atol=1e-5)
    assert model.config.eos_token_id == tok.convert_tokens_to_ids("<EOS>")
    assert model.config.pad_token_id == tok.convert_tokens_to_ids("<PAD>")
    assert tok.bos_token == "<BOS>" and "<EOS>" in tok.get_added_vocab()
    gen = pipeline("text-generation", model=str(out), device="cpu")
    text = gen("<BOS> The story", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("<BOS> The story")


@pytest.mark.multirank
def test_export_in_shards_loads_the_same_and_a_reexport_in_one_file_removes_them(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    exp = copy_trained_run(trained, tmp_path)
    out = tmp_path / "hf"
    assert main(["export", "--cfg", str(exp), "--out", str(out), "--max-shard-size", "100KB"]) == 0
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        sharded = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
    assert main(["export", "--cfg", str(exp), "--out", str(out)]) == 0  # the default: one file
    assert sorted(p.name for p in out.glob("model*.safetensors*")) == ["model.safetensors"], "old shards removed"
    with torch.no_grad():
        whole = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
    assert torch.equal(sharded, whole)
    proc = run_cli(["export", "--cfg", str(exp), "--out", str(tmp_path / "x"), "--max-shard-size", "5 gigs"])
    assert proc.returncode == 2 and "--max-shard-size: '5 gigs' is not a size" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.multirank
def test_a_checkpoint_saved_before_the_mode_record_still_resumes_exports_and_generates(trained, tmp_path):
    """Checkpoints from before COMPLETE.json recorded the run's mode (full fine-tuning or LoRA) are read as
    they were: LoRA where hf/ holds an adapter config."""
    from bookgen.checkpoint.folder import read_mode

    exp = copy_trained_run(trained, tmp_path)
    for marker in (tmp_path / "run" / "checkpoints").glob(f"step*/{MARKER}"):
        record = json.loads(marker.read_text())
        assert record.pop("mode", None) in (None, {"lora": False, "base_left_out": False})
        marker.write_text(json.dumps(record))
    newest = sorted((tmp_path / "run" / "checkpoints").glob("step*"))[-1]
    assert not read_mode(newest).lora and read_mode(newest).base is None
    assert main(["export", "--cfg", str(exp), "--out", str(tmp_path / "hf")]) == 0
    proc = run_cli(["generate", "--cfg", str(exp), "--max-new-tokens", "4", "--num-return-sequences", "1",
                    "--out", str(tmp_path / "gen.jsonl")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    longer = f"train.max_steps={TRAINED_SETTINGS['train.max_steps'] + 1}"
    resumed = run_cli(["train", "--cfg", str(exp), "--set", longer])
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-2000:]

    lora = tmp_path / "lora" / "step00000002"  # an old LoRA checkpoint's files, as far as the mode goes
    (lora / "hf").mkdir(parents=True)
    (lora / "hf" / "adapter_config.json").write_text("{}")
    (lora / MARKER).write_text(json.dumps({k: record[k] for k in ("state", "zero_stage", "fingerprint", "model",
                                                                   "tokenizer")}))
    assert read_mode(lora).lora
