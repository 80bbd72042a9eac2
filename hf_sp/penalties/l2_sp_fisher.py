"""L2-SP-Fisher: Fisher-weighted distance to the starting point (Li et al., ICML 2018, arXiv:1802.01483)."""

from __future__ import annotations

import torch

from ._registry import Penalty, deviation_blocks, register_penalty, squares


@register_penalty(
    "l2_sp_fisher",
    formula="alpha/2 * sum_j F_jj * (w_j - w0_j)^2 + beta/2 * ||w_Sbar||^2",
    description="L2-SP weighted by the diagonal Fisher information at w0 (as in elastic weight consolidation).",
    needs_fisher=True,
)
class L2SPFisher(Penalty):
    r"""``Omega(w) = 1/2 * sum_j F_jj * (w_j - w0_j)^2``, gradient ``F * (w - w0)``.

    ``F`` is the diagonal Fisher information of the source model at ``w0``,
    ``F_jj = 1/m * sum_i sum_k f_k(x_i; w0) * (d log f_k(x_i; w0) / d w_j)^2``
    (see :func:`hf_sp.estimate_fisher`). Li, Grandvalet and Davoine, "Explicit Inductive Bias
    for Transfer Learning with Convolutional Networks" (ICML 2018), section 3.
    """

    def accumulate(self, w, w0, fisher, out, scale):
        sq, values = [], []
        for d, fb, ob in deviation_blocks(w, w0, fisher, out):  # the block's temporaries are read back from the cache
            sq += squares(d)
            fd = torch._foreach_mul(d, fb)
            values += [torch.vdot(a.reshape(-1), b.reshape(-1)) for a, b in zip(fd, d, strict=True)]
            torch._foreach_add_(ob, fd, alpha=scale)
        return 0.5 * torch.stack(values).sum(), torch.stack(sq).sum()

    def terms(self, w, w0, fisher):
        d = w - w0
        fd = fisher * d
        return fd, 0.5 * fd * d, d * d
