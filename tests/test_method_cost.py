"""The per-step cost measurement of the transfer methods runs end to end on a small setting and writes its report."""

from __future__ import annotations

import json

import pytest

from hf_sp_research.method_cost import MethodCostConfig, main


def test_method_cost_reports_a_ratio_per_configuration(tmp_path):
    argv = ["--image_size", "32", "--batch_size", "4", "--steps", "3", "--warmup", "1", "--repeats", "1",
            "--configurations", "plain", "spd", "delta (unweighted)", "--out", str(tmp_path)]
    report = main(argv)
    rows = {r["configuration"]: r for r in report["rows"]}
    assert rows["plain"]["ratio"] == 1.0
    assert rows["spd"]["steps_timed"] == 2 and rows["delta (unweighted)"]["median_step_s"] > 0
    assert json.loads((tmp_path / "method_cost.json").read_text())["rows"][1]["configuration"] == "spd"
    assert "| delta (unweighted) |" in (tmp_path / "method_cost.md").read_text()


def test_method_cost_refuses_a_run_without_its_baseline():
    with pytest.raises(ValueError, match="must contain 'plain'"):
        MethodCostConfig(configurations=["spd"])
