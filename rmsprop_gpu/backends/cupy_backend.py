"""CuPy backend: kernels/rmsprop.cu through cupy.RawModule, one launch per tensor group.

Takes torch CUDA tensors (launched on torch's current stream) and CuPy arrays (on CuPy's current
stream), so a CuPy user needs no torch tensors. The module factory is a seam: tests put a module
compiled for the CPU (tools/cuda_cpu) in its place, so this file's own table building, argument
marshalling and launch configuration are what the CPU tests drive.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .. import _arrays as arr
from .. import abi
from .._contract import Group, Hyper
from ._tables import (
    TableCache,
    kernel_unsupported_reason,
    launch_args,
    prepare_launch,
    repoint_launch,
    upload_torch,
)
from .base import Backend

_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "uint8": "q8"}  # uint8 state: 8-bit blockwise
_CTYPE = {"float32": "float", "float16": "f16", "bfloat16": "bf16", "uint8": "q8"}
_LAYOUT = {(False, False): "plain", (True, False): "momentum", (False, True): "centered",
           (True, True): "centered_momentum"}


def kernel_source() -> str:
    """kernels/rmsprop.cu after the ABI it is compiled with (rmsprop_gpu/abi.py: columns, flag bits, BLOCK)."""
    return abi.cuda_header() + resources.files("rmsprop_gpu.kernels").joinpath("rmsprop.cu").read_text()


def kernel_name(param_dtype: str, state_dtype: str, momentum: bool, centered: bool) -> str:
    return f"rmsprop_{_SHORT[param_dtype]}_{_SHORT[state_dtype]}_{_LAYOUT[momentum, centered]}"


class KernelSpec(NamedTuple):
    """One entry point of kernels/rmsprop.cu: a layout and its compile-time option flags."""

    param_dtype: str
    state_dtype: str
    momentum: bool
    centered: bool
    flags: int

    @property
    def layout_name(self) -> str:
        return kernel_name(self.param_dtype, self.state_dtype, self.momentum, self.centered)

    @property
    def name(self) -> str:
        return f"{self.layout_name}_f{self.flags}"

    def definition(self, macro: str = "RMSPROP_KERNEL") -> str:
        """The line appended to the source to instantiate this entry point (RMSPROP_KERNEL in the .cu)."""
        c = _CTYPE
        return (f"{macro}({self.name}, {c[self.param_dtype]}, {c[self.state_dtype]}, "
                f"{str(self.momentum).lower()}, {str(self.centered).lower()}, {self.flags})\n")


# One set of NVRTC options for the run-time build and the static report (tools/kernel_report.py).
# CuPy's RawModule appends -ftz=true after the caller's options (NVRTC takes the last), which would flush
# subnormal params and state to zero where torch keeps them; so we call NVRTC ourselves with these.
NVRTC_OPTIONS = ("-std=c++17", "-ftz=false", "-prec-div=true", "-prec-sqrt=true", "-fmad=true")


def nvrtc_arch_option(capability: int, supported: tuple[int, ...]) -> str:
    """-arch for a device: its own SASS when NVRTC knows the arch, else PTX of the newest known one (the
    driver then compiles it at load)."""
    if capability in supported:
        return f"-arch=sm_{capability}"
    older = [a for a in supported if a <= capability]
    return f"-arch=compute_{max(older) if older else min(supported)}"


CACHE_ENV = "RMSPROP_GPU_CACHE_DIR"  # where compiled entry points are kept ("0": nowhere)


def cache_dir() -> Path | None:
    """$RMSPROP_GPU_CACHE_DIR, else $XDG_CACHE_HOME/rmsprop_gpu, else ~/.cache/rmsprop_gpu; None when disabled."""
    where = os.environ.get(CACHE_ENV)
    if where == "0":
        return None
    if where:
        return Path(where)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rmsprop_gpu"


def compile_cubin(capability: int, spec: KernelSpec) -> bytes:
    """One entry point of kernels/rmsprop.cu through CuPy's NVRTC binding with NVRTC_OPTIONS (no -ftz=true
    appended): 0.2-0.6 s once per (layout, flags) and arch, then read from the on-disk cache (keyed by the
    source, the entry point, the options, the arch and NVRTC's version; an unwritable cache is skipped)."""
    from cupy_backends.cuda.libs import nvrtc

    arch = nvrtc_arch_option(capability, tuple(nvrtc.getSupportedArchs()))
    source = kernel_source() + spec.definition()
    key = hashlib.sha256("\0".join((source, *NVRTC_OPTIONS, arch, str(nvrtc.getVersion()))).encode()).hexdigest()
    folder = cache_dir()
    path = folder / f"{spec.name}-{key[:24]}.bin" if folder is not None else None
    if path is not None and path.is_file():
        with contextlib.suppress(OSError):
            return path.read_bytes()
    prog = nvrtc.createProgram(source, "rmsprop.cu", (), ())
    try:
        try:
            nvrtc.compileProgram(prog, (*NVRTC_OPTIONS, arch))
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"NVRTC failed on kernels/rmsprop.cu ({arch}):\n{nvrtc.getProgramLog(prog)}") from e
        binary = nvrtc.getCUBIN(prog) if arch.startswith("-arch=sm_") else nvrtc.getPTX(prog).encode()
    finally:
        nvrtc.destroyProgram(prog)
    if path is not None:
        with contextlib.suppress(OSError):  # written whole or not at all: a reader never sees half a file
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(binary)
            tmp.replace(path)
    return binary


_LOADED_MODULES: list = []  # every module a kernel came from stays loaded (kernels are cached for good)


def _cupy_kernel(device: torch.device, spec: KernelSpec):
    import cupy
    from cupy.cuda import function

    with cupy.cuda.Device(device.index or 0) as dev:
        mod = function.Module()
        mod.load(compile_cubin(int(dev.compute_capability), spec))
        _LOADED_MODULES.append(mod)
        return mod.get_function(spec.name)


def _upload(a: np.ndarray, group: Group, out=None):
    if arr.is_cupy(group.params[0]):
        import cupy

        with cupy.cuda.Device(group.device.index or 0):
            if out is None:
                return cupy.asarray(a)
            out.set(a)  # on CuPy's current stream, where the launch goes
            return out
    return upload_torch(a, group, out)


class CupyBackend(Backend):
    name = "cupy"
    shares_launches = True

    def __init__(self):
        self.tables = TableCache(_upload)
        self.launches = 0
        self._factory: Callable = _cupy_kernel
        self._factory_devices: tuple[str, ...] = ("cuda",)
        self._kernels: dict[tuple[torch.device, KernelSpec], object] = {}
        self._streams: dict[tuple[int, int], object] = {}

    def use_module_factory(self, factory: Callable | None, device_types: tuple[str, ...] = ("cpu",)) -> None:
        """Test seam: build kernels with `factory(device, spec)` for these device types (None restores CuPy)."""
        self._factory = factory or _cupy_kernel
        self._factory_devices = device_types if factory else ("cuda",)
        self._kernels.clear()
        self.tables.clear()

    def unavailable_reason(self, device):
        if self.launch_stubbed and device.type in ("cpu", "cuda"):
            return None
        if device.type not in self._factory_devices:
            return f"CuPy kernels need a CUDA device, got {device.type}"
        if self._factory is not _cupy_kernel:
            return None
        if importlib.util.find_spec("cupy") is None:
            return "cupy is not installed (pip install 'rmsprop-gpu[cupy-cuda13]' or '[cupy-cuda12]')"
        try:
            import cupy

            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # CUDARuntimeError without a driver, ImportError of a broken install
            return f"CuPy cannot reach a GPU ({type(e).__name__}: {e})"
        if (device.index or 0) >= n:
            return f"CuPy sees {n} CUDA device(s), not {device}"
        return None

    def unsupported_reason(self, group: Group, hyper: Hyper):
        if arr.is_cupy(group.params[0]):
            if group.param_dtype == "bfloat16":
                return "CuPy arrays have no bfloat16 (use torch tensors for bf16)"
            for name in ("lr", "grad_scale", "found_inf"):
                if isinstance(getattr(hyper, name), torch.Tensor) and getattr(hyper, name).device.type != "cpu":
                    return f"{name} must be a float (or CPU tensor) with CuPy arrays"
        return kernel_unsupported_reason(group, hyper)

    def describe(self):
        if self._factory is not _cupy_kernel:
            return {"module": "test module factory"}
        import cupy

        return {"version": cupy.__version__}

    def kernel(self, device: torch.device, spec: KernelSpec):
        key = (device, spec)
        k = self._kernels.get(key)
        if k is None:
            k = self._kernels[key] = self._factory(device, spec)
        return k

    def _stream(self, group: Group):
        if group.device.type != "cuda":
            return None
        import cupy

        if arr.is_cupy(group.params[0]):
            return cupy.cuda.get_current_stream()
        ts = torch.cuda.current_stream(group.device)
        key = (ts.device_index, ts.cuda_stream)
        cs = self._streams.get(key)
        if cs is None:  # wrap each torch stream once (CuPy 14: Stream.from_external; ExternalStream before)
            if hasattr(cupy.cuda.Stream, "from_external") and hasattr(ts, "__cuda_stream__"):
                cs = cupy.cuda.Stream.from_external(ts)
            else:
                cs = cupy.cuda.ExternalStream(ts.cuda_stream, ts.device_index)
            self._streams[key] = cs
        return cs

    def prepare(self, group: Group, hyper: Hyper, owned: bool = False, previous=None):
        return prepare_launch(group, self.tables.owned() if owned else self.tables, previous)

    def repoint(self, launch, group: Group, moved: dict):
        return repoint_launch(launch, group, self.tables, moved)

    def run(self, launch, group: Group, hypers: list[Hyper]) -> None:
        flags, grad_scale, found_inf = launch_args(launch, group, hypers)
        spec = KernelSpec(group.param_dtype, group.state_dtype, group.momentum_buffers is not None,
                          group.grad_avgs is not None, flags)
        args = (_ptr(launch.tensors), _ptr(launch.blocks), _ptr(launch.hyper.buffer), _ptr(grad_scale),
                _ptr(found_inf), np.int32(flags))
        launch.before(group)
        if not self.launch_stubbed:
            with self._device(group):  # CuPy loads modules and launches on its current device: the group's
                fn = self.kernel(group.device, spec)
                fn((launch.n_blocks,), (abi.threads(group.state_dtype),), args, stream=self._stream(group))
        self.launches += 1
        launch.after(group, hypers[0].found_inf)

    @staticmethod
    def _device(group: Group):
        if group.device.type != "cuda":
            return contextlib.nullcontext()
        import cupy

        return cupy.cuda.Device(group.device.index or 0)


def _ptr(x) -> np.uint64:
    return np.uint64(arr.ptr(x) if x is not None else 0)
