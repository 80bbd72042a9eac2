"""Selective projection decay (SPD; Tian, Huang and Kira, "Rethinking Weight Decay for Robust Fine-Tuning of
Foundation Models", NeurIPS 2024), around any optimizer's step.

For each pretrained tensor ``w`` (a "layer" of the paper) with gradient ``g`` at step ``t``, the optimizer first
takes its own step ``w_{t-1} -> w~_t``; then, where the condition holds,

    c_t = -<g_t, w_{t-1} - w0>,
    if c_t < 0:   r_t = clip((||w~_t - w0|| - ||w_{t-1} - w0||) / ||w~_t - w0||, 0, 1),
                  w_t = w~_t - lambda * r_t * (w~_t - w0),
    else:         w_t = w~_t,

a decoupled pull toward the start by the layer's deviation ratio ``r_t`` (the share of its distance to ``w0``
that this step added; 0 when the step brought it closer). Norms are Frobenius norms of the whole tensor.
``lambda`` is ``sp_spd``. The condition and the ratio are those of the authors' ``adamSPD.py``
(GT-RIPL/Selective-Projection-Decay), applied here after any optimizer's update (SGD, AdamW, ...) instead
of inside Adam: ``c_t < 0`` where the descent direction ``-g_t`` points back toward ``w0``, against the way the
layer has moved so far; the ratio then acts only if the optimizer's step (momentum, Adam's scaling) still
took the layer further from ``w0``.

The pull acts on the pretrained (anchored) tensors: ``sp_include`` chooses them ("all" covers norms and biases);
the new head is free (the authors' example passes every trainable tensor, the head anchored at its
initialisation). ``w0`` is the start kept in the optimizer state (see
:mod:`hf_sp.methods._starts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ._base import MethodContext, TransferMethod, check_nonnegative, register_method
from ._starts import StartTracker, anchored_parameters, step_skipped

__all__ = ["SPDArguments", "SelectiveProjectionDecay"]


@dataclass
class SPDArguments:
    """The ``sp_*`` fields of selective projection decay (mixed into :class:`~hf_sp.SPConfig`)."""

    sp_spd: float | None = field(
        default=None,
        metadata={
            "help": "Selective projection decay (Tian et al., NeurIPS 2024): strength lambda of the pull toward w0, "
            "applied after each step to the pretrained tensors whose descent direction points back toward w0, "
            "scaled by their deviation ratio, e.g. 1.0. Default: off."
        },
    )


@register_method(
    "spd",
    order=42,
    description="Selective projection decay: a decoupled pull toward w0, per layer, where the step strays from it.",
)
class SelectiveProjectionDecay(TransferMethod):
    """``sp_spd``: ``w <- w~ - lambda * r * (w~ - w0)`` after the optimizer's step, where ``-<g, w - w0> < 0``."""

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.ctx: MethodContext | None = None
        self.tracker: StartTracker | None = None
        self.params: list[torch.Tensor] = []
        #: Per step: the tensors selected by the condition, with ``||w_{t-1} - w0||``.
        self._selected: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._hooked: set[int] = set()
        #: Sums over the logging window: selected tensors, tensors with a gradient, mean ratio of the selected.
        self._window = [0, 0, 0.0]

    @classmethod
    def enabled(cls, args: Any) -> bool:
        return args.sp_spd is not None

    @classmethod
    def validate(cls, args: Any) -> None:
        check_nonnegative("sp_spd", args.sp_spd, "the strength lambda, e.g. 1.0")

    def attach(self, ctx: MethodContext) -> None:
        if ctx.sharded:
            raise ValueError(
                "sp_spd is not supported under FSDP or DeepSpeed yet (its condition and ratio are per-tensor inner "
                "products and norms): train without a sharded engine, or use sp_penalty for a pull toward w0."
            )
        if not ctx.split.anchored:
            raise ValueError("sp_spd: no pretrained tensor to pull toward w0 (check sp_include / sp_head_modules).")
        self.ctx = ctx

    def configure_optimizer(self, ctx: MethodContext, optimizer: torch.optim.Optimizer) -> None:
        self.tracker = StartTracker.of(optimizer)  # before our hooks: the starts are there from the first step
        self.params = [p for _, p in anchored_parameters(optimizer, ctx.model, ctx.split)]
        if id(optimizer) not in self._hooked:
            optimizer.register_step_pre_hook(self._pre_step)
            optimizer.register_step_post_hook(self._post_step)
            self._hooked.add(id(optimizer))

    @torch.no_grad()
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._selected = []
        if step_skipped(optimizer):
            return
        stepped = [p for p in self.params if p.grad is not None]
        if not stepped:
            return
        conditions, norms = [], []
        for p in stepped:
            w0 = self.tracker.start(p)
            deviation = p.to(w0.dtype) - w0
            # c = -<g, w - w0>: only its sign is used, that of the authors' code (a gradient scale changes nothing)
            conditions.append(-torch.vdot(p.grad.to(w0.dtype).flatten(), deviation.flatten()).double())
            norms.append(deviation.norm())  # in the start's precision (fp32 at least), as the authors' torch.norm
        # one device-to-host transfer per step for the selection; the ratios stay on the device
        selected = (torch.stack(conditions) < 0).tolist()
        self._selected = [(p, n) for p, n, s in zip(stepped, norms, selected, strict=True) if s]
        self._window[0] += len(self._selected)
        self._window[1] += len(stepped)

    @torch.no_grad()
    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        strength = float(self.args.sp_spd)
        for p, previous in self._selected:
            w0 = self.tracker.start(p)
            deviation = p.to(w0.dtype) - w0
            current = deviation.norm()
            ratio = torch.where(current > 0, (current - previous) / current, torch.zeros_like(current)).clamp(0, 1)
            self._window[2] = self._window[2] + ratio
            # at ratio 0 this writes w back unchanged, bit for bit
            p.copy_((p.to(w0.dtype) - (strength * ratio) * deviation).to(p.dtype))
        self._selected = []

    def on_resume(self, ctx: MethodContext, optimizer: torch.optim.Optimizer, checkpoint: str) -> None:
        StartTracker.of(optimizer).check_recorded(checkpoint, "sp_spd")

    def metrics(self) -> dict[str, float]:
        selected, stepped, ratios = self._window
        self._window = [0, 0, 0.0]
        if not stepped:
            return {}
        return {"sp_spd_selected": selected / stepped, "sp_spd_ratio": float(ratios) / selected if selected else 0.0}

    def card(self) -> list[tuple[str, str]]:
        return [("selective projection decay (`sp_spd`)", f"{self.args.sp_spd:g}")]

    def card_text(self) -> str:
        return (
            f"Selective projection decay (Tian et al., NeurIPS 2024) pulled each pretrained tensor toward its start "
            f"after the steps where its descent direction pointed back toward it, w <- w - {self.args.sp_spd:g} r "
            "(w - w0), r its deviation ratio."
        )
