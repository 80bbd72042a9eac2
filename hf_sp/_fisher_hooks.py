"""The exact Fisher's inner sums from one forward pass per batch and one backward pass per class slot.

``HookedFisher(model, names).add(x, labels, weights, fisher)`` adds
``sum_b sum_s weights[b, s] * (d log f_{labels[b, s]}(x_b) / dw)^2`` to ``fisher`` for every selected parameter:

* parameters of layers with a rule (:mod:`hf_sp._per_sample`: Linear, Conv1d/2d, norms, Embedding) get it from the
  layer's input (saved by a forward hook) and the gradient of its output (one ``autograd.grad`` per slot
  over the whole batch, asking for activation gradients only: no weight gradient is computed);
* parameters held directly by a module without a rule, whose first dimension is 1 and broadcast over the batch
  (a ViT's ``cls_token`` and ``pos_embed``), are replaced by one copy per sample, whose gradients are then
  the per-sample gradients; checked on the first batch (same logits, gradients of a sample only on its copy);
* every other parameter falls back to :mod:`torch.func`, locally: the module that holds it is re-run under
  ``vmap`` over the samples on its saved inputs, with a VJP of the saved output gradient.

:meth:`HookedFisher.supported` says whether a model decomposes per sample at all (no BatchNorm on batch
statistics, no parameter tied between modules); :func:`hf_sp.estimate_fisher` uses ``torch.func`` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._per_sample import RULES, rule_for

#: Floats of saved output gradients (slots x samples x activations) per forward chunk: 512 MiB of fp32.
GRADIENT_BUDGET = 1 << 27


class NotPerSample(RuntimeError):
    """The model's samples interact, or a hooked tensor was changed in place: use the torch.func path."""


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

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.model, self.selected = model, set(names)
        self.units: list[_Unit] = []
        self.replicas: list[str] = []
        self._checked = False
        self._walk(model, "")

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

    def _walk(self, module: nn.Module, prefix: str) -> None:
        def full(local: str) -> str:
            return f"{prefix}.{local}" if prefix else local

        direct = [(n, p) for n, p in _direct(module) if full(n) in self.selected]
        rule = rule_for(module) if type(module) in RULES else None
        if rule is not None:
            if direct:
                self.units.append(_Unit(prefix, module, {n: full(n) for n, _ in direct}, rule))
            return
        if direct and all(p.dim() > 0 and p.shape[0] == 1 for _, p in direct):
            self.replicas += [full(n) for n, _ in direct]
        elif direct:  # whole subtree through torch.func: its children may use its parameters (MultiheadAttention)
            subtree = {n: full(n) for n, _ in module.named_parameters() if full(n) in self.selected}
            self.units.append(_Unit(prefix, module, subtree, None))
            return
        for name, child in module.named_children():
            self._walk(child, full(name))

    # ------------------------------------------------------------------------------------------------------
    def _hook(self, unit: _Unit, module, args, kwargs, output):
        # The output is cloned so that an in-place op after the layer (ReLU(inplace=True), x += shortcut) changes
        # the clone, not the tensor whose gradient is asked for; inputs are checked for in-place changes instead.
        leaves, spec = tree_flatten(output)
        clones = [t.clone() if isinstance(t, torch.Tensor) and t.requires_grad else t for t in leaves]
        saved_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        versions = [a._version for a in saved_args if isinstance(a, torch.Tensor)]
        unit.calls.append((saved_args, kwargs, leaves, versions))
        return tree_unflatten(clones, spec)

    def add(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor,
        params: dict[str, torch.Tensor],
        constants: dict[str, torch.Tensor],
        logits_of: Callable[[Any], torch.Tensor],
        fisher: dict[str, torch.Tensor],
    ) -> None:
        """Add this batch's weighted per-sample squares to ``fisher`` (``labels``/``weights``: ``[B, S]``)."""
        slots = labels.shape[1]
        step = self._chunk(x, slots, params, constants)
        for start in range(0, x.shape[0], step):
            sl = slice(start, start + step)
            self._add_chunk(x[sl], labels[sl], weights[sl], params, constants, logits_of, fisher)

    def _chunk(self, x, slots, params, constants) -> int:
        """Samples per forward so that the saved output gradients of all slots stay within GRADIENT_BUDGET."""
        probe: list[int] = []
        hooks = [
            u.module.register_forward_hook(
                lambda m, a, o: probe.append(
                    sum(t[0].numel() for t in tree_flatten(o)[0] if isinstance(t, torch.Tensor))
                )
            )
            for u in self.units
        ]
        try:
            with torch.no_grad():
                functional_call(self.model, (params, constants), (x[:1],))
        finally:
            for h in hooks:
                h.remove()
        per_sample = max(1, sum(probe)) * slots
        return max(1, min(x.shape[0], GRADIENT_BUDGET // per_sample))

    def _add_chunk(self, x, labels, weights, params, constants, logits_of, fisher) -> None:
        batch = x.shape[0]
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        taps = {
            n: torch.zeros(batch, *params[n].shape[1:], dtype=params[n].dtype, device=x.device, requires_grad=True)
            for n in self.replicas
        }
        replaced = {n: leaves[n].expand(batch, *leaves[n].shape[1:]) + taps[n] for n in self.replicas}
        handles = [u.module.register_forward_hook(partial(self._hook, u), with_kwargs=True) for u in self.units]
        for u in self.units:
            u.calls.clear()
        try:
            with torch.enable_grad():
                inp = x.detach().requires_grad_(True) if x.is_floating_point() else x
                logits = logits_of(functional_call(self.model, ({**leaves, **replaced}, constants), (inp,)))
                logp = torch.log_softmax(logits, dim=-1)
        finally:
            for h in handles:
                h.remove()
        for u in self.units:
            for saved, _, _, versions in u.calls:
                if [a._version for a in saved if isinstance(a, torch.Tensor)] != versions:
                    raise NotPerSample(f"the input of {u.prefix or 'the model'} was changed in place")
        if not self._checked and self.replicas:
            self._check_replicas(x, logits, logp, taps, leaves, constants, logits_of)
        targets = [t for u in self.units for call in u.calls for t in call[2] if isinstance(t, torch.Tensor)]
        targets = [t for t in targets if t.requires_grad]
        tap_list = list(taps.values())
        # Each slot's output gradients are copied into [S, ...] buffers as they come, and freed: the allocator
        # reuses their memory for the next slot's (stacking them at the end would hold every slot twice).
        wanted = targets + tap_list
        slots, classes = labels.shape[1], logp.shape[-1]
        buffers = [t.new_empty(slots, *t.shape) for t in wanted]
        for s in range(slots):
            cot = torch.nn.functional.one_hot(labels[:, s], classes).to(logp.dtype)
            got = torch.autograd.grad(logp, wanted, cot, retain_graph=True, allow_unused=True)
            for buf, g in zip(buffers, got, strict=True):
                if g is None:
                    buf[s].zero_()
                else:
                    buf[s].copy_(g)
            del got
        del logp, logits
        stacked = iter(buffers)
        w = weights.T.contiguous()  # [S, B]
        by_target = {id(t): next(stacked) for t in targets}
        for n in taps:
            g = next(stacked)  # [S, B, *p.shape[1:]]: per-sample gradients of the parameter
            sq = torch.einsum("sb...,sb->...", g.square(), w.to(g.dtype))
            fisher[n] += sq.reshape(fisher[n].shape).to(fisher[n].dtype)
        for u in self.units:
            if u.rule is not None:
                self._add_rule(u, by_target, w, fisher)
            else:
                self._add_fallback(u, by_target, w, params, constants, fisher)
            u.calls.clear()

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
                batch = next(a.shape[0] for a in saved if isinstance(a, torch.Tensor))
                flat_args, spec = tree_flatten((saved, kwargs))
                dims = [
                    0 if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch else None
                    for a in flat_args
                ]

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

                cot = [torch.zeros_like(o[0]) if c is None else c[s] for o, c in zip(outs, cots, strict=True)]

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

    def _check_replicas(self, x, logits, logp, taps, leaves, constants, logits_of) -> None:
        """Per-sample copies must give the same logits, and a sample's gradient must land on its copy only."""
        self._checked = True
        with torch.no_grad():
            plain = logits_of(functional_call(self.model, (leaves, constants), (x,)))
        if plain.shape != logits.shape or not torch.allclose(plain, logits.detach(), rtol=1e-5, atol=1e-6):
            raise NotPerSample("per-sample copies of broadcast parameters change the logits")
        if x.shape[0] < 2:
            return
        cot = torch.zeros_like(logp)
        cot[-1] = torch.softmax(logits.detach()[-1], -1)
        got = torch.autograd.grad(logp, list(taps.values()), cot, retain_graph=True, allow_unused=True)
        for g in got:
            if g is not None and bool(g[:-1].abs().amax() > 0):
                raise NotPerSample("a broadcast parameter mixes samples")
