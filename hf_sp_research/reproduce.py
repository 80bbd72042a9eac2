"""The paper's comparison on one machine: L2 vs the starting-point penalties, plus a linear probe.

Li, Grandvalet and Davoine (ICML 2018) fine-tune an ImageNet network on a target task with
``l2`` (decay toward zero, the usual baseline) and with ``l2_sp``, ``l1_sp``, ``group_lasso_sp`` and
``l2_sp_fisher`` (pull toward the pretrained weights), choose alpha and beta by cross-validation,
and report test top-1 accuracy, mean +- std over runs. :func:`run_sweep` does the same on an
imagefolder data set (``train/``, ``val/``, ``test/``), with the same training budget for every
method:

1. **Linear probe** (reference): frozen features of the source model + scikit-learn logistic
   regression, ``C`` chosen on val.
2. **Fisher** (for ``l2_sp_fisher``): the diagonal Fisher of the *source* model with its own
   ImageNet head (before the head is replaced), weighted by its own predictions over its top-k
   classes (:func:`hf_sp.estimate_fisher` with ``top_k``). Without source-task (ImageNet) images it is
   estimated on the target's *training* images; it is then (optionally) divided by its mean over the
   anchored entries, so that the alpha grid of ``l2_sp_fisher`` is on the scale of ``l2_sp``'s, and
   clipped (a stability guard: plain SGD with momentum ``m`` diverges on a coordinate where
   ``lr * alpha * F_jj > 2 (1 + m)``).
3. **Grid**: every method at every (alpha, beta, lr) of its grid, with the first seed.
4. **Selection** on val accuracy (ties: the first in grid order), then the other seeds at the chosen
   setting. The first seed's grid run is reused as the chosen setting's first seed.
5. **Report**: ``results.json`` (every run), ``results.md`` (tables), ``results.png`` (test accuracy
   per method, val accuracy along each grid) and the diagnostics of the chosen runs
   (``diagnostics.json`` / ``diagnostics.png``: per-layer distance to the start and feature R^2).

Each run is :func:`hf_sp.finetune.run` (the CLI's job) in its own folder under ``output_dir/runs``.
The sweep is resumable: a run whose ``run_result.json`` exists is skipped; a half-finished run
resumes from its last checkpoint (one per epoch, only the last kept, deleted once the run is done).

Example:
    >>> config = SweepConfig(output_dir="results/dtd10", data_dir="data/dtd10", image_size=96)
    >>> results = run_sweep(config)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from hf_sp.cli import apply_yaml_config
from hf_sp.loading import PACKAGED_LITE0

from .machine import machine_info

logger = logging.getLogger("hf_sp_research.reproduce")

#: The methods of the paper's comparison, in table order (``l2`` is the baseline).
METHODS: tuple[str, ...] = ("l2", "l2_sp", "l1_sp", "group_lasso_sp", "l2_sp_fisher")

#: Default alpha grids: ``l2`` around the usual weight decay; ``l2_sp`` (and ``l2_sp_fisher`` with its Fisher
#: normalized to mean 1) over a wider range, as the authors' Dogs example (L2 alpha 1e-4, L2-SP alpha 0.1) and the
#: pilot on this machine (alpha 0.1) suggest. ``l1_sp`` and ``group_lasso_sp`` pull every coordinate with a force
#: of about alpha whatever its displacement d (L2-SP: alpha * d), and fine-tuning moves weights by d ~ 1e-3, so
#: their grid sits about three decades lower to span the same weak-to-strong range.
DEFAULT_ALPHA_GRID: dict[str, list[float]] = {
    "l2": [1e-4, 1e-3, 1e-2],
    "l2_sp": [1e-3, 1e-2, 1e-1, 1.0],
    "l1_sp": [1e-5, 1e-4, 1e-3, 1e-2],
    "group_lasso_sp": [1e-5, 1e-4, 1e-3, 1e-2],
    "l2_sp_fisher": [1e-3, 1e-2, 1e-1, 1.0],
}

PRETTY = {
    "l2": "L2",
    "l2_sp": "L2-SP",
    "l1_sp": "L1-SP",
    "group_lasso_sp": "Group-Lasso-SP",
    "l2_sp_fisher": "L2-SP-Fisher",
    "linear_probe": "linear probe",
}

RESULT_FILE = "run_result.json"
#: Where runs are trained again for the diagnostics when an earlier invocation deleted their weights.
DIAGNOSTIC_RUNS = "diagnostic_runs"
FISHER_FILE = "fisher.safetensors"
#: Diagnostics reference: the source weights with BatchNorm statistics re-estimated on target train images.
BN_LABEL = "w0, target BatchNorm statistics"
BN_IMAGES = 512

#: Fields of :class:`SweepConfig` that define the training budget: a sweep folder holds runs of one budget only.
BUDGET_FIELDS = (
    "data_dir",
    "dataset_name",
    "dataset_config_name",
    "classes",
    "exclude_classes",
    "shots_per_class",
    "resplit",
    "model_name_or_path",
    "image_size",
    "num_train_epochs",
    "batch_size",
    "lr_scheduler_type",
    "warmup_steps",
    "train_augmentation",
    "run_options",
)


def _parse_options(values: Sequence[str] | dict[str, Any]) -> dict[str, Any]:
    """``["sp_include=all", "max_grad_norm=1e-3"]`` or a mapping -> ``{"sp_include": "all", "max_grad_norm": 0.001}``.

    Each value is converted as the fine-tuning command line converts it (its field's type: ``1e-3`` is a float,
    ``0.35 1.0`` a list); a name that no fine-tuning dataclass has is refused here, before any run.
    """
    if isinstance(values, dict):
        raw = dict(values)
    else:
        raw = {}
        for item in values:
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"run_options entry {item!r} must be NAME=VALUE, e.g. sp_include=all.")
            raw[name.strip().lstrip("-")] = value.split()
    unknown = sorted(set(raw) - set(_finetune_fields()))
    if unknown:
        raise ValueError(
            f"run_options: {', '.join(unknown)} is not a field of ModelArguments, DataArguments or SPConfig "
            "(see python scripts/finetune.py --help)."
        )
    from hf_sp.finetune import build_parser

    parser, options = build_parser(), {}
    for name, value in raw.items():
        tokens = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        try:
            namespace, _ = parser.parse_known_args([f"--{name}", *tokens])
        except SystemExit:  # argparse has printed why
            raise ValueError(f"run_options: {name}={' '.join(tokens)!r} is not a valid value.") from None
        options[name] = getattr(namespace, name)
    return options


def _finetune_fields() -> dict[str, type]:
    """Field name -> the hf_sp.finetune dataclass (ModelArguments, DataArguments, SPConfig) that holds it."""
    from hf_sp import SPConfig
    from hf_sp.finetune import DataArguments, ModelArguments

    return {f.name: cls for cls in (SPConfig, DataArguments, ModelArguments) for f in dataclasses.fields(cls) if f.init}


def _parse_grid(values: Sequence[str] | dict[str, Any]) -> dict[str, list[float]]:
    """``["l2=1e-4,1e-3", "l2_sp=0.1"]`` or ``{"l2": [1e-4, 1e-3]}`` -> ``{"l2": [0.0001, 0.001], ...}``."""
    if isinstance(values, dict):
        items = values.items()
    else:
        items = []
        for item in values:
            if "=" not in item:
                raise ValueError(f"alpha_grid entries look like METHOD=A,B,C (e.g. l2_sp=0.01,0.1), got {item!r}.")
            method, numbers = item.split("=", 1)
            items.append((method.strip(), [v for v in numbers.split(",") if v.strip()]))
    grid = {}
    for method, numbers in items:
        numbers = [numbers] if isinstance(numbers, (int, float, str)) else list(numbers)
        try:
            grid[method] = [float(v) for v in numbers]
        except ValueError as err:
            raise ValueError(f"alpha_grid for {method!r} must be numbers, got {numbers!r}.") from err
    return grid


@dataclass
class SweepConfig:
    """What to compare, on which data, with which budget. Every field is a command-line option of
    ``scripts/reproduce.py`` and a key of its ``--config`` YAML file.

    Example:
        >>> SweepConfig(output_dir="results/dtd10", data_dir="data/dtd10", methods=["l2", "l2_sp"], seeds=[0, 1, 2])
    """

    output_dir: str = field(metadata={"help": "The sweep folder: runs/, results.json, results.md, results.png."})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Local imagefolder data: train/, val/ and test/ sub-folders, or one folder per class with "
            "--resplit. Takes precedence over --dataset_name (a local copy of the configured source)."
        },
    )
    dataset_name: str | None = field(default=None, metadata={"help": "Hub data set id (see scripts/finetune.py)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub data set."})
    classes: list[str] | None = field(default=None, metadata={"help": "Keep only these classes.", "nargs": "+"})
    exclude_classes: list[str] | None = field(
        default=None, metadata={"help": "Leave these classes out.", "nargs": "+"}
    )
    shots_per_class: str | None = field(
        default=None,
        metadata={
            "help": "Examples per class and split, chosen by file-name hash, e.g. train=40,validation=40,test=40."
        },
    )
    resplit: bool = field(
        default=False, metadata={"help": "Pool every split of the source and deal --shots_per_class anew."}
    )
    model_name_or_path: str = field(
        default=PACKAGED_LITE0, metadata={"help": "Source model (any --model_name_or_path of scripts/finetune.py)."}
    )
    methods: list[str] = field(
        default_factory=lambda: list(METHODS), metadata={"help": "Penalties to compare.", "nargs": "+"}
    )
    alpha_grid: dict[str, list[float]] = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_ALPHA_GRID.items()},
        metadata={
            "help": "alpha values per method, e.g. --alpha_grid l2=1e-4,1e-3 l2_sp=0.01,0.1 (methods not named keep "
            "their default grid).",
            "nargs": "+",
        },
    )
    beta_grid: list[float] = field(
        default_factory=lambda: [0.01], metadata={"help": "beta (L2 on the new head) values.", "nargs": "+"}
    )
    lr_grid: list[float] = field(
        default_factory=lambda: [0.01], metadata={"help": "Learning rates (same grid for every method).", "nargs": "+"}
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata={"help": "Seeds; the grid runs with the first, the chosen setting with all.", "nargs": "+"},
    )
    image_size: int = field(default=128, metadata={"help": "Train and eval resolution (every method, and the probe)."})
    num_train_epochs: float = field(default=15.0, metadata={"help": "Epochs per run (every method)."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size per device."})
    eval_batch_size: int = field(default=64, metadata={"help": "Evaluation and feature-extraction batch size."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Trainer's lr_scheduler_type."})
    warmup_steps: float = field(
        default=0.0, metadata={"help": "Trainer's warmup_steps: steps, or a fraction in [0, 1) of all steps."}
    )
    train_augmentation: str = field(
        default="standard", metadata={"help": "'standard' (random resized crop + flip) or 'none'."}
    )
    run_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "More fields of hf_sp.finetune's ModelArguments / DataArguments / SPConfig for every run: "
            "NAME=VALUE on the command line (e.g. --run_options sp_include=all use_cpu=true), a mapping in YAML.",
            "nargs": "*",
        },
    )
    linear_probe: bool = field(default=True, metadata={"help": "Fit the linear-probe reference."})
    probe_c_grid: list[float] = field(
        default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0],
        metadata={"help": "Inverse regularization strengths C of the probe, chosen on val.", "nargs": "+"},
    )
    fisher_top_k: int = field(default=10, metadata={"help": "Fisher: sum over the source's top-k predicted classes."})
    fisher_max_samples: int | None = field(
        default=None, metadata={"help": "Fisher: use at most this many training images (default: all)."}
    )
    fisher_batch_size: int = field(default=16, metadata={"help": "Fisher: images per batch."})
    fisher_normalize: str = field(
        default="mean", metadata={"help": "'mean': divide F by its mean over the anchored entries; 'none': raw F."}
    )
    fisher_clip: float | None = field(
        default=100.0,
        metadata={"help": "Clip the (normalized) Fisher at this value (stability guard; 0 or none: no clipping)."},
    )
    diagnostics: bool = field(
        default=True, metadata={"help": "Per-layer distance and feature R^2 of the chosen runs (first seed)."}
    )
    diagnostic_images: int = field(default=64, metadata={"help": "Validation images for the feature R^2."})
    diagnostic_extra: list[str] = field(
        default_factory=list,
        metadata={
            "help": "More grid points (first seed, first beta and lr) to show in the diagnostics beside the chosen "
            "runs, as METHOD=ALPHA, e.g. l2_sp=1 (a strong pull toward w0) l2=0.01; their weights are kept.",
            "nargs": "*",
        },
    )
    keep_weights: str = field(
        default="selected",
        metadata={
            "help": "Fine-tuned weights to keep at the end: 'all', 'selected' (the chosen setting's first seed, "
            "for diagnostics) or 'none'."
        },
    )
    num_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (default: torch's)."})
    pause_while: str | None = field(
        default=None,
        metadata={
            "help": "On a shared machine: before each training run, wait while another process whose command line "
            "contains this string runs (e.g. 'benchmark'), so that neither run's timing is disturbed (Linux)."
        },
    )

    def __post_init__(self) -> None:
        from hf_sp.penalties import list_penalties

        unknown = [m for m in self.methods if m not in list_penalties() or m == "none"]
        if unknown:
            raise ValueError(f"methods {unknown} are not penalties; choose from {list(METHODS)}.")
        if not self.methods:
            raise ValueError("methods is empty: name at least one penalty, e.g. --methods l2 l2_sp.")
        grid = {k: list(v) for k, v in DEFAULT_ALPHA_GRID.items()}
        grid.update(_parse_grid(self.alpha_grid))
        self.alpha_grid = grid
        for method in self.methods:
            values = self.alpha_grid.get(method)
            if not values:
                raise ValueError(f"alpha_grid has no values for {method!r}; add e.g. --alpha_grid {method}=0.01,0.1.")
        for name in ("beta_grid", "lr_grid", "seeds", "probe_c_grid"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty.")
        for name, values in (("alpha_grid", [v for m in self.methods for v in self.alpha_grid[m]]),):
            if any(v < 0 or not math.isfinite(v) for v in values):
                raise ValueError(f"{name} values must be finite and >= 0.")
        if any(v <= 0 for v in self.lr_grid):
            raise ValueError(f"lr_grid values must be > 0, got {self.lr_grid}.")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}.")
        for item in self.diagnostic_extra:
            method, _, alpha = item.partition("=")
            try:
                value = float(alpha)
            except ValueError:
                value = None
            if method not in self.methods or value not in self.alpha_grid[method]:
                raise ValueError(
                    f"diagnostic_extra {item!r} must be METHOD=ALPHA for a method and alpha of the grid "
                    f"(methods {self.methods}), e.g. l2_sp={self.alpha_grid.get('l2_sp', [1.0])[-1]:g}."
                )
        if self.fisher_normalize not in ("mean", "none"):
            raise ValueError(f"fisher_normalize must be 'mean' or 'none', got {self.fisher_normalize!r}.")
        if self.fisher_clip is not None and self.fisher_clip <= 0:
            self.fisher_clip = None
        if self.keep_weights not in ("all", "selected", "none"):
            raise ValueError(f"keep_weights must be 'all', 'selected' or 'none', got {self.keep_weights!r}.")
        if self.train_augmentation not in ("standard", "none"):
            raise ValueError(f"train_augmentation must be 'standard' or 'none', got {self.train_augmentation!r}.")
        from hf_sp.data import parse_shots

        self.shots_per_class = parse_shots(self.shots_per_class)
        self.run_options = _parse_options(self.run_options)
        if self.data_dir is not None and self.dataset_name is not None:
            logger.info("data_dir=%s replaces dataset_name=%s (a local copy).", self.data_dir, self.dataset_name)
            self.dataset_name = self.dataset_config_name = None
        if self.data_dir is None and self.dataset_name is None:
            raise ValueError("Give --data_dir (a local imagefolder tree) or --dataset_name (a Hub data set id).")
        dealt = self.resplit and {"validation", "test"} <= set(self.shots_per_class or {})
        if self.resplit and not dealt:
            raise ValueError(
                "resplit needs shots_per_class for train, validation and test, e.g. train=40,validation=40,test=40."
            )
        for split in ("train", "val", "test"):
            if self.data_dir is not None and not dealt and not (Path(self.data_dir) / split).is_dir():
                raise ValueError(
                    f"data_dir={self.data_dir!r} has no {split}/ folder: give an imagefolder tree with train/, val/ "
                    "and test/ (one sub-folder per class in each), or one folder per class with --resplit and "
                    "--shots_per_class train=K,validation=K,test=K."
                )

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-able values."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunSpec:
    """One training run of the sweep."""

    method: str
    alpha: float
    beta: float
    lr: float
    seed: int

    @property
    def name(self) -> str:
        """Folder name under ``runs/``."""
        return f"{self.method}-a{self.alpha:g}-b{self.beta:g}-lr{self.lr:g}-s{self.seed}"

    @property
    def setting(self) -> tuple[float, float, float]:
        return (self.alpha, self.beta, self.lr)


# ------------------------------------------------------------------------------------------------ planning
def grid_runs(config: SweepConfig) -> list[RunSpec]:
    """The grid stage: every method at every (alpha, beta, lr), with the first seed."""
    seed = config.seeds[0]
    return [
        RunSpec(method, alpha, beta, lr, seed)
        for method in config.methods
        for alpha in config.alpha_grid[method]
        for beta in config.beta_grid
        for lr in config.lr_grid
    ]


def select_settings(config: SweepConfig, results: dict[str, dict]) -> dict[str, RunSpec]:
    """Per method, the grid run with the best val accuracy (ties: the first in grid order).

    Runs that diverged or are missing are skipped; a method with no finished grid run is left out.
    """
    chosen: dict[str, RunSpec] = {}
    best: dict[str, float] = {}
    for spec in grid_runs(config):
        result = results.get(spec.name)
        if not result or result.get("status") != "ok" or result.get("val_accuracy") is None:
            continue
        if spec.method not in best or result["val_accuracy"] > best[spec.method]:
            best[spec.method], chosen[spec.method] = result["val_accuracy"], spec
    return chosen


def seed_runs(config: SweepConfig, chosen: dict[str, RunSpec]) -> list[RunSpec]:
    """The seeds stage: the other seeds at each method's chosen setting."""
    return [dataclasses.replace(spec, seed=seed) for method, spec in chosen.items() for seed in config.seeds[1:]]


# ------------------------------------------------------------------------------------------------ helpers
def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)  # atomic: a killed sweep never leaves half a result file


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def data_options(config: SweepConfig) -> dict[str, Any]:
    """The data source and selection, as keyword arguments of :func:`hf_sp.data.load_image_dataset`.

    The same names are fields of ``hf_sp.finetune.DataArguments`` (:func:`finetune_arguments`), so that every run, the probe
    and the Fisher see the same examples. A source without its own validation split is refused
    (``train_val_split`` 0): a held-out part drawn per run would differ between runs.
    """
    options: dict[str, Any] = {"train_val_split": 0.0}
    root = Path(config.data_dir) if config.data_dir is not None else None
    if root is not None and (root / "train").is_dir():
        options.update(train_dir=str(root / "train"), validation_dir=str(root / "val"), test_dir=str(root / "test"))
    elif root is not None:
        options["train_dir"] = str(root)  # one folder per class: resplit deals the splits
    else:
        options.update(dataset_name=config.dataset_name, dataset_config_name=config.dataset_config_name)
    options.update(
        classes=config.classes,
        exclude_classes=config.exclude_classes,
        shots_per_class=config.shots_per_class,
        resplit=config.resplit,
    )
    return options


def data_label(config: SweepConfig) -> str:
    """A short name of the data set for titles: the local folder's, or the Hub id's."""
    return Path(config.data_dir).name if config.data_dir is not None else config.dataset_name.split("/")[-1]


def _fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


class _Data:
    """The data set and the source model's preprocessing, loaded once for the probe, Fisher and diagnostics."""

    def __init__(self, config: SweepConfig):
        from hf_sp.data import build_transforms, load_image_dataset
        from hf_sp.loading import load_model

        self.dataset = load_image_dataset(**data_options(config))
        if "test" not in self.dataset:
            raise ValueError(
                "The sweep needs a test split: use a source with one, or resplit with shots_per_class test=K."
            )
        self.names = self.dataset["train"].features["label"].names
        self.id2label = dict(enumerate(self.names))
        self.config = config
        self._load_model = load_model
        target = self.target_model()
        _, self.eval_transform = build_transforms(target.data_config, config.image_size)

    def target_model(self):
        """The source model with a new head for the target classes (body = w0), as every run starts."""
        return self._load_model(self.config.model_name_or_path, num_labels=len(self.names), id2label=self.id2label)

    def split(self, name: str, limit: int | None = None):
        from hf_sp.data import attach_transform

        part = self.dataset[name]
        if limit is not None:
            part = part.select(range(min(limit, len(part))))
        return attach_transform(part.with_format(None), self.eval_transform)

    def loader(self, name: str, batch_size: int, limit: int | None = None):
        from torch.utils.data import DataLoader

        from hf_sp.data import collate

        return DataLoader(self.split(name, limit), batch_size=batch_size, shuffle=False, collate_fn=collate)


def _layout_name(model: nn.Module, name: str) -> str:
    """A parameter name as it is saved in ``model.safetensors`` (timm wrappers save timm's own names)."""
    from transformers import TimmWrapperForImageClassification

    return name.removeprefix("timm_model.") if isinstance(model, TimmWrapperForImageClassification) else name


def _load_weights_into(model: nn.Module, path: Path) -> nn.Module:
    from safetensors.torch import load_file
    from transformers import TimmWrapperForImageClassification

    state = load_file(str(path))
    target = model.timm_model if isinstance(model, TimmWrapperForImageClassification) else model
    target.load_state_dict(state, strict=True)
    return model


class _Reference:
    """The starting point w0 and the names of the anchored tensors, in the saved-file layout."""

    def __init__(self, data: _Data):
        from hf_sp.models import timm_layout_state_dict
        from hf_sp.selection import split_parameters

        model = data.target_model().model
        self.anchored = [_layout_name(model, n) for n in split_parameters(model).anchored]
        self.state = {k: v.detach().clone() for k, v in timm_layout_state_dict(model).items()}


# ------------------------------------------------------------------------------------------------ probe
@torch.no_grad()
def extract_features(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logit features (``[N, D]``) and labels of every batch, model in eval mode."""
    from transformers import TimmWrapperForImageClassification

    model.eval()
    feats, labels = [], []
    for batch in loader:
        x = batch["pixel_values"]
        timm_model = model.timm_model if isinstance(model, TimmWrapperForImageClassification) else model
        if hasattr(timm_model, "forward_head") and hasattr(timm_model, "forward_features"):
            f = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
        else:  # transformers classifiers: the base model's pooled output
            out = model.base_model(pixel_values=x)
            f = getattr(out, "pooler_output", None)
            if f is None:
                f = out.last_hidden_state.mean(dim=1)
        feats.append(f.flatten(1).float())
        labels.append(batch["labels"])
    return torch.cat(feats), torch.cat(labels)


def linear_probe(config: SweepConfig, data: _Data) -> dict[str, Any]:
    """Logistic regression on frozen source features (standardized), ``C`` chosen on val accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    model = data.target_model().model
    feats = {
        s: extract_features(model, data.loader(s, config.eval_batch_size)) for s in ("train", "validation", "test")
    }
    (xtr, ytr), (xva, yva), (xte, yte) = (
        (feats[s][0].numpy(), feats[s][1].numpy()) for s in ("train", "validation", "test")
    )
    grid = []
    best = None
    for c in config.probe_c_grid:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
        clf.fit(xtr, ytr)
        val = float((clf.predict(xva) == yva).mean())
        test = float((clf.predict(xte) == yte).mean())
        grid.append({"C": c, "val_accuracy": val, "test_accuracy": test})
        if best is None or val > best["val_accuracy"]:
            best = grid[-1]
    return {
        "method": "linear_probe",
        "C": best["C"],
        "val_accuracy": best["val_accuracy"],
        "test_accuracy": best["test_accuracy"],
        "grid": grid,
        "feature_dim": int(xtr.shape[1]),
        "runtime": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------------------ Fisher
def load_source_classifier(name_or_path: str) -> nn.Module:
    """The source model *with its own head* (e.g. the 1000 ImageNet classes), as a transformers classifier.

    timm models are wrapped in ``TimmWrapperForImageClassification``, so that parameter names are those
    of the target model that :func:`hf_sp.loading.load_model` builds (``timm_model.`` prefix).
    """
    from hf_sp.loading import load_packaged_lite0
    from hf_sp.models import wrap_timm_model

    if name_or_path == PACKAGED_LITE0:
        return wrap_timm_model(load_packaged_lite0())
    import timm

    if name_or_path.startswith(("hf-hub:", "timm/")) or timm.is_model(name_or_path):
        timm_name = "hf-hub:" + name_or_path if name_or_path.startswith("timm/") else name_or_path
        return wrap_timm_model(timm.create_model(timm_name, pretrained=True))
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(name_or_path)


def _match_name(name: str, available: Any) -> str | None:
    """``name`` as it is, or without / with the ``timm_model.`` prefix of timm wrappers, if in ``available``."""
    return next((c for c in (name, name.removeprefix("timm_model."), "timm_model." + name) if c in available), None)


def map_fisher_names(
    fisher: dict[str, torch.Tensor], target: nn.Module, names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Rename a Fisher estimated on the source model to the target model's parameter names ``names``.

    A target name is looked up as is, then without / with the ``timm_model.`` prefix of timm wrappers
    (a Fisher of a raw timm model serves a wrapped target and vice versa). Shapes must match.

    Raises:
        ValueError: a target tensor has no Fisher entry, or its shape differs.
    """
    params = dict(target.named_parameters())
    mapped = {}
    for name in names:
        source = _match_name(name, fisher)
        if source is None:
            raise ValueError(f"The source Fisher has no entry for the target's anchored tensor {name!r}.")
        if tuple(fisher[source].shape) != tuple(params[name].shape):
            raise ValueError(
                f"Fisher entry {source!r} has shape {tuple(fisher[source].shape)}, the target's {name!r} "
                f"{tuple(params[name].shape)}: the source and target bodies differ."
            )
        mapped[name] = fisher[source]
    return mapped


def normalize_fisher(
    fisher: dict[str, torch.Tensor], normalize: str = "mean", clip: float | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Divide by the mean over all entries (``normalize="mean"``), then clip at ``clip``; returns F and stats.

    With mean 1, ``alpha * sum_j F_jj (w_j - w0_j)^2`` equals ``l2_sp``'s ``alpha * ||w - w0||^2`` for a
    displacement spread evenly over the entries, so the two alpha grids are comparable.
    """
    flat = torch.cat([f.flatten().double() for f in fisher.values()])
    mean = float(flat.mean())
    scale = mean if normalize == "mean" and mean > 0 else 1.0
    flat = flat / scale
    stats = {
        "raw_mean": mean,
        "raw_max": float(flat.max()) * scale,
        "max_over_mean": float(flat.max()) * scale / mean if mean > 0 else math.inf,
        "zero_fraction": float((flat == 0).double().mean()),
        "scale": scale,
        "clip": clip,
        "clipped_fraction": float((flat > clip).double().mean()) if clip is not None else 0.0,
    }
    out = {}
    for name, f in fisher.items():
        g = f.double() / scale
        if clip is not None:
            g = g.clamp(max=clip)
        out[name] = g.float()
    return out, stats


def fisher_settings(config: SweepConfig) -> dict[str, Any]:
    """The settings a saved Fisher depends on (a changed setting re-estimates it)."""
    return {
        "model": config.model_name_or_path,
        "inputs": "target train images (eval transform), no labels",
        "image_size": config.image_size,
        "top_k": config.fisher_top_k,
        "max_samples": config.fisher_max_samples,
        "normalize": config.fisher_normalize,
        "clip": config.fisher_clip,
    }


def prepare_fisher(config: SweepConfig, data: _Data, out_dir: Path) -> Path:
    """Estimate (or reuse) the source Fisher for ``l2_sp_fisher``, keyed by the target's parameter names."""
    from hf_sp.fisher import estimate_fisher, save_fisher
    from hf_sp.selection import split_parameters

    path = out_dir / FISHER_FILE
    info_path = out_dir / "fisher.json"
    settings = fisher_settings(config)
    if path.is_file() and info_path.is_file():
        if _read_json(info_path).get("settings") == settings:
            logger.info("Fisher: reusing %s", path)
            return path
        logger.info("Fisher settings changed: estimating it again.")
    target = data.target_model().model
    anchored = split_parameters(target).anchored
    source = load_source_classifier(config.model_name_or_path)
    source_params = dict(source.named_parameters())
    lookup = {name: _match_name(name, source_params) for name in anchored}
    missing = [name for name, found in lookup.items() if found is None]
    if missing:
        raise ValueError(f"The source model has no tensor for the target's anchored {missing[:3]}: bodies differ.")
    loader = data.loader("train", config.fisher_batch_size, config.fisher_max_samples)
    logger.info(
        "Fisher: source %s with its own %d-class head, on %d target train images, top_k=%d",
        config.model_name_or_path,
        source.config.num_labels,
        len(loader.dataset),
        config.fisher_top_k,
    )
    start = time.perf_counter()
    raw = estimate_fisher(source, loader, top_k=config.fisher_top_k, param_names=list(lookup.values()), chunk_size=8)
    elapsed = time.perf_counter() - start
    fisher = map_fisher_names(raw, target, anchored)
    fisher, stats = normalize_fisher(fisher, config.fisher_normalize, config.fisher_clip)
    save_fisher(
        fisher,
        path,
        metadata={k: str(v) for k, v in {**settings, "samples": len(loader.dataset)}.items()},
    )
    _write_json(
        info_path,
        {"settings": settings, "samples": len(loader.dataset), "seconds": elapsed, "stats": stats},
    )
    logger.info("Fisher: %d tensors in %s (%.0f s); stats %s", len(fisher), path, elapsed, stats)
    return path


# ------------------------------------------------------------------------------------------------ runs
def finetune_arguments(config: SweepConfig, spec: RunSpec, run_dir: Path, fisher_path: Path | None) -> tuple[Any, ...]:
    """``hf_sp.finetune``'s ``(ModelArguments, DataArguments, SPConfig)`` of one run: the command line's defaults,
    the sweep's budget, the run's method and setting, then ``run_options``."""
    from hf_sp import SPConfig
    from hf_sp.finetune import CLI_DEFAULTS, DataArguments, ModelArguments

    if spec.method == "l2_sp_fisher" and fisher_path is None:
        raise ValueError("l2_sp_fisher needs the Fisher file; prepare_fisher was not run.")
    values: dict[str, Any] = {
        **CLI_DEFAULTS,
        **{k: v for k, v in data_options(config).items() if v is not None},
        "model_name_or_path": config.model_name_or_path,
        "image_size": config.image_size,
        "train_augmentation": config.train_augmentation,
        "num_train_epochs": config.num_train_epochs,
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.eval_batch_size,
        "learning_rate": spec.lr,
        "lr_scheduler_type": config.lr_scheduler_type,
        "warmup_steps": config.warmup_steps,
        "sp_penalty": spec.method,
        "sp_alpha": spec.alpha,
        "sp_beta": spec.beta,
        "seed": spec.seed,
        "output_dir": str(run_dir),
        # Only the final model is evaluated; one checkpoint per epoch (the last kept) lets a killed run resume.
        "eval_strategy": "no",
        "save_strategy": "epoch",
        "save_total_limit": 1,
        "logging_steps": 10,
        "report_to": "none",
        **({"sp_fisher_path": str(fisher_path)} if spec.method == "l2_sp_fisher" else {}),
        **config.run_options,
    }
    owner = _finetune_fields()
    return tuple(
        cls(**{k: v for k, v in values.items() if owner[k] is cls}) for cls in (ModelArguments, DataArguments, SPConfig)
    )


def _logged_distance(run_dir: Path) -> float | None:
    state = run_dir / "trainer_state.json"
    if not state.is_file():
        return None
    values = [e["sp_dist"] for e in _read_json(state).get("log_history", []) if "sp_dist" in e]
    return values[-1] if values else None


def _remove_checkpoints(run_dir: Path) -> None:
    for checkpoint in run_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)


def train_one(config: SweepConfig, spec: RunSpec, run_dir: Path, fisher_path: Path | None) -> dict[str, Any]:
    """Fine-tune once through :func:`hf_sp.finetune.run` (resuming from a checkpoint in ``run_dir`` if any)."""
    import transformers

    from hf_sp.finetune import run

    model_args, data_args, args = finetune_arguments(config, spec, run_dir, fisher_path)
    transformers.set_seed(spec.seed)  # the new head is initialised before Trainer seeds anything
    start = time.perf_counter()
    try:
        metrics = run(model_args, data_args, args)
    except FloatingPointError as err:  # the penalty became non-finite: the run diverged
        return {"status": "diverged", "error": str(err).splitlines()[0], "wall_time": time.perf_counter() - start}
    return {
        "status": "ok",
        "val_accuracy": metrics.get("eval_accuracy"),
        "test_accuracy": metrics.get("test_accuracy"),
        "val_top5_accuracy": metrics.get("eval_top5_accuracy"),
        "test_top5_accuracy": metrics.get("test_top5_accuracy"),
        "train_runtime": metrics.get("train_runtime"),
        "train_loss": metrics.get("train_loss"),
        "wall_time": time.perf_counter() - start,
    }


class _Progress:
    """Index/total and an ETA from the runs trained in this invocation (median duration: robust to pauses)."""

    def __init__(self, total: int):
        self.total, self.index, self.durations = total, 0, []
        self.start = time.perf_counter()

    def line(self, spec: RunSpec, stage: str) -> str:
        self.index += 1
        remaining = self.total - self.index + 1
        eta = _fmt_minutes(statistics.median(self.durations) * remaining) if self.durations else "after the first run"
        return (
            f"[{self.index}/{self.total}] {stage}: {spec.method} alpha={spec.alpha:g} beta={spec.beta:g} "
            f"lr={spec.lr:g} seed={spec.seed} (elapsed {_fmt_minutes(time.perf_counter() - self.start)}, ETA {eta})"
        )


def execute(
    config: SweepConfig,
    spec: RunSpec,
    stage: str,
    runs_dir: Path,
    fisher_path: Path | None,
    reference: _Reference | None,
    progress: _Progress,
) -> dict[str, Any]:
    """Run ``spec`` unless its result exists; write ``run_result.json``; clean its checkpoints."""
    run_dir = runs_dir / spec.name
    result_path = run_dir / RESULT_FILE
    line = progress.line(spec, stage)
    if result_path.is_file():
        result = _read_json(result_path)
        logger.info(
            "%s -> done earlier (val %s, test %s), skipped",
            line,
            _pct(result.get("val_accuracy")),
            _pct(result.get("test_accuracy")),
        )
        return result
    wait_while_running(config.pause_while)
    resuming = run_dir.is_dir() and any(run_dir.glob("checkpoint-*"))
    logger.info("%s -> %s%s", line, run_dir, " (resuming from its checkpoint)" if resuming else "")
    outcome = train_one(config, spec, run_dir, fisher_path)
    progress.durations.append(outcome["wall_time"])
    result = {**dataclasses.asdict(spec), "stage": stage, "run_dir": str(run_dir.relative_to(runs_dir.parent))}
    result.update(outcome)
    result["sp_dist_logged"] = _logged_distance(run_dir)
    weights = run_dir / "model.safetensors"
    if outcome["status"] == "ok" and reference is not None and weights.is_file():
        from safetensors.torch import load_file

        from hf_sp.diagnostics import total_distance

        result["sp_dist"], result["sp_rel_dist"] = total_distance(
            reference.state, load_file(str(weights)), reference.anchored
        )
    result["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _remove_checkpoints(run_dir)
    _write_json(result_path, result)
    logger.info(
        "    %s: val %s, test %s, ‖w-w0‖/‖w0‖ %s, %.0f s",
        outcome["status"],
        _pct(result.get("val_accuracy")),
        _pct(result.get("test_accuracy")),
        f"{result['sp_rel_dist']:.4f}" if result.get("sp_rel_dist") is not None else "-",
        outcome["wall_time"],
    )
    return result


def _ancestors() -> set[int]:
    """This process and its parents (the shell that started the sweep may carry the pattern in its command line)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def _other_process_running(pattern: str) -> bool:
    """True if a process other than this one (and its parents) has ``pattern`` in its command line (``/proc``)."""
    mine = _ancestors()
    for entry in Path("/proc").glob("[0-9]*"):
        if int(entry.name) in mine:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if pattern in cmdline:
            return True
    return False


def wait_while_running(pattern: str | None, poll_seconds: float = 30.0) -> float:
    """Block while another process matching ``pattern`` runs; returns the seconds waited."""
    if not pattern:
        return 0.0
    start = time.perf_counter()
    if _other_process_running(pattern):
        logger.info("Waiting while a process matching %r runs (checking every %.0f s)...", pattern, poll_seconds)
        while _other_process_running(pattern):
            time.sleep(poll_seconds)
        logger.info("...resumed after %s.", _fmt_minutes(time.perf_counter() - start))
    return time.perf_counter() - start


def _pct(value: float | None) -> str:
    return f"{100 * value:.1f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


# ------------------------------------------------------------------------------------------------ report
def summarize(config: SweepConfig, results: dict[str, dict], chosen: dict[str, RunSpec]) -> dict[str, Any]:
    """Per method: the chosen setting and test accuracy mean +- std (sample std) over the seeds."""
    summary = {}
    for method, spec in chosen.items():
        runs = [results.get(dataclasses.replace(spec, seed=s).name) for s in config.seeds]
        done = [r for r in runs if r and r.get("status") == "ok" and r.get("test_accuracy") is not None]
        tests = [r["test_accuracy"] for r in done]
        summary[method] = {
            "alpha": spec.alpha,
            "beta": spec.beta,
            "lr": spec.lr,
            "selection_val_accuracy": results[spec.name]["val_accuracy"],
            "test_mean": statistics.mean(tests) if tests else None,
            "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0 if tests else None,
            "val_mean": statistics.mean(r["val_accuracy"] for r in done) if done else None,
            "n": len(tests),
            "n_diverged": sum(1 for r in runs if r and r.get("status") == "diverged"),
            "tests": tests,
            "rel_dist_mean": statistics.mean(r["sp_rel_dist"] for r in done if r.get("sp_rel_dist") is not None)
            if any(r.get("sp_rel_dist") is not None for r in done)
            else None,
            "runtime_mean": statistics.mean(r["wall_time"] for r in done) if done else None,
        }
    return summary


def _vs_baseline(summary: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    """``mean - mean_L2 +- sqrt(s^2/n + s_L2^2/n_L2)`` in points, or ``-`` without two seeds on each side."""
    if not baseline or summary["test_mean"] is None or baseline["test_mean"] is None:
        return "-"
    if min(summary["n"], baseline["n"]) < 2:
        return "-"
    diff = 100 * (summary["test_mean"] - baseline["test_mean"])
    se = 100 * math.sqrt(summary["test_std"] ** 2 / summary["n"] + baseline["test_std"] ** 2 / baseline["n"])
    return f"{diff:+.1f} +- {se:.1f}"


def markdown_report(config: SweepConfig, report: dict[str, Any]) -> str:
    """The tables of ``results.md``: the comparison (chosen settings) and every grid run."""
    lines = [
        f"# Fine-tuning {config.model_name_or_path} on {data_label(config)}: L2 vs starting-point penalties",
        "",
        f"Budget (every method): {config.num_train_epochs:g} epochs, batch {config.batch_size}, {config.image_size} px, "
        f"SGD momentum 0.9, {config.lr_scheduler_type} schedule, augmentation {config.train_augmentation!r}. "
        f"alpha/beta/lr chosen on val (seed {config.seeds[0]}), then seeds {config.seeds}. Test top-1, mean +- sample "
        "std over seeds; vs L2: difference of the means +- its standard error (Welch).",
        "",
        "| method | alpha | beta | lr | val (selection) | test top-1 % | vs L2 | n | ‖w-w0‖/‖w0‖ | s/run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in config.methods:
        s = report["summary"].get(method)
        if s is None:
            lines.append(f"| {PRETTY.get(method, method)} | - | - | - | - | no finished grid run | - | 0 | - | - |")
            continue
        vs_l2 = _vs_baseline(s, report["summary"].get("l2")) if method != "l2" else "-"
        test = f"{100 * s['test_mean']:.1f} +- {100 * s['test_std']:.1f}" if s["test_mean"] is not None else "-"
        dist = f"{s['rel_dist_mean']:.4f}" if s["rel_dist_mean"] is not None else "-"
        runtime = f"{s['runtime_mean']:.0f}" if s["runtime_mean"] is not None else "-"
        diverged = f" ({s['n_diverged']} diverged)" if s["n_diverged"] else ""
        lines.append(
            f"| {PRETTY.get(method, method)} | {s['alpha']:g} | {s['beta']:g} | {s['lr']:g} | "
            f"{_pct(s['selection_val_accuracy'])} | {test} | {vs_l2} | {s['n']}{diverged} | {dist} | {runtime} |"
        )
    probe = report.get("linear_probe")
    if probe:
        lines.append(
            f"| linear probe (frozen source features, logistic regression C={probe['C']:g}) | - | - | - | "
            f"{_pct(probe['val_accuracy'])} | {_pct(probe['test_accuracy'])} (deterministic) | - | 1 | 0 | "
            f"{probe['runtime']:.0f} |"
        )
    lines += [
        "",
        "## Every grid run (selection on val)",
        "",
        "| method | alpha | beta | lr | seed | status | val % | test % | ‖w-w0‖/‖w0‖ | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        dist = f"{run['sp_rel_dist']:.4f}" if run.get("sp_rel_dist") is not None else "-"
        lines.append(
            f"| {PRETTY.get(run['method'], run['method'])} | {run['alpha']:g} | {run['beta']:g} | {run['lr']:g} | "
            f"{run['seed']} | {run['status']} | {_pct(run.get('val_accuracy'))} | {_pct(run.get('test_accuracy'))} "
            f"| {dist} | {run.get('wall_time', 0):.0f} |"
        )
    fisher = report.get("fisher")
    if fisher:
        lines += [
            "",
            f"Fisher for L2-SP-Fisher: source model with its own head on {fisher['samples']} target train images "
            f"(no ImageNet images here), top-{fisher['settings']['top_k']} classes of its own predictions, "
            f"normalize={fisher['settings']['normalize']!r}, clip={fisher['settings']['clip']}; raw max/mean "
            f"{fisher['stats']['max_over_mean']:.0f}, clipped fraction {fisher['stats']['clipped_fraction']:.2e}, "
            f"{fisher['seconds']:.0f} s.",
        ]
    lines += _diagnostics_table(report.get("diagnostics"))
    if report.get("command"):
        lines += ["", f"Command: `python {report['command']}`"]
    lines += ["", f"Machine: {report['machine']['cpu_model']}, {report['machine']['cpu_count']} cores.", ""]
    return "\n".join(lines)


def _diagnostics_table(diag: dict[str, Any] | None) -> list[str]:
    """Per run: mean per-tensor relative distance to w0 and the feature R^2 (identity) of each probed layer."""
    if not diag or not diag.get("feature_r2_identity"):
        return []
    layers = list(next(iter(diag["feature_r2_identity"].values())))
    short = [layer.removeprefix("timm_model.") for layer in layers]
    lines = [
        "",
        f"## Diagnostics: distance to the start and feature R^2 ({diag['images']} val images)",
        "",
        "| run | mean per-tensor ‖w-w0‖/‖w0‖ | " + " | ".join(f"R^2 {s}" for s in short) + " |",
        "|---|---:|" + "---:|" * len(layers),
    ]
    for label, r2 in diag["feature_r2_identity"].items():
        dists = list(diag["relative_distance"].get(label, {}).values())
        mean = f"{statistics.mean(dists):.4f}" if dists else "-"
        lines.append(f"| {label} | {mean} | " + " | ".join(f"{r2[layer]:.2f}" for layer in layers) + " |")
    lines += [
        "",
        "R^2 = 1 - ||F_after - F_before||^2 / ||F_after - mean(F_after)||^2 per layer, on the same images (1: "
        "features unchanged; negative: they moved more than they vary).",
    ]
    return lines


def plot_results(config: SweepConfig, report: dict[str, Any], path: Path) -> Path:
    """Test accuracy per method (mean +- std, seeds as dots, probe as a line) and val accuracy along each grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = [m for m in config.methods if m in report["summary"]]
    for i, method in enumerate(methods):
        s = report["summary"][method]
        if s["test_mean"] is None:
            continue
        ax_t.errorbar(i, 100 * s["test_mean"], yerr=100 * s["test_std"], fmt="o", capsize=5, color=f"C{i}")
        ax_t.scatter([i] * len(s["tests"]), [100 * t for t in s["tests"]], s=12, color=f"C{i}", alpha=0.5)
    probe = report.get("linear_probe")
    if probe:
        ax_t.axhline(100 * probe["test_accuracy"], ls="--", color="grey", label="linear probe")
        ax_t.legend(fontsize=8)
    ax_t.set_xticks(range(len(methods)), [PRETTY.get(m, m) for m in methods], rotation=20)
    ax_t.set_ylabel("test top-1 %")
    ax_t.set_title(f"chosen settings, seeds {config.seeds}")
    for i, method in enumerate(config.methods):
        runs = [r for r in report["runs"] if r["method"] == method and r["stage"] == "grid" and r["status"] == "ok"]
        for lr in config.lr_grid:
            for beta in config.beta_grid:
                pts = sorted((r["alpha"], r["val_accuracy"]) for r in runs if r["lr"] == lr and r["beta"] == beta)
                if pts:
                    label = PRETTY.get(method, method)
                    if len(config.lr_grid) > 1 or len(config.beta_grid) > 1:
                        label += f" (lr {lr:g}, beta {beta:g})"
                    ax_v.plot([a for a, _ in pts], [100 * v for _, v in pts], marker="o", color=f"C{i}", label=label)
    if probe:
        ax_v.axhline(100 * probe["val_accuracy"], ls="--", color="grey", label="linear probe")
    ax_v.set_xscale("log")
    ax_v.set_xlabel("alpha")
    ax_v.set_ylabel("val top-1 %")
    ax_v.set_title(f"grid (seed {config.seeds[0]})")
    ax_v.legend(fontsize=7)
    fig.suptitle(
        f"{Path(config.model_name_or_path).name} on {data_label(config)}: {config.num_train_epochs:g} epochs, "
        f"{config.image_size} px"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def diagnostic_runs(config: SweepConfig, chosen: dict[str, RunSpec]) -> dict[str, RunSpec]:
    """Label -> run shown in the diagnostics: each method's chosen run (first seed), then ``diagnostic_extra``."""
    runs = {f"{PRETTY.get(m, m)} a={s.alpha:g} (chosen)": s for m, s in chosen.items()}
    for item in config.diagnostic_extra:
        method, _, alpha = item.partition("=")
        spec = RunSpec(method, float(alpha), config.beta_grid[0], config.lr_grid[0], config.seeds[0])
        if spec not in runs.values():
            runs[f"{PRETTY.get(method, method)} a={spec.alpha:g}"] = spec
    return runs


def run_diagnostics(config: SweepConfig, data: _Data, run_dirs: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    """Per-layer distance to the start and feature R^2 of the runs in ``run_dirs`` (label -> run folder)."""
    from hf_sp.diagnostics import feature_r2, plot_diagnostics, recalibrate_batchnorm, relative_distances
    from hf_sp.models import timm_layout_state_dict
    from hf_sp.selection import split_parameters

    source = data.target_model().model
    anchored = split_parameters(source).anchored
    images = next(iter(data.loader("validation", config.diagnostic_images, config.diagnostic_images)))
    pixel_values = images["pixel_values"]
    start_state = timm_layout_state_dict(source)
    names = [_layout_name(source, n) for n in anchored]
    distances, r2_identity, r2_linear = {}, {}, {}
    for label, run_dir in run_dirs.items():
        weights = run_dir / "model.safetensors"
        if not weights.is_file():
            logger.warning("Diagnostics: no weights for %s (%s); skipped.", label, weights)
            continue
        tuned = _load_weights_into(data.target_model().model, weights)
        distances[label] = relative_distances(start_state, timm_layout_state_dict(tuned), names)
        r2_identity[label] = feature_r2(source, tuned, pixel_values, method="identity")
        r2_linear[label] = feature_r2(source, tuned, pixel_values, method="linear")
    if r2_identity and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in source.modules()):
        # what the BatchNorm statistics of the target alone do to the features (weights = w0)
        train = torch.cat([b["pixel_values"] for b in data.loader("train", config.eval_batch_size, BN_IMAGES)])
        recalibrated = recalibrate_batchnorm(source, train, batch_size=config.eval_batch_size)
        r2_identity[BN_LABEL] = feature_r2(source, recalibrated, pixel_values, method="identity")
        r2_linear[BN_LABEL] = feature_r2(source, recalibrated, pixel_values, method="linear")
    diag = {
        "images": int(pixel_values.shape[0]),
        "runs": {label: str(run_dir.relative_to(out_dir)) for label, run_dir in run_dirs.items()},
        "relative_distance": distances,
        "feature_r2_identity": r2_identity,
        "feature_r2_linear": r2_linear,
    }
    _write_json(out_dir / "diagnostics.json", diag)
    if distances:
        plot_diagnostics(
            distances,
            r2_identity,
            out_dir / "diagnostics.png",
            title=f"seed {config.seeds[0]}: distance to w0 and feature R^2 "
            f"(identity definition, {pixel_values.shape[0]} val images)",
        )
    return diag


def _prune_weights(config: SweepConfig, specs: list[RunSpec], keep: set[str], out_dir: Path) -> None:
    """Delete the fine-tuned weights that ``keep_weights`` does not keep (``keep``: run names for 'selected')."""
    if config.keep_weights == "all":
        return
    keep = keep if config.keep_weights == "selected" else set()
    for spec in specs:
        if spec.name not in keep:
            (out_dir / "runs" / spec.name / "model.safetensors").unlink(missing_ok=True)
    if config.keep_weights == "none":
        for weights in (out_dir / DIAGNOSTIC_RUNS).glob("*/model.safetensors"):
            weights.unlink()


def _check_budget(config: SweepConfig, out_dir: Path) -> None:
    saved_path = out_dir / "sweep_config.json"
    current = config.to_dict()
    if saved_path.is_file():
        saved = _read_json(saved_path)
        if saved.get("extra_args"):  # the command-line strings that run_options replaced
            raise ValueError(
                f"{out_dir} holds runs made with extra_args={saved['extra_args']!r}: give them as run_options "
                "(NAME=VALUE) in a new --output_dir."
            )
        # An empty value equals an absent one (a field added since, at its default: {} or [] or None).
        changed = [k for k in BUDGET_FIELDS if (saved.get(k) or None) != (json.loads(json.dumps(current.get(k))) or None)]
        if changed:
            raise ValueError(
                f"{out_dir} holds runs with another budget ({', '.join(f'{k}: {saved.get(k)!r}' for k in changed)}). "
                "Use another --output_dir, or the same budget to resume (grids and seeds may grow)."
            )
    _write_json(saved_path, current)


def run_sweep(config: SweepConfig, command: str | None = None) -> dict[str, Any]:
    """Probe, Fisher, grid, selection, seeds, report and diagnostics; resumable. Returns ``results.json``'s content.

    ``command`` (the command line that started the sweep) is recorded in ``results.json``.
    """
    import transformers

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    transformers.utils.logging.set_verbosity_warning()
    out_dir = Path(config.output_dir)
    runs_dir = out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    _check_budget(config, out_dir)
    sweep_start = time.perf_counter()
    data = _Data(config)
    reference = _Reference(data)

    probe = None
    if config.linear_probe:
        probe_path = out_dir / "linear_probe.json"
        if probe_path.is_file() and _read_json(probe_path).get("C_grid") == config.probe_c_grid:
            probe = _read_json(probe_path)
        else:
            logger.info("Linear probe: features of %s, C in %s", config.model_name_or_path, config.probe_c_grid)
            probe = {**linear_probe(config, data), "C_grid": config.probe_c_grid}
            _write_json(probe_path, probe)
        logger.info(
            "Linear probe: C=%g, val %s, test %s",
            probe["C"],
            _pct(probe["val_accuracy"]),
            _pct(probe["test_accuracy"]),
        )
    fisher_path = prepare_fisher(config, data, out_dir) if "l2_sp_fisher" in config.methods else None

    grid = grid_runs(config)
    progress = _Progress(len(grid) + len(config.methods) * (len(config.seeds) - 1))
    results: dict[str, dict] = {}
    for spec in grid:
        results[spec.name] = execute(config, spec, "grid", runs_dir, fisher_path, reference, progress)
    chosen = select_settings(config, results)
    for method, spec in chosen.items():
        logger.info(
            "Chosen on val for %s: alpha=%g beta=%g lr=%g (val %s)",
            method,
            spec.alpha,
            spec.beta,
            spec.lr,
            _pct(results[spec.name]["val_accuracy"]),
        )
    seeds = seed_runs(config, chosen)
    progress.total = len(grid) + len(seeds)
    for spec in seeds:
        results[spec.name] = execute(config, spec, "seeds", runs_dir, fisher_path, reference, progress)

    planned = grid + seeds
    report: dict[str, Any] = {
        "config": config.to_dict(),
        "command": command,
        "machine": machine_info(),
        "chosen": {m: dataclasses.asdict(s) for m, s in chosen.items()},
        "summary": summarize(config, results, chosen),
        "linear_probe": probe,
        "fisher": _read_json(out_dir / "fisher.json") if fisher_path else None,
        "runs": [results[s.name] for s in planned],
    }
    shown = diagnostic_runs(config, chosen)
    if config.diagnostics and chosen:
        run_dirs = {}
        for label, spec in shown.items():
            run_dirs[label] = runs_dir / spec.name
            if (run_dirs[label] / "model.safetensors").is_file() or config.keep_weights == "none":
                continue
            # Its weights were deleted by an earlier invocation (another diagnostic_extra then): train the same
            # run again beside the sweep's runs, for the diagnostics only.
            run_dirs[label] = out_dir / DIAGNOSTIC_RUNS / spec.name
            if not (run_dirs[label] / "model.safetensors").is_file():
                progress.total += 1
                execute(config, spec, "diagnostics", out_dir / DIAGNOSTIC_RUNS, fisher_path, reference, progress)
        report["diagnostics"] = run_diagnostics(config, data, run_dirs, out_dir)
    _prune_weights(config, planned, {s.name for s in shown.values()}, out_dir)
    report["sweep_wall_time_this_invocation"] = time.perf_counter() - sweep_start
    _write_json(out_dir / "results.json", report)
    (out_dir / "results.md").write_text(markdown_report(config, report))
    plot_results(config, report, out_dir / "results.png")
    logger.info("Results in %s (results.json, results.md, results.png)", out_dir)
    return report


# ------------------------------------------------------------------------------------------------ CLI
def _str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _optional(kind):
    def convert(value: str):
        return None if value.lower() in ("none", "null", "") else kind(value)

    return convert


_TYPES = {
    "int": int,
    "float": float,
    "str": str,
    "bool": _str2bool,
    "int | None": _optional(int),
    "str | None": _optional(str),
    "float | None": _optional(float),
    "list[float]": float,
    "list[int]": int,
    "list[str]": str,
    "list[str] | None": str,
    "dict[str, list[float]]": str,
    "dict[str, Any]": str,
}


def build_parser() -> argparse.ArgumentParser:
    """One option per :class:`SweepConfig` field, plus ``--config file.yaml`` (the command line overrides it)."""
    parser = argparse.ArgumentParser(
        description="Compare L2 and the starting-point penalties (and a linear probe) on an imagefolder data set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file of options (keys = option names).")
    for f in dataclasses.fields(SweepConfig):
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", ""), "type": _TYPES[str(f.type)]}
        if "nargs" in f.metadata:
            kwargs["nargs"] = f.metadata["nargs"]
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["default"] = None
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> SweepConfig:
    """A :class:`SweepConfig` from the command line and ``--config``."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    apply_yaml_config(parser, argv, known={f.name for f in dataclasses.fields(SweepConfig)})
    namespace = vars(parser.parse_args(argv))
    config_file = namespace.pop("config")
    if config_file and isinstance(namespace["alpha_grid"], list):
        # --alpha_grid on the command line overrides the YAML grid method by method, not as a whole
        from_yaml = (yaml.safe_load(Path(config_file).read_text()) or {}).get("alpha_grid") or {}
        namespace["alpha_grid"] = {**_parse_grid(from_yaml), **_parse_grid(namespace["alpha_grid"])}
    if namespace.get("output_dir") is None:
        raise ValueError("--output_dir is required (on the command line or in --config).")
    return SweepConfig(**namespace)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point of ``scripts/reproduce.py``."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = parse_args(argv)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    try:
        args = list(sys.argv[1:] if argv is None else argv)
        report = run_sweep(config, command=" ".join(["scripts/reproduce.py", *args]))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(markdown_report(config, report))
