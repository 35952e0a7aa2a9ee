"""Functional RMSprop over lists of tensors (torch) or arrays (CuPy), same options as the optimizer."""

from __future__ import annotations

import torch

from . import backends
from ._contract import Group, Hyper, build_groups, validate_hyperparameters

Plan = list[tuple[backends.Backend, Group, Hyper]]


def plan_step(
    params, grads, square_avgs, grad_avgs=None, momentum_buffer_list=None, state_steps=None, *,
    lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False,
    eps_in_sqrt=False, capturable=False, grad_scale=None, found_inf=None, foreach=None, backend=None,
) -> Plan:
    """Check everything and choose a backend per group, writing nothing. Raises on any problem."""
    validate_hyperparameters(lr, alpha, eps, weight_decay, momentum, read_tensor_lr=not capturable)
    hyper = Hyper(lr, float(alpha), float(eps), float(weight_decay), float(momentum), bool(centered),
                  bool(maximize), bool(eps_in_sqrt), bool(capturable), grad_scale, found_inf)
    groups = build_groups(params, grads, square_avgs, grad_avgs, momentum_buffer_list, state_steps, hyper)
    if foreach is False:  # torch's for-loop layout: one launch per tensor
        groups = [one for g in groups for one in g.split()]
    return [(backends.select(backend, g, hyper), g, hyper) for g in groups if len(g)]


def run_plan(plan: Plan) -> None:
    for backend, group, hyper in plan:
        backend.step(group, hyper)


@torch._disable_dynamo  # clean graph break under torch.compile (lazy: dynamo loads at the first call)
@torch.no_grad()
def rmsprop(
    params, grads, square_avgs, grad_avgs=None, momentum_buffer_list=None, state_steps=None, *,
    lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False,
    eps_in_sqrt=False, capturable=False, grad_scale=None, found_inf=None, foreach=None, backend=None,
) -> None:
    """One RMSprop step, in place, in torch.optim.rmsprop.rmsprop's argument order.

    params, grads, square_avgs (and momentum_buffer_list when momentum > 0, grad_avgs when centered) are
    lists of torch tensors or of CuPy arrays. state_steps, optional, are float32 scalar tensors advanced by
    one per step (not when found_inf is set). eps_in_sqrt=True divides by sqrt(v + eps) (TF/Keras/optax)
    instead of sqrt(v) + eps (torch). grad_scale / found_inf: device scalars from GradScaler: grads are
    divided by grad_scale, and a nonzero found_inf skips the step without writing anything.
    backend: "auto" (default, or $RMSPROP_GPU_BACKEND), "triton", "cupy" or "torch".
    Nothing is written unless every check passes.
    """
    run_plan(plan_step(
        params, grads, square_avgs, grad_avgs, momentum_buffer_list, state_steps,
        lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
        maximize=maximize, eps_in_sqrt=eps_in_sqrt, capturable=capturable, grad_scale=grad_scale,
        found_inf=found_inf, foreach=foreach, backend=backend,
    ))
