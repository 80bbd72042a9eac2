"""The penalty's metrics (every ``sp_*`` key) reach TensorBoard's event files and trackio's local store."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import RandomImages, make_args, tiny_vit

from hf_sp import SPTrainer


def test_sp_metrics_reach_tensorboard_and_trackio_files(tmp_path, monkeypatch):
    # both are dev extras: a missing one fails here rather than skipping
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from trackio.sqlite_storage import SQLiteStorage

    events, store = tmp_path / "tensorboard", tmp_path / "trackio"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(events))
    monkeypatch.setenv("TRACKIO_DIR", str(store))
    # trackio reads TRACKIO_DIR when it is imported: point an already imported trackio at the test's folder too
    for name, module in list(sys.modules.items()):
        if name.startswith("trackio") and isinstance(getattr(module, "TRACKIO_DIR", None), Path):
            monkeypatch.setattr(module, "TRACKIO_DIR", store)

    args = make_args(
        tmp_path,
        report_to=["tensorboard", "trackio"],
        project="hf-sp-test",
        run_name="l2sp",
        max_steps=4,
        logging_steps=2,
    )
    trainer = SPTrainer(model=tiny_vit(), args=args, train_dataset=RandomImages())
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "sp_dist" in entry]
    keys = sorted({key for entry in logged for key in entry if key.startswith("sp_")})
    assert len(logged) == 2 and {"sp_body", "sp_head", "sp_dist"} <= set(keys)

    board = EventAccumulator(str(events))
    board.Reload()
    for key in keys:
        scalars = board.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [e["step"] for e in logged]
        assert [s.value for s in scalars] == pytest.approx([e[key] for e in logged], rel=1e-6)  # stored as float32

    assert list(store.glob("*.db")), f"no trackio database in {store}"
    (run,) = SQLiteStorage.get_runs("hf-sp-test")
    rows = [row for row in SQLiteStorage.get_logs("hf-sp-test", run) if "train/sp_dist" in row]
    assert [row["train/global_step"] for row in rows] == [e["step"] for e in logged]
    for key in keys:
        assert [row[f"train/{key}"] for row in rows] == pytest.approx([e[key] for e in logged], rel=1e-12)
