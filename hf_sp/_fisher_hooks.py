"""The exact Fisher's inner sums from one forward pass per batch and one backward pass batched over the class slots.

``HookedFisher(model, names).add(x, draw, exact, num_slots, ...)`` adds
``sum_b sum_s weights[b, s] * (d log f_{labels[b, s]}(x_b) / dw)^2`` to ``fisher`` for every selected parameter
(``labels, weights = draw(p)``, ``p`` the probabilities of the hooked forward pass),
as ``sum_b sum_s weights[b, s] * (d (c[b, s] . logits(x_b)) / dw)^2`` with the cotangent ``c = e_k - p`` on the
logits of a class slot ``k``; with ``exact`` (all classes, weighted by ``p``) the ``K - 1`` rows of
:func:`multinomial_rows` with weight one instead, one backward pass fewer:

* parameters of layers with a rule (:mod:`hf_sp._per_sample`: Linear, Conv1d/2d, norms, Embedding) get it from the
  layer's input (saved by a forward hook) and the gradient of its output (``autograd.grad`` over the whole batch,
  batched over the slots where the graph allows it, else one per slot, asking for activation gradients only: no
  weight gradient is computed). The backward pass is made in parts, split where the graph has a cut
  (:mod:`hf_sp._graph_cuts`: the output of a block that every earlier layer reaches the logits through), and each
  part's output gradients are turned into squares before the next part runs: one part's gradients are held at a
  time, not every layer's;
* parameters held directly by a module without a rule, whose first dimension is 1 and broadcast over the batch
  (a ViT's ``cls_token`` and ``pos_embed``), are replaced by one copy per sample, whose gradients are then
  the per-sample gradients; if the copies break the forward pass or mix the samples (a ``[1, ...]`` parameter
  repeated over the batch, or indexed), the modules that hold such parameters go to :mod:`torch.func` instead;
* a layer called on one sample's inputs in a batch of several (a position table looked up with ids of shape
  ``[1, L]``, as BERT and SigLIP do) makes one output for all samples: its inputs and output are expanded to one
  copy per sample, whose gradients are the per-sample ones;
* every model is checked on the first batch of two samples or more, on two of them (every layer sees both as its
  first dimension, each sample gets the logits it gets alone, the gradients of a sample land only on its copies;
  :meth:`HookedFisher._check`), and given to torch.func if it fails; a batch that the copies break before it
  adds anything (a later, larger one) gives the model to torch.func too;
* every other parameter falls back to :mod:`torch.func`, locally: the module that holds it is re-run under
  ``vmap`` over the samples on its saved inputs, with a VJP of the saved output gradient.

:meth:`HookedFisher.supported` says whether a model decomposes per sample at all (no BatchNorm on batch
statistics, no parameter tied between modules); :func:`hf_sp.estimate_fisher` uses ``torch.func`` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._graph_cuts import cut_points, made_between, reachable
from ._per_sample import RULES, pair_positions, rule_for, sums_pairs, workspace

#: Floats of all layers' output gradients (slots x samples x activations): 512 MiB of fp32, the most that one part
#: of the backward pass could hold (a graph without cuts is one part). Samples are split into forward chunks first
#: (all slots of a chunk at once: the pair products are then made once per chunk), slots into groups of backward
#: passes when one sample's slots alone exceed it.
GRADIENT_BUDGET = 1 << 27

#: Floats of one layer's saved output gradients (slots x samples x that layer's activations) at a time: just under
#: 32 MiB of fp32, the largest block glibc's malloc serves from its heap (``DEFAULT_MMAP_THRESHOLD_MAX``; a block of
#: exactly that size, with the allocator's alignment, is over it). A larger block is mapped afresh at every
#: allocation and page-faulted as it is first written, and the backward pass allocates several of that size per
#: layer. The backward pass takes the slots in groups from the first layer that would exceed it on (chunks of
#: samples where a layer that sums position pairs would, or where one slot would).
LAYER_BUDGET = (1 << 23) - (1 << 14)


#: Floats of one slot's output gradients that a part of the backward pass holds at least (1 MiB of fp32), unless
#: the graph has no cut: each part costs one call of the autograd engine, so blocks are merged up to this size.
PART_FLOATS = 1 << 18


#: Whether the slots' backward passes are batched into one (:func:`torch.func.vmap` over ``torch.autograd.grad``).
BATCHED_SLOTS = True

#: Backward nodes whose batching rule in :func:`torch.func.vmap` gives wrong gradients when only the cotangent is
#: batched, as in the batched pass, without an error (``_cdist_backward``, torch 2.14): a graph that holds one gets
#: one backward pass per slot.
MISBATCHED = frozenset({"CdistBackward0"})

#: The backward node of reentrant activation checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``): it
#: runs its part of the forward pass again inside the backward pass, where no hook sees it, and torch.func cannot
#: differentiate it, so no path of the Fisher can take it per sample.
REENTRANT = "CheckpointFunctionBackward"


#: The fix that both checkpointing errors give.
_CHECKPOINTING_OFF = (
    "Turn it off for the estimate (timm: model.set_grad_checkpointing(False); transformers: "
    "model.gradient_checkpointing_disable())"
)


class Unsupported(ValueError):
    """A model that no path of the Fisher can take per sample."""


def graph_ops(nodes: Iterable[Any]) -> set[str]:
    """The names of the backward ``nodes`` of a graph; :class:`Unsupported` for reentrant checkpointing."""
    names = {n.name() for n in nodes}
    if REENTRANT in names:
        raise Unsupported(
            "estimate_fisher: the model uses reentrant activation checkpointing (torch.utils.checkpoint with "
            f"use_reentrant=True), whose recomputed forward pass no per-sample path can differentiate. {_CHECKPOINTING_OFF} "
            "or checkpoint with use_reentrant=False."
        )
    return names


#: What torch.func's errors for activation checkpointing without reentrance say: its saved tensor hooks (torch
#: 2.14), or, before, the autograd function that the checkpoint saves its inputs with (torch 2.11).
_CHECKPOINTING_ERRORS = ("saved tensor hooks", "_NoopSaveInputs")


@contextmanager
def checkpointing_refused() -> Iterator[None]:
    """Turn torch.func's error for activation checkpointing without reentrance (:data:`_CHECKPOINTING_ERRORS`) into
    :class:`Unsupported` with the fix: the hooks run through it, torch.func cannot."""
    try:
        yield
    except RuntimeError as error:
        if not any(marker in str(error) for marker in _CHECKPOINTING_ERRORS):
            raise
        raise Unsupported(
            "estimate_fisher: the model uses activation checkpointing (torch.utils.checkpoint with "
            "use_reentrant=False), which torch.func cannot differentiate: it runs vectorize='samples' and 'classes', "
            f"and the hooks' layers without a rule or models they give up on. {_CHECKPOINTING_OFF}."
        ) from error


class NotPerSample(RuntimeError):
    """The model's samples interact, or a hooked tensor was changed in place: use the torch.func path."""


def multinomial_rows(probs: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows ``c_start..c_{stop-1}`` of a factor ``sum_j c_j c_j^T = diag(p) - p p^T`` for each sample's ``p``
    (``[B, K]`` -> ``[B, stop - start, K]``; all ``K - 1`` rows by default), by splitting off one class at a time
    (the Cholesky factor of the multinomial covariance)::

        r_j = sum_{k >= j} p_k,   c_j[j] = sqrt(p_j r_{j+1} / r_j),   c_j[k] = -p_k sqrt(p_j / (r_j r_{j+1})) for k > j

    and ``c_j[k] = 0`` for ``k < j``. ``diag(p) - p p^T = sum_k p_k (e_k - p)(e_k - p)^T`` has rank ``K - 1`` (its
    null vector is ``1``), so the exact Fisher's ``K`` weighted squares are ``K - 1`` unweighted ones. Computed in
    float64 (float32 where the device has no float64) with ``p`` renormalized to sum to one; ``O(B K)`` memory
    besides the rows asked for.
    """
    work = torch.float32 if probs.device.type == "mps" else torch.float64
    p = probs.to(work)
    p = p / p.sum(-1, keepdim=True)
    num_classes = p.shape[-1]
    stop = num_classes - 1 if stop is None else stop
    r = p.flip(-1).cumsum(-1).flip(-1)  # r_j
    r_next = torch.cat([r[:, 1:], torch.zeros_like(r[:, :1])], -1)  # r_{j+1}
    ok = (r > 0) & (r_next > 0)
    root = torch.where(ok, (p / torch.where(ok, r, 1.0)).sqrt(), 0.0)  # sqrt(p_j / r_j), as a product: no underflow
    diagonal = root * r_next.sqrt()
    scale = root * torch.where(ok, r_next, 1.0).rsqrt()
    j = torch.arange(start, stop, device=p.device)
    later = torch.arange(num_classes, device=p.device)[None, :] > j[:, None]  # [rows, K]: k > j
    rows = torch.where(later, -scale[:, start:stop, None] * p[:, None, :], 0.0)
    rows[:, torch.arange(j.shape[0], device=p.device), j] = diagonal[:, start:stop]
    return rows


def _cotangents(probs, labels, weights, exact: bool, slots: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Cotangents on the logits ``[B, len(slots), K]`` and weights ``[B, len(slots)]`` of a group of slots."""
    if exact:
        rows = multinomial_rows(probs, slots.start, slots.stop).to(probs.dtype)
        return rows, torch.ones(rows.shape[:2], dtype=probs.dtype, device=probs.device)
    one_hot = torch.nn.functional.one_hot(labels[:, slots.start : slots.stop], probs.shape[-1]).to(probs.dtype)
    return one_hot - probs[:, None, :], weights[:, slots.start : slots.stop]


class _Event(NamedTuple):
    """A tensor made by the forward pass whose gradient may be asked for: a unit's output (``target``) or a
    stage's. ``source`` is the node that made it, ``node`` its clone's (the way the forward pass goes on from it),
    ``cut`` whether the backward pass may stop there, ``version`` its version counter when it was made, ``shared``
    whether it is one output for all samples, expanded to one copy per sample (see :meth:`HookedFisher._hook`)."""

    tensor: torch.Tensor
    source: Any
    node: Any
    target: bool
    cut: bool
    version: int
    shared: bool = False


def _storages(tensors) -> set[int]:
    """The storages (by address) of ``tensors``: the model's parameters and buffers, to tell its own tensors."""
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


def _per_sample_arg(a: Any, batch: int, fixed: set[int]) -> bool:
    """Whether ``a``, an argument of a call, holds one row per sample: a tensor of ``batch`` rows that is not one of
    the model's parameters or buffers or a slice of one (``fixed``: their storages; a table of ``batch`` rows passed
    as an argument is the same for all samples), unless it is expanded over the batch (the same row for each)."""
    if not (isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch):
        return False
    return a.stride(0) == 0 or a.numel() == 0 or a.untyped_storage().data_ptr() not in fixed


def _untracked_rows(a: Any, batch: int) -> bool:
    """Whether ``a`` is a float tensor of ``batch`` rows that does not require a gradient while the samples do (a
    table computed from the model's buffers, as a rotary embedding is, or a result made under ``no_grad``)."""
    return (
        isinstance(a, torch.Tensor)
        and a.is_floating_point()
        and not a.requires_grad
        and a.dim() > 0
        and a.shape[0] == batch
        and a.stride(0) != 0
    )


class _Sizes(NamedTuple):
    """One sample's output gradients for one slot, in floats: ``all`` layers', the ``largest`` output's, and for each
    unit (its outputs' floats, :func:`~hf_sp._per_sample.pair_positions`); ``classes``: the logits' classes."""

    all: int
    largest: int
    classes: int
    units: list[tuple[int, int]]


class _Unit:
    def __init__(self, prefix: str, module: nn.Module, names: dict[str, str], rule: Callable | None) -> None:
        self.prefix, self.module, self.rule = prefix, module, rule
        self.names = names  # local name (relative to module) -> full name
        #: (inputs, kwargs, output leaves, input versions) of each call in the current forward
        self.calls: list[tuple[Any, Any, Any, list[int]]] = []


def _direct(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(module.named_parameters(recurse=False))


class HookedFisher:
    """Hooks on ``model`` that turn one forward and ``S`` backward passes into the Fisher's per-sample squares."""

    def __init__(self, model: nn.Module, names: list[str], compiled: bool = False) -> None:
        self.model, self.selected = model, set(names)
        self.compiled = compiled  # position pairs by the compiled kernel (hf_sp._compiled_pairs)
        self._checked = False
        #: one batched backward pass over the slots (see _backward); cleared when the graph does not support it
        self.batched_slots = BATCHED_SLOTS
        self._batch = 0  # the samples of the forward pass under way
        self._expanded = False  # whether it expanded a shared output (see _hook)
        self._untracked = False  # whether the samples of the forward pass under way require a gradient (see _hook)
        self._fixed: set[int] = set()  # the storages of the model's parameters and buffers, from the last forward pass
        self.touched = False  # whether the batch under way added to the Fisher
        self._build(copies=True)

    def _build(self, copies: bool) -> None:
        """The units, the per-sample copies (if ``copies``: else their modules are units for torch.func) and the
        stages."""
        self.units: list[_Unit] = []
        self.replicas: list[str] = []
        self._sizes: dict[tuple, _Sizes] = {}  # one sample's output gradients, by input shape
        #: the autograd nodes that each unit's calls made (by id of the unit), gathered in every forward pass to
        #: check that the units' parameters are used inside their calls only (:meth:`_check_parameter_uses`; a model
        #: may take another branch on another batch)
        self._made: dict[int, set] = {}
        self._walk(self.model, "", copies)
        self.stages = self._stages(self.model)

    @property
    def verified(self) -> bool:
        """Whether the hooks were checked on a batch of two samples or more (:meth:`_check`): until then a batch
        may still raise :class:`NotPerSample`."""
        return self._checked

    @staticmethod
    def supported(model: nn.Module, names: list[str]) -> bool:
        """Whether samples stay independent (eval mode) and no selected parameter is shared between modules."""
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.running_mean is None or m.running_var is None):
                return False
        seen: dict[int, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            if id(p) in seen and (n in names or seen[id(p)] in names):
                return False
            seen.setdefault(id(p), n)
        return True

    def _walk(self, module: nn.Module, prefix: str, copies: bool) -> None:
        def full(local: str) -> str:
            return f"{prefix}.{local}" if prefix else local

        direct = [(n, p) for n, p in _direct(module) if full(n) in self.selected]
        rule = rule_for(module) if type(module) in RULES else None
        if rule is not None and {n for n, _ in _direct(module)} <= {"weight", "bias"}:  # else reparametrized (weight_g)
            if direct:
                self.units.append(_Unit(prefix, module, {n: full(n) for n, _ in direct}, rule))
            return
        if direct and copies and all(p.dim() > 0 and p.shape[0] == 1 for _, p in direct):
            self.replicas += [full(n) for n, _ in direct]
        elif direct:  # whole subtree through torch.func: its children may use its parameters (MultiheadAttention)
            subtree = {n: full(n) for n, _ in module.named_parameters() if full(n) in self.selected}
            self.units.append(_Unit(prefix, module, subtree, None))
            return
        for name, child in module.named_children():
            self._walk(child, full(name), copies)

    def _stages(self, model: nn.Module) -> list[nn.Module]:
        """Modules whose outputs may split the backward pass (besides the units'): the model's children and the
        members of every ``nn.Sequential`` / ``nn.ModuleList`` (a network's stages and blocks), outside the units."""
        units = {id(u.module) for u in self.units}
        inside = {id(m) for u in self.units for m in u.module.modules()}
        stages, seen = [], set()
        for parent in model.modules():
            if id(parent) in inside or not (parent is model or isinstance(parent, (nn.Sequential, nn.ModuleList))):
                continue
            for child in parent.children():
                if id(child) not in units and id(child) not in seen:
                    seen.add(id(child))
                    stages.append(child)
        return stages

    # ------------------------------------------------------------------------------------------------------
    def _hook(self, unit: _Unit, events: list[_Event], module, args, kwargs, output):
        """Save the unit's inputs and outputs; return a clone of its outputs, so that an in-place op after the layer
        (ReLU(inplace=True), x += shortcut) changes the clone, not the tensor whose gradient is asked for (inputs
        are checked for in-place changes instead).

        A unit called on inputs of one sample while the batch has more (a position table looked up with ids of
        shape ``[1, L]`` and added to every sample) makes one output for all: its gradient would be the samples'
        sum. Its inputs and outputs are expanded to one copy per sample first (the output is then broadcast as it
        was), and each copy's gradient is that sample's. :meth:`_check` verifies that the copies stay apart."""
        leaves, spec = tree_flatten(output)
        given = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if self._untracked and self._batch > 1:
            for a in given:
                if _untracked_rows(a, self._batch) and a.untyped_storage().data_ptr() not in self._fixed:
                    raise NotPerSample(f"{unit.prefix or 'the model'} gets a table of {self._batch} rows that no sample's "
                                       "gradient reaches: rows of samples or not, the hooks cannot tell")
        self._made.setdefault(id(unit), set()).update(
            made_between([t.grad_fn for t in leaves if isinstance(t, torch.Tensor)], [t.grad_fn for t in given])
        )
        if unit.rule is not None and not args and "input" in kwargs:  # layer(input=x): the rules read args[0]
            kwargs = dict(kwargs)
            args = (kwargs.pop("input"),)
        inputs = [a for a in args if isinstance(a, torch.Tensor)]  # the copies are made of these
        outputs = [t for t in leaves if isinstance(t, torch.Tensor)]
        batch = self._batch
        shared = (
            batch > 1
            and bool(inputs)
            and bool(outputs)
            and len(inputs) == sum(isinstance(a, torch.Tensor) for a in tree_flatten((args, kwargs))[0])
            and all(t.dim() > 0 and t.shape[0] == 1 for t in (*inputs, *outputs))
        )
        if shared:
            self._expanded = True
            args = tuple(a.expand(batch, *a.shape[1:]) if isinstance(a, torch.Tensor) else a for a in args)
            leaves = [t.expand(batch, *t.shape[1:]) if isinstance(t, torch.Tensor) else t for t in leaves]
        clones = [t.clone() if isinstance(t, torch.Tensor) and t.requires_grad else t for t in leaves]
        saved_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        versions = [a._version for a in saved_args if isinstance(a, torch.Tensor)]
        unit.calls.append((saved_args, kwargs, leaves, versions))
        pairs = [(t, c) for t, c in zip(leaves, clones, strict=True) if isinstance(t, torch.Tensor) and t.requires_grad]
        single = len(pairs) == 1
        events += [
            _Event(t, t.grad_fn, c.grad_fn, True, single and not t._is_view(), t._version, shared) for t, c in pairs
        ]
        return tree_unflatten(clones, spec)

    @staticmethod
    def _stage_hook(events: list[_Event], module, args, kwargs, output):
        """A stage's output becomes a cut candidate (cloned like a unit's, so that one node passes it on: the
        gradient asked for is the one that reaches the clone); one passed through unchanged is not, nor a view (the
        clone would cut its alias: a write through it would no longer reach its base, and a write to its base would
        give it a new node)."""
        if not (isinstance(output, torch.Tensor) and output.requires_grad) or output._is_view():
            return None
        if any(output is a for a in (*args, *kwargs.values())) or any(output.grad_fn is e.node for e in events):
            return None
        clone = output.clone()
        events.append(_Event(output, output.grad_fn, clone.grad_fn, False, True, output._version))
        return clone

    def num_classes(self, x: torch.Tensor, params, constants, logits_of: Callable[[Any], torch.Tensor]) -> int:
        """The number of classes of the logits for inputs shaped like ``x`` (from :meth:`_probe`, once per input
        shape)."""
        return self._probe(x, params, constants, logits_of)[2]

    def add(
        self,
        x: torch.Tensor,
        draw: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        exact: bool,
        num_slots: int,
        params: dict[str, torch.Tensor],
        constants: dict[str, torch.Tensor],
        logits_of: Callable[[Any], torch.Tensor],
        fisher: dict[str, torch.Tensor],
    ) -> None:
        """Add this batch's weighted per-sample squares to ``fisher``: ``draw(probs [B, K])`` gives the class slots
        (``labels``, ``weights``, ``[B, num_slots]``); ``exact``: the slots are all classes weighted by the
        probabilities (then ``K - 1`` factor rows are used, ``num_slots = K - 1``). The probabilities come from the
        hooked forward pass itself when the batch is one chunk, else from a forward pass over the whole batch
        first (the slots are drawn once per batch). The cotangents are made per chunk of samples and group of
        slots."""
        if num_slots == 0:
            return
        self.touched = False  # until this batch adds to the Fisher: a NotPerSample leaves it as it was
        if not self.verified:
            self._check(x[:2], params, constants, logits_of)
        samples, slot_step = self._chunk(x, num_slots, params, constants, logits_of)

        def slots_of(logits: torch.Tensor) -> Callable[[range], tuple[torch.Tensor, torch.Tensor]]:
            probs = torch.softmax(logits.detach(), dim=-1)
            return partial(_cotangents, probs, *draw(probs), exact)

        with workspace(compiled=self.compiled):
            if samples >= x.shape[0]:
                self._add_chunk(x, slots_of, num_slots, slot_step, params, constants, logits_of, fisher)
                return
            with torch.no_grad():
                probs = torch.softmax(logits_of(functional_call(self.model, (params, constants), (x,))), dim=-1)
            labels, weights = draw(probs)
            for start in range(0, x.shape[0], samples):
                sl = slice(start, start + samples)
                chunk = partial(_cotangents, probs[sl], labels[sl], weights[sl], exact)
                self._add_chunk(
                    x[sl], lambda _, c=chunk: c, num_slots, slot_step, params, constants, logits_of, fisher
                )

    def _probe(self, x, params, constants, logits_of) -> _Sizes:
        """Floats of one sample's output gradients for one slot (all layers', the largest layer's, each unit's), and
        the number of classes, from a forward pass on one sample, once per input shape."""
        key = (tuple(x.shape[1:]), x.dtype)
        if key not in self._sizes:
            outputs: dict[int, list[torch.Tensor]] = {id(u): [] for u in self.units}

            def record(u: _Unit, module, args, output) -> None:
                outputs[id(u)] += [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.dim() > 0]

            hooks = [u.module.register_forward_hook(partial(record, u)) for u in self.units]
            try:
                with torch.no_grad():
                    logits = logits_of(functional_call(self.model, (params, constants), (x[:1],)))
            finally:
                for h in hooks:
                    h.remove()
            floats = [t[0].numel() for outs in outputs.values() for t in outs]
            units = [
                (sum(t[0].numel() for t in outputs[id(u)]), pair_positions(u.rule, outputs[id(u)])) for u in self.units
            ]
            self._sizes[key] = _Sizes(max(1, sum(floats)), max([1, *floats]), logits.shape[-1], units)
        return self._sizes[key]

    def _chunk(self, x, num_slots, params, constants, logits_of) -> tuple[int, int]:
        """Samples per forward chunk and slots per group of backward passes, so that the saved output gradients stay
        within GRADIENT_BUDGET, and those of the largest layer within LAYER_BUDGET for one slot (more slots of a
        layer are split into groups where the backward pass reaches it, :meth:`_tail`) or for all of
        them where its rule sums position pairs (whose cost each group would pay again: the rule's calls are taken
        together); the chunks are made as even as their number allows (sizes from :meth:`_probe`)."""
        sizes = self._probe(x, params, constants, logits_of)  # one sample, one slot
        pairs = max([1, *(n for n, positions in sizes.units if sums_pairs(positions, num_slots))])
        batch = x.shape[0]
        samples = min(
            batch,
            GRADIENT_BUDGET // (sizes.all * num_slots),
            LAYER_BUDGET // sizes.largest,
            LAYER_BUDGET // (pairs * num_slots),
        )
        samples = max(1, samples)
        samples = -(-batch // -(-batch // samples))  # ceil(batch / number of chunks)
        slots = max(1, min(num_slots, GRADIENT_BUDGET // (sizes.all * samples)))
        return samples, slots

    def _add_chunk(self, x, slots_of, num_slots, slot_step, params, constants, logits_of, fisher) -> None:
        """One forward pass over ``x``, then per group of slots: ``slots_of(logits)(slots)`` -> (cotangents on the
        logits ``[B, S', K]``, weights ``[B, S']``), the backward passes, the rules.

        The backward pass is split at the cuts of the graph (:mod:`hf_sp._graph_cuts`; a network's blocks, mostly):
        each part asks for the output gradients of the layers it crosses and for the gradient of the cut below,
        which starts the next part, and the layers whose gradients are all in are turned into squares at once, so
        that only one part's gradients are held at a time. From the first part that would hold more than
        LAYER_BUDGET of one layer's gradients on (:meth:`_tail`), the parts run one smaller group of slots at a
        time."""
        logits, events, replaced, taps, ops = self._forward(x, params, constants, logits_of, stages=True)
        self.batched_slots = self.batched_slots and not ops & MISBATCHED
        passes = self._passes(logits, events, replaced, taps)
        self.touched = True
        targets_of = {id(u): self._targets(u) for u in self.units}
        cotangents_of = slots_of(logits)
        tail, group = self._tail(passes, targets_of, min(slot_step, num_slots))
        if tail < len(passes) and group is None:  # the layers below cannot take the slots in groups: all take them so
            slot_step = min(slot_step, self._group_size(passes[tail:]))
        for s0 in range(0, num_slots, slot_step):
            slots = range(s0, min(num_slots, s0 + slot_step))
            cot, weights = cotangents_of(slots)
            ws = weights.T.contiguous().to(logits.dtype)  # [S', B]
            last = slots.stop == num_slots
            pending = [u for u in self.units if targets_of[id(u)]]
            by_target: dict[int, torch.Tensor] = {}
            start, grad = logits, cot.to(logits.dtype).movedim(1, 0)  # [S', B, K]
            head = passes if group is None else passes[:tail]
            for part in head:
                start, grad, pending = self._add_part(part, start, grad, ws, last, taps, pending, targets_of, by_target,
                                                      params, constants, fisher)
            if group is not None:  # the rest of the backward pass one group of slots at a time
                for g0 in range(0, len(slots), group):
                    sl = slice(g0, g0 + group)
                    sub_start, sub_grad, sub_pending, sub_targets = start, grad[sl], list(pending), {}
                    for part in passes[tail:]:
                        sub_start, sub_grad, sub_pending = self._add_part(
                            part, sub_start, sub_grad, ws[sl], last and g0 + group >= len(slots), taps, sub_pending,
                            targets_of, sub_targets, params, constants, fisher,
                        )
                    del sub_targets, sub_grad
            del by_target, grad
        for u in self.units:
            u.calls.clear()

    def _add_part(self, part, start, grad, ws, last, taps, pending, targets_of, by_target, params, constants, fisher):
        """One part of the backward pass (:meth:`_passes`) for the slots of ``grad`` (``[S', B, ...]`` on
        ``start``, weights ``ws`` ``[S', B]``): the gradients it asks for, the squares of its taps and of the units
        whose gradients are all in. Returns where the next part starts, its gradient, and the units still waiting."""
        targets, cut, tapped = part
        wanted = targets + ([] if cut is None or any(cut is t for t in targets) else [cut])
        got = self._backward(start, wanted + [taps[n] for n in tapped], grad, last)
        by_target.update((id(t), g) for t, g in zip(wanted, got[: len(wanted)], strict=True))
        for n, g in zip(tapped, got[len(wanted) :], strict=True):
            # g: [S, B, *p.shape[1:]], the per-sample gradients of the parameter
            sq = torch.einsum("sb...,sb->...", g.square(), ws.to(g.dtype))
            fisher[n] += sq.reshape(fisher[n].shape).to(fisher[n].dtype)
        if cut is not None:  # the next part starts there; a stage's gradient is no unit's
            start, grad = cut, by_target[id(cut)] if targets and cut is targets[0] else by_target.pop(id(cut))
        del got
        return start, grad, self._add_ready(pending, targets_of, by_target, ws, params, constants, fisher)

    @staticmethod
    def _group_size(parts) -> int:
        """Slots whose output gradients stay within LAYER_BUDGET in every layer of ``parts`` (and at the cut where
        each one stops)."""
        sizes = [t.numel() for targets, cut, _ in parts for t in (*targets, *([] if cut is None else [cut]))]
        return max(1, LAYER_BUDGET // max([1, *sizes]))

    def _tail(self, passes, targets_of, num_slots: int) -> tuple[int, int | None]:
        """Where the backward pass starts to hold more than LAYER_BUDGET of one layer's output gradients for
        ``num_slots`` slots (an index into ``passes``; their number if nowhere), and the size of the groups of slots
        that take the passes from there on (``None`` where no part needs them, or where a unit has outputs on both
        sides of that point: then all passes take the slots in such groups). The slots can be grouped from there on
        when the units met there have all their outputs there."""
        tail = next((k for k in range(len(passes)) if self._group_size(passes[k : k + 1]) < num_slots), len(passes))
        if tail == len(passes):
            return tail, None
        below = {id(t) for targets, _, _ in passes[tail:] for t in targets}
        for u in self.units:
            targets = targets_of[id(u)]
            inside = [id(t) in below for t in targets]
            if any(inside) and not all(inside):
                return tail, None
        return tail, self._group_size(passes[tail:])

    def _forward(self, x, params, constants, logits_of, stages: bool) -> tuple[Any, list[_Event], dict, dict]:
        """The hooked forward pass over ``x``: (logits, events, the per-sample copies of the broadcast parameters,
        their taps ``[B, ...]``: zeros whose gradients are the per-sample gradients); the units' calls are saved
        and checked (:meth:`_check_calls`), the stages hooked if ``stages``."""
        batch = x.shape[0]
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        taps = {
            n: torch.zeros(batch, *params[n].shape[1:], dtype=params[n].dtype, device=x.device, requires_grad=True)
            for n in self.replicas
        }
        replaced = {n: leaves[n].expand(batch, *leaves[n].shape[1:]) + taps[n] for n in self.replicas}
        events: list[_Event] = []
        handles = [u.module.register_forward_hook(partial(self._hook, u, events), with_kwargs=True) for u in self.units]
        if stages:
            handles += [m.register_forward_hook(partial(self._stage_hook, events), with_kwargs=True) for m in self.stages]
        for u in self.units:
            u.calls.clear()
        self._batch, self._expanded, self._made = batch, False, {}
        self._untracked = x.is_floating_point()  # a float tensor without a gradient then comes from no sample's
        self._fixed = _storages((*leaves.values(), *constants.values()))  # the model's own tensors
        try:
            with torch.enable_grad():
                inp = x.detach().requires_grad_(True) if x.is_floating_point() else x
                logits = logits_of(functional_call(self.model, ({**leaves, **replaced}, constants), (inp,)))
        except Exception as error:
            if not self._expanded or isinstance(error, NotPerSample):
                raise
            # the model reshapes or unpacks a shared output as one sample's (.view(L, D)): no copies for it
            raise NotPerSample(f"per-sample copies of a shared output broke the forward pass: {error}") from error
        finally:
            self._batch = 0
            for h in handles:
                h.remove()
        self._check_calls(batch, events)
        nodes = set() if logits.grad_fn is None else reachable(logits.grad_fn)
        ops = graph_ops(nodes)
        made, self._made = self._made, {}
        self._check_parameter_uses(nodes, leaves, made)
        return logits, events, replaced, taps, ops

    def _check_parameter_uses(self, nodes: set, leaves: dict[str, torch.Tensor], made: dict[int, set]) -> None:
        """Raise :class:`NotPerSample` if a unit's parameter is used by an op outside the unit's calls (a weight tied by
        ``h @ emb.weight.T``, ``F.linear(x, head.weight)``, a parametrization): the hooks see only the calls. A call
        that changes its input in place with the parameter (``x.mul_(gamma)``) looks the same: the op becomes the
        input's own node, where the call's nodes stop."""
        owner = {id(leaves[full]): (u, full) for u in self.units for full in u.names.values()}
        for node in nodes:
            for child, _ in node.next_functions:
                variable = getattr(child, "variable", None)
                if variable is None or id(variable) not in owner:
                    continue
                unit, name = owner[id(variable)]
                if node not in made.get(id(unit), ()):
                    raise NotPerSample(
                        f"{name} is used outside the calls of {unit.prefix or 'the model'}, or a call changed its input in "
                        "place (as LayerScale(inplace=True) does)"
                    )

    def _check_calls(self, batch: int, events: list[_Event]) -> None:
        """Raise :class:`NotPerSample` if a unit's saved input was changed in place, a unit saw other than ``batch``
        samples, made rows of the batch from none of the samples' (only from the model's own tensors: a table whose
        length equals the batch) or a hooked output was changed in place after the forward pass went
        on."""
        for u in self.units:
            for saved, kwargs, out_leaves, versions in u.calls:
                if [a._version for a in saved if isinstance(a, torch.Tensor)] != versions:
                    raise NotPerSample(f"the input of {u.prefix or 'the model'} was changed in place")
                sizes = {t.shape[0] for t in (*saved, *out_leaves) if isinstance(t, torch.Tensor) and t.dim() > 0}
                if sizes - {batch}:  # e.g. windows of the samples folded into the batch dimension (Swin)
                    raise NotPerSample(f"{u.prefix or 'the model'} sees a batch of {sorted(sizes)}, not {batch} samples")
                if any(isinstance(t, torch.Tensor) and t.dim() == 0 and t.requires_grad for t in out_leaves):
                    raise NotPerSample(f"{u.prefix or 'the model'} makes one scalar for all samples")
                rows = batch > 1 and any(isinstance(t, torch.Tensor) and t.dim() > 0 and t.requires_grad for t in out_leaves)
                if rows and not any(_per_sample_arg(a, batch, self._fixed) for a in tree_flatten((saved, kwargs))[0]):
                    raise NotPerSample(f"{u.prefix or 'the model'} makes rows of the batch from none of the samples'")
        if any(e.tensor._version != e.version for e in events):
            # the model kept a layer's or a stage's output and changed it in place: the clone that went on missed it
            raise NotPerSample("an output kept by the model was changed in place after the forward pass went on")

    @staticmethod
    def _targets(u: _Unit) -> list[torch.Tensor]:
        return [t for call in u.calls for t in call[2] if isinstance(t, torch.Tensor) and t.requires_grad]

    def _passes(self, logits, events, replaced, taps) -> list[tuple[list[torch.Tensor], torch.Tensor | None, list[str]]]:
        """The parts of the backward pass, from the logits down: (the unit outputs it asks for, the cut where it
        stops or ``None``, the per-sample copies it asks for)."""
        sources = [replaced[n].grad_fn for n in taps] + [e.source for e in events]
        first = len(taps)
        ways = {first + i: e.node for i, e in enumerate(events) if e.cut}
        sizes = {i: t.numel() for i, t in enumerate(taps.values())}
        sizes.update({first + i: e.tensor.numel() for i, e in enumerate(events) if e.target})
        cuts = [] if logits.grad_fn is None else cut_points(logits.grad_fn, sources, ways, sizes, PART_FLOATS)
        bounds = [first, *cuts, len(sources)]
        passes = []
        for k in reversed(range(len(bounds) - 1)):
            part = events[bounds[k] - first : bounds[k + 1] - first]
            cut = events[bounds[k] - first].tensor if k > 0 else None
            passes.append(([e.tensor for e in part if e.target], cut, list(taps) if k == 0 else []))
        return passes

    def _add_ready(self, pending: list[_Unit], targets_of, by_target, w, params, constants, fisher) -> list[_Unit]:
        """Turn the units whose output gradients are all in into squares, drop their gradients; the rest wait."""
        waiting = []
        for u in pending:
            targets = targets_of[id(u)]
            if not all(id(t) in by_target for t in targets):
                waiting.append(u)
                continue
            if u.rule is not None:
                self._add_rule(u, by_target, w, fisher)
            else:
                self._add_fallback(u, by_target, w, params, constants, fisher)
            for t in targets:
                by_target.pop(id(t), None)
        return waiting

    def _backward(self, start, wanted, grad, last: bool) -> list[torch.Tensor]:
        """``got[t][s]``: the gradient of ``wanted[t]`` for the cotangent ``grad[s]`` on ``start`` (``[S, ...]``
        each).
        The slots go through one backward pass batched by :func:`torch.func.vmap` (every op runs once over all of
        them, and its result is used as it comes; ``is_grads_batched`` runs on the legacy vmap, which has no batching
        rule for convolutions, norms or GELU and runs those once per slot) where the graph allows, else one pass
        each."""
        num_slots = grad.shape[0]
        if self.batched_slots:

            def one(cotangent: torch.Tensor) -> tuple[torch.Tensor, ...]:
                return torch.autograd.grad(
                    start, wanted, cotangent, retain_graph=True, allow_unused=True, materialize_grads=True
                )

            try:  # the graph is kept: a failed pass (out of memory too) falls back on it
                return list(vmap(one)(grad))
            except RuntimeError:  # an op the batched pass cannot take, or out of memory: one pass per slot from now on
                self.batched_slots = False
        # Each slot's gradients are copied into [S, ...] buffers as they come and freed: stacking them at the end
        # would hold every slot twice.
        buffers = [t.new_empty(num_slots, *t.shape) for t in wanted]
        for s in range(num_slots):
            grads = torch.autograd.grad(
                start, wanted, grad[s], retain_graph=not last or s < num_slots - 1, allow_unused=True
            )
            for buf, g in zip(buffers, grads, strict=True):
                if g is None:
                    buf[s].zero_()
                else:
                    buf[s].copy_(g)
            del grads
        return buffers

    def _add_rule(self, u: _Unit, by_target, w, fisher) -> None:
        inputs, outs = [], []
        for saved, _, out_leaves, _ in u.calls:
            (out,) = [t for t in out_leaves if isinstance(t, torch.Tensor)]
            if id(out) not in by_target:
                continue
            inputs.append(saved[0])
            outs.append(by_target[id(out)])
        if not outs:
            return
        for local, value in u.rule(u.module, inputs, outs, w.to(outs[0].dtype)).items():
            if local in u.names:
                name = u.names[local]
                fisher[name] += value.to(fisher[name].dtype)

    def _add_fallback(self, u: _Unit, by_target, w, params, constants, fisher) -> None:
        """Per-sample gradients of the unit's parameters by torch.func over its own saved calls."""
        prefix = f"{u.prefix}." if u.prefix else ""
        local = {loc: params[full].detach() for loc, full in u.names.items()}
        rest = {k[len(prefix) :]: v for k, v in constants.items() if k.startswith(prefix)}
        rest.update(
            {
                k[len(prefix) :]: v.detach()
                for k, v in params.items()
                if k.startswith(prefix) and k[len(prefix) :] not in local
            }
        )
        slots = w.shape[0]
        totals = {loc: None for loc in local}
        per_call = []
        for saved, kwargs, out_leaves, _ in u.calls:
            outs = [t for t in out_leaves if isinstance(t, torch.Tensor) and t.requires_grad]
            cots = [by_target.get(id(t)) for t in outs]
            if all(c is None for c in cots):
                continue
            idx = [i for i, t in enumerate(t for t in out_leaves if isinstance(t, torch.Tensor)) if t.requires_grad]
            per_call.append((saved, kwargs, outs, cots, idx))
        for s in range(slots):
            per_sample_sum: dict[str, torch.Tensor] = {}
            for saved, kwargs, outs, cots, idx in per_call:
                batch = outs[0].shape[0]  # the inputs may all be keywords; the outputs are the samples' (_check_calls)
                flat_args, spec = tree_flatten((saved, kwargs))
                dims = [0 if _per_sample_arg(a, batch, self._fixed) else None for a in flat_args]

                def one(p, *flat, _spec=spec, _module=u.module, _idx=idx, _dims=dims):
                    args, kw = tree_unflatten(
                        [
                            a.unsqueeze(0) if isinstance(a, torch.Tensor) and d == 0 else a
                            for a, d in zip(flat, _dims, strict=True)
                        ],
                        _spec,
                    )
                    out = functional_call(_module, (p, rest), args, kw)
                    leaves = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
                    return tuple(leaves[i].squeeze(0) for i in _idx)

                cot = [torch.zeros_like(o) if c is None else c[s] for o, c in zip(outs, cots, strict=True)]

                def sample_grad(c, *flat):
                    _, fn = vjp(lambda p: one(p, *flat), local)
                    return fn(tuple(c))[0]

                g = vmap(sample_grad, in_dims=(0, *dims))(cot, *flat_args)
                for loc, v in g.items():
                    per_sample_sum[loc] = v if loc not in per_sample_sum else per_sample_sum[loc] + v
            for loc, v in per_sample_sum.items():
                sq = torch.einsum("b...,b->...", v.square(), w[s].to(v.dtype))
                totals[loc] = sq if totals[loc] is None else totals[loc] + sq
        for loc, v in totals.items():
            if v is not None:
                fisher[u.names[loc]] += v.to(fisher[u.names[loc]].dtype)

    def _check(self, x, params, constants, logits_of) -> None:
        """Check on two samples ``x`` that the hooks see them apart, before the first batch of two samples or more
        is added, whatever the model:

        * every unit sees both, as the first dimension of its inputs and outputs (:meth:`_check_calls`): a layer
          whose first dimension is another (a sequence-first layout, ``nn.MultiheadAttention``'s default; position
          ids ``arange(L)`` looked up without a batch dimension) would take positions for samples in a batch of as
          many samples as positions, where the sizes cannot tell them apart;
        * the logits of each sample in the batch, per-sample copies included, are the logits it gets alone: an op
          that mixes the samples outside the units (``h + h.mean(0)``), or a unit on ``x[:1]`` or ``x.mean(0)``
          that looks shared but is not one sample's;
        * the gradient of each sample's logits lands on its own copies only (of broadcast parameters, and of shared
          outputs, :meth:`_hook`).

        Copies of parameters that fail it (a model that repeats its ``[1, ...]`` parameter over the batch instead
        of broadcasting it) are given up for torch.func on the modules that hold them, and the check is made again;
        :class:`NotPerSample` if it still fails. One sample cannot show mixing: the next batch is checked."""
        if x.shape[0] < 2:
            return
        try:
            self._check_copies(x, params, constants, logits_of)
        except Unsupported:
            raise
        except Exception as error:  # NotPerSample, or the copies broke the forward pass
            if self.replicas:
                self._build(copies=False)
                self._check(x, params, constants, logits_of)
                return
            if isinstance(error, NotPerSample):
                raise
            raise NotPerSample(f"the hooked forward pass failed: {error}") from error
        self._checked = True

    def _check_copies(self, x, params, constants, logits_of) -> None:
        """The forward pass, logits and gradients of :meth:`_check`."""
        try:
            logits, events, _, taps, _ = self._forward(x, params, constants, logits_of, stages=False)
        finally:
            for u in self.units:
                u.calls.clear()
        with torch.no_grad():
            alone = [logits_of(functional_call(self.model, (params, constants), (x[i : i + 1],))) for i in (0, 1)]
        plain = torch.cat(alone)
        # batched and one-sample kernels round differently: a tolerance of sqrt(eps) of the parameters' precision
        tol = torch.finfo(next(iter(params.values())).dtype).eps ** 0.5
        scale = float(plain.abs().amax())
        if plain.shape != logits.shape or not torch.allclose(plain, logits.detach(), rtol=tol, atol=tol * scale):
            raise NotPerSample("the samples' logits in a batch with per-sample copies differ from their logits alone")
        copies = [*taps.values(), *(e.tensor for e in events if e.shared)]
        if not copies:
            return
        ramp = torch.linspace(1.0, 2.0, logits.shape[-1], dtype=logits.dtype, device=logits.device)
        for sample in (0, 1):  # each sample's gradient on its own copies only (a copy picked by [0] or [-1] fails)
            cot = torch.zeros_like(logits)
            cot[sample] = ramp
            for g in torch.autograd.grad(logits, copies, cot, retain_graph=sample == 0, allow_unused=True):
                if g is not None and bool(g[1 - sample].abs().amax() > 0):
                    raise NotPerSample("a per-sample copy mixes samples")
