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


# ---- layouts: an elementwise update needs only that every tensor of a row walks memory in the same order
def same_layout(x: torch.Tensor, shape, strides) -> bool:
    """x is dense with these strides (dims of size 1 may have any stride): flat memory, element for element."""
    if tuple(x.shape) != tuple(shape):
        return False
    if x.numel() <= 1:
        return True
    return all(a == b for n, a, b in zip(shape, x.stride(), strides) if n != 1)


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill numel consecutive slots in some order of dims."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def dense_strides(p: torch.Tensor):
    """The layout every tensor of p's row must share: p's own strides when p is non-overlapping and dense
    (contiguous, channels_last, transposed...), else contiguous (p then goes through a temporary)."""
    if p.numel() <= 1 or is_dense(p):
        return p.stride()
    return torch.empty(p.shape, device="meta").stride()
