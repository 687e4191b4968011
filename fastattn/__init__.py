"""fastattn: fused Transformer kernels for PyTorch (attention, softmax, FFN, norms).

Triton kernels on the GPU (and on the CPU under TRITON_INTERPRET=1), a C++/CUDA extension as the
fallback, and a plain PyTorch reference, chosen per call by ``fastattn.dispatch``.
"""

from fastattn import errors, nn
from fastattn.dispatch import BackendError, backends, use_backend
from fastattn.functional import (
    feed_forward,
    layer_norm,
    log_softmax,
    rms_norm,
    scaled_dot_product_attention,
    softmax,
)
from fastattn.patch import patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "backends",
    "errors",
    "feed_forward",
    "layer_norm",
    "log_softmax",
    "nn",
    "patch",
    "rms_norm",
    "scaled_dot_product_attention",
    "softmax",
    "unpatch",
    "use_backend",
]
