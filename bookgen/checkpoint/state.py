"""Where training stands: the step, the position in the epoch and the early-stopping counts. No I/O: the
checkpoint writes it (``COMPLETE.json``) and the resume reads it back (:mod:`bookgen.checkpoint.resume`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TrainState:
    """Where training stands: enough, with the RNG files, to continue exactly."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already taken in ``epoch``
    # early stopping, kept here so that it survives a resume
    best_eval_loss: float | None = None
    best_eval_step: int | None = None
    evals_since_best: int = 0
    # the whole run's totals, so that a resumed run's summary covers the parts before the resume too
    tokens_trained: int = 0  # non-padding tokens over all ranks
    train_seconds: float = 0.0  # time in the training loop (evaluations inside it included)
    last_loss: float | None = None  # the training loss of the last step

    def note_eval(self, loss: float, min_delta: float) -> None:
        """Count an evaluation: a new best resets the count of evaluations without improvement."""
        if self.best_eval_loss is None or loss < self.best_eval_loss - min_delta:
            self.best_eval_loss, self.best_eval_step, self.evals_since_best = loss, self.global_step, 0
        else:
            self.evals_since_best += 1
