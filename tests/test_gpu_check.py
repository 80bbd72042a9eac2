"""The GPU check runs end to end on the CPU (--dry-run) and writes complete results. No timing asserts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_sp_research.gpu_check import ENGINES, main


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path):
    result = main(["--dry-run", "--out", str(tmp_path)], prog="scripts/gpu_check.py")
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    md = (tmp_path / "gpu_check.md").read_text()
    assert saved["meta"]["command"] == "python scripts/gpu_check.py --dry-run --out " + str(tmp_path)
    assert saved["meta"]["dry_run"] and "Dry run" in md
    for model in result["plan"]["models"]:
        step = saved["step_time"][f"{model}/no"]
        assert step["sp_s"] > 0 and step["baseline_s"] > 0 and math.isfinite(step["overhead_pct"])
        pen = saved["penalty"][model]
        assert pen["anchored_numel"] > 0 and pen["step_hook_s"] > 0 and pen["autograd_loop_s"] > 0
        assert pen["compiled_step_hook_s"] > 0 and pen["compiled_first_step_s"] > 0
    single = saved["sharded"]["single_process"]
    assert single["status"] == "ok", single
    # resumed from the mid-run checkpoint, it ends where the uninterrupted run ends; plain transformers loads it
    assert single["resume_equal"] and single["resume_max_abs_diff"] <= 1e-6
    assert single["loads_in_transformers"] and single["trained_max_abs_change"] > 0 and single["sp_metrics_logged"]
    assert saved["sharded"]["fsdp2"]["status"].startswith("skipped")  # transformers takes FSDP on GPUs only
    deepspeed = saved["sharded"]["deepspeed_zero3"]  # runs on the CPU where deepspeed is installed
    assert deepspeed["status"].startswith("skipped") or deepspeed["equals_single_process"], deepspeed
    for engine in ENGINES:
        assert engine in md


def test_each_section_is_written_as_it_ends_and_a_failure_is_recorded(tmp_path, monkeypatch):
    """A run stopped at a time limit keeps the sections before it: the files are written after each one (``complete``
    false until the end); a section that raises is recorded with its error and the next one still runs."""
    from hf_sp_research import gpu_check

    seen = {}

    def broken(plan, device):
        raise RuntimeError("no kernel image is available")

    def penalty(plan, device):
        seen.update(json.loads((tmp_path / "gpu_check.json").read_text()))
        return {"bandwidth_GB_per_s": 1.0}

    monkeypatch.setattr(gpu_check, "step_times", broken)
    monkeypatch.setattr(gpu_check, "penalty_times", penalty)
    result = main(["--dry-run", "--out", str(tmp_path), "--sections", "step", "penalty"])
    assert not seen["meta"]["complete"] and "penalty" not in seen
    assert seen["step_time"]["error"] == "RuntimeError: no kernel image is available"
    assert "broken" in seen["step_time"]["traceback"]
    assert result["meta"]["complete"] and result["meta"]["sections"] == ["step", "penalty"]
    assert "sharded" not in result
    md = (tmp_path / "gpu_check.md").read_text()
    assert "Failed: `RuntimeError: no kernel image is available`" in md and "## 2. The penalty alone" in md
    assert "## 3." not in md and "Incomplete" not in md


def test_a_failing_compiler_keeps_the_eager_penalty_figures(monkeypatch):
    from hf_sp import regularizer
    from hf_sp_research import gpu_check

    class NoCompiler(regularizer.SPRegularizer):
        def __init__(self, *args, compile: bool = False, **kwargs):
            if compile:
                raise RuntimeError("no C++ compiler")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(regularizer, "SPRegularizer", NoCompiler)
    plan = {**gpu_check._plan(dry_run=True), "models": ["test_resnet"], "penalty_iters": 1}
    out = gpu_check.penalty_times(plan, torch.device("cpu"))["test_resnet"]
    assert out["step_hook_s"] > 0 and out["autograd_loop_s"] > 0 and "compiled_step_hook_s" not in out
    assert out["compiled"]["error"] == "RuntimeError: no C++ compiler"
    md = gpu_check._render_penalty({"bandwidth_GB_per_s": 1.0, "test_resnet": out})
    assert "failed: `RuntimeError: no C++ compiler`" in md[-1]


def test_an_unknown_section_is_refused_by_name(tmp_path):
    from hf_sp_research.gpu_check import run_check

    with pytest.raises(ValueError, match=r"sections: unknown \['fisher'\]"):
        run_check(tmp_path, dry_run=True, command="x", sections=["step", "fisher"])
