"""model.config: models of other causal-LM families built from a config train, agree across ZeRO stages,
export to a folder transformers loads, and sample; wrong mappings are named before any data is touched."""

from __future__ import annotations

import json
import math

import pytest

from bookgen.cli import main
from bookgen.config_io import load_config
from bookgen.errors import ConfigError
from tests.helpers import REPO, run_cli, write_experiment
from tests.ranks import launch, step_losses

BLOCK = 128
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": BLOCK}
QWEN2 = LLAMA | {"model_type": "qwen2"}


def _family_run(tmp_path, name: str, mapping: dict, stage: int):
    return write_experiment(tmp_path / name, {
        "model.config": mapping, "data.packing": "documents", "data.block_size": BLOCK, "train.max_steps": 4,
        "model.dropout": 0.1, "checkpoint.every": 2, "deepspeed.zero_stage": stage,
        "deepspeed.config": str(REPO / f"ds_configs/zero{stage}.json"), "eval.at_end": False}, rows=120)


@pytest.mark.multirank
@pytest.mark.parametrize("mapping", [LLAMA, QWEN2], ids=["llama", "qwen2"])
def test_a_family_from_its_config_trains_the_same_on_zero_0_and_3_resumes_and_exports(tmp_path, mapping):
    """The ZeRO-3 run is killed after step 3 and rerun: it resumes from step 2 (weights, optimizer, data position,
    dropout's RNG) and its steps 3-4 still match the uninterrupted ZeRO-0 run's (dropout 0.1: a resume that drew
    other masks would miss by far more than the tolerance)."""
    losses = {}
    for stage in (0, 3):
        exp = _family_run(tmp_path, f"z{stage}", mapping, stage)
        if stage == 3:
            died = launch(2, ["--cfg", str(exp)], env={"BOOKGEN_FAULT": "kill:3:1"}, check=False, timeout=180)
            assert died.returncode != 0
        proc = launch(2, ["--cfg", str(exp)])
        assert stage == 0 or "resumed from" in proc.stderr and "at step 2" in proc.stderr
        losses[stage] = step_losses(exp.parent / "run")
    vocab = json.loads((tmp_path / "z0/run/prepared/store/train/manifest.json").read_text())["vocab_size"]
    assert abs(losses[0][1] - math.log(vocab)) < 0.3, "a sane initialisation starts near ln(vocab)"
    assert sorted(losses[3]) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert losses[3][step] == pytest.approx(losses[0][step], rel=1e-5), step

    out = tmp_path / "export"
    assert main(["export", "--cfg", str(tmp_path / "z3/exp.yaml"), "--out", str(out)]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == mapping["model_type"] and model.config.vocab_size == vocab
    assert model.config.num_key_value_heads == 2, "the family's own settings are kept"
    proc = run_cli(["generate", "--model", str(out), "--max-new-tokens", "8", "--num-return-sequences", "2",
                    "--out", str(tmp_path / "gen.jsonl")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((tmp_path / "gen.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(("mapping", "message"), [
    ({"hidden_size": 32}, r"model.config: needs model_type"),
    ({"model_type": "llama", "vocab_size": 9}, r"model.config: vocab_size comes from the tokenizer"),
])
def test_a_wrong_model_config_is_named_when_loaded(tmp_path, mapping, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_experiment(tmp_path, {"model.config": mapping}))


def test_an_unknown_or_non_causal_family_and_too_few_positions_are_named_in_preflight(tmp_path):
    """The checks `bookgen train` runs before any data is touched (as for a pretrained model's positions)."""
    from bookgen.errors import BookgenError
    from tests.helpers import check_model_of as check_model

    for mapping, message in (
        ({"model_type": "lama"}, "model.config: model_type 'lama'"),
        ({"model_type": "t5"}, "model.config: model_type 't5' is not a causal language model"),
        (LLAMA | {"max_position_embeddings": 32}, "data.block_size: 64 is more than the 32 positions of model.config"),
    ):
        with pytest.raises(BookgenError, match=message):
            check_model(load_config(write_experiment(tmp_path, {"model.config": mapping})))


@pytest.mark.multirank
def test_a_pretrained_model_keeps_its_own_bos_and_eos_when_the_experiment_names_them(tmp_path):
    """tokenizer.bos_token/eos_token set to the model's own (<s>, </s>): they are not added again, only
    <PAD> is; the prepared lines start and end with the model's own ids."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from bookgen.data.tokenizer import train_bpe
    from bookgen.model.build import family_config

    text = (REPO / "data" / "sample" / "booksummaries.txt").read_text().splitlines()[:100]
    base = train_bpe([line.split("\t")[6] for line in text], 400, ["<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    AutoModelForCausalLM.from_config(family_config(LLAMA, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                                   eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path / "pre")
    tok.save_pretrained(tmp_path / "pre")
    exp = write_experiment(tmp_path, {"model.name_or_path": "pre", "tokenizer.bos_token": "<s>",
                                      "tokenizer.eos_token": "</s>", "train.max_steps": 2}, rows=120)
    launch(1, ["--cfg", str(exp)])
    hf = json.loads(next((tmp_path / "run" / "checkpoints").glob("step*/hf/config.json")).read_text())
    assert hf["vocab_size"] == len(tok) + 1, "only <PAD> is new"
    assert (hf["bos_token_id"], hf["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    from bookgen.data.store import TokenStore

    first = TokenStore.open(tmp_path / "run" / "prepared" / "store" / "train")[0]
    assert first[0] == tok.bos_token_id and first[-1] == tok.eos_token_id


@pytest.mark.parametrize(("mapping", "message"), [
    (LLAMA | {"hidden_sizee": 64}, r"model.config: hidden_sizee is not a llama setting \(did you mean hidden_size\?\)"),
    (LLAMA | {"num_attention_heads": 5}, r"model.config: model_type 'llama': The hidden size \(32\) is not a multiple"
                                         r" of the number of attention heads \(5\)"),
])
def test_a_typo_or_an_invalid_shape_in_model_config_is_named_before_anything_is_built(tmp_path, mapping, message):
    """A misspelt key used to pass silently, and the family's defaults built a 7B Llama that the kernel killed."""
    from bookgen.errors import BookgenError
    from tests.helpers import check_model_of as check_model

    with pytest.raises(BookgenError, match=message):
        check_model(load_config(write_experiment(tmp_path, {"model.config": mapping})))


def test_a_model_whose_weights_exceed_a_ranks_memory_is_refused_before_it_is_built(tmp_path, monkeypatch):
    """The size comes from the meta device (nothing allocated); under ZeRO-3 the ranks share the weights."""
    from bookgen.distributed import DistEnv
    from bookgen.errors import BookgenError
    from bookgen.model import config_checks
    from tests.helpers import check_model_of as check_model

    big = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "max_position_embeddings": BLOCK}
    monkeypatch.setattr(config_checks, "_host_available", lambda: 8 * 2**30)  # an 8 GiB host
    dist = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1", master_port=1)
    with pytest.raises(BookgenError, match=r"model.config \(llama\): 6.\d\dB parameters take 2\d.\d GiB per rank "
                                           r"in fp32, more than this host's available memory \(8.0 GiB\)"):
        check_model(load_config(write_experiment(tmp_path, {"model.config": big})), dist)
    four = DistEnv(rank=0, world_size=4, local_rank=0, local_world_size=1, master_addr="127.0.0.1", master_port=1)
    check_model(load_config(write_experiment(tmp_path, {"model.config": big, "deepspeed.zero_stage": 3})), four)
    big_cfg = load_config(write_experiment(tmp_path, {"model.config": big}))
    check_model(big_cfg, dist, params_offload="nvme")  # the weights live on the drive: not the host's to hold
    with pytest.raises(BookgenError, match=r"more than this host's available memory"):
        check_model(big_cfg, dist, params_offload="cpu")  # offloaded to the host: its memory counts


def test_an_encoder_such_as_bert_is_refused_as_a_causal_lm(tmp_path):
    """transformers maps BertForMaskedLM folders to BertLMHeadModel, which attends both ways unless is_decoder."""
    from transformers import BertConfig, BertForMaskedLM

    from bookgen.errors import BookgenError
    from tests.helpers import check_model_of as check_model

    BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               vocab_size=100)).save_pretrained(tmp_path / "bert")
    with pytest.raises(BookgenError, match=r"the 'bert' family is an encoder \(it attends both ways"):
        check_model(load_config(write_experiment(tmp_path, {"model.name_or_path": "bert"})))
    with pytest.raises(BookgenError, match=r"the 'bert' family is an encoder"):
        check_model(load_config(write_experiment(tmp_path, {"model.config": {"model_type": "bert"}})))


def test_a_broken_model_folder_is_named(tmp_path):
    """A missing folder, a config without weights, a truncated safetensors file: each named, no traceback."""
    from bookgen.errors import BookgenError
    from bookgen.model.build import family_config
    from tests.helpers import check_model_of as check_model

    def check(name: str) -> None:
        check_model(load_config(write_experiment(tmp_path, {"model.name_or_path": name})))

    with pytest.raises(BookgenError, match=r"model.name_or_path: the folder ../models/llama does not exist"):
        check("../models/llama")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(family_config(LLAMA, vocab_size=100)).save_pretrained(tmp_path / "pre")
    check("pre")
    weights = tmp_path / "pre" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(BookgenError, match=r"model.safetensors: truncated"):
        check("pre")
    weights.unlink()
    with pytest.raises(BookgenError, match=r"pre has a config but no weights"):
        check("pre")
