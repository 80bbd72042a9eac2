"""L2: decay toward zero, the usual fine-tuning baseline of Li et al. (ICML 2018, arXiv:1802.01483)."""

from __future__ import annotations

import torch

from ._registry import Penalty, blocks, register_penalty, squares


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
        sq, dists = [], []
        for block in blocks(w, out) if w0 is None else blocks(w, out, w0):  # w read back from the cache
            wb, ob = block[0], block[1]
            sq += squares(wb)
            if w0 is not None:
                dists += squares(torch._foreach_sub(wb, block[2]))
            torch._foreach_add_(ob, wb, alpha=scale)
        dist_sq = torch.stack(dists).sum() if w0 is not None else None
        return 0.5 * torch.stack(sq).sum(), dist_sq

    def terms(self, w, w0, fisher):
        return w, 0.5 * w * w, ((w - w0) ** 2 if w0 is not None else None)
