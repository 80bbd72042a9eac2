"""``SPConfig``: ``TrainingArguments`` plus the fields of every transfer method (``sp_*``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .methods import (
    BatchNormArguments,
    BSSArguments,
    DeltaArguments,
    InterpolationArguments,
    LearningRateArguments,
    PenaltyArguments,
    ProbeHeadArguments,
    ProjectionArguments,
    SPDArguments,
    get_method_info,
    list_methods,
)

__all__ = ["SPConfig", "SPTrainingArguments"]

#: ``TrainingArguments`` fields whose default depends on the recipe: ``None`` means "the enabled methods' default,
#: else Trainer's".
RECIPE_DEFAULTED = ("optim", "optim_args", "learning_rate", "max_grad_norm")
_TRAINER_DEFAULTS = {
    name: f.default for name, f in TrainingArguments.__dataclass_fields__.items() if name in RECIPE_DEFAULTED
}


@dataclass
class SPConfig(
    TrainingArguments,
    InterpolationArguments,
    BSSArguments,
    DeltaArguments,
    ProjectionArguments,
    SPDArguments,
    LearningRateArguments,
    BatchNormArguments,
    ProbeHeadArguments,
    PenaltyArguments,
):
    """Training arguments for :class:`hf_sp.SPTrainer`: every ``TrainingArguments`` field, plus ``sp_*``.

    Example:
        >>> args = SPConfig(output_dir="out", sp_penalty="l2_sp", sp_alpha=0.1, sp_beta=0.01)
        >>> lp_ft = SPConfig(output_dir="out", sp_head_init="probe", sp_batchnorm="frozen", learning_rate=1e-3)

    The objective is ``J(w) = loss(w) + alpha * Omega(w_S) + beta/2 * ||w_Sbar||^2`` where ``w_S`` are
    the pretrained tensors (anchored to their starting point ``w0``) and ``w_Sbar`` the new head; the
    other ``sp_*`` fields add the phases of the recipe (probe-initialised head, frozen BatchNorm,
    per-role learning rates, interpolation toward the start): see :mod:`hf_sp.methods`.

    ``optim``, ``optim_args``, ``learning_rate`` and ``max_grad_norm`` left unset take the recipe's
    defaults: with a penalty, the paper's SGD with momentum 0.9 at learning rate 0.01 and no gradient
    clipping (clipping at norm 1 stalls SGD on a new head); with ``sp_penalty="none"``, Trainer's.
    """

    optim: str | None = field(
        default=None,
        metadata={"help": "Optimizer (Trainer's names). Default: 'sgd' with a penalty, else Trainer's default."},
    )
    optim_args: str | None = field(
        default=None,
        metadata={"help": "Optimizer arguments. Default: 'momentum=0.9' when optim defaults to 'sgd'."},
    )
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Initial learning rate. Default: 0.01 with a penalty (SGD), else Trainer's 5e-5."},
    )
    max_grad_norm: float | None = field(
        default=None,
        metadata={"help": "Gradient clipping norm (0: none). Default: 0 with a penalty, else Trainer's 1.0."},
    )

    def __post_init__(self) -> None:
        self._apply_recipe_defaults()
        super().__post_init__()
        if isinstance(self.sp_head_modules, str):
            self.sp_head_modules = [m.strip() for m in self.sp_head_modules.split(",") if m.strip()]
        for name in list_methods():
            get_method_info(name).cls.validate(self)

    def _apply_recipe_defaults(self) -> None:
        wanted: dict[str, Any] = {}
        for name in list_methods():
            cls = get_method_info(name).cls
            if cls.enabled(self):
                for key, value in cls.training_defaults(self).items():
                    wanted.setdefault(key, value)
        optim_from_recipe = self.optim is None and "optim" in wanted
        for key in RECIPE_DEFAULTED:
            if getattr(self, key) is None:
                if key == "optim_args" and not optim_from_recipe:
                    continue  # the user chose the optimizer: its arguments are theirs too
                setattr(self, key, wanted.get(key, _TRAINER_DEFAULTS[key]))

    def methods(self) -> list[str]:
        """Names of the transfer methods these arguments enable, in the order their phases run."""
        return [n for n in list_methods() if get_method_info(n).cls.enabled(self)]

    def __getstate__(self) -> dict:
        # Trainer pickles the arguments into training_args.bin, in every checkpoint, and pushes them to the Hub:
        # the token must not travel with them.
        state = self.__dict__.copy()
        state["hub_token"] = None
        return state


#: Alias following the ``*TrainingArguments`` naming of transformers.
SPTrainingArguments = SPConfig
