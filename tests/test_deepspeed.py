"""DeepSpeed ZeRO-3 on CPU (its CPU accelerator, gloo), where deepspeed is installed: SPTrainer under the engine, at
world size 1 and with its parameters partitioned over 2 ranks, equals the single process (weights and logged
values), resumes where the uninterrupted run ends, and publishes a model that plain transformers loads; a DeepSpeed
configuration without ``gradient_clipping`` follows ``max_grad_norm``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")


def test_ops_build_in_a_folder_of_this_torch_version():
    """DeepSpeed builds its CPU ops where torch builds extensions; the runs that the tests start build them in a folder
    of this torch version (conftest.extensions_dir), not in the one that torch versions of the same tag share."""
    code = "from torch.utils.cpp_extension import _get_build_directory as d; print(d('deepspeed_shm_comm', False))"
    folder = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert f"_torch{torch.__version__}" in folder


@pytest.mark.slow
def test_zero3_equals_one_process_and_resumes():
    from hf_sp_research.gpu_check import sharded

    out = sharded({}, torch.device("cpu"))
    run = out["deepspeed_zero3"]
    assert run["status"] == "ok" and run["engine_used"], run
    assert run["resume_equal"] and run["equals_single_process"], run
    assert run["sp_dist_equals_single_process"] and run["sp_dist"][-1] > 0, run
    assert run["loads_in_transformers"] and run["logits_finite"]


@pytest.mark.slow
def test_zero3_on_two_ranks_equals_one_process_and_resumes(tmp_path):
    """Two ranks, each holding half of every parameter's fp32 partition (and of its anchor): the weights and the
    logged penalty and distance (summed over the ranks once) are the single process's to fp32 rounding (DeepSpeed
    steps fp32 partitions of the float64 model), and a run resumed from the mid-run checkpoint with other weights
    ends exactly where the uninterrupted run ends."""
    from sharded_runs import check_sharded_trainer

    weights = check_sharded_trainer(
        tmp_path,
        "zero3",
        "l2_sp",
        rtol=1e-5,
        atol=1e-6,
        value_rel=1e-5,
        anchor_dtype="torch.float32",
        plain_anchor_dtype="torch.float64",
    )
    assert all(torch.equal(weights["full"][k], weights["resumed"][k]) for k in weights["full"])


CLIPPING = """
import json, os, socket, sys
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
from hf_sp import SPConfig, SPTrainer
from hf_sp_research.gpu_check import _tiny_vit
case, out = sys.argv[1], sys.argv[2]
config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}
extra = {}
if case == "explicit":
    config["gradient_clipping"] = 0.5
    extra["max_grad_norm"] = 0.5
if case in ("optimizer", "probe_optimizer"):
    config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}}
if case == "probe_optimizer":  # a method that hooks no step, only the head's initialisation
    extra.update(sp_penalty="none", sp_head_init="probe")
if case == "launch":  # what accelerate launch --use_deepspeed --deepspeed_config_file sets
    with open(os.path.join(out, "ds.json"), "w") as f:
        json.dump(config, f)
    os.environ.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=os.path.join(out, "ds.json"))
else:
    extra["deepspeed"] = config
args = SPConfig(output_dir=out, use_cpu=True, report_to=[], **{"sp_penalty": "l2_sp", **extra})
trainer = SPTrainer(model=_tiny_vit(), args=args)
print(json.dumps([args.max_grad_norm, trainer.accelerator.state.deepspeed_plugin.hf_ds_config.config["gradient_clipping"]]))
"""


@pytest.mark.parametrize("case, expected", [("args", [0.0, 0.0]), ("launch", [0.0, 0.0]), ("explicit", [0.5, 0.5])])
def test_a_deepspeed_config_without_clipping_follows_max_grad_norm(tmp_path, case, expected):
    """DeepSpeed's own default clips at 1: a configuration without gradient_clipping, given in the arguments or to
    accelerate launch, gets max_grad_norm (0 by default with a penalty); an explicit value is kept."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CLIPPING, case, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


@pytest.mark.parametrize("case, methods", [("optimizer", "penalty"), ("probe_optimizer", "probe_head")])
def test_a_deepspeed_optimizer_section_is_refused_by_name(tmp_path, case, methods):
    """DeepSpeed builds that optimizer and scheduler itself, out of reach of the methods: the run crashed on
    Trainer's placeholders (an AttributeError, or an error blaming the user's scheduler) before the fix."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CLIPPING, case, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert 'ValueError: The DeepSpeed configuration has an "optimizer" section' in result.stderr
    assert f"out of reach of the methods ({methods})" in result.stderr
