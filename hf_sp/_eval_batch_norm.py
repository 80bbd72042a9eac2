"""BatchNorm with running statistics as its elementwise formula, while the Fisher is estimated.

PyTorch's CPU kernel (seen with 2.14) returns a wrong input and weight gradient for a batch of one sample whose
output gradient is not contiguous, e.g. a BatchNorm followed by ``flatten(2).transpose(1, 2)`` (the convolutional
stems of XCiT and LeViT): the per-sample paths of :func:`hf_sp.estimate_fisher` run such batches. Within
:class:`EvalBatchNorm`, ``F.batch_norm`` without batch statistics is computed as::

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias

(statistics, weight and bias broadcast over the channel dimension 1), whose gradients are made of elementwise
ops; the values are the kernel's up to rounding.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

_PARAMETERS = list(inspect.signature(F.batch_norm).parameters)


def batch_norm_eval(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.batch_norm(input, running_mean, running_var, weight, bias, training=False, eps=eps)`` by its formula."""
    shape = (1, -1) + (1,) * (input.dim() - 2)
    y = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _with_running_statistics(args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """``F.batch_norm``'s arguments by name if the call normalizes with running statistics (``training=False``),
    else ``None``."""
    bound = dict(zip(_PARAMETERS, args, strict=False)) | kwargs
    if bound.get("training", False) or bound.get("running_mean") is None:
        return None
    return bound


class EvalBatchNorm(TorchFunctionMode):
    """Within this mode, ``F.batch_norm`` with running statistics and ``training=False`` is :func:`batch_norm_eval`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bound = _with_running_statistics(args, kwargs) if func is F.batch_norm else None
        if bound is not None:
            return batch_norm_eval(
                bound["input"],
                bound["running_mean"],
                bound["running_var"],
                bound.get("weight"),
                bound.get("bias"),
                bound.get("eps", 1e-5),
            )
        return func(*args, **kwargs)


class _SeesBatchNorm(TorchFunctionMode):
    """Records whether ``F.batch_norm`` is called with running statistics within the mode."""

    seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and _with_running_statistics(args, kwargs) is not None:
            self.seen = True
        return func(*args, **kwargs)


def eval_batch_norm_for(model: nn.Module, forward: Callable[[], Any]) -> contextlib.AbstractContextManager:
    """:class:`EvalBatchNorm` if ``model`` calls ``F.batch_norm`` with running statistics (it has a BatchNorm
    module, or ``forward()``, one forward pass of it, makes such a call: a module of its own may keep its statistics
    under any name), else a no-op: the mode costs a Python call on every op of the forward and backward passes."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return EvalBatchNorm()
    sees = _SeesBatchNorm()
    with torch.no_grad(), sees:
        forward()
    return EvalBatchNorm() if sees.seen else contextlib.nullcontext()
