"""Projection of each pretrained layer back into a ball around its start after every step: fixed radii
(MARS-PGM; Gouk, Hospedales and Pontil, "Distance-Based Regularisation of Deep Networks for Fine-Tuning",
ICLR 2021) or radii learned during training (FTP; Tian et al., "Fast Trainable Projection for Robust
Fine-Tuning", NeurIPS 2023).

After the optimizer's step ``w~`` of a pretrained tensor ``w`` with start ``w0`` and deviation ``d = w~ - w0``:

``sp_projection="fixed"``, radius ``gamma_l = rho_l * N(w0_l)`` (``rho_l``: ``sp_projection_radius``, or the
first pattern of ``sp_projection_radii`` that matches the tensor's name):

- ``sp_projection_norm="l2"``: ``w = w0 + d * min(1, gamma / ||d||_2)`` (the Frobenius ball; ``N = ||.||_2``);
- ``sp_projection_norm="mars"``: each output row ``r`` (dimension 0) scaled on its own,
  ``w_r = w0_r + d_r * min(1, gamma / ||d_r||_1)``, which bounds the maximum absolute row sum (MARS norm)
  ``max_r ||d_r||_1 <= gamma`` (``N`` = the MARS norm of ``w0``).

``sp_projection="ftp"``: the MARS rows with one radius ``gamma`` per tensor, learned from the alignment of the
gradient with the previous projection, as the authors' ``util/FTP.py`` (GT-RIPL/FTP):

    n_r = ||d_r||_1 + 1e-8,           u = d / n  (row by row: the previous step's u is kept),
    step 1:   gamma = 1e-8,           m = v = 0,
    step t:   q = <g_t, u_{t-1}> (* k if q > 0),
              m = b1 m + (1 - b1) q,  v = b2 v + (1 - b2) q^2,
              gamma = clip(gamma - mu * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + 1e-8), 1e-8, max_r n_r),
    w_r = w0_r + clip(gamma / n_r, 0, 1) * d_r,

with ``k`` = ``sp_ftp_k`` (annealing of the gradients that would shrink ``gamma``; 1 = none, the strongest),
``mu`` = ``sp_ftp_lr``, ``b1, b2 = 0.9, 0.999``, ``g_t`` the gradient of this step and ``t`` the number of steps
this tensor has taken. ``gamma`` starts at ``1e-8``: the first step is projected back onto ``w0`` almost
entirely, and the radii grow from there as the loss asks. Its state (``gamma``, ``m``, ``v``, ``u``) lives in
the optimizer state and travels with every checkpoint; ``u`` is one more copy of each pretrained tensor.

Only the pretrained (anchored) tensors are projected (``sp_include`` chooses them); the new head is free, as the
FTP authors recommend. ``w0`` is the start kept in the optimizer state (:mod:`hf_sp.methods._starts`).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ._base import MethodContext, TransferMethod, check_nonnegative, register_method
from ._starts import HF_SP_STATE_KEYS, StartTracker, anchored_parameters, step_skipped, stepped, unscale_if_scaled

__all__ = ["Projection", "ProjectionArguments"]

PROJECTIONS = ("fixed", "ftp")
NORMS = ("l2", "mars")
RADIUS_KEY = "sp_radius"
GAMMA_KEY, M_KEY, V_KEY, DIRECTION_KEY, STEP_KEY = "sp_ftp_gamma", "sp_ftp_m", "sp_ftp_v", "sp_ftp_u", "sp_ftp_step"
HF_SP_STATE_KEYS.update({RADIUS_KEY, GAMMA_KEY, M_KEY, V_KEY, DIRECTION_KEY})
FTP_BETAS = (0.9, 0.999)
FTP_EPS = 1e-8


@dataclass
class ProjectionArguments:
    """The ``sp_*`` fields of the projection to a radius around the start (mixed into :class:`~hf_sp.SPConfig`)."""

    sp_projection: str | None = field(
        default=None,
        metadata={
            "help": "After each step, project each pretrained tensor back into a ball around w0: 'fixed' (radii "
            "sp_projection_radius / sp_projection_radii; MARS-PGM) or 'ftp' (radii learned from the gradients; FTP). "
            "Default: off."
        },
    )
    sp_projection_norm: str | None = field(
        default=None,
        metadata={
            "help": "Ball: 'l2' (Frobenius, per tensor; the default of 'fixed') or 'mars' (L1 per output row; the "
            "only one of 'ftp')."
        },
    )
    sp_projection_radius: float | None = field(
        default=None,
        metadata={"help": "Radius of every pretrained tensor, relative to the norm of its w0 (e.g. 0.05)."},
    )
    sp_projection_radii: list[str] | None = field(
        default=None,
        metadata={
            "help": "Per-layer relative radii as 'pattern=radius' (fnmatch on tensor names, first match wins), e.g. "
            "'*.conv_stem.*=0.01'; tensors no pattern matches take sp_projection_radius (none: not projected)."
        },
    )
    sp_ftp_k: float = field(
        default=1.0,
        metadata={"help": "FTP: factor on the gradients that would shrink a radius (0 < k <= 1; 1 = the strongest)."},
    )
    sp_ftp_lr: float = field(default=1e-2, metadata={"help": "FTP: learning rate mu of the radii's Adam update."})


def parse_radii(value: Any) -> list[tuple[str, float]]:
    """``['pattern=radius', ...]`` (or a ``{pattern: radius}`` dict) as ``[(pattern, radius)]``."""
    items = value.items() if isinstance(value, dict) else [str(v).rsplit("=", 1) for v in value]
    radii = []
    for item in items:
        if len(item) != 2:
            raise ValueError(f"sp_projection_radii: {item!r} is not 'pattern=radius' (e.g. '*.conv_stem.*=0.01').")
        pattern, radius = item
        try:
            radius = float(radius)
        except ValueError:
            raise ValueError(f"sp_projection_radii: radius of {pattern!r} is not a number: {radius!r}.") from None
        if not math.isfinite(radius) or radius < 0:
            raise ValueError(f"sp_projection_radii: radius of {pattern!r} must be finite and >= 0, got {radius}.")
        radii.append((str(pattern).strip(), radius))
    return radii


def row_l1(d: torch.Tensor) -> torch.Tensor:
    """``||d_r||_1`` of each output row (dimension 0), shaped to broadcast against ``d``; a vector is one row (as the
    authors' ``_mars_norm``, whose sum over no dimension sums over all)."""
    return d.abs().sum(dim=tuple(range(1, d.dim())), keepdim=True) if d.dim() > 1 else d.abs().sum(0, keepdim=True)


@register_method(
    "projection",
    order=44,
    description="Projection of each pretrained layer into a ball around w0 after each step: fixed radii or FTP.",
)
class Projection(TransferMethod):
    """``sp_projection``: after each step, ``w <- w0 + s * (w - w0)`` with the scale ``s <= 1`` of the ball."""

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.tracker: StartTracker | None = None
        self.params: list[tuple[str, torch.Tensor]] = []
        self.relative: dict[str, float] = {}
        self._hooked: set[int] = set()
        self._skipped = False
        #: Over the logging window: projected rows (or tensors), rows seen; FTP: sum of mean radii, steps.
        self._window = [0, 0, 0.0, 0]

    @classmethod
    def enabled(cls, args: Any) -> bool:
        return args.sp_projection is not None

    @classmethod
    def validate(cls, args: Any) -> None:
        if args.sp_projection is None:
            return
        if args.sp_projection not in PROJECTIONS:
            raise ValueError(f"sp_projection={args.sp_projection!r} is not one of {PROJECTIONS}.")
        if args.sp_projection_norm is None:
            args.sp_projection_norm = "mars" if args.sp_projection == "ftp" else "l2"
        if args.sp_projection_norm not in NORMS:
            raise ValueError(f"sp_projection_norm={args.sp_projection_norm!r} is not one of {NORMS}.")
        radius = args.sp_projection_radius
        check_nonnegative("sp_projection_radius", radius, "relative to the norm of w0, e.g. 0.05")
        if args.sp_projection_radii is not None:
            parse_radii(args.sp_projection_radii)
        if args.sp_projection == "fixed" and radius is None and not args.sp_projection_radii:
            raise ValueError(
                "sp_projection='fixed' needs radii: set sp_projection_radius (relative to each tensor's norm, e.g. "
                "0.05) or sp_projection_radii ('pattern=radius' items)."
            )
        if args.sp_projection == "ftp":
            if radius is not None or args.sp_projection_radii:
                raise ValueError(
                    "sp_projection='ftp' learns its radii: remove sp_projection_radius / sp_projection_radii, or use "
                    "sp_projection='fixed'."
                )
            if args.sp_projection_norm != "mars":
                raise ValueError("sp_projection='ftp' projects the rows in the MARS norm: set sp_projection_norm='mars'.")
            if not 0 < args.sp_ftp_k <= 1:
                raise ValueError(f"sp_ftp_k must be in (0, 1], got {args.sp_ftp_k!r}.")
            if not args.sp_ftp_lr > 0:
                raise ValueError(f"sp_ftp_lr must be > 0, got {args.sp_ftp_lr!r}.")

    def attach(self, ctx: MethodContext) -> None:
        if ctx.sharded:
            raise ValueError(
                "sp_projection is not supported under FSDP or DeepSpeed yet (its radii are per-tensor norms): train "
                "without a sharded engine, or use sp_penalty for a pull toward w0."
            )
        if not ctx.split.anchored:
            raise ValueError("sp_projection: no pretrained tensor to project (check sp_include / sp_head_modules).")

    def configure_optimizer(self, ctx: MethodContext, optimizer: torch.optim.Optimizer) -> None:
        self.tracker = StartTracker.of(optimizer)  # before our hooks: the starts are there from the first step
        params = list(anchored_parameters(optimizer, ctx.model, ctx.split))
        if self.args.sp_projection == "fixed":
            radii = parse_radii(self.args.sp_projection_radii or [])
            default = self.args.sp_projection_radius
            for name, _ in params:
                rho = next((r for pattern, r in radii if fnmatch.fnmatchcase(name, pattern)), default)
                if rho is not None:
                    self.relative[name] = rho
            params = [(n, p) for n, p in params if n in self.relative]
            if not params:
                raise ValueError(
                    "sp_projection_radii matches no pretrained tensor and sp_projection_radius is unset: nothing would "
                    "be projected. Check the patterns against the model's parameter names."
                )
        self.params = params
        if id(optimizer) not in self._hooked:
            optimizer.register_step_pre_hook(self._pre_step)
            optimizer.register_step_post_hook(self._post_step)
            self._hooked.add(id(optimizer))

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._skipped = step_skipped(optimizer)
        if not self._skipped and self.args.sp_projection == "ftp":
            unscale_if_scaled(optimizer)  # the radii's gradient reads the true gradient

    @torch.no_grad()
    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._skipped:
            return
        ftp = self.args.sp_projection == "ftp"
        for name, p in self.params:
            if p.grad is None:  # not moved by this step
                continue
            w0 = self.tracker.start(p)
            d = p.to(w0.dtype) - w0
            scale = self._ftp(optimizer.state[p], p.grad.to(w0.dtype), d) if ftp else self._fixed(optimizer.state[p], name, w0, d)
            projected = scale < 1
            # counted on the device (read at log time); a row within its ball keeps its weights bit for bit
            self._window[0] = self._window[0] + projected.sum()
            self._window[1] += projected.numel()
            p.copy_(torch.where(projected, (w0 + scale * d).to(p.dtype), p))

    def _fixed(self, state: dict, name: str, w0: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        mars = self.args.sp_projection_norm == "mars"
        if RADIUS_KEY not in state:
            size = row_l1(w0).max() if mars else w0.norm()
            state[RADIUS_KEY] = self.relative[name] * size
        gamma = state[RADIUS_KEY]
        norms = row_l1(d) if mars else d.norm().reshape([1] * d.dim())
        return torch.where(norms > gamma, gamma / norms.clamp_min(torch.finfo(d.dtype).tiny), torch.ones_like(norms))

    def _ftp(self, state: dict, grad: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        norms = row_l1(d) + FTP_EPS
        if GAMMA_KEY not in state:
            state[GAMMA_KEY] = torch.tensor(FTP_EPS, dtype=d.dtype, device=d.device)
            state[M_KEY] = torch.zeros((), dtype=d.dtype, device=d.device)
            state[V_KEY] = torch.zeros((), dtype=d.dtype, device=d.device)
            state[STEP_KEY] = 1
        else:
            b1, b2 = FTP_BETAS
            t = state[STEP_KEY] = state[STEP_KEY] + 1
            q = (grad * state[DIRECTION_KEY]).sum()
            q = torch.where(q > 0, q * self.args.sp_ftp_k, q)
            state[M_KEY] = b1 * state[M_KEY] + (1 - b1) * q
            state[V_KEY] = b2 * state[V_KEY] + (1 - b2) * q * q
            m_hat, v_hat = state[M_KEY] / (1 - b1**t), state[V_KEY] / (1 - b2**t)
            gamma = state[GAMMA_KEY] - self.args.sp_ftp_lr * m_hat / (v_hat.sqrt() + FTP_EPS)
            state[GAMMA_KEY] = gamma.clamp(FTP_EPS, norms.max())
        state[DIRECTION_KEY] = d / norms
        self._window[2] = self._window[2] + state[GAMMA_KEY]
        self._window[3] += 1
        return (state[GAMMA_KEY] / norms).clamp(0.0, 1.0)

    def on_resume(self, ctx: MethodContext, optimizer: torch.optim.Optimizer, checkpoint: str) -> None:
        StartTracker.of(optimizer).check_recorded(checkpoint, "sp_projection")
        if self.args.sp_projection == "ftp":
            trained = [(n, p) for n, p in anchored_parameters(optimizer, ctx.model, ctx.split)
                       if stepped(optimizer.state.get(p, {}))]
            missing = [n for n, p in trained if GAMMA_KEY not in optimizer.state[p]]
            if missing:
                raise ValueError(
                    f"resume_from_checkpoint={checkpoint!r} has no FTP radius for {missing[0]!r}: it was not written "
                    "with sp_projection='ftp'. Resume with the settings the run started with."
                )

    def metrics(self) -> dict[str, float]:
        projected, rows, gammas, steps = self._window
        self._window = [0, 0, 0.0, 0]
        logs = {"sp_projected": float(projected) / rows} if rows else {}
        if steps:
            logs["sp_ftp_gamma"] = float(gammas) / steps
        return logs

    def card(self) -> list[tuple[str, str]]:
        a = self.args
        if a.sp_projection == "ftp":
            return [("projection (`sp_projection`)", "`ftp`"), ("FTP k, mu (`sp_ftp_k`, `sp_ftp_lr`)", f"{a.sp_ftp_k:g}, {a.sp_ftp_lr:g}")]
        rows = [("projection (`sp_projection`)", "`fixed`"), ("ball (`sp_projection_norm`)", f"`{a.sp_projection_norm}`")]
        if a.sp_projection_radius is not None:
            rows.append(("relative radius (`sp_projection_radius`)", f"{a.sp_projection_radius:g}"))
        if a.sp_projection_radii:
            rows.append(("per-layer radii (`sp_projection_radii`)", ", ".join(f"`{p}`={r:g}" for p, r in parse_radii(a.sp_projection_radii))))
        return rows

    def card_text(self) -> str:
        if self.args.sp_projection == "ftp":
            return ("After each step, each pretrained tensor was projected back into a ball around its start whose "
                    "radius was learned from the gradients (FTP, Tian et al., NeurIPS 2023).")
        return ("After each step, each pretrained tensor was projected back into a ball of fixed radius around its start "
                f"({self.args.sp_projection_norm} ball; MARS-PGM, Gouk et al., ICLR 2021).")
