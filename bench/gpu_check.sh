#!/usr/bin/env bash
# GPU check for a lent GPU machine (see ../shared/README.md); installs nothing from the network.
#   here:    bash bench/gpu_wheels.sh                      (fills the git-ignored .whl/)
#   device:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Prints tokens/s, MFU and peak memory for bookgen and transformers' Trainer, eager and compiled; the
# results and every run's log are also written to $OUT (when set) and runs/gpu_check/.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
python3 bench/gpu_check.py "$@"
