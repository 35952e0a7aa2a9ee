"""The GPU suite, run by `make gpu-check` on a CUDA machine (python3 -m perf.gpu_check).

`make gpu-check-cpu` runs the same tests on the CPU as a dry run (RMSPROP_GPU_CHECK_DEVICE=cpu): Triton through
its interpreter, kernels/rmsprop.cu through the g++ shim, small sizes; tests that need CUDA itself (streams,
graphs, the profiler, sync debug mode) are skipped there and only there. Elsewhere this folder is not collected,
so the CPU suite (`make test`) is unchanged. Run with --confcutdir=tests/gpu: tests/conftest.py (which forces the
interpreter for the CPU suite) must not load on a GPU.
"""

import os

import pytest

DRY_RUN = os.environ.get("RMSPROP_GPU_CHECK_DEVICE") == "cpu"
if DRY_RUN:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports kernels/rmsprop.py

import torch  # noqa: E402

ON_CUDA = torch.cuda.is_available() and not DRY_RUN
if not (ON_CUDA or DRY_RUN):
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True, scope="session")
def _kernels_where_they_run():
    if DRY_RUN:
        from rmsprop_gpu.backends import BACKENDS
        from tools.cuda_cpu.cpu_module import cpu_module_factory

        BACKENDS["cupy"].use_module_factory(cpu_module_factory, device_types=("cpu",))
    yield
