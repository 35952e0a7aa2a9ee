"""kernels/rmsprop.cu compiled by g++ for the CPU, behind the interface of cupy.RawModule.

CupyBackend.use_module_factory(cpu_module_factory) makes the CuPy backend launch these CPU builds on CPU
tensors: its own table building, argument marshalling and launch configuration run unchanged.
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


def cu_path() -> Path:
    from importlib import resources

    from rmsprop_gpu.backends.cupy_backend import kernel_source  # the installed copy the backend loads

    return Path(str(resources.files("rmsprop_gpu.kernels").joinpath("rmsprop.cu"))), kernel_source()


def build_library() -> Path:
    cu, source = cu_path()
    digest = hashlib.sha256((source + (HERE / "shim.h").read_text()
                             + (HERE / "launcher.cpp").read_text()).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"rmsprop_cu_cpu_{digest}.so"
    if not out.exists():
        tmp = out.with_suffix(f".{id(out)}.tmp.so")
        cmd = ["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-fno-strict-aliasing", "-ffp-contract=off",
               "-Wall", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized", "-Wno-uninitialized",
               f"-I{HERE}", f'-DRMSPROP_CU_PATH="{cu}"', str(HERE / "launcher.cpp"), "-o", str(tmp)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        tmp.rename(out)
    return out


class CpuKernel:
    def __init__(self, fn):
        self._fn = fn
        self.calls = 0

    def __call__(self, grid, block, args, stream=None, shared_mem=0):
        assert stream is None, "CPU launches have no stream"
        (gx,), (bx,) = grid, block
        conv = [int(a) if isinstance(a, (np.integer, int)) else float(a) for a in args]
        conv = [None if (t is ctypes.c_void_p and v == 0) else v for t, v in zip(ARGTYPES[2:], conv)]
        self.calls += 1
        self._fn(gx, bx, *conv)


class CpuRawModule:
    """get_function(name) like cupy.RawModule, returning CPU launchers of the same kernels."""

    def __init__(self, path: Path):
        self._lib = ctypes.CDLL(str(path))
        self.kernels: dict[str, CpuKernel] = {}

    def get_function(self, name: str) -> CpuKernel:
        k = self.kernels.get(name)
        if k is None:
            fn = getattr(self._lib, f"launch_{name}")
            fn.argtypes, fn.restype = ARGTYPES, None
            k = self.kernels[name] = CpuKernel(fn)
        return k


_LIB: Path | None = None


def cpu_module_factory(device) -> CpuRawModule:
    global _LIB
    if _LIB is None:
        _LIB = build_library()
    return CpuRawModule(_LIB)
