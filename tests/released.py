"""Other libraries' RMSprop as released, for tests/test_flavors.py: the optimizer source files of pinned wheels
(requirements-clients.txt), downloaded once (pip download --no-deps) into build/clients and imported on their
own. timm and SB3 as packages pull torchvision / gymnasium; their optimizer files need only torch.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ROOT / "build" / "clients"
PINS = dict(line.split("==") for line in (ROOT / "requirements-clients.txt").read_text().split()
            if "==" in line and not line.startswith("#"))


def _unpacked(dist: str) -> Path:
    """The unpacked wheel of a pinned distribution (downloaded the first time)."""
    version = PINS[dist]
    out = CLIENTS / f"{dist}-{version}"
    if (out / ".done").exists():
        return out
    CLIENTS.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(CLIENTS),
                    f"{dist}=={version}"], check=True)
    wheel = next(CLIENTS.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(out)
    (out / ".done").touch()
    return out


def _load(name: str, path: Path, package: str | None = None):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    if package:
        module.__package__ = package
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def timm_optim():
    """timm/optim/rmsprop_tf.py with its two helper modules, as the package `released_timm_optim`."""
    if "released_timm_optim.rmsprop_tf" in sys.modules:
        return sys.modules["released_timm_optim.rmsprop_tf"]
    src = _unpacked("timm") / "timm" / "optim"
    pkg = types.ModuleType("released_timm_optim")
    pkg.__path__ = [str(src)]
    sys.modules["released_timm_optim"] = pkg
    for helper in ("_types", "_helpers"):
        _load(f"released_timm_optim.{helper}", src / f"{helper}.py", "released_timm_optim")
    return _load("released_timm_optim.rmsprop_tf", src / "rmsprop_tf.py", "released_timm_optim")


def sb3_rmsprop_tf_like():
    """stable_baselines3/common/sb2_compat/rmsprop_tf_like.py."""
    if "released_sb3_rmsprop_tf_like" in sys.modules:
        return sys.modules["released_sb3_rmsprop_tf_like"]
    path = _unpacked("stable-baselines3") / "stable_baselines3" / "common" / "sb2_compat" / "rmsprop_tf_like.py"
    return _load("released_sb3_rmsprop_tf_like", path)


def fastai_optimizer_source() -> str:
    """fastai/optimizer.py's text (the formula the float64 transcription follows; fastai itself needs fastcore)."""
    return (_unpacked("fastai") / "fastai" / "optimizer.py").read_text()
