"""Registry of starting-point penalties: ``register_penalty`` / ``get_penalty`` / ``list_penalties``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["Penalty", "PenaltyInfo", "get_penalty", "get_penalty_info", "list_penalties", "register_penalty"]

Tensors = list[torch.Tensor]

#: Entries per block of the elementwise kernels on CPU (1 MiB of fp32): a block's temporaries (``w - w0``)
#: stay in the cores' L2 caches between the op that writes them and the ops that read them, so each anchored
#: entry crosses main memory once (read ``w``, ``w0``, ``grad``; write ``grad``: the 16-byte floor) instead of
#: also writing and re-reading the temporary. Accelerators take whole tensors: one launch per op and chunk.
CPU_BLOCK_NUMEL = 1 << 18


class Penalty:
    """A penalty ``Omega`` on the pretrained (anchored) tensors ``w_S``.

    Subclasses implement :meth:`accumulate`, which works on lists of tensors with multi-tensor
    (``torch._foreach_*``) ops so that one call covers a whole chunk of the model. The strength
    (``alpha``) is applied by the caller through ``scale``: ``Omega`` itself carries no strength.
    """

    def accumulate(
        self,
        w: Tensors,
        w0: Tensors | None,
        fisher: Tensors | None,
        out: Tensors,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add ``scale * dOmega/dw`` to each tensor of ``out`` in place.

        ``out`` is the gradient (to add the penalty's gradient to the loss gradient) or the
        parameters themselves (a decoupled step, ``scale = -lr * alpha``); it may alias ``w``,
        so implementations read ``w`` completely before writing ``out``.

        Returns ``(Omega(w), ||w - w0||^2)`` summed over these tensors as 0-dim tensors;
        the second is ``None`` when ``w0`` is ``None``.
        """
        raise NotImplementedError

    def terms(
        self, w: torch.Tensor, w0: torch.Tensor | None, fisher: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The penalty entry by entry, for the compiled step (``sp_compile``): ``(dOmega/dw, omega, (w - w0)^2)``
        with ``Omega(w) = sum omega``, all of the shape of ``w``; the third is ``None`` when ``w0`` is ``None``.

        Elementwise penalties implement it beside :meth:`accumulate` (the same formula, traced by
        ``torch.compile`` instead of run op by op); a penalty without it cannot be compiled.
        """
        raise NotImplementedError

    @property
    def compilable(self) -> bool:
        """Whether the penalty has an elementwise form (:meth:`terms`) for the compiled step."""
        return type(self).terms is not Penalty.terms


@dataclass(frozen=True)
class PenaltyInfo:
    """What the registry knows about one penalty."""

    name: str
    formula: str
    description: str
    needs_anchor: bool
    needs_fisher: bool
    elementwise: bool
    cls: type[Penalty]


_PENALTIES: dict[str, PenaltyInfo] = {}


def register_penalty(
    name: str,
    *,
    formula: str,
    description: str,
    needs_anchor: bool = True,
    needs_fisher: bool = False,
    elementwise: bool = True,
) -> Callable[[type[Penalty]], type[Penalty]]:
    """Class decorator that registers a :class:`Penalty` under ``name``.

    ``elementwise`` says whether the penalty treats every entry on its own (then it survives
    any flattening or sharding of the parameters); group penalties need whole output channels.
    """

    def decorator(cls: type[Penalty]) -> type[Penalty]:
        if name in _PENALTIES:
            raise ValueError(f"A penalty named {name!r} is already registered.")
        _PENALTIES[name] = PenaltyInfo(
            name=name,
            formula=formula,
            description=description,
            needs_anchor=needs_anchor,
            needs_fisher=needs_fisher,
            elementwise=elementwise,
            cls=cls,
        )
        return cls

    return decorator


def list_penalties() -> list[str]:
    """Names of the registered penalties, ``"none"`` included (plain fine-tuning)."""
    return ["none", *_PENALTIES]


def get_penalty_info(name: str) -> PenaltyInfo:
    """Registry entry of ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return _PENALTIES[name]
    except KeyError:
        raise ValueError(f"Unknown penalty {name!r}. Known penalties: {', '.join(list_penalties())}.") from None


def get_penalty(name: str) -> Penalty:
    """A fresh instance of the penalty registered as ``name``."""
    return get_penalty_info(name).cls()


def blocks(*lists: Tensors) -> Iterator[tuple[Tensors, ...]]:
    """Aligned blocks of ``lists`` (lists of same-shaped tensors): on CPU, flat slices of at most
    :data:`CPU_BLOCK_NUMEL` entries (contiguous tensors are split, small ones grouped); elsewhere the lists.

    The slices are views: writing a block's ``out`` writes the tensors.
    """
    if not lists[0] or lists[0][0].device.type != "cpu":
        yield lists
        return
    block: list[list[torch.Tensor]] = [[] for _ in lists]
    size = 0
    for tensors in zip(*lists, strict=True):
        numel = tensors[0].numel()
        if numel > CPU_BLOCK_NUMEL and all(t.is_contiguous() for t in tensors):
            flat = [t.view(-1) for t in tensors]
            for start in range(0, numel, CPU_BLOCK_NUMEL):
                yield tuple([f[start : start + CPU_BLOCK_NUMEL]] for f in flat)
            continue
        if size and size + numel > CPU_BLOCK_NUMEL:
            yield tuple(block)
            block, size = [[] for _ in lists], 0
        for acc, t in zip(block, tensors, strict=True):
            acc.append(t)
        size += numel
    if block[0]:  # also a block of empty tensors (a rank's shards under FSDP2 can all be): its sums are zeros
        yield tuple(block)


def deviation_blocks(w: Tensors, w0: Tensors, *lists: Tensors) -> Iterator[tuple[Tensors, ...]]:
    """``(w - w0, *lists)`` by the aligned blocks of :func:`blocks`.

    On CPU the deviation of a block of one tensor (a slice of a large tensor, most of the entries) is written
    into one buffer that every such block reuses: it stays in the caches and nothing is allocated per block.
    A yielded deviation is valid until the next block is asked for.
    """
    scratch: torch.Tensor | None = None
    for wb, w0b, *rest in blocks(w, w0, *lists):
        if (
            len(wb) == 1
            and wb[0].device.type == "cpu"
            and wb[0].numel() <= CPU_BLOCK_NUMEL
            and w0b[0].dtype == wb[0].dtype  # else w - w0 is of the promoted type
        ):
            if scratch is None or scratch.dtype != wb[0].dtype:
                scratch = torch.empty(CPU_BLOCK_NUMEL, dtype=wb[0].dtype)
            d = [torch.sub(wb[0], w0b[0], out=scratch[: wb[0].numel()].view(wb[0].shape))]
        else:
            d = torch._foreach_sub(wb, w0b)
        yield (d, *rest)


def squares(tensors: Tensors) -> Tensors:
    """``||t||^2`` of each tensor, as 0-dim tensors.

    On CPU a dot product where the tensor is contiguous (one vectorised pass; ``torch._foreach_norm`` is a slower
    reduction there); elsewhere one multi-tensor ``torch._foreach_norm`` launch for the whole list.
    """
    if not tensors or tensors[0].device.type != "cpu":
        return [n.square() for n in torch._foreach_norm(tensors)] if tensors else []
    return [
        torch.dot(t.view(-1), t.view(-1)) if t.is_contiguous() and t.dim() > 0 else torch.linalg.vector_norm(t).square()
        for t in tensors
    ]


def sum_of_squares(tensors: Tensors) -> torch.Tensor:
    """``sum_t ||t||^2`` over a list of tensors, as one 0-dim tensor (no host sync)."""
    return torch.stack(torch._foreach_norm(tensors)).square().sum()
