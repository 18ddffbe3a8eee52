#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what bench/gpu_check.sh may need on the lent GPU machine, which has no network:
#   .whl/deepspeed/  DeepSpeed and the requirements it lacks there (../shared/wheels/gpu-py312/)
#   .whl/extra/      bookgen's other requirements as Python 3.12 wheels; gpu_check.sh installs one only if
#                    that Python cannot import it, so nothing the machine already has is shadowed
# Run here (PyPI is reachable), then carry .whl with the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
rm -rf .whl
mkdir -p .whl/deepspeed .whl/extra
cp ../shared/wheels/gpu-py312/*.whl .whl/deepspeed/
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d .whl/extra rich markdown-it-py mdurl pygments accelerate psutil pyyaml \
    matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil six
du -sh .whl
