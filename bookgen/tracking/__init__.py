"""Where a run is watched besides its folder: TensorBoard, Weights & Biases, MLflow (``run.trackers``).

Rank 0 alone talks to them, through :class:`~bookgen.tracking.fanout.Trackers`, which the metrics log
feeds. Each tracker's run id is kept in ``<output_dir>/trackers.json`` so that a resumed or requeued run
appends to the same tracked run."""

from bookgen.tracking.fanout import Trackers
from bookgen.tracking.open import TRACKER_PACKAGES, check_tracker_packages, check_tracker_servers, open_trackers
from bookgen.tracking.params import run_params

__all__ = ["TRACKER_PACKAGES", "Trackers", "check_tracker_packages", "check_tracker_servers",
           "open_trackers", "run_params"]
