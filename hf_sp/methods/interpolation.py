"""Interpolation toward the start after training (WiSE-FT; Wortsman et al., "Robust fine-tuning of
zero-shot models", CVPR 2022): the starting-point idea applied once, after the last step.

The final weights are

    w(t) = w_start + t * (w_ft - w_start),    t in sp_interpolation_grid,

with ``w_start`` the model as training started (the pretrained body and the initial head: with a
probe-initialised head, ``t = 0`` is the linear probe itself) and ``w_ft`` the fine-tuned weights.
``t`` is chosen by the eval split's ``metric_for_best_model`` (``accuracy`` when the metrics have it,
else the loss), ties going to the larger ``t``; the model keeps ``w(t)``, so the saved and pushed
model is the interpolated one.

BatchNorm running statistics are interpolated with the same ``t``: at ``t = 0`` they are the start's,
so that both ends of the path are exactly the two models (re-estimating them at each ``t`` would
make ``t = 0`` the source weights with target statistics, not the start). Under
``sp_batchnorm="frozen"`` they never changed, and stay. Integer buffers (batch counters) keep their
fine-tuned value.

``w_start`` of every trainable tensor is kept in the optimizer state by :class:`~hf_sp.methods._starts.StartTracker`
(``sp_start``, or the penalty's ``sp_anchor`` where it has one), so it travels with every checkpoint (a tensor
the optimizer never stepped is still at its start); the start's floating buffers are written beside each
checkpoint (``sp_start_buffers.safetensors``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..selection import canonical_name
from ._base import MethodContext, TransferMethod, register_method
from ._starts import StartTracker

logger = logging.getLogger(__name__)

__all__ = ["Interpolation", "InterpolationArguments", "interpolate_"]

BUFFERS_FILE = "sp_start_buffers.safetensors"


@dataclass
class InterpolationArguments:
    """The ``sp_*`` fields of the interpolation toward the start (mixed into :class:`~hf_sp.SPConfig`)."""

    sp_interpolation_grid: list[float] | None = field(
        default=None,
        metadata={
            "help": "After training, set the weights to w_start + t (w - w_start) for the t of this grid that scores "
            "best on the eval split (WiSE-FT), e.g. 0 0.25 0.5 0.75 1. Default: no interpolation."
        },
    )


def _floating_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {canonical_name(n): b for n, b in model.named_buffers() if b is not None and b.is_floating_point()}


@torch.no_grad()
def interpolate_(
    targets: Sequence[torch.Tensor], start: Sequence[torch.Tensor], end: Sequence[torch.Tensor], t: float
) -> None:
    """``target = start + t * (end - start)`` in place, computed in the start's precision."""
    for target, a, b in zip(targets, start, end, strict=True):
        target.copy_((a + t * (b.to(a.dtype) - a)).to(target.dtype))


@register_method(
    "interpolation",
    order=60,
    description="WiSE-FT: after training, interpolate between the start and the fine-tuned weights, t on eval.",
)
class Interpolation(TransferMethod):
    """``sp_interpolation_grid``: ``w = w_start + t (w_ft - w_start)`` with ``t`` chosen on the eval split."""

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.start_buffers: dict[str, torch.Tensor] | None = None
        self.curve: dict[float, float] = {}
        self.t: float | None = None
        self.metric = ""

    @classmethod
    def enabled(cls, args: Any) -> bool:
        return args.sp_interpolation_grid is not None

    @classmethod
    def validate(cls, args: Any) -> None:
        grid = args.sp_interpolation_grid
        if grid is None:
            return
        if isinstance(grid, (int, float)):
            grid = args.sp_interpolation_grid = [float(grid)]
        if not grid or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) for t in grid):
            raise ValueError(f"sp_interpolation_grid must be a non-empty list of numbers (e.g. 0 0.5 1), got {grid!r}.")

    def attach(self, ctx: MethodContext) -> None:
        if ctx.eval_dataset is None:
            raise ValueError(
                "sp_interpolation_grid chooses t on the eval split: pass eval_dataset to SPTrainer (or remove "
                "sp_interpolation_grid)."
            )
        if ctx.sharded:
            raise ValueError(
                "sp_interpolation_grid is not supported under FSDP or DeepSpeed yet: interpolate the saved model "
                "with hf_sp.methods.interpolate_ after training, or train without a sharded engine."
            )

    def initialize(self, ctx: MethodContext) -> None:
        self.start_buffers = {n: b.detach().clone() for n, b in _floating_buffers(ctx.model).items()}

    # --------------------------------------------------------------- the start, in the optimizer state
    def configure_optimizer(self, ctx: MethodContext, optimizer: torch.optim.Optimizer) -> None:
        StartTracker.of(optimizer)  # its hooks keep the start of every tensor from the first step on

    # --------------------------------------------------------------- checkpoints
    def on_save(self, ctx: MethodContext, checkpoint: str) -> None:
        if ctx.is_world_process_zero and self.start_buffers:
            save_file({n: b.contiguous().cpu() for n, b in self.start_buffers.items()}, str(Path(checkpoint) / BUFFERS_FILE))

    def on_resume(self, ctx: MethodContext, optimizer: torch.optim.Optimizer, checkpoint: str) -> None:
        path = Path(checkpoint) / BUFFERS_FILE
        if _floating_buffers(ctx.model) and not path.is_file():
            raise ValueError(
                f"resume_from_checkpoint={checkpoint!r} has no {BUFFERS_FILE}: it was not written with "
                "sp_interpolation_grid, so the start of the interpolation is unknown. Resume with the settings the run "
                "started with, or start again from the pretrained model."
            )
        self.start_buffers = load_file(str(path), device=str(ctx.device or "cpu")) if path.is_file() else {}
        StartTracker.of(optimizer).check_recorded(checkpoint, "sp_interpolation_grid")

    # --------------------------------------------------------------- after the last step
    def on_train_end(self, ctx: MethodContext, optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
        if optimizer is None:
            return {}
        params = [p for g in optimizer.param_groups for p in g["params"]]
        starts = [StartTracker.of(optimizer).start(p) for p in params]
        buffers = _floating_buffers(ctx.model)
        buffer_names = [n for n in buffers if n in (self.start_buffers or {})]
        targets = params + [buffers[n] for n in buffer_names]
        start = starts + [self.start_buffers[n].to(buffers[n].device) for n in buffer_names]
        end = [t.detach().clone() for t in targets]
        metric = self.args.metric_for_best_model or "accuracy"
        greater = self.args.greater_is_better if self.args.metric_for_best_model else True
        curve: dict[float, float] = {}
        for t in self.args.sp_interpolation_grid:
            interpolate_(targets, start, end, t)
            metrics = ctx.evaluate()
            key = metric if metric.startswith("eval_") else f"eval_{metric}"
            if key not in metrics:  # no such metric (e.g. no compute_metrics): choose by the loss
                key, greater = "eval_loss", False
            curve[float(t)] = float(metrics[key])
        sign = 1.0 if greater else -1.0
        self.t = max(curve, key=lambda t: (sign * curve[t], t))
        self.curve, self.metric = curve, key
        interpolate_(targets, start, end, self.t)
        logger.info("hf_sp: interpolation toward the start: t=%g (%s: %s).", self.t, key, curve)
        logs = {"sp_interpolation_t": self.t}
        logs.update({f"sp_interpolation_{key}@{t:g}": v for t, v in curve.items()})
        return logs

    def card(self) -> list[tuple[str, str]]:
        rows = [("interpolation grid (`sp_interpolation_grid`)", ", ".join(f"{t:g}" for t in self.args.sp_interpolation_grid))]
        if self.t is not None:
            rows.append((f"chosen t (by {self.metric})", f"{self.t:g}"))
            rows.append((f"{self.metric} along t", ", ".join(f"{t:g}: {v:.4f}" for t, v in self.curve.items())))
        return rows

    def card_text(self) -> str:
        if self.t is None:
            return ""
        return (
            f"After training, the weights were interpolated toward the start, w = w_start + t (w_ft - w_start), with "
            f"t = {self.t:g} chosen on the validation split (WiSE-FT, Wortsman et al., CVPR 2022)."
        )
