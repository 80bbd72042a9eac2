"""SP's step hook under FSDP2 on CPU (``fully_shard``, gloo, 2 ranks) equals the unsharded steps, and a run resumed
from its sharded or full checkpoint (torch.distributed.checkpoint's, and accelerate's own FSDP2 optimizer save and
load with either state dict type) keeps its anchors and ends where the uninterrupted run ends."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sharded_runs import LAUNCH, check_sharded_trainer, run_ok

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_sp.py"


def _script():
    spec = importlib.util.spec_from_file_location("fsdp2_sp", SCRIPT)
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

    run_ok([*LAUNCH, str(SCRIPT), str(tmp_path), penalty, "fsdp2"])
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


@pytest.mark.slow
@pytest.mark.parametrize("case", ["l2_sp", "group_lasso_sp", "l2_sp_fisher", "l2_sp_bf16"])
def test_sptrainer_under_fsdp2_equals_one_process_and_resumes(tmp_path, case):
    """SPTrainer through transformers' and accelerate's FSDP2 (2 ranks on CPU) ends where one process with the same
    global batch ends and logs the same penalty and distance (summed over the ranks once); a run resumed from its
    mid-run checkpoint, given other weights and another Fisher, takes the anchors and the Fisher from the checkpoint
    and ends where the uninterrupted run ends (float64; group lasso with gradient accumulation and clipping; the
    Fisher penalty with full state dicts, its published model loaded by plain transformers, the others sharded).
    In bf16 (FSDP2's mixed precision, computing in bf16, against autocast in one process) the fp32 shards keep fp32
    anchors, the resumed run ends exactly where the uninterrupted one ends, and both stay within bf16's rounding of
    one process."""
    from transformers import AutoModelForImageClassification

    bf16 = case.endswith("bf16")
    if bf16:
        tolerances = {"rtol": 1e-2, "atol": 2e-3, "value_rel": 5e-3}
    else:
        tolerances = {"rtol": 1e-9, "atol": 1e-11, "value_rel": 1e-9}
    dtypes = ("torch.float32", "torch.bfloat16") if bf16 else ("torch.float64", "None")
    weights = check_sharded_trainer(
        tmp_path, "fsdp2", case, **tolerances, anchor_dtype=dtypes[0], compute_dtype=dtypes[1]
    )
    if bf16:  # the same mixed precision on both sides of the checkpoint
        assert all(torch.equal(weights["full"][k], weights["resumed"][k]) for k in weights["full"])
    if case == "l2_sp_fisher":
        published = AutoModelForImageClassification.from_pretrained(tmp_path / "two" / "published").state_dict()
        assert published.keys() == weights["one"].keys()
        for name, value in weights["one"].items():
            torch.testing.assert_close(published[name].double(), value, rtol=1e-6, atol=1e-8, msg=name)
