"""A learning-rate scheduler built on an optimizer's parameter groups, made to follow their split by role.

``SPTrainer`` splits every parameter group of the optimizer into one group per role (anchored, new, free), each
keeping the settings of its original group. A scheduler passed in ``optimizers=(optimizer, scheduler)`` was built
before that, with one entry per original group in its own lists (``base_lrs``, the lambdas of ``LambdaLR``...): left
as it is, it drives too few groups and fails, or silently leaves some groups off the schedule. Each split group
takes the entries of the group it came from, so that every group follows the schedule of its origin.
"""

from __future__ import annotations

from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

__all__ = ["check_scheduler", "follow_split_groups"]

#: The per-group lists that torch's schedulers keep: ``base_lrs`` and ``_last_lr`` (every ``LRScheduler``), the
#: lambdas of ``LambdaLR`` / ``MultiplicativeLR`` (transformers' ``get_*_schedule*`` build ``LambdaLR``), the bounds
#: of ``CyclicLR`` and ``ReduceLROnPlateau``. ``OneCycleLR`` keeps its values in the groups, which the split copies.
PER_GROUP_LISTS = ("base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs", "base_momentums", "max_momentums")


def check_scheduler(scheduler: object) -> None:
    """Refuse a scheduler whose per-group state is unknown (not a ``torch.optim.lr_scheduler`` scheduler)."""
    if not isinstance(scheduler, (LRScheduler, ReduceLROnPlateau)):
        raise ValueError(
            f"optimizers=(optimizer, scheduler): the {type(scheduler).__name__} scheduler is not a "
            "torch.optim.lr_scheduler scheduler, so SPTrainer cannot make it follow the parameter groups it splits by "
            "role (anchored / new / free). Pass a torch scheduler (transformers' get_*_schedule_with_warmup are "
            "LambdaLR), or optimizers=(optimizer, None) with lr_scheduler_type / lr_scheduler_kwargs in SPConfig."
        )
    for child in getattr(scheduler, "_schedulers", []):  # SequentialLR, ChainedScheduler
        check_scheduler(child)


def follow_split_groups(scheduler: LRScheduler | ReduceLROnPlateau, origins: list[int]) -> None:
    """Give split group ``i`` the scheduler's entries of original group ``origins[i]``, in place.

    Example:
        >>> origins = regularizer.prepare_optimizer(optimizer, model.named_parameters())
        >>> follow_split_groups(scheduler, origins)
    """
    check_scheduler(scheduler)
    for child in getattr(scheduler, "_schedulers", []):
        follow_split_groups(child, origins)
    count = max(origins, default=-1) + 1
    for attr in PER_GROUP_LISTS:
        values = getattr(scheduler, attr, None)
        if isinstance(values, list) and len(values) == count:
            setattr(scheduler, attr, [values[i] for i in origins])
