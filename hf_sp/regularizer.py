"""Applies a starting-point penalty at optimizer-step time, with the anchor kept in the optimizer state.

Why at step time: the penalty's gradient is added once per optimizer step, after the gradients
of all accumulation micro-batches are summed, after DDP averaged them and after a gradient scaler
unscaled them. So it is exact under gradient accumulation (whatever the model does with loss
kwargs), is never multiplied by the world size, and sees the parameters exactly as the optimizer
does (sharded DTensors under FSDP2, fp32 partitions under DeepSpeed).

Why in the optimizer state: ``w0`` is captured once, from the pretrained weights, at the first
step of a fresh run, and lives in ``optimizer.state[p]["sp_anchor"]``, sharded like ``p``. It is
saved and restored with every checkpoint by the machinery that already handles optimizer state,
so a resumed run keeps its original anchor and never re-anchors on fine-tuned weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .penalties import get_penalty, get_penalty_info
from .penalties._compiled import CompiledStep
from .penalties._registry import sum_of_squares
from .penalties.l2 import L2
from .selection import ParamSplit, canonical_name

logger = logging.getLogger(__name__)

ANCHOR_KEY = "sp_anchor"
FISHER_KEY = "sp_fisher"
ROLE_KEY = "sp_role"
NAMES_KEY = "sp_names"
MODES = ("gradient", "decoupled")
_OWN_KEYS = {ANCHOR_KEY, FISHER_KEY}

#: Elements per multi-tensor call: bounds the temporary ``w - w0`` buffers to 64 MiB of fp32.
CHUNK_NUMEL = 1 << 24
#: Steps whose penalty values are kept one by one before they are summed into the logging window (and checked
#: for divergence): bounds the memory of a run that never logs, and stops a diverged run within this many steps.
FOLD_STEPS = 32


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _first_param(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    return next(p for g in optimizer.param_groups for p in g["params"])


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision parameters (the anchor and penalty never go below fp32), else their own."""
    return torch.promote_types(dtype, torch.float32)


def _chunks(items: list, sizes: list[int], limit: int) -> Iterator[list]:
    chunk, total = [], 0
    for item, size in zip(items, sizes, strict=True):
        if chunk and total + size > limit:
            yield chunk
            chunk, total = [], 0
        chunk.append(item)
        total += size
    if chunk:
        yield chunk


def _unscale_grads(optimizer: torch.optim.Optimizer) -> None:
    """Divide the gradients by ``optimizer.grad_scale`` now, as ``GradScaler.unscale_`` does, and tell the kernel.

    The fused kernel would divide every gradient by the loss scale, a penalty gradient added to the still-scaled
    gradients included, which would then vanish. Unscaling first makes the step the same, bit for bit, as with an
    unscaled (or non-fused) optimizer. GradScaler reads no gradient after this point; it deletes the attribute.
    """
    inv_scale = optimizer.grad_scale.double().reciprocal().float()
    grads: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                g = _local(p.grad)
                grads.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), tensors in grads.items():
        torch._foreach_mul_(tensors, inv_scale.to(device))
    optimizer.grad_scale = None


def _names_by_id(named_params: Iterable[tuple[str, nn.Parameter]]) -> dict[int, str]:
    return {id(p): canonical_name(n) for n, p in named_params}


def add_frozen_tensors(
    optimizer: torch.optim.Optimizer, named_params: Iterable[tuple[str, nn.Parameter]], split: ParamSplit
) -> None:
    """Add to ``optimizer``, in one group with its defaults, the tensors of ``split`` that it lacks.

    Trainer builds its optimizer from the tensors with ``requires_grad`` only; one frozen now and unfrozen later
    (gradual unfreezing) must still train, with the penalty of its role. While frozen it gets no gradient, hence
    no update and no penalty.
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [p for n, p in named_params if id(p) not in held and canonical_name(n) in split.shapes]
    if missing:
        optimizer.add_param_group({"params": missing})


def keep_saved_precision(optimizer: torch.optim.Optimizer, keys: set[str]) -> None:
    """Hooks on ``optimizer.load_state_dict`` that put the entries of its state under ``keys`` (read at each load)
    back as they were saved: torch casts floating state to each parameter's dtype, so bf16 weights would get bf16
    anchors and starts. A saved state's key is the id its groups list the tensor by (an index, or a name from
    torch.distributed.checkpoint), matched to the parameters in the order of the groups, as torch matches them."""
    stashed: dict[tuple[Any, str], torch.Tensor] = {}
    saved_ids: list[Any] = []

    def stash(opt: torch.optim.Optimizer, state_dict: dict) -> None:
        stashed.clear()
        saved_ids[:] = [i for g in state_dict["param_groups"] for i in g["params"]]
        for index, state in state_dict["state"].items():
            stashed.update({(index, k): v for k, v in state.items() if k in keys and isinstance(v, torch.Tensor)})

    def restore(opt: torch.optim.Optimizer) -> None:
        params = dict(zip(saved_ids, (p for g in opt.param_groups for p in g["params"]), strict=False))
        for (index, key), value in stashed.items():
            if index in params:  # torch too ignores a saved state that no group lists
                opt.state[params[index]][key] = value.to(device=params[index].device)
        stashed.clear()

    optimizer.register_load_state_dict_pre_hook(stash)
    optimizer.register_load_state_dict_post_hook(restore)


class MissingAnchorError(RuntimeError):
    """The optimizer state has no anchor where one is required (a resume from a foreign checkpoint)."""


class SPRegularizer:
    """Adds ``alpha * dOmega(w_S)/dw + beta * w_Sbar`` to the gradients (or steps toward w0) at each step.

    Args:
        penalty: registered penalty name (see :func:`hf_sp.list_penalties`), not ``"none"``.
        alpha: strength toward ``w0`` on the anchored tensors.
        beta: strength of the L2 toward zero on the new (head) tensors.
        split: which parameters are anchored, new or free.
        mode: ``"gradient"`` adds the penalty's exact gradient to the loss gradient (the paper,
            any optimizer); ``"decoupled"`` moves the weights by ``-lr * alpha * dOmega/dw``
            beside the optimizer's own update, as AdamW decouples weight decay.
        fisher: diagonal Fisher per anchored parameter name, for ``l2_sp_fisher``.
        all_reduce: sums shard-local tensors across ranks (sharded engines: FSDP2, DeepSpeed); it is called
            on every rank at the same step, every :data:`FOLD_STEPS` steps and at each log and checkpoint.
        compile: step the anchored tensors with one kernel compiled by ``torch.compile``
            (:mod:`hf_sp.penalties._compiled`: one pass over each entry) instead of the eager kernels;
            elementwise penalties only.
    """

    def __init__(
        self,
        penalty: str,
        alpha: float,
        beta: float,
        split: ParamSplit,
        mode: str = "gradient",
        fisher: Mapping[str, torch.Tensor] | None = None,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        compile: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"sp_mode={mode!r} is not one of {MODES}.")
        self.info = get_penalty_info(penalty)
        self.penalty = get_penalty(penalty)
        self.head_penalty = L2()
        #: The one-pass compiled step of the anchored tensors (``compile=True``), else ``None`` (eager kernels).
        self.compiled = CompiledStep(self.penalty) if compile else None
        self.alpha, self.beta, self.mode, self.split = float(alpha), float(beta), mode, split
        self.fisher = dict(fisher) if fisher is not None else None
        if self.info.needs_fisher and self.fisher is None:
            raise ValueError(f"sp_penalty={penalty!r} needs a Fisher diagonal; none was given.")
        #: Set by the trainer: may the next step capture ``w0`` from the current weights?
        self.capture_allowed = False
        self._pending: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        #: Anchors lifted out of the state of tensors that the optimizer has not initialised yet, for one step (and the
        #: placeholders of :meth:`_fill_empty_state`, put in after the optimizer filled the state).
        self._parked: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        #: Tensors the optimizer has stepped with their anchor lifted out once: no need to lift it again.
        self._initialised: set[torch.Tensor] = set()
        self.all_reduce = all_reduce
        #: Per-step (alpha-free body value, head value, ||w_S - w0_S||^2), shard-local, not yet folded.
        self._records: list[torch.Tensor] = []
        #: Sums of (body value, head value, ||w_S - w0_S||) over the folded steps of the logging window.
        self._window = torch.zeros(3, dtype=torch.float64)
        self._window_steps = 0
        self._hooked: set[int] = set()
        #: Whether the state holds placeholders of :meth:`_fill_empty_state` that a load may not have replaced yet.
        self._placeholders = False
        #: The engine step under way. DeepSpeed ZeRO-3 calls ``optimizer.step()`` once per sub-group, each time with
        #: that partition alone in its group's ``params``: the calls of one engine step add up to one record
        #: (``_partial``), and a capture made in one holds for the others (``_captured``). ``_firsts``: the first
        #: tensor of each call so far, by id; a call whose first tensor is among them begins the next step.
        self._firsts: set[int] = set()
        self._partial: torch.Tensor | None = None
        self._captured = False

    # ----------------------------------------------------------------------------------------
    # Optimizer wiring
    def prepare_optimizer(
        self,
        optimizer: torch.optim.Optimizer,
        named_params: Iterable[tuple[str, nn.Parameter]],
        *,
        add_frozen: bool = False,
    ) -> list[int]:
        """Split every param group by role (anchored / new / free) and hook the optimizer's step.

        Call before the first step. Each resulting group keeps the original group's settings and
        records its role and parameter names, which survive engines that rebuild the parameters.
        ``add_frozen`` adds the floating tensors that the optimizer lacks (Trainer leaves out those frozen
        when it builds the optimizer), with the optimizer's defaults: they get no gradient, hence no update
        and no penalty, while frozen, and train with their penalty once unfrozen.
        Returns the index of the original group of each new group (for :func:`hf_sp.schedulers.follow_split_groups`);
        an added group of frozen tensors counts as one more original group.
        """
        if any(optimizer.state.values()):
            raise RuntimeError("prepare_optimizer must be called before the optimizer's first step.")
        named_params = list(named_params)
        names = _names_by_id(named_params)
        if add_frozen:
            add_frozen_tensors(optimizer, named_params, self.split)
        groups, origins = [], []
        for index, group in enumerate(optimizer.param_groups):
            by_role: dict[str, list] = {"anchored": [], "new": [], "free": []}
            for p in group["params"]:
                name = names.get(id(p))
                by_role[self.split.role(name) if name else "free"].append(p)
            for role, params in by_role.items():
                if params:
                    groups.append(
                        {**group, "params": params, ROLE_KEY: role, NAMES_KEY: [names.get(id(p)) for p in params]}
                    )
                    origins.append(index)
        optimizer.param_groups = groups
        if id(optimizer) not in self._hooked:
            optimizer.register_step_pre_hook(self._pre_step)
            optimizer.register_step_post_hook(self._post_step)
            keep_saved_precision(optimizer, _OWN_KEYS)  # fp32 anchors of bf16 weights stay fp32 through a resume
            self._hooked.add(id(optimizer))
        return origins

    def check_weight_decay(
        self, optimizer: torch.optim.Optimizer, named_params: Iterable[tuple[str, nn.Parameter]]
    ) -> None:
        """Refuse an optimizer's own ``weight_decay`` on penalized (anchored or new) tensors.

        A decay toward zero on top of the penalty silently changes the method, whoever set it: ``SPConfig`` refuses
        ``weight_decay``, and this refuses it in an optimizer built by the user (``torch.optim.AdamW`` decays by
        0.01 unless told otherwise).
        """
        names = _names_by_id(named_params)
        for index, group in enumerate(optimizer.param_groups):
            decay = group.get("weight_decay") or 0.0
            penalized = [names[id(p)] for p in group["params"] if self.split.role(names.get(id(p), "")) != "free"]
            if decay and penalized:
                raise ValueError(
                    f"The optimizer's param group {index} has weight_decay={decay}, which would decay "
                    f"{penalized[0]!r} ({len(penalized)} penalized tensors in all) toward zero on top of "
                    f"sp_penalty={self.info.name!r}. Build the optimizer with weight_decay=0.0 (e.g. "
                    "torch.optim.AdamW(params, weight_decay=0.0)): sp_alpha regularizes the pretrained tensors and "
                    "sp_beta the new head."
                )

    @property
    def _state_keys(self) -> tuple[str, ...]:
        """The optimizer-state entries of an anchored tensor: its anchor, and its Fisher where the penalty needs it."""
        return (ANCHOR_KEY, FISHER_KEY) if self.info.needs_fisher else (ANCHOR_KEY,)

    def missing_anchors(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """Names of anchored parameters whose optimizer state lacks the anchor (or the Fisher it needs), or still
        holds a placeholder of :meth:`_fill_empty_state` that a checkpoint did not replace. With ``all_reduce``
        (sharded engines) it is a collective, to be called on every rank: a rank whose own shards are complete
        (or empty) reports ``"(another rank's shard)"`` where another rank's are not, so that all ranks agree."""
        keys = self._state_keys
        missing = []
        for group in optimizer.param_groups:
            if group.get(ROLE_KEY) == "anchored":
                for n, p in zip(group[NAMES_KEY], group["params"], strict=True):
                    state = optimizer.state[p]
                    absent = any(k not in state for k in keys)
                    if absent or (self._placeholders and any(bool(_local(state[k]).isnan().any()) for k in keys)):
                        missing.append(n or "?")
        if self.all_reduce is not None:
            count = torch.tensor(float(len(missing)), device=_local(_first_param(optimizer)).device)
            if float(self.all_reduce(count)) > 0 and not missing:
                missing = ["(another rank's shard)"]
        return missing

    # ----------------------------------------------------------------------------------------
    # The step
    def _capture(self, name: str | None, p: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.capture_allowed:
            raise MissingAnchorError(
                f"Parameter {name!r} has no starting-point anchor in the optimizer state. This happens when "
                "resuming from a checkpoint that was not written by SPTrainer, or when train() is called again on a "
                "model that was already fine-tuned. Resume from a checkpoint written by SPTrainer, or start from "
                "the pretrained model."
            )
        entry = {ANCHOR_KEY: p.detach().to(_compute_dtype(p.dtype), copy=True)}
        if self.info.needs_fisher:
            entry[FISHER_KEY] = self._fisher_for(name, p)
        self._pending[p] = entry
        return entry

    def _fisher_for(self, name: str | None, p: torch.Tensor) -> torch.Tensor:
        fisher = self.fisher.get(name) if (self.fisher is not None and name is not None) else None
        if fisher is None:
            raise ValueError(
                f"The Fisher diagonal has no entry for anchored parameter {name!r}. Estimate it on this model "
                "(hf_sp.estimate_fisher) or check sp_head_modules / sp_include."
            )
        if tuple(fisher.shape) != tuple(p.shape):
            raise ValueError(
                f"Fisher entry {name!r} has shape {tuple(fisher.shape)}, the parameter {tuple(p.shape)}: it was "
                "estimated for another model. Re-estimate it with hf_sp.estimate_fisher on this model."
            )
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            fisher = fisher.to(device=_local(p).device, dtype=_compute_dtype(p.dtype))
            return distribute_tensor(fisher, p.device_mesh, p.placements)
        # The parameter's memory layout (channels_last, say), as the anchor has: one loop for sp_compile.
        return torch.empty_like(p, dtype=_compute_dtype(p.dtype)).copy_(fisher)

    def _state(self, optimizer, name, p) -> dict[str, torch.Tensor]:
        if p in self._parked:
            return self._parked[p]
        state = optimizer.state.get(p, {})
        if ANCHOR_KEY in state:
            if state.keys() <= _OWN_KEYS and p not in self._initialised:
                # The anchor was taken before this tensor's first gradient: torch's optimizers initialise a tensor's
                # state when it is empty (``len(state) == 0``), so it is lifted out for this step and put back after.
                self._parked[p] = dict(state)
                state.clear()
                return self._parked[p]
            return state
        return self._pending.get(p) or self._capture(name, p)

    def _names(self, group: dict) -> list[str | None]:
        """The parameter names of an anchored or new group, ``None`` each where the engine flattened the group."""
        names = group.get(NAMES_KEY) or []
        if len(names) == len(group["params"]):
            return names
        # The engine flattened the group (DeepSpeed ZeRO): elementwise penalties need no names.
        if not self.info.elementwise or self.info.needs_fisher:
            raise RuntimeError(
                f"sp_penalty={self.info.name!r} needs to know which tensor is which, but the training "
                "engine flattened the optimizer's parameter groups (DeepSpeed ZeRO). Use an elementwise "
                "penalty (l2, l2_sp, l1_sp) with this engine, or FSDP2."
            )
        return [None] * len(group["params"])

    def _capture_all(self, optimizer: torch.optim.Optimizer) -> None:
        """Take ``w0`` of every anchored tensor, with or without a gradient at this first step.

        A tensor that gets no gradient now (frozen for a while by gradual unfreezing, an unused branch) is not
        moved by this step either, so its weights now are its pretrained ones.
        """
        for group in optimizer.param_groups:
            if group.get(ROLE_KEY) == "anchored":
                for name, p in zip(self._names(group), group["params"], strict=True):
                    if ANCHOR_KEY not in optimizer.state.get(p, {}) and p not in self._pending:
                        self._capture(name, p)

    def _fills_empty_state(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether this step is the one that ``torch.distributed.checkpoint`` takes to fill an empty optimizer
        state before it saves or loads one (``_init_optim_state``; accelerate's FSDP2 checkpoints): the state empty
        (no anchor taken yet), every learning rate and every gradient zero. It moves nothing, and must take no
        anchor (on a resume, the checkpoint's are loaded next), add nothing and record nothing. A real first step
        with a learning rate of zero (a warm-up's) has gradients. The gradients' check is summed over ranks, so that
        every rank decides alike; it runs only where the rest holds, and after the first step the state is not
        empty: one look."""
        groups = optimizer.param_groups
        if optimizer.state or self._pending:
            return False
        # torch's fill sets every "lr" to 0.0; a real step may have none (Adafactor's relative step: lr=None)
        if any(g["lr"] is None or float(g["lr"]) != 0.0 for g in groups if "lr" in g):
            return False
        grads = [_local(p.grad) for g in groups for p in g["params"] if p.grad is not None]
        nonzero = torch.tensor(float(any(bool(t.any()) for t in grads)), device=_local(_first_param(optimizer)).device)
        if self.all_reduce is not None:
            nonzero = self.all_reduce(nonzero)
        return not bool(nonzero)

    def _fill_empty_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Anchors for the state that torch.distributed.checkpoint fills (:meth:`_fills_empty_state`), since a load
        fills only the keys of that state: taken from the weights where capture is allowed (no step was taken: they
        are the pretrained ones), else placeholders of NaN, sharded like the parameters, that the checkpoint's
        anchors replace. One that is left counts as missing (:meth:`missing_anchors`) and is refused at the next
        step."""
        if self.capture_allowed:
            self._capture_all(optimizer)
            return
        keys = self._state_keys
        for group in optimizer.param_groups:
            if group.get(ROLE_KEY) == "anchored":
                for p in group["params"]:
                    dtype = _compute_dtype(p.dtype)
                    # parked: put into the state after the optimizer filled it (_post_step), and no capture
                    self._parked[p] = {k: torch.full_like(p, float("nan"), dtype=dtype) for k in keys}
        self._placeholders = True

    def _drop_placeholders(self, optimizer: torch.optim.Optimizer) -> None:
        """Remove the placeholders that no checkpoint replaced, so that this step captures those anchors."""
        for group in optimizer.param_groups:
            if group.get(ROLE_KEY) == "anchored":
                for p in group["params"]:
                    state = optimizer.state.get(p, {})
                    if ANCHOR_KEY in state and bool(_local(state[ANCHOR_KEY]).isnan().any()):
                        state.pop(ANCHOR_KEY)
                        state.pop(FISHER_KEY, None)

    @torch.no_grad()
    def _pre_step(self, optimizer, args, kwargs) -> None:
        # GradScaler hands optimizers that unscale in their own kernel (fused AdamW / SGD: _step_supports_amp_scaling)
        # two tensors for this step. ``found_inf``: the gradients overflowed and the kernel will skip the update, as
        # GradScaler skips the call of any other optimizer; the penalty skips it too (a decoupled pull would move
        # the weights), and takes no record or anchor from it. ``grad_scale``: nobody unscaled the gradients yet.
        self._begin_call(optimizer)
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return
        if self._fills_empty_state(optimizer):
            self._fill_empty_state(optimizer)
            return
        if self._placeholders:  # the first step after a load into a filled state: the anchors must be the checkpoint's
            missing = self.missing_anchors(optimizer)
            if missing and self.capture_allowed:  # no checkpoint came (a fresh run allowed to capture after the fill)
                self._drop_placeholders(optimizer)
            elif missing:
                raise MissingAnchorError(
                    f"The optimizer state holds no starting-point anchor for {missing[0]!r} ({len(missing)} in all): "
                    "the checkpoint it was loaded from was not written with this penalty. Resume from a checkpoint "
                    "written by SPTrainer with the same sp_penalty."
                )
            self._placeholders = False
        if getattr(optimizer, "grad_scale", None) is not None and self.mode == "gradient":
            _unscale_grads(optimizer)
        if self.capture_allowed:
            self._capture_all(optimizer)
        sums: tuple[list, list, list] = ([], [], [])  # alpha-free body value, head value, ||w - w0||^2
        compiled: list[tuple[list, float]] = []  # (items, scale) of each anchored group, for the compiled step
        for group in optimizer.param_groups:
            role = group.get(ROLE_KEY)
            strength = {"anchored": self.alpha, "new": self.beta}.get(role, 0.0)
            if role == "free" or role is None or (role == "new" and strength == 0.0):
                continue
            names = self._names(group)
            # A tensor without a gradient is not updated by the optimizer at this step: neither is its penalty.
            items = [(n, p) for n, p in zip(names, group["params"], strict=True) if p.grad is not None]
            if role == "anchored" and not self.info.elementwise:
                self._check_structure(items)
            scale = -float(group["lr"]) * strength if self.mode == "decoupled" else strength
            if role == "anchored" and self.compiled is not None:
                if items:
                    compiled.append((items, scale))  # every group in one compiled call, below
                continue
            sizes = [_local(p).numel() for _, p in items]
            for chunk in _chunks(items, sizes, CHUNK_NUMEL):
                w, w0, fisher, out = self._lists(optimizer, chunk, anchored=role == "anchored")
                if role == "anchored":
                    value, dsq = self._accumulate(self.penalty, w, w0, fisher, out, scale)
                    sums[0].append(value)
                    sums[2].append(dsq)
                else:
                    sums[1].append(self._accumulate(self.head_penalty, w, None, None, out, scale)[0])
        if compiled:
            w, w0, fisher, out = self._lists(optimizer, [item for items, _ in compiled for item in items], anchored=True)
            groups = [g for g, (items, _) in enumerate(compiled) for _ in items]
            value, dsq = self.compiled(w, w0, fisher, out, [scale for _, scale in compiled], groups)
            sums[0].append(value)
            sums[2].append(dsq)
        # One record per step on every rank, even an empty one, so that ranks fold (all-reduce) in step.
        device = next((v.device for s in sums for v in s), None) or _first_param(optimizer).device
        record = torch.stack([torch.stack(s).sum() if s else torch.zeros((), device=device) for s in sums])
        self._partial = record if self._partial is None else self._partial + record

    def _begin_call(self, optimizer: torch.optim.Optimizer) -> None:
        """End the engine step before this call where this call's first tensor was stepped in it already (every
        call of a plain optimizer; the first sub-group's under DeepSpeed ZeRO-3), unless :meth:`end_step` did."""
        first = id(next((p for g in optimizer.param_groups for p in g["params"]), None))
        if first in self._firsts:
            self.end_step()
        self._firsts.add(first)

    def end_step(self) -> None:
        """The engine step is over (SPTrainer says so at each step's end; else the next step's first call does):
        its calls' record is one step's, a capture made in it is final, and every FOLD_STEPS steps the records are
        folded (and checked for divergence)."""
        self._close_step()
        if len(self._records) >= FOLD_STEPS:
            self._fold()

    def _close_step(self) -> None:
        """The record of the engine step joins the others, and a capture made in it is final (no later step
        captures; the Fisher now lives in the optimizer state)."""
        self._firsts.clear()
        if self._partial is not None:
            self._records.append(self._partial)
            self._partial = None
        if self._captured:
            self._captured = False
            self.capture_allowed = False
            self.fisher = None

    def _lists(self, optimizer, items, anchored: bool):
        """``(w, w0, fisher, out)`` of ``items`` (shard-local); ``w0`` and ``fisher`` are ``None`` unless needed."""
        w = [_local(p) for _, p in items]
        out = w if self.mode == "decoupled" else [_local(p.grad) for _, p in items]
        if not anchored:
            return w, None, None, out
        states = [self._state(optimizer, n, p) for n, p in items]
        w0 = [_local(s[ANCHOR_KEY]) for s in states]
        fisher = [_local(s[FISHER_KEY]) for s in states] if self.info.needs_fisher else None
        return w, w0, fisher, out

    def _check_structure(self, items) -> None:
        for name, p in items:
            if name not in self.split.shapes or _local(p).dim() != len(self.split.shapes[name]):
                raise RuntimeError(
                    f"sp_penalty={self.info.name!r} needs whole output channels, but the training engine flattened "
                    f"{name!r}. Use FSDP2 (fsdp_version: 2) or an elementwise penalty (l2_sp, l1_sp)."
                )

    @staticmethod
    def _accumulate(penalty, w, w0, fisher, out, scale):
        """Run ``penalty`` in at least fp32, casting (and casting back) tensors of lower precision."""
        dtype = _compute_dtype(w[0].dtype)
        if all(t.dtype == dtype for t in [*w, *out]):
            return penalty.accumulate(w, w0, fisher, out, scale)
        wide = [t.to(dtype) for t in w]
        delta = [torch.zeros_like(t) for t in wide]
        result = penalty.accumulate(wide, w0, fisher, delta, scale)
        torch._foreach_add_(out, [t.to(o.dtype) for t, o in zip(delta, out, strict=True)])
        return result

    def _post_step(self, optimizer, args, kwargs) -> None:
        for p, entry in self._parked.items():
            optimizer.state[p].update(entry)
        self._initialised.update(self._parked)
        self._parked.clear()
        if self._pending:
            for p, entry in self._pending.items():
                optimizer.state[p].update(entry)
            self._pending.clear()
            self._captured = True  # final when the engine step ends (_close_step)

    @torch.no_grad()
    def distance(self, optimizer: torch.optim.Optimizer) -> tuple[float, float] | None:
        """``(||w_S - w0_S||, ||w_S - w0_S|| / ||w0_S||)`` now, from the anchors in the optimizer state.

        Shard-local under sharded engines (the caller sums across ranks); ``None`` before the first step.
        """
        diff, base = [], []
        for group in optimizer.param_groups:
            if group.get(ROLE_KEY) != "anchored":
                continue
            for p in group["params"]:
                anchor = optimizer.state.get(p, {}).get(ANCHOR_KEY)
                if anchor is not None:
                    diff.append(_local(p).to(anchor.dtype) - _local(anchor))
                    base.append(_local(anchor))
        if not diff:
            return None
        dist = float(sum_of_squares(diff).sqrt())
        norm = float(sum_of_squares(base).sqrt())
        return dist, dist / norm if norm > 0 else float("inf")

    # ----------------------------------------------------------------------------------------
    # Logging
    def _fold(self) -> None:
        """Sum the pending per-step records into the window (across ranks first); raise if the value of an active
        term (``alpha > 0``: body and distance, ``beta > 0``: head) is not finite. Called between steps: the last
        one is over."""
        self._close_step()
        if not self._records:
            return
        records = torch.stack(self._records)
        self._records.clear()
        if self.all_reduce is not None:
            records = self.all_reduce(records)
        records = records.double().cpu()
        # Only a penalty that acts stops the run: at zero strength it changes nothing, and Trainer's own rule
        # (carry on, logging_nan_inf_filter) holds, as for plain fine-tuning.
        active = [i for i, on in enumerate((self.alpha > 0, self.beta > 0, self.alpha > 0)) if on]
        if active and not bool(torch.isfinite(records[:, active]).all()):
            raise FloatingPointError(
                f"The {self.info.name} penalty became non-finite during training (the weights diverged). Training "
                "was stopped; checkpoints already written are kept. Lower the learning rate or sp_alpha/sp_beta."
            )
        records[:, 2].sqrt_()
        self._window += records.sum(0)
        self._window_steps += records.shape[0]

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` if a penalty value since the last check is NaN or infinite."""
        self._fold()

    def pop_metrics(self) -> dict[str, float]:
        """Averages over the steps since the last call: ``sp_body`` (alpha * Omega), ``sp_head``
        (beta/2 * ||w_Sbar||^2) and ``sp_dist`` (||w_S - w0_S||); empty if no step was taken.
        """
        self._fold()
        if not self._window_steps:
            return {}
        body, head, dist = (self._window / self._window_steps).tolist()
        self._window.zero_()
        self._window_steps = 0
        return {"sp_body": self.alpha * body, "sp_head": self.beta * head, "sp_dist": dist}
