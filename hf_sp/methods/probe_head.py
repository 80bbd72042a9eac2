"""A probe-initialised head (LP-FT; Kumar et al., "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution", ICLR 2022): fit the new head on frozen features, then fine-tune.

Before the first step, the inputs ``x`` of the head's final linear layer are computed for the
training images (``probe_dataset``: the training set without augmentation), with the network in
eval mode. A multinomial logistic regression is fitted on the standardised features
``z = (x - mu) / sigma``::

    min_{W, b}  sum_i -log softmax(W z_i + b)_{y_i}  +  1 / (2C) * ||W||^2

with ``C`` chosen from ``sp_probe_c_grid`` by accuracy on the eval split (or by stratified k-fold on
the training set when there is none). The standardisation is folded into the layer, which then
computes exactly the fitted classifier on raw features::

    weight = W / sigma,    bias = b - (W / sigma) @ mu

The fine-tuning starts from this head; the saved model is a plain classifier.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._base import MethodContext, TransferMethod, register_method

logger = logging.getLogger(__name__)

__all__ = ["LinearProbe", "ProbeHead", "ProbeHeadArguments", "extract_head_inputs", "fit_linear_probe", "head_linear"]

HEAD_INIT_CHOICES = ("random", "probe")


@dataclass
class ProbeHeadArguments:
    """The ``sp_*`` fields of the probe-initialised head (mixed into :class:`~hf_sp.SPConfig`)."""

    sp_head_init: str = field(
        default="random",
        metadata={
            "help": "'random': the new head starts as the model built it. 'probe': before training, fit it as a "
            "logistic regression on the frozen features of the training images (LP-FT)."
        },
    )
    sp_probe_c_grid: list[float] = field(
        default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0],
        metadata={"help": "Inverse L2 strengths C of the probe, chosen on the eval split (or by k-fold on train)."},
    )
    sp_probe_folds: int = field(
        default=5, metadata={"help": "Folds of the cross-validation on train when there is no eval split."}
    )
    sp_probe_max_iter: int = field(default=2000, metadata={"help": "L-BFGS iterations of each probe fit."})


@dataclass
class LinearProbe:
    """A fitted probe: ``logits = weight @ x + bias`` on raw (unstandardised) features."""

    weight: torch.Tensor  # [K, D], float64
    bias: torch.Tensor  # [K], float64
    C: float
    scores: dict[float, float]  # C -> selection accuracy (eval split or k-fold)
    selected_on: str  # "eval split" or "k-fold on train"

    @property
    def score(self) -> float:
        return self.scores[self.C]


def head_linear(model: nn.Module, head_modules: Sequence[str], num_labels: int | None) -> tuple[str, nn.Linear]:
    """The linear layer producing the logits: the last ``nn.Linear`` in the head modules (with ``num_labels``
    outputs when known)."""
    found = []
    for head in head_modules:
        module = model.get_submodule(head)
        found += [
            (f"{head}.{name}" if name else head, m)
            for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and (num_labels is None or m.out_features == num_labels)
        ]
    if not found:
        raise ValueError(
            f"sp_head_init='probe' needs a linear layer with {num_labels} outputs in the head modules {list(head_modules)}"
            " of the model; none was found. Name the head with sp_head_modules."
        )
    return found[-1]


@torch.no_grad()
def extract_head_inputs(
    model: nn.Module, linear: nn.Linear, loader, *, progress: bool = True, desc: str = "Probe features"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of ``linear`` (``[N, D]``, float64, CPU) and labels for every batch of ``loader``, ``model`` in eval mode.

    The train/eval flag of every module is restored afterwards.
    """
    captured: list[torch.Tensor] = []
    handle = linear.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach().flatten(1).double()))
    modes = {m: m.training for m in model.modules()}
    device = next(model.parameters()).device
    labels = []
    model.eval()
    try:
        for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
            model(**inputs)
            labels.append(batch["labels"].reshape(-1))
    finally:
        handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return torch.cat(captured).cpu(), torch.cat(labels).cpu()


def _standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(axis=0)
    sigma = x.std(axis=0)
    sigma[sigma < 1e-12] = 1.0  # a constant feature: leave it unscaled (its weight is then ~0 anyway)
    return mu, sigma


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    c_grid: Sequence[float],
    eval_features: torch.Tensor | None = None,
    eval_labels: torch.Tensor | None = None,
    folds: int = 5,
    max_iter: int = 2000,
) -> LinearProbe:
    """Multinomial logistic regression on standardised ``features``, ``C`` chosen on the eval set or by k-fold.

    Returns the probe with the standardisation folded in (``weight = W / sigma``, ``bias = b - weight @ mu``),
    as ``[num_classes, D]`` / ``[num_classes]`` float64 tensors; classes absent from ``labels`` get weight 0
    and a bias of -1e4, so that they are never predicted.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    x, y = features.double().numpy(), labels.numpy()
    mu, sigma = _standardize(x)
    z = (x - mu) / sigma

    def fit(c: float, zs: np.ndarray, ys: np.ndarray) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=max_iter).fit(zs, ys)

    scores: dict[float, float] = {}
    fitted: dict[float, Any] = {}
    if len(c_grid) == 1:
        selected_on = "the only value"
        scores = {c_grid[0]: math.nan}
    elif eval_features is not None:
        selected_on = "eval split"
        ze, ye = (eval_features.double().numpy() - mu) / sigma, eval_labels.numpy()
        for c in c_grid:
            fitted[c] = fit(c, z, y)
            scores[c] = float((fitted[c].predict(ze) == ye).mean())
    else:
        counts = np.bincount(y)
        k = int(min(folds, counts[counts > 0].min()))
        if k < 2:
            raise ValueError(
                "sp_head_init='probe' without an eval split chooses C by k-fold on train, which needs at least 2 "
                "training images per class. Pass an eval_dataset, or a single value in sp_probe_c_grid."
            )
        selected_on = f"{k}-fold on train"
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=0)
        for c in c_grid:
            hits = sum(int((fit(c, z[tr], y[tr]).predict(z[te]) == y[te]).sum()) for tr, te in splitter.split(z, y))
            scores[c] = hits / len(y)
    # the best score; ties go to the first C of the grid (the strongest regularization when sorted ascending)
    best = max(scores, key=lambda c: (scores[c], -list(scores).index(c))) if len(scores) > 1 else c_grid[0]
    model = fitted.get(best) or fit(best, z, y)
    w = np.zeros((num_classes, x.shape[1]))
    b = np.full(num_classes, -1e4)
    coef, intercept = model.coef_, model.intercept_
    if len(model.classes_) == 2 and coef.shape[0] == 1:  # sklearn's binary form: one row for class 1
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    w[model.classes_] = coef
    b[model.classes_] = intercept
    weight = w / sigma
    bias = b - weight @ mu
    return LinearProbe(
        weight=torch.from_numpy(weight), bias=torch.from_numpy(bias), C=best, scores=scores, selected_on=selected_on
    )


@register_method(
    "probe_head",
    order=10,
    description="LP-FT: the new head is fitted as a logistic regression on frozen features before training.",
)
class ProbeHead(TransferMethod):
    """``sp_head_init="probe"``: write a linear probe on the frozen features into the new head before training."""

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.probe: LinearProbe | None = None
        self._logs: dict[str, float] = {}

    @classmethod
    def enabled(cls, args: Any) -> bool:
        return args.sp_head_init == "probe"

    @classmethod
    def validate(cls, args: Any) -> None:
        if args.sp_head_init not in HEAD_INIT_CHOICES:
            raise ValueError(f"sp_head_init={args.sp_head_init!r} is not one of {HEAD_INIT_CHOICES}.")
        grid = args.sp_probe_c_grid
        if isinstance(grid, (int, float)):
            grid = args.sp_probe_c_grid = [float(grid)]
        if not grid or any(isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0 for c in grid):
            raise ValueError(f"sp_probe_c_grid must be a non-empty list of numbers > 0, got {grid!r}.")
        for name, least in (("sp_probe_folds", 2), ("sp_probe_max_iter", 1)):
            value = getattr(args, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}.")

    def initialize(self, ctx: MethodContext) -> None:
        config = getattr(ctx.model, "config", None)
        num_labels = getattr(config, "num_labels", None)
        name, linear = head_linear(ctx.model, ctx.split.head_modules, num_labels)
        if linear.bias is None:
            raise ValueError(
                f"sp_head_init='probe' folds the probe's standardisation into the bias of {name!r}, which has none. "
                "Give the head a bias, or use sp_head_init='random'."
            )
        dataset = ctx.probe_dataset if ctx.probe_dataset is not None else ctx.train_dataset
        if dataset is None:
            raise ValueError("sp_head_init='probe' needs a train_dataset (or probe_dataset) to fit the head on.")
        batch = self.args.per_device_eval_batch_size
        x, y = extract_head_inputs(ctx.model, linear, ctx.make_loader(dataset, batch), progress=ctx.show_progress)
        xe = ye = None
        if ctx.eval_dataset is not None:
            xe, ye = extract_head_inputs(
                ctx.model, linear, ctx.make_loader(ctx.eval_dataset, batch), progress=ctx.show_progress,
                desc="Probe features (eval)",
            )
        self.probe = fit_linear_probe(
            x, y, num_classes=linear.out_features, c_grid=self.args.sp_probe_c_grid, eval_features=xe,
            eval_labels=ye, folds=self.args.sp_probe_folds, max_iter=self.args.sp_probe_max_iter,
        )
        with torch.no_grad():
            linear.weight.copy_(self.probe.weight.to(linear.weight.dtype))
            linear.bias.copy_(self.probe.bias.to(linear.bias.dtype))
        self._logs = {"sp_probe_C": self.probe.C}
        if not math.isnan(self.probe.score):
            self._logs["sp_probe_accuracy"] = self.probe.score
        logger.info(
            "hf_sp: probe head %s fitted on %d x %d features: C=%g, accuracy %.4f (%s).",
            name, x.shape[0], x.shape[1], self.probe.C, self.probe.score, self.probe.selected_on,
        )

    def metrics(self) -> dict[str, float]:
        logs, self._logs = self._logs, {}
        return logs

    def card(self) -> list[tuple[str, str]]:
        rows = [("head initialisation (`sp_head_init`)", "`probe` (linear probe on frozen features)")]
        if self.probe is not None:
            rows.append(("probe C (chosen on " + self.probe.selected_on + ")", f"{self.probe.C:g}"))
        return rows

    def card_text(self) -> str:
        return (
            "The new head was first fitted as a logistic regression on the frozen features of the training images "
            "(LP-FT, Kumar et al., ICLR 2022), then the whole network was fine-tuned from it."
        )
