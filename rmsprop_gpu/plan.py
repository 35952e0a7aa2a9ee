"""The step plan: every check, grouping, backend choice, table and temporary of a step, built once.

Data path of one step: optimizer -> plan -> one launch per (device, dtypes, variant) group. A plan is built
with every check (nothing is written unless all of them pass, for every group and every backend) and then
reused: each step only confirms, in a few operations per tensor, that nothing it depends on changed
(param groups and their structural options, grad objects and storage, param storage, state entries). Any
change rebuilds it with the full checks. Hyperparameter values (lr from a scheduler, alpha, eps, ...) are
read fresh every step and never rebuild anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import is_
from typing import Any

import torch

from . import backends
from ._contract import Group, Hyper, build_groups, check_float32_range

_data_ptr = torch.Tensor.data_ptr


def make_hyper(lr, alpha, eps, weight_decay, momentum, centered, maximize, eps_in_sqrt, capturable=False,
               grad_scale=None, found_inf=None) -> Hyper:
    """Normalized run-time values: Python floats and bools (numpy scalars accepted), a 0-dim lr tensor."""
    if isinstance(lr, torch.Tensor):
        lr = lr.reshape(()) if lr.dim() else lr  # a view: a scheduler's in-place update stays visible
    else:
        lr = float(lr)
    return Hyper(lr, float(alpha), float(eps), float(weight_decay), float(momentum), bool(centered),
                 bool(maximize), bool(eps_in_sqrt), bool(capturable), grad_scale, found_inf)


def check_groups(params, grads, square_avgs, grad_avgs, momentum_buffer_list, state_steps, hyper: Hyper,
                 foreach=None, backend=None) -> list[tuple[backends.Backend, Group, Hyper]]:
    """Check everything and choose a backend per group, writing nothing. Raises on any problem."""
    groups = build_groups(params, grads, square_avgs, grad_avgs, momentum_buffer_list, state_steps, hyper)
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
        out.append((backends.select(backend, g, hyper), g, hyper))
    return out


@dataclass
class Entry:
    """One launch of the plan: the backend, its tensor group, the param group it came from, prepared state."""

    backend: backends.Backend
    group: Group
    group_index: int
    prepared: Any

    def run(self, hyper: Hyper) -> None:
        self.backend.run(self.prepared, self.group, hyper)

    def regrad(self) -> None:
        """Take the params' re-allocated grads (same kind): re-point the tables, reused if addresses repeat."""
        self.group.grads = [p.grad for p in self.group.params]
        self.prepared = self.backend.prepare(self.group, None, owned=True, previous=self.prepared)


def prepare(checked, group_index: int = 0, owned: bool = True) -> list[Entry]:
    """Tables and temporaries for every checked group (nothing the caller owns is written)."""
    return [Entry(b, g, group_index, b.prepare(g, h, owned=owned)) for b, g, h in checked]


@dataclass
class GroupWatch:
    """What a param group's part of the plan depends on, in the form the per-step check compares fastest."""

    group: dict
    params_list: list
    params: tuple
    structure: tuple
    active: list  # params with a grad
    idle: list  # params without one
    grads: list
    ptrs: list  # data pointers of active params then grads
    states: list  # the state dict of each active param
    state_entries: list  # (state dict, key, tensor) the plan reads

    @classmethod
    def of(cls, group: dict, active: list, idle: list, grads: list, states: list, keys: list) -> GroupWatch:
        return cls(group, group["params"], tuple(group["params"]), structure(group), list(active), idle,
                   list(grads), [p.data_ptr() for p in active] + [g.data_ptr() for g in grads], states,
                   [(st, k, st[k]) for st in states for k in keys])

    def status(self, group: dict, opt_state) -> str:
        """"same"; "grads" when only grad objects were replaced (zero_grad(set_to_none=True) + backward); else
        "rebuild"."""
        if group is not self.group or group["params"] is not self.params_list:
            return "rebuild"
        params = group["params"]
        if len(params) != len(self.params) or not all(map(is_, params, self.params)):
            return "rebuild"
        if structure(group) != self.structure:
            return "rebuild"
        if not all(map(is_, map(opt_state.get, self.active), self.states)):
            return "rebuild"
        if not all(d.get(k) is t for d, k, t in self.state_entries):
            return "rebuild"
        grads = [p.grad for p in self.active]
        same = all(map(is_, grads, self.grads))
        ptrs = list(map(_data_ptr, self.active))
        if not same:
            if any(p.grad is not None for p in self.idle) or not all(map(_same_kind, grads, self.grads)):
                return "rebuild"
            ptrs += map(_data_ptr, grads)
            if ptrs[: len(self.active)] != self.ptrs[: len(self.active)]:
                return "rebuild"
            self.grads = grads
            self.ptrs = ptrs
            return "grads"
        if any(p.grad is not None for p in self.idle):
            return "rebuild"
        ptrs += map(_data_ptr, grads)
        return "same" if ptrs == self.ptrs else "rebuild"


def _same_kind(new, old) -> bool:
    """A replacement grad the plan can take without the full checks: same shape, dtype, device and strides."""
    return (new is not None and new.layout == torch.strided and new.dtype == old.dtype and new.shape == old.shape
            and new.device == old.device and new.stride() == old.stride())


def structure(group: dict) -> tuple:
    """The options of a param group that change what is launched (values never do)."""
    lr = group["lr"]
    return (group["momentum"] > 0, bool(group["centered"]), bool(group["maximize"]),
            bool(group.get("eps_in_sqrt", False)), bool(group["capturable"]), group["foreach"], group["backend"],
            group.get("state_dtype"), bool(group["differentiable"]), group["weight_decay"] != 0,
            (lr.device, lr.dtype) if isinstance(lr, torch.Tensor) else None)


@dataclass
class StepPlan:
    entries: list[Entry] = field(default_factory=list)
    watches: list[GroupWatch] = field(default_factory=list)
    cacheable: bool = True  # False for DTensor and complex params (the kernels see views made per call)

    def refresh(self, param_groups, opt_state) -> bool:
        """True when the plan can run as it is (after taking re-allocated grads), False when it must be rebuilt."""
        if not self.cacheable or len(param_groups) != len(self.watches):
            return False
        regrad = []
        for i, (w, g) in enumerate(zip(self.watches, param_groups)):
            st = w.status(g, opt_state)
            if st == "rebuild":
                return False
            if st == "grads":
                regrad.append(i)
        for e in self.entries:
            if e.group_index in regrad:
                e.regrad()
        return True
