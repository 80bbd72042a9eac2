"""BatchNorm at its source statistics: the running mean and variance stay those of the pretrained model.

With ``sp_batchnorm="frozen"`` every BatchNorm layer normalises with its running statistics in
training too, and never updates them: ``y = gamma * (x - mu_0) / sqrt(var_0 + eps) + beta``, with
``mu_0, var_0`` the source's. Small target batches then cannot move the statistics under the new
head (which a probe fitted on the source statistics relies on), and the network is the source's
function of its weights. The layers keep their type and their state-dict keys, so the saved model
is a plain classifier.

Why a forward pre-hook: ``Trainer.training_step`` calls ``model.train()`` before every step, which
undoes a one-off ``.eval()``; the hook puts each BatchNorm layer back in eval mode right before its
forward, under DDP too (DDP runs the inner modules' hooks, and broadcasts the unchanged buffers).
timm's ``freeze_batch_norm_2d`` would instead turn the affine parameters into buffers, which
``sp_batchnorm_affine`` must be free to train, anchor or freeze.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from ._base import MethodContext, TransferMethod, register_method

__all__ = ["BATCHNORM_CHOICES", "BatchNormArguments", "BatchNormHandling", "batchnorm_parameters", "freeze_statistics"]

BATCHNORM_CHOICES = ("train", "frozen")
AFFINE_CHOICES = ("train", "anchored", "frozen")


@dataclass
class BatchNormArguments:
    """The ``sp_*`` fields of BatchNorm handling (mixed into :class:`~hf_sp.SPConfig`)."""

    sp_batchnorm: str = field(
        default="train",
        metadata={
            "help": "'train': BatchNorm layers use batch statistics and update their running statistics (Trainer's "
            "behaviour). 'frozen': they keep the source model's running statistics for the whole run (eval-mode "
            "normalisation in training too)."
        },
    )
    sp_batchnorm_affine: str = field(
        default="train",
        metadata={
            "help": "BatchNorm scale and shift: 'train' (as sp_include says: free with 'kernels', anchored with 'all'), "
            "'anchored' (pulled toward w0 by sp_penalty), or 'frozen' (not trained)."
        },
    )


def _eval_mode(module: nn.Module, args: Any) -> None:
    module.training = False


#: Set on a BatchNorm layer whose statistics are frozen, so that attaching twice adds no second hook.
FROZEN_ATTR = "_hf_sp_frozen_statistics"


def freeze_statistics(model: nn.Module) -> list[RemovableHandle]:
    """Keep every BatchNorm layer of ``model`` in eval mode at each forward; returns the new hooks' handles."""
    handles = []
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not getattr(module, FROZEN_ATTR, False):
            handles.append(module.register_forward_pre_hook(_eval_mode))
            setattr(module, FROZEN_ATTR, True)
    return handles


def batchnorm_parameters(model: nn.Module) -> list[str]:
    """Names of the affine parameters (scale and shift) of the BatchNorm layers of ``model``."""
    return [
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, _BatchNorm)
        for name, _ in module.named_parameters(recurse=False)
    ]


@register_method(
    "batchnorm",
    order=20,
    description="BatchNorm statistics kept at the source's (sp_batchnorm) and its affine parameters' role.",
)
class BatchNormHandling(TransferMethod):
    """``sp_batchnorm`` / ``sp_batchnorm_affine``: freeze the statistics, and train, anchor or freeze the affine."""

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.handles: list[RemovableHandle] = []
        self.num_layers = 0

    @classmethod
    def enabled(cls, args: Any) -> bool:
        return args.sp_batchnorm != "train" or args.sp_batchnorm_affine != "train"

    @classmethod
    def validate(cls, args: Any) -> None:
        if args.sp_batchnorm not in BATCHNORM_CHOICES:
            raise ValueError(f"sp_batchnorm={args.sp_batchnorm!r} is not one of {BATCHNORM_CHOICES}.")
        if args.sp_batchnorm_affine not in AFFINE_CHOICES:
            raise ValueError(f"sp_batchnorm_affine={args.sp_batchnorm_affine!r} is not one of {AFFINE_CHOICES}.")
        if args.sp_batchnorm_affine == "anchored" and args.sp_penalty == "none":
            raise ValueError(
                "sp_batchnorm_affine='anchored' needs a penalty that anchors (sp_penalty='l2_sp', ...), not "
                "sp_penalty='none'. Set sp_penalty, or sp_batchnorm_affine='train' or 'frozen'."
            )

    def attach(self, ctx: MethodContext) -> None:
        names = batchnorm_parameters(ctx.model)
        layers = [m for m in ctx.model.modules() if isinstance(m, _BatchNorm)]
        if not layers:
            raise ValueError(
                f"sp_batchnorm={self.args.sp_batchnorm!r} / sp_batchnorm_affine={self.args.sp_batchnorm_affine!r}: "
                f"{type(ctx.model).__name__} has no BatchNorm layer. Leave both at 'train' for this model."
            )
        self.num_layers = len(layers)
        if self.args.sp_batchnorm == "frozen":
            self.handles = freeze_statistics(ctx.model)
        affine = self.args.sp_batchnorm_affine
        if affine == "frozen":
            params = dict(ctx.model.named_parameters())
            for name in names:
                params[name].requires_grad_(False)
            ctx.split.reassign(names, None)
        elif affine == "anchored":
            ctx.split.reassign([n for n in names if n in ctx.split.shapes], "anchored")

    def card(self) -> list[tuple[str, str]]:
        return [
            ("BatchNorm statistics (`sp_batchnorm`)", f"`{self.args.sp_batchnorm}` ({self.num_layers} layers)"),
            ("BatchNorm scale and shift (`sp_batchnorm_affine`)", f"`{self.args.sp_batchnorm_affine}`"),
        ]

    def card_text(self) -> str:
        if self.args.sp_batchnorm == "frozen":
            return "BatchNorm layers kept the source model's running statistics throughout training."
        return ""
