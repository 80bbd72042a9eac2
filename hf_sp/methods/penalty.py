"""The paper's starting-point penalties as a transfer method (Li, Grandvalet and Davoine, ICML 2018).

``J(w) = loss(w) + alpha * Omega(w_S) + beta/2 * ||w_Sbar||^2``: ``w_S`` are the pretrained tensors,
pulled toward their start ``w0_S``; ``w_Sbar`` the new head, decayed toward zero. The penalties
themselves live in :mod:`hf_sp.penalties` (one module each); :class:`~hf_sp.regularizer.SPRegularizer`
applies one at the optimizer step, with the anchor in the optimizer state.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..fisher import check_fisher, estimate_fisher, load_fisher
from ..penalties import get_penalty, get_penalty_info, list_penalties
from ..penalties._compiled import check_compiler
from ..regularizer import MODES, MissingAnchorError, SPRegularizer
from ..selection import INCLUDE_CHOICES
from ._base import MethodContext, TransferMethod, register_method

logger = logging.getLogger(__name__)

__all__ = ["PenaltyArguments", "StartingPointPenalty"]


@dataclass
class PenaltyArguments:
    """The ``sp_*`` fields of the starting-point penalty (mixed into :class:`~hf_sp.SPConfig`)."""

    sp_penalty: str = field(
        default="l2_sp",
        metadata={
            "help": "Starting-point penalty: one of "
            + ", ".join(list_penalties())
            + ". 'none' is plain fine-tuning (Trainer behaviour); 'l2' decays toward zero (the paper's baseline)."
        },
    )
    sp_alpha: float = field(
        default=0.1,
        metadata={"help": "Strength alpha of the penalty on the pretrained (anchored) tensors, pulling toward w0."},
    )
    sp_beta: float = field(
        default=0.01,
        metadata={"help": "Strength beta of the L2 toward zero on the new (head) tensors: beta/2 * ||w_Sbar||^2."},
    )
    sp_include: str = field(
        default="kernels",
        metadata={
            "help": "Which trainable tensors are penalized: 'kernels' (conv and linear weights, as the paper's "
            "code) or 'all' (norms and biases too)."
        },
    )
    sp_head_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names of the new (re-initialised) head modules, e.g. 'classifier' or 'head.fc'. "
            "Default: found automatically (timm pretrained_cfg, or the transformers classifier by structure)."
        },
    )
    sp_mode: str = field(
        default="gradient",
        metadata={
            "help": "'gradient': add the penalty's exact gradient to the loss gradient (the paper; any optimizer). "
            "'decoupled': move the weights by -lr * alpha * dOmega/dw beside the optimizer's update (AdamW-style)."
        },
    )
    sp_compile: bool = field(
        default=False,
        metadata={
            "help": "Step the anchored tensors with one kernel compiled by torch.compile (one pass over each entry: "
            "about 1x the memory floor on CPU instead of about 2x), for elementwise penalties; the first step "
            "compiles (seconds to a minute). With sp_fisher_batches, the Fisher estimate's position-pair products "
            "are compiled too (estimate_fisher(compile=True)). Needs inductor's compiler (a C++ compiler on CPU, "
            "Triton on GPU)."
        },
    )
    sp_fisher_path: str | None = field(
        default=None,
        metadata={
            "help": "Safetensors file with the diagonal Fisher at w0 (hf_sp.estimate_fisher), for l2_sp_fisher."
        },
    )
    sp_fisher_batches: int | None = field(
        default=None,
        metadata={
            "help": "For l2_sp_fisher without sp_fisher_path: estimate the Fisher at the start of training on this "
            "many batches of the training set, with the model's own predictions."
        },
    )
    sp_fisher_top_k: int | None = field(
        default=None,
        metadata={"help": "Fisher estimation: sum over the top-k predicted classes only (default: all classes)."},
    )


#: Where the paper's recipe differs from Trainer's defaults (SGD with momentum, no clipping: clipping at norm 1
#: stalls SGD on a new head; a learning rate for SGD, not for AdamW).
PAPER_TRAINING_DEFAULTS: dict[str, Any] = {
    "optim": "sgd",
    "optim_args": "momentum=0.9",
    "learning_rate": 0.01,
    "max_grad_norm": 0.0,
}


@register_method(
    "penalty",
    order=40,
    description="The paper's penalties toward w0 (sp_penalty), applied at the optimizer step.",
)
class StartingPointPenalty(TransferMethod):
    """``sp_penalty``: adds ``alpha * dOmega(w_S)/dw + beta * w_Sbar`` to the gradients at each optimizer step.

    The anchor ``w0`` is captured once, at the first optimizer step of a fresh run, into the optimizer
    state (``optimizer.state[p]["sp_anchor"]``), and travels with every checkpoint.
    """

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.regularizer: SPRegularizer | None = None
        #: The original group of each group after the split by role (a user's scheduler follows them).
        self.origins: list[int] = []

    @classmethod
    def enabled(cls, args: Any) -> bool:
        return args.sp_penalty != "none"

    @classmethod
    def training_defaults(cls, args: Any) -> dict[str, Any]:
        return PAPER_TRAINING_DEFAULTS

    @classmethod
    def validate(cls, args: Any) -> None:
        if args.sp_penalty not in list_penalties():
            raise ValueError(
                f"sp_penalty={args.sp_penalty!r} is not a known penalty. Known penalties: "
                f"{', '.join(list_penalties())} (hf_sp.register_penalty adds one)."
            )
        info = None if args.sp_penalty == "none" else get_penalty_info(args.sp_penalty)
        for name in ("sp_alpha", "sp_beta"):
            value = getattr(args, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if args.sp_include not in INCLUDE_CHOICES:
            raise ValueError(f"sp_include={args.sp_include!r} is not one of {INCLUDE_CHOICES}.")
        if args.sp_mode not in MODES:
            raise ValueError(f"sp_mode={args.sp_mode!r} is not one of {MODES}.")
        for name in ("sp_fisher_batches", "sp_fisher_top_k"):
            value = getattr(args, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if info is None:
            return
        if args.weight_decay:
            raise ValueError(
                f"weight_decay={args.weight_decay} would decay the weights toward zero on top of "
                f"sp_penalty={args.sp_penalty!r}. Set weight_decay=0.0: sp_alpha regularizes the pretrained tensors "
                "and sp_beta the new head (use sp_penalty='l2' for decay toward zero, or sp_penalty='none' for "
                "plain Trainer behaviour)."
            )
        if args.sp_compile and not get_penalty(args.sp_penalty).compilable:
            raise ValueError(
                f"sp_compile=True needs an elementwise penalty, and sp_penalty={args.sp_penalty!r} has no elementwise "
                "form. Set sp_compile=False, or use l2, l2_sp, l1_sp or l2_sp_fisher."
            )
        if info.needs_fisher and args.sp_fisher_path is None and args.sp_fisher_batches is None:
            raise ValueError(
                f"sp_penalty={args.sp_penalty!r} needs a Fisher diagonal: set sp_fisher_path to a file written by "
                "hf_sp.save_fisher, or sp_fisher_batches to estimate it at the start of training."
            )
        if not info.needs_fisher and (args.sp_fisher_path is not None or args.sp_fisher_batches is not None):
            raise ValueError(
                f"sp_fisher_path / sp_fisher_batches are only used by sp_penalty='l2_sp_fisher', not "
                f"{args.sp_penalty!r}. Remove them or change sp_penalty."
            )

    # --------------------------------------------------------------- phases
    def attach(self, ctx: MethodContext) -> None:
        args, split = self.args, ctx.split
        info = get_penalty_info(args.sp_penalty)
        if not split.anchored:
            raise ValueError(
                f"Nothing left to anchor: no pretrained tensor is penalized (sp_include={args.sp_include!r}, "
                f"head modules {split.head_modules}). Use sp_include='all', or check sp_head_modules."
            )
        fisher = None
        if info.needs_fisher and args.sp_fisher_path is not None:
            fisher = load_fisher(args.sp_fisher_path)
            check_fisher(fisher, ctx.model, names=split.anchored)
        self.regularizer = SPRegularizer(
            args.sp_penalty,
            args.sp_alpha,
            args.sp_beta,
            split,
            mode=args.sp_mode,
            fisher=fisher if fisher is not None else ({} if info.needs_fisher else None),
            all_reduce=ctx.all_reduce_sum if ctx.sharded else None,
            compile=args.sp_compile,
        )
        if args.sp_compile:  # a missing compiler is reported now, not at the first step
            check_compiler(self.regularizer.penalty, ctx.device if ctx.device is not None else "cpu")

    def initialize(self, ctx: MethodContext) -> None:
        reg = self.regularizer
        reg.capture_allowed = True
        if reg.info.needs_fisher and not reg.fisher:
            reg.fisher = self._estimate_fisher(ctx)

    def _estimate_fisher(self, ctx: MethodContext) -> dict[str, torch.Tensor]:
        if ctx.sharded:
            raise ValueError(
                "sp_fisher_batches cannot estimate the Fisher on a sharded model. Estimate it beforehand with "
                "hf_sp.estimate_fisher, save it with hf_sp.save_fisher, and pass sp_fisher_path."
            )
        if ctx.train_dataset is None:
            raise ValueError("sp_fisher_batches needs a train_dataset to estimate the Fisher on.")
        # Same batches on every rank, so that every process holds the same Fisher.
        dataset = ctx.probe_dataset if ctx.probe_dataset is not None else ctx.train_dataset
        loader = ctx.make_loader(dataset, self.args.per_device_train_batch_size)
        return estimate_fisher(
            ctx.model,
            loader,
            max_batches=self.args.sp_fisher_batches,
            top_k=self.args.sp_fisher_top_k,
            param_names=ctx.split.anchored,
            progress=ctx.show_progress,
            compile=self.args.sp_compile,
        )

    def configure_optimizer(self, ctx: MethodContext, optimizer: torch.optim.Optimizer) -> None:
        reg = self.regularizer
        self.origins = reg.prepare_optimizer(optimizer, ctx.model.named_parameters())
        logger.info(
            "hf_sp: %s (alpha=%g, beta=%g, %s mode). %s", reg.info.name, reg.alpha, reg.beta, reg.mode,
            reg.split.summary(),
        )

    def on_resume(self, ctx: MethodContext, optimizer: torch.optim.Optimizer, checkpoint: str) -> None:
        missing = self.regularizer.missing_anchors(optimizer)
        if missing:
            raise missing_anchor_error(checkpoint, self.args.sp_penalty, missing)

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` if the penalty became non-finite since the last check."""
        self.regularizer.check_finite()

    def metrics(self) -> dict[str, float]:
        return self.regularizer.pop_metrics()

    def distance(self, optimizer: torch.optim.Optimizer) -> tuple[float, float] | None:
        """``(||w_S - w0_S||, relative)`` now, from the anchors in the optimizer state."""
        return self.regularizer.distance(optimizer)


def missing_anchor_error(checkpoint: str, penalty: str, missing: list[str]) -> MissingAnchorError:
    """The error for a resume from a checkpoint without the starting-point anchor."""
    return MissingAnchorError(
        f"resume_from_checkpoint={checkpoint!r} holds no starting-point anchor (first missing: {missing[0]!r}, "
        f"{len(missing)} in all): it was not written by SPTrainer with sp_penalty={penalty!r}. Resuming would "
        "re-anchor on fine-tuned weights. Resume from a checkpoint of the same SPTrainer setup, or start again from "
        "the pretrained model without resume_from_checkpoint."
    )
