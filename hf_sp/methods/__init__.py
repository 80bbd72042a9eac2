"""Transfer methods: the phases of a fine-tuning recipe, one module each, registered by name.

See :mod:`hf_sp.methods._base` for the phases. The methods shipped:

- ``probe_head``: LP-FT, the new head fitted on frozen features before training (``sp_head_init``);
- ``batchnorm``: BatchNorm statistics kept at the source's, affine parameters trained/anchored/frozen;
- ``learning_rates``: the body at a fraction of the head's learning rate, with layer-wise decay;
- ``penalty``: the paper's penalties toward w0 (``sp_penalty``, see :mod:`hf_sp.penalties`);
- ``spd``: selective projection decay, a pull toward w0 where a layer's step strays from it (``sp_spd``);
- ``projection``: each layer projected into a ball around w0 after each step, fixed radii or FTP;
- ``delta``: DELTA, feature maps kept near the frozen source network's, channels weighted (``sp_delta``);
- ``bss``: batch spectral shrinkage of the pooled features' smallest singular values (``sp_bss``);
- ``interpolation``: WiSE-FT, interpolation toward the start after training, t chosen on eval.
"""

from . import (  # noqa: F401  (registration)
    batchnorm,
    bss,
    delta,
    interpolation,
    learning_rates,
    penalty,
    probe_head,
    projection,
    spd,
)
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
from .bss import BSSArguments, batch_spectral_shrinkage
from .delta import DeltaArguments, default_feature_layers
from .interpolation import InterpolationArguments, interpolate_
from .learning_rates import LearningRateArguments, body_layer_ids
from .penalty import PenaltyArguments
from .probe_head import LinearProbe, ProbeHeadArguments, extract_head_inputs, fit_linear_probe, head_linear
from .projection import ProjectionArguments
from .spd import SPDArguments

__all__ = [
    "BSSArguments",
    "BatchNormArguments",
    "DeltaArguments",
    "InterpolationArguments",
    "LearningRateArguments",
    "LinearProbe",
    "MethodContext",
    "MethodInfo",
    "PenaltyArguments",
    "ProbeHeadArguments",
    "ProjectionArguments",
    "SPDArguments",
    "TransferMethod",
    "batch_spectral_shrinkage",
    "body_layer_ids",
    "default_feature_layers",
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
