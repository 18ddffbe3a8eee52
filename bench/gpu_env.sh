# Sourced by bench/gpu_check.sh and bench/gpu_pipeline.sh: make DeepSpeed and bookgen's requirements importable
# on the lent GPU machine from the carried .whl/ (bash bench/gpu_wheels.sh fills it here); no network.
export PYTHONPATH=/tmp/site:/tmp/site-extra:$PWD
if ! python3 -c "import deepspeed" 2>/dev/null; then
    if ! ls .whl/deepspeed/*.whl >/dev/null 2>&1; then
        echo "no DeepSpeed here and no .whl/deepspeed/: run bash bench/gpu_wheels.sh first" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/deepspeed/*.whl
fi
missing=$(python3 - .whl/extra <<'PY'
import importlib.util, pathlib, sys
IMPORT_NAME = {"markdown_it_py": "markdown_it", "fonttools": "fontTools", "pillow": "PIL",
               "python_dateutil": "dateutil", "pyyaml": "yaml"}
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    dist = wheel.name.split("-")[0].lower()
    if importlib.util.find_spec(IMPORT_NAME.get(dist, dist)) is None:
        print(wheel)
PY
)
if [ -n "$missing" ]; then
    echo "installing what this Python lacks: $(echo "$missing" | xargs -n1 basename | cut -d- -f1 | xargs)"
    # shellcheck disable=SC2086
    python3 -m pip install -q --no-index --no-deps --target /tmp/site-extra $missing
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "
import torch, transformers, deepspeed, accelerate, bookgen.train
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, '
      f'deepspeed {deepspeed.__version__}, accelerate {accelerate.__version__}')"
