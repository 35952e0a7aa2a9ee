"""The step as a torch custom op, so that torch.compile sees it (fullgraph=True, no graph break).

torch.ops.rmsprop_gpu.rmsprop_ mutates params and state in place and returns nothing. It is opaque to the
compiler on purpose, for every backend: the kernels write through the addresses in their tensor tables, which
a compiler cannot see, so torch.library.triton_op (which lets Inductor analyse the kernel's tensor arguments)
would not be sound here; the op's declared mutations (params, states, steps) are exactly what it writes.
At run time it is rmsprop_gpu.rmsprop() on the real tensors, through plans cached by structure (_PLANS).

Hyperparameters: lr as a tensor (lr_tensor) is read at run time, so a scheduler changing it never recompiles;
Python floats (lr, alpha, eps, weight_decay, momentum) are constants of the compiled graph, as in torch's own
compiled optimizers: changing one recompiles.
"""

# no `from __future__ import annotations`, and typing's List / Optional: torch.library reads these annotations
# as the op's schema, and torch 2.4 (the support floor) knows neither string annotations nor list[...] / X | None
from typing import List, Optional

import torch
from torch import Tensor

from . import options
from ._contract import validate_hyperparameters
from .functional import run_planned
from .plan import LRU, per_call_views

# plans by the structure of a call (options, stream ids, list lengths). They hold no tensor: under aot_eager each
# call gets fresh copies of the params and state, and the plan re-points its tables at them (same layouts) or is
# rebuilt (anything else), instead of keeping a stale set of copies alive per call
_PLANS = LRU(16)


@torch.library.custom_op("rmsprop_gpu::rmsprop_",
                         mutates_args=("params", "square_avgs", "grad_avgs", "momentum_buffers", "state_steps"))
def rmsprop_(params: List[Tensor], grads: List[Tensor], square_avgs: List[Tensor], grad_avgs: List[Tensor],
             momentum_buffers: List[Tensor], state_steps: List[Tensor], lr: float, lr_tensor: Optional[Tensor],
             alpha: float, eps: float, weight_decay: float, momentum: float, centered: bool, maximize: bool,
             capturable: bool, backend: str, grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
             switches: int = 0, sr_seed: int = 0, stream_ids: Optional[List[int]] = None) -> None:
    """One fused RMSprop step over these lists (empty grad_avgs / momentum_buffers when not used); switches: the
    flag bits of the options table's switches that are on (rmsprop_gpu.options.switch_bits); stream_ids: each
    param's random stream (the optimizer's positions; default: positions in these lists)."""
    if not params:
        return
    lr = lr_tensor if lr_tensor is not None else lr
    validate_hyperparameters(lr, alpha, eps, weight_decay, momentum, read_tensor_lr=not capturable)
    hyper = options.make(lr, alpha, eps, weight_decay, momentum, centered, maximize, capturable, grad_scale,
                         found_inf, sr_seed, switches)
    lists = {"params": list(params), "grads": list(grads), "square_avgs": list(square_avgs),
             "momentum_buffers": list(momentum_buffers) or None, "grad_avgs": list(grad_avgs) or None,
             "steps": list(state_steps) or None}
    key = (len(params), momentum > 0, centered, capturable, backend, switches,
           None if stream_ids is None else tuple(stream_ids))
    plan = None if per_call_views(params) else _PLANS.get(key)
    _PLANS.put(key, run_planned(plan, lists, hyper, None, backend or None, stream_ids))


@rmsprop_.register_fake
def _(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, lr, lr_tensor, alpha, eps,
      weight_decay, momentum, centered, maximize, capturable, backend, grad_scale, found_inf, switches=0, sr_seed=0,
      stream_ids=None):
    return None  # in place only: no outputs, no metadata change
