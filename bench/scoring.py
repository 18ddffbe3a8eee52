"""The benchmarks' independent judge: an exported model scored with plain transformers, one summary at a time
(no packing, no bookgen code), so a bookgen evaluation can be checked against it."""

from __future__ import annotations

from pathlib import Path


def loss_one_summary_at_a_time(model_dir: Path, lines: list[str], block: int | None = None) -> tuple[float, int]:
    """Mean next-token loss over every prediction of every line (token-weighted), and the prediction count;
    each line is truncated to ``block`` tokens (default: the model's positions)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    block = block or model.config.n_positions
    nll, count = 0.0, 0
    with torch.no_grad():
        for line in lines:
            ids = torch.tensor([tok(line, add_special_tokens=False)["input_ids"][:block]])
            loss = model(input_ids=ids, labels=ids).loss  # mean over the ids.shape[1] - 1 predictions
            nll += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return nll / count, count
