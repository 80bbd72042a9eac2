"""The fine-tuning recipes the recipe sweep compares, each with its own small hyperparameter grid.

A recipe is a set of ``SPConfig`` fields (penalty, head initialisation, BatchNorm handling); its grid
lists the settings tried at the first seed, chosen on the validation split (a sweep's ``one_seed`` names
the recipes it runs at the first seed only; the others run every seed at their chosen setting). Every
recipe is reported twice: as trained (``t = 1``) and interpolated toward its start after training
(WiSE-FT, ``t`` chosen on the validation split), from the same run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["RECIPES", "Recipe"]


@dataclass(frozen=True)
class Recipe:
    """One recipe: fixed ``SPConfig`` fields (and ``train_crop_scale``, the data's) and a grid of settings
    chosen on val."""

    name: str
    title: str
    fields: dict[str, Any]
    grid: list[dict[str, Any]] = field(default_factory=list)


def _recipes() -> dict[str, Recipe]:
    paper = {"sp_head_init": "random", "sp_batchnorm": "train"}
    lp_ft = {"sp_head_init": "probe"}
    l2 = {**paper, "sp_penalty": "l2", "sp_alpha": 1e-5}
    items = [
        Recipe("l2", "L2 (fine-tuning, decay toward 0)", l2, [{"learning_rate": 0.01}]),
        Recipe("l2_sp", "L2-SP", {**paper, "sp_penalty": "l2_sp", "sp_alpha": 1e-3}, [{"learning_rate": 0.01}]),
        Recipe("lp_ft_frozen_bn", "LP-FT, BatchNorm frozen", {**lp_ft, "sp_penalty": "none", "sp_batchnorm": "frozen"},
               [{"learning_rate": 1e-3}, {"learning_rate": 3e-3}]),
        Recipe("lp_ft_l2_sp_frozen_bn", "LP-FT + L2-SP, BatchNorm frozen",
               {**lp_ft, "sp_penalty": "l2_sp", "sp_batchnorm": "frozen"},
               [{"learning_rate": 3e-3, "sp_alpha": 0.01}, {"learning_rate": 3e-3, "sp_alpha": 0.1}]),
        Recipe("lp_ft_l2_sp", "LP-FT + L2-SP, BatchNorm in train mode",
               {**lp_ft, "sp_penalty": "l2_sp", "sp_batchnorm": "train"},
               [{"learning_rate": 1e-3, "sp_alpha": 0.1}]),
        Recipe("lp_ft", "LP-FT, BatchNorm in train mode", {**lp_ft, "sp_penalty": "none", "sp_batchnorm": "train"},
               [{"learning_rate": 1e-3}]),
        Recipe("l2_frozen_bn", "L2, BatchNorm frozen", {**l2, "sp_batchnorm": "frozen"}, [{"learning_rate": 3e-3}]),
        Recipe("l2_sp_frozen_bn", "L2-SP, BatchNorm frozen",
               {**paper, "sp_penalty": "l2_sp", "sp_alpha": 1e-3, "sp_batchnorm": "frozen"},
               [{"learning_rate": 3e-3}]),
        Recipe("lp_ft_frozen_bn_layer_decay", "LP-FT, BatchNorm frozen, layer-wise decay",
               {**lp_ft, "sp_penalty": "none", "sp_batchnorm": "frozen", "sp_layer_decay": 0.7},
               [{"learning_rate": 1e-3}]),
        Recipe("lp_ft_frozen_bn_smoothing", "LP-FT, BatchNorm frozen, label smoothing 0.1",
               {**lp_ft, "sp_penalty": "none", "sp_batchnorm": "frozen", "label_smoothing_factor": 0.1},
               [{"learning_rate": 3e-4}]),
        # A softer probe head (a stronger L2 than the one chosen on val: C fixed, 0.01 unless a grid setting gives
        # sp_probe_c_grid) leaves a larger loss, so more gradient reaches the body; t = 0 is then that softer probe.
        Recipe("lp_ft_frozen_bn_soft_head", "LP-FT, BatchNorm frozen, softer probe head (C fixed, 0.01)",
               {**lp_ft, "sp_penalty": "none", "sp_batchnorm": "frozen", "sp_probe_c_grid": [0.01]},
               [{"learning_rate": 3e-4}]),
        Recipe("lp_ft_frozen_bn_mild_crops", "LP-FT, BatchNorm frozen, crops of 35-100 % of the image",
               {**lp_ft, "sp_penalty": "none", "sp_batchnorm": "frozen", "train_crop_scale": (0.35, 1.0)},
               [{"learning_rate": 3e-4}]),
        Recipe("lp_ft_delta_frozen_bn", "LP-FT + DELTA (attention), BatchNorm frozen",
               {**lp_ft, "sp_penalty": "none", "sp_batchnorm": "frozen", "sp_delta_attention": "loss_drop"},
               [{"learning_rate": 3e-4, "sp_delta": 0.1}]),
        # The paper's successors, each on top of the L2 recipe (so that "vs L2" is the method's own gain)
        Recipe("spd", "L2 + SPD (selective projection decay)", {**l2, "sp_spd": 1.0}, [{"learning_rate": 0.01}]),
        Recipe("projection", "L2 + projection to a fixed radius (l2 ball)",
               {**l2, "sp_projection": "fixed", "sp_projection_norm": "l2"},
               [{"learning_rate": 0.01, "sp_projection_radius": 0.01}]),
        Recipe("ftp", "L2 + FTP (learned radii)", {**l2, "sp_projection": "ftp"}, [{"learning_rate": 0.01}]),
        Recipe("delta", "L2 + DELTA (unweighted feature maps)", {**l2, "sp_delta_attention": "none"},
               [{"learning_rate": 0.01, "sp_delta": 0.1}]),
        Recipe("bss", "L2 + BSS (batch spectral shrinkage)", {**l2, "sp_bss_k": 1},
               [{"learning_rate": 0.01, "sp_bss": 1e-3}]),
    ]
    return {r.name: r for r in items}


#: The recipes in report order (baselines first).
RECIPES: dict[str, Recipe] = _recipes()
