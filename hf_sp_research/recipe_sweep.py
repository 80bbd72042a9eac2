"""Recipe sweep: L2, L2-SP, the linear probe, LP-FT and LP-FT + L2-SP, with and without frozen BatchNorm and
interpolation toward the start, under one training budget, every choice made on the validation split.

1. **Linear probe**: :func:`hf_sp.methods.fit_linear_probe` on the frozen features (``C`` on val).
2. **Grid** (first seed): every recipe at every setting of its grid. Each run is one ``SPTrainer`` training;
   after it, the weights are moved along ``w_start + t (w_ft - w_start)`` (:func:`hf_sp.methods.interpolate_`)
   and val and test are evaluated at each ``t``, which gives the recipe as trained (``t = 1``) and
   interpolated (``t`` chosen on val) from the same run.
3. **Seeds**: each recipe's val-chosen setting (for each of the two variants) at the other seeds.
4. **Report**: ``results.json`` (every run) and ``results.md`` (test top-1, mean +- std over seeds, and the
   differences to L2 and to the probe with their standard errors).

Resumable: a run whose ``run_result.json`` exists is skipped. ``report_only`` (``--report_only``) trains nothing
and reports the finished runs of a sweep still under way, listing the runs it still lacks. Everything goes
through the library's public API.

Example:
    >>> config = RecipeSweepConfig(data_dir="data/dtd10", output_dir="results/dtd10_recipes")
    >>> report = run_recipe_sweep(config)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import TrainerCallback

from hf_sp import SPConfig, SPTrainer
from hf_sp.data import DEFAULT_CROP_SCALE, attach_transform, build_transforms, collate, load_image_dataset
from hf_sp.loading import PACKAGED_LITE0, load_model
from hf_sp.methods import extract_head_inputs, fit_linear_probe, head_linear, interpolate_
from hf_sp.metrics import build_compute_metrics
from hf_sp.selection import find_head_modules

from .recipes import RECIPES, Recipe

logger = logging.getLogger("hf_sp_research.recipe_sweep")

RESULT_FILE = "run_result.json"


@dataclass
class RecipeSweepConfig:
    """What the sweep trains on, with which budget, and which recipes it compares."""

    data_dir: str | None = None
    dataset_name: str | None = None
    classes: list[str] | None = None
    exclude_classes: list[str] | None = None
    shots_per_class: str | dict[str, int] | None = None
    resplit: bool = False
    output_dir: str = "results/recipes"
    model_name_or_path: str = PACKAGED_LITE0
    image_size: int = 128
    num_train_epochs: float = 12.0
    batch_size: int = 32
    eval_batch_size: int = 64
    sp_beta: float = 0.01
    #: Area range of the training crops, unless a recipe sets its own ``train_crop_scale``.
    train_crop_scale: list[float] = field(default_factory=lambda: list(DEFAULT_CROP_SCALE))
    recipes: list[str] = field(default_factory=lambda: list(RECIPES))
    #: Replaces a recipe's grid, e.g. ``{"lp_ft_frozen_bn": [{"learning_rate": 0.001}]}``.
    grids: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: Recipes run at the first seed only (diagnostics); the others run every seed at their chosen setting.
    one_seed: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    interpolation_grid: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    probe_c_grid: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0])
    #: Train nothing: report the finished runs (a choice made on the grid's finished runs only) and list the others.
    report_only: bool = False

    def __post_init__(self) -> None:
        if (self.data_dir is None) == (self.dataset_name is None):
            raise ValueError("Give exactly one of data_dir (imagefolder with train/ val/ test/) or dataset_name.")
        unknown = [r for r in [*self.recipes, *self.grids, *self.one_seed] if r not in RECIPES]
        if unknown:
            raise ValueError(f"recipes: unknown {unknown}; known: {list(RECIPES)}.")
        for name, grid in self.grids.items():
            for setting in grid:
                bad = {k: v for k, v in setting.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
                if bad:
                    raise ValueError(
                        f"grids: {name}: {bad} — a grid setting holds numbers (they name the runs); put other values "
                        "(e.g. train_crop_scale) in a recipe's fields."
                    )
        if not self.seeds:
            raise ValueError("seeds is empty.")
        if 1.0 not in self.interpolation_grid:
            raise ValueError("interpolation_grid must contain 1.0 (the recipe as trained).")


@dataclass(frozen=True)
class RunSpec:
    recipe: str
    setting: tuple[tuple[str, Any], ...]
    seed: int

    @property
    def name(self) -> str:
        parts = "-".join(f"{k.removeprefix('sp_').replace('learning_rate', 'lr')}{v:g}" for k, v in self.setting)
        return f"{self.recipe}-{parts}-s{self.seed}"


class _Data:
    """The data set and the source model's preprocessing, loaded once."""

    def __init__(self, config: RecipeSweepConfig):
        root = Path(config.data_dir) if config.data_dir else None
        self.dataset = load_image_dataset(
            config.dataset_name,
            train_dir=str(root / "train") if root else None,
            validation_dir=str(root / "val") if root else None,
            test_dir=str(root / "test") if root else None,
            classes=config.classes,
            exclude_classes=config.exclude_classes,
            shots_per_class=config.shots_per_class,
            resplit=config.resplit,
        )
        self.names = self.dataset["train"].features["label"].names
        self.config = config
        self.data_config = self.model().data_config
        self.train_tf, self.eval_tf = build_transforms(self.data_config, config.image_size, config.train_crop_scale)

    def model(self):
        loaded = load_model(
            self.config.model_name_or_path, num_labels=len(self.names), id2label=dict(enumerate(self.names))
        )
        loaded.set_image_size(self.config.image_size)
        return loaded

    def split(self, name: str, train_transform: bool = False, crop_scale: Sequence[float] | None = None):
        """A split with the eval transform, or the training one (with crops of ``crop_scale`` if given)."""
        part = self.dataset[name].with_format(None)
        if not train_transform:
            return attach_transform(part, self.eval_tf)
        if crop_scale is None:
            return attach_transform(part, self.train_tf)
        return attach_transform(part, build_transforms(self.data_config, self.config.image_size, crop_scale)[0])


class _StartOfTraining(TrainerCallback):
    """The weights as the first step is about to be taken (after the methods' initialize phase: the probe head)."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.state is None:
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}


def linear_probe(config: RecipeSweepConfig, data: _Data) -> dict[str, Any]:
    """The probe on frozen features, through the library's probe functions; C chosen on val."""
    from torch.utils.data import DataLoader

    start = time.perf_counter()
    model = data.model().model
    _, linear = head_linear(model, find_head_modules(model), len(data.names))

    def features(split: str):
        loader = DataLoader(data.split(split), batch_size=config.eval_batch_size, collate_fn=collate)
        return extract_head_inputs(model, linear, loader, desc=f"probe features ({split})")

    (xtr, ytr), (xva, yva), (xte, yte) = (features(s) for s in ("train", "validation", "test"))
    probe = fit_linear_probe(
        xtr, ytr, num_classes=len(data.names), c_grid=config.probe_c_grid, eval_features=xva, eval_labels=yva
    )
    test = float(((xte.double() @ probe.weight.T + probe.bias).argmax(1) == yte).double().mean())
    return {"C": probe.C, "val_accuracy": probe.score, "test_accuracy": test, "grid": probe.scores,
            "runtime": time.perf_counter() - start}


def train_one(config: RecipeSweepConfig, data: _Data, spec: RunSpec, run_dir: Path, recipe: Recipe) -> dict[str, Any]:
    """One training of ``spec``, then val and test along the interpolation path."""
    loaded = data.model()
    settings = {**recipe.fields, **dict(spec.setting)}
    crop_scale = settings.pop("train_crop_scale", None)  # the data's, not SPConfig's
    args = SPConfig(
        output_dir=str(run_dir),
        sp_beta=config.sp_beta,
        optim="sgd",
        optim_args="momentum=0.9",
        max_grad_norm=0.0,
        lr_scheduler_type="cosine",
        num_train_epochs=config.num_train_epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=10,
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=spec.seed,
        **settings,
    )
    start_of_training = _StartOfTraining()
    val, test = data.split("validation"), data.split("test")
    torch.manual_seed(spec.seed)
    trainer = SPTrainer(
        model=loaded.model,
        args=args,
        train_dataset=data.split("train", train_transform=True, crop_scale=crop_scale),
        eval_dataset=val,
        probe_dataset=data.split("train"),
        data_collator=collate,
        compute_metrics=build_compute_metrics(),
        callbacks=[start_of_training],
    )
    began = time.perf_counter()
    output = trainer.train()
    train_time = time.perf_counter() - began
    model = trainer.model
    names = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    targets = [model.state_dict()[k] for k in names]
    end = [t.detach().clone() for t in targets]
    start = [start_of_training.state[k] for k in names]
    curve = []
    for t in config.interpolation_grid:
        interpolate_(targets, start, end, t)
        curve.append(
            {
                "t": t,
                "val_accuracy": trainer.evaluate(val)["eval_accuracy"],
                "test_accuracy": trainer.evaluate(test, metric_key_prefix="test")["test_accuracy"],
            }
        )
    # val picks t; ties go to the larger t
    chosen = max(curve, key=lambda c: (c["val_accuracy"], c["t"]))
    trained = next(c for c in curve if c["t"] == 1.0)
    distance = sum(float((a - b).double().square().sum()) for a, b in zip(end, start, strict=True)) ** 0.5
    return {
        "recipe": spec.recipe,
        "setting": dict(spec.setting),
        "seed": spec.seed,
        "val_accuracy": trained["val_accuracy"],
        "test_accuracy": trained["test_accuracy"],
        "interp_t": chosen["t"],
        "interp_val_accuracy": chosen["val_accuracy"],
        "interp_test_accuracy": chosen["test_accuracy"],
        "curve": curve,
        "train_loss": output.training_loss,
        "distance_to_start": distance,
        "train_runtime": train_time,
        "log_history": trainer.state.log_history,
    }


def _run(config: RecipeSweepConfig, data: _Data | None, spec: RunSpec, recipe: Recipe) -> dict[str, Any] | None:
    """The run's result: read back when it is finished, trained otherwise (``None`` under ``report_only``)."""
    run_dir = Path(config.output_dir) / "runs" / spec.name
    path = run_dir / RESULT_FILE
    if path.is_file():
        return json.loads(path.read_text())
    if data is None:  # report_only: nothing is trained
        return None
    logger.info("run %s", spec.name)
    try:
        result = train_one(config, data, spec, run_dir, recipe)
    except FloatingPointError as err:  # a diverged run is a result: chance accuracy, recorded as such
        result = {"recipe": spec.recipe, "setting": dict(spec.setting), "seed": spec.seed, "diverged": str(err),
                  "val_accuracy": 0.0, "test_accuracy": 0.0, "interp_t": 0.0, "interp_val_accuracy": 0.0,
                  "interp_test_accuracy": 0.0}
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    for weights in run_dir.glob("*.safetensors"):
        weights.unlink()
    logger.info(
        "done %s: val %.4f test %.4f | interpolated t=%g val %.4f test %.4f",
        spec.name, result["val_accuracy"], result["test_accuracy"], result["interp_t"],
        result["interp_val_accuracy"], result["interp_test_accuracy"],
    )
    return result


def _grid_specs(recipe: Recipe, seed: int) -> list[RunSpec]:
    return [RunSpec(recipe.name, tuple(sorted(s.items())), seed) for s in recipe.grid]


VARIANTS = {"trained": "val_accuracy", "interpolated": "interp_val_accuracy"}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_recipe_sweep(config: RecipeSweepConfig) -> dict[str, Any]:
    """Probe, grids, seeds, report; returns the report (also written to ``output_dir``)."""
    out = Path(config.output_dir)
    probe_path = out / "linear_probe.json"
    if config.report_only and not probe_path.is_file():
        raise FileNotFoundError(f"report_only: {probe_path} does not exist; nothing of this sweep has run yet.")
    out.mkdir(parents=True, exist_ok=True)
    data = None if config.report_only else _Data(config)
    if not probe_path.is_file():
        probe_path.write_text(json.dumps(linear_probe(config, data), indent=1))
    probe = json.loads(probe_path.read_text())
    first = config.seeds[0]
    recipes = [replace(RECIPES[r], grid=config.grids.get(r, RECIPES[r].grid)) for r in config.recipes]
    seeded = {r.name for r in recipes if r.name not in config.one_seed}
    missing: list[str] = []

    def runs(specs: list[RunSpec], recipe: Recipe) -> list[dict[str, Any]]:
        results = [(spec, _run(config, data, spec, recipe)) for spec in specs]
        missing.extend(spec.name for spec, result in results if result is None and spec.name not in missing)
        return [result for _, result in results if result is not None]

    grid = {r.name: runs(_grid_specs(r, first), r) for r in recipes if r.name in seeded}
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for recipe in recipes:
        if not grid.get(recipe.name):  # a one-seed recipe (trained after the others' seeds), or none finished yet
            continue
        for variant, key in VARIANTS.items():
            chosen[recipe.name, variant] = max(grid[recipe.name], key=lambda r, key=key: r[key])  # ties: grid order
    rows = []
    for recipe in sorted(recipes, key=lambda r: r.name not in seeded):
        if recipe.name not in grid:
            grid[recipe.name] = runs(_grid_specs(recipe, first), recipe)
        if not grid[recipe.name]:  # report_only, and no run of its grid has finished
            continue
        for variant, key in VARIANTS.items():
            best = chosen.get((recipe.name, variant)) or max(grid[recipe.name], key=lambda r, key=key: r[key])
            seeds = [best]
            if recipe.name in seeded:
                spec = RunSpec(recipe.name, tuple(sorted(best["setting"].items())), first)
                seeds += runs([RunSpec(spec.recipe, spec.setting, s) for s in config.seeds[1:]], recipe)
            test_key = "test_accuracy" if variant == "trained" else "interp_test_accuracy"
            tests = [r[test_key] for r in seeds]
            mean, std = _mean_std(tests)
            rows.append({
                "recipe": recipe.name, "title": recipe.title, "variant": variant, "setting": best["setting"],
                "val_accuracy": best[key], "test": tests, "test_mean": mean, "test_std": std,
                "t": [r["interp_t"] for r in seeds] if variant == "interpolated" else None,
            })
    report = {"config": asdict(config), "linear_probe": probe, "rows": rows,
              "runs": {r: grid[r] for r in grid}, "missing": missing}
    (out / "results.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "results.md").write_text(markdown_report(report))
    return report


def _difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Difference of means and its (Welch) standard error."""
    se = math.sqrt(sum(statistics.variance(x) / len(x) if len(x) > 1 else 0.0 for x in (a, b)))
    return statistics.fmean(a) - statistics.fmean(b), se


def markdown_report(report: dict[str, Any]) -> str:
    """Tables: test top-1 per recipe and variant, with the differences to L2 (trained) and to the probe."""
    probe = report["linear_probe"]
    rows = report["rows"]
    l2 = next((r for r in rows if r["recipe"] == "l2" and r["variant"] == "trained"), None)
    cfg = report["config"]
    lines = [
        f"# Recipe sweep: {cfg['data_dir'] or cfg['dataset_name']}",
        "",
        f"{cfg['model_name_or_path']} at {cfg['image_size']} px, {cfg['num_train_epochs']:g} epochs, batch "
        f"{cfg['batch_size']}, SGD momentum 0.9, cosine, beta {cfg['sp_beta']:g}; settings chosen on val at seed "
        f"{cfg['seeds'][0]}, then seeds {cfg['seeds']}; test top-1 % mean ± std. 'interpolated': w_start + t (w - "
        "w_start), t chosen on val, same runs.",
        *(
            ["", f"**Sweep under way**: {len(report['missing'])} runs not finished yet (listed at the end); a choice "
             "on val is made among the finished settings only."]
            if report.get("missing") else []
        ),
        "",
        f"Linear probe: val {100 * probe['val_accuracy']:.2f}, **test {100 * probe['test_accuracy']:.2f}** "
        f"(C = {probe['C']:g}).",
        "",
        "| recipe | variant | chosen setting | val | test (seeds) | vs L2 | vs probe | t |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        setting = ", ".join(f"{k}={v:g}" for k, v in r["setting"].items())
        vs_l2 = vs_probe = ""
        if len(r["test"]) > 1 and l2 is not None and len(l2["test"]) > 1:
            d, se = _difference(r["test"], l2["test"])
            vs_l2 = f"{100 * d:+.1f} ± {100 * se:.1f}"
        if len(r["test"]) > 1:
            d, se = _difference(r["test"], [probe["test_accuracy"]])
            vs_probe = f"{100 * d:+.1f} ± {100 * se:.1f}"
        n, total = len(r["test"]), 1 if r["recipe"] in cfg["one_seed"] else len(cfg["seeds"])
        std = f" ± {100 * r['test_std']:.1f}" if n > 1 else " (1 seed)" if total == 1 else ""
        if n < total:  # report_only while the sweep is under way
            std += f" ({n} of {total} seeds)"
        t = ", ".join(f"{x:g}" for x in r["t"]) if r["t"] else ""
        lines.append(
            f"| {r['title']} | {r['variant']} | {setting} | {100 * r['val_accuracy']:.2f} | "
            f"{100 * r['test_mean']:.1f}{std} | {vs_l2} | {vs_probe} | {t} |"
        )
    if report.get("missing"):
        lines += ["", "Not finished yet: " + ", ".join(f"`{name}`" for name in report["missing"]) + "."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file with RecipeSweepConfig fields.")
    parser.add_argument("--data_dir")
    parser.add_argument("--output_dir")
    parser.add_argument("--recipes", nargs="+")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument(
        "--report_only", action="store_true", default=None, help="train nothing: report the finished runs"
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> RecipeSweepConfig:
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        values = yaml.safe_load(Path(args.config).read_text()) or {}
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    if args.data_dir is not None:  # a local copy replaces the public source and its selection
        for key in ("dataset_name", "classes", "exclude_classes", "shots_per_class", "resplit"):
            values.pop(key, None)
    return RecipeSweepConfig(**values)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = parse_args(argv)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"error: {err}") from None
    try:
        report = run_recipe_sweep(config)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    print(markdown_report(report))
