"""Registry of starting-point penalties: ``register_penalty`` / ``get_penalty`` / ``list_penalties``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Penalty", "PenaltyInfo", "get_penalty", "get_penalty_info", "list_penalties", "register_penalty"]

Tensors = list[torch.Tensor]


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


def sum_of_squares(tensors: Tensors) -> torch.Tensor:
    """``sum_t ||t||^2`` over a list of tensors, as one 0-dim tensor (no host sync)."""
    return torch.stack(torch._foreach_norm(tensors)).square().sum()
