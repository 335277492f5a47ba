"""fused_adam: the fastest exact Adam/AdamW step for PyTorch.

    from fused_adam import FusedAdam, FusedAdamW
    opt = FusedAdamW(model.parameters(), lr=1e-3)            # drop-in for torch.optim.AdamW
    opt = FusedAdam(model.parameters(), backend="reference")  # pick a backend: auto|cpu|cuda|triton|reference
"""
from .backends import Hyper, available_backends
from .flat import FlatBuffer, flatten_parameters
from .optimizer import Dispatch, FusedAdam, FusedAdamW

__all__ = ["FusedAdam", "FusedAdamW", "Dispatch", "Hyper", "available_backends", "flatten_parameters", "FlatBuffer"]
__version__ = "0.1.0"
