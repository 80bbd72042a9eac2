"""L1-SP: L1 distance to the starting point (Li et al., ICML 2018, arXiv:1802.01483)."""

from __future__ import annotations

import torch

from ._registry import Penalty, deviation_blocks, register_penalty, squares


@register_penalty(
    "l1_sp",
    formula="alpha * ||w_S - w0_S||_1 + beta/2 * ||w_Sbar||^2",
    description="L1 distance to the starting point: sparse changes, non-smooth at w0.",
)
class L1SP(Penalty):
    r"""``Omega(w) = ||w - w0||_1``, (sub)gradient ``sign(w - w0)`` (0 at ``w = w0``).

    Li, Grandvalet and Davoine, "Explicit Inductive Bias for Transfer Learning with
    Convolutional Networks" (ICML 2018), section 3.
    """

    def accumulate(self, w, w0, fisher, out, scale):
        l1, l2 = [], []
        for d, ob in deviation_blocks(w, w0, out):  # w - w0 of a block is read back from the cache
            l1 += torch._foreach_norm(d, ord=1)
            l2 += squares(d)
            torch._foreach_sign_(d)
            torch._foreach_add_(ob, d, alpha=scale)
        return torch.stack(l1).sum(), torch.stack(l2).sum()

    def terms(self, w, w0, fisher):
        d = w - w0
        return torch.sign(d), d.abs(), d * d
