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

from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import attrgetter, is_, itemgetter
from typing import Any

import torch

from . import _arrays as arr
from . import backends
from ._contract import (
    TENSOR_LISTS,
    Group,
    Hyper,
    build_groups,
    byte_span,
    check_float32_range,
    check_no_overlap,
)
from .options import STRUCTURAL, reads_steps, refuse_combinations, refuse_for_tensors

_data_ptr = torch.Tensor.data_ptr


@dataclass
class Checked:
    """A checked tensor group: the backend chosen for it, the param group it came from, and whether it must run
    alone (foreach=False: one launch per tensor)."""

    backend: backends.Backend
    group: Group
    hyper: Hyper
    group_index: int = 0
    alone: bool = False
    offsets: dict = field(default_factory=dict)  # list name -> where this param group's tensors start in the plan's
    # lists (param groups one after another; a list only holds the tensors of groups that use it)


def check_groups(params, grads, square_avgs, grad_avgs, momentum_buffer_list, state_steps, hyper: Hyper,
                 foreach=None, backend=None, group_index: int = 0, stream_ids=None, offsets=None) -> list[Checked]:
    """Check everything and choose a backend per group, writing nothing. Raises on any problem. stream_ids: each
    param's random stream (stochastic rounding, 8-bit codes; default: its position in `params`)."""
    refuse_combinations(hyper)
    groups = build_groups(params, grads, square_avgs, grad_avgs, momentum_buffer_list, state_steps, hyper,
                          stream_ids)
    refuse_for_tensors(hyper, [(g.param_dtype, g.state_dtype) for g in groups], bool(state_steps))
    for g in groups:  # the kernels read these counters (the host advances them after the launch)
        g.read_steps = reads_steps(hyper, g.state_dtype == "uint8")
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
        out.append(Checked(backends.select(backend, g, hyper), g, hyper, group_index, foreach is False,
                           offsets or {}))
    return out


@dataclass
class Entry:
    """One launch of a plan: the backend, its group's layout (no tensors: each run binds the tensors of that
    call), the param groups in its slots, the prepared launch, and where its tensors are in the plan's lists."""

    backend: backends.Backend
    group: Group  # unbound: device, dtypes, slots, streams; its tensor lists are empty
    group_indices: list[int]  # slot k of the launch takes the hyperparameters of param group group_indices[k]
    prepared: Any
    rows: dict | None  # Group list name -> positions of its tensors in the plan's list; None: the whole lists

    def __post_init__(self):
        self._pickers = None if self.rows is None else {n: _picker(r) for n, r in self.rows.items()}

    def bind(self, lists: dict) -> Group:
        """The launch's group with this call's tensors (lists: Group list name -> the plan's whole list)."""
        g, pickers = self.group, self._pickers
        if pickers is None:
            t = lists
        else:
            t = {n: pick(lists[n]) for n, pick in pickers.items()}
        return Group(g.device, g.param_dtype, g.state_dtype, t["params"], t["grads"], t["square_avgs"],
                     t.get("momentum_buffers"), t.get("grad_avgs"), t.get("steps"), g.slots, g.index, g.streams,
                     g.read_steps)

    def run(self, lists: dict, hypers: dict[int, Hyper]) -> None:
        self.backend.run(self.prepared, self.bind(lists), [hypers[i] for i in self.group_indices])

    def repoint(self, lists: dict, moved: dict) -> None:
        """Some of the plan's lists moved (moved: name -> the new addresses of the whole list)."""
        pickers = self._pickers
        mine = moved if pickers is None else {n: pickers[n](ptrs) for n, ptrs in moved.items() if n in pickers}
        if mine:
            self.prepared = self.backend.repoint(self.prepared, self.bind(lists), mine)


def _picker(rows: list):
    if len(rows) == 1:
        r = rows[0]
        return lambda xs: [xs[r]]
    get = itemgetter(*rows)
    return lambda xs: list(get(xs))


def _launch_key(c: Checked):
    """Checked groups with equal keys share one launch; None: a launch of its own."""
    if c.alone or not c.backend.shares_launches:
        return None
    g, h = c.group, c.hyper
    lr_on_device = isinstance(h.lr, torch.Tensor) and h.lr.device == g.device
    return (c.backend.name, g.device, g.param_dtype, g.state_dtype, g.momentum_buffers is not None,
            g.grad_avgs is not None, g.steps is not None, h.switches, lr_on_device, type(g.params[0]))


def prepare(checked: list[Checked], sizes: dict) -> list[Entry]:
    """One entry per launch (checked groups of one layout merged across param groups), with its tables and
    temporaries. Nothing the caller owns is written, and no entry keeps a tensor. sizes: the length of each of the
    plan's lists."""
    launches: dict = {}
    for i, c in enumerate(checked):
        key = _launch_key(c)
        launches.setdefault(i if key is None else key, []).append(c)
    entries = []
    for parts in launches.values():
        group = parts[0].group if len(parts) == 1 else Group.merge([c.group for c in parts])
        b = parts[0].backend
        names = [n for n in TENSOR_LISTS if getattr(group, n) is not None]
        rows = {n: [c.offsets.get(n, 0) + i for c in parts for i in c.group.index] for n in names}
        if all(len(r) == sizes[n] and r == list(range(len(r))) for n, r in rows.items()):
            rows = None  # the whole lists, in order: nothing to pick
        entries.append(Entry(b, group.unbound(), [c.group_index for c in parts],
                             b.prepare(group, parts[0].hyper, owned=True), rows))
    return entries


# ---------------------------------------------------------------- confirmation: what the launches were built from
try:  # torch's C++ tensor guard (dynamo's): dtype, device, sizes, strides, requires_grad, dispatch keys in one pass
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - older or trimmed torch builds: the same facts compared in Python
    _TensorGuards = None


def _layout_of(x) -> tuple:
    if not arr.is_array(x):  # a non-tensor state value: the same object (a number, None) or a change
        return type(x), id(x)
    return (type(x), tuple(x.shape), tuple(x.strides if arr.is_cupy(x) else x.stride()), arr.dtype_name(x),
            arr.device_of(x))


def _layouts(xs) -> list:
    return list(map(_layout_of, xs))


def _layout_guard(xs: list):
    """A function that says whether tensors have the layouts these have now (one C-level pass when it can)."""
    if _TensorGuards is not None and all(type(x) is torch.Tensor or type(x) is torch.nn.Parameter for x in xs):
        try:
            guard = _TensorGuards(*xs, dynamic_dims_sizes=[list(x.shape) for x in xs],
                                  dynamic_dims_strides=[list(x.stride()) for x in xs])
            check = guard.check
            return lambda ys: check(*ys)
        except Exception:  # noqa: BLE001 - an API change in torch: compare in Python instead
            pass
    seen = _layouts(xs)
    return lambda ys: _layouts(ys) == seen


def _ptrs(xs: list) -> list:
    try:
        return list(map(_data_ptr, xs))
    except TypeError:  # CuPy arrays, or a non-tensor state value (compared by identity)
        return [arr.ptr(x) if arr.is_array(x) else id(x) for x in xs]


def per_call_views(params) -> bool:
    """Whether the kernels see views made per call of these params (complex: their real view; DTensor: the local
    shard), which a plan cannot confirm by address: such plans are rebuilt every call."""
    return any(isinstance(p, torch.Tensor) and (p.is_complex() or type(p).__name__ == "DTensor") for p in params)


SAME, MOVED, CHANGED = "same", "moved", "changed"


def take(positions):
    """A function that picks these positions of a list, as a list (a slice when they are evenly spaced)."""
    positions = list(positions)
    if not positions:
        return lambda xs: []
    step = positions[1] - positions[0] if len(positions) > 1 else 1
    if step > 0 and positions == list(range(positions[0], positions[-1] + 1, step)):
        cut = slice(positions[0], positions[-1] + 1, step)
        return lambda xs: xs[cut]
    if len(positions) == 1:
        r = positions[0]
        return lambda xs: [xs[r]]
    get = itemgetter(*positions)
    return lambda xs: list(get(xs))


def flat_of(lists: dict) -> list:
    """Every tensor of these lists (Group list name -> list) in one list, in TENSOR_LISTS order."""
    flat = []
    for n in TENSOR_LISTS:
        if lists.get(n) is not None:
            flat += lists[n]
    return flat


def flatten(lists: dict) -> tuple[list, dict]:
    """flat_of(lists), and where each list is in it."""
    where, k = {}, 0
    for n in TENSOR_LISTS:
        if lists.get(n) is not None:
            where[n] = take(range(k, k + len(lists[n])))
            k += len(lists[n])
    return flat_of(lists), where


class Seen:
    """The address and layout (shape, strides, dtype, device) of every tensor a plan's launches read or write: a
    call's tensors are confirmed against it in two C-level passes (addresses; torch's tensor guard), so a storage
    swapped behind the same object (t.data = ..., set_, resize_, t_(), as_strided_) is seen as surely as a new
    object. flat: those tensors in a fixed order; where: Group list name -> a function picking that list's
    positions in flat (flatten() makes both from lists)."""

    def __init__(self, flat: list, where: dict):
        self.ptrs = _ptrs(flat)
        self.guard = _layout_guard(flat)
        self.where = where

    def compare(self, flat: list, lists: dict) -> tuple[str, dict]:
        """SAME; MOVED with {list name: its new addresses} for the lists that moved (every layout the same);
        or CHANGED (rebuild with the full checks). lists: the call's lists (for the overlap check of MOVED)."""
        if len(flat) != len(self.ptrs):
            return CHANGED, {}
        try:
            if not self.guard(flat):
                return CHANGED, {}
            ptrs = _ptrs(flat)
        except (AttributeError, RuntimeError, TypeError):  # a None, a number, a sparse tensor: the checks say
            return CHANGED, {}
        if ptrs == self.ptrs:
            return SAME, {}
        moved = {}
        for name, pick in self.where.items():
            new = pick(ptrs)
            if new != pick(self.ptrs):
                moved[name] = new
        if any(n in moved for n in WRITTEN) and not no_overlap(
                [x for n in WRITTEN if lists.get(n) is not None for x in lists[n]]):
            return CHANGED, {}  # written tensors moved onto each other: the full checks say so
        self.ptrs = ptrs
        return MOVED, moved


WRITTEN = ("params", "square_avgs", "momentum_buffers", "grad_avgs")


class Plan:
    """The launches of one set of tensor lists (one per layout, across param groups), built with every check,
    and what they were built from. It keeps addresses and layouts, never a tensor: each call hands in its lists
    (Group list name -> list, in the order the plan was built from), confirmed before anything is written.
    flat, where: every tensor of the call in one list, and where each list is in it (default: flatten(lists))."""

    def __init__(self, checked: list[Checked], lists: dict, flat: list | None = None, where: dict | None = None):
        self.entries = prepare(checked, {n: len(xs) for n, xs in lists.items() if xs is not None})
        self.float32 = any(e.group.param_dtype != "float64" for e in self.entries)  # lr, wd must fit float32
        if flat is None:
            flat, where = flatten(lists)
        self.seen = Seen(flat, where)

    def confirm(self, lists: dict, flat: list | None = None) -> bool:
        """True when the launches can run on these tensors (after re-pointing the tables at moved ones, e.g. grads
        re-allocated); False when the plan must be rebuilt with the full checks."""
        verdict, moved = self.seen.compare(flat_of(lists) if flat is None else flat, lists)
        if verdict is SAME:
            return True
        if verdict is CHANGED:
            return False
        for e in self.entries:
            e.repoint(lists, moved)
        return True

    def run(self, lists: dict, hypers: dict[int, Hyper]) -> None:
        for e in self.entries:
            e.run(lists, hypers)


def no_overlap(tensors: list) -> bool:
    try:
        check_no_overlap([(*span, str(i)) for i, t in enumerate(tensors) if (span := byte_span(t))])
    except ValueError:
        return False
    return True


def structure(group: dict) -> tuple:
    """The options of a param group that change what is launched or allocated (options.STRUCTURAL, momentum > 0,
    the lr's kind). Values never do, nor maximize and whether weight decay is on: the kernels take both per slot."""
    return (group["momentum"] > 0, _lr_kind(group["lr"]), *map(group.get, STRUCTURAL))


_structure_raw = itemgetter("momentum", *STRUCTURAL)  # C-speed; structure() judges changes
_params_of = itemgetter("params")
_lr_of = itemgetter("lr")
_grad = attrgetter("grad")


def _lr_kind(lr):
    return (lr.device, lr.dtype) if isinstance(lr, torch.Tensor) else None


# the state_dict key of each Group state list
STATE_KEY_OF = {"square_avgs": "square_avg", "momentum_buffers": "momentum_buffer", "grad_avgs": "grad_avg",
                "steps": "step"}


@dataclass
class StepPlan:
    """The optimizer's plan: a Plan over the params that have grads (across param groups), and what decides it
    besides their tensors: the param groups, their structural options, which params have grads, the state dicts.
    Per step those are confirmed by identity, and every tensor by the Plan, in a few C-level passes (map/all)."""

    plan: Plan | None = None
    reference: list = field(default_factory=list)  # param groups stepped by torch's differentiable step
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
    active_dicts: list = field(default_factory=list)  # their state dicts
    uses: list = field(default_factory=list)  # per active param: the state lists its group uses
    picks: dict = field(default_factory=dict)  # state list name -> picks its tensors from the dicts' values
    where: dict = field(default_factory=dict)  # list name -> picks its tensors from tensors()'s flat list
    state_dicts: list = field(default_factory=list)  # the optimizer's per-param state dicts, in its order

    @property
    def entries(self) -> list[Entry]:
        """The launches of a step (the differentiable groups' reference steps aside)."""
        return [] if self.plan is None else self.plan.entries

    def watch(self, group: dict, active: list, idle: list, dicts: list, names: tuple) -> None:
        """Record what the plan read from one param group (called once per group when the plan is built): its
        params with and without grads, their state dicts, and the state lists (names) the group uses."""
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
        self.active_dicts += dicts
        self.uses += [names] * len(active)

    def locate(self) -> None:
        """Where each state list is among the values of the watched params' state dicts (read in one pass per
        step); called once every group is watched."""
        positions: dict = {}
        k = 0
        for d, names in zip(self.active_dicts, self.uses):
            keys = list(d)
            for name in names:
                positions.setdefault(name, []).append(k + keys.index(STATE_KEY_OF[name]))
            k += len(keys)
        n = len(self.active)
        self.picks = {name: take(pos) for name, pos in positions.items()}
        self.where = {"params": take(range(n)), "grads": take(range(n, 2 * n)),
                      **{name: take([2 * n + i for i in pos]) for name, pos in positions.items()}}

    def seal(self, opt_state: dict) -> None:
        """Record the optimizer's state dicts once they are committed: a replaced per-param dict, an entry added or
        removed, is then seen by iterating dict values (no tensor hashing per step)."""
        self.state_dicts = list(opt_state.values())

    def tensors(self) -> tuple[list, dict]:
        """This step's tensors: every one the launches touch in one list (params, grads, then the values of the
        params' state dicts: a key deleted or added shifts them, which the plan's confirmation sees), and the
        Group lists."""
        active = self.active
        grads = list(map(_grad, active))
        values = list(chain.from_iterable(map(dict.values, self.active_dicts)))
        lists = {"params": active, "grads": grads}
        for name, pick in self.picks.items():
            lists[name] = pick(values)
        return active + grads + values, lists

    def refresh(self, param_groups, opt_state) -> dict | None:
        """This step's tensor lists when the plan can run on them (tables re-pointed at moved tensors, e.g.
        re-allocated grads), None when it must be rebuilt."""
        if not self.cacheable or len(param_groups) != len(self.groups) or not all(map(is_, param_groups,
                                                                                     self.groups)):
            return None
        plists = list(map(_params_of, param_groups))
        if not all(map(is_, plists, self.params_lists)) or list(map(len, plists)) != self.lengths:
            return None
        raw = list(map(_structure_raw, param_groups))
        if raw != self.raw:  # some option's value changed: structural only if structure() says so
            if list(map(structure, param_groups)) != self.shapes:
                return None
            self.raw = raw
        lrs = list(map(_lr_of, param_groups))
        if list(map(type, lrs)) != self.lr_types or (any(self.lr_kinds) and list(map(_lr_kind, lrs)) != self.lr_kinds):
            return None
        if not all(map(is_, chain.from_iterable(self.params_lists), self.params)):
            return None
        if len(opt_state) != len(self.state_dicts) or not all(map(is_, opt_state.values(), self.state_dicts)):
            return None
        if not all(map(is_, map(_grad, self.idle), repeat(None))):  # a param gained a grad
            return None
        flat, lists = self.tensors()
        if self.plan is not None and not self.plan.confirm(lists, flat):
            return None
        return lists


class LRU:
    """A bounded map, least recently used first out (plans by structure: they hold no tensors)."""

    def __init__(self, max_entries: int):
        self._max = max_entries
        self._entries: OrderedDict = OrderedDict()

    def get(self, key):
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
        return hit

    def put(self, key, value) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        if len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
