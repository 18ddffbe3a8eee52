"""Nothing lost, every mistake named: what a careless user does to export, resume, generate and the config."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from bookgen.checkpoint.folder import MARKER
from bookgen.cli import main
from bookgen.train.metrics import read_metrics
from tests.helpers import REPO, write_experiment
from tests.ranks import launch, rank_env

STEPS = 4
SETTINGS = {"train.max_steps": STEPS, "checkpoint.every": 2, "checkpoint.keep": 2, "eval.at_end": False}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished single-rank run (checkpoints at steps 2 and 4) and its export, shared read-only: tests copy it."""
    folder = tmp_path_factory.mktemp("trained")
    exp = write_experiment(folder, SETTINGS, rows=120)
    launch(1, ["--cfg", str(exp)])
    assert main(["export", "--cfg", str(exp), "--out", str(folder / "export")]) == 0
    return folder


def _copy_run(trained: Path, tmp_path: Path, overrides: dict | None = None) -> Path:
    """An experiment in ``tmp_path`` whose run folder is a copy of the trained one."""
    shutil.copytree(trained / "run", tmp_path / "run")
    return write_experiment(tmp_path, SETTINGS | (overrides or {}), rows=120)


def _cli(args: list[str], cwd: Path | None = None, user: bool = False) -> subprocess.CompletedProcess[str]:
    """`bookgen ARGS` in a fresh process; ``user``: as an unprivileged user when this runs as root (root
    writes into read-only folders, so permission mistakes only show as another user)."""
    cmd = [sys.executable, "-m", "bookgen.cli", *args]
    env = rank_env({"PYTHONPATH": str(REPO)})
    if user and os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        # a home of its own: DeepSpeed compiles its shared-memory op into ~/.cache on start, and a cache
        # that root wrote into is not writable for this user
        env["HOME"] = str(_home_of_nobody())
    return subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=300, env=env)


def _home_of_nobody() -> Path:
    home = Path("/tmp/bookgen-test-home-65534")
    if not home.is_dir():
        home.mkdir(mode=0o755)
        os.chown(home, 65534, 65534)
    return home


def _world_readable_tmp(tmp_path: Path) -> Path:
    """A folder another user can enter (pytest's own tmp folders are private to their owner)."""
    folder = Path("/tmp") / f"bookgen-test-{os.getpid()}-{tmp_path.name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    return folder


# --- export ---------------------------------------------------------------------------------------------

@pytest.mark.multirank
def test_export_refuses_the_run_folder_and_leaves_it_whole(trained, tmp_path):
    exp = _copy_run(trained, tmp_path)
    run = tmp_path / "run"
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    proc = _cli(["export", "--cfg", str(exp), "--out", str(run), "--force"])
    assert proc.returncode == 2 and "is a run folder" in proc.stderr, proc.stderr[-2000:]
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before, "nothing in the run folder changed"
    assert (run / "checkpoints" / "step00000004" / MARKER).is_file()


@pytest.mark.multirank
def test_export_refuses_a_file_and_a_foreign_folder_unless_forced(trained, tmp_path):
    exp = write_experiment(tmp_path / "exp", SETTINGS, rows=120)
    shutil.copytree(trained / "run", exp.parent / "run")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    proc = _cli(["export", "--cfg", str(exp), "--out", str(a_file)])
    assert proc.returncode == 2 and "is a file" in proc.stderr and a_file.read_text() == "mine"
    foreign = tmp_path / "papers"
    foreign.mkdir()
    (foreign / "draft.tex").write_text("keep me")
    proc = _cli(["export", "--cfg", str(exp), "--out", str(foreign)])
    assert proc.returncode == 2 and "--force" in proc.stderr and sorted(os.listdir(foreign)) == ["draft.tex"]
    proc = _cli(["export", "--cfg", str(exp), "--out", str(foreign), "--force"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (foreign / "draft.tex").read_text() == "keep me" and (foreign / "model.safetensors").is_file()


@pytest.mark.multirank
def test_export_into_the_current_folder_and_over_a_previous_export(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    exp = write_experiment(tmp_path / "exp", SETTINGS, rows=120)
    shutil.copytree(trained / "run", exp.parent / "run")
    here = tmp_path / "here"
    here.mkdir()
    proc = _cli(["export", "--cfg", str(exp), "--out", "."], cwd=here)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not [p for p in os.listdir(tmp_path) + os.listdir(here) if p.startswith(".")], "no scratch left"
    (here / "stale.bin").write_text("left by an older export")
    record = json.loads((here / "bookgen_export.json").read_text())
    record["files"].append("stale.bin")
    (here / "bookgen_export.json").write_text(json.dumps(record))
    (here / "README.md").write_text("the user's own notes")
    proc = _cli(["export", "--cfg", str(exp), "--checkpoint", str(exp.parent / "run/checkpoints/step00000002"),
                 "--out", str(here)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (here / "stale.bin").exists(), "a file of the previous export that this one does not write goes"
    assert (here / "README.md").read_text() == "the user's own notes", "a file the user added stays"
    assert json.loads((here / "bookgen_export.json").read_text())["checkpoint"].endswith("step00000002")
    AutoModelForCausalLM.from_pretrained(str(here))


@pytest.mark.multirank
def test_exported_files_follow_the_umask(trained, tmp_path):
    exp = write_experiment(tmp_path / "exp", SETTINGS, rows=120)
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


# --- resume and checkpoints -----------------------------------------------------------------------------

@pytest.mark.multirank
def test_rerunning_a_finished_run_keeps_its_checkpoint(trained, tmp_path):
    exp = _copy_run(trained, tmp_path)
    final = tmp_path / "run/checkpoints/step00000004"
    stamp = (final / MARKER).stat().st_mtime_ns
    # a kill inside a save of step 4 would, before, have left no checkpoint at all
    proc = launch(1, ["--cfg", str(exp)], env={"BOOKGEN_FAULT": "kill_in_save:4"}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (final / MARKER).stat().st_mtime_ns == stamp, "the complete final checkpoint was not saved again"
    assert "is a finished run (step 4 of 4): nothing was changed" in proc.stderr


@pytest.mark.multirank
def test_resume_with_another_global_batch_maps_the_position_by_samples(tmp_path):
    # 84 training examples: 42 steps an epoch at micro-batch 2, 21 at micro-batch 4
    exp = write_experiment(tmp_path, {"train.epochs": 1, "train.max_steps": None, "checkpoint.every": 10,
                                      "eval.at_end": False}, rows=120)
    killed = launch(1, ["--cfg", str(exp)], env={"BOOKGEN_FAULT": "kill:11"}, check=False)
    assert killed.returncode != 0
    again = launch(1, ["--cfg", str(exp), "--set", "train.micro_batch_size=4"])
    assert "saved with a global batch of 2, this run's is 4" in again.stderr
    assert "at step 5 (epoch 0, step 5 of the epoch)" in again.stderr, again.stderr[-2000:]
    steps = [r["step"] for r in read_metrics(tmp_path / "run/metrics.jsonl") if "loss" in r]
    # the log keeps the 5 steps before the resume point; 20 samples + 16 steps x 4 = the epoch's 84, once
    assert steps == list(range(1, 22))


@pytest.mark.multirank
def test_truncated_checkpoint_file_is_named_with_the_previous_checkpoint(trained, tmp_path):
    exp = _copy_run(trained, tmp_path, {"train.max_steps": 6})
    damaged = tmp_path / "run/checkpoints/step00000004/mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    proc = launch(1, ["--cfg", str(exp)], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(damaged) in proc.stderr and "step00000002" in proc.stderr
    assert "checkpoint.resume=" in proc.stderr
    # the hint's first way: the damaged checkpoint moved out, the same command resumes from step 2 and saves
    # step 4 anew (before, resuming from step 2 reached step 4 and kept the damaged copy as the newest)
    shutil.move(damaged.parent, tmp_path / "damaged_step4")
    again = launch(1, ["--cfg", str(exp)])
    assert "at step 2 (epoch" in again.stderr, again.stderr[-2000:]
    assert (tmp_path / "run/checkpoints/step00000004" / MARKER).is_file()
    assert main(["eval", "--cfg", str(exp), "--split", "valid"]) == 0


@pytest.mark.multirank
def test_a_new_run_never_meets_another_runs_checkpoints(trained, tmp_path):
    """`checkpoint.resume: never` (or a named checkpoint) in a run folder that holds other complete checkpoints
    is refused before anything is written. Before, the new run's save at a step the old run had saved kept the
    old weights, and an export of the 'finished' run held the earlier run's model."""
    exp = _copy_run(trained, tmp_path)
    run = tmp_path / "run"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    fresh = launch(1, ["--cfg", str(exp), "--set", "checkpoint.resume=never"], check=False)
    assert fresh.returncode == 2, fresh.stderr[-2000:]
    assert f"{run / 'checkpoints'} holds complete checkpoints from an earlier run" in fresh.stderr
    assert "step00000002, step00000004" in fresh.stderr and "run.output_dir" in fresh.stderr
    older = launch(1, ["--cfg", str(exp), "--set", f"checkpoint.resume={run / 'checkpoints/step00000002'}"],
                   check=False)
    assert older.returncode == 2, older.stderr[-2000:]
    assert "newer than step00000002, the checkpoint this run resumes from (step00000004)" in older.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before, "nothing was touched"
    # the ways out that the message names: another output folder (from scratch, or from the named checkpoint)
    elsewhere = launch(1, ["--cfg", str(exp), "--set", "checkpoint.resume=never",
                           "--set", f"run.output_dir={tmp_path / 'run2'}"])
    assert "resumed from" not in elsewhere.stderr
    branch = launch(1, ["--cfg", str(exp), "--set", f"checkpoint.resume={run / 'checkpoints/step00000002'}",
                        "--set", f"run.output_dir={tmp_path / 'run3'}"])
    assert "at step 2 (epoch" in branch.stderr, branch.stderr[-2000:]
    assert (tmp_path / "run3/checkpoints/step00000004" / MARKER).is_file()


@pytest.mark.multirank
def test_non_finite_loss_stops_the_run_before_it_saves(tmp_path):
    exp = write_experiment(tmp_path, {"train.learning_rate": 1e30, "train.max_steps": 6, "checkpoint.every": 1},
                           rows=120)
    proc = launch(1, ["--cfg", str(exp)], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the training loss is" in proc.stderr and "stopped without saving" in proc.stderr
    losses = [r["loss"] for r in read_metrics(tmp_path / "run/metrics.jsonl") if "loss" in r]
    bad_step = next(i for i, loss in enumerate(losses, start=1) if loss != loss or abs(loss) == float("inf"))
    saved = sorted(p.name for p in (tmp_path / "run/checkpoints").glob("step*"))
    assert saved and all(int(name[4:]) < bad_step for name in saved), (saved, bad_step)


@pytest.mark.multirank
def test_read_only_checkpoint_folder_is_refused_before_training(tmp_path):
    base = _world_readable_tmp(tmp_path)
    try:
        exp = write_experiment(base, {"train.max_steps": 2}, rows=120)
        (base / "run" / "checkpoints").mkdir(parents=True)
        for folder in (base / "run", base):
            folder.chmod(0o777)
        (base / "run" / "checkpoints").chmod(0o555)
        proc = _cli(["train", "--cfg", str(exp)], user=True)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"cannot write into {base / 'run' / 'checkpoints'}" in proc.stderr
        assert not (base / "run" / "prepared").exists(), "refused before preparing or training anything"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_prepare_into_a_read_only_folder_is_named(tmp_path):
    base = _world_readable_tmp(tmp_path)
    try:
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        exp = write_experiment(base, {"data.prepared_dir": str(locked / "prepared")}, rows=60)
        proc = _cli(["prepare", "--cfg", str(exp)], user=True)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert f"Permission denied while preparing into {locked / 'prepared'} (data.prepared_dir" in proc.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- generate -------------------------------------------------------------------------------------------

@pytest.mark.multirank
def test_generate_never_writes_over_its_prompts_or_its_other_output(trained, tmp_path):
    model = trained / "export"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("<BOS> The king\n")
    proc = _cli(["generate", "--model", str(model), "--prompts", str(prompts), "--out",
                 str(tmp_path / "prompts.jsonl")])
    assert proc.returncode == 2 and "would overwrite the input" in proc.stderr
    assert prompts.read_text() == "<BOS> The king\n"
    proc = _cli(["generate", "--model", str(model), "--out", str(tmp_path / "samples.txt")])
    assert proc.returncode == 2 and ".jsonl" in proc.stderr and not (tmp_path / "samples.txt").exists()


@pytest.mark.multirank
def test_generate_settings_from_set_apply_without_an_experiment(trained, tmp_path):
    out = tmp_path / "g.jsonl"
    proc = _cli(["generate", "--model", str(trained / "export"), "--out", str(out), "--set",
                 "generate.max_new_tokens=3", "--set", "generate.num_return_sequences=2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["tokens"] <= 3 for r in rows)
    proc = _cli(["generate", "--model", str(trained / "export"), "--out", str(out), "--set", "nonsense=1"])
    assert proc.returncode == 2 and "--set nonsense=1" in proc.stderr


@pytest.mark.multirank
def test_generate_bad_prompt_files_and_long_prompts(trained, tmp_path):
    model = str(trained / "export")
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "<BOS> fine"}\n{"prompt": 5}\n')
    proc = _cli(["generate", "--model", model, "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")])
    assert proc.returncode == 2 and f"{bad}:2" in proc.stderr and "Traceback" not in proc.stderr
    latin = tmp_path / "latin.txt"
    latin.write_bytes("<BOS> caf\xe9\n".encode("latin-1"))
    proc = _cli(["generate", "--model", model, "--prompts", str(latin), "--out", str(tmp_path / "o.jsonl")])
    assert proc.returncode == 2 and "not UTF-8" in proc.stderr and str(latin) in proc.stderr
    long = tmp_path / "long.txt"
    long.write_text("<BOS> " + "the story goes on and on " * 40 + "\n")  # far beyond n_positions 64
    proc = _cli(["generate", "--model", model, "--prompts", str(long), "--out", str(tmp_path / "o.jsonl"),
                 "--max-new-tokens", "5", "--num-return-sequences", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the model sees at most 64" in proc.stderr
    assert json.loads((tmp_path / "o.jsonl").read_text())["tokens"] >= 1


@pytest.mark.multirank
def test_generate_into_a_read_only_folder_is_refused(trained, tmp_path):
    base = _world_readable_tmp(tmp_path)
    try:
        shutil.copytree(trained / "export", base / "model")
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        proc = _cli(["generate", "--model", str(base / "model"), "--out", str(locked / "g.jsonl")], user=True)
        assert proc.returncode == 2 and f"cannot write into {locked}" in proc.stderr, proc.stderr[-2000:]
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- input and config -----------------------------------------------------------------------------------

def test_cmu_file_with_a_malformed_first_row_is_still_cmu(tmp_path):
    from bookgen.data.sources import detect_format, open_corpus
    from bookgen.errors import CorpusError

    sample = (REPO / "data/sample/booksummaries.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    source = tmp_path / "booksummaries.txt"
    source.write_text("a stray line without tabs\n" + "".join(sample[:20]), encoding="utf-8")
    assert detect_format(source) == "cmu"
    with pytest.raises(CorpusError, match=r"booksummaries.txt:1: expected 7 tab-separated columns"):
        list(open_corpus(source, "cmu", skip_malformed=False, scratch=tmp_path).rows)
    assert len(list(open_corpus(source, "cmu", skip_malformed=True, scratch=tmp_path).rows)) == 20


def _archive(path: Path, member: str, data: bytes) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_archive_member_must_be_exact_and_truncated_archives_are_named(tmp_path):
    from bookgen.data.sources import extract_archive
    from bookgen.errors import CorpusError

    row = (REPO / "data/sample/booksummaries.txt").read_bytes().splitlines(keepends=True)[0]
    good = _archive(tmp_path / "good.tar.gz", "./booksummaries/booksummaries.txt", row)
    assert extract_archive(good, tmp_path / "x").read_bytes() == row
    evil = _archive(tmp_path / "evil.tar.gz", "../booksummaries/booksummaries.txt", row)
    with pytest.raises(CorpusError, match="has no member booksummaries/booksummaries.txt"):
        extract_archive(evil, tmp_path / "y")
    big = _archive(tmp_path / "big.tar.gz", "booksummaries/booksummaries.txt", os.urandom(200_000))
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(big.read_bytes()[:50_000])
    with pytest.raises(CorpusError, match="truncated.tar.gz: not a readable"):
        extract_archive(truncated, tmp_path / "z")
    assert gzip  # the archive is gzip-compressed, as the real one


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


@pytest.mark.multirank
def test_mistakes_that_need_no_data_are_reported_before_prepare(tmp_path):
    tiny = REPO / "experiments/tiny_cpu.yaml"
    out = tmp_path / "run"
    proc = _cli(["train", "--cfg", str(tiny), "--set", f"run.output_dir={out}", "--set", "deepspeed.zero_stage=3"])
    assert proc.returncode == 2
    assert f"--set deepspeed.config={REPO / 'ds_configs/zero3.json'}" in proc.stderr, proc.stderr[-2000:]
    assert not (out / "prepared").exists()
    exp = write_experiment(tmp_path / "resume", {"checkpoint.resume": "nowhere/step00000004"})
    proc = _cli(["train", "--cfg", str(exp)])
    assert proc.returncode == 2 and "nowhere/step00000004 does not exist" in proc.stderr
    assert not (tmp_path / "resume/run/prepared").exists()


@pytest.mark.multirank
def test_pretrained_model_with_too_few_positions_is_refused_before_prepare(trained, tmp_path):
    exp = write_experiment(tmp_path, {"model.name_or_path": str(trained / "export"), "data.block_size": 128})
    proc = _cli(["train", "--cfg", str(exp)])
    assert proc.returncode == 2 and "data.block_size: 128 is more than the 64 positions" in proc.stderr
    assert not (tmp_path / "run/prepared").exists()


def test_launcher_mode_without_a_value(tmp_path):
    exp = write_experiment(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "launcher/run.py"), "--cfg", str(exp), "--mode"],
                          capture_output=True, text=True, env=rank_env())
    assert proc.returncode == 2 and "--mode needs one of train, eval, generate" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dry_run_warns_that_other_nodes_cannot_reach_loopback(tmp_path, capsys):
    exp = write_experiment(tmp_path, {"launch.nodes": 2})
    assert main(["launch", "--cfg", str(exp), "--dry-run"]) == 0
    assert "other nodes cannot reach a loopback address" in capsys.readouterr().err
    exp = write_experiment(tmp_path / "ok", {"launch.nodes": 2, "launch.master_addr": "node1"})
    assert main(["launch", "--cfg", str(exp), "--dry-run"]) == 0
    assert "loopback" not in capsys.readouterr().err
    assert yaml  # experiments are YAML files


def test_an_export_killed_while_replacing_another_is_recognised_and_finished_by_the_next(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    import bookgen.checkpoint.export as export_mod
    from bookgen.data.tokenizer import train_bpe

    tok = train_bpe(["a small corpus about dragons and kings"] * 20, 300, ["<BOS>", "<EOS>", "<PAD>"])
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_head=1, n_embd=8, n_positions=16))
    monkeypatch.setattr(export_mod, "load_checkpoint_model", lambda folder: (model, tok))
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


def test_a_second_run_into_a_busy_run_folder_is_refused(tmp_path):
    """The same command started twice: the second stops before it prepares or writes anything, naming the
    run that holds the folder; once that run ends (here: its lock is let go) the folder is free again."""
    import fcntl

    from bookgen.train.run_lock import LOCK_NAME

    exp = write_experiment(tmp_path, {"train.max_steps": 1, "eval.at_end": False}, rows=60)
    run = tmp_path / "run"
    run.mkdir()
    with open(run / LOCK_NAME, "a+", encoding="utf-8") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere, since 2026-11-27 12:00:00\n")
        held.flush()
        proc = _cli(["train", "--cfg", str(exp)])
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"{run}: another bookgen run is training into this folder (pid 4242 on elsewhere" in proc.stderr
        files = [p for p in run.rglob("*") if p.is_file()]
        assert files == [run / LOCK_NAME], f"nothing prepared, logged or saved: {files}"
    assert _cli(["train", "--cfg", str(exp)]).returncode == 0
    assert (run / "checkpoints/step00000001" / MARKER).is_file()


@pytest.mark.multirank
def test_two_runs_of_the_same_command_do_not_share_a_folder(tmp_path):
    from bookgen.train.loop import STOP_FILE

    exp = write_experiment(tmp_path, {"train.max_steps": 10**6, "checkpoint.every": 10**6, "eval.at_end": False},
                           rows=120)
    first = subprocess.Popen([sys.executable, "-m", "bookgen.cli", "train", "--cfg", str(exp)], cwd=REPO,
                             env=rank_env({"PYTHONPATH": str(REPO)}), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    try:
        for _ in range(1200):  # the first run is training once it logs
            if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0:
                break
            assert first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.1)
        second = _cli(["train", "--cfg", str(exp)])
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"another bookgen run is training into this folder (pid {first.pid} on " in second.stderr
    finally:
        (run / STOP_FILE).touch()  # the first run saves and stops, as under Slurm's time-limit warning
        _, err = first.communicate(timeout=600)
    assert first.returncode == 75, err[-2000:]
    saved = [p.name for p in (run / "checkpoints").glob("step*") if (p / MARKER).is_file()]
    assert len(saved) == 1, f"one run saved one checkpoint: {saved}"


@pytest.mark.multirank
def test_a_checkpoint_is_not_resumed_or_evaluated_on_another_vocabulary(trained, tmp_path):
    """The corpus edited after training: the BPE trained from the config is trained anew, and before, the
    run resumed (and `bookgen eval` scored) the old weights on token ids that mean other words."""
    shutil.copytree(trained / "run", tmp_path / "run")
    exp = write_experiment(tmp_path, SETTINGS | {"train.max_steps": 6}, rows=80)  # 40 summaries fewer
    marker = tmp_path / "run/checkpoints/step00000004" / MARKER
    stamp = marker.stat().st_mtime_ns
    proc = launch(1, ["--cfg", str(exp)], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "step00000004 was trained with another vocabulary than" in proc.stderr
    assert marker.stat().st_mtime_ns == stamp and not (tmp_path / "run/checkpoints/step00000006").exists()
    for command in (["eval", "--cfg", str(exp)], ["samples", "--cfg", str(exp)]):
        refused = _cli(command)
        assert refused.returncode == 2 and "was trained with another vocabulary" in refused.stderr, refused.stderr
    # generation reads the checkpoint's own tokenizer: it works, leaving out what needs the prepared ids
    out = tmp_path / "gen.jsonl"
    made = _cli(["generate", "--cfg", str(exp), "--out", str(out), "--set", "generate.max_new_tokens=5"])
    assert made.returncode == 0, made.stderr[-2000:]
    assert "novelty and the reference lengths are left out" in made.stderr


@pytest.mark.multirank
def test_a_changed_training_split_resumes_only_at_an_epochs_end(trained, tmp_path):
    """The same vocabulary (a fixed tokenizer) over an edited corpus, or another seed: a mid-epoch position
    would point into another order of summaries, so only a checkpoint saved at an epoch's end goes on."""
    fixed = {"tokenizer.name_or_path": str(trained / "run/prepared/tokenizer"), "eval.at_end": False,
             "data.split": "reference"}  # a split that does not follow the seed: a seed change is an order change
    mid = write_experiment(tmp_path / "mid", fixed | {"train.max_steps": 3, "checkpoint.every": 3}, rows=120)
    launch(1, ["--cfg", str(mid)])
    seed = launch(1, ["--cfg", str(mid), "--set", "seed=8", "--set", "train.max_steps=6"], check=False)
    assert seed.returncode == 2, seed.stderr[-2000:]
    assert "saved in the middle of an epoch, and seed (7 then, 8 now) differ" in seed.stderr
    grouped = launch(1, ["--cfg", str(mid), "--set", "data.group_by_length=true", "--set", "train.max_steps=6"],
                     check=False)
    assert grouped.returncode == 2, grouped.stderr[-2000:]
    assert "data.group_by_length (False then, True now) differ" in grouped.stderr
    mid = write_experiment(tmp_path / "mid", fixed | {"train.max_steps": 6, "checkpoint.every": 3}, rows=100)
    proc = launch(1, ["--cfg", str(mid)], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "saved in the middle of an epoch, and the training split" in proc.stderr
    # 84 training summaries, 42 steps: the first run ends at its epoch's end
    end = write_experiment(tmp_path / "end", fixed | {"train.max_steps": None, "train.epochs": 1}, rows=120)
    launch(1, ["--cfg", str(end)])
    end = write_experiment(tmp_path / "end", fixed | {"train.max_steps": None, "train.epochs": 2}, rows=100)
    again = launch(1, ["--cfg", str(end)])
    assert "was saved at an epoch's end; the training split" in again.stderr, again.stderr[-2000:]
    assert "(epoch 1, step 0 of the epoch)" in again.stderr, again.stderr[-2000:]


# --- issue 31: export -----------------------------------------------------------------------------------

@pytest.mark.multirank
def test_export_refuses_any_folder_inside_a_run_however_spelled(trained, tmp_path):
    exp = _copy_run(trained, tmp_path)
    hf = tmp_path / "run/checkpoints/step00000004/hf"
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    for cwd, out in ((hf, "."), (hf, "../hf/"), (tmp_path, "run/checkpoints/step00000004/hf"),
                     (tmp_path, "run/notes/new"), (hf.parent, "../../checkpoints/x")):
        for force in ([], ["--force"]):
            proc = _cli(["export", "--cfg", str(exp), "--out", out, *force], cwd=cwd)
            assert proc.returncode == 2 and "run folder or checkpoint" in proc.stderr, (out, proc.stderr[-2000:])
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before
    assert not (tmp_path / "run/notes").exists()
    launch(1, ["--cfg", str(exp), "--set", "train.max_steps=5"])  # the checkpoint still resumes


@pytest.mark.multirank
def test_export_force_never_replaces_a_file_it_did_not_write(trained, tmp_path):
    exp = _copy_run(trained, tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    (mine / "config.json").write_text('{"my": "own"}')
    proc = _cli(["export", "--cfg", str(exp), "--out", str(mine), "--force"])
    assert proc.returncode == 2 and "config.json, which no bookgen export wrote" in proc.stderr, proc.stderr[-2000:]
    assert sorted(os.listdir(mine)) == ["config.json", "notes.txt"]
    assert (mine / "config.json").read_text() == '{"my": "own"}'


@pytest.mark.multirank
def test_export_into_a_read_only_folder_is_named(trained, tmp_path):
    base = _world_readable_tmp(tmp_path)
    try:
        shutil.copytree(trained / "run", base / "run")
        exp = write_experiment(base, SETTINGS, rows=120)
        for path in [base, *base.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        for out in (locked, locked / "new"):
            proc = _cli(["export", "--cfg", str(exp), "--out", str(out)], user=True)
            assert proc.returncode == 2 and f"cannot write into {locked}" in proc.stderr, proc.stderr[-2000:]
            assert "Traceback" not in proc.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- issue 31: what the command line and the YAML accept ------------------------------------------------

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


def test_generate_flags_go_through_the_configs_validation(tmp_path, capsys):
    model = tmp_path / "no-model-needed"  # refused before any model is looked at
    for flags, message in ((["--temperature", "inf"], "--temperature (generate.temperature): must be a finite"),
                           (["--repetition-penalty", "inf"], "--repetition-penalty (generate.repetition_penalty)"),
                           (["--top-p", "nan"], "--top-p (generate.top_p): must be a finite"),
                           (["--seed", "-1"], "--seed (generate.seed): must be in [0, 2**63)")):
        assert main(["generate", "--model", str(model), *flags]) == 2
        assert message in capsys.readouterr().err.replace("\n", "")
    assert main(["generate", "--model", str(model), "--prompts", str(tmp_path)]) == 2
    assert f"--prompts: {tmp_path} is a folder" in capsys.readouterr().err.replace("\n", "")


def test_deepspeed_launch_on_several_nodes_needs_a_hostfile(tmp_path, capsys):
    exp = write_experiment(tmp_path, {"launch.nodes": 2, "launch.backend": "deepspeed",
                                      "launch.master_addr": "node1"})
    assert main(["launch", "--cfg", str(exp), "--dry-run"]) == 2
    assert "launch.hostfile: the deepspeed launcher needs a hostfile to start 2 nodes" in capsys.readouterr().err
    exp = write_experiment(tmp_path, {"launch.nodes": 2, "launch.backend": "deepspeed", "launch.hostfile": "hosts",
                                      "launch.master_addr": "node1"})
    assert main(["launch", "--cfg", str(exp), "--dry-run"]) == 2
    assert f"launch.hostfile: {tmp_path / 'hosts'} does not exist" in capsys.readouterr().err.replace("\n", "")
    (tmp_path / "hosts").write_text("node1 slots=1\nnode2 slots=1\n")
    assert main(["launch", "--cfg", str(exp), "--dry-run"]) == 0
    assert f"--hostfile {tmp_path / 'hosts'}" in capsys.readouterr().out


@pytest.mark.multirank
def test_generate_side_files_never_replace_a_users_file(trained, tmp_path):
    model = str(trained / "export")
    flags = ["--max-new-tokens", "3", "--num-return-sequences", "1"]
    (tmp_path / "mynotes.txt").write_text("my notes")
    (tmp_path / "report.quality.json").write_text('{"mine": 1}')
    for out, theirs in (("mynotes.jsonl", "mynotes.txt"), ("report.jsonl", "report.quality.json")):
        proc = _cli(["generate", "--model", model, "--out", str(tmp_path / out), *flags])
        assert proc.returncode == 2 and f"{tmp_path / theirs} exists and was not written by bookgen generate" in \
            proc.stderr.replace("\n", ""), proc.stderr[-2000:]
        assert not (tmp_path / out).exists()
    assert (tmp_path / "mynotes.txt").read_text() == "my notes"
    assert (tmp_path / "report.quality.json").read_text() == '{"mine": 1}'
    # generate's own files are replaced by the next run; a user's file only when named with --force
    for _ in range(2):
        proc = _cli(["generate", "--model", model, "--out", str(tmp_path / "gen.jsonl"), *flags])
        assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _cli(["generate", "--model", model, "--out", str(tmp_path / "mynotes.jsonl"), "--force", *flags])
    assert proc.returncode == 0 and (tmp_path / "mynotes.txt").read_text().startswith("=== GENERATED SEQUENCE 1")
