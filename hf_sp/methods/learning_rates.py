"""Learning rates by role: a smaller step for the pretrained body than for the new head, and layer-wise decay.

With base learning rate ``lr`` (Trainer's ``learning_rate``, driven by its scheduler), the new head
trains at ``lr`` and body layer ``i`` of ``L`` (0 = the input side) at

    lr_i = lr * sp_body_lr_scale * sp_layer_decay ** (L - 1 - i)

(BEiT / timm's layer decay, with the head outside the decayed layers). The layers come from timm's
``group_matcher`` where the model has one, else from depth order (the first numbered block of each
parameter name; what comes before the first block is layer 0, what comes after the last is the top).
The rates are real per-group ``lr`` values that Trainer's schedulers scale; timm's ``lr_scale`` is read
only by timm's own schedulers, so it is not used.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..selection import canonical_name, in_modules
from ._base import MethodContext, TransferMethod, register_method

logger = logging.getLogger(__name__)

__all__ = ["LearningRateArguments", "RoleLearningRates", "body_layer_ids"]

#: Optimizer-group key recording the group's learning-rate multiplier (for logs and the model card).
LR_SCALE_KEY = "sp_lr_scale"

_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


@dataclass
class LearningRateArguments:
    """The ``sp_*`` fields of the per-role learning rates (mixed into :class:`~hf_sp.SPConfig`)."""

    sp_body_lr_scale: float = field(
        default=1.0,
        metadata={"help": "Learning rate of the pretrained body relative to learning_rate (the new head's)."},
    )
    sp_layer_decay: float | None = field(
        default=None,
        metadata={
            "help": "Layer-wise decay of the body's learning rate: layer i of L trains at "
            "lr * sp_body_lr_scale * sp_layer_decay**(L-1-i) (e.g. 0.75). Default: no decay."
        },
    )


def _timm_module(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The timm model inside ``model`` with a ``group_matcher``, and its name prefix."""
    for prefix, module in model.named_modules():
        if type(module).__module__.startswith("timm.") and hasattr(module, "group_matcher"):
            return module, f"{prefix}." if prefix else ""
    return None


def body_layer_ids(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Depth index (0 = input side, consecutive) of each parameter name in ``names``.

    timm models: timm's ``group_matcher(coarse=False)`` blocks; other models: the first numbered block
    of the name (``encoder.layer.3``), with what precedes the first block at 0 and the rest at the top.
    """
    timm_found = _timm_module(model)
    raw: dict[str, float] = {}
    if timm_found is not None:
        from timm.models import group_parameters

        module, prefix = timm_found
        layer_map = group_parameters(module, module.group_matcher(coarse=False), reverse=True)
        for name in names:
            inner = name.removeprefix(prefix)
            raw[name] = layer_map.get(inner, math.inf)
    else:
        blocks: dict[str, int] = {}
        seen_block = False
        for name in names:
            match = _BLOCK.match(name)
            if match:
                seen_block = True
                raw[name] = 1 + blocks.setdefault(match.group(1), len(blocks))
            else:
                raw[name] = math.inf if seen_block else 0
    ranks = {value: i for i, value in enumerate(sorted(set(raw.values())))}
    return {name: ranks[raw[name]] for name in names}


@register_method(
    "learning_rates",
    order=30,
    description="Per-role learning rates: the body at sp_body_lr_scale x the head's, with layer-wise decay.",
)
class RoleLearningRates(TransferMethod):
    """``sp_body_lr_scale`` / ``sp_layer_decay``: one optimizer group per (role, layer) with its own ``lr``."""

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.scales: dict[str, float] = {}

    @classmethod
    def enabled(cls, args: Any) -> bool:
        return args.sp_body_lr_scale != 1.0 or args.sp_layer_decay is not None

    @classmethod
    def validate(cls, args: Any) -> None:
        scale = args.sp_body_lr_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
            raise ValueError(f"sp_body_lr_scale must be a finite number >= 0, got {scale!r}.")
        decay = args.sp_layer_decay
        if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1):
            raise ValueError(f"sp_layer_decay must be in (0, 1] (e.g. 0.75), or None for no decay; got {decay!r}.")

    def scales_for(self, model: nn.Module, head_modules: list[str]) -> dict[str, float]:
        """Learning-rate multiplier of every trainable parameter of ``model`` (by canonical name)."""
        names = [canonical_name(n) for n, p in model.named_parameters() if p.requires_grad]
        body = [n for n in names if not in_modules(n, head_modules)]
        layers = body_layer_ids(model, body)
        top = max(layers.values(), default=0)
        decay = self.args.sp_layer_decay or 1.0
        scales = {n: 1.0 for n in names if in_modules(n, head_modules)}
        scales.update({n: self.args.sp_body_lr_scale * decay ** (top - layers[n]) for n in body})
        return scales

    def configure_optimizer(self, ctx: MethodContext, optimizer: torch.optim.Optimizer) -> None:
        self.scales = self.scales_for(ctx.model, ctx.split.head_modules)
        names = {id(p): canonical_name(n) for n, p in ctx.model.named_parameters()}
        groups = []
        for group in optimizer.param_groups:
            by_scale: dict[float, list] = {}
            for p in group["params"]:
                by_scale.setdefault(self.scales.get(names.get(id(p), ""), 1.0), []).append(p)
            # Highest rate first: Trainer logs the first group's learning rate, which is then the head's (lr).
            for scale in sorted(by_scale, reverse=True):
                groups.append({**group, "params": by_scale[scale], "lr": group["lr"] * scale, LR_SCALE_KEY: scale})
        optimizer.param_groups = groups
        logger.info(
            "hf_sp: learning rates by role: head x1, body x%g (input side) to x%g (top), %d distinct rates.",
            min((s for n, s in self.scales.items() if not in_modules(n, ctx.split.head_modules)), default=1.0),
            self.args.sp_body_lr_scale,
            len(set(self.scales.values())),
        )

    def card(self) -> list[tuple[str, str]]:
        decay = self.args.sp_layer_decay
        return [
            ("body learning rate / head's (`sp_body_lr_scale`)", f"{self.args.sp_body_lr_scale:g}"),
            ("layer-wise decay (`sp_layer_decay`)", f"{decay:g}" if decay is not None else "none"),
        ]
