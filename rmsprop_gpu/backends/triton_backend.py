"""Triton backend: kernels/rmsprop.py, one launch per tensor group.

On CUDA tensors it is the default. On CPU tensors it runs only under TRITON_INTERPRET=1 (Triton's
interpreter executes the same kernel text), which is how the tests exercise it without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import time

import torch

from .. import abi
from .._contract import Group, Hyper
from ._tables import (
    BLOCK,
    TableCache,
    kernel_unsupported_reason,
    launch_args,
    prepare_launch,
    repoint_launch,
    upload_torch,
)
from .base import Backend

# 128 threads x 16 elements = BLOCK: 128-bit accesses, and the per-chunk set-up spread over 16 elements. The
# kernel then holds 92-250 registers (8-16 resident warps per SM, >= 40 KiB of loads in flight per SM); capping
# them all (maxnreg=128) spills, as the static report shows.
NUM_WARPS = abi.THREADS // 32


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def constexprs(param_dtype: str, state_dtype: str, flags: int, momentum: bool, centered: bool,
               native_bf16: bool | None = None) -> dict:
    """The compile-time switches of one launch: dtypes, layout and the flag bits (rmsprop_gpu/abi.py), never a
    hyperparameter value. Cached; callers must not modify the dict. native_bf16 (default: not interpreting)
    picks the GPU's bf16 rounding."""
    import triton.language as tl

    return dict(P_DTYPE=getattr(tl, param_dtype), S_DTYPE=getattr(tl, state_dtype), MOMENTUM=momentum,
                CENTERED=centered, FLAGS=flags, NATIVE_BF16=not interpreting() if native_bf16 is None else native_bf16,
                BLOCK=BLOCK)


# 8-bit state: 2 warps (rmsprop_gpu/abi.py: threads), each thread two quantization blocks (rows r and r + 64 of the
# chunk's [128, 8] halves), every load of both issued before the first use. Up to 255 registers (8 warps per SM,
# twice the bytes in flight per thread of 4 warps at 168), said explicitly: left to itself ptxas may pick 168 and
# spill (momentum fp16 and bf16 on sm_90). Centered alone is capped at 200 (10 warps) but on sm_90 with stochastic
# rounding: at 8 warps ptxas issues its last loads after the first wait (sm_80 fp16, sm_90 bf16 without stochastic
# rounding: slack 1.08); sm_90's stochastic-rounding kernels fit better uncapped (static report).
Q8_MAX_REGISTERS = 255
Q8_CENTERED_MAX_REGISTERS = 200


@functools.cache
def launch_options(state_dtype: str, momentum: bool, centered: bool, arch: int = 90, flags: int = 0) -> dict:
    """Triton's options for one variant on compute capability `arch` (major * 10 + minor) with option `flags`
    (rmsprop_gpu/abi.py; cached, callers must not modify the dict)."""
    if state_dtype == "uint8":
        sr_sm90 = arch >= 90 and bool(flags & abi.FLAGS["STOCHASTIC_ROUNDING"])
        cap = Q8_CENTERED_MAX_REGISTERS if centered and not momentum and not sr_sm90 else Q8_MAX_REGISTERS
        return {"num_warps": abi.Q8_THREADS // 32, "maxnreg": cap}
    return {"num_warps": NUM_WARPS}


@functools.cache
def device_arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


class TritonBackend(Backend):
    name = "triton"
    shares_launches = True

    def __init__(self):
        self._kernel = None
        self.tables = TableCache(upload_torch)
        self.launches = 0
        self.first_launch_seconds: dict[tuple, float] = {}  # compile (or cache load) + first launch

    def unavailable_reason(self, device):
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'rmsprop-gpu[triton]')"
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "torch sees no CUDA device (CPU-only torch build or no GPU)"
            return None
        if device.type == "cpu":
            if interpreting() or self.launch_stubbed:
                return None
            return "Triton kernels need a CUDA device (TRITON_INTERPRET=1 runs them on the CPU, slowly)"
        return f"Triton does not run on {device.type} tensors"

    def unsupported_reason(self, group: Group, hyper: Hyper):
        if any(not isinstance(t, torch.Tensor) for t in group.params):
            return "the Triton backend takes torch tensors (use backend='cupy' for CuPy arrays)"
        return kernel_unsupported_reason(group, hyper)

    def kernel(self):
        if self._kernel is None:
            from ..kernels import rmsprop as k  # TRITON_INTERPRET is read when this module is imported

            self._kernel = k._rmsprop_kernel
        return self._kernel

    def describe(self):
        import triton

        return {
            "version": triton.__version__,
            "interpreter": interpreting(),
            "compiled_variants": len(self.first_launch_seconds),
            "first_launch_seconds": {str(k): round(v, 3) for k, v in self.first_launch_seconds.items()},
        }

    def prepare(self, group: Group, hyper: Hyper, owned: bool = False, previous=None):
        return prepare_launch(group, self.tables.owned() if owned else self.tables, previous)

    def repoint(self, launch, group: Group, moved: dict):
        return repoint_launch(launch, group, self.tables, moved)

    def run(self, launch, group: Group, hypers: list[Hyper]) -> None:
        flags, grad_scale, found_inf = launch_args(launch, group, hypers)
        cx = constexprs(group.param_dtype, group.state_dtype, flags,
                        group.momentum_buffers is not None, group.grad_avgs is not None)
        dummy = launch.tensors  # any valid pointer for arguments a variant never reads
        launch.before(group)
        if not self.launch_stubbed:
            key = (group.param_dtype, group.state_dtype, flags, cx["MOMENTUM"], cx["CENTERED"])
            t0 = time.perf_counter() if key not in self.first_launch_seconds else None
            cuda = group.device.type == "cuda"
            arch = device_arch(group.device) if cuda else 90
            with torch.cuda.device(group.device) if cuda else contextlib.nullcontext():
                self.kernel()[(launch.n_blocks,)](
                    launch.tensors, launch.blocks, launch.hyper.buffer, launch.hyper.floats,
                    grad_scale if grad_scale is not None else dummy,
                    found_inf if found_inf is not None else dummy,
                    **cx, **launch_options(group.state_dtype, cx["MOMENTUM"], cx["CENTERED"], arch, cx["FLAGS"]),
                )
            if t0 is not None:
                self.first_launch_seconds[key] = time.perf_counter() - t0
        self.launches += 1
        launch.after(group, hypers[0].found_inf)
