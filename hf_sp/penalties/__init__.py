"""Starting-point penalties, one module per family, registered by name.

Adding a penalty: one module with a :class:`Penalty` subclass decorated by
:func:`register_penalty`, imported here, and one row in the test matrix.
"""

from . import group_lasso_sp, l1_sp, l2, l2_sp, l2_sp_fisher  # noqa: F401  (registration)
from ._registry import Penalty, PenaltyInfo, get_penalty, get_penalty_info, list_penalties, register_penalty

__all__ = ["Penalty", "PenaltyInfo", "get_penalty", "get_penalty_info", "list_penalties", "register_penalty"]
