"""Helper for tests/train/test_run_plan.py: one training rank (as launcher/run.py) that counts how often bookgen
loads a Hugging Face config and builds the DeepSpeed config, and prints the counts at exit."""

from __future__ import annotations

import atexit
import json
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402

from bookgen.cli import main  # noqa: E402
from bookgen.train import ds_config  # noqa: E402

counts: Counter[str] = Counter()
load_config = transformers.AutoConfig.from_pretrained.__func__
build = ds_config.build_ds_config


def counted_load(cls, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    if f"{os.sep}bookgen{os.sep}" in sys._getframe(1).f_code.co_filename:  # bookgen's own loads, not those
        counts["AutoConfig.from_pretrained"] += 1  # transformers makes inside AutoTokenizer
    return load_config(cls, *args, **kwargs)


def counted_build(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    counts["build_ds_config"] += 1
    return build(*args, **kwargs)


transformers.AutoConfig.from_pretrained = classmethod(counted_load)
import bookgen.train.engine  # noqa: E402, F401 - the modules that hold the function by name
import bookgen.train.preflight  # noqa: E402, F401

for module in list(sys.modules.values()):  # wherever the function was imported by name
    if getattr(module, "build_ds_config", None) is build:
        module.build_ds_config = counted_build
atexit.register(lambda: print("decisions: " + json.dumps(dict(sorted(counts.items()))), flush=True))

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
