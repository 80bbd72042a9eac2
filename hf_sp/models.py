"""Raw timm models as transformers classifiers, so that Trainer gets a loss from ``labels``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, TimmWrapperConfig, TimmWrapperForImageClassification

__all__ = ["is_timm_model", "wrap_timm_model"]


def is_timm_model(model: Any) -> bool:
    """True for a model built by ``timm.create_model`` (not already wrapped by transformers)."""
    return (
        isinstance(model, nn.Module)
        and not isinstance(model, PreTrainedModel)
        and type(model).__module__.startswith("timm.")
        and isinstance(getattr(model, "pretrained_cfg", None), dict)
    )


def wrap_timm_model(
    model: nn.Module,
    *,
    id2label: dict[int, str] | None = None,
    model_args: dict[str, Any] | None = None,
) -> TimmWrapperForImageClassification:
    """Wrap a timm classifier in ``TimmWrapperForImageClassification``, keeping its weights.

    The wrapper computes the cross-entropy loss from ``labels`` for Trainer, and saves in the
    format that both ``AutoModelForImageClassification.from_pretrained`` and
    ``timm.create_model("hf-hub:...")`` load. ``model_args`` are the extra ``timm.create_model``
    keyword arguments (e.g. ``{"img_size": 160}``) needed to rebuild the architecture; a model that
    ``timm.create_model(architecture, **model_args)`` does not rebuild tensor for tensor is refused.

    Example:
        >>> import timm
        >>> model = wrap_timm_model(timm.create_model("resnet18", num_classes=10))
        >>> vit = timm.create_model("vit_small_patch16_224", num_classes=10, img_size=384)
        >>> model = wrap_timm_model(vit, model_args={"img_size": 384})

    Raises:
        ValueError: the model has no classifier, or ``model_args`` do not rebuild it.
    """
    if not is_timm_model(model):
        raise TypeError(f"wrap_timm_model expects a model from timm.create_model, got {type(model).__name__}.")
    num_classes = getattr(model, "num_classes", 0)
    if not num_classes:
        raise ValueError("The timm model has no classifier (num_classes=0): create it with num_classes=N.")
    pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ("num_classes",)}
    architecture = pretrained_cfg.get("architecture") or type(model).__name__.lower()
    _check_rebuilds(model, architecture, num_classes, model_args)
    if id2label is None:
        id2label = {i: f"LABEL_{i}" for i in range(num_classes)}
    config = TimmWrapperConfig(
        architecture=architecture,
        model_args=model_args,
        pretrained_cfg=pretrained_cfg,
        num_labels=num_classes,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    # Build the wrapper without allocating (or initialising) a second copy of the network.
    with torch.device("meta"):
        wrapper = TimmWrapperForImageClassification(config)
    wrapper.timm_model = model
    return wrapper


def _check_rebuilds(model: nn.Module, architecture: str, num_classes: int, model_args: dict[str, Any] | None) -> None:
    """Refuse a model that ``timm.create_model(architecture, **model_args)`` would not rebuild tensor for tensor.

    timm keeps no record of the ``create_model`` keyword arguments (``img_size=384``, ``depth=...``): a model
    saved without them is rebuilt with the default architecture on resume and on ``from_pretrained``, which
    then fails on shapes (or, for arguments that change no shape, silently computes something else).
    """
    import timm

    if not timm.is_model(architecture):
        return  # a custom architecture: nothing to compare with
    try:
        with torch.device("meta"):
            rebuilt = timm.create_model(architecture, pretrained=False, num_classes=num_classes, **(model_args or {}))
    except (TypeError, ValueError, AssertionError) as err:
        raise ValueError(
            f"model_args={model_args!r} do not build timm's {architecture!r}: {type(err).__name__}: {err}"
        ) from err
    expected = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != actual:
        diff = sorted(set(expected.items()) ^ set(actual.items()))
        raise ValueError(
            f"This timm {architecture!r} differs from timm.create_model({architecture!r}, **model_args) with "
            f"model_args={model_args or {}!r} (first difference: {diff[0][0]!r}), so it could not be rebuilt on "
            "resume or from_pretrained. Pass the keyword arguments given to timm.create_model: "
            f"SPTrainer(model=hf_sp.wrap_timm_model(model, model_args={{'img_size': ..., ...}}), ...)."
        )


def timm_layout_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict | None:
    """The state dict of a ``TimmWrapperForImageClassification`` under timm's own key names.

    transformers saves a wrapper built around an existing timm model with ``timm_model.``-prefixed
    keys, which ``timm.create_model("hf-hub:...")`` cannot load; without the prefix both timm and
    transformers (which re-adds it on load) read the file. Other models: ``state_dict`` unchanged.
    """
    if not isinstance(model, TimmWrapperForImageClassification):
        return state_dict
    if model.config.model_args is None:
        model.config.model_args = {}  # timm's hf-hub loader expects a mapping
    state_dict = model.state_dict() if state_dict is None else state_dict
    return {k.removeprefix("timm_model."): v for k, v in state_dict.items()}
