"""Diagonal Fisher information of a classifier at its starting point ``w0`` (for L2-SP-Fisher).

The penalty ``l2_sp_fisher`` weights each coordinate of ``w - w0`` by the diagonal of the Fisher
information matrix of the *source* model, estimated once at ``w0`` on source-task inputs and
without labels::

    F_jj = 1/m * sum_i sum_k f_k(x_i; w0) * (d log f_k(x_i; w0) / d w_j)^2

where ``f_k(x; w) = softmax(logits(x; w))_k`` is the model's predicted probability of class ``k``
and ``m`` is the number of samples.  This is the "true" Fisher: the squared per-sample gradients
of the log-likelihood are averaged over the model's *own* predictive distribution.  It is neither
the empirical Fisher (gradients at the dataset labels) nor the square of a mini-batch gradient.

With cotangent ``e_k`` (one-hot at class ``k``) on ``log softmax(logits)``, a backward pass gives exactly
``d log f_k / d w``.  By default (``vectorize="hooks"``, :mod:`hf_sp._fisher_hooks`) one forward pass is made
per batch (its logits also give the probabilities) and one backward pass over the whole batch for all class slots
at once (batched over the slots, in parts split at the graph's cuts: :mod:`hf_sp._graph_cuts`), asking only for
the gradients of the layers' outputs; the exact Fisher's ``K`` classes enter as the ``K - 1``
rows of a factor of ``diag(p) - p p^T`` (:func:`hf_sp._fisher_hooks.multinomial_rows`); forward hooks save the
layers' inputs, and each layer's per-sample squared gradients follow from the two (as Opacus' ``GradSampleModule`` and BackPACK compute per-sample gradients), with
:mod:`torch.func` for the layers that have no rule.  Opacus and BackPACK themselves were not adopted: Opacus
refuses BatchNorm and fails on timm's and transformers' ViTs (parameters held by the model itself, layers
called outside their ``forward``), BackPACK's graph converter fails on both ViTs.  The other ``vectorize``
paths compute everything with :mod:`torch.func` (``functional_call`` + ``vmap`` + ``vjp``), vectorizing
either the samples of a batch or the class slots of a sample.

Three estimators of the inner sum over classes are available:

* exact (default): all ``K`` classes with weights ``p_k = f_k(x_i; w0)``.  Cost: ``K`` gradients per
  sample (``K - 1`` on the hooks path).
* ``top_k=t``: only the ``t`` most probable classes ``T_i`` of each sample, with their probabilities
  renormalized to sum to one, i.e. weights ``p_k / sum_{l in T_i} p_l`` for ``k in T_i``.  This is
  the exact Fisher of the model's predictive distribution truncated to its top ``t`` classes; it
  is a (slightly) biased but cheap approximation when the predictions are confident.
* ``num_label_samples=s``: ``s`` labels ``y_i1..y_is ~ Categorical(f(x_i; w0))`` drawn with
  replacement, each with weight ``1/s``.  This is an unbiased Monte-Carlo estimate of the inner
  sum: ``E[(1/s) sum_r g_{y_ir}^2] = sum_k p_k g_k^2``.

Fisher tensors are stored with :mod:`safetensors` (:func:`save_fisher` / :func:`load_fisher`) and
validated against a model with :func:`check_fisher`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ._compiled_pairs import check_compiler
from ._eval_batch_norm import eval_batch_norm_for
from ._fisher_hooks import MISBATCHED, HookedFisher, NotPerSample, checkpointing_refused, graph_ops
from ._graph_cuts import reachable

#: How :func:`estimate_fisher` vectorizes the per-sample, per-class gradients.
VECTORIZE = ("auto", "hooks", "samples", "classes")

__all__ = ["FISHER_FORMAT", "check_fisher", "estimate_fisher", "load_fisher", "save_fisher"]

#: Value of the ``"format"`` metadata entry written by :func:`save_fisher`.
FISHER_FORMAT = "hf_sp.fisher"

_FIX_HINT = (
    "Re-estimate the Fisher on this model with hf_sp.fisher.estimate_fisher(model, dataloader) and save it again."
)


def _check_positive_int(value: int | None, name: str) -> None:
    """Raise ``ValueError`` unless ``value`` is ``None`` or a positive ``int`` (bools rejected)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name} must be a positive integer or None, got {value!r}; pass e.g. {name}=1 or leave it None."
        )


def _pixel_values(batch: Any) -> torch.Tensor:
    """Extract the model input from a batch: a mapping with ``"pixel_values"``, an ``(x, y)`` pair or a tensor."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        if "pixel_values" not in batch:
            raise ValueError(f"Dict batches must contain the key 'pixel_values'; got keys {sorted(map(str, batch))}.")
        return batch["pixel_values"]
    if isinstance(batch, (tuple, list)) and len(batch) > 0 and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise ValueError(
        f"Unsupported batch of type {type(batch).__name__}: expected a dict with 'pixel_values', an (inputs, labels) "
        "tuple/list or a tensor of inputs."
    )


def _logits(output: Any) -> torch.Tensor:
    """Extract ``[batch, num_classes]`` logits from a tensor, a ``ModelOutput``/dict or a tuple output."""
    if isinstance(output, torch.Tensor):
        logits = output
    elif isinstance(output, Mapping) and "logits" in output:
        logits = output["logits"]
    elif hasattr(output, "logits"):
        logits = output.logits
    elif isinstance(output, (tuple, list)) and len(output) > 0 and isinstance(output[0], torch.Tensor):
        logits = output[0]
    else:
        raise ValueError(f"Cannot find logits in model output of type {type(output).__name__}.")
    if logits.dim() != 2:
        raise ValueError(f"Expected classification logits of shape [batch, num_classes], got {tuple(logits.shape)}.")
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # compute softmax statistics in at least fp32
    return logits


def _select_params(model: nn.Module, param_names: Iterable[str] | None) -> list[str]:
    """Names of the parameters that get a Fisher: those in ``param_names``, else those with ``requires_grad``."""
    named = dict(model.named_parameters())
    if param_names is None:
        selected = [n for n, p in named.items() if p.requires_grad]
        if not selected:
            raise ValueError("The model has no parameter with requires_grad=True; pass param_names=[...] explicitly.")
        return selected
    if isinstance(param_names, str):
        raise ValueError("param_names must be an iterable of parameter names, not a single string; wrap it in a list.")
    wanted = list(dict.fromkeys(param_names))
    if not wanted:
        raise ValueError("param_names is empty; pass at least one name from model.named_parameters() or None.")
    for name in wanted:
        if name not in named:
            raise ValueError(
                f"param_names contains {name!r}, which is not a parameter of the model; "
                f"use names from model.named_parameters() (e.g. {next(iter(named), '<none>')!r})."
            )
        if not named[name].is_floating_point():
            raise ValueError(f"Parameter {name!r} is not floating point; remove it from param_names.")
    return wanted


def _class_slots(
    probs: torch.Tensor,
    top_k: int | None,
    num_label_samples: int | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels ``[B, S]`` and weights ``[B, S]`` of the class slots, so that the inner sum is ``sum_s w_s g_{y_s}^2``."""
    batch, num_classes = probs.shape
    if num_label_samples is not None:
        sample_from = probs if generator is None else probs.to(generator.device)
        labels = torch.multinomial(sample_from, num_label_samples, replacement=True, generator=generator)
        weights = torch.full((batch, num_label_samples), 1.0 / num_label_samples, dtype=probs.dtype)
        return labels.to(probs.device), weights.to(probs.device)
    if top_k is not None and top_k < num_classes:
        top_p, labels = probs.topk(top_k, dim=1)
        return labels, top_p / top_p.sum(dim=1, keepdim=True)
    labels = torch.arange(num_classes, device=probs.device).expand(batch, num_classes)
    return labels, probs


def _draw_once(draw, drawn: list, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``draw(probs)``, kept in ``drawn`` for a fallback on the same batch."""
    drawn.append(draw(probs))
    return drawn[-1]


def resolve_vectorize(vectorize: str, device: torch.device, hooks_supported: bool = True) -> str:
    """``vectorize`` with ``"auto"`` resolved: ``"hooks"`` where the model decomposes per sample, else the
    :mod:`torch.func` path that is faster on ``device``: ``"classes"`` on CPU, ``"samples"`` on accelerators.

    On CPU, ``vmap`` over samples turns every convolution's weight gradient into a grouped convolution
    and every matmul's into a small batched one; one forward pass per sample with its class slots
    batched was faster for both a ResNet and a ViT (``scripts/benchmark.py --sections fisher``).
    """
    if vectorize == "auto" and hooks_supported:
        return "hooks"
    if vectorize in ("auto", "hooks") and not hooks_supported:
        return "classes" if device.type == "cpu" else "samples"
    return vectorize


def _graph_ops(model: nn.Module, params: dict[str, torch.Tensor], constants: dict[str, torch.Tensor], x) -> set[str]:
    """The backward nodes of ``model``'s graph on ``x`` (:func:`hf_sp._fisher_hooks.graph_ops`: refuses reentrant
    checkpointing), for the torch.func paths, before their first batch."""
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    x = x.detach().requires_grad_(True) if x.is_floating_point() else x  # reentrant checkpoints need such an input
    with torch.enable_grad():
        logits = _logits(functional_call(model, (leaves, constants), (x,)))
    return set() if logits.grad_fn is None else graph_ops(reachable(logits.grad_fn))


def estimate_fisher(
    model: nn.Module,
    dataloader: Iterable,
    *,
    max_batches: int | None = None,
    top_k: int | None = None,
    num_label_samples: int | None = None,
    param_names: Iterable[str] | None = None,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    vectorize: str = "auto",
    compile: bool = False,
) -> dict[str, torch.Tensor]:
    """Estimate the diagonal of the (true) Fisher information of a classifier at its current weights ``w0``.

    Computes, for every selected parameter tensor and every coordinate ``j``::

        F_jj = 1/m * sum_i sum_k f_k(x_i; w0) * (d log f_k(x_i; w0) / d w_j)^2

    with ``f(x; w) = softmax(logits(x; w))`` and ``m`` the total number of samples seen.  No labels are
    used: the sum over ``k`` follows the model's own predictive distribution.

    The model runs in eval mode (BatchNorm uses its running statistics, dropout is off); the train/eval
    flag of every submodule is restored afterwards.  Parameters, buffers and ``requires_grad`` flags are
    left untouched.  One forward pass per batch and one backward pass batched over the class slots
    (``vectorize="hooks"``, the default; ``K - 1`` slots for the exact Fisher over ``K`` classes), or
    :mod:`torch.func` over the samples or the class slots.

    Args:
        model: a classifier returning logits ``[B, K]`` as a tensor, a ``ModelOutput``/dict with
            ``logits``, or a tuple whose first element is the logits.
        dataloader: iterable of batches: dicts with ``"pixel_values"`` (other keys such as ``"labels"`` are
            ignored), ``(inputs, labels)`` tuples/lists, or input tensors.  Floating inputs are moved to the
            model's device and parameter dtype.
        max_batches: use at most this many batches (``None``: the whole dataloader).
        top_k: sum only over the ``top_k`` most probable classes ``T_i`` of each sample, with weights
            ``f_k / sum_{l in T_i} f_l`` (renormalized to sum to one).  ``top_k >= K`` is exact.
        num_label_samples: Monte-Carlo estimate: draw this many labels per sample from
            ``Categorical(f(x_i; w0))`` (with replacement, using ``generator``), each with weight
            ``1/num_label_samples``.  Unbiased.  Mutually exclusive with ``top_k``.
        param_names: parameters to estimate (names from ``model.named_parameters()``); default: all
            parameters with ``requires_grad=True``.
        chunk_size: vectorize at most this many samples (``vectorize="samples"``; ``"hooks"`` bounds the
            memory of its saved output gradients itself) or class slots (``"classes"``) at a time (passed to ``vmap``); bounds the memory of the vectorized
            forward/backward and of the per-sample gradients (``chunk_size x #params``).  ``None``: a
            whole batch (all class slots) at once.
        generator: random generator for ``num_label_samples``.
        progress: show a tqdm progress bar over the batches.
        dtype: floating dtype of the returned tensors (default ``torch.float32``).
        vectorize: ``"hooks"``: one forward pass per batch, one backward pass batched over the class slots,
            per-sample squares from layer inputs and output gradients (:mod:`hf_sp._fisher_hooks`; models whose samples
            interact, through BatchNorm on batch statistics or parameters tied between modules, use the
            ``torch.func`` path instead); ``"samples"``: ``vmap`` over the samples of a batch, one VJP per class
            slot; ``"classes"``: one forward pass per sample and ``vmap`` over its class slots (faster than
            ``"samples"`` on CPU); ``"auto"``: ``"hooks"``.  Same Fisher either way.
        compile: ``"hooks"``: multiply position pairs (the squares of Linear and convolution layers over few
            positions: small images, few tokens) with one loop generated by ``torch.compile``
            (:mod:`hf_sp._compiled_pairs`) instead of one op per slot and row; same Fisher up to rounding. The first
            call compiles (4 s with inductor's disk cache, 26 s without, on 2 CPU cores; needs a C++ compiler on
            CPU, Triton on GPU), later calls in the process reuse it. No effect on the ``torch.func`` paths.

    Returns:
        ``{name: F}`` with ``F`` of the parameter's shape, on CPU, of ``dtype``, all entries ``>= 0``.

    Raises:
        ValueError: invalid arguments, unknown ``param_names``, or a dataloader that yields no batch.
    """
    _check_positive_int(max_batches, "max_batches")
    _check_positive_int(top_k, "top_k")
    _check_positive_int(num_label_samples, "num_label_samples")
    _check_positive_int(chunk_size, "chunk_size")
    if top_k is not None and num_label_samples is not None:
        raise ValueError(
            f"top_k={top_k} and num_label_samples={num_label_samples} are mutually exclusive: pass only one of them "
            "(or neither, for the exact Fisher over all classes)."
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}.")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}.")
    if vectorize not in VECTORIZE:
        raise ValueError(f"vectorize={vectorize!r} is not one of {VECTORIZE}.")
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}.")
    if compile and vectorize in ("samples", "classes"):
        raise ValueError(
            f"compile=True compiles the pair products of vectorize='hooks', and vectorize={vectorize!r} has none: "
            "pass vectorize='auto' or 'hooks', or compile=False."
        )

    names = _select_params(model, param_names)
    selected = set(names)
    all_params = dict(model.named_parameters())
    first = all_params[names[0]]
    device = first.device
    input_dtype = next((p.dtype for p in all_params.values() if p.is_floating_point()), first.dtype)

    params = {n: all_params[n].detach() for n in names}
    constants = {n: p.detach() for n, p in all_params.items() if n not in selected}
    constants.update({n: b.detach() for n, b in model.named_buffers()})
    acc_dtypes = {n: torch.promote_types(p.dtype, torch.float32) for n, p in params.items()}
    fisher = {n: torch.zeros(p.shape, dtype=acc_dtypes[n], device=device) for n, p in params.items()}

    def log_probs(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``log f(x; p)`` of one sample ``x`` (no batch dimension)."""
        out = functional_call(model, (p, constants), (x.unsqueeze(0),))
        return torch.log_softmax(_logits(out), dim=-1).squeeze(0)

    def per_sample(x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """``sum_s weights[s] * (d log f_{labels[s]}(x) / dw)^2`` for one sample ``x`` (vmapped over the batch)."""
        logp, vjp_fn = vjp(partial(log_probs, x=x), params)
        total = {n: torch.zeros_like(p, dtype=acc_dtypes[n]) for n, p in params.items()}
        classes = torch.arange(logp.shape[-1], device=logp.device)
        for s in range(labels.shape[0]):  # loop over class slots; samples are vectorized by vmap
            cotangent = (classes == labels[s]).to(logp.dtype)  # e_{y_s}: VJP gives d log f_{y_s} / dw
            (grads,) = vjp_fn(cotangent)
            for n, g in grads.items():
                total[n] = total[n] + weights[s].to(acc_dtypes[n]) * g.to(acc_dtypes[n]).square()
        return total

    batched = vmap(per_sample, in_dims=(0, 0, 0), chunk_size=chunk_size)

    ops: list[set[str]] = []  # the backward nodes of the model's graph, known before the torch.func paths' first batch

    def over_classes(x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        """Add ``sum_i sum_s weights[i, s] * (d log f_{labels[i, s]}(x_i) / dw)^2`` to ``fisher``: one forward
        pass per sample, its class slots vectorized by vmap (one VJP each in a graph with a MISBATCHED op)."""
        for i in range(x.shape[0]):
            logp, vjp_fn = vjp(partial(log_probs, x=x[i]), params)
            cotangents = torch.nn.functional.one_hot(labels[i], logp.shape[-1]).to(logp.dtype)  # [S, K]
            if ops[0] & MISBATCHED:
                each = [vjp_fn(c)[0] for c in cotangents]
                grads = {n: torch.stack([g[n] for g in each]) for n in each[0]}
            else:
                (grads,) = vmap(vjp_fn, chunk_size=chunk_size)(cotangents)
            for n, g in grads.items():
                # not in place: gradients of different parameters may share memory (e.g. slices of one tensor)
                squares = g.to(acc_dtypes[n]).reshape(g.shape[0], -1).square()
                fisher[n].view(-1).addmv_(squares.T, weights[i].to(acc_dtypes[n]))

    draw = partial(_class_slots, top_k=top_k, num_label_samples=num_label_samples, generator=generator)
    hooked = None
    if vectorize in ("auto", "hooks") and HookedFisher.supported(model, names):
        if compile:  # a missing compiler is reported now, not at the first batch
            check_compiler(device, input_dtype)
        hooked = HookedFisher(model, names, compiled=compile)
    vectorize = resolve_vectorize(vectorize, device, hooks_supported=hooked is not None)

    try:
        total_batches: int | None = len(dataloader)  # type: ignore[arg-type]
        if max_batches is not None:
            total_batches = min(total_batches, max_batches)
    except TypeError:
        total_batches = max_batches
    batches = dataloader if max_batches is None else islice(dataloader, max_batches)

    modes = {m: m.training for m in model.modules()}
    num_samples = 0
    hooked_ok = False
    model.eval()
    try:
        # The fused scaled_dot_product_attention kernels have no vmap batching rule (vmap would fall back to a
        # slow per-sample loop); the math backend is made of batchable ops. BatchNorm with running statistics by its
        # formula: the CPU kernel's gradient is wrong for one sample with a non-contiguous output gradient.
        with checkpointing_refused(), sdpa_kernel(SDPBackend.MATH), ExitStack() as batch_norm_mode:
            for batch in tqdm(batches, total=total_batches, desc="Fisher", unit="batch", disable=not progress):
                x = _pixel_values(batch)
                x = x.to(device=device, dtype=input_dtype if x.is_floating_point() else None)
                if x.dim() == 0 or x.shape[0] == 0:
                    continue
                if num_samples == 0:  # the first sample: whether the model normalizes by running statistics
                    one = partial(functional_call, model, (params, constants), (x[:1],))
                    batch_norm_mode.enter_context(eval_batch_norm_for(model, one))
                num_samples += x.shape[0]
                drawn: list[tuple[torch.Tensor, torch.Tensor]] = []  # this batch's (labels, weights), once drawn
                if hooked is not None:
                    # The first batches check that the hooks see independent samples (until a batch of two samples
                    # or more was checked); if not, torch.func takes over from that batch on.
                    before = {n: f.clone() for n, f in fisher.items()} if not hooked_ok else None
                    num_classes = hooked.num_classes(x, params, constants, _logits)
                    exact = num_label_samples is None and (top_k is None or top_k >= num_classes)
                    num_slots = num_classes - 1 if exact else num_label_samples or top_k
                    try:
                        # the class slots are drawn from the probabilities of the hooked forward pass itself
                        slots = partial(_draw_once, draw, drawn)
                        hooked.add(x, slots, exact, num_slots, params, constants, _logits, fisher)
                        hooked_ok = hooked.verified  # until then, a later batch may still fall back
                        continue
                    except NotPerSample:
                        if hooked.touched:  # else the Fisher is as it was before this batch
                            if before is None:
                                raise
                            fisher.update(before)
                        hooked, vectorize = None, resolve_vectorize("auto", device, hooks_supported=False)
                if drawn:  # the hooks gave up after drawing: the same slots (labels are drawn once per batch)
                    labels, weights = drawn[0]
                else:
                    with torch.no_grad():
                        probs = torch.softmax(_logits(functional_call(model, (params, constants), (x,))), dim=-1)
                    labels, weights = draw(probs)
                if not ops:
                    ops.append(_graph_ops(model, params, constants, x[:1]))
                if vectorize == "classes":
                    over_classes(x, labels, weights)
                    continue
                step = x.shape[0] if chunk_size is None else chunk_size
                for start in range(0, x.shape[0], step):
                    sl = slice(start, start + step)
                    for n, c in batched(x[sl], labels[sl], weights[sl]).items():
                        fisher[n] += c.sum(dim=0)
    finally:
        for module, mode in modes.items():
            module.training = mode

    if num_samples == 0:
        raise ValueError("The dataloader yielded no samples; the Fisher needs at least one batch of inputs.")
    return {n: (f / num_samples).to(device="cpu", dtype=dtype) for n, f in fisher.items()}


def save_fisher(
    fisher: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Save a Fisher diagonal ``{name: F}`` as a safetensors file of contiguous CPU fp32 tensors.

    The metadata always contains ``{"format": "hf_sp.fisher"}`` (unless overridden) plus the given string
    entries (e.g. the source model name, number of samples, estimator).  Parent directories are created.
    """
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map str to str; convert values with str(...) first.")
    tensors: dict[str, torch.Tensor] = {}
    for name, value in fisher.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"Fisher entry {name!r} is a {type(value).__name__}, not a torch.Tensor.")
        # clone: safetensors refuses tensors sharing storage (e.g. tied parameters).
        tensors[name] = value.detach().to(device="cpu", dtype=torch.float32).clone().contiguous()
    meta = {"format": FISHER_FORMAT, **(dict(metadata) if metadata else {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, os.fspath(path), metadata=meta)


def _check_values(name: str, value: torch.Tensor) -> None:
    """Reject non-finite or negative Fisher entries (a Fisher diagonal is a mean of squares)."""
    if not torch.isfinite(value).all():
        raise ValueError(f"Fisher tensor {name!r} contains NaN or infinite entries. {_FIX_HINT}")
    if (value < 0).any():
        raise ValueError(
            f"Fisher tensor {name!r} contains negative entries (min {value.min().item():.3g}). {_FIX_HINT}"
        )


def check_fisher(fisher: Mapping[str, torch.Tensor], model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Check that ``fisher`` matches ``model``; raise ``ValueError`` naming the first tensor that does not.

    The expected names are ``names`` if given (in that order), else every key of ``fisher`` (in the model's
    parameter order, then keys that are not parameters).  For each, in order: it must be
    in ``fisher`` (else "missing"), be a parameter of ``model`` (``model.named_parameters()``), have the
    parameter's shape, and have only finite entries ``>= 0``.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    if names is None:  # model order first (safetensors files come back sorted by name), then unknown names
        expected = [n for n in params if n in fisher] + [n for n in fisher if n not in params]
    else:
        expected = list(dict.fromkeys([names] if isinstance(names, str) else names))
    for name in expected:
        if name not in fisher:
            raise ValueError(f"Fisher tensor {name!r} is missing (the Fisher has {len(fisher)} tensors). {_FIX_HINT}")
        if name not in params:
            raise ValueError(f"Fisher tensor {name!r} is not a parameter of the model. {_FIX_HINT}")
        value, param = fisher[name], params[name]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"Fisher entry {name!r} is a {type(value).__name__}, not a torch.Tensor. {_FIX_HINT}")
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"Fisher tensor {name!r} has shape {tuple(value.shape)} but the model parameter has shape "
                f"{tuple(param.shape)}. {_FIX_HINT}"
            )
        _check_values(name, value)


def load_fisher(
    path: str | os.PathLike, model: nn.Module | None = None, names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Load a Fisher diagonal saved by :func:`save_fisher` (CPU fp32 tensors).

    If ``model`` is given, the Fisher is checked against it with :func:`check_fisher` (restricted to
    ``names`` if given).  If ``names`` is given, only those tensors are returned (each must be present), in
    that order; else all tensors, in the model's parameter order if ``model`` is given (otherwise sorted by
    name, as stored by safetensors).
    Entries are always checked to be finite and ``>= 0``.
    """
    fisher = load_file(os.fspath(path), device="cpu")
    wanted = None if names is None else list(dict.fromkeys([names] if isinstance(names, str) else names))
    if model is not None:
        check_fisher(fisher, model, wanted)
    else:
        for name in fisher if wanted is None else wanted:
            if name not in fisher:
                raise ValueError(f"Fisher tensor {name!r} is missing from {os.fspath(path)!r}. {_FIX_HINT}")
            _check_values(name, fisher[name])
    if wanted is not None:
        return {n: fisher[n] for n in wanted}
    if model is not None:  # restore the model's parameter order (safetensors returns keys sorted by name)
        return {n: fisher[n] for n, _ in model.named_parameters(remove_duplicate=False) if n in fisher}
    return fisher
