"""Checkpoints: saving complete ones, resuming (also at another world size), the checks that a checkpoint fits the
data, consolidating the weights, and export to a Hugging Face folder."""
