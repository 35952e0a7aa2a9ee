"""The step as a torch custom op, so that torch.compile sees it (fullgraph=True, no graph break).

torch.ops.rmsprop_gpu.rmsprop_ mutates params and state in place and returns nothing. It is opaque to the
compiler on purpose, for every backend: the kernels write through the addresses in their tensor tables, which
a compiler cannot see, so torch.library.triton_op (which lets Inductor analyse the kernel's tensor arguments)
would not be sound here; the op's declared mutations (params, states, steps) are exactly what it writes.
At run time it is rmsprop_gpu.rmsprop() on the real tensors, with the plans cached per set of tensors.

Hyperparameters: lr as a tensor (lr_tensor) is read at run time, so a scheduler changing it never recompiles;
Python floats (lr, alpha, eps, weight_decay, momentum) are constants of the compiled graph, as in torch's own
compiled optimizers: changing one recompiles.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import PlanCache, RMSpropPlan

_PLANS = PlanCache(8)  # a few plans, keyed by tensor identity (they hold at most 8 sets of tensors alive)


def _plan_for(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, momentum, centered,
              eps_in_sqrt, capturable, backend, switches, stream_ids) -> RMSpropPlan:
    key = (tuple(map(id, params)), tuple(map(id, square_avgs)), tuple(map(id, state_steps)), momentum > 0,
           centered, eps_in_sqrt, capturable, backend, switches, None if stream_ids is None else tuple(stream_ids))
    return _PLANS.get(key, params + square_avgs + state_steps, lambda: RMSpropPlan(
        params, grads, square_avgs, grad_avgs or None, momentum_buffers or None, state_steps or None,
        momentum=momentum, centered=centered, eps_in_sqrt=eps_in_sqrt, capturable=capturable,
        backend=backend or None, lr_in_momentum=switches[0], nesterov=switches[1],
        decoupled_weight_decay=switches[2], bias_correction=switches[3], stochastic_rounding=switches[4],
        stream_ids=stream_ids))


@torch.library.custom_op("rmsprop_gpu::rmsprop_",
                         mutates_args=("params", "square_avgs", "grad_avgs", "momentum_buffers", "state_steps"))
def rmsprop_(params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor], grad_avgs: list[Tensor],
             momentum_buffers: list[Tensor], state_steps: list[Tensor], lr: float, lr_tensor: Tensor | None,
             alpha: float, eps: float, weight_decay: float, momentum: float, centered: bool, maximize: bool,
             eps_in_sqrt: bool, capturable: bool, backend: str, grad_scale: Tensor | None,
             found_inf: Tensor | None, lr_in_momentum: bool = False, nesterov: bool = False,
             decoupled_weight_decay: bool = False, bias_correction: bool = False, stochastic_rounding: bool = False,
             sr_seed: int = 0, stream_ids: list[int] | None = None) -> None:
    """One fused RMSprop step over these lists (empty grad_avgs / momentum_buffers when not used); stream_ids:
    each param's random stream (the optimizer's positions; default: positions in these lists)."""
    if not params:
        return
    plan = _plan_for(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, momentum, centered,
                     eps_in_sqrt, capturable, backend,
                     (lr_in_momentum, nesterov, decoupled_weight_decay, bias_correction, stochastic_rounding),
                     stream_ids)
    plan(grads=grads, lr=lr_tensor if lr_tensor is not None else lr, alpha=alpha, eps=eps,
         weight_decay=weight_decay, momentum=momentum, maximize=maximize, grad_scale=grad_scale,
         found_inf=found_inf, sr_seed=sr_seed)


@rmsprop_.register_fake
def _(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, lr, lr_tensor, alpha, eps,
      weight_decay, momentum, centered, maximize, eps_in_sqrt, capturable, backend, grad_scale, found_inf,
      lr_in_momentum=False, nesterov=False, decoupled_weight_decay=False, bias_correction=False,
      stochastic_rounding=False, sr_seed=0, stream_ids=None):
    return None  # in place only: no outputs, no metadata change
