"""The start ``w_start`` of every tensor an optimizer steps, for the methods that need it at step time or after
training (SPD, projection to a radius, interpolation).

``w_start`` is the tensor as it was before the optimizer first stepped it: the pretrained weights of the body,
the initial (random or probe) head. It lives in the optimizer state, under ``sp_start``, or under the penalty's
``sp_anchor`` where the penalty keeps one (the same weights, stored once), so it travels with every checkpoint
and is sharded like the tensor. One :class:`StartTracker` per optimizer serves every method that asks for it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import torch
from torch import nn

from ..regularizer import _OWN_KEYS, ANCHOR_KEY, _unscale_grads, keep_saved_precision
from ..selection import ParamSplit, canonical_name

__all__ = ["START_KEY", "StartTracker", "anchored_parameters", "step_skipped", "unscale_if_scaled"]

START_KEY = "sp_start"

_TRACKERS: weakref.WeakKeyDictionary[torch.optim.Optimizer, StartTracker] = weakref.WeakKeyDictionary()

#: Optimizer-state keys of hf_sp's methods: kept in the precision they were saved in when a checkpoint is loaded
#: (torch casts floating state to the parameter's dtype), and not taken for a sign that the optimizer stepped a tensor.
HF_SP_STATE_KEYS: set[str] = {START_KEY, *_OWN_KEYS}


def stepped(state: dict) -> bool:
    """Whether the optimizer itself has stepped the tensor of this state (it holds more than hf_sp's own keys)."""
    return bool(set(state) - HF_SP_STATE_KEYS)


class StartTracker:
    """Keeps ``w_start`` of each tensor of ``optimizer`` in its state; :meth:`of` returns the optimizer's one.

    Its step hooks are registered when it is first asked for, so a method that asks for it in
    ``configure_optimizer`` before hooking the step itself sees the starts in its own pre- and post-step hooks,
    the first step included.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = weakref.ref(optimizer)  # the registry's key: held weakly, so that it can be collected
        #: Copies taken before a tensor's first step, stored in its state once the optimizer has initialised it.
        self._pending: dict[torch.Tensor, torch.Tensor] = {}
        self._unsettled: set[torch.Tensor] = {p for g in optimizer.param_groups for p in g["params"]}
        optimizer.register_step_pre_hook(self._pre_step)
        optimizer.register_step_post_hook(self._post_step)
        keep_saved_precision(optimizer, HF_SP_STATE_KEYS)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        optimizer = self._optimizer()
        if optimizer is None:  # pragma: no cover - the hooks die with the optimizer
            raise RuntimeError("The optimizer of this StartTracker was deleted.")
        return optimizer

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer) -> StartTracker:
        """The tracker of ``optimizer``, created (and its hooks registered) on the first call."""
        tracker = _TRACKERS.get(optimizer)
        if tracker is None:
            tracker = _TRACKERS[optimizer] = cls(optimizer)
        return tracker

    @torch.no_grad()
    def _pre_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        # A tensor the optimizer has never stepped still holds its start: copy it now (the penalty's anchor, taken
        # at the same step, serves instead where there is one).
        for p in list(self._unsettled):
            state = optimizer.state.get(p, {})
            if START_KEY in state or ANCHOR_KEY in state:
                self._unsettled.discard(p)
            elif p not in self._pending:
                self._pending[p] = p.detach().to(torch.promote_types(p.dtype, torch.float32), copy=True)

    def _post_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        # Stored once the tensor was stepped (it had a gradient): by then optimizers such as Adam have initialised its
        # state, which they do only when it is empty. A tensor without gradient was not moved: its copy stays pending.
        for p in list(self._pending):
            state = optimizer.state[p] if p.grad is not None else optimizer.state.get(p, {})
            if ANCHOR_KEY in state:
                del self._pending[p]
            elif p.grad is not None:
                state[START_KEY] = self._pending.pop(p)
                self._unsettled.discard(p)

    def start(self, p: torch.Tensor) -> torch.Tensor:
        """``w_start`` of ``p`` (at least fp32): the stored tensor itself, or a copy of ``p`` when the optimizer never
        stepped it (it is still at its start)."""
        state = self.optimizer.state.get(p, {})
        start = state.get(ANCHOR_KEY, state.get(START_KEY, self._pending.get(p)))
        return p.detach().clone() if start is None else start

    def check_recorded(self, checkpoint: str, field: str) -> None:
        """After a resume: raise ``ValueError`` naming ``field`` if a tensor already stepped (it has optimizer state)
        has no start in it, i.e. ``checkpoint`` was written without a method that records the starts."""
        state = self.optimizer.state
        if any(
            stepped(state.get(p, {})) and START_KEY not in state[p] and ANCHOR_KEY not in state[p]
            for g in self.optimizer.param_groups
            for p in g["params"]
        ):
            raise ValueError(
                f"resume_from_checkpoint={checkpoint!r} has tensors trained without their start recorded: it was not "
                f"written with {field}. Resume with the settings the run started with, or start again from the "
                "pretrained model."
            )


def anchored_parameters(
    optimizer: torch.optim.Optimizer, model: nn.Module, split: ParamSplit
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of each pretrained (anchored) tensor the optimizer holds, by the split's roles.

    Raises ``RuntimeError`` when the optimizer holds tensors the model does not (an engine that flattened the
    groups, DeepSpeed ZeRO): per-layer methods need to know which tensor is which.
    """
    names = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:
                raise RuntimeError(
                    "The optimizer holds a tensor the model does not (the training engine flattened the parameter "
                    "groups, as DeepSpeed ZeRO does): the per-layer methods (sp_spd, sp_projection) need the model's "
                    "own tensors. Train without DeepSpeed for these methods."
                )
            if split.role(name) == "anchored":
                yield name, p


def step_skipped(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a gradient scaler found inf/NaN gradients and the (fused) optimizer will skip this step."""
    found_inf = getattr(optimizer, "found_inf", None)
    return found_inf is not None and bool(found_inf)


def unscale_if_scaled(optimizer: torch.optim.Optimizer) -> None:
    """Unscale the gradients now if a gradient scaler left that to a fused optimizer's kernel (see the regularizer)."""
    if getattr(optimizer, "grad_scale", None) is not None:
        _unscale_grads(optimizer)

