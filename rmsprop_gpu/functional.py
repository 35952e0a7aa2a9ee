"""Functional RMSprop over lists of tensors (torch) or arrays (CuPy), same options as the optimizer.

rmsprop() checks everything on each call (its tables are cached per backend, keyed by every address they
hold). For the optimizer's speed with the functional interface, RMSpropPlan checks once and is called every
step: it re-checks only what can change between calls (addresses, re-allocated grads), like the optimizer's
step plan.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import backends, options
from ._contract import Hyper, check_float32_range, validate_hyperparameters
from .plan import Plan, check_groups, per_call_views


@torch._disable_dynamo  # clean graph break under torch.compile (lazy: dynamo loads at the first call)
@torch.no_grad()
def rmsprop(
    params, grads, square_avgs, grad_avgs=None, momentum_buffer_list=None, state_steps=None, *,
    lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False,
    capturable=False, grad_scale=None, found_inf=None, foreach=None, differentiable=False, has_complex=False,
    backend=None, **ours,
) -> None:
    """One RMSprop step, in place, in torch.optim.rmsprop.rmsprop's argument order (and its keywords).

    params, grads, square_avgs (and momentum_buffer_list when momentum > 0, grad_avgs when centered) are
    lists of torch tensors or of CuPy arrays. state_steps, optional, are floating-point scalar tensors advanced
    by one per step (not when found_inf is set); where the kernels read them (bias correction, stochastic
    rounding, 8-bit state) use float64: float32 stops counting at 2**24 steps. grad_scale / found_inf: device
    scalars from GradScaler: grads are divided by grad_scale, and a nonzero found_inf skips the step without
    writing anything.
    differentiable=True runs torch's own differentiable step (autograd records it); has_complex is accepted
    for torch's signature (complex params are detected either way).
    backend: "auto" (default, or $RMSPROP_GPU_BACKEND), "triton", "cupy" or "torch".
    ours: the options table's switches and values that torch lacks (rmsprop_gpu.options.FUNCTIONAL: eps inside
    the root, the other frameworks' switches, stochastic rounding and its seed; README: "Options").
    Stochastic rounding draws from a stream seeded by (sr_seed, each tensor's step counter, its position in
    these lists, the element): it needs state_steps.
    8-bit state: uint8 state tensors (rmsprop_gpu.quantize.zeros_state(param), or quantize_state from float
    state; with centered, square_avg holds the variance: quantize.q8_state converts a param's state) are
    updated in their format; their codes round stochastically from the same stream, so they need state_steps.
    Nothing is written unless every check passes, for every group and backend.
    """
    ours = options.accept(ours, options.FUNCTIONAL, "rmsprop()")
    if differentiable:
        options.refuse_combinations({**ours, "differentiable": True})
        if grad_scale is not None or found_inf is not None:
            raise ValueError("differentiable=True runs torch's own step: no grad_scale or found_inf")
        from torch.optim.rmsprop import rmsprop as torch_rmsprop

        with torch.enable_grad():
            torch_rmsprop(params, grads, square_avgs, list(grad_avgs or []), list(momentum_buffer_list or []),
                          list(state_steps or []), foreach=False, maximize=maximize, differentiable=True,
                          capturable=capturable, has_complex=any(p.is_complex() for p in params), lr=lr,
                          alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered)
        return
    validate_hyperparameters(lr, alpha, eps, weight_decay, momentum, read_tensor_lr=not capturable)
    hyper = options.make(lr, alpha, eps, weight_decay, momentum, centered, maximize, capturable, grad_scale,
                         found_inf, **ours)
    checked = check_groups(params, grads, square_avgs, grad_avgs, momentum_buffer_list, state_steps, hyper,
                           foreach=foreach, backend=backend)
    launches = [(c.backend, c.group, c.backend.prepare(c.group, hyper)) for c in checked]  # every table first
    for b, group, prepared in launches:  # then the writes
        b.run(prepared, group, [hyper])


class RMSpropPlan:
    """rmsprop() for fixed lists, checked once: plan(lr=..., ...) is one step, at the optimizer's host cost.

        plan = rmsprop_gpu.RMSpropPlan(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps,
                                       momentum=0.9, centered=True)
        for batch in data:
            ...                                   # backward writes the grads
            plan(lr=schedule(i), grads=new_grads)  # grads: only when they are new tensors (else omit)

    The lists, and the structural options (momentum > 0, centered, capturable, foreach, backend, the switches
    of rmsprop_gpu.options.SWITCHES), are fixed at construction; values (lr, alpha, eps, weight_decay, momentum,
    maximize, sr_seed) and grad_scale / found_inf are given per call. The plan holds its lists, the grads of the
    last call included (pass new grads, or drop the plan, to release them). Each call confirms the address and layout
    (shape, strides, dtype, device) of every tensor against what its launches were built from: new grads (or
    any tensor moved, e.g. t.data = ...) of the same layouts only re-point the tables; anything else re-plans with
    the full checks before any write. A call that fails changes nothing, its grads included. Works with CuPy
    arrays too.
    """

    def __init__(self, params, grads, square_avgs, grad_avgs=None, momentum_buffer_list=None, state_steps=None,
                 *, momentum=0.0, centered=False, capturable=False, foreach=None, backend=None, stream_ids=None,
                 **switches):
        backends.requested_name(backend)
        self._stream_ids = None if stream_ids is None else list(stream_ids)  # default: positions in `params`
        self._lists = {"params": list(params), "grads": list(grads), "square_avgs": list(square_avgs),
                       "momentum_buffers": list(momentum_buffer_list) if momentum_buffer_list else None,
                       "grad_avgs": list(grad_avgs) if grad_avgs else None,
                       "steps": list(state_steps) if state_steps else None}
        self._structure = dict(momentum=float(momentum), centered=bool(centered), capturable=bool(capturable))
        self._switches = options.switch_bits(options.accept(switches, options.SWITCHES, "RMSpropPlan()"))
        self._foreach, self._backend = foreach, backend
        self._plan: Plan | None = None
        # complex params and DTensors run as per-call views: planned on every call
        self._cacheable = not per_call_views(self._lists["params"])

    @torch._disable_dynamo
    @torch.no_grad()
    def __call__(self, *, grads=None, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=None,
                 maximize=False, grad_scale=None, found_inf=None, sr_seed=0) -> None:
        """One step with these values; grads: the new grad tensors, when they were re-allocated."""
        st = self._structure
        momentum = st["momentum"] if momentum is None else momentum
        if (momentum > 0) != (st["momentum"] > 0):
            raise ValueError("momentum > 0 is structural in a plan (the buffers are fixed): make a new RMSpropPlan")
        validate_hyperparameters(lr, alpha, eps, weight_decay, momentum, read_tensor_lr=not st["capturable"])
        hyper = options.make(lr, alpha, eps, weight_decay, momentum, st["centered"], maximize, st["capturable"],
                             grad_scale, found_inf, sr_seed, self._switches)
        lists = self._lists
        if grads is not None:
            grads = list(grads)
            if len(grads) != len(lists["grads"]):
                raise ValueError(f"grads has {len(grads)} entries, the plan {len(lists['grads'])}")
            lists = {**lists, "grads": grads}
        self._plan = run_planned(self._plan if self._cacheable else None, lists, hyper, self._foreach,
                                 self._backend, self._stream_ids)
        self._lists = lists  # the step ran: these grads are the plan's now


def run_planned(plan: Plan | None, lists: dict, hyper: Hyper, foreach, backend, stream_ids) -> Plan:
    """One step of these lists through `plan` when it confirms them, else through a new plan (every check first,
    nothing written when one fails). Returns the plan that ran."""
    if plan is None or not plan.confirm(lists):
        checked = check_groups(lists["params"], lists["grads"], lists["square_avgs"], lists["grad_avgs"],
                               lists["momentum_buffers"], lists["steps"], hyper, foreach=foreach, backend=backend,
                               stream_ids=stream_ids)
        plan = Plan(checked, lists)
    elif plan.float32:
        check_float32_range(hyper)
    plan.run(lists, {0: hyper})
    return plan


class BackendChoice(NamedTuple):
    """Where one tensor group of which_backend() runs: the group (device, param dtype, state dtype), how many
    params it holds, and the backend."""

    device: str
    param_dtype: str
    state_dtype: str
    params: int
    backend: str

    def __str__(self) -> str:
        return (f"{self.params} {self.param_dtype} param(s) on {self.device} (state {self.state_dtype}): "
                f"{self.backend}")


def which_backend(params, *, backend=None, **group_options) -> list[BackendChoice]:
    """Which backend each (device, param dtype) group of `params` would run on, without running or allocating:
    one labelled entry per group (str() of an entry reads as a sentence; .backend is the name).

    group_options: the optimizer's options that matter (momentum, centered, state_dtype as a dtype name...).
    Raises what the step would raise when no backend can run a group."""
    from . import _arrays as arr
    from ._contract import Group, _as_real

    values = {**options.GROUP_DEFAULTS, **group_options}
    hyper = options.make(values["lr"], values["alpha"], values["eps"], values["weight_decay"], values["momentum"],
                         values["centered"], values["maximize"], values["capturable"],
                         switches=options.switch_bits(values))
    groups: dict[tuple, Group] = {}
    for p in map(_as_real, params):  # complex params run as their real view, DTensors as their shard
        key = (arr.device_of(p), arr.dtype_name(p))
        groups.setdefault(key, Group(*key, values.get("state_dtype") or key[1])).params.append(p)
    return [BackendChoice(str(g.device), g.param_dtype, g.state_dtype, len(g), backends.select(backend, g, hyper).name)
            for g in groups.values()]
