"""Functional RMSprop over lists of tensors (torch) or arrays (CuPy), same options as the optimizer.

Each call checks everything (there is no plan to reuse between calls: the lists are new objects each time in
most callers); the tables are cached per backend, keyed by every address they hold. For the cached per-step
fast path use the optimizer, rmsprop_gpu.RMSprop, whose step plan is checked once and reused.
"""

from __future__ import annotations

import torch

from . import backends
from ._contract import validate_hyperparameters
from .plan import check_groups, make_hyper, prepare


@torch._disable_dynamo  # clean graph break under torch.compile (lazy: dynamo loads at the first call)
@torch.no_grad()
def rmsprop(
    params, grads, square_avgs, grad_avgs=None, momentum_buffer_list=None, state_steps=None, *,
    lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False,
    eps_in_sqrt=False, capturable=False, grad_scale=None, found_inf=None, foreach=None, differentiable=False,
    has_complex=False, backend=None,
) -> None:
    """One RMSprop step, in place, in torch.optim.rmsprop.rmsprop's argument order (and its keywords).

    params, grads, square_avgs (and momentum_buffer_list when momentum > 0, grad_avgs when centered) are
    lists of torch tensors or of CuPy arrays. state_steps, optional, are float32 scalar tensors advanced by
    one per step (not when found_inf is set). eps_in_sqrt=True divides by sqrt(v + eps) (TF/Keras/optax)
    instead of sqrt(v) + eps (torch). grad_scale / found_inf: device scalars from GradScaler: grads are
    divided by grad_scale, and a nonzero found_inf skips the step without writing anything.
    differentiable=True runs torch's own differentiable step (autograd records it); has_complex is accepted
    for torch's signature (complex params are detected either way).
    backend: "auto" (default, or $RMSPROP_GPU_BACKEND), "triton", "cupy" or "torch".
    Nothing is written unless every check passes, for every group and backend.
    """
    if differentiable:
        if eps_in_sqrt or grad_scale is not None or found_inf is not None:
            raise ValueError("differentiable=True runs torch's own step: no eps_in_sqrt, grad_scale or found_inf")
        from torch.optim.rmsprop import rmsprop as torch_rmsprop

        with torch.enable_grad():
            torch_rmsprop(params, grads, square_avgs, list(grad_avgs or []), list(momentum_buffer_list or []),
                          list(state_steps or []), foreach=False, maximize=maximize, differentiable=True,
                          capturable=capturable, has_complex=any(p.is_complex() for p in params), lr=lr,
                          alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered)
        return
    validate_hyperparameters(lr, alpha, eps, weight_decay, momentum, read_tensor_lr=not capturable)
    hyper = make_hyper(lr, alpha, eps, weight_decay, momentum, centered, maximize, eps_in_sqrt, capturable,
                       grad_scale, found_inf)
    checked = check_groups(params, grads, square_avgs, grad_avgs, momentum_buffer_list, state_steps, hyper,
                           foreach=foreach, backend=backend)
    for entry in prepare(checked, owned=False):  # every check and table first, then the writes
        entry.run({0: hyper})


def which_backend(params, *, backend=None, **options) -> list[str]:
    """The backend each (device, param dtype) group of `params` would run on, without running or allocating.

    options: the optimizer's options that matter (momentum, centered, state_dtype as a dtype name...). Raises
    what the step would raise when no backend can run a group."""
    from . import _arrays as arr
    from ._contract import Group, _as_real

    hyper = make_hyper(options.get("lr", 1e-2), options.get("alpha", 0.99), options.get("eps", 1e-8),
                       options.get("weight_decay", 0.0), options.get("momentum", 0.0),
                       options.get("centered", False), options.get("maximize", False),
                       options.get("eps_in_sqrt", False), options.get("capturable", False))
    groups: dict[tuple, Group] = {}
    for p in map(_as_real, params):  # complex params run as their real view, DTensors as their shard
        key = (arr.device_of(p), arr.dtype_name(p))
        groups.setdefault(key, Group(*key, options.get("state_dtype") or key[1])).params.append(p)
    return [backends.select(backend, g, hyper).name for g in groups.values()]
