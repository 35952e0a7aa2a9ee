"""Backend registry: picks a backend per tensor group from its device and what is installed.

CPU -> torch. CUDA -> triton if usable, else cupy, else torch. `backend=` or the environment variable
RMSPROP_GPU_BACKEND overrides the choice; a choice that cannot run raises BackendUnavailableError.
Importing this module imports neither triton nor cupy.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .._contract import Group, Hyper
from .base import Backend, BackendUnavailableError
from .cupy_backend import CupyBackend
from .torch_backend import TorchBackend
from .triton_backend import TritonBackend

ENV_VAR = "RMSPROP_GPU_BACKEND"
BACKENDS: dict[str, Backend] = {b.name: b for b in (TritonBackend(), CupyBackend(), TorchBackend())}
PREFERENCE = {"cuda": ("triton", "cupy", "torch"), "cpu": ("torch",)}


def requested_name(backend: str | None) -> str:
    choices = ["auto", *BACKENDS]
    if backend is not None:
        if not isinstance(backend, str):
            raise ValueError(f"Unknown backend {backend!r}: backend must be a string, one of {choices}")
        name, source = backend.strip().lower(), "backend="
    else:
        name, source = (os.environ.get(ENV_VAR) or "auto").strip().lower(), f"${ENV_VAR}"
    if name not in choices:
        raise ValueError(f"Unknown backend {name!r} (from {source}); choose one of {choices}")
    return name


def select(backend: str | None, group: Group, hyper: Hyper) -> Backend:
    """The backend that runs `group`. Raises BackendUnavailableError naming what is missing."""
    name = requested_name(backend)
    if name != "auto":
        b = BACKENDS[name]
        why = b.unavailable_reason(group.device) or b.unsupported_reason(group, hyper)
        if why:
            raise BackendUnavailableError(f"backend {name!r} cannot run on {group.device}: {why}")
        return b
    reasons = []
    for cand in PREFERENCE.get(group.device.type, ("torch",)):
        b = BACKENDS[cand]
        why = b.unavailable_reason(group.device) or b.unsupported_reason(group, hyper)
        if why is None:
            return b
        reasons.append(f"{cand}: {why}")
    raise BackendUnavailableError(f"no backend can run this group on {group.device}: " + "; ".join(reasons))


def available_backends(device: str | torch.device | None = None) -> dict[str, dict]:
    """{name: {"usable": bool, "reason": str | None, ...}} for `device` (default: cuda if present, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    out = {}
    for name, b in BACKENDS.items():
        why = b.unavailable_reason(device)
        info = {"usable": why is None, "reason": why, "device": str(device)}
        if why is None:
            info.update(b.describe())
        out[name] = info
    return out


@contextlib.contextmanager
def launches_stubbed():
    """Host-overhead seam: inside, the kernel backends (triton, cupy) prepare, check and count every launch but
    do not launch (nothing is written by a kernel), and accept CPU tensors. Used by perf/host_overhead.py."""
    kernel_backends = [b for b in BACKENDS.values() if b.name != "torch"]
    for b in kernel_backends:
        b.launch_stubbed = True
    try:
        yield
    finally:
        for b in kernel_backends:
            b.launch_stubbed = False


__all__ = ["Backend", "BackendUnavailableError", "BACKENDS", "ENV_VAR", "available_backends", "launches_stubbed",
           "select"]
