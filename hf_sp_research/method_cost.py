"""Cost per training step of each transfer method, as a ratio to plain fine-tuning measured in the same run.

Every configuration is one ``SPTrainer`` run of ``steps`` optimizer steps on the same random images; a callback
times each step (``on_step_begin`` to ``on_step_end``: forward, backward, the methods' loss terms and step hooks)
and the median over the steps after ``warmup`` is the configuration's step time. Configurations are interleaved
``repeats`` times (plain, method 1, ..., plain, method 1, ...) so that a drift of the machine's speed reaches
them alike; the ratio is the median step time over the plain run's. Everything goes through the library's
public API.

Example:
    >>> report = measure_method_costs(MethodCostConfig(model="packaged:tf_efficientnet_lite0"))
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback

from hf_sp import SPConfig, SPTrainer
from hf_sp.loading import load_model
from hf_sp_research.benchmark import SyntheticImages

__all__ = ["CONFIGURATIONS", "MethodCostConfig", "markdown_report", "measure_method_costs"]

#: The configurations compared: SPConfig fields on top of plain fine-tuning (``sp_penalty="none"``).
CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "l2_sp": {"sp_penalty": "l2_sp", "sp_alpha": 0.01},
    "spd": {"sp_spd": 1.0},
    "projection (fixed, l2)": {"sp_projection": "fixed", "sp_projection_radius": 0.01},
    "projection (ftp)": {"sp_projection": "ftp"},
    "delta (unweighted)": {"sp_delta": 0.1, "sp_delta_attention": "none"},
    "bss": {"sp_bss": 1e-3},
}


@dataclass
class MethodCostConfig:
    """What is measured: the model, the batch and how many steps."""

    model: str = "packaged:tf_efficientnet_lite0"
    image_size: int = 128
    batch_size: int = 32
    num_classes: int = 10
    steps: int = 8
    warmup: int = 2
    repeats: int = 2
    configurations: list[str] = field(default_factory=lambda: list(CONFIGURATIONS))

    def __post_init__(self) -> None:
        unknown = [c for c in self.configurations if c not in CONFIGURATIONS]
        if unknown:
            raise ValueError(f"configurations: unknown {unknown}; known: {list(CONFIGURATIONS)}.")
        if "plain" not in self.configurations:
            raise ValueError("configurations must contain 'plain' (the baseline of every ratio).")
        if self.steps <= self.warmup:
            raise ValueError(f"steps ({self.steps}) must exceed warmup ({self.warmup}).")


class _StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def _one_run(cfg: MethodCostConfig, fields: dict[str, Any], data: Dataset, out: str) -> list[float]:
    loaded = load_model(cfg.model, num_labels=cfg.num_classes, id2label={i: str(i) for i in range(cfg.num_classes)})
    loaded.set_image_size(cfg.image_size)
    args = SPConfig(
        output_dir=out, report_to=[], disable_tqdm=True, save_strategy="no", logging_strategy="no",
        use_cpu=not torch.cuda.is_available(), optim="sgd", optim_args="momentum=0.9", learning_rate=1e-3,
        max_grad_norm=0.0, max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        dataloader_num_workers=0, seed=0, **{"sp_penalty": "none", **fields},
    )
    timer = _StepTimer()
    trainer = SPTrainer(model=loaded.model, args=args, train_dataset=data, callbacks=[timer])
    trainer.train()
    return timer.times[cfg.warmup:]


def measure_method_costs(cfg: MethodCostConfig) -> dict[str, Any]:
    """Median step time of each configuration and its ratio to plain fine-tuning."""
    data = SyntheticImages(cfg.batch_size * cfg.steps, cfg.image_size, cfg.num_classes)
    times: dict[str, list[float]] = {name: [] for name in cfg.configurations}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(cfg.repeats):
            for name in cfg.configurations:
                times[name] += _one_run(cfg, CONFIGURATIONS[name], data, out)
    base = statistics.median(times["plain"])
    rows = [
        {"configuration": name, "fields": CONFIGURATIONS[name], "median_step_s": statistics.median(t),
         "ratio": statistics.median(t) / base, "steps_timed": len(t)}
        for name, t in times.items()
    ]
    return {"config": asdict(cfg), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(), "rows": rows}


def markdown_report(report: dict[str, Any], command: str = "") -> str:
    cfg = report["config"]
    lines = [
        "# Cost per training step of each transfer method",
        "",
        f"{cfg['model']} at {cfg['image_size']} px, batch {cfg['batch_size']}, SGD momentum 0.9, on "
        f"{report['device']} ({report['threads']} threads); median of {cfg['steps'] - cfg['warmup']} timed steps x "
        f"{cfg['repeats']} interleaved runs per configuration; ratio to plain fine-tuning in the same run.",
        "",
    ]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += ["| configuration | median step (s) | vs plain |", "|---|---:|---:|"]
    lines += [f"| {r['configuration']} | {r['median_step_s']:.3f} | {r['ratio']:.2f}x |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = MethodCostConfig()
    for name in ("model", "image_size", "batch_size", "steps", "warmup", "repeats"):
        parser.add_argument(f"--{name}", type=type(getattr(defaults, name)), default=getattr(defaults, name))
    parser.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS))
    parser.add_argument("--out", default="results/benchmark/methods")
    args = parser.parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k != "out"}
    try:
        cfg = MethodCostConfig(**values)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    report = measure_method_costs(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python scripts/method_cost.py", *argv])
    (out / "method_cost.json").write_text(json.dumps(report, indent=1))
    (out / "method_cost.md").write_text(markdown_report(report, command))
    print(markdown_report(report, command))
    return report
