"""Uniform read-only access to torch tensors and CuPy arrays (the functional API takes both).

Nothing here imports CuPy: an object is recognised as a CuPy array by its type's module.
"""

from __future__ import annotations

import torch


def is_cupy(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def is_array(x) -> bool:
    return isinstance(x, torch.Tensor) or is_cupy(x)


def is_sparse(x) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_sparse or x.layout != torch.strided)


def dtype_name(x) -> str:
    if isinstance(x, torch.Tensor):
        return str(x.dtype).removeprefix("torch.")
    return x.dtype.name


def device_of(x) -> torch.device:
    if isinstance(x, torch.Tensor):
        return x.device
    return torch.device("cuda", x.device.id)  # constructing a torch.device touches no GPU


def ptr(x) -> int:
    return x.data_ptr() if isinstance(x, torch.Tensor) else int(x.data.ptr)


def numel(x) -> int:
    return x.numel() if isinstance(x, torch.Tensor) else int(x.size)


def is_contiguous(x) -> bool:
    return x.is_contiguous() if isinstance(x, torch.Tensor) else bool(x.flags.c_contiguous)
