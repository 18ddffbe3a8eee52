#!/usr/bin/env bash
# The whole pipeline on a lent GPU machine in one call (bench/gpu_pipeline.py says what each stage checks).
#   here:    bash bench/gpu_wheels.sh                      (fills the git-ignored .whl/)
#   device:  run(command="PYTHONUNBUFFERED=1 bash bench/gpu_pipeline.sh", carry=[".whl"], timeout_s=560)
# `--no-throughput` skips the last stage (bench/gpu_check.py); `--tiny` runs every stage on a CPU
# (PYTHON names the interpreter, e.g. PYTHON=.venv/bin/python; default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --tiny "* ]]; then
    source bench/gpu_env.sh
fi
"${PYTHON:-python3}" bench/gpu_pipeline.py "$@"
