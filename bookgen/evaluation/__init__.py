"""Token-weighted perplexity over all ranks."""
