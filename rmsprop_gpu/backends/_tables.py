"""Filling the kernel contract shared by the Triton and CuPy backends: tensor table, block list, hyper table.

The layout (columns, BLOCK, flag bits) is rmsprop_gpu/abi.py's. Every tensor owns at least one block, so
zero-element tensors still get their step counter advanced. 8-bit state (uint8: rmsprop_gpu/quantize.py) is one
address too: codes, then the blocks' scale bytes. 40 param groups of one layout are one launch with 40 slots.

The tensor and block tables are built on the host once per set of addresses and uploaded without a host
sync; the hyper table is persistent and rewritten (uploaded) only when a value changes, e.g. a scheduler's lr.
Launch-wide switches (flags) select what is read and computed; they never carry a value.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import is_
from typing import Any

import numpy as np
import torch

from .. import _arrays as arr
from .. import abi
from .._arrays import dense_strides, same_layout
from .._contract import KERNEL_PARAM_DTYPES as KERNEL_DTYPES
from .._contract import Group, Hyper
from ..options import launch_flags
from .base import advance_steps

# the contract's constants (rmsprop_gpu/abi.py owns them; both kernels are generated from the same source)
BLOCK, ROW, HYPER_ROW, H_SEED, SLOT_MASK, STEP_F64_BIT = (abi.BLOCK, abi.ROW, abi.HYPER_ROW, abi.H_SEED,
                                                          abi.SLOT_MASK, abi.STEP_F64_BIT)
H_LR = abi.H["LR"]  # the first float32 column: the values in abi.HYPER_FLOATS order
NUMEL_COL, SLOT_COL = abi.COL["NUMEL"], abi.COL["SLOT"]


def kernel_unsupported_reason(group: Group, hyper: Hyper | None = None) -> str | None:
    if group.read_steps and any(s.device != group.device or s.dtype not in (torch.float32, torch.float64)
                                for s in group.steps or ()):
        return ("options whose kernels read step counters (bias correction, stochastic rounding) and 8-bit state "
                "need float64 (or float32) step counters on "
                "the params' device (the kernel reads them)")
    if group.param_dtype not in KERNEL_DTYPES:
        return f"params of dtype {group.param_dtype} (kernels take {', '.join(KERNEL_DTYPES)})"
    return None


def build_tables(rows: list[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray]:
    """rows: (p, g, v, buf, grad_avg, step, numel[, slot]) per tensor."""
    tensors = np.zeros((max(len(rows), 1), ROW), dtype=np.int64)
    if rows:
        a = np.asarray(rows, dtype=np.uint64).view(np.int64)
        tensors[:, : a.shape[1]] = a
    numels = tensors[: len(rows), NUMEL_COL]
    nblocks = np.maximum(1, (numels + BLOCK - 1) // BLOCK)
    tensor_idx = np.repeat(np.arange(len(rows), dtype=np.int64), nblocks)
    first = np.repeat(np.cumsum(nblocks) - nblocks, nblocks)
    chunk = np.arange(int(nblocks.sum()), dtype=np.int64) - first
    return tensors, (tensor_idx << 32) | chunk


class TableCache:
    """LRU of uploaded tables keyed by every address and size they hold."""

    def __init__(self, upload: Callable[..., Any], max_entries: int = 32, stats=None):
        self._upload = upload  # upload(host array, group, out=None): a new device copy, or written into out
        self._max = max_entries  # 0: keep nothing (a step plan owns its tables itself)
        self._entries: OrderedDict[tuple, tuple[Any, Any, int, HyperTable]] = OrderedDict()
        self.builds = 0  # how many tables were built (tests and benchmarks read it)
        self.hyper_uploads = 0  # how many times hyperparameter values were uploaded
        self._stats = stats  # another cache whose counters also count these

    def owned(self) -> TableCache:
        """A cache that retains nothing, for a holder that keeps its tables alive itself (the step plan)."""
        return TableCache(self._upload, max_entries=0, stats=self)

    def get(self, group: Group, rows: list[tuple[int, ...]]):
        key = (str(group.device), tuple(rows))
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit
        tensors, blocks = build_tables(rows)
        n_slots = 1 + max((r[SLOT_COL] & SLOT_MASK for r in rows), default=0) if rows and len(rows[0]) > SLOT_COL else 1
        device_tensors = self.upload_tensors(tensors, group)
        hyper = HyperTable(self._upload(np.zeros((n_slots, HYPER_ROW), dtype=np.int64), group), self._upload,
                           self._stats or self)
        entry = (device_tensors, self._upload(blocks, group), int(blocks.shape[0]), hyper, tensors)
        if self._max:
            self._entries[key] = entry
            if len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return entry

    def upload_tensors(self, tensors: np.ndarray, group: Group):
        """A new device copy of a tensor table (counted as a build)."""
        if group.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "rmsprop_gpu: this step needs new tensor tables (a first step, or tensors re-allocated) while a "
                "CUDA graph is being captured, and an upload cannot be captured. Warm up first: run the step "
                "eagerly (e.g. 3 iterations on a side stream) before capturing, and keep grads in place "
                "(zero_grad(set_to_none=False)) so that capture finds the same tensors."
            )
        self.builds += 1
        if self._stats is not None:
            self._stats.builds += 1
        return self._upload(tensors, group)

    def clear(self) -> None:
        self._entries.clear()


def upload_torch(a: np.ndarray, group: Group, out: torch.Tensor | None = None) -> torch.Tensor:
    """A device copy of `a`, or `a` written into `out`. On CUDA: pinned + non_blocking, queued on the current
    stream with no host sync (torch's pinned allocator keeps the source until the copy has run)."""
    t = torch.from_numpy(a)
    if group.device.type == "cpu":
        if out is None:
            return t
        return out.copy_(t)
    src = t.pin_memory()
    if out is None:
        return src.to(group.device, non_blocking=True)
    return out.copy_(src, non_blocking=True)


class HyperTable:
    """The persistent per-slot hyperparameter table of one launch. Written only when a value changed, so a warm
    step with fixed values uploads nothing (and can be captured in a CUDA graph, which then reads the table)."""

    def __init__(self, buffer, upload, stats):
        self.buffer = buffer  # int64 [S, HYPER_ROW] on the device
        self.floats = buffer.view(torch.float32) if isinstance(buffer, torch.Tensor) else None  # Triton's view
        self._upload = upload
        self._stats = stats
        self.values: tuple | None = None  # what the device table holds now
        self.keep: list = []  # device lr scalars converted for the kernel: alive until the next write

    def write(self, group: Group, values: tuple, keep: list) -> None:
        if values == self.values:
            return
        if group.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "rmsprop_gpu: hyperparameter values (lr, alpha, eps, weight_decay, momentum, maximize) changed "
                "while a CUDA graph is being captured, and an upload cannot be captured. Capture with the values "
                "of the warm-up step, and give lr as a CUDA tensor (capturable=True) to change it between replays."
            )
        a = np.zeros((len(values), HYPER_ROW), dtype=np.int64)
        f, u = a.view(np.float32), a.view(np.uint32)
        for s, (lr_addr, seed, *vals) in enumerate(values):
            a[s, 0] = lr_addr
            f[s, H_LR: H_LR + len(vals)] = vals
            u[s, H_SEED] = seed  # raw bits (a float32 round trip could change a NaN pattern)
        self._upload(a, group, out=self.buffer)
        self.values, self.keep = values, keep
        self._stats.hyper_uploads += 1


# the table's address columns and the Group list each one comes from
COLUMNS = tuple((abi.COL[c], name) for c, name in (
    ("P", "params"), ("G", "grads"), ("V", "square_avgs"), ("BUF", "momentum_buffers"), ("GRAD_AVG", "grad_avgs"),
    ("STEP", "steps")))


@dataclass
class Launch:
    """One prepared launch: its tables and the temporaries of tensors whose layout differs from their param's.
    It keeps addresses, never the caller's tensors: each run is given the group's tensors of that call (bound by
    the plan, which confirmed that they are what the tables were built from), so nothing a user frees (a grad
    after zero_grad(set_to_none=True)) is kept alive. Temporaries are owned here, so table pointers stay valid;
    each run copies inputs into them before the kernel and outputs back after it."""

    tensors: Any
    blocks: Any
    n_blocks: int
    copy_in: list = field(default_factory=list)  # (temporary, Group list name, index): filled before the kernel
    copy_out: list = field(default_factory=list)  # (Group list name, index, temporary): copied back after it
    host_steps: list = field(default_factory=list)  # indexes of step counters the kernel does not advance
    rows: tuple = ()  # the table's rows as built: a re-prepare with the same rows reuses the tables
    hyper: HyperTable | None = None  # per-slot hyperparameters the kernel reads
    host_tensors: Any = None  # the tensor table as uploaded (host copy), for re-pointing moved tensors
    direct: dict = field(default_factory=dict)  # column -> indexes whose cell holds the tensor's own address
    last: tuple = (None, None, None)  # (hypers, launch_args' result, device lrs seen): reused while they repeat

    def before(self, group: Group) -> None:
        for tmp, name, i in self.copy_in:
            tmp.copy_(getattr(group, name)[i])

    def after(self, group: Group, found_inf) -> None:
        for name, i, tmp in self.copy_out:
            getattr(group, name)[i].copy_(tmp)
        if self.host_steps:
            advance_steps([group.steps[i] for i in self.host_steps], found_inf)
        if isinstance(group.params[0], torch.Tensor):  # autograd sees the in-place update (raw-pointer writes)
            _increment_versions(group.written())


try:  # one call for a list of tensors (torch >= 2.5); torch 2.4 takes one tensor a call
    torch._C._increment_version([])
    _increment_versions = torch._C._increment_version
except (RuntimeError, TypeError):  # pragma: no cover - torch 2.4

    def _increment_versions(tensors: list) -> None:
        for t in tensors:
            torch._C._increment_version(t)


def _device_scalar(t, device):
    if t is None:
        return None
    if isinstance(t, torch.Tensor) and (t.device != device or t.dtype != torch.float32 or t.dim() != 0):
        return t.to(device=device, dtype=torch.float32).reshape(())
    return t


def launch_args(launch: Launch, group: Group, hypers: list[Hyper]) -> tuple[int, Any, Any]:
    """Per-step: the hyper table brought up to date (uploaded only on change), then the launch's flags and its
    grad_scale / found_inf device scalars. No host read of a device value."""
    last_hypers, last_args, lr_seen = launch.last
    if last_hypers is not None and len(last_hypers) == len(hypers) and all(map(is_, hypers, last_hypers)) and (
            lr_seen is None or lr_seen == list(map(_lr_seen, hypers))):  # a device lr is read at its address
        return last_args
    lr_on_device = isinstance(hypers[0].lr, torch.Tensor) and hypers[0].lr.device == group.device
    values, keep = [], []
    for h in hypers:
        lr, lr_addr = h.lr, 0
        if lr_on_device:
            lr_t = _device_scalar(lr, group.device)
            keep.append(lr_t)
            lr, lr_addr = 0.0, arr.ptr(lr_t)
        values.append((lr_addr, h.sr_seed, float(lr), h.alpha, 1.0 - h.alpha, h.eps, h.weight_decay, h.momentum,
                       -1.0 if h.maximize else 1.0))
    launch.hyper.write(group, tuple(values), keep)
    h = hypers[0]
    args = (launch_flags(hypers, lr_on_device), _device_scalar(h.grad_scale, group.device),
            _device_scalar(h.found_inf, group.device))
    # the same Hyper objects (the optimizer reuses them while values repeat) mean the same values, unless lr is a
    # tensor read on the host or converted for the kernel
    stable = all(not isinstance(x.lr, torch.Tensor) for x in hypers) or (
        lr_on_device and all(t is x.lr for t, x in zip(keep, hypers)))
    launch.last = ((list(hypers), args, list(map(_lr_seen, hypers)) if lr_on_device else None)
                   if stable and h.grad_scale is None and h.found_inf is None else (None, None, None))
    return args


def _lr_seen(h: Hyper) -> tuple:
    """What the hyper table took from a device lr: its address and dtype (lr.data = ... keeps the object)."""
    return h.lr.data_ptr(), h.lr.dtype


def prepare_launch(group: Group, cache, previous: Launch | None = None) -> Launch:
    """Tables and temporaries of one group. Writes nothing the caller owns."""
    copy_in, copy_out = [], []
    torch_tensors = isinstance(group.params[0], torch.Tensor)
    direct = {col: [] for col, _ in COLUMNS}

    def slot(x, name, i, shape, strides, output: bool):
        if not torch_tensors or same_layout(x, shape, strides):
            direct[COLUMN_OF[name]].append(i)
            return x
        tmp = torch.empty_strided(shape, strides, dtype=x.dtype, device=x.device)
        copy_in.append((tmp, name, i))
        if output:
            copy_out.append((name, i, tmp))
        return tmp

    host_steps, rows = [], []
    for i in range(len(group)):
        p = group.params[i]
        strides = dense_strides(p) if torch_tensors else None
        row = [slot(p, "params", i, p.shape, strides, True), slot(group.grads[i], "grads", i, p.shape, strides, False)]
        for name in ("square_avgs", "momentum_buffers", "grad_avgs"):
            states = getattr(group, name)
            if states is None:
                row.append(None)
            elif arr.dtype_name(states[i]) == "uint8":  # 8-bit: flat, already in the kernel's order
                direct[COLUMN_OF[name]].append(i)
                row.append(states[i])
            else:
                row.append(slot(states[i], name, i, p.shape, strides, True))
        step_ptr, step64 = 0, 0
        if group.steps is not None:
            s = group.steps[i]
            step64 = int(s.dtype == torch.float64)
            # the kernel writes float32 counters; it only reads those it needs (bias correction, SR, 8-bit state:
            # float32 or float64), and then the host advances them
            if s.device == group.device and s.is_contiguous() and (s.dtype == torch.float32 or
                                                                   (step64 and group.read_steps)):
                step_ptr = s.data_ptr()
                direct[abi.COL["STEP"]].append(i)
            if group.read_steps or not step_ptr:
                host_steps.append(i)
        slot_id = group.slots[i] if group.slots is not None else 0
        stream = group.streams[i] if group.streams else i
        rows.append((*(arr.ptr(x) if x is not None else 0 for x in row), step_ptr, arr.numel(p),
                     slot_id | step64 << STEP_F64_BIT | (stream & 0xFFFFFFFF) << 32))
    rows = tuple(rows)
    if previous is not None and previous.rows == rows:  # e.g. grads re-allocated at the same addresses
        tensors, blocks, n_blocks, hyper, host = (previous.tensors, previous.blocks, previous.n_blocks,
                                                  previous.hyper, previous.host_tensors)
    else:
        tensors, blocks, n_blocks, hyper, host = cache.get(group, list(rows))
    return Launch(tensors, blocks, n_blocks, copy_in, copy_out, host_steps, rows, hyper, host,
                  {col: np.asarray(ix, dtype=np.int64) for col, ix in direct.items() if ix})


COLUMN_OF = {name: col for col, name in COLUMNS}


def repoint_launch(launch: Launch, group: Group, cache: TableCache, moved: dict) -> Launch:
    """The group's tensors moved (same shapes, dtypes, strides; new addresses, e.g. grads re-allocated after
    zero_grad(set_to_none=True)): write their new addresses into the table and upload it once. moved: Group list
    name -> the new addresses of that whole list (the plan read them while confirming), for the lists that
    moved. Tensors that go through a temporary keep the temporary's address."""
    host = launch.host_tensors.copy()
    for name, ptrs in moved.items():
        col = COLUMN_OF[name]
        ix = launch.direct.get(col)
        if ix is not None:
            host[ix, col] = np.asarray(ptrs, dtype=np.uint64).view(np.int64)[ix]
    if not np.array_equal(host, launch.host_tensors):
        launch.tensors = cache.upload_tensors(host, group)
        launch.host_tensors, launch.rows = host, None
    return launch
