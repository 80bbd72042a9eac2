"""``SPTrainer``: ``transformers.Trainer`` with starting-point regularization and the transfer methods."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_NAME

from .config import SPConfig
from .methods import MethodContext, TransferMethod, build_methods
from .methods.penalty import missing_anchor_error
from .model_card import SPCardInfo, hyperparameters_from_args, render_model_card, with_trainer_card_arguments
from .models import is_timm_model, timm_layout_state_dict, wrap_timm_model
from .regularizer import MissingAnchorError, SPRegularizer, add_frozen_tensors
from .schedulers import check_scheduler, follow_split_groups
from .selection import ParamSplit, split_parameters

logger = logging.getLogger(__name__)

__all__ = ["SPTrainer"]

#: Set on a model after its first optimizer step under an SPTrainer, so that a later fresh start cannot take the
#: fine-tuned weights for the pretrained start (anchor, probe head, interpolation start).
STARTED_ATTR = "_hf_sp_started"


def _saved_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


class _StepEnd(TrainerCallback):
    """Ends the regularizer's engine step where Trainer's step ends: DeepSpeed ZeRO-3 steps the optimizer once per
    sub-group, and its gradient scaler may skip one of those calls alone (see :meth:`SPRegularizer.end_step`)."""

    def __init__(self, trainer: SPTrainer) -> None:
        # held, not weakly: a trainer is pickled whole (Ray's hyperparameter search), and a weak reference cannot be
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        reg = self.trainer.sp_regularizer
        if reg is not None:
            reg.end_step()


class SPTrainer(Trainer):
    """A drop-in ``Trainer`` for transfer: starting-point regularization (Li et al., ICML 2018) and the methods
    that grew from it.

    Swap ``Trainer`` for ``SPTrainer`` and ``TrainingArguments`` for :class:`SPConfig`; nothing
    else changes. ``model`` may be any transformers image classifier or a raw timm model (wrapped
    in ``TimmWrapperForImageClassification`` so that Trainer gets a loss from ``labels``).

    Example:
        >>> args = SPConfig(output_dir="out", sp_penalty="l2_sp", sp_alpha=0.1, sp_beta=0.01)
        >>> trainer = SPTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds)
        >>> trainer.train()

    The ``sp_*`` fields of the arguments enable transfer methods (:mod:`hf_sp.methods`); the trainer
    calls their phases (attach, initialize, optimizer, resume, save, loss term, end of training, logs,
    model card) and overrides no more of ``Trainer`` than that. ``probe_dataset`` is the training set
    without augmentation, for the methods that look at the frozen features before training
    (``sp_head_init="probe"``, the Fisher); it defaults to ``train_dataset``.
    """

    args: SPConfig

    def __init__(
        self,
        model: nn.Module | None = None,
        args: SPConfig | None = None,
        *pos: Any,
        probe_dataset: Any = None,
        **kwargs: Any,
    ):
        if args is None:
            raise ValueError("SPTrainer needs args=SPConfig(output_dir=..., sp_penalty=..., ...).")
        if not isinstance(args, SPConfig):
            raise TypeError(
                f"SPTrainer needs args to be an SPConfig (or SPTrainingArguments), got {type(args).__name__}. "
                "Replace TrainingArguments(...) with SPConfig(...): it takes the same arguments plus sp_*."
            )
        if is_timm_model(model):
            model = wrap_timm_model(model)
        self.sp_methods: list[TransferMethod] = []
        self.probe_dataset = probe_dataset
        self._sp_context: MethodContext | None = None
        self._sp_resuming = False
        self._sp_optimizer_id: int | None = None
        super().__init__(model, args, *pos, **kwargs)
        self.add_callback(_StepEnd(self))
        self._sp_attach(self.model)  # validates the settings against the model now, before any training
        if self.optimizer is not None and self.sp_methods:  # optimizers=(optimizer, scheduler): checked now
            self._sp_check_user_optimizer()

    def create_accelerator_and_postprocess(self) -> None:
        """Trainer's, then a DeepSpeed configuration without ``gradient_clipping`` gets ``max_grad_norm``: DeepSpeed
        would clip at its default norm of 1 whatever ``max_grad_norm`` says (transformers fills only ``"auto"``, and
        a configuration given to ``accelerate launch`` not even that), while a penalty's recipe does not clip. An
        explicit value is the user's (transformers checks it against ``max_grad_norm``)."""
        super().create_accelerator_and_postprocess()
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        config = getattr(getattr(plugin, "hf_ds_config", None), "config", None)
        if config is None:
            return
        if "gradient_clipping" not in config:
            config["gradient_clipping"] = self.args.max_grad_norm
        methods = self.args.methods()
        if "optimizer" in config and methods:
            raise ValueError(
                f"The DeepSpeed configuration has an \"optimizer\" section: DeepSpeed builds that optimizer (and its "
                f"scheduler) itself, out of reach of the methods ({', '.join(methods)}), which configure and hook the "
                "optimizer and scheduler that Trainer builds. Remove the section and choose the optimizer with optim, "
                "optim_args and learning_rate (ZeRO-Offload with it: zero_force_ds_cpu_optimizer: false)."
            )

    # ----------------------------------------------------------------------------------------
    # The methods and what they see
    def _sp_attach(self, model: nn.Module) -> None:
        """Build the enabled methods from the arguments as they are now (a hyperparameter-search trial sets them
        after building its model) and attach them to ``model``."""
        for method in self.sp_methods:
            method.detach()
        self.sp_methods = build_methods(self.args)
        if not self.sp_methods:
            self._sp_context = None
            return
        args = self.args
        split: ParamSplit = split_parameters(model, include=args.sp_include, head_modules=args.sp_head_modules)
        self._sp_context = MethodContext(
            args=args,
            model=model,
            split=split,
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            probe_dataset=self.probe_dataset,
            make_loader=self._sp_loader,
            device=args.device,
            is_world_process_zero=self.is_world_process_zero(),
            all_reduce_sum=self._sp_all_reduce,
            evaluate=self._sp_evaluate,
            show_progress=not args.disable_tqdm,
            sharded=self.is_fsdp_enabled or self.is_deepspeed_enabled,
        )
        for method in self.sp_methods:
            method.attach(self._sp_context)

    def _sp_method(self, name: str) -> TransferMethod | None:
        return next((m for m in self.sp_methods if m.name == name), None)

    @property
    def sp_regularizer(self) -> SPRegularizer | None:
        """The penalty's :class:`~hf_sp.regularizer.SPRegularizer` (``None`` with ``sp_penalty="none"``)."""
        penalty = self._sp_method("penalty")
        return penalty.regularizer if penalty is not None else None

    def _sp_loader(self, dataset: Any, batch_size: int) -> DataLoader:
        if hasattr(dataset, "column_names"):
            dataset = self._remove_unused_columns(dataset, description="hf_sp")
        return DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)

    def _sp_evaluate(self) -> dict[str, float]:
        """The evaluation loop on ``eval_dataset``, without logging or callbacks: the metrics only."""
        loader = self.get_eval_dataloader(self.eval_dataset)
        output = self.evaluation_loop(loader, description="hf_sp", metric_key_prefix="eval")
        return output.metrics

    def call_model_init(self, trial=None) -> nn.Module:
        model = super().call_model_init(trial)
        return wrap_timm_model(model) if is_timm_model(model) else model

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs: Any):
        self._sp_resuming = bool(resume_from_checkpoint)  # read when the optimizer is created
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        logs: dict[str, float] = {}
        for method in self.sp_methods:
            logs.update(method.on_train_end(self._sp_context, optimizer))
        if logs:
            self.log(logs)
            output.metrics.update(logs)
        return output

    # ----------------------------------------------------------------------------------------
    # Optimizer: initialize (fresh runs), then let each method configure the groups and hook the step
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        built_here = self.optimizer is None  # not a user's optimizer: it gets the tensors frozen now (see below)
        opt_model = model if model is not None else self.model
        if self.optimizer is None or self._sp_optimizer_id is None:
            self._sp_attach(opt_model)
            fresh = not self._sp_resuming and not getattr(opt_model, STARTED_ATTR, False)
            if self.sp_methods and not fresh and not self._sp_resuming:
                raise MissingAnchorError(
                    "This model was already fine-tuned by an SPTrainer: its weights are no longer the pretrained "
                    "starting point, and starting from them would silently change the method. Continue with "
                    "train(resume_from_checkpoint=...), or build the model again from its pretrained weights."
                )
            if fresh:
                for method in self.sp_methods:
                    method.initialize(self._sp_context)
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        raw = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer on a second train()
        if not self.sp_methods or id(raw) == self._sp_optimizer_id:
            return optimizer
        self._sp_check_user_optimizer(raw)  # before any split: the groups are the user's own
        if built_here and not self.is_deepspeed_enabled:
            # Trainer's optimizer holds the tensors with requires_grad now; one frozen now and unfrozen later (gradual
            # unfreezing) must still train, with its role. DeepSpeed builds its own groups from the trainable ones.
            add_frozen_tensors(raw, opt_model.named_parameters(), self._sp_context.split)
        for method in self.sp_methods:
            method.configure_optimizer(self._sp_context, raw)
        penalty = self._sp_method("penalty")
        if self.lr_scheduler is not None and penalty is not None:
            # passed in optimizers=(optimizer, scheduler), built on the groups before the split by role
            follow_split_groups(self.lr_scheduler, penalty.origins)
        raw.register_step_post_hook(lambda *_: setattr(opt_model, STARTED_ATTR, True))
        self._sp_optimizer_id = id(raw)
        return optimizer

    def _sp_check_user_optimizer(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Refuse a user's optimizer or scheduler (``optimizers=(...)``) that would silently change the method."""
        optimizer = optimizer if optimizer is not None else getattr(self.optimizer, "optimizer", self.optimizer)
        penalty = self._sp_method("penalty")
        if penalty is not None:
            penalty.regularizer.check_weight_decay(optimizer, self.model.named_parameters())
        if self.lr_scheduler is None:
            return
        check_scheduler(self.lr_scheduler)
        if self._sp_method("learning_rates") is not None:
            raise ValueError(
                "sp_body_lr_scale / sp_layer_decay set per-group learning rates, which a scheduler passed in "
                "optimizers=(optimizer, scheduler) cannot follow (it was built on the groups before the split). Pass "
                "optimizers=(optimizer, None) with lr_scheduler_type / lr_scheduler_kwargs in SPConfig instead."
            )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self.sp_methods or checkpoint is None or self.is_deepspeed_enabled:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        penalty = self._sp_method("penalty")
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except ValueError as err:  # the parameter groups differ: not a checkpoint of this SPTrainer setup
            if penalty is not None:
                raise missing_anchor_error(checkpoint, self.args.sp_penalty, ["(all)"]) from err
            raise ValueError(
                f"resume_from_checkpoint={checkpoint!r}: its optimizer state does not match this SPTrainer setup "
                f"({err}). Resume with the sp_* settings the run started with."
            ) from err
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        for method in self.sp_methods:
            method.on_resume(self._sp_context, optimizer, checkpoint)

    # ----------------------------------------------------------------------------------------
    # Loss terms (methods that look at the forward pass)
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        terms = [m for m in self.sp_methods if type(m).loss_term is not TransferMethod.loss_term]
        if not terms or not model.training:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        values = [v for m in terms if (v := m.loss_term(self._sp_context, inputs, outputs)) is not None]
        if values:
            extra = torch.stack([v.reshape(()) for v in values]).sum()
            if self._sp_loss_scaled_for_ga(num_items_in_batch):
                # Trainer will not divide this loss by the accumulation steps: a per-micro-batch mean must be.
                extra = extra / self.current_gradient_accumulation_steps
            loss = loss + extra.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _sp_loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether Trainer treats the loss as already normalized over the accumulated batch (as training_step)."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

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
        if "loss" in logs:
            for method in self.sp_methods:
                logs.update(method.metrics())
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
            method_rows=[row for m in self.sp_methods if m.name != "penalty" for row in m.card()],
            method_notes=[text for m in self.sp_methods if (text := m.card_text())],
        )

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        if self.sp_regularizer is not None:
            self.sp_regularizer.check_finite()
        if self.sp_methods:
            # Before Trainer's files: a checkpoint cut short by a kill then misses Trainer's files, not the methods'.
            checkpoint = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            os.makedirs(checkpoint, exist_ok=True)
            for method in self.sp_methods:
                method.on_save(self._sp_context, checkpoint)
        super()._save_checkpoint(model, trial)
