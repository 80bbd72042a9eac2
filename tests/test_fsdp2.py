"""SP's step hook under FSDP2 on CPU (``fully_shard``, gloo, 2 ranks) equals the unsharded steps, and a run resumed
from its sharded or full checkpoint (torch.distributed.checkpoint's, and accelerate's own FSDP2 optimizer save and
load with either state dict type) keeps its anchors and ends where the uninterrupted run ends."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_sp.py"
#: two ranks, the rendezvous on a free port
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _script(path: Path = SCRIPT):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("penalty", ["l2_sp", "group_lasso_sp", "l2_sp_fisher"])
def test_fsdp2_two_ranks_equal_the_unsharded_steps_and_resume(tmp_path, penalty):
    script = _script()
    model, optimizer, reg = script.model_and_regularizer(penalty, sharded=False, capture=True)
    expected_metrics: list = []
    script.train(model, optimizer, reg, range(script.STEPS), expected_metrics)
    expected = script.full_state(model)

    cmd = [*LAUNCH, str(SCRIPT), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*cmd, penalty, "fsdp2"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    resumed = ("resumed", "resumed_full", "accelerate_FULL", "accelerate_SHARDED")
    for run in ("final", *resumed):
        state = load_file(tmp_path / f"{run}.safetensors")
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(state[name], value, rtol=1e-9, atol=1e-11, msg=f"{run}: {name}")
    assert metrics["full"] == [pytest.approx(m, rel=1e-9) for m in expected_metrics]  # summed over ranks once
    for run in resumed:  # the anchors came back with the optimizer state
        assert metrics[run] == [pytest.approx(m, rel=1e-9) for m in expected_metrics[script.STEPS // 2 :]]
    assert expected_metrics[-1]["sp_dist"] > 0


TRAINER_SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_trainer.py"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["l2_sp", "group_lasso_sp", "l2_sp_fisher", "l2_sp_bf16"])
def test_sptrainer_under_fsdp2_equals_one_process_and_resumes(tmp_path, case):
    """SPTrainer through transformers' and accelerate's FSDP2 (2 ranks on CPU) ends where one process with the same
    global batch ends and logs the same penalty and distance (summed over the ranks once); a run resumed from its
    mid-run checkpoint, given other weights and another Fisher, takes the anchors and the Fisher from the checkpoint
    and ends where the uninterrupted run ends (float64; group lasso with gradient accumulation and clipping; the
    Fisher penalty with full state dicts, its published model loaded by plain transformers, the others sharded).
    In bf16 (FSDP2's mixed precision against autocast in one process) the weights and anchors stay float32, the
    resumed run ends exactly where the uninterrupted one ends, and both stay within bf16's rounding of one process."""
    from transformers import AutoModelForImageClassification

    from hf_sp import save_fisher
    from hf_sp_research.gpu_check import _tiny_vit

    steps = _script(TRAINER_SCRIPT).STEPS
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    start = _tiny_vit().state_dict()
    extra = [case]
    if case == "l2_sp_fisher":  # any positive diagonals: the run's, and another one for the resumed run
        g = torch.Generator().manual_seed(3)
        for name in ("fisher", "other_fisher"):
            save_fisher({k: torch.rand(v.shape, generator=g) for k, v in start.items()}, tmp_path / f"{name}.st")
            extra.append(str(tmp_path / f"{name}.st"))
    for cmd in ([sys.executable, str(TRAINER_SCRIPT), str(one), *extra], [*LAUNCH, str(TRAINER_SCRIPT), str(two), *extra]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        errors = "\n".join(line for line in result.stderr.splitlines() if "Error" in line)
        assert result.returncode == 0, errors + "\n" + result.stdout[-2000:] + result.stderr[-3000:]
    bf16 = case.endswith("bf16")
    anchors = ["torch.float32" if bf16 else "torch.float64"]
    assert json.loads((two / "engine.json").read_text()) == {"fsdp2": True, "dtensors": True, "anchor_dtypes": anchors}
    assert json.loads((one / "engine.json").read_text()) == {"fsdp2": False, "dtensors": False, "anchor_dtypes": anchors}
    expected = load_file(one / "full.safetensors")
    tol = {"rtol": 2e-2, "atol": 2e-3} if bf16 else {"rtol": 1e-9, "atol": 1e-11}
    for run in ("full", "resumed"):
        state = load_file(two / f"{run}.safetensors")
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            assert state[name].dtype == value.dtype == (torch.float32 if bf16 else torch.float64), name
            torch.testing.assert_close(state[name], value, **tol, msg=f"{run}: {name}")
    if bf16:  # the same mixed precision on both sides of the checkpoint
        uninterrupted, resumed = (load_file(two / f"{run}.safetensors") for run in ("full", "resumed"))
        assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    assert max(float((expected[k].double() - start[k].double()).abs().max()) for k in start) > 1e-3  # it trained
    if case == "l2_sp_fisher":
        published = AutoModelForImageClassification.from_pretrained(two / "published").state_dict()
        assert published.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(published[name].double(), value, rtol=1e-6, atol=1e-8, msg=name)
    metrics, reference = (json.loads((d / "metrics.json").read_text()) for d in (two, one))
    rows = reference["full"]
    assert len(rows) == steps and rows[-1]["sp_dist"] > 0
    for run, first in (("full", 0), ("resumed", steps // 2)):
        got = [r for r in metrics[run] if r["step"] > first]
        assert [r["step"] for r in got] == [r["step"] for r in rows[first:]]
        for r, ref in zip(got, rows[first:], strict=True):
            assert [r[k] for k in ("sp_body", "sp_head", "sp_dist")] == pytest.approx(
                [ref[k] for k in ("sp_body", "sp_head", "sp_dist")], rel=1e-2 if bf16 else 1e-9
            ), (run, r["step"])  # summed over the ranks once
            assert r["loss"] == pytest.approx(ref["loss"], rel=1e-2 if bf16 else 1e-6)  # logged through float32
