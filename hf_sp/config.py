"""``SPConfig``: ``TrainingArguments`` plus the starting-point regularization settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .penalties import get_penalty_info, list_penalties
from .regularizer import MODES
from .selection import INCLUDE_CHOICES

__all__ = ["SPConfig", "SPTrainingArguments"]


@dataclass
class SPConfig(TrainingArguments):
    """Training arguments for :class:`hf_sp.SPTrainer`: every ``TrainingArguments`` field, plus ``sp_*``.

    Example:
        >>> args = SPConfig(output_dir="out", sp_penalty="l2_sp", sp_alpha=0.1, sp_beta=0.01, learning_rate=0.01)

    The objective is ``J(w) = loss(w) + alpha * Omega(w_S) + beta/2 * ||w_Sbar||^2`` where ``w_S`` are
    the pretrained tensors (anchored to their starting point ``w0``) and ``w_Sbar`` the new head.
    """

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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sp_penalty not in list_penalties():
            raise ValueError(
                f"sp_penalty={self.sp_penalty!r} is not a known penalty. Known penalties: "
                f"{', '.join(list_penalties())} (hf_sp.register_penalty adds one)."
            )
        info = None if self.sp_penalty == "none" else get_penalty_info(self.sp_penalty)
        for name in ("sp_alpha", "sp_beta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if self.sp_include not in INCLUDE_CHOICES:
            raise ValueError(f"sp_include={self.sp_include!r} is not one of {INCLUDE_CHOICES}.")
        if self.sp_mode not in MODES:
            raise ValueError(f"sp_mode={self.sp_mode!r} is not one of {MODES}.")
        if isinstance(self.sp_head_modules, str):
            self.sp_head_modules = [m.strip() for m in self.sp_head_modules.split(",") if m.strip()]
        for name in ("sp_fisher_batches", "sp_fisher_top_k"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if info is None:
            return
        if self.weight_decay:
            raise ValueError(
                f"weight_decay={self.weight_decay} would decay the weights toward zero on top of "
                f"sp_penalty={self.sp_penalty!r}. Set weight_decay=0.0: sp_alpha regularizes the pretrained tensors "
                "and sp_beta the new head (use sp_penalty='l2' for decay toward zero, or sp_penalty='none' for "
                "plain Trainer behaviour)."
            )
        if info.needs_fisher and self.sp_fisher_path is None and self.sp_fisher_batches is None:
            raise ValueError(
                f"sp_penalty={self.sp_penalty!r} needs a Fisher diagonal: set sp_fisher_path to a file written by "
                "hf_sp.save_fisher, or sp_fisher_batches to estimate it at the start of training."
            )
        if not info.needs_fisher and (self.sp_fisher_path is not None or self.sp_fisher_batches is not None):
            raise ValueError(
                f"sp_fisher_path / sp_fisher_batches are only used by sp_penalty='l2_sp_fisher', not "
                f"{self.sp_penalty!r}. Remove them or change sp_penalty."
            )

    def __getstate__(self) -> dict:
        # Trainer pickles the arguments into training_args.bin, in every checkpoint, and pushes them to the Hub:
        # the token must not travel with them.
        state = self.__dict__.copy()
        state["hub_token"] = None
        return state


#: Alias following the ``*TrainingArguments`` naming of transformers.
SPTrainingArguments = SPConfig
