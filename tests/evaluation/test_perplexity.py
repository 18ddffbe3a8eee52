"""Perplexity: token-weighted over all ranks, every example counted once, the same for any world size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bookgen.data.batches import eval_shard
from bookgen.tracking.metrics_log import read_metrics
from tests.helpers import write_experiment
from tests.ranks import launch


@pytest.mark.multirank
def test_perplexity_is_the_same_for_any_world_size_and_matches_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # trained on concatenated blocks: evaluation still scores each summary on its own
    exp = write_experiment(tmp_path, {"train.max_steps": 6, "train.learning_rate": 3e-3, "eval.batch_size": 3,
                                      "data.packing": "concat"}, rows=130)
    launch(1, ["--cfg", str(exp)])
    results = {}
    for world in (1, 2, 3):
        launch(world, ["--mode", "eval", "--cfg", str(exp), "--split", "test"])
        results[world] = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert results[1]["split"] == "test" and results[1]["step"] == 6 and results[1]["examples"] == 13
    for world in (2, 3):
        assert results[world]["tokens"] == results[1]["tokens"]
        assert results[world]["perplexity"] == pytest.approx(results[1]["perplexity"], rel=1e-5)

    launch(1, ["--mode", "export", "--cfg", str(exp), "--out", str(tmp_path / "hf")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    nll, count = 0.0, 0
    with torch.no_grad():
        for line in (tmp_path / "run" / "prepared" / "test.txt").read_text().splitlines():
            ids = torch.tensor([tok(line, add_special_tokens=False)["input_ids"][:64]])
            loss = model(input_ids=ids, labels=ids).loss  # mean over the ids.shape[1] - 1 predictions
            nll += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert count == results[1]["tokens"]
    assert results[1]["perplexity"] == pytest.approx(float(np.exp(nll / count)), rel=1e-5)


def test_eval_shard_counts_every_example_once_longest_first():
    lengths = np.random.default_rng(0).integers(5, 500, size=11)
    for world in (1, 2, 3, 5):
        shards = [eval_shard(lengths, r, world) for r in range(world)]
        assert sorted(np.concatenate(shards).tolist()) == list(range(11))
        assert all((np.diff(lengths[shard]) <= 0).all() for shard in shards), "longest first"
    # batches of similar lengths: far less padding than in corpus order
    lengths = np.random.default_rng(1).lognormal(np.log(300), 1.0, size=400).clip(10, 1024).astype(int)

    def padding(order):
        batches = [lengths[order[i : i + 8]] for i in range(0, len(order), 8)]
        return sum(len(b) * b.max() - b.sum() for b in batches)

    assert padding(eval_shard(lengths, 0, 1)) < padding(np.arange(400)) / 5


@pytest.mark.multirank
def test_prompt_completion_runs_agree_across_zero_stages_and_score_completions_only(tmp_path):
    """CMU rows with the metadata prompt: ZeRO-0 and ZeRO-3 train alike on 2 ranks (documents packing), and
    the perplexity counts each test row's completion and <EOS> only, the same on 1 and 2 ranks and as plain
    transformers scores each row alone with its prompt masked."""
    from transformers import AutoModelForCausalLM

    from bookgen.config_io import load_config
    from bookgen.data.prepare import open_store
    from tests.helpers import REPO
    from tests.ranks import step_losses

    prompt = "Title: {title}\nAuthor: {author}\nGenres: {genres}\nSummary:"
    losses, exps = {}, {}
    for stage in (0, 3):
        exps[stage] = write_experiment(tmp_path / f"z{stage}", {
            "data.prompt": prompt, "data.packing": "documents", "data.block_size": 128, "model.n_positions": 128,
            "deepspeed.zero_stage": stage, "deepspeed.config": str(REPO / f"ds_configs/zero{stage}.json"),
            "train.max_steps": 3, "eval.at_end": False, "eval.samples": 0}, rows=130)
        launch(2, ["--cfg", str(exps[stage])])
        losses[stage] = step_losses(exps[stage].parent / "run")
    for step in (1, 2, 3):
        assert losses[3][step] == pytest.approx(losses[0][step], rel=1e-5), step

    exp = exps[0]
    results = {}
    for world in (1, 2):
        launch(world, ["--mode", "eval", "--cfg", str(exp), "--split", "test"])
        results[world] = json.loads((exp.parent / "run" / "eval_results.json").read_text())
    assert results[2]["tokens"] == results[1]["tokens"]
    assert results[2]["perplexity"] == pytest.approx(results[1]["perplexity"], rel=1e-5)

    launch(1, ["--mode", "export", "--cfg", str(exp), "--out", str(tmp_path / "hf")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    store = open_store(load_config(exp).prepared_dir, "test")
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(store)):
            ids = torch.tensor([store[i][:128].astype(np.int64)])
            labels = ids.clone()
            labels[0, : int(store.prompt_lengths[i])] = -100  # the prompt is no target
            n = int((labels[0, 1:] != -100).sum())
            if n:
                nll += float(model(input_ids=ids, labels=labels).loss) * n
                count += n
    assert count == results[1]["tokens"], "completion tokens and <EOS> only"
    assert count < int(sum(min(n, 128) - 1 for n in store.lengths)), "the prompts are left out"
    assert results[1]["perplexity"] == pytest.approx(float(np.exp(nll / count)), rel=1e-5)


@pytest.mark.multirank
def test_a_model_learns_from_the_prompt_what_the_completion_alone_cannot_tell(tmp_path):
    """The proof that prompts work: each completion repeats a name, a city and a number drawn at random per
    row, which only its prompt holds. Trained with the same budget, the model given the prompt reaches a far
    lower completion perplexity on held-out rows than the model trained on the completions alone (measured
    here after 300 steps: 1.10 against 2.82; 1.01 against 3.16 after 500. The test asks for less than half:
    copying from the prompt is learned or it is not), and its greedy completions of the held-out rows score a
    far higher ROUGE-L (measured: 0.99 against 0.52 for the other model's summary from <BOS>; the test asks
    for 0.2 more)."""
    import json

    from tests.helpers import write_experiment
    from tests.ranks import launch

    rng = np.random.default_rng(0)
    names = [f"{a}{b}" for a in ("Ka", "Lo", "Mi", "Ne", "Ru", "Sa", "Ti", "Vo") for b in ("ran", "mel", "dos", "fin")]
    cities = [f"{a}{b}" for a in ("Bor", "Cal", "Dun", "Fel", "Gar", "Hol", "Jen", "Kir")
              for b in ("ton", "ham", "ford")]
    rows = []
    for _ in range(600):
        name, city, number = rng.choice(names), rng.choice(cities), int(rng.integers(10, 60))
        rows.append({"name": name, "city": city, "number": number,
                     "text": f"{name} of {city} has {number} cats."})
    corpus = tmp_path / "facts.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ppl = {}
    for variant, prompt in (("prompt", "Name: {name}\nCity: {city}\nCats: {number}\nSummary:"), ("alone", None)):
        exp = write_experiment(tmp_path / variant, {
            "data.source": str(corpus), "data.prompt": prompt, "data.packing": "documents", "data.block_size": 64,
            "model.n_embd": 64, "model.n_head": 4, "model.n_layer": 2, "train.max_steps": 300,
            "train.learning_rate": 3e-3, "train.micro_batch_size": 16, "eval.at_end": True, "eval.samples": 0,
            "eval.batch_size": 32})
        launch(1, ["--cfg", str(exp)], timeout=600)
        ppl[variant] = json.loads((tmp_path / variant / "run" / "eval_results.json").read_text())["perplexity"]
    assert ppl["prompt"] < 0.5 * ppl["alone"], ppl
    scored = [r for r in read_metrics(tmp_path / "prompt" / "run" / "metrics.jsonl") if "rougeL" in r]
    assert scored and scored[-1]["scored_rows"] == 16
    alone = _rouge_from_the_begin_token(tmp_path / "alone", tmp_path / "prompt")
    assert scored[-1]["rougeL"] > alone["rougeL"] + 0.2, (scored[-1], alone)


def _rouge_from_the_begin_token(alone_run, prompt_run) -> dict[str, float]:
    """The completions-only model has no prompt to read: its greedy summary from <BOS> scored against the
    references of the rows the prompt run scored."""
    from bookgen.checkpoint.consolidate import load_checkpoint_model
    from bookgen.config import GenerateConfig
    from bookgen.config_io import load_config
    from bookgen.data.prepare import open_store
    from bookgen.generation.sampling import generate
    from bookgen.generation.scoring import rouge, scored_rows

    cfg = load_config(prompt_run / "exp.yaml")
    store = open_store(cfg.prepared_dir, "valid", verify=False)
    _, tokenizer = load_checkpoint_model(next((prompt_run / "run" / "checkpoints").glob("step*")))
    references = [tokenizer.decode(store[i][int(store.prompt_lengths[i]) : -1].tolist()).strip()
                  for i in scored_rows(store, 16)]
    model, alone_tokenizer = load_checkpoint_model(next((alone_run / "run" / "checkpoints").glob("step*")))
    text = generate(model, alone_tokenizer, [None], GenerateConfig(top_k=1, num_return_sequences=1,
                                                                  max_new_tokens=40), seed=0)[0].text
    return rouge([text] * len(references), references)


@pytest.mark.multirank
def test_a_prompt_run_resumes_keeps_its_best_checkpoint_by_rouge_and_exports(tmp_path):
    """The CPU twin of the conditional experiment, killed after step 5 and rerun: it resumes from step 4; each
    checkpoint records the ROUGE of its evaluation, checkpoint.best_by: rougeL keeps the highest through
    rotation; it trains on at another world size; the export loads in transformers and generates from rows."""
    from transformers import AutoModelForCausalLM

    from bookgen.checkpoint.folder import MARKER, best_complete, complete_checkpoints
    from bookgen.config_io import load_config
    from tests.helpers import REPO

    exp = tmp_path / "exp.yaml"
    text = (REPO / "experiments" / "tiny_conditional_cpu.yaml").read_text()
    for relative, absolute in (("../data/sample/", f"{REPO}/data/sample/"), ("../ds_configs/", f"{REPO}/ds_configs/"),
                               ("../runs/tiny_conditional_cpu", str(tmp_path / "run"))):
        text = text.replace(relative, absolute)
    exp.write_text(text)
    settings = ["--set", "train.max_steps=8", "--set", "eval.every=2", "--set", "checkpoint.every=2",
                "--set", "checkpoint.keep=1", "--set", "checkpoint.keep_best=true",
                "--set", "checkpoint.best_by=rougeL", "--set", "generate.max_new_tokens=24"]
    died = launch(1, ["--cfg", str(exp), *settings], env={"BOOKGEN_FAULT": "kill:5:0"}, check=False)
    assert died.returncode != 0
    proc = launch(1, ["--cfg", str(exp), *settings])
    assert "resumed from" in proc.stderr and "at step 4" in proc.stderr
    root = tmp_path / "run" / "checkpoints"
    kept = complete_checkpoints(root)
    scores = {p.name: json.loads((p / MARKER).read_text())["scores"]["rougeL"] for p in kept}
    best = best_complete(root, "rougeL")
    assert best is not None and scores[best.name] == max(scores.values()) and len(kept) <= 2
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"].startswith("<BOS> Title: ") for s in samples), "which book each is for"
    history = {r["step"]: r["rougeL"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "rougeL" in r}
    assert sorted(history) == [2, 4, 6, 8], "scored at every evaluation, once each"
    assert scores[best.name] == max(history.values()), "the best of all evaluations survives rotation"
    cfg = load_config(exp, [s for s in settings if s != "--set"])
    assert cfg.checkpoint.best_by == "rougeL"
    longer = [*settings, "--set", "train.max_steps=10", "--set", "eval.scored_sampling=true"]
    grown = launch(2, ["--cfg", str(exp), *longer])  # another world size: resharded, the prompts as before
    assert "resumed from" in grown.stderr and "at step 8" in grown.stderr, grown.stderr[-2000:]
    assert 10 in {r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "rougeL" in r}
    launch(1, ["--mode", "export", "--cfg", str(exp), "--checkpoint", "best", "--out", str(tmp_path / "hf"),
               *settings])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.vocab_size > 0

    # summaries of given books: rows with the template's fields, rendered as the run was trained
    books = tmp_path / "books.jsonl"
    books.write_text("".join(json.dumps(row) + "\n" for row in (
        {"title": "The Glass Garden", "author": "Anna Kowalski", "genres": ["Fantasy"],
         "summary": "A gardener grows a garden of glass."},
        {"title": "Under the Tide", "author": "Nora Marlow", "genres": "Mystery, Fiction"})))
    out = tmp_path / "gen.jsonl"
    launch(1, ["--mode", "generate", "--cfg", str(exp), "--checkpoint", "best", "--prompts", str(books),
               "--out", str(out), "--num-return-sequences", "2", *settings])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4 and records[0]["row"]["title"] == "The Glass Garden"
    assert records[0]["prompt"].startswith("<BOS> Title: The Glass Garden\nAuthor: Anna Kowalski\nGenres: Fantasy")
    quality = json.loads(out.with_name("gen.quality.json").read_text())
    assert quality["scored_rows"] == 1 and 0 <= quality["rougeL"] <= 1, "only the row with a summary is scored"
    bare = tmp_path / "bare.jsonl"
    proc = launch(1, ["--mode", "generate", "--model", str(tmp_path / "hf"), "--prompts", str(books),
                      "--prompt-template", "{title} by {writer}", "--out", str(bare)], check=False)
    assert proc.returncode == 2 and "has no field writer" in proc.stderr, proc.stderr[-2000:]
