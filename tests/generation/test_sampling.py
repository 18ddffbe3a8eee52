"""The generation runner against transformers' generate: greedy equality, sampling bounds, stopping at <EOS>,
the batch budget."""

from __future__ import annotations

import functools

import pytest
import torch

from bookgen.config import GenerateConfig
from bookgen.generation.sampling import generate, generate_rows, sample_rows

PROMPTS = ["<BOS>", "<BOS> The story is set in a mining town", "<BOS> In the end", "<BOS> Anna"]


@pytest.fixture(scope="module")
def loaded(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_greedy_equals_transformers_generate(loaded):
    model, tok = loaded
    s = GenerateConfig(top_k=1, max_new_tokens=25, num_return_sequences=1)
    for prompt in PROMPTS:
        ids = _ids(tok, prompt)
        expected = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  do_sample=False, max_new_tokens=25, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        (_, _, got, _), = generate_rows(model, [ids], [0], s, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=0)
        assert got == expected[: len(got)] and len(got) == len(expected), prompt


def test_prompt_output_does_not_depend_on_its_batch(loaded):
    model, tok = loaded
    greedy = GenerateConfig(top_k=1, max_new_tokens=20, num_return_sequences=1, batch_size=16)
    alone = [generate(model, tok, [p], greedy, seed=0)[0].text for p in PROMPTS]
    mixed = [x.text for x in generate(model, tok, PROMPTS, greedy, seed=0)]
    assert mixed == alone
    sampled = GenerateConfig(top_k=20, max_new_tokens=20, num_return_sequences=3, batch_size=16)
    one_by_one = GenerateConfig(top_k=20, max_new_tokens=20, num_return_sequences=3, batch_size=1)
    assert [x.text for x in generate(model, tok, PROMPTS, sampled, seed=3)] == \
        [x.text for x in generate(model, tok, PROMPTS, one_by_one, seed=3)]


def test_sampled_tokens_stay_inside_top_k(loaded):
    model, tok = loaded
    checked = []

    def observe(logits, chosen):
        top = torch.topk(logits, 5, dim=-1).indices
        checked.append(bool((top == chosen[:, None]).any(dim=-1).all()))

    s = GenerateConfig(top_k=5, max_new_tokens=30, num_return_sequences=4)
    generate(model, tok, PROMPTS, s, seed=1, observer=observe)
    assert len(checked) >= 30 and all(checked)


def test_sampling_draws_each_token_at_its_probability_and_never_an_impossible_one():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0], [0.1, 0.0, 0.0, 0.0, 0.0, 0.9]])
    n = 200_000
    uniforms = torch.rand(n, generator=torch.Generator().manual_seed(0))
    for row in probs:
        counts = torch.bincount(sample_rows(row.expand(n, -1), uniforms), minlength=6).double() / n
        assert counts[row == 0].sum() == 0
        # 5 standard deviations of a binomial share
        assert torch.all((counts - row).abs() <= 5 * (row * (1 - row) / n).sqrt() + 1e-12), counts
    # the ends of [0, 1): the first and the last token with probability above 0
    edges = torch.tensor([0.0, 1 - 2**-24])
    assert sample_rows(probs[:1].expand(2, -1), edges).tolist() == [1, 4]
    assert sample_rows(probs[1:].expand(2, -1), edges).tolist() == [0, 5]


def test_top_p_keeps_only_the_nucleus(loaded):
    model, tok = loaded
    checked = []

    def observe(logits, chosen):
        probs = torch.softmax(logits.float(), dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs
        for row in range(len(chosen)):
            nucleus = set(order[row][before[row] < 0.5].tolist())
            checked.append(int(chosen[row]) in nucleus)

    generate(model, tok, PROMPTS, GenerateConfig(top_k=500, top_p=0.5, max_new_tokens=20, num_return_sequences=2),
             seed=2, observer=observe)
    assert checked and all(checked)


def test_same_seed_same_output_other_seed_differs(loaded):
    model, tok = loaded
    s = GenerateConfig(top_k=50, max_new_tokens=30, num_return_sequences=3, temperature=1.2, repetition_penalty=1.3)
    a, b = generate(model, tok, PROMPTS, s, seed=5), generate(model, tok, PROMPTS, s, seed=5)
    assert [x.text for x in a] == [x.text for x in b]
    assert [x.text for x in a] != [x.text for x in generate(model, tok, PROMPTS, s, seed=6)]
    assert len({x.text for x in a if x.prompt_index == 0}) > 1, "samples of one prompt differ"


def test_each_sequence_stops_at_eos(loaded):
    model, tok = loaded
    eos = tok.eos_token_id

    class EosFromPositionFive(torch.nn.Module):
        """Wraps the model: <EOS> becomes certain once the input token sits at position 5 or later."""

        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

            # with the inner model's signature, so generation passes the cache under the name it takes
            @functools.wraps(model.forward)
            def forward(**kw):
                out = model(**kw)
                positions = kw["position_ids"][:, -1]
                boost = (positions >= 5).float()[:, None] * 1e4
                out.logits[:, -1, eos] += boost[:, 0]
                return out

            self.forward = forward

    s = GenerateConfig(top_k=50, max_new_tokens=40, num_return_sequences=2)
    samples = generate(EosFromPositionFive(), tok, ["<BOS>", "<BOS> The story is set in a mining town"], s, seed=0)
    assert all(x.stopped == "eos" for x in samples)
    short = [x for x in samples if x.prompt_index == 0]
    # the 1-token prompt sits at position 0; tokens fill positions 1..5, then <EOS> comes: 6 new tokens
    assert all(x.tokens == 6 for x in short)
    assert all("<EOS>" not in x.text for x in samples)
    s = GenerateConfig(top_k=50, max_new_tokens=7, num_return_sequences=2)
    assert all(x.stopped == "length" and x.tokens == 7 for x in generate(model, tok, ["<BOS>"], s, seed=0))


def test_the_default_batch_follows_a_memory_budget(loaded):
    from transformers import GPT2Config, GPT2LMHeadModel

    from bookgen.generation.sampling import CPU_BUDGET_BYTES, budget_rows

    model, tok = loaded
    # the embedded default's model: 64 prompts x 5 samples of 250 new tokens decode as one batch
    assert GenerateConfig().batch_size is None and budget_rows(model, 260) >= 64 * 5
    with torch.device("meta"):  # GPT-2 small's shape, without its weights
        small = GPT2LMHeadModel(GPT2Config())
    rows = budget_rows(small, 1024)
    kv_and_logits = 2 * 12 * 768 * 4 * 1024 + 16 * 50257  # bytes a row holds at 1024 tokens
    assert rows == CPU_BUDGET_BYTES // kv_and_logits and 20 < rows < 40
    sampled = GenerateConfig(top_k=20, max_new_tokens=20, num_return_sequences=3)
    assert [x.text for x in generate(model, tok, PROMPTS, sampled, seed=3)] == \
        [x.text for x in generate(model, tok, PROMPTS, GenerateConfig(top_k=20, max_new_tokens=20,
                                                                      num_return_sequences=3, batch_size=2), seed=3)]


def test_the_default_prompt_is_the_tokenizers_own_begin_token(loaded):
    """A Llama tokenizer's begin token is <|begin_of_text|>: the unset prompt is that token, and a prompt that
    spells the reference's <BOS> (five characters to that tokenizer) is named."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bookgen.errors import BookgenError
    from bookgen.generation.sampling import prompt_texts

    _, own = loaded
    assert prompt_texts([None, "<BOS> The king"], own) == ["<BOS>", "<BOS> The king"]
    base = Tokenizer(models.WordLevel({"<|begin_of_text|>": 0, "a": 1, "[UNK]": 2}, unk_token="[UNK]"))
    base.pre_tokenizer = pre_tokenizers.Whitespace()
    llama = PreTrainedTokenizerFast(tokenizer_object=base, bos_token="<|begin_of_text|>")
    assert prompt_texts([None, "a"], llama) == ["<|begin_of_text|>", "a"]
    with pytest.raises(BookgenError, match=r"spells <BOS>, which this model's tokenizer reads as plain characters; "
                                           r"its begin token is <\|begin_of_text\|>"):
        prompt_texts(["<BOS> a"], llama)
