"""The wheel ships the kernel sources and declares what the import needs."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_kernel_sources(tmp_path):
    # no build isolation: the build uses the installed setuptools (pinned in requirements-test.txt), so the test
    # needs no network (the GPU machine has none)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(tmp_path)], check=True, timeout=600)
    (wheel,) = tmp_path.glob("rmsprop_gpu-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("rmsprop_gpu/kernels/rmsprop.cu", "rmsprop_gpu/kernels/rmsprop.py", "rmsprop_gpu/__init__.py",
              "rmsprop_gpu/backends/_tables.py"):
        assert f in names, f
    meta = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "Requires-Dist: torch" in text and "Requires-Dist: numpy" in text
    assert "Provides-Extra: triton" in text and "Provides-Extra: cupy-cuda13" in text


def test_kernel_sources_found_from_the_installed_package():
    from importlib import resources

    from rmsprop_gpu.backends.cupy_backend import kernel_source

    assert "RMSPROP_ENTRY_POINTS" in kernel_source()
    assert resources.files("rmsprop_gpu.kernels").joinpath("rmsprop.py").is_file()
