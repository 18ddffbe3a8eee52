"""The runners of the commands whose work lives in no single package: eval, generate, samples, launch (and torchrun
with the ranks' own exit status)."""
