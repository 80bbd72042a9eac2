"""DeepSpeed ZeRO-3 on CPU (its CPU accelerator, gloo; world size 1), where deepspeed is installed: SPTrainer under
the engine equals the single process (weights and logged values), resumes where the uninterrupted run ends, and
publishes a model that plain transformers loads; a DeepSpeed configuration without ``gradient_clipping`` follows
``max_grad_norm``."""

from __future__ import annotations

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")


@pytest.mark.slow
def test_zero3_equals_one_process_and_resumes():
    from hf_sp_research.gpu_check import sharded

    out = sharded({}, torch.device("cpu"))
    run = out["deepspeed_zero3"]
    assert run["status"] == "ok" and run["engine_used"], run
    assert run["resume_equal"] and run["equals_single_process"], run
    assert run["sp_dist_equals_single_process"] and run["sp_dist"][-1] > 0, run
    assert run["loads_in_transformers"] and run["logits_finite"]


@pytest.mark.parametrize("given, expected", [({}, 0.0), ({"gradient_clipping": "auto"}, 0.0)])
def test_a_deepspeed_config_without_clipping_follows_max_grad_norm(tmp_path, given, expected):
    """DeepSpeed's own default clips at 1; the recipe's max_grad_norm (0 with a penalty) must hold."""
    from hf_sp import SPConfig

    config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto", **given}
    args = SPConfig(output_dir=str(tmp_path), sp_penalty="l2_sp", deepspeed=config, use_cpu=True, report_to=[])
    assert args.max_grad_norm == 0.0
    assert args.hf_deepspeed_config.config["gradient_clipping"] == expected
