"""Building the model: special tokens on a pretrained model, activation checkpointing, FLOPs and MFU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from bookgen.config_io import load_config
from bookgen.data.batches import collate
from tests.helpers import REPO, load_experiment, run_cli, write_experiment
from tests.ranks import launch


def test_pretrained_model_gets_special_tokens_with_mean_rows_and_tied_head(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from bookgen.data.tokenizer import add_special_tokens, train_bpe
    from tests.helpers import model_for

    base_tok = train_bpe(["a story about a ship", "the ship sails"] * 20, 300, ["<|endoftext|>"])
    pretrained = GPT2LMHeadModel(GPT2Config(vocab_size=len(base_tok), n_layer=1, n_head=2, n_embd=16,
                                            n_positions=32))
    pretrained.save_pretrained(tmp_path / "pre")
    base_tok.save_pretrained(tmp_path / "pre")
    old = pretrained.transformer.wte.weight.detach().clone()
    cfg = load_config(write_experiment(tmp_path, {"model.name_or_path": "pre", "model.pad_to_multiple_of": 8}))
    tok = add_special_tokens(base_tok, cfg.tokenizer)
    model = model_for(cfg, tok)
    wte = model.transformer.wte.weight
    assert wte.shape[0] % 8 == 0 and wte.shape[0] >= len(tok) == len(old) + 3
    assert torch.equal(wte[: len(old)], old), "pretrained rows are kept"
    assert torch.allclose(wte[len(old) : len(tok)], old.mean(0).expand(3, -1)), "new rows start at the mean"
    assert model.lm_head.weight.data_ptr() == wte.data_ptr(), "LM head stays tied"
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tok.convert_tokens_to_ids("<BOS>"), tok.convert_tokens_to_ids("<EOS>"), tok.convert_tokens_to_ids("<PAD>"))
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<EOS>")
    # from_pretrained hands the model over in eval mode: trained so, its dropout would stay off
    assert all(module.training for module in model.modules()), "a pretrained model trains in training mode"


def _saved_activation_bytes_loss_and_grads(model, batch):
    """Bytes autograd keeps for the backward pass of one forward, then the loss and the gradients."""
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    model.zero_grad()
    torch.manual_seed(3)  # the same dropout masks for both models
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    return saved, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_keeps_less_and_gives_the_same_loss_and_gradients(tmp_path):
    from bookgen.data.tokenizer import add_special_tokens, train_bpe
    from tests.helpers import model_for

    tok = train_bpe(["a story about a ship", "the ship sails far"] * 20, 300, ["<|endoftext|>"])
    batch = collate([np.arange(5, 5 + n) for n in (40, 33)], pad_id=0)
    runs = {}
    for on in (False, True):
        # dropout on: recomputation must draw the same masks as the first forward
        cfg = load_experiment(tmp_path / str(on), **{"model.activation_checkpointing": on, "model.dropout": 0.1,
                                          "model.n_layer": 4})
        model = model_for(cfg, add_special_tokens(tok, cfg.tokenizer)).train()
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) is on
        runs[on] = _saved_activation_bytes_loss_and_grads(model, batch)
    (plain_bytes, plain_loss, plain_grads), (ckpt_bytes, ckpt_loss, ckpt_grads) = runs[False], runs[True]
    # only the embeddings, the final norm, the head and each block's input remain
    assert ckpt_bytes < plain_bytes / 3, (ckpt_bytes, plain_bytes)
    assert torch.equal(ckpt_loss, plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_flops_count_gpt2_small_by_hand_and_survive_zero3_partitioning():
    from transformers import GPT2Config, GPT2LMHeadModel

    from bookgen.model.flops import flops_per_token, matmul_params

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 12 layers x 768, vocabulary 50,257
    # per block: qkv 3d^2, attention out d^2, MLP 8d^2; the tied head 50,257 x 768; no position embeddings
    by_hand = 12 * 12 * 768**2 + 50257 * 768
    assert matmul_params(model) == by_hand
    assert flops_per_token(model, 1024) == 6 * by_hand + 12 * 12 * 768 * 1024
    for p in model.parameters():  # what ZeRO-3 leaves on a rank: an empty tensor and the real shape
        p.ds_shape = p.shape
        p.data = torch.empty(0, device="meta")
    assert matmul_params(model) == by_hand


def test_mfu_peak_is_known_only_for_listed_gpus_in_half_precision():
    from bookgen.model.flops import peak_flops, peak_for_name

    assert peak_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_for_name("NVIDIA H100 PCIe") == 756e12, "the PCIe card has its own, lower peak"
    assert peak_for_name("NVIDIA H200") == 989e12 and peak_for_name("NVIDIA L40S") == 362e12
    assert peak_for_name("Some Future GPU") is None
    assert peak_flops(torch.device("cpu"), "bf16") is None, "no MFU made up for a CPU"
    assert peak_flops(torch.device("cpu"), "fp32", override_tflops=2.0) == 2e12


@pytest.mark.multirank
def test_pretrained_local_model_folder_trains(tmp_path):
    """`model.name_or_path` with a local folder: the code path a hub id like `gpt2` takes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from bookgen.data.tokenizer import train_bpe

    text = (REPO / "data" / "sample" / "booksummaries.txt").read_text().splitlines()[:100]
    tok = train_bpe([line.split("\t")[6] for line in text], 400, ["<|endoftext|>"])
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=64)).save_pretrained(
        tmp_path / "pre")
    tok.save_pretrained(tmp_path / "pre")
    exp = write_experiment(tmp_path, {"model.name_or_path": "pre", "train.max_steps": 2}, rows=120)
    proc = launch(1, ["--cfg", str(exp)])
    # the tests' experiment sets the tiny GPT-2's width and positions, which a pretrained model does not take
    assert "model.n_embd, model.n_positions shape the built-in GPT-2 only and are ignored" in proc.stderr
    saved = yaml.safe_load((tmp_path / "run" / "resolved_config.yaml").read_text())
    assert saved["model"]["name_or_path"] == str(tmp_path / "pre")
    hf = json.loads(next((tmp_path / "run" / "checkpoints").glob("step*/hf/config.json")).read_text())
    assert hf["vocab_size"] == len(tok) + 3 and hf["n_layer"] == 1

    # a base copied half-way: ZeRO-3 reads the files itself, and names the file before any rank reads a byte
    weights = tmp_path / "pre" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    exp = write_experiment(tmp_path / "z3", {"model.name_or_path": str(tmp_path / "pre"), "train.max_steps": 2,
                                             "deepspeed.zero_stage": 3,
                                             "deepspeed.config": str(REPO / "ds_configs/zero3.json")}, rows=120)
    proc = launch(1, ["--cfg", str(exp)], check=False)
    assert proc.returncode != 0 and f"{weights}: truncated" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.multirank
def test_pretrained_model_with_too_few_positions_is_refused_before_prepare(trained, tmp_path):
    exp = write_experiment(tmp_path, {"model.name_or_path": str(trained / "export"), "data.block_size": 128})
    proc = run_cli(["train", "--cfg", str(exp)])
    assert proc.returncode == 2 and "data.block_size: 128 is more than the 64 positions" in proc.stderr
    assert not (tmp_path / "run/prepared").exists()


@pytest.mark.multirank
@pytest.mark.parametrize("source", ["config", "pretrained", "hub"])
def test_zero3_creates_the_model_partitioned_with_the_unsharded_weights(tmp_path, source):
    """Under ZeRO-3 each rank holds about half the weights from the moment the model exists, and the gathered
    weights are the ones the unsharded build gives: a model from a config initialised the same, a pretrained
    one (bf16 in several safetensors shards) with its own rows and the new special tokens' rows at their mean
    (resized in partitions). A pretrained folder is read partition by partition: each rank reads about half
    the files' tensor bytes, and never more at once than one partition. A hub id is read the same way from the
    Hugging Face cache (offline here: a cache laid out as the hub writes it)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from bookgen.data.prepare import tokenizer_dir
    from bookgen.data.tokenizer import load_tokenizer, train_bpe
    from tests.helpers import model_for

    settings = {"deepspeed.zero_stage": 3, "deepspeed.config": str(REPO / "ds_configs/zero3.json")}
    env, pre = {}, tmp_path / "pre"
    if source == "hub":
        repo = tmp_path / "hub" / "models--bookgen-test--tiny"
        pre = repo / "snapshots" / ("0" * 40)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("0" * 40)
        env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    if source != "config":
        text = (REPO / "data" / "sample" / "booksummaries.txt").read_text().splitlines()[:100]
        tok = train_bpe([line.split("\t")[6] for line in text], 400, ["<|endoftext|>"])
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=64)
                        ).to(torch.bfloat16).save_pretrained(pre, max_shard_size="20KB")
        assert len(list(pre.glob("model-*.safetensors"))) > 2, "several shards"
        tok.save_pretrained(pre)
        settings["model.name_or_path"] = "bookgen-test/tiny" if source == "hub" else "pre"
    exp = write_experiment(tmp_path, settings, rows=120)
    out = tmp_path / "built.pt"
    launch(2, [str(exp), str(out)], program=REPO / "tests" / "zero3_build.py", env=env)
    sharded = torch.load(out)
    # the pretrained embeddings are created with the new tokens' rows, partitioned too
    assert sharded["held"]["whole"] == []
    assert sharded["held"]["local"] <= sharded["held"]["full"] // 2 + 1024, "about half each"
    if source != "config":
        from safetensors import safe_open

        stored = {}
        for shard in pre.glob("model-*.safetensors"):
            with safe_open(shard, "pt") as f:
                stored |= {k: f.get_slice(k).get_shape() for k in f.keys()}
        sizes = [2 * math.prod(shape) for shape in stored.values()]  # bf16
        read = sharded["read"]
        assert [r[2] for r in read] == [len(stored)] * 2, "every tensor, on each rank"
        assert sum(r[0] for r in read) == sum(sizes), "together the ranks read each byte once"
        assert all(r[0] <= 0.52 * sum(sizes) for r in read), "each about half"
        assert all(r[1] < 0.6 * max(sizes) for r in read), "never a whole tensor at once, a partition at most"
        assert sharded["gathers"] == 0, "created without initialisation: no parameter gathered whole to draw values"
    else:
        assert sharded["gathers"] > 0, "a model from a config is initialised module by module, gathered"

    cfg = load_config(exp)
    tokenizer = load_tokenizer(tokenizer_dir(cfg.prepared_dir))
    cfg.model.name_or_path = str(pre) if source == "hub" else cfg.model.name_or_path  # the same files
    unsharded = model_for(cfg, tokenizer)
    rng = torch.rand(3)
    expected = dict(unsharded.named_parameters())
    assert sharded["weights"].keys() == expected.keys()
    for name, weight in sharded["weights"].items():
        if source != "config" and name == "transformer.wte.weight":  # the new rows' mean: summed elsewise
            old_rows = len(tokenizer) - 3
            assert torch.equal(weight[:old_rows], expected[name][:old_rows].detach()), name
            assert torch.allclose(weight[old_rows:], expected[name][old_rows:].detach(), rtol=1e-6, atol=1e-7)
            continue
        assert torch.equal(weight, expected[name].detach()), name
    assert torch.equal(sharded["rng"], rng), "every rank continues from the same random state"
    if source != "config":
        embedding = sharded["weights"]["transformer.wte.weight"]
        old = len(tokenizer) - 3
        assert torch.allclose(embedding[old:], embedding[:old].mean(0).expand(3, -1))
