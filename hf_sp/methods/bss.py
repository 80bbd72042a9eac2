"""Batch spectral shrinkage (BSS; Chen, Wang, Fu, Long and Wang, "Catastrophic Forgetting Meets Negative
Transfer: Batch Spectral Shrinkage for Safe Transfer Learning", NeurIPS 2019), as a loss term.

For the micro-batch's feature matrix ``F`` (``b x d``: the inputs of the layer producing the logits, i.e. the
pooled features), with singular values ``sigma_1 >= ... >= sigma_m`` (``m = min(b, d)``),

    L_bss(F) = eta * sum_{i=1..k} sigma_{m+1-i}^2,

the ``k`` smallest squared singular values, which carry the feature directions the small target set can
least support (as thuml/Transfer-Learning-Library's ``BatchSpectralShrinkage``, which the authors' examples
use). ``eta`` is ``sp_bss``, ``k`` is ``sp_bss_k``. Its gradient is ``2 eta sum_i sigma_i u_i v_i^T`` over the
same ``i``. Each process shrinks its own micro-batch (under DDP the term is per-process, like the batch it
sees); under gradient accumulation each micro-batch's term is divided by the number of accumulation steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ._base import MethodContext, TransferMethod, check_nonnegative, register_method
from .probe_head import head_linear

__all__ = ["BSSArguments", "BatchSpectralShrinkage", "batch_spectral_shrinkage"]


@dataclass
class BSSArguments:
    """The ``sp_*`` fields of batch spectral shrinkage (mixed into :class:`~hf_sp.SPConfig`)."""

    sp_bss: float | None = field(
        default=None,
        metadata={
            "help": "Batch spectral shrinkage (Chen et al., NeurIPS 2019): strength eta of the loss term eta * (sum "
            "of the k smallest squared singular values of the batch's pooled features), e.g. 1e-3. Default: off."
        },
    )
    sp_bss_k: int = field(default=1, metadata={"help": "BSS: how many of the smallest singular values to shrink."})


def batch_spectral_shrinkage(features: torch.Tensor, k: int) -> torch.Tensor:
    """``sum of the k smallest squared singular values`` of ``features`` (``b x d``; more dims are flattened)."""
    matrix = features.reshape(features.shape[0], -1)
    if matrix.dtype in (torch.float16, torch.bfloat16):  # no half-precision SVD kernels; and sigma^2 needs the range
        matrix = matrix.float()
    return torch.linalg.svdvals(matrix)[-k:].square().sum()


@register_method(
    "bss",
    order=52,
    description="Batch spectral shrinkage: shrink the k smallest singular values of the batch's pooled features.",
)
class BatchSpectralShrinkage(TransferMethod):
    """``sp_bss``: adds ``eta * sum of the k smallest sigma_i^2`` of the head's input features to each micro-batch."""

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self._features: torch.Tensor | None = None
        self._handle: RemovableHandle | None = None
        self._window = [0.0, 0]

    @classmethod
    def enabled(cls, args: Any) -> bool:
        return args.sp_bss is not None

    @classmethod
    def validate(cls, args: Any) -> None:
        eta, k = args.sp_bss, args.sp_bss_k
        if eta is None:
            return
        check_nonnegative("sp_bss", eta, "the strength eta, e.g. 1e-3")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"sp_bss_k must be an integer >= 1, got {k!r}.")
        if k > args.per_device_train_batch_size:
            raise ValueError(
                f"sp_bss_k={k} is more than the {args.per_device_train_batch_size} singular values of a batch "
                "(per_device_train_batch_size): lower sp_bss_k or raise the batch size."
            )

    def attach(self, ctx: MethodContext) -> None:
        config = getattr(ctx.model, "config", None)
        _, linear = head_linear(ctx.model, ctx.split.head_modules, getattr(config, "num_labels", None))

        def record(module, inputs):
            if module.training and torch.is_grad_enabled():
                self._features = inputs[0]

        self._handle = linear.register_forward_pre_hook(record)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def loss_term(self, ctx: MethodContext, inputs: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        features, self._features = self._features, None
        if features is None:
            return None
        # a last, smaller batch has fewer singular values: all of them are then the smallest
        k = min(self.args.sp_bss_k, features.shape[0], features[0].numel())
        value = batch_spectral_shrinkage(features, k)
        self._window[0] += float(value.detach())
        self._window[1] += 1
        return self.args.sp_bss * value

    def metrics(self) -> dict[str, float]:
        total, count = self._window
        self._window = [0.0, 0]
        return {"sp_bss_value": total / count} if count else {}

    def card(self) -> list[tuple[str, str]]:
        return [("batch spectral shrinkage (`sp_bss`, `sp_bss_k`)", f"{self.args.sp_bss:g}, {self.args.sp_bss_k}")]

    def card_text(self) -> str:
        return (
            f"Batch spectral shrinkage (Chen et al., NeurIPS 2019) added {self.args.sp_bss:g} times the sum of the "
            f"{self.args.sp_bss_k} smallest squared singular values of each batch's pooled features to the loss."
        )
