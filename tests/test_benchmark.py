"""The cost benchmark runs end to end (quick configuration) and writes complete, sane results. No timing asserts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from hf_sp_research.benchmark import SECTIONS, build_parser, config_from_args, full_config, quick_config

ROOT = Path(__file__).resolve().parents[1]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_configs_and_options():
    full = full_config()
    assert full.models == ["resnet50", "vit_small_patch16_224"]
    assert (full.batch_size, full.image_size, full.threads) == (32, 224, 2)
    quick = quick_config()
    assert quick.models == ["test_resnet"] and quick.memory_models == ["test_vit"]
    assert quick.penalty_models == quick.fisher_models == ["test_resnet", "test_vit"]
    args = build_parser().parse_args(["--quick", "--repeats", "2", "--models", "test_resnet", "--image_size", "24"])
    cfg = config_from_args(args)
    assert (cfg.quick, cfg.repeats, cfg.models, cfg.image_size) == (True, 2, ["test_resnet"], 24)
    with pytest.raises(SystemExit):
        config_from_args(build_parser().parse_args(["--repeats", "0"]))


@pytest.mark.slow
def test_quick_benchmark_writes_all_sections(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[benchmark" in proc.stdout  # progress lines
    result = json.loads((out / "benchmark.json").read_text())
    md = (out / "benchmark.md").read_text()

    meta = result["meta"]
    assert meta["command"].startswith("python scripts/benchmark.py --quick")
    for key in ("cpu_model", "cpu_count", "torch", "transformers", "timm"):
        assert meta["machine"][key]
    assert meta["command"] in md and meta["machine"]["cpu_model"] in md
    for section in ("step_time", "memory", "memory_live", "penalty", "fisher"):
        assert section in result, section
    assert set(SECTIONS) == set(result["config"]["sections"])

    cfg = result["config"]
    for model in cfg["models"]:
        step = result["step_time"][model]
        for mode in ("sp", "baseline"):
            runs = step[mode]["step_s_per_run"]
            assert len(runs) == cfg["repeats"]
            assert all(len(r) == cfg["warmup_steps"] + cfg["steps"] and all(map(_positive, r)) for r in runs)
            assert _positive(step[mode]["median_step_s"]) and _positive(step[mode]["median_optimizer_step_s"])
        # (the "uncontended" figures may be NaN when other jobs slowed every run of a mode: not asserted)
        assert math.isfinite(step["all_runs_overhead_pct"])
        assert math.isfinite(step["all_runs_optimizer_step_overhead_pct"])
        assert math.isfinite(step["median_paired_overhead_pct"])

        mem = result["memory"][model]
        assert _positive(mem["sp_median_peak_rss_bytes"]) and _positive(mem["baseline_median_peak_rss_bytes"])
        # The SP run holds exactly one fp32 copy of the anchored tensors in its optimizer state.
        assert mem["anchor_bytes_in_optimizer_state"] == mem["anchored_fp32_bytes"] > 0

    for model in cfg["penalty_models"]:
        pen = result["penalty"][model]
        assert pen["grad_allclose"] is True
        assert _positive(pen["floor_s"]) and pen["anchored_numel"] > 0
        assert _positive(pen["bandwidth"]["GB_per_s"])
        for method in ("hf_sp_pre_step", "hf_sp_pre_step_compiled", "l2_sp_accumulate", "whole_tensor_kernel",
                       "autograd_loop", "inplace_op"):
            assert _positive(pen["methods"][method]["median_s"])
        # the compiled step logs the eager step's values (both fp32 sums over the same entries)
        assert pen["compiled_value_rel_diff"] < 1e-5 and _positive(pen["compiled_first_step_s"])

    for model in cfg["memory_models"]:
        live = result["memory_live"][model]
        assert _positive(live["sp_peak_rss_bytes"]) and _positive(live["baseline_peak_rss_bytes"])
        assert live["anchor_bytes_in_optimizer_state"] == live["anchored_fp32_bytes"] > 0

    for model in cfg["fisher_models"]:
        fisher = result["fisher"][model]
        assert fisher["allclose"] is True
        assert _positive(fisher["vectorized_median_s"]) and _positive(fisher["loop_median_s"])
        assert _positive(fisher["speedup"])
        assert fisher["auto"] in ("hooks", "samples", "classes")
        assert fisher["vectorized_median_s"] == fisher["median_s"][fisher["auto"]]
        errors = fisher["max_rel_err_vs_float64"]  # each float32 result against the float64 loop
        assert set(errors) == {*cfg["fisher_paths"], "loop"} and all(0 <= e < 1e-4 for e in errors.values())
        assert fisher["accurate"] == (errors[fisher["auto"]] <= 1e-6)
        faults = fisher["minor_page_faults_per_repeat"]  # one count per timed call, as the times
        assert {k: len(v) for k, v in faults.items()} == {k: len(v) for k, v in fisher["s_per_repeat"].items()}
        assert all(isinstance(f, int) and f >= 0 for v in faults.values() for f in v)

    for heading in ("## 1. Step time", "## 2. Peak memory", "## 3. The penalty alone", "## 4. Fisher estimation"):
        assert heading in md
