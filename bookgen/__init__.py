"""bookgen: fine-tune GPT-2-family models on book summaries with DeepSpeed ZeRO."""

__version__ = "0.1.0"
