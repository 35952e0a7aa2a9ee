"""The step plan: every check, grouping, backend choice, table and temporary of a step, built once.

Data path of one step: optimizer -> plan -> one launch per (device, dtypes, variant) group, across param
groups: the kernel backends read each param group's hyperparameters from a per-slot table, so 40 param groups
of one layout (layer-wise lr decay) are one launch. A plan is built
with every check (nothing is written unless all of them pass, for every group and every backend) and then
reused: each step only confirms, in a few operations per tensor, that nothing it depends on changed
(param groups and their structural options, grad objects and storage, param storage, state entries). Any
change rebuilds it with the full checks. Hyperparameter values (lr from a scheduler, alpha, eps, ...) are
read fresh every step and never rebuild anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import attrgetter, is_, itemgetter
from typing import Any

import numpy as np
import torch

from . import backends
from ._contract import SIXTEEN_BIT, Group, Hyper, build_groups, check_float32_range, kernel_reads_steps, scalar

_data_ptr = torch.Tensor.data_ptr


def make_hyper(lr, alpha, eps, weight_decay, momentum, centered, maximize, eps_in_sqrt, capturable=False,
               grad_scale=None, found_inf=None, lr_in_momentum=False, nesterov=False, decoupled_weight_decay=False,
               bias_correction=False, stochastic_rounding=False, sr_seed=0) -> Hyper:
    """Normalized run-time values: Python floats and bools (numpy scalars, 1-element tensors read), a 0-dim lr
    tensor."""
    if isinstance(lr, torch.Tensor):
        lr = lr.reshape(()) if lr.dim() else lr  # a view: a scheduler's in-place update stays visible
    else:
        lr = float(lr)
    return Hyper(lr, scalar(alpha), scalar(eps), scalar(weight_decay), scalar(momentum), bool(centered),
                 bool(maximize), bool(eps_in_sqrt), bool(capturable), grad_scale, found_inf, bool(lr_in_momentum),
                 bool(nesterov), bool(decoupled_weight_decay), bool(bias_correction), bool(stochastic_rounding),
                 check_sr_seed(sr_seed))


def check_sr_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise ValueError(f"Invalid sr_seed: {seed!r} (an integer in [0, 2**32))")
    return int(seed)


@dataclass
class Checked:
    """A checked tensor group: the backend chosen for it, the param group it came from, and whether it must run
    alone (foreach=False: one launch per tensor)."""

    backend: backends.Backend
    group: Group
    hyper: Hyper
    group_index: int = 0
    alone: bool = False


def check_groups(params, grads, square_avgs, grad_avgs, momentum_buffer_list, state_steps, hyper: Hyper,
                 foreach=None, backend=None, group_index: int = 0, stream_ids=None) -> list[Checked]:
    """Check everything and choose a backend per group, writing nothing. Raises on any problem. stream_ids: each
    param's random stream (stochastic rounding, 8-bit codes; default: its position in `params`)."""
    if hyper.bias_correction and not state_steps:
        raise ValueError("bias_correction=True needs state_steps (the step count of each param)")
    if hyper.stochastic_rounding and not state_steps:
        raise ValueError("stochastic_rounding=True needs state_steps (each param's step count seeds its stream)")
    if hyper.nesterov and not (hyper.momentum > 0 and hyper.lr_in_momentum):
        raise ValueError("nesterov=True needs momentum > 0 and lr_in_momentum=True (optax's trace)")
    groups = build_groups(params, grads, square_avgs, grad_avgs, momentum_buffer_list, state_steps, hyper,
                          stream_ids)
    if hyper.stochastic_rounding and not any(g.param_dtype in SIXTEEN_BIT or g.state_dtype in SIXTEEN_BIT
                                              for g in groups):
        raise ValueError("stochastic_rounding=True rounds 16-bit (float16 / bfloat16) params or state; this param "
                         "group has none")
    if not state_steps and any(g.state_dtype == "uint8" for g in groups):
        raise ValueError("8-bit state needs state_steps (each param's step count seeds the stochastic rounding of "
                         "its codes)")
    for g in groups:  # the kernels read these counters (the host advances them after the launch)
        g.read_steps = kernel_reads_steps(hyper.bias_correction, hyper.stochastic_rounding, g.state_dtype == "uint8")
    if foreach is False:  # torch's for-loop layout: one launch per tensor
        groups = [one for g in groups for one in g.split()]
    out = []
    for g in groups:
        if not len(g):
            continue
        if g.param_dtype != "float64":
            check_float32_range(hyper)
        if isinstance(hyper.lr, torch.Tensor) and hyper.lr.device not in (torch.device("cpu"), g.device):
            raise ValueError(f"Tensor lr is on {hyper.lr.device}; it must be on the CPU or the params' device "
                             f"({g.device})")
        out.append(Checked(backends.select(backend, g, hyper), g, hyper, group_index, foreach is False))
    return out


@dataclass
class Entry:
    """One launch of the plan: the backend, its tensor group, the param groups in its slots, prepared state."""

    backend: backends.Backend
    group: Group
    group_indices: list[int]  # slot k of the launch takes the hyperparameters of param group group_indices[k]
    prepared: Any

    def run(self, hypers: dict[int, Hyper]) -> None:
        self.backend.run(self.prepared, self.group, [hypers[i] for i in self.group_indices])

    def regrad(self, grads: list | None = None, ptrs: list | None = None) -> None:
        """Take the params' re-allocated grads (same kind): re-point the tables (kept if the addresses repeat).
        grads / ptrs: the new grads of group.params and their addresses, when the caller has them already."""
        self.group.grads = list(map(_grad, self.group.params)) if grads is None else grads
        self.prepared = self.backend.regrad(self.prepared, self.group, ptrs)


def _launch_key(c: Checked):
    """Checked groups with equal keys share one launch; None: a launch of its own."""
    if c.alone or not c.backend.shares_launches:
        return None
    g, h = c.group, c.hyper
    lr_on_device = isinstance(h.lr, torch.Tensor) and h.lr.device == g.device
    return (c.backend.name, g.device, g.param_dtype, g.state_dtype, g.momentum_buffers is not None,
            g.grad_avgs is not None, g.steps is not None, h.eps_in_sqrt, lr_on_device, type(g.params[0]),
            h.lr_in_momentum, h.nesterov, h.decoupled_weight_decay, h.bias_correction, h.stochastic_rounding)


def prepare(checked: list[Checked], owned: bool = True) -> list[Entry]:
    """One entry per launch (checked groups of one layout merged across param groups), with its tables and
    temporaries. Nothing the caller owns is written."""
    launches: dict = {}
    for i, c in enumerate(checked):
        key = _launch_key(c)
        launches.setdefault(i if key is None else key, []).append(c)
    entries = []
    for parts in launches.values():
        group = parts[0].group if len(parts) == 1 else Group.merge([c.group for c in parts])
        b = parts[0].backend
        entries.append(Entry(b, group, [c.group_index for c in parts], b.prepare(group, parts[0].hyper, owned=owned)))
    return entries


def structure(group: dict) -> tuple:
    """The options of a param group that change what is launched. Values never do, nor maximize and whether
    weight decay is on: the kernels take both per slot, every step."""
    return (group["momentum"] > 0, bool(group["centered"]), bool(group.get("eps_in_sqrt", False)),
            bool(group["capturable"]), group["foreach"], group["backend"], group.get("state_dtype"),
            bool(group["differentiable"]), _lr_kind(group["lr"]),
            *(bool(group.get(k, False)) for k in SWITCHES))


# switches that change the launch (other frameworks' semantics, stochastic rounding): part of structure()
SWITCHES = ("lr_in_momentum", "nesterov", "decoupled_weight_decay", "bias_correction", "stochastic_rounding")
_structure_raw = itemgetter("momentum", "centered", "eps_in_sqrt", "capturable", "foreach", "backend", "state_dtype",
                            "differentiable", *SWITCHES)  # options, C-speed; structure() judges changes
_params_of = itemgetter("params")
_lr_of = itemgetter("lr")
_grad = attrgetter("grad")
_stride = torch.Tensor.stride
_is_contiguous = torch.Tensor.is_contiguous


def _lr_kind(lr):
    return (lr.device, lr.dtype) if isinstance(lr, torch.Tensor) else None


@dataclass
class StepPlan:
    """The launches of a step and what they depend on, flattened over param groups so that the per-step check is
    a few C-level passes (map/all) over the tensors instead of Python per tensor."""

    entries: list = field(default_factory=list)
    cacheable: bool = True  # False for DTensor and complex params (the kernels see views made per call)
    groups: list = field(default_factory=list)  # param group dicts
    params_lists: list = field(default_factory=list)  # their "params" lists, and lengths
    lengths: list = field(default_factory=list)
    params: list = field(default_factory=list)  # every param, in group order
    raw: list = field(default_factory=list)  # _structure_raw of each group
    shapes: list = field(default_factory=list)  # structure() of each group
    lr_types: list = field(default_factory=list)  # type of each group's lr; and (device, dtype) of tensor lrs
    lr_kinds: list = field(default_factory=list)
    last_values: list | None = None  # the hyperparameter values of the last step, its lr objects and Hypers
    last_lrs: tuple | list = ()  # (reused while the values repeat)
    last_hypers: dict | None = None
    active: list = field(default_factory=list)  # params the plan updates (they had a grad)
    idle: list = field(default_factory=list)  # params without a grad
    grads: list = field(default_factory=list)
    grad_strides: list = field(default_factory=list)
    param_ptrs: list = field(default_factory=list)
    grad_ptrs: list = field(default_factory=list)
    grads_contiguous: bool = False  # every grad contiguous: a re-allocated one need only be contiguous too
    entry_rows: list = field(default_factory=list)  # per entry: its params' positions in `active` (or None)
    state_dicts: list = field(default_factory=list)  # the optimizer's per-param state dicts, in its order
    state_values: list = field(default_factory=list)  # and every value they hold

    def watch(self, group: dict, active: list, idle: list, grads: list) -> None:
        """Record what the plan read from one param group (called once per group when the plan is built)."""
        self.groups.append(group)
        self.params_lists.append(group["params"])
        self.lengths.append(len(group["params"]))
        self.params += group["params"]
        self.raw.append(_structure_raw(group))
        self.shapes.append(structure(group))
        self.lr_types.append(type(group["lr"]))
        self.lr_kinds.append(_lr_kind(group["lr"]))
        self.active += active
        self.idle += idle
        self.grads += grads
        self.grad_strides += map(_stride, grads)
        self.param_ptrs += map(_data_ptr, active)
        self.grad_ptrs += map(_data_ptr, grads)

    def seal(self, opt_state: dict) -> None:
        """Record the optimizer's state once it is committed: a replaced per-param dict or state tensor, an entry
        added or removed, is then seen by iterating dict values (no tensor hashing per step)."""
        self.state_dicts = list(opt_state.values())
        self.state_values = list(chain.from_iterable(map(dict.values, self.state_dicts)))
        self.grads_contiguous = all(map(_is_contiguous, self.grads))
        pos = {id(p): i for i, p in enumerate(self.active)}
        self.entry_rows = []
        for e in self.entries:
            params = getattr(getattr(e, "group", None), "params", None)
            ok = params is not None and all(id(p) in pos for p in params)
            self.entry_rows.append([pos[id(p)] for p in params] if ok else None)

    def refresh(self, param_groups, opt_state) -> bool:
        """True when the plan can run as it is (after taking re-allocated grads), False when it must be rebuilt."""
        if not self.cacheable or len(param_groups) != len(self.groups) or not all(map(is_, param_groups,
                                                                                     self.groups)):
            return False
        plists = list(map(_params_of, param_groups))
        if not all(map(is_, plists, self.params_lists)) or list(map(len, plists)) != self.lengths:
            return False
        raw = list(map(_structure_raw, param_groups))
        if raw != self.raw:  # some option's value changed: structural only if structure() says so
            if list(map(structure, param_groups)) != self.shapes:
                return False
            self.raw = raw
        lrs = list(map(_lr_of, param_groups))
        if list(map(type, lrs)) != self.lr_types or (any(self.lr_kinds) and list(map(_lr_kind, lrs)) != self.lr_kinds):
            return False
        if not all(map(is_, chain.from_iterable(self.params_lists), self.params)):
            return False
        if len(opt_state) != len(self.state_dicts) or not all(map(is_, opt_state.values(), self.state_dicts)):
            return False
        values = list(chain.from_iterable(map(dict.values, self.state_dicts)))
        if len(values) != len(self.state_values) or not all(map(is_, values, self.state_values)):
            return False
        if not all(map(is_, map(_grad, self.idle), repeat(None))):  # a param gained a grad
            return False
        if list(map(_data_ptr, self.active)) != self.param_ptrs:  # p.data = ... or storage swapped
            return False
        if all(map(is_, map(_grad, self.active), self.grads)):
            return list(map(_data_ptr, self.grads)) == self.grad_ptrs  # grad.data = ... rebuilds
        grads = list(map(_grad, self.active))
        # grads re-allocated (zero_grad(set_to_none=True) + backward): torch's grad setter guarantees shape,
        # dtype and device; the tables need the same element order in memory (contiguous stays contiguous,
        # else the same strides). Sparse grads fail here (data_ptr or the layout checks raise or differ).
        if any(map(is_, grads, repeat(None))):
            return False
        try:
            if not (all(map(_is_contiguous, grads)) if self.grads_contiguous
                    else list(map(_stride, grads)) == self.grad_strides):
                return False
            ptrs = list(map(_data_ptr, grads))
        except RuntimeError:  # not strided: the full checks say what is wrong
            return False
        self.grads, self.grad_ptrs = grads, ptrs
        for e, rows in zip(self.entries, self.entry_rows):
            if rows is None:
                e.regrad()
            else:
                e.regrad([grads[i] for i in rows], [ptrs[i] for i in rows])
        return True
