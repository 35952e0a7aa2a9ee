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

    def __init__(self, upload: Callable[[np.ndarray, Group], Any], max_entries: int = 32, stats=None):
        self._upload = upload
        self._max = max_entries  # 0: keep nothing (a step plan owns its tables itself)
        self._entries: OrderedDict[tuple, tuple[Any, Any, int]] = OrderedDict()
        self.builds = 0  # how many tables were built (tests and benchmarks read it)
        self._stats = stats  # another cache whose counter also counts these builds

    def owned(self) -> TableCache:
        """A cache that retains nothing, for a holder that keeps its tables alive itself (the step plan)."""
        return TableCache(self._upload, max_entries=0, stats=self)

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
        if self._stats is not None:
            self._stats.builds += 1
        if self._max:
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


def same_layout(x: torch.Tensor, shape, strides) -> bool:
    """x is dense with these strides (dims of size 1 may have any stride): flat memory, element for element."""
    if tuple(x.shape) != tuple(shape):
        return False
    if x.numel() <= 1:
        return True
    return all(a == b for n, a, b in zip(shape, x.stride(), strides) if n != 1)


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill numel consecutive slots in some order of dims."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def dense_strides(p: torch.Tensor):
    """The layout every tensor of p's row must share: p's own strides when p is non-overlapping and dense
    (contiguous, channels_last, transposed...), else contiguous (p then goes through a temporary)."""
    if p.numel() <= 1 or is_dense(p):
        return p.stride()
    return torch.empty(p.shape, device="meta").stride()


@dataclass
class Launch:
    """One prepared launch: its tables (owned by whoever holds the Launch), and the temporaries of tensors whose
    layout differs from their param's. Temporaries are allocated once, so table pointers stay valid; each run
    copies inputs in before the kernel and outputs back after it."""

    tensors: Any
    blocks: Any
    n_blocks: int
    copy_in: list = field(default_factory=list)  # (temporary, original)
    copy_out: list = field(default_factory=list)  # (original, temporary)
    host_steps: list = field(default_factory=list)  # step counters the kernel cannot reach (e.g. on the CPU)
    written: list = field(default_factory=list)  # tensors whose autograd version the step bumps
    rows: tuple = ()  # the addresses the tables hold: a re-prepare with the same rows reuses them

    def before(self) -> None:
        for tmp, orig in self.copy_in:
            tmp.copy_(orig)

    def after(self, found_inf) -> None:
        for orig, tmp in self.copy_out:
            orig.copy_(tmp)
        advance_steps(self.host_steps, found_inf)
        if self.written:
            torch._C._increment_version(self.written)  # autograd sees the in-place update (raw-pointer writes)


def _device_scalar(t, device):
    if t is None:
        return None
    if isinstance(t, torch.Tensor) and (t.device != device or t.dtype != torch.float32 or t.dim() != 0):
        return t.to(device=device, dtype=torch.float32).reshape(())
    return t


def scalar_args(group: Group, hyper: Hyper) -> tuple[int, float, Any, Any, Any]:
    """Per-step launch arguments: flags, lr value, lr / grad_scale / found_inf device scalars (no host read)."""
    lr, lr_tensor = hyper.lr, None
    if isinstance(lr, torch.Tensor):
        if lr.device == group.device:
            lr_tensor, lr = _device_scalar(lr, group.device), 0.0
        else:
            lr = float(lr)  # a CPU scalar: reading it needs no device sync
    return (variant_flags(hyper, lr_tensor is not None), float(lr), lr_tensor,
            _device_scalar(hyper.grad_scale, group.device), _device_scalar(hyper.found_inf, group.device))


def prepare_launch(group: Group, cache, previous: Launch | None = None) -> Launch:
    """Tables and temporaries of one group. Writes nothing the caller owns."""
    copy_in, copy_out, written = [], [], []
    torch_tensors = isinstance(group.params[0], torch.Tensor)

    def slot(x, shape, strides, output: bool):
        if not torch_tensors or same_layout(x, shape, strides):
            return x
        tmp = torch.empty_strided(shape, strides, dtype=x.dtype, device=x.device)
        copy_in.append((tmp, x))
        if output:
            copy_out.append((x, tmp))
        return tmp

    n = len(group)
    host_steps, rows = [], []
    for i in range(n):
        p = group.params[i]
        if torch_tensors:
            strides = dense_strides(p)
            written.append(p)
        else:
            strides = None
        row = [slot(p, p.shape, strides, True), slot(group.grads[i], p.shape, strides, False)]
        for states in (group.square_avgs, group.momentum_buffers, group.grad_avgs):
            if states is None:
                row.append(None)
            else:
                row.append(slot(states[i], p.shape, strides, True))
                if torch_tensors:
                    written.append(states[i])
        step_ptr = 0
        if group.steps is not None:
            s = group.steps[i]
            if s.device == group.device and s.dtype == torch.float32 and s.is_contiguous():
                step_ptr = s.data_ptr()
            else:
                host_steps.append(s)
        rows.append((*(arr.ptr(x) if x is not None else 0 for x in row), step_ptr, arr.numel(p)))
    rows = tuple(rows)
    if previous is not None and previous.rows == rows:  # e.g. grads re-allocated at the same addresses
        tensors, blocks, n_blocks = previous.tensors, previous.blocks, previous.n_blocks
    else:
        tensors, blocks, n_blocks = cache.get(group, list(rows))
    return Launch(tensors, blocks, n_blocks, copy_in, copy_out, host_steps, written, rows)
