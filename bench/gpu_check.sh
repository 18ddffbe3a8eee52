#!/usr/bin/env bash
# GPU check for a lent GPU machine (see ../shared/README.md): installs nothing from the network.
# Copy ../shared/wheels/gpu-py312/*.whl into .whl/ (git-ignored), carry it, and run:
#   bash bench/gpu_check.sh            (about 5 minutes on an H100; prints tokens/s, MFU, peak memory)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import deepspeed" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 bench/gpu_check.py "$@"
