"""`bookgen generate`: its files, prompts split over ranks, and never writing over what it did not write."""

from __future__ import annotations

import json
import shutil

import pytest

from bookgen.cli import main
from tests.helpers import run_cli, world_readable_tmp
from tests.ranks import launch

PROMPTS = ["<BOS>", "<BOS> The story is set in a mining town", "<BOS> In the end", "<BOS> Anna"]


def test_cli_writes_jsonl_and_reference_text(tmp_path, model_dir):
    from bookgen.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
                 "--num-return-sequences", "2", "--max-new-tokens", "12", "--seed", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(i, j) for i in range(4) for j in range(2)]
    assert all(set(r) == {"prompt_index", "sample_index", "prompt", "text", "tokens", "stopped"} for r in rows)
    assert rows[2]["prompt"] == PROMPTS[1] and all(r["stopped"] in ("eos", "length") for r in rows)
    text = out.with_suffix(".txt").read_text()
    assert text.startswith("=== GENERATED SEQUENCE 1 ===\n<BOS>") and "=== GENERATED SEQUENCE 8 ===" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model"], "/nonexistent/model is not a model folder"),
        (["--top-k", "0"], "--top-k (generate.top_k): must be >= 1, got 0"),
        (["--top-p", "1.5"], "--top-p (generate.top_p): must be in (0, 1], got 1.5"),
        (["--top-p", "0"], "--top-p (generate.top_p): must be in (0, 1]"),
        (["--prompts", "EMPTY"], "holds no prompt"),
        (["--prompt", "  "], "an empty prompt was given"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, model_dir, capsys, args, message):
    from bookgen.cli import main

    (tmp_path / "empty.txt").write_text("\n\n")
    args = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in args]
    if "--model" not in args:
        args = ["--model", str(model_dir), *args]
    assert main(["generate", *args, "--out", str(tmp_path / "o.jsonl")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.multirank
def test_prompts_split_over_ranks_and_gathered_in_order(tmp_path, model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 2) + "\n")
    outputs = []
    for world in (1, 2):
        out = tmp_path / f"gen{world}.jsonl"
        launch(world, ["--mode", "generate", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
                       "--num-return-sequences", "2", "--max-new-tokens", "10", "--seed", "9"])
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1], "same samples, same order, whatever the number of ranks"
    assert len(outputs[0].splitlines()) == 16


@pytest.mark.multirank
def test_generate_never_writes_over_its_prompts_or_its_other_output(trained, tmp_path):
    model = trained / "export"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("<BOS> The king\n")
    proc = run_cli(["generate", "--model", str(model), "--prompts", str(prompts), "--out",
                 str(tmp_path / "prompts.jsonl")])
    assert proc.returncode == 2 and "would overwrite the input" in proc.stderr
    assert prompts.read_text() == "<BOS> The king\n"
    proc = run_cli(["generate", "--model", str(model), "--out", str(tmp_path / "samples.txt")])
    assert proc.returncode == 2 and ".jsonl" in proc.stderr and not (tmp_path / "samples.txt").exists()


@pytest.mark.multirank
def test_generate_settings_from_set_apply_without_an_experiment(trained, tmp_path):
    out = tmp_path / "g.jsonl"
    proc = run_cli(["generate", "--model", str(trained / "export"), "--out", str(out), "--set",
                 "generate.max_new_tokens=3", "--set", "generate.num_return_sequences=2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["tokens"] <= 3 for r in rows)
    proc = run_cli(["generate", "--model", str(trained / "export"), "--out", str(out), "--set", "nonsense=1"])
    assert proc.returncode == 2 and "--set nonsense=1" in proc.stderr


@pytest.mark.multirank
def test_generate_bad_prompt_files_and_long_prompts(trained, tmp_path):
    model = str(trained / "export")
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "<BOS> fine"}\n{"prompt": 5}\n')
    proc = run_cli(["generate", "--model", model, "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")])
    assert proc.returncode == 2 and f"{bad}:2" in proc.stderr and "Traceback" not in proc.stderr
    latin = tmp_path / "latin.txt"
    latin.write_bytes("<BOS> caf\xe9\n".encode("latin-1"))
    proc = run_cli(["generate", "--model", model, "--prompts", str(latin), "--out", str(tmp_path / "o.jsonl")])
    assert proc.returncode == 2 and "not UTF-8" in proc.stderr and str(latin) in proc.stderr
    long = tmp_path / "long.txt"
    long.write_text("<BOS> " + "the story goes on and on " * 40 + "\n")  # far beyond n_positions 64
    proc = run_cli(["generate", "--model", model, "--prompts", str(long), "--out", str(tmp_path / "o.jsonl"),
                 "--max-new-tokens", "5", "--num-return-sequences", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the model sees at most 64" in proc.stderr
    assert json.loads((tmp_path / "o.jsonl").read_text())["tokens"] >= 1


@pytest.mark.multirank
def test_generate_into_a_read_only_folder_is_refused(trained, tmp_path):
    base = world_readable_tmp(tmp_path)
    try:
        shutil.copytree(trained / "export", base / "model")
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        proc = run_cli(["generate", "--model", str(base / "model"), "--out", str(locked / "g.jsonl")], user=True)
        assert proc.returncode == 2 and f"cannot write into {locked}" in proc.stderr, proc.stderr[-2000:]
    finally:
        shutil.rmtree(base, ignore_errors=True)


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


@pytest.mark.multirank
def test_generate_side_files_never_replace_a_users_file(trained, tmp_path):
    model = str(trained / "export")
    flags = ["--max-new-tokens", "3", "--num-return-sequences", "1"]
    (tmp_path / "mynotes.txt").write_text("my notes")
    (tmp_path / "report.quality.json").write_text('{"mine": 1}')
    for out, theirs in (("mynotes.jsonl", "mynotes.txt"), ("report.jsonl", "report.quality.json")):
        proc = run_cli(["generate", "--model", model, "--out", str(tmp_path / out), *flags])
        assert proc.returncode == 2 and f"{tmp_path / theirs} exists and was not written by bookgen generate" in \
            proc.stderr.replace("\n", ""), proc.stderr[-2000:]
        assert not (tmp_path / out).exists()
    assert (tmp_path / "mynotes.txt").read_text() == "my notes"
    assert (tmp_path / "report.quality.json").read_text() == '{"mine": 1}'
    # generate's own files are replaced by the next run; a user's file only when named with --force
    for _ in range(2):
        proc = run_cli(["generate", "--model", model, "--out", str(tmp_path / "gen.jsonl"), *flags])
        assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli(["generate", "--model", model, "--out", str(tmp_path / "mynotes.jsonl"), "--force", *flags])
    assert proc.returncode == 0 and (tmp_path / "mynotes.txt").read_text().startswith("=== GENERATED SEQUENCE 1")
