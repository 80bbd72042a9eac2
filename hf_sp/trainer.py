"""``SPTrainer``: ``transformers.Trainer`` with starting-point regularization."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, Trainer
from transformers.utils import SAFE_WEIGHTS_NAME

from .config import SPConfig
from .fisher import check_fisher, estimate_fisher, load_fisher
from .model_card import SPCardInfo, hyperparameters_from_args, render_model_card, with_trainer_card_arguments
from .models import is_timm_model, timm_layout_state_dict, wrap_timm_model
from .penalties import get_penalty_info
from .regularizer import MissingAnchorError, SPRegularizer
from .selection import ParamSplit, split_parameters

logger = logging.getLogger(__name__)

__all__ = ["SPTrainer"]

#: Set on a model once its anchor was captured, so that a later fresh start cannot re-anchor on fine-tuned weights.
ANCHORED_ATTR = "_hf_sp_anchored"


def _saved_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


class SPTrainer(Trainer):
    """A drop-in ``Trainer`` that regularizes toward the pretrained weights (Li et al., ICML 2018).

    Swap ``Trainer`` for ``SPTrainer`` and ``TrainingArguments`` for :class:`SPConfig`; nothing
    else changes. ``model`` may be any transformers image classifier or a raw timm model (wrapped
    in ``TimmWrapperForImageClassification`` so that Trainer gets a loss from ``labels``).

    Example:
        >>> args = SPConfig(output_dir="out", sp_penalty="l2_sp", sp_alpha=0.1, sp_beta=0.01)
        >>> trainer = SPTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds)
        >>> trainer.train()

    The anchor ``w0`` is taken once, in fp32, from the weights the model has when training first
    starts, and is kept in the optimizer state (so it is checkpointed and restored with it). The
    penalty's gradient is added at each optimizer step; ``sp_body``, ``sp_head`` and ``sp_dist``
    are logged next to ``loss``.
    """

    args: SPConfig

    def __init__(self, model: nn.Module | None = None, args: SPConfig | None = None, *pos: Any, **kwargs: Any):
        if args is None:
            raise ValueError("SPTrainer needs args=SPConfig(output_dir=..., sp_penalty=..., ...).")
        if not isinstance(args, SPConfig):
            raise TypeError(
                f"SPTrainer needs args to be an SPConfig (or SPTrainingArguments), got {type(args).__name__}. "
                "Replace TrainingArguments(...) with SPConfig(...): it takes the same arguments plus sp_*."
            )
        if is_timm_model(model):
            model = wrap_timm_model(model)
        self.sp_regularizer: SPRegularizer | None = None
        self._sp_resuming = False
        super().__init__(model, args, *pos, **kwargs)
        self._sp_setup(self.model)  # validates the settings against the model now, before any training

    # ----------------------------------------------------------------------------------------
    # Setup: one regularizer per model (a new one for each hyperparameter-search trial)
    def _sp_setup(self, model: nn.Module) -> None:
        args = self.args
        if args.sp_penalty == "none":
            self.sp_regularizer = None
            return
        info = get_penalty_info(args.sp_penalty)
        split: ParamSplit = split_parameters(model, include=args.sp_include, head_modules=args.sp_head_modules)
        if not split.anchored:
            raise ValueError(
                f"Nothing left to anchor: no pretrained tensor is penalized (sp_include={args.sp_include!r}, "
                f"head modules {split.head_modules}). Use sp_include='all', or check sp_head_modules."
            )
        fisher = None
        if info.needs_fisher and args.sp_fisher_path is not None:
            fisher = load_fisher(args.sp_fisher_path)
            check_fisher(fisher, model, names=split.anchored)
        self.sp_regularizer = SPRegularizer(
            args.sp_penalty,
            args.sp_alpha,
            args.sp_beta,
            split,
            mode=args.sp_mode,
            fisher=fisher if fisher is not None else ({} if info.needs_fisher else None),
            all_reduce=self._sp_all_reduce if self.is_fsdp_enabled or self.is_deepspeed_enabled else None,
        )
        self.sp_regularizer.capture_allowed = not self._sp_resuming and not getattr(model, ANCHORED_ATTR, False)
        self.sp_regularizer.on_capture = lambda: setattr(model, ANCHORED_ATTR, True)

    def call_model_init(self, trial=None) -> nn.Module:
        model = super().call_model_init(trial)
        return wrap_timm_model(model) if is_timm_model(model) else model

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs: Any):
        self._sp_resuming = bool(resume_from_checkpoint)  # read when the optimizer is created
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    # ----------------------------------------------------------------------------------------
    # Optimizer: split groups by role and hook the step
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        built_here = self.optimizer is None  # not a user's optimizer: it gets the tensors frozen now (see below)
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        raw = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer on a second train()
        if self.sp_regularizer is not None and id(raw) in self.sp_regularizer._hooked:
            return optimizer
        opt_model = model if model is not None else self.model
        # A fresh optimizer: set up from the arguments as they are now (a hyperparameter-search trial sets them
        # after building its model).
        self._sp_setup(opt_model)
        reg = self.sp_regularizer
        if reg is None:
            return optimizer
        if not self._sp_resuming and not reg.capture_allowed:
            raise MissingAnchorError(
                "This model was already fine-tuned by an SPTrainer: its weights are no longer the pretrained "
                "starting point, and anchoring on them would silently change the method. Continue with "
                "train(resume_from_checkpoint=...), or build the model again from its pretrained weights."
            )
        if reg.info.needs_fisher and not reg.fisher and reg.capture_allowed:
            reg.fisher = self._sp_estimate_fisher(reg.split)
        # Trainer's optimizer holds the tensors with requires_grad now; one frozen now and unfrozen later (gradual
        # unfreezing) must still train, with its penalty. DeepSpeed builds its own groups from the trainable ones.
        reg.prepare_optimizer(raw, opt_model.named_parameters(), add_frozen=built_here and not self.is_deepspeed_enabled)
        logger.info(
            "hf_sp: %s (alpha=%g, beta=%g, %s mode). %s",
            reg.info.name,
            reg.alpha,
            reg.beta,
            reg.mode,
            reg.split.summary(),
        )
        return optimizer

    def _sp_estimate_fisher(self, split: ParamSplit) -> dict[str, torch.Tensor]:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                "sp_fisher_batches cannot estimate the Fisher on a sharded model. Estimate it beforehand with "
                "hf_sp.estimate_fisher, save it with hf_sp.save_fisher, and pass sp_fisher_path."
            )
        if self.train_dataset is None:
            raise ValueError("sp_fisher_batches needs a train_dataset to estimate the Fisher on.")
        dataset = self.train_dataset
        if hasattr(dataset, "column_names"):
            dataset = self._remove_unused_columns(dataset, description="Fisher estimation")
        # Same batches on every rank, so that every process holds the same Fisher.
        loader = DataLoader(
            dataset,
            batch_size=self.args.per_device_train_batch_size,
            collate_fn=self.data_collator,
            shuffle=False,
        )
        fisher = estimate_fisher(
            self.model,
            loader,
            max_batches=self.args.sp_fisher_batches,
            top_k=self.args.sp_fisher_top_k,
            param_names=split.anchored,
            progress=not self.args.disable_tqdm,
        )
        return fisher

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        reg = self.sp_regularizer
        if reg is None or checkpoint is None or self.is_deepspeed_enabled:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except ValueError as err:  # the parameter groups differ: not an SPTrainer checkpoint
            missing, cause = ["(all)"], err
        else:
            missing, cause = reg.missing_anchors(getattr(self.optimizer, "optimizer", self.optimizer)), None
        if missing:
            raise MissingAnchorError(
                f"resume_from_checkpoint={checkpoint!r} holds no starting-point anchor (first missing: "
                f"{missing[0]!r}, {len(missing)} in all): it was not written by SPTrainer with sp_penalty="
                f"{reg.info.name!r}. Resuming would re-anchor on fine-tuned weights. Resume from a checkpoint of the "
                "same SPTrainer setup, or start again from the pretrained model without resume_from_checkpoint."
            ) from cause

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        super()._save(output_dir, timm_layout_state_dict(model, state_dict))

    def _sp_load_converted(self, checkpoint: str, model: nn.Module) -> bool:
        """Load ``checkpoint`` through ``from_pretrained`` if it is saved under other key names; True if it was.

        save_pretrained writes some models (ViT, ...) under their legacy key names; Trainer's plain
        ``load_state_dict(strict=False)`` (resume, ``load_best_model_at_end``) would then silently skip those
        tensors and keep the weights the model had. from_pretrained applies the key conversion.
        """
        weights = Path(checkpoint) / SAFE_WEIGHTS_NAME
        if (
            not isinstance(model, PreTrainedModel)
            or not weights.is_file()
            or self.is_fsdp_enabled
            or self.is_deepspeed_enabled
            or _saved_keys(weights) == set(model.state_dict())
        ):
            return False
        logger.info("Loading %s through from_pretrained (its saved keys are converted on load).", weights)
        loaded = type(model).from_pretrained(checkpoint, config=model.config)
        model.load_state_dict(loaded.state_dict(), strict=True)
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = self.model if model is None else model
        if not self._sp_load_converted(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not self._sp_load_converted(best, self.model):
            super()._load_best_model()

    # ----------------------------------------------------------------------------------------
    # Logging and checkpoints
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.sp_regularizer is not None and "loss" in logs:
            logs.update(self.sp_regularizer.pop_metrics())
        super().log(logs, *args, **kwargs)

    def _sp_all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of the shard-local penalty records over ranks."""
        return self.accelerator.reduce(t, reduction="sum")

    def create_model_card(self, dataset_name: str | None = None, **kwargs: Any) -> None:
        """Write ``README.md`` in ``output_dir``: the SP card (penalty, formula, alpha, beta, anchored vs new,
        distance to start, eval results, hyperparameters, how to load), instead of Trainer's draft card.

        Takes Trainer's arguments (``language``, ``license``, ``tags``, ``model_name``, ``finetuned_from``,
        ``tasks``, ``dataset_tags``, ``dataset``, ``dataset_args``: what ``push_to_hub(**kwargs)`` passes on);
        the card carries them beside the SP facts."""
        if not self.is_world_process_zero():
            return
        info = with_trainer_card_arguments(self.model_card_info(dataset_name=dataset_name), **kwargs)
        render_model_card(info).save(str(Path(self.args.output_dir) / "README.md"))

    def model_card_info(self, dataset_name: str | None = None) -> SPCardInfo:
        """What the model card records about this run (``sp_card_context`` adds what the Trainer cannot know)."""
        context = dict(getattr(self, "sp_card_context", {}) or {})
        model = self.accelerator.unwrap_model(self.model)
        config = getattr(model, "config", None)
        args, reg = self.args, self.sp_regularizer
        distance = None
        # Sharded engines hold shard-local anchors; the card is written by one rank, so it leaves the distance out.
        if reg is not None and self.optimizer is not None and not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            distance = reg.distance(getattr(self.optimizer, "optimizer", self.optimizer))
        metrics: dict[str, float] = {}
        for entry in self.state.log_history:
            metrics.update({k: v for k, v in entry.items() if k.startswith(("eval_", "test_"))})
        library = context.get("library") or (
            "timm" if getattr(config, "model_type", "") == "timm_wrapper" else "transformers"
        )
        label_names = context.get("label_names") or (
            [config.id2label[i] for i in sorted(config.id2label)] if getattr(config, "id2label", None) else None
        )
        split = reg.split if reg is not None else None
        return SPCardInfo(
            model_id=args.hub_model_id or Path(args.output_dir).name,
            base_model=context.get("base_model") or getattr(config, "_name_or_path", None) or None,
            library=library,
            dataset_name=context.get("dataset_name") or dataset_name,
            penalty=args.sp_penalty,
            penalty_formula=reg.info.formula if reg is not None else "",
            alpha=args.sp_alpha,
            beta=args.sp_beta,
            mode=args.sp_mode,
            include=args.sp_include,
            anchored=split.summary().split("; ")[0] if split else "nothing (plain fine-tuning)",
            new="; ".join(split.summary().split("; ")[1:2]) if split else "",
            final_distance=distance[0] if distance else None,
            relative_distance=distance[1] if distance else None,
            eval_results=metrics,
            hyperparameters=hyperparameters_from_args(args),
            num_labels=getattr(config, "num_labels", None),
            label_names=label_names,
        )

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        if self.sp_regularizer is not None:
            self.sp_regularizer.check_finite()
        super()._save_checkpoint(model, trial)
