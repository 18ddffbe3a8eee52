#!/bin/bash
# bookgen on Slurm: one srun task per node, each running torchrun with the rendezvous on the first node.
#
#   sbatch slurm/train.sh EXPERIMENT.yaml [--set key=value ...]
#   sbatch --nodes=4 --gpus-per-node=8 --time=12:00:00 slurm/train.sh experiments/gpt2_booksummaries.yaml
#
# Every #SBATCH default below can be overridden on the sbatch command line. Arguments after the
# experiment file reach every rank. Slurm sends USR1 two minutes before the time limit: the ranks
# train on to their next log step, save a checkpoint there and stop, and the job requeues itself; the
# requeued job resumes from the newest complete checkpoint with no user action (so does one requeued by
# hand). A rank that crashes or is killed restarts every rank of the job (launch.max_restarts times) and the
# run resumes from its newest complete checkpoint within the same job.
#SBATCH --job-name=bookgen
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --output=bookgen-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
set -uo pipefail

EXP=${1:?usage: sbatch slurm/train.sh EXPERIMENT.yaml [--set key=value ...]}
shift
if [ -z "${SLURM_JOB_ID:-}" ] || [ -z "${SLURM_JOB_NODELIST:-}" ]; then
    echo "slurm/train.sh: not inside a Slurm job; submit it: sbatch slurm/train.sh $EXP" \
         "(outside Slurm: bookgen train --cfg $EXP, or bookgen launch --cfg $EXP)" >&2
    exit 2
fi
REPO=${BOOKGEN_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
PYTHON=${BOOKGEN_PYTHON:-python3}
[ -x "$REPO/.venv/bin/python" ] && [ -z "${BOOKGEN_PYTHON:-}" ] && PYTHON="$REPO/.venv/bin/python"
cd "$REPO"

RUN_DIR=$("$PYTHON" -m bookgen.cli show --cfg "$EXP" "$@" --key run.output_dir) || exit 2
MAX_RESTARTS=$("$PYTHON" -m bookgen.cli show --cfg "$EXP" "$@" --key launch.max_restarts) || exit 2
mkdir -p "$RUN_DIR"
# the memory plan first: an experiment that will not fit these GPUs stops here, naming the part and the change
# that fits, before any data is prepared or any rank starts (train.fit_check=false goes on anyway)
"$PYTHON" -m bookgen.cli plan --cfg "$EXP" "$@" --nodes "$SLURM_NNODES" --check || exit $?
# prepared once here, before any rank starts (a no-op when the prepared data is up to date): the ranks then
# open it at once, and a first prepare of a large corpus takes no rank's time
"$PYTHON" -m bookgen.cli prepare --cfg "$EXP" "$@" || exit $?
FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# the first node's address; node names need not resolve (several slurmd on one host, say)
MASTER_ADDR=$(scontrol show node "$FIRST_NODE" | grep -oP 'NodeAddr=\K\S+')
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" != "0" ]; then
    NPROC=$SLURM_GPUS_ON_NODE
else
    NPROC=${BOOKGEN_NPROC_PER_NODE:-$("$PYTHON" -m bookgen.cli show --cfg "$EXP" "$@" --key launch.procs_per_node)}
fi
echo "bookgen job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES nodes x $NPROC ranks," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, run folder $RUN_DIR"

# a marker left by an earlier job (or one that failed later) must not requeue this one: only this job's ranks
# may write it, after they saved a checkpoint on a stop request
rm -f "$RUN_DIR/PREEMPTED"

# USR1 (time limit near) or TERM: ask the ranks to checkpoint and stop at the end of their step
trap 'echo "bookgen: stop requested by Slurm"; touch "$RUN_DIR/STOP_REQUESTED"' USR1 TERM

srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "$PYTHON" -m bookgen.commands.torchrun \
        --nnodes "$SLURM_NNODES" --nproc_per_node "$NPROC" --max-restarts "$MAX_RESTARTS" \
        --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
        "$REPO/launcher/run.py" --cfg "$EXP" "$@" &
SRUN=$!
status=0
while kill -0 "$SRUN" 2>/dev/null; do
    wait "$SRUN"  # returns early when a trapped signal arrives; keep waiting for the ranks to save
    status=$?
done

# requeue only a job whose ranks stopped for preemption: they write the marker after a complete save (and
# any older marker was removed above). Not srun's status: when the first node's ranks exit 75, srun ends the
# other nodes' tasks, which may then report 143. A user error, a crash or a finished run ends the job with
# its own status
if [ -f "$RUN_DIR/PREEMPTED" ]; then
    echo "bookgen: preempted; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
