"""The step contract every backend implements: hyperparameters, tensor groups, validation.

Validation happens here, before any backend writes anything, so a step that fails leaves every
parameter and state tensor untouched.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _arrays as arr
from .options import Hyper
from .quantize import q8_nbytes

STATE_KEYS = ("square_avg", "momentum_buffer", "grad_avg")
# a Group's tensor lists, in the order a plan confirms them (grads last: they alone move every step)
TENSOR_LISTS = ("params", "square_avgs", "momentum_buffers", "grad_avgs", "steps", "grads")
FLOAT32_MAX = 3.4028234663852886e38
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
SIXTEEN_BIT = ("float16", "bfloat16")
KERNEL_PARAM_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class Group:
    """Tensors of one (device, param dtype, state dtype): what one kernel launch updates."""

    device: torch.device
    param_dtype: str
    state_dtype: str
    params: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    square_avgs: list = field(default_factory=list)
    momentum_buffers: list | None = None
    grad_avgs: list | None = None
    steps: list | None = None  # step counters (float scalars) or None when the caller keeps none
    slots: list | None = None  # per tensor: which Hyper of the launch applies (None: all use the first)
    index: list = field(default_factory=list)  # per tensor: its position in the caller's lists
    # per tensor: its random stream's id (stochastic rounding, 8-bit codes): stable across launches and layouts,
    # the param's position in the optimizer (its state_dict id), or in the caller's lists
    streams: list = field(default_factory=list)
    read_steps: bool = False  # bias correction: the kernels read each step counter, the host advances it

    def __len__(self) -> int:
        return len(self.params)

    def written(self) -> list:
        """The tensors a step writes: params and state (autograd's version counters are bumped for them)."""
        out = self.params + self.square_avgs
        for states in (self.momentum_buffers, self.grad_avgs):
            if states is not None:
                out = out + states
        return out

    def bound(self, lists: dict) -> Group:
        """This group's layout and bookkeeping with these tensor lists (Group field name -> list)."""
        return dataclasses.replace(self, **lists)

    def unbound(self) -> Group:
        """This group without its tensors: what a cached plan keeps (the tensors are given to each run)."""
        return self.bound({name: None if getattr(self, name) is None else [] for name in TENSOR_LISTS})

    def subset(self, index: list[int]) -> Group:
        """The group of these tensors (in this order), in slot 0."""
        pick = lambda xs: None if xs is None else [xs[i] for i in index]  # noqa: E731
        return Group(self.device, self.param_dtype, self.state_dtype, pick(self.params), pick(self.grads),
                     pick(self.square_avgs), pick(self.momentum_buffers), pick(self.grad_avgs), pick(self.steps),
                     index=pick(self.index), streams=pick(self.streams), read_steps=self.read_steps)

    def split(self) -> list[Group]:
        """One group per tensor (for foreach=False: one launch per tensor, the classic layout)."""
        return [self.subset([i]) for i in range(len(self))]

    def by_slot(self, hypers: list) -> list[tuple[Group, Any]]:
        """(group, hyper) per slot, for a backend that runs one hyper at a time."""
        if self.slots is None or len(hypers) == 1:
            return [(self, hypers[0])]
        return [(self.subset([i for i, s in enumerate(self.slots) if s == k]), h) for k, h in enumerate(hypers)]

    @staticmethod
    def merge(parts: list[Group]) -> Group:
        """One launch's group from several param groups' groups of one layout: part k is slot k."""
        first = parts[0]
        cat = lambda name: None if getattr(first, name) is None else [  # noqa: E731
            x for g in parts for x in getattr(g, name)]
        return Group(first.device, first.param_dtype, first.state_dtype, cat("params"), cat("grads"),
                     cat("square_avgs"), cat("momentum_buffers"), cat("grad_avgs"), cat("steps"),
                     [k for k, g in enumerate(parts) for _ in range(len(g))], cat("index"), cat("streams"),
                     first.read_steps)


def _check_nonneg(name: str, value) -> None:
    if not value >= 0.0:  # also refuses NaN
        raise ValueError(f"Invalid {name}: {value}")


def _number(name: str, value) -> float:
    """A Python float from any real number torch accepts (numpy scalars, 1-element real tensors), else a clear
    error."""
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() and not value.is_meta:
        return scalar(value)
    raise ValueError(f"Invalid {name}: {value!r} (expected a real number or a 1-element real tensor)")


def scalar(value) -> float:
    """float() of a hyperparameter; a tensor one (torch takes 1-element tensors for alpha, eps, weight_decay,
    momentum) is read on the host each step, a sync for a CUDA tensor."""
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def validate_hyperparameters(lr, alpha, eps, weight_decay, momentum, *, read_tensor_lr: bool = True) -> None:
    """torch.optim.RMSprop's checks and messages. Like torch, inf passes (and gives inf/NaN params, as torch's
    step does); NaN and negative values are refused. Numpy scalars are accepted, as torch accepts them."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not (lr.is_floating_point()):
            raise ValueError(f"Tensor lr must be floating point, got {lr.dtype}")
        if lr.device.type == "meta":
            raise ValueError("Tensor lr is on the meta device: it holds no value")
        if read_tensor_lr and lr.device.type == "cpu":
            _check_nonneg("learning rate", scalar(lr))
    else:
        _check_nonneg("learning rate", _number("learning rate", lr))
    for name, v in (("epsilon value", eps), ("momentum value", momentum), ("weight_decay value", weight_decay),
                    ("alpha value", alpha)):
        _check_nonneg(name, _number(name, v))


def check_float32_range(hyper: Hyper) -> None:
    """lr and weight_decay beyond float32: torch's float32 step raises (scalar overflow), so do we, before any
    write. (eps, alpha and momentum overflow to inf in torch without an error, and in the kernels alike.)"""
    for name in ("lr", "weight_decay"):
        v = getattr(hyper, name)
        if not isinstance(v, torch.Tensor) and v != float("inf") and abs(v) > FLOAT32_MAX:
            raise RuntimeError(f"value cannot be converted to type float without overflow: {name}={v}")


def _as_real(t):
    """The plain tensor the kernels update: the local shard of a DTensor (FSDP2), the real view of a complex."""
    if type(t).__name__ == "DTensor":
        t = t.to_local()
    return torch.view_as_real(t) if isinstance(t, torch.Tensor) and t.is_complex() else t


def _check_state(i: int, name: str, param, state, param_dtype: str) -> str:
    if state is None:
        raise ValueError(f"{name}[{i}] is missing")
    if arr.is_sparse(state):
        raise RuntimeError(f"{name}[{i}] is sparse; RMSprop state must be dense")
    quantized = arr.dtype_name(state) == "uint8"  # 8-bit blockwise state (rmsprop_gpu/quantize.py)
    if quantized:
        _check_quantized_state(i, name, param, state, param_dtype)
    elif tuple(state.shape) != tuple(param.shape):
        raise ValueError(f"{name}[{i}] has shape {tuple(state.shape)}, its param {tuple(param.shape)}")
    if arr.device_of(state) != arr.device_of(param):
        raise ValueError(f"{name}[{i}] is on {arr.device_of(state)}, its param on {arr.device_of(param)}")
    if quantized:
        return "uint8"
    sd = arr.dtype_name(state)
    if sd != param_dtype and not (param_dtype in SIXTEEN_BIT and sd == "float32"):
        raise ValueError(
            f"{name}[{i}] has dtype {sd}; state must have its param's dtype ({param_dtype})"
            + (" or float32" if param_dtype in SIXTEEN_BIT else "")
        )
    return sd


def _check_quantized_state(i: int, name: str, param, state, param_dtype: str) -> None:
    if param_dtype not in KERNEL_PARAM_DTYPES:
        raise ValueError(f"{name}[{i}] is 8-bit state (uint8), which float32 / float16 / bfloat16 params take; its "
                         f"param is {param_dtype}")
    need = q8_nbytes(arr.numel(param))
    if len(state.shape) != 1 or arr.numel(state) != need or not arr.is_contiguous(state):
        raise ValueError(f"{name}[{i}] is 8-bit state (uint8) of shape {tuple(state.shape)}; a param of "
                         f"{arr.numel(param)} elements needs a contiguous 1-D tensor of {need} bytes "
                         "(rmsprop_gpu.quantize.zeros_state)")


def build_groups(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, hyper: Hyper,
                 stream_ids=None) -> list[Group]:
    """Check every tensor and group them by (device, param dtype, state dtype). Writes nothing. stream_ids: each
    tensor's random stream (default: its position in these lists)."""
    n = len(params)
    if stream_ids is not None and len(stream_ids) != n:
        raise ValueError(f"stream_ids must have one entry per param, got {len(stream_ids)} for {n}")
    if len(grads) != n or len(square_avgs) != n:
        raise ValueError(
            f"params, grads and square_avgs must have the same length, got {n}, {len(grads)}, {len(square_avgs)}"
        )
    use_mom = hyper.momentum > 0
    momentum_buffers = list(momentum_buffers or [])
    grad_avgs = list(grad_avgs or [])
    if use_mom and len(momentum_buffers) != n:
        raise ValueError(f"momentum > 0 needs one momentum buffer per param, got {len(momentum_buffers)} for {n}")
    if not use_mom and momentum_buffers:
        raise ValueError("momentum buffers were given but momentum == 0")
    if hyper.centered and len(grad_avgs) != n:
        raise ValueError(f"centered=True needs one grad_avg per param, got {len(grad_avgs)} for {n}")
    if not hyper.centered and grad_avgs:
        raise ValueError("grad_avgs were given but centered=False")
    steps = list(steps) if steps is not None else []
    if steps and len(steps) != n:
        raise ValueError(f"state_steps must have one entry per param, got {len(steps)} for {n}")
    for i, s in enumerate(steps):
        if not isinstance(s, torch.Tensor) or s.numel() != 1 or not s.is_floating_point():
            raise ValueError(f"state_steps[{i}] must be a floating-point 1-element tensor")

    groups: dict[tuple, Group] = {}
    written: list[tuple[int, int, str]] = []  # (first byte, end byte, name) of every tensor the step writes
    for i in range(n):
        p, g = _as_real(params[i]), _as_real(grads[i]) if grads[i] is not None else None
        if not arr.is_array(p):
            raise TypeError(f"params[{i}] must be a torch.Tensor or cupy.ndarray, got {type(p).__name__}")
        if g is None:
            raise ValueError(f"grads[{i}] is None; pass only params that have a gradient")
        if arr.is_sparse(g):
            raise RuntimeError("RMSprop does not support sparse gradients")
        if not arr.is_array(g) or arr.is_cupy(g) != arr.is_cupy(p):
            raise TypeError(f"grads[{i}] must be an array of the same library as its param")
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}, its param {tuple(p.shape)}")
        if arr.dtype_name(g) != arr.dtype_name(p):
            raise ValueError(f"grads[{i}] has dtype {arr.dtype_name(g)}, its param {arr.dtype_name(p)}")
        if arr.device_of(g) != arr.device_of(p):
            raise ValueError(f"grads[{i}] is on {arr.device_of(g)}, its param on {arr.device_of(p)}")
        if arr.is_cupy(p) and not (arr.is_contiguous(p) and arr.is_contiguous(g)):
            raise ValueError(f"params[{i}] / grads[{i}]: CuPy arrays must be C-contiguous")
        pd = arr.dtype_name(p)
        if pd not in FLOAT_DTYPES:
            raise TypeError(f"params[{i}] has dtype {arr.dtype_name(p)}; RMSprop needs floating-point params")
        v = _as_real(square_avgs[i])
        sd = _check_state(i, "square_avgs", p, v, pd)
        b = a = None
        if use_mom:
            b = _as_real(momentum_buffers[i])
            if _check_state(i, "momentum_buffer_list", p, b, pd) != sd:
                raise ValueError(f"momentum_buffer_list[{i}] and square_avgs[{i}] must share a dtype")
        if hyper.centered:
            a = _as_real(grad_avgs[i])
            if _check_state(i, "grad_avgs", p, a, pd) != sd:
                raise ValueError(f"grad_avgs[{i}] and square_avgs[{i}] must share a dtype")
        for label, t in ((f"params[{i}]", p), (f"square_avgs[{i}]", v), (f"momentum_buffer_list[{i}]", b),
                         (f"grad_avgs[{i}]", a)):
            if t is not None:
                _check_writable(label, t)
                span = byte_span(t)
                if span:
                    written.append((*span, label))
        dev = arr.device_of(p)
        key = (dev, pd, sd)
        grp = groups.get(key)
        if grp is None:
            grp = groups[key] = Group(
                dev, pd, sd,
                momentum_buffers=[] if use_mom else None,
                grad_avgs=[] if hyper.centered else None,
                steps=[] if steps else None,
            )
        grp.params.append(p)
        grp.index.append(i)
        grp.streams.append(i if stream_ids is None else int(stream_ids[i]))
        grp.grads.append(g)
        grp.square_avgs.append(v)
        if use_mom:
            grp.momentum_buffers.append(b)
        if hyper.centered:
            grp.grad_avgs.append(a)
        if steps:
            grp.steps.append(steps[i])
    check_no_overlap(written)
    _check_scalars(hyper)
    return list(groups.values())


def _check_writable(label: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        return
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(f"{label}: Inplace update to inference tensor outside InferenceMode is not allowed")
    if t.numel() > 1 and torch._debug_has_internal_overlap(t) == 1:  # expanded: elements share memory
        raise RuntimeError(f"{label}: unsupported operation: more than one element of the written-to tensor "
                           "refers to a single memory location. Please clone() the tensor before the step.")


def byte_span(t) -> tuple[int, int] | None:
    """[first, end) bytes a tensor can touch; None when empty."""
    if arr.numel(t) == 0:
        return None
    if isinstance(t, torch.Tensor):
        extent = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1
        return t.data_ptr(), t.data_ptr() + extent * t.element_size()
    return arr.ptr(t), arr.ptr(t) + int(t.nbytes)


def check_no_overlap(spans: list[tuple[int, int, str]]) -> None:
    """Tensors written in one step must not share memory: the fused kernels would race on it."""
    spans.sort()
    end, owner = -1, ""
    for start, stop, name in spans:
        if start < end:
            raise ValueError(f"{owner} and {name} share memory: tensors updated in one step must not overlap "
                             "(the same parameter twice, or overlapping views of one tensor)")
        if stop > end:
            end, owner = stop, name


def _check_scalars(hyper: Hyper) -> None:
    for name in ("grad_scale", "found_inf"):
        t = getattr(hyper, name)
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point 1-element tensor")
