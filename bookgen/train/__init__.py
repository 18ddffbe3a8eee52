"""Training: the loop, one optimizer step, the DeepSpeed engine and its config, batch arithmetic, the LR schedule,
the checks before any data is touched, the run folder's lock, progress and metrics."""
