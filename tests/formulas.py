"""The paper's penalties written out term by term (the float64 reference for the tests)."""

from __future__ import annotations

import math

import torch

from hf_sp.penalties import group_lasso_sp


def penalty_formula(
    name: str, w: list[torch.Tensor], w0: list[torch.Tensor], fisher: list[torch.Tensor]
) -> torch.Tensor:
    """Omega(w) written out from the paper's table, one term per tensor, no multi-tensor tricks."""
    total = torch.zeros((), dtype=torch.float64)
    for wi, w0i, fi in zip(w, w0, fisher, strict=True):
        d = wi - w0i
        if name == "l2":
            total = total + 0.5 * (wi**2).sum()
        elif name == "l2_sp":
            total = total + 0.5 * (d**2).sum()
        elif name == "l1_sp":
            total = total + d.abs().sum()
        elif name == "l2_sp_fisher":
            total = total + 0.5 * (fi * d**2).sum()
        elif name == "group_lasso_sp":
            rows = d.reshape(d.shape[0], -1)
            p_g = rows.shape[1]
            total = total + (math.sqrt(p_g) * torch.sqrt((rows**2).sum(dim=1) + group_lasso_sp.EPS)).sum()
        else:
            raise AssertionError(name)
    return total
