"""DDP on CPU (accelerate launch --cpu --num_processes 2) equals one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


def run(cmd: list[str], tmp_path: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("penalty", ["l2_sp", "group_lasso_sp", "recipe"])
def test_ddp_two_processes_equal_one(tmp_path, penalty):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run([sys.executable, str(SCRIPT), str(single), "8", penalty], tmp_path)
    # accelerate's --cpu launcher starts a single process (several need MPI): --multi_gpu starts two through
    # torchrun, and use_cpu + gloo keep them on the CPU.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    assert "world size 2" in run([*launch, str(SCRIPT), str(ddp), "4", penalty], tmp_path)
    a, b = load_file(single / "final.safetensors"), load_file(ddp / "final.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-9, atol=1e-11, msg=name)
    logs_a = json.loads((single / "logs.json").read_text())
    logs_b = json.loads((ddp / "logs.json").read_text())
    dist_a = [h["sp_dist"] for h in logs_a if "sp_dist" in h]
    dist_b = [h["sp_dist"] for h in logs_b if "sp_dist" in h]
    assert len(dist_a) == 4 and dist_b == pytest.approx(dist_a, rel=1e-9)  # never multiplied by world size
    assert dist_a[-1] > 0
    if penalty == "recipe":  # the probe, the interpolation's choice and its val curve: the same on two processes
        ends_a, ends_b = [h for h in logs_a if "sp_interpolation_t" in h], [h for h in logs_b if "sp_interpolation_t" in h]
        assert len(ends_a) == 1 and ends_b == [pytest.approx(ends_a[0], rel=1e-9)]
        probe_a = [h["sp_probe_C"] for h in logs_a if "sp_probe_C" in h]
        assert probe_a and probe_a == [h["sp_probe_C"] for h in logs_b if "sp_probe_C" in h]


@pytest.mark.slow
def test_cli_under_accelerate_launch_two_processes(tmp_path):
    """The fine-tuning CLI as users start it on several processes (CPU: gloo)."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [str(root / "examples" / "accelerate" / "cpu_2proc.yaml"), str(root / "scripts" / "finetune.py")]
    cmd += ["--image_size", "32", "--max_train_samples", "64", "--max_eval_samples", "32", "--max_steps", "2"]
    cmd += ["--per_device_train_batch_size", "8", "--use_cpu", "--ddp_backend", "gloo", "--disable_tqdm", "true"]
    cmd += ["--output_dir", str(out), "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", "1"]
    run(cmd, tmp_path)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert state["train_batch_size"] == 8
    assert state["epoch"] == pytest.approx(0.5)  # 2 steps x 8 images x 2 processes of 64: two processes ran
    results = json.loads((out / "all_results.json").read_text())
    assert 0 <= results["test_accuracy"] <= 1
    assert "sp_dist" in state["log_history"][0]
    assert (out / "README.md").is_file()
