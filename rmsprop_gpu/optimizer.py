"""RMSprop: a drop-in for torch.optim.RMSprop that runs one fused launch per tensor group."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from . import backends
from . import functional as F
from ._contract import STATE_KEYS, validate_hyperparameters

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


class RMSprop(Optimizer):
    """torch.optim.RMSprop's arguments, defaults, validation, state keys and state_dict, fused.

    Keyword-only extensions:
      eps_in_sqrt: divide by sqrt(v + eps) (TF1/Keras/optax, the seed formula) instead of sqrt(v) + eps.
      state_dtype: torch.float32 keeps square_avg / momentum_buffer / grad_avg in float32 for fp16/bf16
                   params (default None: the param's dtype, as torch does).
      backend:     "auto" (default, or $RMSPROP_GPU_BACKEND), "triton", "cupy" or "torch".
    foreach=False keeps torch's meaning of a per-tensor loop: one launch per tensor instead of per group.
    Step counters of CUDA params live on the GPU (as with torch's fused optimizers) so the kernel advances
    them without a host sync; a state_dict still loads into torch.optim.RMSprop and back.
    """

    _step_supports_amp_scaling = True  # GradScaler hands grad_scale/found_inf to step(): unscale+skip in-kernel

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False, *,
                 eps_in_sqrt=False, state_dtype=None, backend=None):
        validate_hyperparameters(lr, alpha, eps, weight_decay, momentum)
        if differentiable:
            raise ValueError(
                "differentiable=True is not supported: the fused kernels record no autograd history "
                "(use torch.optim.RMSprop(differentiable=True) to differentiate through the step)"
            )
        if state_dtype not in (None, torch.float32):
            raise ValueError(f"state_dtype must be None (the param's dtype) or torch.float32, got {state_dtype}")
        backends.requested_name(backend)  # unknown names fail here, not at the first step
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, capturable=capturable, foreach=foreach, maximize=maximize,
                        differentiable=differentiable, eps_in_sqrt=eps_in_sqrt, state_dtype=state_dtype,
                        backend=backend)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, default in (("momentum", 0), ("centered", False), ("foreach", None), ("maximize", False),
                                 ("differentiable", False), ("capturable", False), ("eps_in_sqrt", False),
                                 ("state_dtype", None), ("backend", None)):
                group.setdefault(key, default)

    @staticmethod
    def _state_dtype(p: torch.Tensor, group) -> torch.dtype:
        sd = group.get("state_dtype")
        return sd if (sd is not None and p.dtype in _SIXTEEN_BIT) else p.dtype

    def _gather(self, group, pending: dict):
        """Params with grads and their state; new state goes to `pending`, committed only once all checks pass."""
        out = {k: [] for k in ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers", "steps")}
        needed = ["square_avg"] + ["momentum_buffer"] * (group["momentum"] > 0) + ["grad_avg"] * group["centered"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("RMSprop does not support sparse gradients")
            state = self.state.get(p, {})
            missing = [k for k in needed if k not in state]
            if missing or "step" not in state:  # copy only when adding: the live state stays untouched until then
                state = dict(state)
                if "step" not in state:
                    on_device = group["capturable"] or p.device.type == "cuda"
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
                for key in missing:
                    state[key] = torch.zeros_like(p, dtype=self._state_dtype(p, group),
                                                  memory_format=torch.preserve_format)
                pending[p] = state
            out["params"].append(p)
            out["grads"].append(p.grad)
            out["square_avgs"].append(state["square_avg"])
            out["steps"].append(state["step"])
            if group["momentum"] > 0:
                out["momentum_buffers"].append(state["momentum_buffer"])
            if group["centered"]:
                out["grad_avgs"].append(state["grad_avg"])
        return out

    @torch._disable_dynamo  # clean graph break (lazy: imports dynamo at the first call, not at import)
    @torch.no_grad()
    def step(self, closure=None):
        """One fused RMSprop step for every param group; returns closure's loss when given."""
        health_check = getattr(self, "_accelerator_graph_capture_health_check", None) or getattr(
            self, "_cuda_graph_capture_health_check", None)
        if health_check is not None:
            health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        pending: dict = {}
        plan = []
        for group in self.param_groups:
            t = self._gather(group, pending)
            if not t["params"]:
                continue
            plan += F.plan_step(
                t["params"], t["grads"], t["square_avgs"], t["grad_avgs"], t["momentum_buffers"], t["steps"],
                lr=group["lr"], alpha=group["alpha"], eps=group["eps"], weight_decay=group["weight_decay"],
                momentum=group["momentum"], centered=group["centered"], maximize=group["maximize"],
                eps_in_sqrt=group["eps_in_sqrt"], capturable=group["capturable"], grad_scale=grad_scale,
                found_inf=found_inf, foreach=group["foreach"], backend=group["backend"],
            )
        for p, state in pending.items():  # every check passed: commit new state, then write
            self.state[p] = state
        F.run_plan(plan)
        return loss

    def load_state_dict(self, state_dict) -> None:
        """torch's load_state_dict, refusing state that does not fit the params, keeping float32 state."""
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups) or any(
            len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)
        ):
            raise ValueError("loaded state dict has a different number of parameter groups or parameters")
        params_by_id = {pid: p for g, s in zip(groups, saved_groups) for pid, p in zip(s["params"], g["params"])}
        for pid, st in state_dict["state"].items():
            p = params_by_id.get(pid)
            if p is None:
                raise ValueError(f"loaded state dict has state for unknown param id {pid}")
            unknown = set(st) - {"step", *STATE_KEYS}
            if unknown:
                raise ValueError(f"loaded state for param {pid} has unknown keys {sorted(unknown)}")
            for key in STATE_KEYS:
                if key in st and tuple(st[key].shape) != tuple(p.shape):
                    raise ValueError(f"loaded {key} of param {pid} has shape {tuple(st[key].shape)}, "
                                     f"the param {tuple(p.shape)}")
            if "step" in st and torch.is_tensor(st["step"]) and st["step"].numel() != 1:
                raise ValueError(f"loaded step of param {pid} is not a scalar")
        super().load_state_dict(state_dict)
        # torch casts floating state to the param dtype; restore float32 state from the source values
        for g, s in zip(self.param_groups, saved_groups):
            for pid, p in zip(s["params"], g["params"]):
                st = state_dict["state"].get(pid, {})
                for key in STATE_KEYS:
                    if key in st and self._state_dtype(p, g) != p.dtype:
                        self.state[p][key] = st[key].to(device=p.device, dtype=self._state_dtype(p, g),
                                                        copy=True)
