"""kernels/rmsprop.cu compiled by g++ for the CPU, behind the CuPy backend's kernel factory seam.

CupyBackend.use_module_factory(cpu_module_factory) makes the CuPy backend launch these CPU builds on CPU
tensors: its own table building, argument marshalling and launch configuration run unchanged. One build holds
every layout with its option flags read at run time (RUNTIME_FLAGS); `static_kernel(spec)` builds the
compile-time instantiation the GPU loader uses for one (layout, flags), to check the two agree.
"""

from __future__ import annotations

import ctypes
import hashlib
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ARGTYPES = [ctypes.c_uint, ctypes.c_uint,  # grid, block
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # tensors, blocks, hyper
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]  # grad_scale_ptr, found_inf_ptr, flags


def build_library(static_entry: str | None = None, defines: tuple[str, ...] = ()) -> Path:
    """defines: extra -D macros (e.g. RMSPROP_Q8_PAIR_MIN: sm_90's path where the source has one per arch)."""
    from rmsprop_gpu.backends.cupy_backend import kernel_source  # what the GPU loader compiles: ABI + source

    source = kernel_source()
    digest = hashlib.sha256((source + (HERE / "shim.h").read_text() + (HERE / "launcher.cpp").read_text()
                             + str(static_entry) + str(defines)).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"rmsprop_cu_cpu_{digest}.so"
    if not out.exists():
        cu = out.with_suffix(f".{id(out)}.cu")
        cu.write_text(source)
        tmp = out.with_suffix(f".{id(out)}.tmp.so")
        cmd = ["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-fno-strict-aliasing", "-ffp-contract=off",
               "-Wall", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized", "-Wno-uninitialized",
               f"-I{HERE}", f'-DRMSPROP_CU_PATH="{cu}"', str(HERE / "launcher.cpp"), "-o", str(tmp)]
        if static_entry:
            cmd.insert(-3, f"-DRMSPROP_STATIC_ENTRY={static_entry}")
        for d in defines:
            cmd.insert(-3, f"-D{d}")
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        finally:
            cu.unlink()
        tmp.rename(out)
    return out


class CpuKernel:
    """A launcher with the call signature of a cupy.RawKernel."""

    def __init__(self, fn, spec=None):
        self._fn = fn
        self.spec = spec
        self.calls = 0

    def __call__(self, grid, block, args, stream=None, shared_mem=0):
        assert stream is None, "CPU launches have no stream"
        (gx,), (bx,) = grid, block
        conv = [int(a) if isinstance(a, (np.integer, int)) else float(a) for a in args]
        conv = [None if (t is ctypes.c_void_p and v == 0) else v for t, v in zip(ARGTYPES[2:], conv)]
        self.calls += 1
        self._fn(gx, bx, *conv)


def _launcher(path: Path, name: str):
    fn = getattr(ctypes.CDLL(str(path)), f"launch_{name}")
    fn.argtypes, fn.restype = ARGTYPES, None
    return fn


_LIB: Path | None = None


def cpu_module_factory(device, spec) -> CpuKernel:
    """The run-time-flags launcher of spec's layout (the kernel reads spec.flags from its `flags` argument)."""
    global _LIB
    if _LIB is None:
        _LIB = build_library()
    return CpuKernel(_launcher(_LIB, spec.layout_name), spec)


def static_kernel(spec, defines: tuple[str, ...] = ()) -> CpuKernel:
    """spec's compile-time instantiation, built alone (about 2 s of g++), with -D `defines`."""
    entry = spec.definition("RMSPROP_CPU_LAUNCHER_FLAGS").strip()
    return CpuKernel(_launcher(build_library(entry, defines), spec.name), spec)
