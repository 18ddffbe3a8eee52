"""Names of the files a run folder holds besides checkpoints, for the loop that writes them and the commands
that read them (`bookgen runs`) without importing the loop."""

SUMMARY = "run_summary.json"  # written at the end of a run: its steps mean it finished
RUN_INFO = "run_info.json"  # the experiment file and world size of the latest start
PREEMPTED_MARKER = "PREEMPTED"  # written after the preemption save; slurm/train.sh requeues only with it
INTERRUPTED_MARKER = "INTERRUPTED"  # written after a Ctrl-C's save: the user stopped it, nothing requeues it
STOP_FILE = "STOP_REQUESTED"  # slurm/train.sh creates it when Slurm warns of the time limit
RESOLVED_CONFIG = "resolved_config.yaml"
END_FILES = ("eval_results.json", "loss_curves.png", "samples.jsonl")  # sent to the trackers at the end
