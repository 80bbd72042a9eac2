"""L2-SP: squared Euclidean distance to the starting point (Li et al., ICML 2018, arXiv:1802.01483)."""

from __future__ import annotations

import torch

from ._registry import Penalty, deviation_blocks, register_penalty, squares


@register_penalty(
    "l2_sp",
    formula="alpha/2 * ||w_S - w0_S||^2 + beta/2 * ||w_Sbar||^2",
    description="Pulls the pretrained tensors toward their starting point w0 (the paper's recommended default).",
)
class L2SP(Penalty):
    r"""``Omega(w) = 1/2 * ||w - w0||^2``, gradient ``w - w0``.

    Li, Grandvalet and Davoine, "Explicit Inductive Bias for Transfer Learning with
    Convolutional Networks" (ICML 2018), eq. (2).
    """

    def accumulate(self, w, w0, fisher, out, scale):
        sq = []
        for d, ob in deviation_blocks(w, w0, out):  # w - w0 of a block is read back from the cache
            sq += squares(d)
            torch._foreach_add_(ob, d, alpha=scale)
        dist_sq = torch.stack(sq).sum()
        return 0.5 * dist_sq, dist_sq

    def terms(self, w, w0, fisher):
        d = w - w0
        return d, 0.5 * d * d, d * d
