"""The GPU check runs end to end on the CPU (--dry-run) and writes complete results. No timing asserts."""

from __future__ import annotations

import json
import math

import pytest

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
    for engine in ENGINES:
        assert saved["sharded"][engine]["status"].startswith("skipped")
        assert engine in md
