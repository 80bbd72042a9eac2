"""Group-Lasso-SP: one L2 group per output channel (Li et al., ICML 2018, arXiv:1802.01483)."""

from __future__ import annotations

import math

import torch

from ._registry import Penalty, register_penalty, sum_of_squares

#: Added inside the square root, as the authors' code does, so that the gradient is defined at w0.
EPS = 1e-12


@register_penalty(
    "group_lasso_sp",
    formula="alpha * sum_g sqrt(p_g) * ||w_g - w0_g||_2 + beta/2 * ||w_Sbar||^2",
    description="Group lasso toward w0, one group per output channel (conv) or output row (linear).",
    elementwise=False,
)
class GroupLassoSP(Penalty):
    r"""``Omega(w) = sum_g sqrt(p_g) * sqrt(||w_g - w0_g||^2 + eps)``.

    A group ``g`` is everything that produces one output: the ``c_in * kh * kw`` weights of one
    output channel of a convolution, one output row of a linear layer (a slice along dim 0; a
    1-D tensor has groups of one entry). ``p_g`` is the group's size and ``eps = 1e-12``.
    Gradient: ``sqrt(p_g) * (w_g - w0_g) / sqrt(||w_g - w0_g||^2 + eps)``.

    Li, Grandvalet and Davoine, "Explicit Inductive Bias for Transfer Learning with
    Convolutional Networks" (ICML 2018), section 3.
    """

    def accumulate(self, w, w0, fisher, out, scale):
        d = torch._foreach_sub(w, w0)
        dist_sq = sum_of_squares(d)
        values = []
        for di, oi in zip(d, out, strict=True):
            # flatten(1), not reshape(rows, -1): a shard of no rows (FSDP2) keeps its group size
            rows = di.flatten(1) if di.dim() > 1 else di.reshape(-1, 1)
            group_size = rows.shape[1]
            norms = rows.square().sum(dim=1).add_(EPS).sqrt_()
            values.append(norms.sum() * math.sqrt(group_size))
            coef = norms.reciprocal_().mul_(math.sqrt(group_size) * scale)
            oi.add_((rows * coef.unsqueeze(1)).view(oi.shape))
        return torch.stack(values).sum(), dist_sq
