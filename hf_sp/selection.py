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


def in_modules(name: str, modules: Iterable[str]) -> bool:
    """Whether parameter ``name`` lies inside one of ``modules`` (module names)."""
    return any(name == m or name.startswith(m + ".") for m in modules)


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
    """The new classifier modules of a transformers classifier, found by structure.

    The logits come from linear layers mapping to ``config.num_labels`` outputs outside the base model
    (``base_model_prefix``), which holds the pretrained body. Structure, not loading reports, so that a head is
    found even when the target has as many classes as the source and nothing was reported as mismatched. Each
    head is the child of the model that holds such a layer, so that a replaced ``nn.Sequential`` MLP head is new
    as a whole, hidden layers included.
    """
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    if not num_labels:
        return []
    body = getattr(model, "base_model_prefix", "")
    # CLIP/SigLIP classifiers name a base model they do not have (their body is `vision_model`): without a base
    # model to exclude, attention and MLP layers of the hidden size would pass for the head.
    has_body = bool(body) and isinstance(getattr(model, body, None), nn.Module)
    logits = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module.out_features == num_labels
        and not (has_body and (name == body or name.startswith(body + ".")))
    ]
    if not has_body:
        logits = logits[-1:]  # the logits come from the last such layer
    total = sum(p.numel() for p in model.parameters())
    heads: list[str] = []
    for name in logits:
        child = name.split(".", 1)[0]
        # A child holding most of the model is a body, not a head: then only the logits layer is new.
        if sum(p.numel() for p in model.get_submodule(child).parameters()) * 2 > total:
            child = name
        if child not in heads:
            heads.append(child)
    return heads


def find_head_modules(model: nn.Module) -> list[str]:
    """Names of the new (re-initialised) classifier modules of ``model``.

    timm models (raw or inside ``TimmWrapperForImageClassification``) name their classifier in
    ``pretrained_cfg["classifier"]``; transformers classifiers are searched by structure. Returns
    ``[]`` when nothing is found.
    """
    return _timm_heads(model) or _transformers_heads(model)


@dataclass
class ParamSplit:
    """Parameter names by role: ``anchored`` (``w_S``), ``new`` (``w_Sbar``), ``free``.

    Every floating tensor has a role, frozen or not (``frozen`` lists those with ``requires_grad=False`` when
    the split was made): a tensor unfrozen later trains with the penalty of its role. A tensor shared under
    several names is listed once, under its first name in ``model.named_parameters()``.
    """

    anchored: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    free: list[str] = field(default_factory=list)
    head_modules: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    frozen: list[str] = field(default_factory=list)
    #: How the head modules were found, for the start-of-training log.
    head_source: str = ""

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
        if role is None:
            self.shapes = {n: s for n, s in self.shapes.items() if n not in drop}
        else:
            if role not in ROLES:
                raise ValueError(f"role={role!r} is not one of {ROLES}.")
            getattr(self, role).extend(moved)
        self.__post_init__()

    def summary(self) -> str:
        """One line per role: how many tensors and parameters, for the start-of-training log."""
        frozen = set(self.frozen)

        def count(names: Sequence[str]) -> str:
            text = f"{len(names)} tensors ({sum(math.prod(self.shapes[n]) for n in names):,} parameters"
            n_frozen = sum(n in frozen for n in names)
            return text + (f", {n_frozen} frozen now)" if n_frozen else ")")

        source = f" ({self.head_source})" if self.head_source else ""
        return (
            f"anchored to w0: {count(self.anchored)}; "
            f"new head {self.head_modules}{source}: {count(self.new)}; "
            f"unpenalized: {count(self.free)}"
        )


def _is_kernel(module: nn.Module, param_name: str) -> bool:
    return param_name == "weight" and isinstance(module, KERNEL_MODULES)


def split_parameters(
    model: nn.Module, *, include: str = "kernels", head_modules: Iterable[str] | None = None
) -> ParamSplit:
    """Split the floating parameters of ``model`` into anchored, new and free.

    Roles follow the model's structure (pretrained body vs new head), never ``requires_grad``: a tensor frozen
    now and unfrozen later is still pretrained. A tensor shared (tied) under several names gets one role, under
    its first name; it is anchored if any of its names lies outside the head (the source has it).

    Args:
        model: the unwrapped model.
        include: ``"kernels"`` penalizes conv and linear weights only (the paper's code);
            ``"all"`` penalizes every floating tensor, norms and biases included.
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
        source = "timm pretrained_cfg['classifier']" if _timm_heads(model) else "found by structure"
    else:
        heads = [canonical_name(h) for h in head_modules]
        source = "sp_head_modules"
        for head in heads:
            try:
                model.get_submodule(head)
            except AttributeError:
                raise ValueError(
                    f"sp_head_modules names {head!r}, which is not a module of {type(model).__name__}. "
                    "Use a name from model.named_modules(), e.g. 'classifier' or 'head.fc'."
                ) from None
    # One entry per tensor (first name, as named_parameters): in the head only if every name of it is.
    seen: dict[int, tuple[str, bool, bool]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            if not param.is_floating_point():
                continue
            full = canonical_name(f"{module_name}.{param_name}" if module_name else param_name)
            in_head = in_modules(full, heads)
            penalized = include == "all" or _is_kernel(module, param_name)
            first, head_so_far, penalized_so_far = seen.get(id(param), (full, True, False))
            seen[id(param)] = (first, head_so_far and in_head, penalized_so_far or penalized)
    split = ParamSplit(head_modules=heads, head_source=source)
    params = {canonical_name(n): p for n, p in model.named_parameters()}
    for full, in_head, penalized in seen.values():
        param = params[full]
        split.shapes[full] = tuple(param.shape)
        if not param.requires_grad:
            split.frozen.append(full)
        if not penalized:
            split.free.append(full)
        elif in_head:
            split.new.append(full)
        else:
            split.anchored.append(full)
    split.__post_init__()
    return split


def new_modules(model: nn.Module, new_parameters: Iterable[str]) -> list[str]:
    """The largest modules of ``model`` all of whose parameters are in ``new_parameters``.

    ``new_parameters`` are the tensors that loading did not find in the source checkpoint (transformers'
    ``missing_keys`` and ``mismatched_keys``): the paper's ``w_Sbar``, known from the source itself.
    """
    new = {canonical_name(n) for n in new_parameters}
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f + ".") for f in found):
            continue
        names = [f"{name}.{n}" for n, _ in module.named_parameters()]
        if names and all(canonical_name(n) in new for n in names):
            found.append(name)
    return found


def check_new_not_anchored(split: ParamSplit, new_parameters: Iterable[str], source: str) -> None:
    """Refuse a split that anchors a tensor the source checkpoint does not hold (its ``w0`` would be random).

    Raises:
        ValueError: naming the tensors and the fix.
    """
    anchored = [n for n in new_parameters if split.role(n) == "anchored"]
    if anchored:
        raise ValueError(
            f"{len(anchored)} tensor(s) were not loaded from {source} but newly initialised, and would be anchored "
            f"to their random initialisation: {', '.join(anchored[:5])}. Name their modules in sp_head_modules "
            "(new tensors get sp_beta toward zero), or load a source checkpoint that holds them."
        )
