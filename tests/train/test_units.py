"""Pure pieces of training: DeepSpeed config ownership, batch arithmetic, the schedule, early stopping."""

from __future__ import annotations

import pytest
import torch

from bookgen.config_io import load_config
from bookgen.data.batch_layout import BatchLayout, plan_steps
from bookgen.errors import BookgenError
from bookgen.train.schedule import lr_multiplier
from tests.helpers import REPO, ds_config_for, load_experiment, write_experiment


def test_experiment_values_are_filled_into_the_shipped_configs(tmp_path):
    for stage in range(4):
        cfg = load_config(write_experiment(tmp_path, {"deepspeed.zero_stage": stage, "train.grad_accum_steps": 3,
                                                      "deepspeed.config": str(REPO / f"ds_configs/zero{stage}.json")}))
        ds = ds_config_for(cfg, 2)
        assert ds["train_batch_size"] == 2 * 3 * 2 and ds["gradient_accumulation_steps"] == 3
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["optimizer"]["params"]["lr"] == cfg.train.learning_rate
        assert ds["optimizer"]["params"]["torch_adam"] is True
        assert ds["bf16"]["enabled"] is False


def test_batch_size_mismatch_shows_the_numbers(tmp_path):
    cfg = load_experiment(tmp_path, {"train_batch_size": 16})
    with pytest.raises(BookgenError) as info:
        ds_config_for(cfg, 2)
    msg = str(info.value)
    assert "train_batch_size is 16 in" in msg and "ds.json" in msg
    assert "train.micro_batch_size 2 x train.grad_accum_steps 1 x world size 2 gives 4" in msg


def test_json_value_disagreeing_with_yaml_names_both(tmp_path):
    ds = {"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}, "gradient_clipping": "auto"}
    cfg = load_experiment(tmp_path, ds)
    with pytest.raises(BookgenError, match=r"optimizer.params.lr is 0.1 in .*ds.json, but train.learning_rate"):
        ds_config_for(cfg, 1)
    ok = load_experiment(tmp_path, {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": "auto"})
    assert ds_config_for(ok, 1)["gradient_clipping"] == 1.0
    with pytest.raises(BookgenError, match="remove \"scheduler\""):
        ds_config_for(load_experiment(tmp_path, {"scheduler": {"type": "WarmupLR"}}), 1)


def test_training_split_smaller_than_a_global_batch_is_refused(tmp_path):
    cfg = load_experiment(tmp_path)
    with pytest.raises(BookgenError, match="fewer than one global batch of 8"):
        plan_steps(7, cfg.train, world_size=4)
    assert plan_steps(100, cfg.train, world_size=2).steps_per_epoch == 25


def test_linear_schedule_matches_transformers():
    from transformers import get_linear_schedule_with_warmup

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    hf = get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=20)
    for step in range(20):
        assert lr_multiplier(step, warmup_steps=0, total_steps=20, kind="linear") == pytest.approx(hf.get_last_lr()[0])
        opt.step()
        hf.step()
    assert lr_multiplier(0, warmup_steps=4, total_steps=20, kind="linear") == 0.25
    assert lr_multiplier(10, warmup_steps=4, total_steps=20, kind="cosine") < 1.0


def test_early_stopping_counts_evaluations_without_a_new_best():
    from bookgen.checkpoint.state import TrainState

    state = TrainState()
    counts = []
    for step, loss in ((2, 5.0), (4, 4.0), (6, 4.05), (8, 3.9), (10, 3.95), (12, 3.96)):
        state.global_step = step
        state.note_eval(loss, min_delta=0.0)
        counts.append(state.evals_since_best)
    assert counts == [0, 0, 1, 0, 1, 2]
    assert (state.best_eval_loss, state.best_eval_step) == (3.9, 8)
    strict = TrainState()
    for loss in (5.0, 4.0, 3.85, 3.7):  # 3.85 is not 0.2 below 4.0; 3.7 is
        strict.note_eval(loss, min_delta=0.2)
    assert (strict.best_eval_loss, strict.evals_since_best) == (3.7, 0)
    strict.note_eval(3.6, min_delta=0.2)
    assert strict.evals_since_best == 1


def test_tf32_only_on_gpus_and_only_when_allowed():
    from bookgen.train.engine import float32_matmul_precision

    assert float32_matmul_precision(tf32=True, on_gpu=True) == "high"
    assert float32_matmul_precision(tf32=False, on_gpu=True) == "highest"
    assert float32_matmul_precision(tf32=True, on_gpu=False) == "highest", "CPU runs keep exact fp32"


def test_batch_layout_is_computed_once_without_a_process_group(tmp_path):
    cfg = load_config(write_experiment(tmp_path), ["train.micro_batch_size=3", "train.grad_accum_steps=4"])
    layout = BatchLayout.of(cfg.train, world_size=2)
    assert (layout.micro_batches, layout.global_batch) == (8, 24)
    assert ds_config_for(cfg, 2)["train_batch_size"] == layout.global_batch
    assert plan_steps(100, cfg.train, 2).global_batch == layout.global_batch


def test_offload_needs_cpu_adam_or_torch_adam_and_nvme_a_path_and_libaio(monkeypatch, tmp_path):
    """The shipped offload config passes where DeepSpeed's CPU Adam can be built (a compiler and ninja); where
    it cannot, the check names the way out; NVMe needs a folder it can write and libaio. Whether this machine
    has them is not the question here: the ops' presence is set, so the test runs the same everywhere."""
    import json as json_module

    from bookgen.train import preflight

    monkeypatch.setattr(preflight, "cpu_adam_available", lambda: True)
    monkeypatch.setattr(preflight, "aio_available", lambda: True)
    shipped = json_module.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    preflight.check_offload(shipped, "zero3_offload.json")
    monkeypatch.setattr(preflight, "cpu_adam_available", lambda: False)
    with pytest.raises(BookgenError, match=r"zero3_offload.json: .*CPU Adam.*DS_BUILD_CPU_ADAM=1"):
        preflight.check_offload(shipped, "zero3_offload.json")
    shipped["optimizer"]["params"]["torch_adam"] = True
    preflight.check_offload(shipped, "zero3_offload.json")  # torch's AdamW needs nothing compiled
    shipped["zero_optimization"]["offload_param"] = {"device": "nvme"}
    with pytest.raises(BookgenError, match="offload_param offloads to nvme but names no nvme_path"):
        preflight.check_offload(shipped, "zero3_offload.json")
    shipped["zero_optimization"]["offload_param"]["nvme_path"] = str(REPO / "pyproject.toml")
    with pytest.raises(BookgenError, match=r"offload_param.nvme_path: .*pyproject.toml is a file"):
        preflight.check_offload(shipped, "zero3_offload.json")
    shipped["zero_optimization"]["offload_param"]["nvme_path"] = str(tmp_path / "swap")  # created by DeepSpeed
    preflight.check_offload(shipped, "zero3_offload.json")
    monkeypatch.setattr(preflight, "aio_available", lambda: False)
    with pytest.raises(BookgenError, match=r"offload_param offloads to nvme through DeepSpeed's async I/O op.*libaio"):
        preflight.check_offload(shipped, "zero3_offload.json")
    shipped["zero_optimization"]["offload_param"] = {"device": "gpu"}  # DeepSpeed's pydantic error before
    with pytest.raises(BookgenError, match=r"zero3_offload.json: zero_optimization.offload_param.device is 'gpu'; "
                                           r"DeepSpeed offloads to \"cpu\" or \"nvme\""):
        preflight.check_offload(shipped, "zero3_offload.json")


def test_zero3_buffers_are_sized_by_the_model_width_unless_the_json_sets_them(tmp_path):
    cfg = load_experiment(tmp_path, {"zero_optimization": {"stage": 3, "reduce_bucket_size": 12345}},
                          **{"deepspeed.zero_stage": 3})
    zero = ds_config_for(cfg, 2)["zero_optimization"]
    width = cfg.model.n_embd  # 32 in the tiny experiment
    assert zero["reduce_bucket_size"] == 12345, "the JSON's own value stays"
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * width * width)
    assert zero["stage3_param_persistence_threshold"] == 10 * width
    llama = load_experiment(tmp_path / "llama", {"zero_optimization": {"stage": 3}}, **{
        "deepspeed.zero_stage": 3,
        "model.config": {"model_type": "llama", "hidden_size": 48, "num_attention_heads": 4}})
    assert ds_config_for(llama, 2)["zero_optimization"]["reduce_bucket_size"] == 48 * 48
    assert "reduce_bucket_size" not in ds_config_for(load_experiment(tmp_path / "z0"), 2).get("zero_optimization", {})


def test_a_build_lock_is_named_while_young_and_refused_once_older_than_any_build(tmp_path, monkeypatch):
    """torch waits forever, silently, on the lock a killed build of an op leaves (pytorch#189245)."""
    import json as json_module
    import os
    import threading
    import time

    from bookgen.native_ops import STALE_LOCK_S, build_lock_notice
    from bookgen.train.preflight import ops_built_at_first_use

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build_lock_notice("cpu_adam") is None, "no lock, nothing to say"
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir(exist_ok=True)
    lock.touch()
    notice = build_lock_notice("cpu_adam", grace_s=0.2)
    assert notice is not None and str(lock) in notice and "remove the file" in notice
    threading.Timer(0.3, lock.unlink).start()  # another rank's load, done in a moment: nothing to say
    assert build_lock_notice("cpu_adam", grace_s=10) is None
    lock.touch()
    old = time.time() - STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.raises(BookgenError, match=rf"{lock} was left by a build of DeepSpeed's cpu_adam op started "
                                           r"\d+ minutes ago and killed before it ended.*Remove that file"):
        build_lock_notice("cpu_adam")
    shipped = json_module.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    assert ops_built_at_first_use(shipped) == ["cpu_adam"]
    shipped["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": str(tmp_path)}
    assert ops_built_at_first_use(shipped) == ["cpu_adam", "async_io"]
    shipped["optimizer"]["params"]["torch_adam"] = True
    assert ops_built_at_first_use(shipped) == ["async_io"]
    assert ops_built_at_first_use(json_module.loads((REPO / "ds_configs" / "zero2.json").read_text())) == []


def test_deepspeed_is_imported_without_mlflow_which_still_imports_afterwards():
    """DeepSpeed's autotuner imports MLflow whenever it is installed (a second at every start); bookgen's
    import hides it, and a run that tracks with MLflow still gets it. A fresh interpreter: this one has both."""
    import subprocess
    import sys

    code = ("import sys; from bookgen.deepspeed_import import load_deepspeed; ds = load_deepspeed(); "
            "print('mlflow' in sys.modules); import deepspeed, mlflow; print(ds is deepspeed, mlflow.__name__); "
            "print(load_deepspeed('checkpoint.constants') is sys.modules['deepspeed.checkpoint.constants'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-3:] == ["False", "True mlflow", "True"]  # after DeepSpeed's accelerator notice
