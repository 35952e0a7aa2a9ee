"""The kernel contract shared by the Triton and CuPy backends: tensor table, block list, launch arguments.

tensor table: int64 [T, ROW]: addresses of param, grad, square_avg, momentum_buffer, grad_avg, step
              (0 where absent or where the step counter lives on the host) and numel.
block list:   int64 [B]: (tensor index << 32) | chunk index; a kernel program / CUDA block updates
              elements [chunk * BLOCK, min((chunk + 1) * BLOCK, numel)) of that tensor. Every tensor owns
              at least one block, so zero-element tensors still get their step counter advanced.

The tables are built on the host once per set of addresses, uploaded without a host sync, and cached:
a new table is built only when some storage changes (e.g. grads re-allocated after zero_grad(set_to_none)).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import _arrays as arr
from .._contract import Group, Hyper
from .base import advance_steps

BLOCK = 2048  # elements per program (Triton) / per CUDA block (256 threads x 8): part of the contract
ROW = 8  # int64 fields per tensor: p, g, v, buf, grad_avg, step, numel, reserved
KERNEL_DTYPES = ("float32", "float16", "bfloat16")

# flag bits (the CUDA kernel reads them at run time; Triton turns each into a constexpr)
MAXIMIZE, WEIGHT_DECAY, EPS_IN_SQRT, LR_ON_DEVICE, GRAD_SCALE, FOUND_INF = (1 << i for i in range(6))


def variant_flags(hyper: Hyper, lr_on_device: bool) -> int:
    return (
        (MAXIMIZE if hyper.maximize else 0)
        | (WEIGHT_DECAY if hyper.weight_decay != 0 else 0)
        | (EPS_IN_SQRT if hyper.eps_in_sqrt else 0)
        | (LR_ON_DEVICE if lr_on_device else 0)
        | (GRAD_SCALE if hyper.grad_scale is not None else 0)
        | (FOUND_INF if hyper.found_inf is not None else 0)
    )


def kernel_unsupported_reason(group: Group) -> str | None:
    if group.param_dtype not in KERNEL_DTYPES:
        return f"params of dtype {group.param_dtype} (kernels take {', '.join(KERNEL_DTYPES)})"
    return None


def build_tables(rows: list[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray]:
    tensors = np.zeros((max(len(rows), 1), ROW), dtype=np.int64)
    if rows:
        tensors[:, :7] = np.asarray(rows, dtype=np.uint64).view(np.int64)
    numels = tensors[: len(rows), 6]
    nblocks = np.maximum(1, (numels + BLOCK - 1) // BLOCK)
    tensor_idx = np.repeat(np.arange(len(rows), dtype=np.int64), nblocks)
    first = np.repeat(np.cumsum(nblocks) - nblocks, nblocks)
    chunk = np.arange(int(nblocks.sum()), dtype=np.int64) - first
    return tensors, (tensor_idx << 32) | chunk


class TableCache:
    """LRU of uploaded tables keyed by every address and size they hold."""

    def __init__(self, upload: Callable[[np.ndarray, Group], Any], max_entries: int = 32):
        self._upload = upload
        self._max = max_entries
        self._entries: OrderedDict[tuple, tuple[Any, Any, int]] = OrderedDict()
        self.builds = 0  # how many tables were built (tests and benchmarks read it)

    def get(self, group: Group, rows: list[tuple[int, ...]]):
        key = (str(group.device), tuple(rows))
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit
        if group.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "rmsprop_gpu: this step needs new tensor tables (a first step, or tensors re-allocated) while a "
                "CUDA graph is being captured, and an upload cannot be captured. Warm up first: run the step "
                "eagerly (e.g. 3 iterations on a side stream) before capturing, and keep grads in place "
                "(zero_grad(set_to_none=False)) so that capture finds the same tensors."
            )
        tensors, blocks = build_tables(rows)
        entry = (self._upload(tensors, group), self._upload(blocks, group), int(blocks.shape[0]))
        self.builds += 1
        self._entries[key] = entry
        if len(self._entries) > self._max:
            self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        self._entries.clear()


def upload_torch(a: np.ndarray, group: Group) -> torch.Tensor:
    t = torch.from_numpy(a)
    if group.device.type == "cpu":
        return t
    # pinned + non_blocking: the copy is queued on the current stream, no host sync
    return t.pin_memory().to(group.device, non_blocking=True)


@dataclass
class Launch:
    """Everything a backend's launcher needs for one group, plus the work to do after the launch."""

    tensors: Any
    blocks: Any
    n_blocks: int
    flags: int
    lr: float
    lr_tensor: Any  # float32 device scalar or None
    grad_scale: Any
    found_inf: Any
    writebacks: list = field(default_factory=list)  # (original, contiguous temporary)
    host_steps: list = field(default_factory=list)
    hyper: Hyper | None = None

    def finish(self) -> None:
        for orig, tmp in self.writebacks:
            orig.copy_(tmp)
        advance_steps(self.host_steps, self.hyper.found_inf if self.hyper else None)


def _device_scalar(t, device):
    if t is None:
        return None
    if isinstance(t, torch.Tensor) and (t.device != device or t.dtype != torch.float32):
        return t.to(device=device, dtype=torch.float32)
    return t


def prepare_launch(group: Group, hyper: Hyper, cache: TableCache) -> Launch:
    """Contiguous views, the cached tables and the scalar arguments of one launch."""
    writebacks = []

    def dense(x, write_back: bool):
        if arr.is_contiguous(x):
            return x
        tmp = x.contiguous()  # slow path for strided views: a copy in and (for outputs) a copy out
        if write_back:
            writebacks.append((x, tmp))
        return tmp

    n = len(group)
    ps = [dense(x, True) for x in group.params]
    gs = [dense(x, False) for x in group.grads]
    vs = [dense(x, True) for x in group.square_avgs]
    bs = [dense(x, True) for x in group.momentum_buffers] if group.momentum_buffers is not None else None
    gas = [dense(x, True) for x in group.grad_avgs] if group.grad_avgs is not None else None
    host_steps, rows = [], []
    for i in range(n):
        step_ptr = 0
        if group.steps is not None:
            s = group.steps[i]
            if s.device == group.device and s.dtype == torch.float32 and s.is_contiguous():
                step_ptr = s.data_ptr()
            else:
                host_steps.append(s)
        rows.append((
            arr.ptr(ps[i]), arr.ptr(gs[i]), arr.ptr(vs[i]),
            arr.ptr(bs[i]) if bs is not None else 0,
            arr.ptr(gas[i]) if gas is not None else 0,
            step_ptr, arr.numel(ps[i]),
        ))
    tensors, blocks, n_blocks = cache.get(group, rows)

    lr, lr_tensor = hyper.lr, None
    if isinstance(lr, torch.Tensor):
        if lr.device == group.device:
            lr_tensor, lr = _device_scalar(lr, group.device), 0.0
        else:
            lr = float(lr)  # a CPU scalar: reading it needs no device sync
    return Launch(
        tensors, blocks, n_blocks, variant_flags(hyper, lr_tensor is not None), float(lr), lr_tensor,
        _device_scalar(hyper.grad_scale, group.device), _device_scalar(hyper.found_inf, group.device),
        writebacks, host_steps, hyper,
    )
