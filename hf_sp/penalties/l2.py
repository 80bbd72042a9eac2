"""L2: decay toward zero, the usual fine-tuning baseline of Li et al. (ICML 2018, arXiv:1802.01483)."""

from __future__ import annotations

import torch

from ._registry import Penalty, register_penalty, sum_of_squares


@register_penalty(
    "l2",
    formula="alpha/2 * ||w_S||^2 + beta/2 * ||w_Sbar||^2",
    description="Weight decay toward zero with separate strengths on the pretrained body and the new head.",
    needs_anchor=False,
)
class L2(Penalty):
    r"""``Omega(w) = 1/2 * ||w||^2``, gradient ``w``.

    The baseline of Li, Grandvalet and Davoine, "Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks" (ICML 2018): the pretrained tensors decay toward zero with
    strength ``alpha``. The same formula with strength ``beta`` is the term every penalty puts on
    the new head ``w_Sbar``, which has no starting point.
    """

    def accumulate(self, w, w0, fisher, out, scale):
        value = 0.5 * sum_of_squares(w)
        dist_sq = sum_of_squares(torch._foreach_sub(w, w0)) if w0 is not None else None
        torch._foreach_add_(out, w, alpha=scale)
        return value, dist_sq
