"""Sampling (top-k, top-p, temperature, stop at <EOS>), the samples taken during training and their quality
measures."""
