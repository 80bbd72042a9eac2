"""The extension point of hf_sp: a *transfer method* is one piece of a fine-tuning recipe with phases.

A method may act at any of these phases of a run; :class:`~hf_sp.SPTrainer` calls them in registry
order and overrides no more of ``Trainer`` than they need:

========================  ==========================================================================
``validate(args)``        class method, from ``SPConfig.__post_init__``: check the method's own fields
``attach(ctx)``           every run, fresh or resumed, before the optimizer exists: structural changes
                          (hooks, frozen tensors) that must hold for the whole run and survive resume
``detach()``              before the trainer attaches a new set of methods: remove this one's hooks
``initialize(ctx)``       fresh runs only, before the first step: e.g. fit the new head on frozen features
``configure_optimizer``   once per optimizer: split its parameter groups, set per-group learning rates,
                          hook its step (penalties, projections); anchors live in the optimizer state
``on_resume``             after a checkpoint was loaded: check or restore what the method saved
``on_save``               after a checkpoint was written: save what the optimizer state cannot hold
``loss_term``             each forward of training: a term added to the loss (hooks, features)
``on_train_end``          after the last step: e.g. interpolate toward the start, choose on eval
``metrics()``             at each log: values averaged over the logging window (``sp_*`` keys)
``card()``                the model card's rows: what the method did, with its settings and results
========================  ==========================================================================

Adding a method: one module with a :class:`TransferMethod` subclass (and a dataclass of its
``sp_*`` fields, mixed into :class:`~hf_sp.SPConfig`), one :func:`register_method`, one row of the
method test matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from ..selection import ParamSplit

__all__ = [
    "MethodContext",
    "MethodInfo",
    "TransferMethod",
    "build_methods",
    "check_nonnegative",
    "get_method_info",
    "list_methods",
    "register_method",
]


@dataclass
class MethodContext:
    """What a method may use at its phases: the unwrapped model, its parameter roles and the run's data.

    Attributes:
        args: the run's :class:`~hf_sp.SPConfig`.
        model: the unwrapped model being trained.
        split: the parameter roles (anchored pretrained tensors, new head, free), from the model's structure.
        train_dataset / eval_dataset: Trainer's data sets.
        probe_dataset: the training images without augmentation (defaults to ``train_dataset``).
        make_loader: ``make_loader(dataset, batch_size)``: an unshuffled loader with Trainer's collator (and its
            column removal), the same batches on every process.
        device: where the model lives.
        is_world_process_zero: whether this process writes files and shows progress.
        all_reduce_sum: sums a tensor over processes (identity on one process).
        evaluate: runs the evaluation loop on ``eval_dataset`` quietly and returns its metrics (``eval_*``).
        show_progress: whether progress bars are shown.
        sharded: whether a sharded engine (FSDP, DeepSpeed) holds the parameters.
    """

    args: Any
    model: nn.Module
    split: ParamSplit
    train_dataset: Any = None
    eval_dataset: Any = None
    probe_dataset: Any = None
    make_loader: Callable[[Any, int], Any] | None = None
    device: torch.device | None = None
    is_world_process_zero: bool = True
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
    evaluate: Callable[[], dict[str, float]] | None = None
    show_progress: bool = True
    sharded: bool = False


class TransferMethod:
    """Base class of the methods a recipe combines; every phase is optional (see the module docstring).

    Example:
        >>> @register_method("my_method", order=50)
        ... class MyMethod(TransferMethod):
        ...     @classmethod
        ...     def enabled(cls, args): return args.sp_my_option is not None
        ...     def initialize(self, ctx): ...
    """

    #: Registry name, set by :func:`register_method`.
    name: ClassVar[str] = ""

    def __init__(self, args: Any) -> None:
        self.args = args

    # --------------------------------------------------------------- configuration
    @classmethod
    def enabled(cls, args: Any) -> bool:
        """Whether ``args`` ask for this method."""
        raise NotImplementedError

    @classmethod
    def validate(cls, args: Any) -> None:
        """Raise ``ValueError`` naming the field and the fix when the method's settings are inconsistent."""

    @classmethod
    def training_defaults(cls, args: Any) -> dict[str, Any]:
        """``TrainingArguments`` values this method wants where the user left them unset (see ``SPConfig``)."""
        return {}

    # --------------------------------------------------------------- phases
    def attach(self, ctx: MethodContext) -> None:
        """Every run, before the optimizer is built: changes to the model's structure or trainability."""

    def detach(self) -> None:
        """Remove what :meth:`attach` hooked into the model (the trainer is about to attach a new set of methods)."""

    def initialize(self, ctx: MethodContext) -> None:
        """Fresh runs only, before the first step (not on resume: the checkpoint holds the result)."""

    def configure_optimizer(self, ctx: MethodContext, optimizer: torch.optim.Optimizer) -> None:
        """Once per optimizer, before its first step: parameter groups, learning rates, step hooks."""

    def on_resume(self, ctx: MethodContext, optimizer: torch.optim.Optimizer, checkpoint: str) -> None:
        """After Trainer loaded ``checkpoint`` (model, optimizer): restore or check the method's state."""

    def on_save(self, ctx: MethodContext, checkpoint: str) -> None:
        """After Trainer wrote ``checkpoint``: save what the optimizer state cannot hold."""

    def loss_term(self, ctx: MethodContext, inputs: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        """A term added to the training loss of one micro-batch (mean over its samples), or ``None``."""
        return None

    def on_train_end(self, ctx: MethodContext, optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
        """After the last step; returns values to log once (``sp_*`` keys)."""
        return {}

    def metrics(self) -> dict[str, float]:
        """Logged values averaged since the last call (``sp_*`` keys); ``{}`` if there are none."""
        return {}

    def card(self) -> list[tuple[str, str]]:
        """Rows ``(setting, value)`` for the model card's method table."""
        return []

    def card_text(self) -> str:
        """A sentence or two for the model card on what this method did."""
        return ""


def check_nonnegative(name: str, value: Any, example: str = "") -> None:
    """Raise ``ValueError`` naming the field unless ``value`` is a finite number ``>= 0`` (``None`` passes: unset)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        hint = f" ({example})" if example else ""
        raise ValueError(f"{name} must be a finite number >= 0{hint}, got {value!r}.")


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows about one method."""

    name: str
    description: str
    order: int
    cls: type[TransferMethod]


_METHODS: dict[str, MethodInfo] = {}


def register_method(name: str, *, order: int, description: str) -> Callable[[type[TransferMethod]], type]:
    """Class decorator registering a :class:`TransferMethod` under ``name``.

    ``order`` fixes when its phases run relative to the other methods' (lower first): a head is fitted
    before the optimizer's groups are split, groups are split before a penalty hooks the step.
    """

    def decorator(cls: type[TransferMethod]) -> type[TransferMethod]:
        if name in _METHODS:
            raise ValueError(f"A method named {name!r} is already registered.")
        cls.name = name
        _METHODS[name] = MethodInfo(name=name, description=description, order=order, cls=cls)
        return cls

    return decorator


def list_methods() -> list[str]:
    """Names of the registered methods, in the order their phases run."""
    return [info.name for info in sorted(_METHODS.values(), key=lambda i: i.order)]


def get_method_info(name: str) -> MethodInfo:
    """Registry entry of ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"Unknown method {name!r}. Known methods: {', '.join(list_methods())}.") from None


def build_methods(args: Any) -> list[TransferMethod]:
    """The methods that ``args`` enable, in phase order."""
    return [info.cls(args) for info in (get_method_info(n) for n in list_methods()) if info.cls.enabled(args)]
