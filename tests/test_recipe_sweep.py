"""The recipe sweep (hf_sp_research): a tiny end-to-end run on the packaged model, resume, and the report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from test_reproduce import make_tree

from hf_sp import SPConfig
from hf_sp.data import check_crop_scale
from hf_sp_research import recipe_sweep
from hf_sp_research.recipe_sweep import RecipeSweepConfig, RunSpec, parse_args
from hf_sp_research.recipes import RECIPES


def tiny_config(tmp_path: Path, **overrides) -> RecipeSweepConfig:
    values = dict(
        data_dir=str(make_tree(tmp_path / "data")),
        output_dir=str(tmp_path / "sweep"),
        recipes=["l2", "lp_ft_frozen_bn"],
        seeds=[0, 1],
        image_size=32,
        num_train_epochs=1,
        batch_size=4,
        eval_batch_size=8,
        interpolation_grid=[0.0, 0.5, 1.0],
    )
    values.update(overrides)
    return RecipeSweepConfig(**values)


@pytest.mark.slow
def test_recipe_sweep_end_to_end_and_resume(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, one_seed=["lp_ft_frozen_bn"])
    report = recipe_sweep.run_recipe_sweep(config)
    out = Path(config.output_dir)
    probe = report["linear_probe"]
    rows = {(r["recipe"], r["variant"]): r for r in report["rows"]}
    assert set(rows) == {(r, v) for r in config.recipes for v in ("trained", "interpolated")}
    for runs in report["runs"].values():
        for run in runs:
            curve = {c["t"]: c for c in run["curve"]}
            # the run as trained is t = 1 of its interpolation path; the interpolated one is the val-best t
            assert (run["val_accuracy"], run["test_accuracy"]) == (curve[1.0]["val_accuracy"], curve[1.0]["test_accuracy"])
            assert run["interp_val_accuracy"] == max(c["val_accuracy"] for c in run["curve"])
            if run["recipe"] == "lp_ft_frozen_bn":
                # t = 0 is the start: the pretrained body with the probe head, BatchNorm at the source statistics,
                # i.e. the linear probe that the sweep fits by itself
                assert curve[0.0]["val_accuracy"] == pytest.approx(probe["val_accuracy"])
                assert curve[0.0]["test_accuracy"] == pytest.approx(probe["test_accuracy"])
    assert len(rows["l2", "trained"]["test"]) == 2  # seeds 0 and 1 at the chosen setting
    assert len(rows["lp_ft_frozen_bn", "trained"]["test"]) == 1  # one_seed: the first seed only
    table = (out / "results.md").read_text()
    assert "| LP-FT, BatchNorm frozen | interpolated |" in table and "Linear probe: val" in table
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))

    # a second invocation trains nothing; a run without its result file is the only one trained again
    calls = []
    real = recipe_sweep.train_one

    def counting(config, data, spec, run_dir, recipe):
        calls.append(spec.name)
        return real(config, data, spec, run_dir, recipe)

    monkeypatch.setattr(recipe_sweep, "train_one", counting)
    recipe_sweep.run_recipe_sweep(config)
    assert calls == []
    lost = next((out / "runs").iterdir())
    (lost / recipe_sweep.RESULT_FILE).unlink()
    # report_only: the finished runs reported, the lost one listed, nothing trained
    partial = recipe_sweep.run_recipe_sweep(replace(config, report_only=True))
    assert calls == [] and partial["missing"] == [lost.name]
    assert f"Not finished yet: `{lost.name}`." in (out / "results.md").read_text()
    recipe_sweep.run_recipe_sweep(config)
    assert calls == [lost.name]
    assert "Not finished" not in (out / "results.md").read_text()


def test_recipe_sweep_arguments(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("dataset_name: someone/dtd\nshots_per_class: {train: 4}\nrecipes: [l2]\n")
    config = parse_args(["--config", str(yaml_file), "--seeds", "3", "4"])
    assert (config.dataset_name, config.shots_per_class, config.recipes, config.seeds) == (
        "someone/dtd", {"train": 4}, ["l2"], [3, 4]
    )
    local = parse_args(["--config", str(yaml_file), "--data_dir", "somewhere"])
    assert (local.data_dir, local.dataset_name, local.shots_per_class) == ("somewhere", None, None)
    with pytest.raises(ValueError, match="recipes: unknown"):
        RecipeSweepConfig(data_dir="x", recipes=["lp_ft_plus"])
    with pytest.raises(ValueError, match="grids: l2: .*train_crop_scale.* a grid setting holds numbers"):
        RecipeSweepConfig(data_dir="x", grids={"l2": [{"train_crop_scale": [0.35, 1.0]}]})
    with pytest.raises(ValueError, match="must contain 1.0"):
        RecipeSweepConfig(data_dir="x", interpolation_grid=[0.0, 0.5])
    with pytest.raises(FileNotFoundError, match="nothing of this sweep has run yet"):
        recipe_sweep.run_recipe_sweep(RecipeSweepConfig(data_dir="x", output_dir=str(tmp_path / "new"), report_only=True))


def _run_arguments(tmp_path: Path, name: str, setting: dict) -> tuple[SPConfig, dict]:
    """What the sweep builds for one run of recipe ``name`` at ``setting``: its SPConfig, and the SPConfig fields
    asked for (``train_crop_scale`` is the data's: the sweep builds the transform from it)."""
    values = {**RECIPES[name].fields, **setting}
    crop_scale = values.pop("train_crop_scale", None)
    if crop_scale is not None:
        check_crop_scale(crop_scale)
    return SPConfig(output_dir=str(tmp_path), report_to="none", **values), values


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_setting_is_a_valid_configuration(tmp_path, name):
    """A sweep that reaches a recipe only after hours must not fail there on a field the library refuses."""
    assert RECIPES[name].grid, name
    defaults = SPConfig(output_dir=str(tmp_path), report_to="none")
    for setting in RECIPES[name].grid:
        args, values = _run_arguments(tmp_path, name, setting)
        for key, value in values.items():
            # a number given for a list field (a grid setting holds numbers) must be read as the list of that number
            is_list = isinstance(getattr(defaults, key), list)
            expected = [value] if is_list and not isinstance(value, list) else value
            assert getattr(args, key) == expected and isinstance(getattr(args, key), list) == is_list, (name, key)
        run = RunSpec(name, tuple(sorted(setting.items())), 0).name  # numbers name the runs: each one in the name
        assert all(f"{value:g}" in run for value in setting.values()), run


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("configs/recipes_*.yaml")))
def test_committed_sweep_configs_parse_and_their_grids_are_valid(tmp_path, path):
    config = parse_args(["--config", str(path), "--data_dir", str(tmp_path)])
    for name, grid in config.grids.items():
        for setting in grid:
            _run_arguments(tmp_path, name, setting)


def test_a_recipe_with_its_own_crops_trains_on_them(tmp_path, monkeypatch):
    scales = []
    real = recipe_sweep.build_transforms

    def recording(data_config, image_size=None, crop_scale=(0.08, 1.0)):
        scales.append(tuple(crop_scale))
        return real(data_config, image_size, crop_scale)

    monkeypatch.setattr(recipe_sweep, "build_transforms", recording)
    data = recipe_sweep._Data(tiny_config(tmp_path, train_crop_scale=[0.2, 0.9]))
    assert scales == [(0.2, 0.9)]
    data.split("train", train_transform=True)
    data.split("validation")
    assert scales == [(0.2, 0.9)]
    image = data.split("train", train_transform=True, crop_scale=(0.35, 1.0))[0]["pixel_values"]
    assert scales == [(0.2, 0.9), (0.35, 1.0)] and tuple(image.shape) == (3, 32, 32)
