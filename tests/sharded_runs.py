"""SPTrainer on two ranks under a sharding engine against one process (``scripts/sharded_trainer.py``): the runs
and the checks that the FSDP2 and DeepSpeed tests share."""

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

SCRIPT = Path(__file__).parent / "scripts" / "sharded_trainer.py"
#: two ranks, the rendezvous on a free port
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run_ok(cmd: list[str]) -> None:
    """Run ``cmd`` (one thread per process); on failure, show the lines that name an error, then the outputs' ends."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    errors = "\n".join(line for line in result.stderr.splitlines() if "Error" in line)
    assert result.returncode == 0, errors + "\n" + result.stdout[-2000:] + result.stderr[-3000:]


def _steps() -> int:
    spec = importlib.util.spec_from_file_location("sharded_trainer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.STEPS


def check_sharded_trainer(
    tmp_path: Path,
    engine: str,
    case: str,
    *,
    rtol: float,
    atol: float,
    value_rel: float,
    anchor_dtype: str,
    compute_dtype: str = "None",
    plain_anchor_dtype: str | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Run ``case`` in one process and on two ranks under ``engine``, then check: the engine ran to the end (FSDP2
    computing in ``compute_dtype``: ``"None"`` for the parameters' own), with anchors of ``anchor_dtype``, rank 0
    holding about half of them (the one process all, of ``plain_anchor_dtype``, by default the same); both runs of
    the engine (uninterrupted, and resumed from its mid-run checkpoint with other weights and another Fisher file)
    end at the one process's weights and log its penalty and distance at every step (``rtol``/``atol``,
    ``value_rel``); the runs trained. Returns the weights of the three runs."""
    from hf_sp import save_fisher
    from hf_sp_research.gpu_check import _tiny_vit

    one, two = tmp_path / "one", tmp_path / "two"
    start = _tiny_vit().state_dict()
    extra = [case]
    if case == "l2_sp_fisher":  # any positive diagonals: the run's, and another one for the resumed run
        g = torch.Generator().manual_seed(3)
        for name in ("fisher", "other_fisher"):
            save_fisher({k: torch.rand(v.shape, generator=g) for k, v in start.items()}, tmp_path / f"{name}.st")
            extra.append(str(tmp_path / f"{name}.st"))
    run_ok([sys.executable, str(SCRIPT), str(one), "none", *extra])
    run_ok([*LAUNCH, str(SCRIPT), str(two), engine, *extra])
    steps = _steps()
    facts = {"deepspeed": engine == "zero3", "fsdp2": engine == "fsdp2", "dtensors": engine == "fsdp2"}
    sharded = json.loads((two / "engine.json").read_text())
    assert 0.45 < sharded.pop("anchor_share") < 0.55  # the partitions or shards are spread over both ranks
    policies = [compute_dtype] if engine == "fsdp2" else []
    assert sharded == {**facts, "fsdp2_param_dtypes": policies, "anchor_dtypes": [anchor_dtype]}  # to the end
    plain = {"deepspeed": False, "fsdp2": False, "dtensors": False, "fsdp2_param_dtypes": [], "anchor_share": 1.0}
    plain["anchor_dtypes"] = [plain_anchor_dtype or anchor_dtype]
    assert json.loads((one / "engine.json").read_text()) == plain
    expected = load_file(one / "full.safetensors")
    weights = {"one": expected}
    for run in ("full", "resumed"):
        weights[run] = state = load_file(two / f"{run}.safetensors")
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            assert state[name].dtype == value.dtype, name
            torch.testing.assert_close(state[name], value, rtol=rtol, atol=atol, msg=f"{run}: {name}")
    assert max(float((expected[k].double() - start[k].double()).abs().max()) for k in start) > 1e-3  # it trained
    metrics, reference = (json.loads((d / "metrics.json").read_text()) for d in (two, one))
    rows = reference["full"]
    assert len(rows) == steps and rows[-1]["sp_dist"] > 0
    keys = ("sp_body", "sp_head", "sp_dist")
    for run, first in (("full", 0), ("resumed", steps // 2)):
        got = [r for r in metrics[run] if r["step"] > first]
        assert [r["step"] for r in got] == [r["step"] for r in rows[first:]]
        for r, ref in zip(got, rows[first:], strict=True):  # summed over the ranks once
            assert [r[k] for k in keys] == pytest.approx([ref[k] for k in keys], rel=value_rel), (run, r["step"])
            assert r["loss"] == pytest.approx(ref["loss"], rel=max(value_rel, 1e-6))  # logged through float32
    return weights
