"""Every kernel test runs the real kernel text on the CPU: Triton through its interpreter, the CUDA C source
compiled by g++ (tools/cuda_cpu) behind the CuPy backend's module seam. Nothing is skipped for lack of a GPU."""

import atexit
import os
import shutil
import tempfile

os.environ["TRITON_INTERPRET"] = "1"  # read when kernels/rmsprop.py is imported: set before anything imports it
os.environ.pop("RMSPROP_GPU_BACKEND", None)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # torch 2.11's compile-worker pool can hang at exit
os.environ["RMSPROP_GPU_CACHE_DIR"] = tempfile.mkdtemp(prefix="rmsprop_gpu_cache_")  # not the user's cache
atexit.register(shutil.rmtree, os.environ["RMSPROP_GPU_CACHE_DIR"], ignore_errors=True)  # leave no dir behind

import importlib.machinery  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# The repo's top-level kernels/ folder (our kernel sources, shipped as rmsprop_gpu.kernels) is importable as
# `kernels` while the repo root is on sys.path (pytest puts it there), and would shadow the PyPI package `kernels`
# that transformers imports (tests/test_clients.py): that one is loaded first, from site-packages.
_ROOT = str(Path(__file__).resolve().parent.parent)
_spec = importlib.machinery.PathFinder.find_spec("kernels", [p for p in sys.path if p not in ("", ".", _ROOT)])
if _spec is not None and "kernels" not in sys.modules:
    sys.modules["kernels"] = _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)

from rmsprop_gpu.backends import BACKENDS  # noqa: E402
from tools.cuda_cpu.cpu_module import cpu_module_factory  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _cuda_source_on_cpu():
    BACKENDS["cupy"].use_module_factory(cpu_module_factory, device_types=("cpu",))
    yield
    BACKENDS["cupy"].use_module_factory(None)
