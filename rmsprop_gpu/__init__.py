"""rmsprop-gpu: fused multi-tensor RMSprop for GPUs (Triton and CuPy kernels) with a pure-torch CPU path.

Importing this package touches no device and imports neither triton nor cupy.
"""

from .backends import ENV_VAR, BackendUnavailableError, available_backends
from .flavors import (
    FLAVORS,
    FastaiRMSProp,
    KerasRMSprop,
    MindSporeRMSProp,
    OptaxRMSprop,
    PaddleRMSProp,
    SB3RMSpropTFLike,
    TF1RMSprop,
    TimmRMSpropTF,
    flavor,
)
from .functional import RMSpropPlan, rmsprop, which_backend
from .optimizer import RMSprop
from .state import float_state_dict

__version__ = "0.1.0"
__all__ = ["RMSprop", "float_state_dict", "RMSpropPlan", "rmsprop", "which_backend", "available_backends",
           "BackendUnavailableError", "ENV_VAR", "__version__", "flavor", "FLAVORS", "TF1RMSprop", "KerasRMSprop",
           "OptaxRMSprop", "TimmRMSpropTF", "SB3RMSpropTFLike", "FastaiRMSProp", "PaddleRMSProp",
           "MindSporeRMSProp"]
