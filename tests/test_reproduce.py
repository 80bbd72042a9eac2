"""The reproduction sweep: a tiny end-to-end run, resume, selection, Fisher names, configs of the paper."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from hf_sp.finetune import parse_args as finetune_parse_args
from hf_sp_research import reproduce
from hf_sp_research.reproduce import (
    RunSpec,
    SweepConfig,
    map_fisher_names,
    normalize_fisher,
    parse_args,
    select_settings,
)

ROOT = Path(__file__).resolve().parents[1]


def make_tree(root: Path, classes=("a", "b", "c"), n: int = 4) -> Path:
    """An imagefolder tree root/{train,val,test}/<class>/<i>.png whose classes differ by colour."""
    for split in ("train", "val", "test"):
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 40), color=(110 * k, 20 * i, 200 - 90 * k)).save(folder / f"{i}.png")
    return root


def tiny_config(tmp_path: Path, **overrides) -> SweepConfig:
    values = dict(
        data_dir=str(make_tree(tmp_path / "data")),
        output_dir=str(tmp_path / "sweep"),
        methods=["l2", "l2_sp"],
        alpha_grid={"l2": [1e-3], "l2_sp": [0.1]},
        seeds=[0, 1],
        image_size=32,
        num_train_epochs=1,
        batch_size=4,
        eval_batch_size=8,
        probe_c_grid=[1.0],
        diagnostic_images=6,
        run_options={"disable_tqdm": True, "use_cpu": True},
    )
    values.update(overrides)
    return SweepConfig(**values)


@pytest.mark.slow
def test_sweep_end_to_end_and_resume(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    out = Path(config.output_dir)
    report = reproduce.run_sweep(config, command="scripts/reproduce.py --test")

    # every planned run wrote its result; the grid's seed-0 run is reused as the chosen setting's first seed
    names = [r["method"] + "/" + str(r["seed"]) for r in report["runs"]]
    assert sorted(names) == ["l2/0", "l2/1", "l2_sp/0", "l2_sp/1"]
    for run in report["runs"]:
        assert run["status"] == "ok" and 0 <= run["test_accuracy"] <= 1 and 0 <= run["val_accuracy"] <= 1
        assert run["sp_rel_dist"] > 0 and run["wall_time"] > 0
        assert {"method", "alpha", "beta", "lr", "seed", "sp_dist", "train_runtime"} <= set(run)
        run_dir = out / run["run_dir"]
        assert (run_dir / "run_result.json").is_file()
        assert not list(run_dir.glob("checkpoint-*"))  # no checkpoint left once a run is done
    assert set(report["summary"]) == {"l2", "l2_sp"} and report["summary"]["l2_sp"]["n"] == 2
    assert 0 <= report["linear_probe"]["test_accuracy"] <= 1
    # written files
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["runs"]) == 4 and saved["command"] == "scripts/reproduce.py --test"
    assert saved["machine"]["cpu_count"] >= 1
    table = (out / "results.md").read_text()
    assert "| L2 |" in table and "| L2-SP |" in table and "linear probe" in table
    assert "| L2-SP a=0.1 (chosen) |" in table and "Command: `python scripts/reproduce.py --test`" in table
    # no bare '|' inside a cell: every row of a table has as many cells as its header
    for block in table.split("\n\n"):
        rows = [r for r in block.splitlines() if r.startswith("|")]
        assert len({r.count("|") for r in rows}) <= 1, rows[:2]
    assert (out / "results.png").stat().st_size > 1000
    assert (out / "diagnostics.png").is_file()
    diag = json.loads((out / "diagnostics.json").read_text())
    assert set(diag["feature_r2_identity"]) == {"L2 a=0.001 (chosen)", "L2-SP a=0.1 (chosen)", reproduce.BN_LABEL}
    assert set(diag["relative_distance"]) == {"L2 a=0.001 (chosen)", "L2-SP a=0.1 (chosen)"}
    # only the chosen runs' first seed keeps its weights (for diagnostics)
    kept = sorted(p.parent.name for p in (out / "runs").glob("*/model.safetensors"))
    assert kept == sorted(RunSpec(m, a, 0.01, 0.01, 0).name for m, a in (("l2", 1e-3), ("l2_sp", 0.1)))

    # a second invocation trains nothing
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(reproduce, "train_one", no_training)
    again = reproduce.run_sweep(config)
    assert [r["test_accuracy"] for r in again["runs"]] == [r["test_accuracy"] for r in report["runs"]]

    # a run killed before it finished (no result file) is the only one trained again
    lost = out / report["runs"][-1]["run_dir"]
    (lost / "run_result.json").unlink()
    calls = []
    monkeypatch.undo()
    real = reproduce.train_one

    def counting(config, spec, run_dir, fisher_path):
        calls.append(spec.name)
        return real(config, spec, run_dir, fisher_path)

    monkeypatch.setattr(reproduce, "train_one", counting)
    reproduce.run_sweep(config)
    assert calls == [lost.name]
    assert (lost / "run_result.json").is_file()


def test_a_changed_budget_is_refused(tmp_path):
    config = tiny_config(tmp_path)
    Path(config.output_dir).mkdir(parents=True)
    reproduce._check_budget(config, Path(config.output_dir))
    other = tiny_config(tmp_path / "again", image_size=48)
    other.output_dir = config.output_dir
    with pytest.raises(ValueError, match="another budget .*image_size"):
        reproduce._check_budget(other, Path(config.output_dir))


def test_selection_on_val_skips_diverged_runs(tmp_path):
    config = tiny_config(tmp_path, alpha_grid={"l2": [1e-4, 1e-3], "l2_sp": [0.01, 0.1, 1.0]})
    results = {
        RunSpec("l2", 1e-4, 0.01, 0.01, 0).name: {"status": "ok", "val_accuracy": 0.5},
        RunSpec("l2", 1e-3, 0.01, 0.01, 0).name: {"status": "ok", "val_accuracy": 0.5},  # tie: first kept
        RunSpec("l2_sp", 0.01, 0.01, 0.01, 0).name: {"status": "ok", "val_accuracy": 0.6},
        RunSpec("l2_sp", 0.1, 0.01, 0.01, 0).name: {"status": "ok", "val_accuracy": 0.7},
        RunSpec("l2_sp", 1.0, 0.01, 0.01, 0).name: {"status": "diverged", "val_accuracy": None},
    }
    chosen = select_settings(config, results)
    assert chosen["l2"].alpha == 1e-4 and chosen["l2_sp"].alpha == 0.1
    assert [s.seed for s in reproduce.seed_runs(config, chosen)] == [1, 1]


def test_command_line_yaml_and_grids(tmp_path):
    data = make_tree(tmp_path / "data")
    yaml_file = tmp_path / "sweep.yaml"
    yaml_file.write_text(
        f"data_dir: {data}\noutput_dir: {tmp_path / 'o'}\nmethods: [l2, l2_sp_fisher]\n"
        "alpha_grid: {l2_sp_fisher: [0.01, 0.1]}\nimage_size: 64\n"
    )
    config = parse_args(["--config", str(yaml_file), "--seeds", "3", "4", "--alpha_grid", "l2=1e-5,1e-4"])
    assert config.methods == ["l2", "l2_sp_fisher"] and config.image_size == 64 and config.seeds == [3, 4]
    assert config.alpha_grid["l2"] == [1e-5, 1e-4] and config.alpha_grid["l2_sp_fisher"] == [0.01, 0.1]
    assert config.alpha_grid["l2_sp"] == reproduce.DEFAULT_ALPHA_GRID["l2_sp"]  # untouched methods keep defaults
    with pytest.raises(ValueError, match="METHOD=A,B,C"):
        parse_args(["--data_dir", str(data), "--output_dir", "o", "--alpha_grid", "0.1"])
    with pytest.raises(ValueError, match="not penalties"):
        parse_args(["--data_dir", str(data), "--output_dir", "o", "--methods", "l3"])
    with pytest.raises(ValueError, match="has no train/ folder"):
        parse_args(["--data_dir", str(tmp_path), "--output_dir", "o"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data_dir: x\nalpha: 1\n")
    with pytest.raises(ValueError, match=r"unknown arguments: \['alpha'\]"):
        parse_args(["--config", str(bad)])


def test_each_run_is_the_finetune_cli_with_the_sweeps_budget(tmp_path):
    """A run's arguments, built as dataclasses, equal the fine-tuning CLI's for the same options."""
    options = ["sp_include=all", "use_cpu=true", "disable_tqdm=true", "max_grad_norm=1e-3", "train_crop_scale=0.35 1"]
    config = tiny_config(tmp_path, methods=["l2_sp_fisher"], alpha_grid={"l2_sp_fisher": [0.1]}, run_options=options)
    spec = RunSpec("l2_sp_fisher", 0.1, 0.01, 0.02, 3)
    fisher, run = tmp_path / "fisher.safetensors", tmp_path / "run"
    model_args, data_args, args = reproduce.finetune_arguments(config, spec, run, fisher)
    data = Path(config.data_dir)
    argv = ["--model_name_or_path", config.model_name_or_path, "--train_dir", str(data / "train")]
    argv += ["--validation_dir", str(data / "val"), "--test_dir", str(data / "test"), "--train_val_split", "0"]
    argv += ["--image_size", "32", "--num_train_epochs", "1", "--per_device_train_batch_size", "4"]
    argv += ["--per_device_eval_batch_size", "8", "--learning_rate", "0.02", "--sp_penalty", "l2_sp_fisher"]
    argv += ["--sp_alpha", "0.1", "--sp_beta", "0.01", "--seed", "3", "--output_dir", str(run)]
    argv += ["--eval_strategy", "no", "--save_strategy", "epoch", "--save_total_limit", "1"]
    argv += ["--sp_fisher_path", str(fisher), "--sp_include", "all", "--use_cpu", "--disable_tqdm", "true"]
    argv += ["--max_grad_norm", "1e-3", "--train_crop_scale", "0.35", "1"]
    cli_model, cli_data, cli_args = finetune_parse_args(argv)
    assert (model_args, data_args) == (cli_model, cli_data)
    assert args.to_dict() == cli_args.to_dict()
    assert (args.sp_penalty, args.sp_alpha, args.learning_rate, args.seed, args.sp_include) == (
        "l2_sp_fisher", 0.1, 0.02, 3, "all"
    )
    assert args.max_grad_norm == 1e-3 and data_args.train_crop_scale == [0.35, 1.0]  # typed as the CLI types them
    from_yaml = tiny_config(tmp_path / "yaml", run_options={"max_grad_norm": "1e-3", "use_cpu": True}).run_options
    assert from_yaml == {"max_grad_norm": 1e-3, "use_cpu": True}
    with pytest.raises(ValueError, match="run_options: sp_alpha='much' is not a valid value"):
        tiny_config(tmp_path / "bad0", run_options=["sp_alpha=much"])
    with pytest.raises(ValueError, match="run_options: sp_nothing is not a field"):
        tiny_config(tmp_path / "bad1", run_options=["sp_nothing=1"])
    with pytest.raises(ValueError, match="must be NAME=VALUE"):
        tiny_config(tmp_path / "bad2", run_options=["use_cpu"])


def test_fisher_names_and_normalization():
    from conftest import tiny_timm_cnn

    from hf_sp.models import wrap_timm_model

    target = wrap_timm_model(tiny_timm_cnn())
    names = [n for n, _ in target.named_parameters() if n.endswith("conv1.weight")]
    raw = {n.removeprefix("timm_model."): torch.full_like(p, 2.0) for n, p in target.named_parameters()}
    mapped = map_fisher_names(raw, target, names)  # a raw timm Fisher serves the wrapped target
    assert list(mapped) == names
    with pytest.raises(ValueError, match="no entry"):
        map_fisher_names({}, target, names)
    with pytest.raises(ValueError, match="shape"):
        map_fisher_names({n.removeprefix("timm_model."): torch.ones(1) for n in names}, target, names)
    fisher = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([0.0, 0.0, 8.0, 0.0])}  # mean 2
    normed, stats = normalize_fisher(fisher, "mean", clip=3.0)
    assert normed["a"].tolist() == [0.5, 1.5] and normed["b"].tolist() == [0.0, 0.0, 3.0, 0.0]
    assert stats["raw_mean"] == 2.0 and stats["max_over_mean"] == 4.0 and stats["clipped_fraction"] == 1 / 6
    raw_f, _ = normalize_fisher(fisher, "none")
    assert raw_f["b"].tolist() == [0.0, 0.0, 8.0, 0.0]


# ------------------------------------------------------------------------------------------------ paper configs
PAPER_CONFIGS = sorted((ROOT / "configs").glob("paper_*.yaml"))


def test_paper_configs_exist():
    assert ROOT / "configs" / "paper_resnet101_stanford_dogs.yaml" in PAPER_CONFIGS


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_config_is_the_papers_protocol(path):
    model_args, data_args, args = finetune_parse_args(["--config", str(path)])
    assert model_args.model_name_or_path == "timm/resnet101.tv_in1k"  # torchvision's ImageNet ResNet-101
    assert data_args.dataset_name and "/" in data_args.dataset_name and data_args.train_dir is None
    assert model_args.image_size == 224
    assert args.per_device_train_batch_size == 64 and args.max_steps == 9000
    assert args.optim == "sgd" and "momentum=0.9" in args.optim_args and args.weight_decay == 0
    assert args.sp_penalty in ("l2_sp", "l2") and args.sp_alpha > 0 and args.sp_beta > 0
    assert args.lr_scheduler_type == "warmup_stable_decay"
    if "caltech256" in path.stem:  # Caltech256-30: 30 train images per class
        assert data_args.shots_per_class == {"train": 30}


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_schedule_drops_the_learning_rate_tenfold_at_6000(path):
    from transformers.optimization import get_scheduler

    _, _, args = finetune_parse_args(["--config", str(path)])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.get_warmup_steps(args.max_steps),
        num_training_steps=args.max_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    lrs = []
    for _ in range(args.max_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    lr = args.learning_rate
    assert lrs[0] == lrs[5999] == pytest.approx(lr)
    assert lrs[6000] == lrs[8999] == pytest.approx(lr / 10)


def test_pause_while_another_process_runs():
    import subprocess
    import sys
    import time

    marker = "hf_sp_test_pause_marker_7f3a"
    assert reproduce.wait_while_running(marker, poll_seconds=0.1) < 0.1  # nothing to wait for
    assert reproduce.wait_while_running(None) == 0.0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)", marker])
    try:
        time.sleep(0.3)  # let it start
        waited = reproduce.wait_while_running(marker, poll_seconds=0.1)
    finally:
        child.kill()
        child.wait()
    assert waited >= 0.8


def test_diagnostics_of_an_extra_grid_point_retrain_it_if_its_weights_were_deleted(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from hf_sp.loading import PACKAGED_LITE0, load_model
    from hf_sp.models import timm_layout_state_dict

    start = timm_layout_state_dict(load_model(PACKAGED_LITE0, num_labels=3, id2label={0: "a", 1: "b", 2: "c"}).model)
    calls = []

    def fake_training(config, spec, run_dir, fisher_path):
        """No training: the start weights, slightly moved, and a val accuracy that grows with alpha."""
        calls.append(spec.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v + 0.01 * spec.alpha for k, v in start.items()}, str(run_dir / "model.safetensors"))
        acc = 0.5 + spec.alpha / 10
        return {"status": "ok", "val_accuracy": acc, "test_accuracy": acc, "train_runtime": 1.0, "wall_time": 1.0}

    monkeypatch.setattr(reproduce, "train_one", fake_training)
    config = tiny_config(tmp_path, alpha_grid={"l2": [1e-3], "l2_sp": [0.1, 1.0]}, linear_probe=False)
    reproduce.run_sweep(config)
    assert len(calls) == 5  # 3 grid runs, then l2 and l2_sp (alpha 1, the best on val) with seed 1
    out = Path(config.output_dir)
    assert not (out / "runs" / RunSpec("l2_sp", 0.1, 0.01, 0.01, 0).name / "model.safetensors").exists()

    calls.clear()
    config.diagnostic_extra = ["l2_sp=0.1"]
    reproduce.run_sweep(config)
    assert calls == [RunSpec("l2_sp", 0.1, 0.01, 0.01, 0).name]  # trained again, for the diagnostics only
    diag = json.loads((out / "diagnostics.json").read_text())
    assert set(diag["relative_distance"]) == {"L2 a=0.001 (chosen)", "L2-SP a=1 (chosen)", "L2-SP a=0.1"}
    assert diag["runs"]["L2-SP a=0.1"].startswith("diagnostic_runs/")
    # the chosen L2-SP run moved 10x further than the extra one (0.01 vs 0.001 on every weight)
    chosen = diag["relative_distance"]["L2-SP a=1 (chosen)"]["conv_stem.weight"]
    assert chosen == pytest.approx(10 * diag["relative_distance"]["L2-SP a=0.1"]["conv_stem.weight"], rel=1e-4)
    calls.clear()
    reproduce.run_sweep(config)
    assert calls == []  # its weights are kept now
    with pytest.raises(ValueError, match="diagnostic_extra 'l2_sp=3'"):
        tiny_config(tmp_path / "x", diagnostic_extra=["l2_sp=3"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("reproduce_*.yaml")), ids=lambda p: p.stem)
def test_sweep_configs_parse_and_compare_against_l2_with_three_seeds(path):
    config = parse_args(["--config", str(path)])
    assert "l2" in config.methods and "l2_sp" in config.methods
    assert len(config.seeds) >= 3
    assert config.output_dir.startswith("results/")
    # the public source and the selection of our data sets, nothing that only exists beside this repository
    assert "shared" not in path.read_text() and config.data_dir is None and "/" in config.dataset_name
    assert config.resplit
    if "caltech101" in path.stem:
        assert config.shots_per_class == {"train": 20, "validation": 5, "test": 20}
        assert config.exclude_classes == ["background_google", "faces_easy"]
    else:
        assert config.shots_per_class == {"train": 40, "validation": 40, "test": 40}
        assert len(config.classes) == 10 and config.classes[0] == "banded" and config.classes[-1] == "crystalline"
    # a local copy replaces the Hub source and keeps the selection
    local = parse_args(["--config", str(path), "--data_dir", "copy/images"])
    assert local.dataset_name is None and local.shots_per_class == config.shots_per_class
    assert reproduce.data_options(local)["train_dir"] == "copy/images"


@pytest.mark.slow
def test_sweep_on_a_hub_style_data_set_with_classes_and_shots(tmp_path):
    from test_data_selection import hub_style_folder

    source = hub_style_folder(tmp_path / "hub", with_names=True)  # what load_dataset(<Hub id>) reads, offline
    yaml_file = tmp_path / "sweep.yaml"
    yaml_file.write_text(
        f"dataset_name: {source}\noutput_dir: {tmp_path / 'sweep'}\nclasses: [cat, owl]\nresplit: true\n"
        "shots_per_class: {train: 4, validation: 3, test: 3}\n"
    )
    args = ["--methods", "l2_sp", "--alpha_grid", "l2_sp=0.1", "--seeds", "0", "--image_size", "32"]
    args += ["--num_train_epochs", "1", "--batch_size", "4", "--probe_c_grid", "1", "--diagnostics", "false"]
    config = parse_args(["--config", str(yaml_file), *args])
    config.run_options = {"use_cpu": True, "disable_tqdm": True}
    report = reproduce.run_sweep(config)
    (run,) = report["runs"]
    assert run["status"] == "ok"
    results = json.loads((Path(config.output_dir) / run["run_dir"] / "all_results.json").read_text())
    # the run (the CLI's job) saw the selection: 2 classes x 4 train, 2 x 3 val and test
    assert (results["train_samples"], results["eval_samples"], results["test_samples"]) == (8, 6, 6)
    probe = report["linear_probe"]
    assert 0 <= probe["test_accuracy"] <= 1 and "grid" in probe
    assert (
        (Path(config.output_dir) / "results.md")
        .read_text()
        .startswith(f"# Fine-tuning {config.model_name_or_path} on hub:")
    )


def test_difference_to_l2_with_its_standard_error():
    l2 = {"test_mean": 0.80, "test_std": 0.03, "n": 3}
    sp = {"test_mean": 0.82, "test_std": 0.04, "n": 4}
    # +2.0 points, se = sqrt(3^2/3 + 4^2/4) = sqrt(7) = 2.65
    assert reproduce._vs_baseline(sp, l2) == "+2.0 +- 2.6"
    assert reproduce._vs_baseline({**sp, "n": 1}, l2) == "-"
    assert reproduce._vs_baseline(sp, None) == "-"


def test_a_folder_made_with_the_old_extra_args_is_not_resumed_without_them(tmp_path):
    config = tiny_config(tmp_path)
    out = Path(config.output_dir)
    out.mkdir(parents=True)
    (out / "sweep_config.json").write_text(json.dumps({**config.to_dict(), "extra_args": ["--sp_include", "all"]}))
    with pytest.raises(ValueError, match="extra_args=.*give them as run_options"):
        reproduce._check_budget(config, out)
    plain = tiny_config(tmp_path / "plain", run_options={})
    old = {k: v for k, v in plain.to_dict().items() if k != "run_options"}
    (out / "sweep_config.json").write_text(json.dumps({**old, "extra_args": []}))
    reproduce._check_budget(plain, out)  # an empty old value, an absent new one: the same budget
    with pytest.raises(ValueError, match="another budget .*run_options"):
        reproduce._check_budget(config, out)  # run_options given now, none then
