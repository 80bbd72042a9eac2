"""Which tensors are anchored to their starting point, which are new, which are left free.

The paper (Li et al., ICML 2018) splits the parameters into ``w_S``, those that exist in the
source network and are pulled toward ``w0_S`` with strength ``alpha``, and ``w_Sbar``, the new
classifier head, which has no starting point and gets plain L2 with strength ``beta``. By default,
as in the authors' code, only conv and linear kernels are penalized; norms and biases train free.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

logger = logging.getLogger(__name__)

#: Name segments that wrappers (FSDP1, activation checkpointing, torch.compile) insert in parameter names;
#: DDP and DataParallel prepend ``module.``.
_WRAPPER_SEGMENTS = re.compile(r"(?:^|(?<=\.))(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")

KERNEL_MODULES = (nn.modules.conv._ConvNd, nn.Linear)

INCLUDE_CHOICES = ("kernels", "all")

#: The roles of a trainable tensor: pulled toward w0, new (decayed toward zero), or unpenalized.
ROLES = ("anchored", "new", "free")


def canonical_name(name: str) -> str:
    """Parameter name without the prefixes that wrappers add (``module.``, ``_fsdp_wrapped_module.``...)."""
    return _WRAPPER_SEGMENTS.sub("", name).removeprefix("module.")


def _timm_heads(model: nn.Module) -> list[str]:
    """Classifier module names of the timm models inside ``model`` (from their ``pretrained_cfg``)."""
    heads = []
    for prefix, module in model.named_modules():
        cfg = getattr(module, "pretrained_cfg", None)
        if not isinstance(cfg, dict) or not cfg.get("classifier") or not type(module).__module__.startswith("timm."):
            continue
        if getattr(module, "num_classes", 1) == 0:
            continue
        names = cfg["classifier"]
        for name in [names] if isinstance(names, str) else names:
            full = f"{prefix}.{name}" if prefix else name
            try:
                head = model.get_submodule(full)
            except AttributeError:
                continue
            if any(True for _ in head.parameters()):
                heads.append(full)
    return heads


def _transformers_heads(model: nn.Module) -> list[str]:
    """The linear layers that produce the logits of a transformers classifier, found by structure.

    They map to ``config.num_labels`` outputs and sit outside the base model, which holds the
    pretrained body. Structure, not loading reports, so that a head is found even when the target
    has as many classes as the source and nothing was reported as mismatched.
    """
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    if not num_labels:
        return []
    body_prefix = getattr(model, "base_model_prefix", "")
    heads = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module.out_features == num_labels
        and not (body_prefix and (name == body_prefix or name.startswith(body_prefix + ".")))
    ]
    if not heads:
        return []
    # Without a base model to exclude, the logits come from the last such layer.
    return heads if body_prefix else heads[-1:]


def find_head_modules(model: nn.Module) -> list[str]:
    """Names of the new (re-initialised) classifier modules of ``model``.

    timm models (raw or inside ``TimmWrapperForImageClassification``) name their classifier in
    ``pretrained_cfg["classifier"]``; transformers classifiers are searched by structure. Returns
    ``[]`` when nothing is found.
    """
    return _timm_heads(model) or _transformers_heads(model)


@dataclass
class ParamSplit:
    """Trainable parameter names by role: ``anchored`` (``w_S``), ``new`` (``w_Sbar``), ``free``."""

    anchored: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    free: list[str] = field(default_factory=list)
    head_modules: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def role(self, name: str) -> str:
        """``"anchored"``, ``"new"`` or ``"free"`` for a (possibly wrapper-prefixed) parameter name."""
        name = canonical_name(name)
        if name in self._anchored_set:
            return "anchored"
        if name in self._new_set:
            return "new"
        return "free"

    def __post_init__(self) -> None:
        self._anchored_set = set(self.anchored)
        self._new_set = set(self.new)

    def reassign(self, names: Iterable[str], role: str | None) -> None:
        """Move ``names`` to ``role`` (``"anchored"``, ``"new"`` or ``"free"``), or drop them (``None``: not trained)."""
        moved = [canonical_name(n) for n in names]
        drop = set(moved)
        for current in ROLES:
            setattr(self, current, [n for n in getattr(self, current) if n not in drop])
        if role is not None:
            if role not in ROLES:
                raise ValueError(f"role={role!r} is not one of {ROLES}.")
            getattr(self, role).extend(moved)
        self.__post_init__()

    def summary(self) -> str:
        """One line per role: how many tensors and parameters, for the start-of-training log."""

        def count(names: Sequence[str]) -> str:
            return f"{len(names)} tensors ({sum(math.prod(self.shapes[n]) for n in names):,} parameters)"

        return (
            f"anchored to w0: {count(self.anchored)}; "
            f"new head {self.head_modules}: {count(self.new)}; "
            f"unpenalized: {count(self.free)}"
        )


def _is_kernel(module: nn.Module, param_name: str) -> bool:
    return param_name == "weight" and isinstance(module, KERNEL_MODULES)


def split_parameters(
    model: nn.Module, *, include: str = "kernels", head_modules: Iterable[str] | None = None
) -> ParamSplit:
    """Split the trainable parameters of ``model`` into anchored, new and free.

    Args:
        model: the unwrapped model.
        include: ``"kernels"`` penalizes conv and linear weights only (the paper's code);
            ``"all"`` penalizes every trainable tensor, norms and biases included.
        head_modules: names of the new modules; ``None`` finds them (:func:`find_head_modules`).

    Raises:
        ValueError: a named head module does not exist, or no head can be found.
    """
    if include not in INCLUDE_CHOICES:
        raise ValueError(f"sp_include={include!r} is not one of {INCLUDE_CHOICES}.")
    if head_modules is None:
        heads = find_head_modules(model)
        if not heads:
            raise ValueError(
                f"Could not find the new classification head of {type(model).__name__}. Name its module(s) with "
                "sp_head_modules, e.g. sp_head_modules=['classifier'] (see model.named_modules())."
            )
    else:
        heads = [canonical_name(h) for h in head_modules]
        for head in heads:
            try:
                model.get_submodule(head)
            except AttributeError:
                raise ValueError(
                    f"sp_head_modules names {head!r}, which is not a module of {type(model).__name__}. "
                    "Use a name from model.named_modules(), e.g. 'classifier' or 'head.fc'."
                ) from None
    split = ParamSplit(head_modules=heads)
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            full = canonical_name(f"{module_name}.{param_name}" if module_name else param_name)
            split.shapes[full] = tuple(param.shape)
            in_head = any(full == h or full.startswith(h + ".") for h in heads)
            penalized = include == "all" or _is_kernel(module, param_name)
            if not penalized:
                split.free.append(full)
            elif in_head:
                split.new.append(full)
            else:
                split.anchored.append(full)
    split.__post_init__()
    return split
