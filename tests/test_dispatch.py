"""Backend selection: rules, env override, simulated absence, clear errors; a clean import."""

import subprocess
import sys

import pytest
import torch

import rmsprop_gpu
from rmsprop_gpu import backends
from rmsprop_gpu._contract import Group
from rmsprop_gpu.options import make

H = make(0.01, 0.99, 1e-8, 0.0, 0.0)


def group(device="cpu", dtype="float32"):
    return Group(torch.device(device), dtype, dtype, [torch.zeros(1)])


def test_cpu_selects_torch_and_env_override(monkeypatch):
    assert backends.select(None, group(), H).name == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "triton")  # the interpreter makes triton usable on CPU here
    assert backends.select(None, group(), H).name == "triton"
    assert backends.select("torch", group(), H).name == "torch"  # the argument beats the environment
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="Unknown backend"):
        backends.select(None, group(), H)


def test_cuda_preference_order_with_backends_simulated(monkeypatch):
    usable = {"triton": None, "cupy": None}
    for name in usable:
        monkeypatch.setattr(backends.BACKENDS[name], "unavailable_reason", lambda d, n=name: usable[n])
    g = group("cuda")
    assert backends.select(None, g, H).name == "triton"
    usable["triton"] = "triton is not installed"
    assert backends.select(None, g, H).name == "cupy"
    usable["cupy"] = "cupy is not installed"
    assert backends.select(None, g, H).name == "torch"
    with pytest.raises(backends.BackendUnavailableError, match="triton is not installed"):
        backends.select("triton", g, H)
    # float64 on CUDA: kernels do not take it, auto falls back to torch
    usable["triton"] = usable["cupy"] = None
    assert backends.select(None, group("cuda", "float64"), H).name == "torch"


def test_missing_packages_are_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("triton", "cupy") else real(n, *a))
    assert "pip install 'rmsprop-gpu[triton]'" in backends.BACKENDS["triton"].unavailable_reason(
        torch.device("cuda"))
    backends.BACKENDS["cupy"].use_module_factory(None)
    try:
        assert "cupy is not installed" in backends.BACKENDS["cupy"].unavailable_reason(torch.device("cuda"))
    finally:
        from tools.cuda_cpu.cpu_module import cpu_module_factory

        backends.BACKENDS["cupy"].use_module_factory(cpu_module_factory)


def test_real_cupy_reports_the_gpu_it_sees_and_refuses_cpu_tensors():
    """Real CuPy: usable for CUDA exactly when it reaches a GPU (none on CI: the reason says so); backend='cupy'
    on CPU tensors is refused on any machine."""
    cupy_backend = backends.BACKENDS["cupy"]
    cupy_backend.use_module_factory(None)
    try:
        why = cupy_backend.unavailable_reason(torch.device("cuda"))
        try:
            import cupy

            gpus = cupy.cuda.runtime.getDeviceCount()
        except Exception:
            gpus = 0
        if gpus:
            assert why is None
        else:
            assert why is not None and ("GPU" in why or "not installed" in why)
        p = torch.randn(4)
        with pytest.raises(backends.BackendUnavailableError, match="CuPy kernels need a CUDA device"):
            rmsprop_gpu.rmsprop([p], [torch.randn(4)], [torch.zeros(4)], backend="cupy")
        assert rmsprop_gpu.available_backends("cpu")["cupy"]["usable"] is False
    finally:
        from tools.cuda_cpu.cpu_module import cpu_module_factory

        cupy_backend.use_module_factory(cpu_module_factory)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = backends.BACKENDS["triton"].unavailable_reason(torch.device("cpu"))
    assert "need a CUDA device" in why
    with pytest.raises(backends.BackendUnavailableError, match="TRITON_INTERPRET"):
        rmsprop_gpu.rmsprop([torch.randn(3)], [torch.randn(3)], [torch.zeros(3)], backend="triton")


def test_available_backends_reports_every_backend():
    info = rmsprop_gpu.available_backends("cpu")
    assert set(info) == {"triton", "cupy", "torch"}
    assert info["torch"]["usable"] and info["torch"]["reason"] is None
    assert info["triton"]["usable"] and info["triton"]["interpreter"] is True


def test_import_touches_no_device_and_no_kernel_package():
    code = ("import sys, rmsprop_gpu; import torch; "
            "assert 'triton' not in sys.modules and 'cupy' not in sys.modules, sorted(sys.modules); "
            "assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True)
