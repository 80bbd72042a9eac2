"""Transfer methods: the phases of a fine-tuning recipe, one module each, registered by name.

See :mod:`hf_sp.methods._base` for the phases. The methods shipped:

- ``probe_head``: LP-FT, the new head fitted on frozen features before training (``sp_head_init``);
- ``batchnorm``: BatchNorm statistics kept at the source's, affine parameters trained/anchored/frozen;
- ``learning_rates``: the body at a fraction of the head's learning rate, with layer-wise decay;
- ``penalty``: the paper's penalties toward w0 (``sp_penalty``, see :mod:`hf_sp.penalties`);
- ``interpolation``: WiSE-FT, interpolation toward the start after training, t chosen on eval.
"""

from . import batchnorm, interpolation, learning_rates, penalty, probe_head  # noqa: F401  (registration)
from ._base import (
    MethodContext,
    MethodInfo,
    TransferMethod,
    build_methods,
    get_method_info,
    list_methods,
    register_method,
)
from .batchnorm import BatchNormArguments, freeze_statistics
from .interpolation import InterpolationArguments, interpolate_
from .learning_rates import LearningRateArguments, body_layer_ids
from .penalty import PenaltyArguments
from .probe_head import LinearProbe, ProbeHeadArguments, extract_head_inputs, fit_linear_probe, head_linear

__all__ = [
    "BatchNormArguments",
    "InterpolationArguments",
    "LearningRateArguments",
    "LinearProbe",
    "MethodContext",
    "MethodInfo",
    "PenaltyArguments",
    "ProbeHeadArguments",
    "TransferMethod",
    "body_layer_ids",
    "build_methods",
    "extract_head_inputs",
    "fit_linear_probe",
    "freeze_statistics",
    "get_method_info",
    "head_linear",
    "interpolate_",
    "list_methods",
    "register_method",
]
