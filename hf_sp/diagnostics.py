"""Diagnostics from the analysis of Li et al. (ICML 2018): how far fine-tuning moved from the start.

Two measures, per layer:

* **Relative distance to the start** ``||w_l - w0_l|| / ||w0_l||`` of each parameter tensor, from two
  state dicts (:func:`relative_distances`) or from the anchors that :class:`hf_sp.SPTrainer` keeps in
  the optimizer state (:func:`anchors_from_optimizer`, :func:`relative_distances_from_optimizer`).
* **R^2 of the features** before vs after fine-tuning (:func:`feature_r2`): forward hooks collect
  the output of chosen layers of the source and of the fine-tuned model on the same images. With
  ``F_before`` and ``F_after`` arranged as ``[rows, channels]`` (rows = images x spatial positions,
  channels last), two definitions are offered:

  - ``"identity"`` (default): how well the source feature map, unchanged, predicts the fine-tuned one,
    ``R^2 = 1 - ||F_after - F_before||^2 / ||F_after - mean(F_after)||^2``, the mean taken per channel
    over the rows. 1 when nothing changed; can be negative when the features moved more than they vary.
  - ``"linear"``: the coefficient of determination of the least-squares fit
    ``F_after ~ [F_before, 1] @ W`` (all source channels predict each fine-tuned channel), pooled over
    channels: ``1 - SSE / SST``. Invariant to any invertible linear re-mixing of the channels; needs
    more rows than channels + 1 (else ``nan``: the fit would be exact whatever the features).

:func:`recalibrate_batchnorm` gives a reference for the R^2: the source weights with BatchNorm statistics
re-estimated on target images, i.e. what the statistics alone change in the features.

The paper reports that L2-SP keeps more of the source network at every depth than L2 (higher R^2).

Example:
    >>> dist = relative_distances(source.state_dict(), finetuned.state_dict())
    >>> r2 = feature_r2(source, finetuned, pixel_values, layers=["blocks.1", "blocks.3"])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .regularizer import ANCHOR_KEY, NAMES_KEY, ROLE_KEY

__all__ = [
    "R2_METHODS",
    "anchors_from_optimizer",
    "default_feature_layers",
    "feature_r2",
    "plot_diagnostics",
    "r2_score",
    "relative_distances",
    "relative_distances_from_optimizer",
    "total_distance",
]

R2_METHODS = ("identity", "linear")


# ------------------------------------------------------------------------------------------------ distances
def _norm(t: torch.Tensor) -> float:
    return float(t.detach().double().norm())


def relative_distances(
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    names: Iterable[str] | None = None,
) -> dict[str, float]:
    """``{name: ||after[name] - before[name]|| / ||before[name]||}`` for each tensor (in ``before``'s order).

    Args:
        before: the starting point, e.g. the source model's ``state_dict()``.
        after: the fine-tuned weights under the same names.
        names: which tensors (default: every floating tensor present in both with the same shape).

    A tensor whose start has norm 0 gets ``inf`` if it moved, else 0.

    Raises:
        ValueError: a requested name is missing from either mapping, or the shapes differ.
    """
    if names is None:
        names = [
            n
            for n, t in before.items()
            if n in after and t.is_floating_point() and tuple(t.shape) == tuple(after[n].shape)
        ]
    result = {}
    for name in names:
        if name not in before or name not in after:
            where = "before" if name not in before else "after"
            raise ValueError(f"Tensor {name!r} is missing from the {where!r} weights; pass names present in both.")
        w0, w = before[name], after[name]
        if tuple(w0.shape) != tuple(w.shape):
            raise ValueError(f"Tensor {name!r} has shape {tuple(w0.shape)} before and {tuple(w.shape)} after.")
        diff = _norm(w.detach().double().cpu() - w0.detach().double().cpu())
        base = _norm(w0)
        result[name] = diff / base if base > 0 else (math.inf if diff > 0 else 0.0)
    return result


def total_distance(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], names: Iterable[str]
) -> tuple[float, float]:
    """``(||w - w0||, ||w - w0|| / ||w0||)`` over all ``names`` together (as ``SPRegularizer.distance``)."""
    diff_sq = base_sq = 0.0
    for name in names:
        w0 = before[name].detach().double().cpu()
        diff_sq += float((after[name].detach().double().cpu() - w0).square().sum())
        base_sq += float(w0.square().sum())
    dist = math.sqrt(diff_sq)
    return dist, dist / math.sqrt(base_sq) if base_sq > 0 else math.inf


def anchors_from_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (parameter, anchor w0)}`` for every anchored tensor of an optimizer prepared by ``SPTrainer``.

    Accepts accelerate's wrapped optimizer (``trainer.optimizer``) too. Empty before the first step.
    """
    optimizer = getattr(optimizer, "optimizer", optimizer)
    pairs = {}
    for group in optimizer.param_groups:
        if group.get(ROLE_KEY) != "anchored":
            continue
        names = group.get(NAMES_KEY) or [None] * len(group["params"])
        for name, p in zip(names, group["params"], strict=True):
            anchor = optimizer.state.get(p, {}).get(ANCHOR_KEY)
            if anchor is not None and name is not None:
                pairs[name] = (p, anchor)
    return pairs


def relative_distances_from_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Per-tensor ``||w - w0|| / ||w0||`` from the anchors in the optimizer state (see :func:`relative_distances`)."""
    pairs = anchors_from_optimizer(optimizer)
    return relative_distances(
        {n: a for n, (_, a) in pairs.items()}, {n: p.detach().to(a.dtype) for n, (p, a) in pairs.items()}
    )


# ------------------------------------------------------------------------------------------------ features
def default_feature_layers(model: nn.Module) -> list[str]:
    """Module names to compare at several depths: the stages of a timm model, and its global pooling.

    For a timm model (raw or inside ``TimmWrapperForImageClassification``) these are the modules of
    ``feature_info`` (one per stride, e.g. ``blocks.0 ... blocks.6`` of an EfficientNet, ``layer1 ... layer4``
    of a ResNet), followed by ``global_pool`` (the pooled features the classifier sees).

    Raises:
        ValueError: no timm model inside ``model``; pass ``layers=[...]`` (names from ``named_modules()``).
    """
    for prefix, module in model.named_modules():
        info = getattr(module, "feature_info", None)
        if info is None or not type(module).__module__.startswith("timm."):
            continue
        entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
        names = [e["module"] for e in entries if e.get("module")]
        if hasattr(module, "global_pool"):
            names.append("global_pool")
        full = [f"{prefix}.{n}" if prefix else n for n in names]
        existing = dict(model.named_modules())
        return [n for n in dict.fromkeys(full) if n in existing]
    raise ValueError(
        f"No timm model inside {type(model).__name__}: name the layers to compare, e.g. layers=['encoder.layer.3'] "
        "(names from model.named_modules())."
    )


def _rows(feature: torch.Tensor) -> torch.Tensor:
    """``[N, C, *spatial]`` (or ``[N, C]``, or ``[N, L, C]`` tokens) as ``[rows, C]`` in float64."""
    f = feature.detach().double().cpu()
    if f.dim() == 2:
        return f
    if f.dim() == 3:  # transformer tokens [N, L, C]
        return f.reshape(-1, f.shape[-1])
    return f.movedim(1, -1).reshape(-1, f.shape[1])


def r2_score(before: torch.Tensor, after: torch.Tensor, method: str = "identity") -> float:
    """R^2 of predicting the ``after`` features from the ``before`` features (see the module docstring).

    Both are ``[N, C, *spatial]`` (or ``[N, C]``) tensors of the same shape.
    """
    if method not in R2_METHODS:
        raise ValueError(f"method={method!r} is not one of {R2_METHODS}.")
    if tuple(before.shape) != tuple(after.shape):
        raise ValueError(f"Feature shapes differ: {tuple(before.shape)} before, {tuple(after.shape)} after.")
    x, y = _rows(before), _rows(after)
    sst = float((y - y.mean(dim=0, keepdim=True)).square().sum())
    if method == "identity":
        sse = float((y - x).square().sum())
    else:
        if x.shape[0] <= x.shape[1] + 1:
            return math.nan
        design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        coef = torch.linalg.lstsq(design, y, driver="gelsd").solution
        sse = float((y - design @ coef).square().sum())
    if sst == 0:
        return 1.0 if sse == 0 else -math.inf
    return 1.0 - sse / sst


def _collect(model: nn.Module, layers: Sequence[str], inputs: torch.Tensor, batch_size: int) -> dict[str, Any]:
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ValueError(f"Layers {missing} are not modules of {type(model).__name__} (see named_modules()).")
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def hook_for(name: str):
        def hook(_module, _inp, out):
            out = out[0] if isinstance(out, (tuple, list)) else out
            outputs[name].append(out.detach().float().cpu())

        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in layers]
    training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            for start in range(0, inputs.shape[0], batch_size):
                model(inputs[start : start + batch_size].to(device))
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in outputs.items()}


def feature_r2(
    before_model: nn.Module,
    after_model: nn.Module,
    pixel_values: torch.Tensor,
    layers: Sequence[str] | None = None,
    *,
    method: str = "identity",
    batch_size: int = 32,
) -> dict[str, float]:
    """``{layer: R^2}`` of the fine-tuned model's features predicted from the source model's, per layer.

    Both models run in eval mode (BatchNorm with running statistics) on the same ``pixel_values``;
    their train/eval flags are restored. ``layers`` default to :func:`default_feature_layers` of
    ``before_model``; they must be module names of both models.
    """
    if method not in R2_METHODS:
        raise ValueError(f"method={method!r} is not one of {R2_METHODS}.")
    layers = list(layers) if layers is not None else default_feature_layers(before_model)
    before = _collect(before_model, layers, pixel_values, batch_size)
    after = _collect(after_model, layers, pixel_values, batch_size)
    return {n: r2_score(before[n], after[n], method) for n in layers}


def recalibrate_batchnorm(model: nn.Module, pixel_values: torch.Tensor, batch_size: int = 32) -> nn.Module:
    """A copy of ``model`` with every BatchNorm's running statistics re-estimated on ``pixel_values``.

    The weights are unchanged; the running mean and variance become the average of the batch statistics
    over all the given images (``momentum=None``), as if fine-tuning had changed the statistics and
    nothing else.
    Comparing its features with the source's (:func:`feature_r2`) separates what the statistics alone
    do to the features from what the weight updates do.

    Raises:
        ValueError: the model has no BatchNorm layer.
    """
    import copy

    model = copy.deepcopy(model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer: there are no statistics to re-estimate.")
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch
        m.train()
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, pixel_values.shape[0], batch_size):
            model(pixel_values[start : start + batch_size].to(device))
    return model.eval()


# ------------------------------------------------------------------------------------------------ plots
def _short(name: str) -> str:
    return name.removeprefix("timm_model.").removesuffix(".weight")


def plot_diagnostics(
    distances: Mapping[str, Mapping[str, float]],
    r2: Mapping[str, Mapping[str, float]],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Two panels: per-layer relative distance to the start, and per-layer feature R^2, one line per run label.

    ``distances`` and ``r2`` map a label (e.g. ``"L2"``, ``"L2-SP"``) to ``{layer: value}``; layers are drawn
    in the order of the first label. Labels of ``r2`` absent from ``distances`` (references without weight
    changes) are drawn dashed, in black. Needs matplotlib (``pip install hf_sp[plots]``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_d, ax_r) = plt.subplots(1, 2, figsize=(13, 4.5))
    for label, values in distances.items():
        ax_d.plot(range(len(values)), list(values.values()), marker=".", label=label)
    if distances:
        first = list(next(iter(distances.values())))
        step = max(1, len(first) // 16)
        ax_d.set_xticks(range(0, len(first), step), [_short(n) for n in first[::step]], rotation=70, fontsize=7)
    ax_d.set_yscale("log")
    ax_d.set_ylabel("||w - w0|| / ||w0||")
    ax_d.set_title("relative distance to the start, per tensor (input -> output)")
    ax_d.legend(fontsize=8)
    for label, values in r2.items():
        # a reference without weight changes (e.g. recalibrate_batchnorm) has no distance: drawn dashed
        style = {} if label in distances or not distances else {"color": "black", "linestyle": "--"}
        ax_r.plot(range(len(values)), list(values.values()), marker="o", label=label, **style)
    if r2:
        first = list(next(iter(r2.values())))
        ax_r.set_xticks(range(len(first)), [_short(n) for n in first], rotation=40, fontsize=8)
    ax_r.set_ylabel("R^2 (fine-tuned features from source features)")
    ax_r.set_title("feature R^2 per layer (1 = unchanged)")
    ax_r.axhline(1.0, color="grey", lw=0.5)
    ax_r.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
