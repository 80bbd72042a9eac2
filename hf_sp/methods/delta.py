"""DELTA: the distance of feature maps to the source network's, weighted per channel by attention (Li, Xiong,
Wang, Huan, Chen, Xu and Huan, "DELTA: DEep Learning Transfer using Feature Map with Attention for
Convolutional Networks", ICLR 2019), as a loss term.

For a micro-batch of ``B`` images ``x_i`` and the chosen layers ``j`` (``C_j`` channels, ``S_j`` positions each:
``H x W`` of a ``B x C x H x W`` map, the tokens of a ``B x N x C`` sequence),

    Omega(w) = 1/B sum_i sum_j C_j / (2 S_j) sum_c a_jc ||FM_jc(w, x_i) - FM_jc(w0, x_i)||^2,

``FM(w0, .)`` from a frozen copy of the network at its start (eval mode, no gradient), on the same batch.
``sp_delta`` is the strength; the term added to the loss is ``sp_delta * Omega``.

Attention (``sp_delta_attention="loss_drop"``, the paper's): how much the target loss of the network at its
start grows when channel ``c`` of layer ``j`` is zeroed, on ``sp_delta_attention_batches`` batches of the
training images (eval mode, no augmentation), standardised over the layer's channels and passed through a
softmax at temperature 5,

    dL_jc = mean_batches [L(x, y; FM_jc := 0) - L(x, y)],   z_j = (dL_j - mean(dL_j)) / std(dL_j),
    a_j = softmax(z_j / 5),

as thuml/Transfer-Learning-Library's ``delta.py`` computes it. The target loss needs a head for the target
classes that the source features can be judged by: the probe head (``sp_head_init="probe"``), as that
library fits one on the frozen source features first. It takes ``sum_j C_j`` forward passes per batch, once,
before training. ``sp_delta_attention="none"`` is the unweighted variant, ``a_jc = 1 / C_j``: no attention
pass and no head needed. (The library's unweighted term is ``1/2 sum ||FM - FM0||^2`` summed over the batch, its
weighted one ``1/2 sum_c C a_c ||.||^2 / (H W)``, also summed: ``Omega`` is the weighted one averaged over the
batch, and gives both variants one scale.)

Memory: the frozen source is one more copy of the model's weights and buffers; its feature maps are computed
without a graph. The source copy and the attention are written beside each checkpoint
(``sp_delta_source.safetensors``) so that a resumed run uses the same ones.

Layers (``sp_delta_layers``): by default the feature stages of a timm model (``feature_info``, at most five:
the last of each quarter beyond that), else the last block of each quarter of the model's longest
``ModuleList`` (the encoder layers of a transformers ViT, ...). The library's ResNet-50 example compares the
outputs of chosen ``conv3`` layers (before BatchNorm and the residual sum) and ablates a channel by zeroing its
filter; here a channel of the chosen module's output is zeroed, which is the same for a convolution without
bias and extends to any module. Feature maps are read as ``B x C x ...`` (channels at dimension 1) and token
sequences ``B x N x C``; a model whose 4-D maps are channels-last (Swin-style ``B x H x W x C``) needs layers
whose outputs are not.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from ._base import MethodContext, TransferMethod, check_nonnegative, register_method

logger = logging.getLogger(__name__)

__all__ = ["DeltaArguments", "FeatureMapDistance", "default_feature_layers"]

ATTENTIONS = ("loss_drop", "none")
SOURCE_FILE = "sp_delta_source.safetensors"
ATTENTION_PREFIX = "sp_delta_attention."
TEMPERATURE = 5.0
#: Images per forward pass of the channel ablations (copies of a batch, one ablated channel each).
ABLATION_IMAGES = 256


@dataclass
class DeltaArguments:
    """The ``sp_*`` fields of DELTA (mixed into :class:`~hf_sp.SPConfig`)."""

    sp_delta: float | None = field(
        default=None,
        metadata={
            "help": "DELTA (Li et al., ICLR 2019): strength of the loss term on the distance of the chosen layers' "
            "feature maps to those of the frozen source network, weighted per channel, e.g. 0.01. Default: off."
        },
    )
    sp_delta_layers: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules whose outputs DELTA compares (names as in model.named_modules()). Default: a timm "
            "model's feature stages, else the last block of each quarter of the longest ModuleList."
        },
    )
    sp_delta_attention: str = field(
        default="loss_drop",
        metadata={
            "help": "DELTA channel weights: 'loss_drop' (the paper: the loss increase when a channel is zeroed, "
            "with the probe head; needs sp_head_init='probe') or 'none' (uniform)."
        },
    )
    sp_delta_attention_batches: int = field(
        default=2, metadata={"help": "DELTA: training batches the channel attention is averaged over."}
    )


def _pick(names: list[str], parts: int = 4) -> list[str]:
    """The last of each of ``parts`` equal shares of ``names`` (all of them when there are few)."""
    if len(names) <= parts + 1:
        return names
    return list(dict.fromkeys(names[math.ceil(len(names) * (q + 1) / parts) - 1] for q in range(parts)))


def default_feature_layers(model: nn.Module, exclude: list[str] | None = None) -> list[str]:
    """The modules DELTA compares by default (see the module docstring); ``exclude``: head modules to leave out."""
    exclude = exclude or []
    for prefix, module in model.named_modules():
        info = getattr(module, "feature_info", None)  # timm: a list of {"module": ..., "num_chs": ...}
        if isinstance(info, list) and info and all(isinstance(f, dict) and f.get("module") for f in info):
            return _pick([f"{prefix}.{f['module']}" if prefix else f["module"] for f in info])
    lists = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) and not any(name == h or name.startswith(h + ".") for h in exclude)
    ]
    if not lists:
        raise ValueError(
            f"sp_delta: {type(model).__name__} has no timm feature stages and no ModuleList of blocks: name the "
            "layers to compare with sp_delta_layers (see model.named_modules())."
        )
    name, blocks = max(lists, key=lambda item: len(item[1]))
    return _pick([f"{name}.{i}" for i in range(len(blocks))])


def _main_output(output: Any) -> torch.Tensor:
    """The feature map of a module's output: itself, or the first element of a tuple / ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) or hasattr(output, "to_tuple"):
        return output[0]
    raise TypeError(f"sp_delta: a compared module returned {type(output).__name__}, not a tensor.")


def _channels_last(fm: torch.Tensor) -> bool:
    """Whether the channels of ``fm`` are its last dimension (token sequences ``B x N x C``), not dimension 1."""
    return fm.dim() == 3


def channel_distances(fm: torch.Tensor, fm0: torch.Tensor) -> torch.Tensor:
    """``||FM_c(x_i) - FM0_c(x_i)||^2 / S`` for each sample ``i`` and channel ``c``: a ``B x C`` matrix (float32+)."""
    diff = fm.float() - fm0.float() if fm.dtype in (torch.float16, torch.bfloat16) else fm - fm0
    if _channels_last(diff):
        diff = diff.transpose(1, 2)
    return diff.reshape(diff.shape[0], diff.shape[1], -1).square().mean(dim=2)


@register_method(
    "delta",
    order=50,
    description="DELTA: feature maps of chosen layers kept near the frozen source network's, channels weighted.",
)
class FeatureMapDistance(TransferMethod):
    """``sp_delta``: adds ``sp_delta * Omega`` (the attention-weighted feature-map distance) to each micro-batch."""

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.model: nn.Module | None = None
        self.source: nn.Module | None = None
        self.layers: list[str] = []
        self.attention: list[torch.Tensor] = []
        self._live: dict[str, torch.Tensor] = {}
        self._from_source: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self._window = [0.0, 0]

    @classmethod
    def enabled(cls, args: Any) -> bool:
        return args.sp_delta is not None

    @classmethod
    def validate(cls, args: Any) -> None:
        if args.sp_delta is None:
            return
        check_nonnegative("sp_delta", args.sp_delta, "the strength, e.g. 0.1")
        if isinstance(args.sp_delta_layers, str):
            args.sp_delta_layers = [n.strip() for n in args.sp_delta_layers.split(",") if n.strip()]
        if args.sp_delta_attention not in ATTENTIONS:
            raise ValueError(f"sp_delta_attention={args.sp_delta_attention!r} is not one of {ATTENTIONS}.")
        if args.sp_delta_attention == "loss_drop" and args.sp_head_init != "probe":
            raise ValueError(
                "sp_delta_attention='loss_drop' weighs each channel by how much the target loss grows without it, "
                "which needs a head fitted on the source features: set sp_head_init='probe', or "
                "sp_delta_attention='none' (uniform weights)."
            )
        batches = args.sp_delta_attention_batches
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise ValueError(f"sp_delta_attention_batches must be an integer >= 1, got {batches!r}.")

    # --------------------------------------------------------------- the source copy and the hooks
    def attach(self, ctx: MethodContext) -> None:
        if ctx.sharded:
            raise ValueError(
                "sp_delta is not supported under FSDP or DeepSpeed yet (it keeps a whole frozen copy of the source "
                "network): train without a sharded engine."
            )
        model = ctx.model
        modules = dict(model.named_modules())
        self.layers = list(self.args.sp_delta_layers or default_feature_layers(model, ctx.split.head_modules))
        unknown = [n for n in self.layers if n not in modules]
        if unknown:
            raise ValueError(
                f"sp_delta_layers: the model has no module {unknown[0]!r} (see model.named_modules()); e.g. "
                f"{default_feature_layers(model, ctx.split.head_modules)}."
            )
        # The copy is taken before this method hooks the model; a fresh run's start is copied in again by initialize
        # (after the head is fitted), a resumed run's is read from the checkpoint.
        self.source = copy.deepcopy(model).eval().requires_grad_(False)
        source_modules = dict(self.source.named_modules())
        self.model = model
        for name in self.layers:
            self._handles.append(modules[name].register_forward_hook(self._recorder(self._live, live=True, name=name)))
            self._handles.append(
                source_modules[name].register_forward_hook(self._recorder(self._from_source, live=False, name=name))
            )
        logger.info("hf_sp: DELTA compares the feature maps of %s.", ", ".join(self.layers))

    def _recorder(self, store: dict[str, torch.Tensor], *, live: bool, name: str):
        def hook(module, inputs, output):
            if not live or (self.model.training and torch.is_grad_enabled()):
                store[name] = _main_output(output)

        return hook

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.source = None

    def initialize(self, ctx: MethodContext) -> None:
        self.source.load_state_dict(ctx.model.state_dict())
        channels = self._channels(ctx)
        if self.args.sp_delta_attention == "none":
            self.attention = [torch.full((c,), 1.0 / c, dtype=torch.float64) for c in channels]
        else:
            self.attention = self._loss_drop_attention(ctx, channels)
        device = ctx.device or next(ctx.model.parameters()).device
        self.attention = [a.to(device) for a in self.attention]

    @torch.no_grad()
    def _channels(self, ctx: MethodContext) -> list[int]:
        """The number of channels of each compared layer, from one forward pass of the source."""
        batch = next(iter(self._loader(ctx)))
        self._from_source.clear()
        self.source(**self._model_inputs(batch, ctx))
        maps = [self._from_source[n] for n in self.layers]
        self._from_source.clear()
        return [fm.shape[-1] if _channels_last(fm) else fm.shape[1] for fm in maps]

    def _loader(self, ctx: MethodContext):
        dataset = ctx.probe_dataset if ctx.probe_dataset is not None else ctx.train_dataset
        if dataset is None:
            raise ValueError("sp_delta needs a train_dataset (or probe_dataset) to look at the source's features.")
        return ctx.make_loader(dataset, self.args.per_device_train_batch_size)

    @staticmethod
    def _model_inputs(batch: dict[str, Any], ctx: MethodContext, labels: bool = False) -> dict[str, Any]:
        device = ctx.device or next(ctx.model.parameters()).device
        return {
            k: v.to(device) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
            if labels or k != "labels"
        }

    @torch.no_grad()
    def _loss_drop_attention(self, ctx: MethodContext, channels: list[int]) -> list[torch.Tensor]:
        """``softmax(standardised dL / 5)`` per layer, the network at its start in eval mode (see the docstring).

        The ablations of several channels run in one forward pass, each on its own copy of the batch (eval mode:
        the samples do not interact); the loss is the cross-entropy of the logits, per copy.
        """
        model, was_training = ctx.model, ctx.model.training
        model.eval()
        modules = dict(model.named_modules())
        batches = []
        for i, batch in enumerate(self._loader(ctx)):
            if i >= self.args.sp_delta_attention_batches:
                break
            batches.append(self._model_inputs(batch, ctx, labels=True))
        drops = [torch.zeros(c, dtype=torch.float64) for c in channels]
        bar = tqdm(total=len(batches) * sum(channels), desc="DELTA channel attention", disable=not ctx.show_progress)
        try:
            for inputs in batches:
                labels = inputs.pop("labels")
                size = labels.shape[0]
                per_pass = max(1, ABLATION_IMAGES // size)
                base = _cross_entropy(model(**inputs), labels, 1)
                for j, name in enumerate(self.layers):
                    for first in range(0, channels[j], per_pass):
                        chunk = list(range(first, min(first + per_pass, channels[j])))
                        handle = modules[name].register_forward_hook(_zero_channels(chunk, size))
                        try:
                            out = model(**{k: _repeat(v, len(chunk)) for k, v in inputs.items()})
                        finally:
                            handle.remove()
                        drops[j][chunk] += _cross_entropy(out, _repeat(labels, len(chunk)), len(chunk)) - base
                        bar.update(len(chunk))
        finally:
            bar.close()
            model.train(was_training)
        attention = []
        for d in drops:
            d = d / len(batches)
            std = d.std(unbiased=False)
            z = (d - d.mean()) / std if std > 0 else torch.zeros_like(d)
            attention.append(torch.softmax(z / TEMPERATURE, dim=0))
        return attention

    # --------------------------------------------------------------- the loss term
    def loss_term(self, ctx: MethodContext, inputs: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        live = dict(self._live)
        self._live.clear()
        if not live:
            return None
        self._from_source.clear()
        with torch.no_grad():
            self.source(**{k: v for k, v in inputs.items() if k != "labels"})
        total = None
        for name, attention in zip(self.layers, self.attention, strict=True):
            per_channel = channel_distances(live[name], self._from_source[name])  # B x C
            value = 0.5 * attention.numel() * (per_channel * attention.to(per_channel.dtype)).sum(dim=1).mean()
            total = value if total is None else total + value
        self._from_source.clear()
        self._window[0] += float(total.detach())
        self._window[1] += 1
        return self.args.sp_delta * total

    # --------------------------------------------------------------- checkpoints
    def on_save(self, ctx: MethodContext, checkpoint: str) -> None:
        if not ctx.is_world_process_zero:
            return
        tensors = {f"source.{k}": v.detach().contiguous().cpu() for k, v in self.source.state_dict().items()}
        tensors.update({f"{ATTENTION_PREFIX}{j}": a.cpu() for j, a in enumerate(self.attention)})
        save_file(tensors, str(Path(checkpoint) / SOURCE_FILE))

    def on_resume(self, ctx: MethodContext, optimizer: torch.optim.Optimizer, checkpoint: str) -> None:
        path = Path(checkpoint) / SOURCE_FILE
        if not path.is_file():
            raise ValueError(
                f"resume_from_checkpoint={checkpoint!r} has no {SOURCE_FILE}: it was not written with sp_delta, so the "
                "source network is unknown. Resume with the settings the run started with."
            )
        device = ctx.device or next(ctx.model.parameters()).device
        tensors = load_file(str(path), device=str(device))
        self.source.load_state_dict({k.removeprefix("source."): v for k, v in tensors.items() if k.startswith("source.")})
        self.attention = [tensors[f"{ATTENTION_PREFIX}{j}"] for j in range(len(self.layers))]

    # --------------------------------------------------------------- logs and card
    def metrics(self) -> dict[str, float]:
        total, count = self._window
        self._window = [0.0, 0]
        return {"sp_delta_value": total / count} if count else {}

    def card(self) -> list[tuple[str, str]]:
        return [
            ("DELTA strength (`sp_delta`)", f"{self.args.sp_delta:g}"),
            ("DELTA layers (`sp_delta_layers`)", ", ".join(f"`{n}`" for n in self.layers)),
            ("DELTA attention (`sp_delta_attention`)", f"`{self.args.sp_delta_attention}`"),
        ]

    def card_text(self) -> str:
        weights = "weighted per channel by attention" if self.args.sp_delta_attention == "loss_drop" else "unweighted"
        return (
            f"DELTA (Li et al., ICLR 2019) kept the feature maps of {len(self.layers)} layers near those of the frozen "
            f"source network ({weights}), with strength {self.args.sp_delta:g}."
        )


def _zero_channels(channels: list[int], size: int):
    """A forward hook that zeroes channel ``channels[k]`` of the feature map in the ``k``-th copy of the batch."""

    def hook(module, inputs, output):
        fm = _main_output(output).clone()
        for k, c in enumerate(channels):
            if _channels_last(fm):
                fm[k * size : (k + 1) * size, ..., c] = 0
            else:
                fm[k * size : (k + 1) * size, c] = 0
        if isinstance(output, torch.Tensor):
            return fm
        return (fm, *tuple(output)[1:])

    return hook


def _repeat(value: Any, copies: int) -> Any:
    """``copies`` copies of a batch tensor along its first dimension (anything else as it is)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or copies == 1:
        return value
    return value.repeat(copies, *([1] * (value.dim() - 1)))


def _cross_entropy(outputs: Any, labels: torch.Tensor, copies: int) -> torch.Tensor:
    """Mean cross-entropy of the logits over each of ``copies`` consecutive copies of the batch (float64)."""
    logits = outputs["logits"] if not isinstance(outputs, torch.Tensor) else outputs
    losses = torch.nn.functional.cross_entropy(logits.double(), labels, reduction="none")
    return losses.reshape(copies, -1).mean(dim=1).cpu()
